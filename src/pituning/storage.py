"""Byte storage for the expert bank: a local directory (atomic, fsynced, file-locked) or any fsspec URL.

Local writes go to a temporary file in the same directory, are fsynced, renamed over the target and the directory is
fsynced, so a reader sees the old or the new file, never a partial one. A lock file serialises writers across
processes (``filelock``: ``flock`` on POSIX, ``msvcrt`` locking on Windows). fsspec URLs (``memory://``, object
stores) get write-then-move and an in-process lock only: object stores offer no cross-process lock, so one writer at a
time is the user's job there.

Every path is relative to the bank root and checked before use: no absolute path, no ``..``, and (locally) no symlink
that resolves outside the root, so nothing a bank file says can make a read or a delete reach outside the bank.
"""

from __future__ import annotations

import contextlib
import os
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from filelock import FileLock

from pituning.errors import BankError

__all__ = ["FsspecStorage", "LocalStorage", "Storage", "open_storage", "write_file_atomic"]


class Storage:
    """Interface: paths are ``/``-separated and relative to the bank root."""

    root: str

    def read(self, path: str) -> bytes:
        """The bytes of ``path`` (``FileNotFoundError`` if absent)."""
        raise NotImplementedError

    def read_from(self, path: str, offset: int) -> bytes:
        """The bytes of ``path`` from ``offset`` on."""
        raise NotImplementedError

    def write_atomic(self, path: str, data: bytes) -> None:
        """Write ``data`` to ``path`` so that readers never see a partial file."""
        raise NotImplementedError

    def append(self, path: str, data: bytes) -> None:
        """Append ``data`` to ``path`` durably (creating it)."""
        raise NotImplementedError

    def truncate(self, path: str, size: int) -> None:
        """Cut ``path`` to its first ``size`` bytes durably."""
        raise NotImplementedError

    def exists(self, path: str) -> bool:
        """Whether ``path`` exists."""
        raise NotImplementedError

    def size(self, path: str) -> int:
        """Size of ``path`` in bytes, ``-1`` if absent."""
        raise NotImplementedError

    def token(self, path: str) -> Any:
        """A value that changes whenever ``path`` changes (for caches); ``None`` if it cannot tell."""
        return None

    def listdir(self, path: str) -> list[str]:
        """Names of the entries of directory ``path`` (``""``: the bank root; empty if absent)."""
        raise NotImplementedError

    def remove_tree(self, path: str) -> None:
        """Delete ``path`` and everything below it (no error if absent)."""
        raise NotImplementedError

    def makedirs(self, path: str) -> None:
        """Create directory ``path`` and its parents."""
        raise NotImplementedError

    def lock(self) -> contextlib.AbstractContextManager[None]:
        """An exclusive lock over the whole bank."""
        raise NotImplementedError

    def describe(self, path: str) -> str:
        """``path`` as a user would type it (for messages)."""
        return f"{self.root.rstrip('/')}/{path}"


def _parts(path: str) -> list[str]:
    """The segments of a bank-relative path; a path that could leave the bank is refused."""
    parts = path.split("/")
    if not path or "\\" in path or "\0" in path or any(p in ("", ".", "..") for p in parts):
        raise BankError(
            f"Bank path {path!r} is not a plain relative path inside the bank (absolute, empty, '.' or '..'); "
            "a bank file may never point outside the bank. The bank is damaged or was tampered with."
        )
    return parts


_LOCAL_LOCKS: dict[str, threading.RLock] = {}


class LocalStorage(Storage):
    """A bank in a local directory."""

    def __init__(self, root: str | Path) -> None:
        if not str(root).strip():
            raise BankError("The bank location is empty; pass a directory (for example runs/bank) or an fsspec URL.")
        try:
            resolved = Path(root).expanduser().resolve()
        except (ValueError, RuntimeError, OSError) as err:  # a NUL byte, an unknown ~user, a loop of links
            raise BankError(
                f"Bank location {str(root)!r} is not a usable path ({err}); pass a plain directory."
            ) from err
        nearest_folder(resolved, f"Bank location {root}")
        self.root = str(resolved)
        self._thread_lock = _LOCAL_LOCKS.setdefault(self.root, threading.RLock())
        self._held = 0
        self._file_lock: Any = None

    def _p(self, path: str) -> Path:
        target = Path(self.root, *_parts(path))
        real = os.path.realpath(target)
        if not real.startswith(self.root + os.sep):
            raise BankError(
                f"{target} resolves to {real}, outside the bank at {self.root} (a symlink?); a bank file may never "
                "point outside the bank. Remove the link."
            )
        return target

    def read(self, path: str) -> bytes:
        return self._p(path).read_bytes()

    def read_from(self, path: str, offset: int) -> bytes:
        with open(self._p(path), "rb") as handle:
            handle.seek(offset)
            return handle.read()

    def write_atomic(self, path: str, data: bytes) -> None:
        write_file_atomic(self._p(path), data)

    def append(self, path: str, data: bytes) -> None:
        target = self._p(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        with open(target, "ab") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())

    def truncate(self, path: str, size: int) -> None:
        with open(self._p(path), "r+b") as handle:
            handle.truncate(size)
            handle.flush()
            os.fsync(handle.fileno())

    def exists(self, path: str) -> bool:
        return self._p(path).exists()

    def size(self, path: str) -> int:
        try:
            return self._p(path).stat().st_size
        except FileNotFoundError:
            return -1

    def token(self, path: str) -> Any:
        try:
            st = self._p(path).stat()
        except FileNotFoundError:
            return ("absent",)
        return (st.st_ino, st.st_size, st.st_mtime_ns)

    def listdir(self, path: str) -> list[str]:
        target = Path(self.root) if path == "" else self._p(path)
        return sorted(p.name for p in target.iterdir()) if target.is_dir() else []

    def remove_tree(self, path: str) -> None:
        import shutil

        target = self._p(path)
        if target.is_dir():
            # another process may delete entries meanwhile (a concurrent gc): absent is the goal, not an error
            shutil.rmtree(target, onerror=_ignore_absent)
        else:
            target.unlink(missing_ok=True)

    def makedirs(self, path: str) -> None:
        self._p(path).mkdir(parents=True, exist_ok=True)

    @contextlib.contextmanager
    def lock(self) -> Iterator[None]:
        with self._thread_lock:
            if self._held == 0:
                Path(self.root).mkdir(parents=True, exist_ok=True)
                self._file_lock = FileLock(
                    str(Path(self.root, ".lock")), thread_local=False, preserve_lock_file=True
                )  # the file stays: deleting it would let two processes lock two different files
                self._file_lock.acquire()
            self._held += 1
            try:
                yield
            finally:
                self._held -= 1
                if self._held == 0:
                    assert self._file_lock is not None
                    self._file_lock.release()
                    self._file_lock = None


def write_file_atomic(path: str | Path, data: bytes) -> None:
    """Write ``data`` to the local file ``path`` so that a reader (or a crash) never sees a partial file: a temporary
    file in the same directory, fsynced, renamed over ``path``, then the directory fsynced."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.{uuid.uuid4().hex}.tmp")
    try:
        with open(tmp, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(target.parent)


def _ignore_absent(_func: Any, _path: str, exc_info: Any) -> None:
    if not isinstance(exc_info[1], FileNotFoundError):
        raise exc_info[1]


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory fds
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


_URL_LOCKS: dict[str, threading.RLock] = {}


class FsspecStorage(Storage):
    """A bank at an fsspec URL (``memory://bank``, ``s3://bucket/bank``, ...)."""

    def __init__(self, url: str) -> None:
        import fsspec

        try:
            self.fs, path = fsspec.core.url_to_fs(url)
        except (ValueError, ImportError) as err:
            raise BankError(
                f"Cannot open a bank at {url}: {err}. Use a local directory or an fsspec URL whose protocol is "
                "installed (memory://, s3:// with s3fs, gs:// with gcsfs ...)."
            ) from err
        self.root = url
        self._base = path.rstrip("/")
        self._lock = _URL_LOCKS.setdefault(url, threading.RLock())

    def _p(self, path: str) -> str:
        return f"{self._base}/{'/'.join(_parts(path))}"

    def read(self, path: str) -> bytes:
        try:
            data = self.fs.cat_file(self._p(path))
        except FileNotFoundError:
            raise
        except OSError as err:  # some filesystems raise OSError subclasses for absent files
            raise FileNotFoundError(path) from err
        assert isinstance(data, bytes)
        return data

    def read_from(self, path: str, offset: int) -> bytes:
        return self.read(path)[offset:]

    def write_atomic(self, path: str, data: bytes) -> None:
        target = self._p(path)
        parent = target.rsplit("/", 1)[0]
        self.fs.makedirs(parent, exist_ok=True)
        tmp = f"{parent}/.{target.rsplit('/', 1)[1]}.{uuid.uuid4().hex}.tmp"
        self.fs.pipe_file(tmp, data)
        try:
            self.fs.mv(tmp, target)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                self.fs.rm(tmp)
            raise

    def append(self, path: str, data: bytes) -> None:
        target = self._p(path)
        self.fs.makedirs(target.rsplit("/", 1)[0], exist_ok=True)
        try:
            with self.fs.open(target, "ab") as handle:
                handle.write(data)
        except (NotImplementedError, ValueError):  # object stores cannot append: rewrite
            old = self.read(path) if self.exists(path) else b""
            self.write_atomic(path, old + data)

    def truncate(self, path: str, size: int) -> None:
        self.write_atomic(path, self.read(path)[:size])

    def exists(self, path: str) -> bool:
        return bool(self.fs.exists(self._p(path)))

    def size(self, path: str) -> int:
        try:
            return int(self.fs.size(self._p(path)))
        except FileNotFoundError:
            return -1

    def token(self, path: str) -> Any:
        try:
            info = self.fs.info(self._p(path))
        except FileNotFoundError:
            return ("absent",)
        stamp = info.get("mtime") or info.get("LastModified") or info.get("created")
        return None if stamp is None else (info.get("size"), str(stamp), info.get("ETag"))

    def listdir(self, path: str) -> list[str]:
        target = self._base if path == "" else self._p(path)
        if not self.fs.isdir(target):
            return []
        return sorted(p.rstrip("/").rsplit("/", 1)[-1] for p in self.fs.ls(target, detail=False))

    def remove_tree(self, path: str) -> None:
        target = self._p(path)
        if self.fs.exists(target):
            self.fs.rm(target, recursive=True)

    def makedirs(self, path: str) -> None:
        self.fs.makedirs(self._p(path), exist_ok=True)

    @contextlib.contextmanager
    def lock(self) -> Iterator[None]:
        with self._lock:
            yield


def check_writable(location: str | Path, what: str = "bank") -> None:
    """Check, creating nothing, that ``location`` can hold a directory this process writes: for a local path, that
    it is no file nor under one and that its nearest existing folder is writable (a :class:`BankError` naming
    ``what`` and the fix); an fsspec URL is only parsed."""
    text = str(location)
    if "://" in text and not text.startswith("file://"):
        open_storage(text)
        return
    folder = nearest_folder(Path(text.removeprefix("file://")).expanduser().absolute(), f"The {what} location {text}")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise BankError(
            f"The {what} location {text} cannot be written: {folder} is not writable by this user; pass a "
            "directory you can write."
        )


def nearest_folder(path: Path, described: str) -> Path:
    """The nearest existing ancestor of ``path`` (``path`` itself included), which must be a folder: a
    :class:`BankError` ``"<described> is a file"`` (or is under one) otherwise."""
    for parent in (path, *path.parents):
        if not parent.exists():
            continue
        if not parent.is_dir():
            where = "is a file" if parent == path else f"is under {parent}, which is a file"
            raise BankError(f"{described} {where}; pass a directory (a new one is created).")
        return parent
    return path  # pragma: no cover - the filesystem root always exists


def open_storage(location: str | Path) -> Storage:
    """Local storage for a path or ``file://`` URL, fsspec storage for any other URL."""
    text = str(location)
    if "://" not in text:
        return LocalStorage(text)
    if text.startswith("file://"):
        return LocalStorage(text[len("file://") :])
    return FsspecStorage(text)
