"""ExpertBank reliability: a catalogue of faults run against the bank, each counted.

    python benchmarks/reliability/run.py                      # full catalogue; writes benchmarks/results/reliability.*
    python benchmarks/reliability/run.py --smoke --out /tmp/r # a quick run (tests/test_reliability_smoke.py)

The catalogue:

a. kill -9: a child process adds experts to a local bank in a loop (some overwrites, some ``add_many`` batches, some
   trials with a tiny journal-compaction interval) and prints each acknowledged add; the parent kills it with SIGKILL
   at a random time, then checks that every acknowledged add is present and ``get()`` returns it intact (an expert
   whose add was in flight may hold either version). Plus a torn journal tail (a record without its newline, as a
   power cut leaves it) followed by a normal add.
b. writer + gc race: one process adds experts continuously while another runs ``gc()`` and ``verify()`` every
   0.1-0.5 s; then every acknowledged add must be readable, and neither side may raise a raw exception.
c. one-bit flips: in a copy of a small bank (compacted manifest, journal, heads, embeddings, similarity cache), one
   random bit of one file is flipped, then: open, ``list()``, ``get()`` of every expert, ``similar()`` of every
   expert, ``verify()``. The outcome is *detected* (a pituning error other than a plain "no expert" lookup miss, or a
   problem reported by ``verify()``), *harmless* (every observable result identical to the unflipped bank), *silent*
   (something changed and nothing said so) or *raw exception*. ``gc()`` must not delete an intact expert folder.
d. hostile names and paths: expert names such as ``../x``, NUL or bidi characters; journal and manifest records whose
   ``folder`` or file paths leave the bank (``experts/../../victim``, absolute paths, symlinks); symlinked ``experts/``
   and ``cache/``; bank locations that are a file, under a file, empty or of an unknown protocol. A sentinel directory
   next to the bank must keep identical contents, and nothing outside the bank may change.
e. hostile PEFT adapter directories for ``ExpertBank.import_peft``: bad JSON, bad ``r``, garbage, huge-header and
   pickle "safetensors", prefixes of the wrong width, PiSSA / OLoRA / LoftQ / aLoRA / DoRA configs, non-finite
   weights. Each must be refused with a pituning error; nothing is ever unpickled (``pickle`` and ``torch.load`` are
   trapped while this item runs).

Goals: 0 acknowledged adds lost, 100% of flips detected or harmless, 0 raw exceptions, 0 files touched outside the
bank, 0 hostile adapters accepted. The script reports what it measures and never fails on a missed goal.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import hashlib
import json
import os
import pickle
import random
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

import pituning.bank as bank_module
from pituning import LoraConfig
from pituning.backbones import Fingerprint
from pituning.bank import BackboneIdentity, Expert, ExpertBank, TaskInfo
from pituning.errors import BankCorruptionError, PiTuningError
from pituning.suite import machine

RESULTS = Path(__file__).resolve().parents[1] / "results"
MODULES = ("layers.0.q", "layers.1.q")
BACKBONE = BackboneIdentity("reliability-backbone", "toy", Fingerprint("c" * 64, "d" * 64, 1000))
FLIP_KINDS = (
    "manifest.json",
    "journal.jsonl",
    "expert.json",
    "weights.safetensors",
    "embedding.safetensors",
    "head.safetensors",
    "cache/embeddings-*.safetensors",
)


@dataclass(frozen=True)
class Settings:
    """Sizes of one run."""

    kill_trials: int
    """Kill -9 trials (a)."""
    kill_window_s: tuple[float, float]
    """The child is killed this long after it is ready (uniform)."""
    race_adds: int
    """Adds of the writer racing gc (b)."""
    gc_interval_s: tuple[float, float]
    """Pause of the gc process between two gc + verify rounds (uniform)."""
    flips_per_kind: int
    """One-bit flips per file kind (c)."""


SETTINGS = {
    "full": Settings(
        kill_trials=50, kill_window_s=(0.05, 1.5), race_adds=180, gc_interval_s=(0.1, 0.5), flips_per_kind=20
    ),
    "smoke": Settings(
        kill_trials=3, kill_window_s=(0.2, 0.8), race_adds=20, gc_interval_s=(0.05, 0.2), flips_per_kind=2
    ),
}


# ------------------------------------------------------------------------------------------ helpers
def make_expert(name: str, seed: int) -> Expert:
    """A small LoRA expert whose every tensor follows from ``seed`` (with an embedding; a head for even seeds)."""
    gen = torch.Generator().manual_seed(seed)
    state = {}
    for module in MODULES:
        state[f"{module}.pi_lora.lora_A"] = torch.randn(2, 8, generator=gen)
        state[f"{module}.pi_lora.lora_B"] = torch.randn(8, 2, generator=gen)
    embedding = {k: torch.rand(v.shape, generator=gen) + 0.01 for k, v in state.items()}
    head = (
        {"weight": torch.randn(3, 8, generator=gen), "bias": torch.randn(3, generator=gen)} if seed % 2 == 0 else None
    )
    return Expert(
        name=name,
        config=LoraConfig(r=2, alpha=4.0),
        state=state,
        task=TaskInfo(f"task-{name}", label_names=["a", "b", "c"], num_examples=32),
        backbone=BACKBONE,
        metrics={"seed": float(seed)},
        embedding=embedding,
        head=head,
        modules={m: {"type": "Linear", "conv": False, "weight_shape": [], "plain_conv": False} for m in MODULES},
    )


def _same_tensors(a: dict[str, Tensor] | None, b: dict[str, Tensor] | None) -> bool:
    """Same keys, dtypes and values (or both ``None``)."""
    if a is None or b is None:
        return a is b
    return set(a) == set(b) and all(a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]) for k in a)


def matches(expert: Expert, name: str, seed: int) -> bool:
    """Whether ``expert`` is exactly ``make_expert(name, seed)`` (config, task, every tensor)."""
    want = make_expert(name, seed)
    return (
        expert.name == name
        and expert.config == want.config
        and expert.task == want.task
        and _same_tensors(expert.state, want.state)
        and _same_tensors(expert.embedding, want.embedding)
        and _same_tensors(expert.head, want.head)
    )


def describe(err: BaseException) -> dict[str, Any]:
    """An exception as JSON: type, whether it is a pituning error (and a corruption report), message."""
    return {
        "type": f"{type(err).__module__}.{type(err).__qualname__}",
        "pituning": isinstance(err, PiTuningError),
        "corruption": isinstance(err, BankCorruptionError),
        "message": str(err)[:400],
    }


def _short(error: dict[str, Any]) -> str:
    """``Type: message`` of a :func:`describe` dict, cut short."""
    return f"{error['type'].rsplit('.', 1)[-1]}: {error['message'][:160]}"


def _sha(path: Path) -> str:
    """sha256 of a file's bytes."""
    return hashlib.sha256(path.read_bytes()).hexdigest()


# ------------------------------------------------------------------------------------------ children
def _spawn(spec: dict[str, Any], log: Path) -> subprocess.Popen[str]:
    """Start this script as a child process playing ``spec['role']`` (stderr goes to ``log``)."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    with open(log, "ab") as err:
        return subprocess.Popen(
            [sys.executable, str(Path(__file__).resolve()), "_child", json.dumps(spec)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=err,
            text=True,
            env=env,
        )


def _wait_ready(proc: subprocess.Popen[str], log: Path) -> None:
    """Block until a child prints ``ready`` (raise with its stderr if it died instead)."""
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if line.strip() != "ready":
        proc.kill()
        proc.wait()
        raise RuntimeError(f"child process did not start: {line!r}\n{log.read_text()[-3000:]}")


def _child_writer(spec: dict[str, Any]) -> None:
    """Add experts (``B name seed`` before each call, ``A name seed`` once acknowledged, ``E {json}`` on an error)."""
    if spec.get("compact_every") and hasattr(bank_module, "COMPACT_EVERY"):
        bank_module.COMPACT_EVERY = int(spec["compact_every"])
    bank = ExpertBank(spec["bank"])
    print("ready", flush=True)
    if spec.get("wait_go"):
        sys.stdin.readline()
    count, every, batch = spec.get("count"), int(spec.get("overwrite_every") or 0), int(spec.get("batch") or 1)
    i = 0
    while count is None or i < count:
        group = []
        for j in range(i, i + batch):
            overwrite = every > 0 and j % every == every - 1
            name = f"{spec['prefix']}{(j - 3 if overwrite else j):05d}"
            group.append((name, int(spec["seed"]) * 100_000 + j, overwrite))
        print("".join(f"B {n} {s}\n" for n, s, _ in group), end="", flush=True)
        experts = [make_expert(n, s) for n, s, _ in group]
        overwrite = any(o for _, _, o in group)
        try:
            if len(experts) == 1:
                bank.add(experts[0], overwrite=overwrite)
            else:
                bank.add_many(experts, overwrite=overwrite)
        except Exception as err:
            print("E " + json.dumps(describe(err)), flush=True)
        else:
            print("".join(f"A {n} {s}\n" for n, s, _ in group), end="", flush=True)
        i += batch
    print("done", flush=True)


def _child_gc(spec: dict[str, Any]) -> None:
    """Run ``gc()`` then ``verify()`` in a loop until the stop file exists; one JSON line per call."""
    bank = ExpertBank(spec["bank"])
    rng = random.Random(spec["seed"])
    stop = Path(spec["stop"])
    print("ready", flush=True)
    sys.stdin.readline()
    lo, hi = spec["interval"]
    while not stop.exists():
        try:
            print(json.dumps({"op": "gc", "removed": bank.gc()}), flush=True)
        except Exception as err:
            print(json.dumps({"op": "gc", "error": describe(err)}), flush=True)
        try:
            problems, warnings = bank.verify()
            print(json.dumps({"op": "verify", "problems": problems, "warnings": len(warnings)}), flush=True)
        except Exception as err:
            print(json.dumps({"op": "verify", "error": describe(err)}), flush=True)
        time.sleep(rng.uniform(lo, hi))
    print("done", flush=True)


# ------------------------------------------------------------------------------------------ a. kill -9
@dataclass
class _Log:
    """What a writer child printed: acknowledged seeds, in-flight or failed ops, errors."""

    acked: dict[str, int]
    maybe: dict[str, set[int]]
    acks: int
    errors: list[dict[str, Any]]


def parse_writer(text: str) -> _Log:
    """Parse a writer child's output: an op begun but not acknowledged may or may not have happened."""
    acked: dict[str, int] = {}
    pending: dict[tuple[str, int], None] = {}
    maybe: dict[str, set[int]] = {}
    acks = 0
    errors = []
    for line in text.splitlines():
        tag, _, rest = line.partition(" ")
        if tag == "B":
            name, seed = rest.split()
            pending[(name, int(seed))] = None
        elif tag == "A":
            name, seed = rest.split()
            acked[name] = int(seed)
            pending.pop((name, int(seed)), None)
            maybe.get(name, set()).discard(int(seed))
            acks += 1
        elif tag == "E":
            errors.append(json.loads(rest))
            for name, seed in pending:
                maybe.setdefault(name, set()).add(seed)
            pending.clear()
    for name, seed in pending:  # the op the kill interrupted
        maybe.setdefault(name, set()).add(seed)
    return _Log(acked, maybe, acks, errors)


def check_log(location: Path, log: _Log) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Check a bank against a writer's log.

    Returns:
        ``(lost, torn)``: acknowledged experts missing, unreadable or not as acknowledged (an in-flight overwrite's
        version is accepted), and entries of unacknowledged adds that are listed but unreadable.
    """
    lost: list[dict[str, Any]] = []
    torn: list[dict[str, Any]] = []
    try:
        bank = ExpertBank(location, create=False)
        present = set(bank.names())
    except Exception as err:
        return [{"name": n, "why": "bank did not open: " + _short(describe(err))} for n in log.acked], []
    for name, seed in sorted(log.acked.items()):
        allowed = {seed} | log.maybe.get(name, set())
        if name not in present:
            lost.append({"name": name, "why": "missing"})
            continue
        try:
            expert = bank.get(name)
        except Exception as err:
            lost.append({"name": name, "why": "unreadable: " + _short(describe(err))})
            continue
        if not any(matches(expert, name, s) for s in allowed):
            lost.append({"name": name, "why": f"content is not seed {sorted(allowed)}"})
    for name, seeds in sorted(log.maybe.items()):
        if name in log.acked or name not in present:
            continue
        try:
            expert = bank.get(name)
        except Exception as err:
            torn.append({"name": name, "why": "unreadable: " + _short(describe(err))})
            continue
        if not any(matches(expert, name, s) for s in seeds):
            torn.append({"name": name, "why": "content matches no in-flight version"})
    return lost, torn


def kill_trials(work: Path, settings: Settings, rng: random.Random) -> dict[str, Any]:
    """a. Kill a writer with SIGKILL at random times; every acknowledged add must survive intact."""
    location = work / "kill-bank"
    ExpertBank(location)
    log_path = work / "kill-children.log"
    trials: list[dict[str, Any]] = []
    everything = _Log({}, {}, 0, [])
    for t in range(settings.kill_trials):
        spec = {
            "role": "writer",
            "bank": str(location),
            "prefix": f"t{t:03d}x",
            "seed": t + 1,
            "count": None,
            "overwrite_every": 5,
            "batch": 3 if t % 3 == 2 else 1,
            "compact_every": 7 if t % 2 == 1 else 0,
        }
        proc = _spawn(spec, log_path)
        _wait_ready(proc, log_path)
        delay = rng.uniform(*settings.kill_window_s)
        time.sleep(delay)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        assert proc.stdout is not None
        log = parse_writer(proc.stdout.read())
        proc.stdout.close()
        assert proc.stdin is not None
        proc.stdin.close()
        lost, torn = check_log(location, log)
        trials.append(
            {
                "trial": t,
                "kill_after_s": round(delay, 3),
                "batch": spec["batch"],
                "compact_every": spec["compact_every"] or "default",
                "acknowledged": log.acks,
                "lost": lost,
                "torn_unacknowledged": torn,
                "writer_errors": log.errors,
            }
        )
        everything.acked.update(log.acked)
        everything.acks += log.acks
        everything.errors += log.errors
        for name, seeds in log.maybe.items():
            everything.maybe.setdefault(name, set()).update(seeds)
    # afterwards: every acknowledged expert of every trial, verify, gc, and again
    final_lost, _ = check_log(location, everything)
    verify: dict[str, Any] = {}
    try:
        bank = ExpertBank(location, create=False)
        problems, warnings = bank.verify()
        removed = bank.gc()
        verify = {
            "problems": problems[:10],
            "n_problems": len(problems),
            "orphans": len(warnings),
            "gc_removed": len(removed),
        }
    except Exception as err:
        verify = {"error": describe(err)}
    after_gc_lost, _ = check_log(location, everything)
    stray = sorted(p.name for p in location.iterdir() if p.name.endswith(".tmp"))
    torn_tail = torn_tail_check(work / "torn-bank")
    lost_names = {x["name"] for tr in trials for x in tr["lost"]} | {x["name"] for x in final_lost + after_gc_lost}
    raw = [e for e in everything.errors if not e["pituning"]] + [e for e in torn_tail["errors"] if not e["pituning"]]
    if "error" in verify and not verify["error"]["pituning"]:
        raw.append(verify["error"])
    return {
        "trials": len(trials),
        "acknowledged_adds": everything.acks,
        "unique_experts": len(everything.acked),
        "lost": len(lost_names) + len(torn_tail["lost"]),
        "lost_examples": ([x for tr in trials for x in tr["lost"]] + final_lost + after_gc_lost + torn_tail["lost"])[
            :20
        ],
        "torn_unacknowledged": sum(len(tr["torn_unacknowledged"]) for tr in trials),
        "writer_errors": len(everything.errors),
        "raw_exceptions": len(raw),
        "raw_examples": raw[:10],
        "after": verify,
        "stray_temp_files": stray[:20],
        "n_stray_temp_files": len(stray),
        "torn_tail": torn_tail,
        "per_trial": [{k: v for k, v in tr.items() if k not in ("lost", "torn_unacknowledged")} for tr in trials],
    }


def torn_tail_check(location: Path) -> dict[str, Any]:
    """A journal record cut before its newline (a power cut mid-append), then a normal add: nothing may be lost."""
    errors: list[dict[str, Any]] = []
    lost: list[dict[str, Any]] = []
    bank = ExpertBank(location)
    bank.add(make_expert("before", 1))
    with open(location / bank_module.JOURNAL, "ab") as handle:
        handle.write(b'{"op": "add", "entry": {"name": "half')
    try:
        ExpertBank(location).add(make_expert("after", 2))
        acked = {"before": 1, "after": 2}
    except Exception as err:
        errors.append(describe(err))
        acked = {"before": 1}
    lost, _ = check_log(location, _Log(acked, {}, len(acked), []))
    return {"acknowledged": len(acked), "lost": lost, "errors": errors}


# ------------------------------------------------------------------------------------------ b. gc race
def _classify_error(error: dict[str, Any]) -> str:
    """``raw`` (not a pituning error: a crash), ``corruption`` (a corruption report) or ``refusal`` (handled)."""
    if not error["pituning"]:
        return "raw"
    return "corruption" if error["corruption"] else "refusal"


def gc_race(work: Path, settings: Settings, rng: random.Random) -> dict[str, Any]:
    """b. One process adds experts while another runs gc() and verify(); every acknowledged add must stay readable."""
    location = work / "race-bank"
    ExpertBank(location)
    log_path = work / "race-children.log"
    stop = work / "race.stop"
    writer_spec = {"role": "writer", "bank": str(location), "prefix": "r", "seed": 7, "count": settings.race_adds}
    writer = _spawn({**writer_spec, "wait_go": True}, log_path)
    gcer = _spawn(
        {
            "role": "gc",
            "bank": str(location),
            "seed": rng.randrange(2**31),
            "stop": str(stop),
            "interval": settings.gc_interval_s,
        },
        log_path,
    )
    _wait_ready(writer, log_path)
    _wait_ready(gcer, log_path)
    start = time.perf_counter()
    for proc in (writer, gcer):
        assert proc.stdin is not None
        proc.stdin.write("go\n")
        proc.stdin.flush()
    hung: list[dict[str, Any]] = []
    try:
        writer_out, _ = writer.communicate(timeout=300)
    except subprocess.TimeoutExpired:
        writer.kill()
        writer_out, _ = writer.communicate()
        hung.append({"type": "TimeoutExpired", "pituning": False, "corruption": False, "message": "writer hung"})
    duration = time.perf_counter() - start
    stop.touch()
    try:
        gc_out, _ = gcer.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        gcer.kill()
        gc_out, _ = gcer.communicate()
        hung.append({"type": "TimeoutExpired", "pituning": False, "corruption": False, "message": "gc process hung"})
    log = parse_writer(writer_out)
    rounds = [json.loads(line) for line in gc_out.splitlines() if line.startswith("{")]
    gc_errors = [r["error"] for r in rounds if "error" in r]
    verify_problems = [p for r in rounds if r["op"] == "verify" for p in r.get("problems", [])]
    removed = [f for r in rounds if r["op"] == "gc" for f in r.get("removed", [])]
    lost, torn = check_log(location, log)
    after: dict[str, Any]
    try:
        problems, warnings = ExpertBank(location, create=False).verify()
        after = {"n_problems": len(problems), "problems": problems[:10], "orphans": len(warnings)}
    except Exception as err:
        after = {"error": describe(err)}
    errors = [("writer", e) for e in log.errors] + [("gc", e) for e in gc_errors] + [("harness", e) for e in hung]
    by_class = Counter(f"{side} {_classify_error(e)}: {e['type'].rsplit('.', 1)[-1]}" for side, e in errors)
    return {
        "adds_attempted": settings.race_adds,
        "acknowledged_adds": log.acks,
        "writer_seconds": round(duration, 2),
        "gc_rounds": sum(r["op"] == "gc" for r in rounds),
        "gc_removed_folders": len(removed),
        "unreadable": len(lost),
        "unreadable_examples": lost[:20],
        "torn_unacknowledged": len(torn),
        "exceptions": dict(sorted(by_class.items())),
        "raw_exceptions": sum(_classify_error(e) == "raw" for _, e in errors),
        "corruption_errors": sum(_classify_error(e) == "corruption" for _, e in errors),
        "handled_refusals": sum(_classify_error(e) == "refusal" for _, e in errors),
        "exception_examples": [{"side": s, **e} for s, e in errors[:10]],
        "verify_problems_during_race": len(verify_problems),
        "verify_problem_examples": verify_problems[:5],
        "after": after,
    }


# ------------------------------------------------------------------------------------------ c. bit flips
def build_flip_bank(location: Path) -> list[str]:
    """A bank of 5 experts: 3 folded into manifest.json, 2 in the journal, 3 heads, and the similarity cache."""
    bank = ExpertBank(location)
    names = [f"x{i}" for i in range(5)]
    saved = getattr(bank_module, "COMPACT_EVERY", None)
    try:
        if saved is not None:
            bank_module.COMPACT_EVERY = 3  # fold the first three adds into manifest.json
        for i in range(3):
            bank.add(make_expert(names[i], i))
    finally:
        if saved is not None:
            bank_module.COMPACT_EVERY = saved
    for i in range(3, 5):
        bank.add(make_expert(names[i], i))
    bank.similar(names[0], k=len(names))
    return names


def _expert_view(expert: Expert) -> dict[str, Any]:
    """Every field of a loaded expert, for comparison."""
    return {
        "name": expert.name,
        "config": expert.config.to_dict(),
        "kind": expert.config.kind,
        "state": expert.state,
        "task": asdict(expert.task),
        "backbone": expert.backbone.to_dict(),
        "metrics": expert.metrics,
        "embedding": expert.embedding,
        "head": expert.head,
        "provenance": expert.provenance,
        "created": expert.created,
        "modules": expert.modules,
    }


def observe(location: Path, names: list[str]) -> dict[str, tuple[str, Any]]:
    """Everything a user sees of the bank: open, names, list, get and similar of every expert, verify."""
    out: dict[str, tuple[str, Any]] = {}
    root = str(location.resolve())

    def step(key: str, fn: Callable[[], Any]) -> None:
        try:
            out[key] = ("ok", fn())
        except Exception as err:
            out[key] = ("error", describe(err))

    try:
        bank = ExpertBank(location, create=False)
    except Exception as err:
        out["open"] = ("error", describe(err))
        return out
    out["open"] = ("ok", None)
    step("names", bank.names)
    step("list", lambda: [asdict(e) for e in bank.list()])
    for name in names:
        step(f"get {name}", lambda name=name: _expert_view(bank.get(name)))
    for name in names:
        step(f"similar {name}", lambda name=name: bank.similar(name, k=len(names)))

    def verify() -> tuple[list[str], list[str]]:
        problems, warnings = bank.verify()
        return [p.replace(root, "<bank>") for p in problems], [w.replace(root, "<bank>") for w in warnings]

    step("verify", verify)
    return out


def same(a: Any, b: Any) -> bool:
    """Deep equality with tensors compared exactly (dtype, shape, values)."""
    if isinstance(a, Tensor) or isinstance(b, Tensor):
        return isinstance(a, Tensor) and isinstance(b, Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b, strict=True))
    return bool(a == b)


def classify(reference: dict[str, tuple[str, Any]], seen: dict[str, tuple[str, Any]]) -> tuple[str, str]:
    """``(outcome, detail)`` of a flipped bank's observations against the reference's."""
    errors = [(k, v[1]) for k, v in seen.items() if v[0] == "error"]
    raw = [(k, e) for k, e in errors if not e["pituning"]]
    if raw:
        return "raw exception", f"{raw[0][0]}: {_short(raw[0][1])}"
    detected = [(k, e) for k, e in errors if k == "open" or not e["message"].startswith("No expert")]
    if detected:
        return "detected", f"{detected[0][0]}: {_short(detected[0][1])}"
    verify = seen.get("verify")
    if verify and verify[0] == "ok" and verify[1][0]:
        return "detected", f"verify: {verify[1][0][0][:160]}"
    changed = [k for k in reference if k not in seen or not same(reference[k], seen[k])]
    changed += [k for k in seen if k not in reference]
    if not changed:
        return "harmless", ""
    key = changed[0]
    if key not in seen:
        what = f"{key} missing"
    elif seen[key][0] == "ok" and reference[key][0] == "ok":
        what = f"{key}: {first_difference(reference[key][1], seen[key][1])}"
    else:
        what = f"{key}: {_short(seen[key][1]) if seen[key][0] == 'error' else 'now succeeds'}"
    return "silent", f"{what} ({len(changed)} observation(s) differ)"


def first_difference(a: Any, b: Any, where: str = "") -> str:
    """Where two observations first differ, e.g. ``[1].task: 'task-x1' -> 'task-y1'``."""
    if isinstance(a, dict) and isinstance(b, dict):
        for k in sorted(set(a) | set(b), key=str):
            if k not in a or k not in b:
                return f"{where}.{k} {'added' if k in b else 'gone'}"
            if not same(a[k], b[k]):
                return first_difference(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        if len(a) != len(b):
            return f"{where} has {len(b)} items instead of {len(a)}"
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            if not same(x, y):
                return first_difference(x, y, f"{where}[{i}]")
    if isinstance(a, Tensor) and isinstance(b, Tensor):
        return f"{where or 'tensor'} values differ"
    return f"{where or 'value'}: {str(a)[:60]!r} -> {str(b)[:60]!r}"


def _files_of_kind(root: Path, kind: str) -> list[Path]:
    """The files of a bank that are of one of :data:`FLIP_KINDS`."""
    if "/" in kind:
        folder, pattern = kind.split("/")
        return sorted((root / folder).glob(pattern))
    if kind in (bank_module.MANIFEST, bank_module.JOURNAL):
        return [root / kind]
    return sorted((root / "experts").glob(f"*/{kind}"))


def _folder_digests(root: Path) -> dict[str, dict[str, str]]:
    """Expert folder name -> file name -> sha256."""
    experts = root / "experts"
    if not experts.is_dir():
        return {}
    return {d.name: {f.name: _sha(f) for f in sorted(d.iterdir()) if f.is_file()} for d in sorted(experts.iterdir())}


def bit_flips(work: Path, settings: Settings, rng: random.Random) -> dict[str, Any]:
    """c. Flip one random bit of one bank file in a copy of the bank, many times; classify what the user sees."""
    reference_dir = work / "flip-reference"
    names = build_flip_bank(reference_dir)
    ref_folders = _folder_digests(reference_dir)

    def fresh_copy(dest: Path) -> Path:
        shutil.rmtree(dest, ignore_errors=True)
        shutil.copytree(reference_dir, dest, symlinks=True)
        return dest

    reference = observe(fresh_copy(work / "flip-copy"), names)
    deterministic = same(reference, observe(fresh_copy(work / "flip-copy"), names))
    reference_errors = [k for k, v in reference.items() if v[0] == "error"]
    flips: list[dict[str, Any]] = []
    per_kind: dict[str, Counter[str]] = {}
    for kind in FLIP_KINDS:
        counts = per_kind.setdefault(kind, Counter())
        candidates = [p.relative_to(reference_dir) for p in _files_of_kind(reference_dir, kind) if p.stat().st_size]
        if not candidates:
            counts["no such file"] += 1
            continue
        for _ in range(settings.flips_per_kind):
            rel = rng.choice(candidates)
            copy = fresh_copy(work / "flip-copy")
            data = bytearray((copy / rel).read_bytes())
            offset, bit = rng.randrange(len(data)), rng.randrange(8)
            data[offset] ^= 1 << bit
            (copy / rel).write_bytes(bytes(data))
            outcome, detail = classify(reference, observe(copy, names))
            # gc after the flip must not delete an expert folder whose files are intact
            gc_error = None
            try:
                ExpertBank(copy, create=False).gc()
            except Exception as err:
                gc_error = describe(err)
                if not gc_error["pituning"] and outcome != "raw exception":
                    outcome, detail = "raw exception", f"gc: {_short(gc_error)}"
            now = _folder_digests(copy)
            flipped_folder = rel.parts[1] if rel.parts[0] == "experts" else None
            deleted_intact = [f for f in ref_folders if f != flipped_folder and f not in now]
            counts[outcome] += 1
            flips.append(
                {
                    "kind": kind,
                    "file": str(rel),
                    "offset": offset,
                    "bit": bit,
                    "size": len(data),
                    "outcome": outcome,
                    "detail": detail,
                    "gc_error": gc_error,
                    "gc_deleted_intact": deleted_intact,
                }
            )
    shutil.rmtree(work / "flip-copy", ignore_errors=True)
    total = len(flips)
    outcomes = Counter(f["outcome"] for f in flips)
    return {
        "flips": total,
        "detected": outcomes["detected"],
        "harmless": outcomes["harmless"],
        "silent": outcomes["silent"],
        "raw_exceptions": outcomes["raw exception"],
        "detected_or_harmless_pct": round(100.0 * (outcomes["detected"] + outcomes["harmless"]) / max(total, 1), 1),
        "gc_deleted_intact_folder": sum(bool(f["gc_deleted_intact"]) for f in flips),
        "per_kind": {k: dict(v) for k, v in per_kind.items()},
        "reference_deterministic": deterministic,
        "reference_errors": reference_errors,
        "failures": [f for f in flips if f["outcome"] in ("silent", "raw exception") or f["gc_deleted_intact"]],
        "all_flips": flips,
    }


# ------------------------------------------------------------------------------------------ d. hostile
HOSTILE_NAMES = {
    "../x": "../x",
    "a/b": "a/b",
    "empty": "",
    "dot": ".",
    "dotdot": "..",
    "129 chars": "a" * 129,
    "10,000 chars": "b" * 10_000,
    "NUL inside": "a\x00b",
    "newline at end": "a\n",
    "backslash": "a\\b",
    "leading dash": "-rf",
    "absolute": "/etc/passwd",
    "fullwidth letters": "ｅｖｉｌ",
    "bidi override": "\u202egnp.exe",
    "zero-width space": "a\u200bb",
    "combining accent": "e\u0301",
    "dotted capital I": "İ",
    "Arabic-Indic digit": "٣",
}


def _snapshot(root: Path, skip: set[Path]) -> dict[str, str]:
    """Every file, directory and symlink under ``root`` (not under ``skip``), with file sha256 and link targets."""
    out: dict[str, str] = {}
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        here = Path(dirpath)
        for d in list(dirnames):
            path = here / d
            if path in skip:
                dirnames.remove(d)
            elif path.is_symlink():
                out[str(path.relative_to(root))] = "link:" + os.readlink(path)
            else:
                out[str(path.relative_to(root))] = "dir"
        for f in filenames:
            path = here / f
            if path in skip:
                continue
            out[str(path.relative_to(root))] = "link:" + os.readlink(path) if path.is_symlink() else _sha(path)
    return out


class _Sandbox:
    """A workspace with a sentinel ``victim`` directory next to the bank, restored before each trial."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.bank = root / "bank"
        self.victim = root / "victim"
        self.cwd = root / "cwd"
        root.mkdir(parents=True, exist_ok=True)

    def reset(self) -> None:
        """Empty the workspace, then recreate the pristine sentinel and the working directory."""
        for path in (self.bank, self.victim, self.cwd):
            if path.is_symlink() or path.is_file():
                path.unlink()
            elif path.exists():
                shutil.rmtree(path)
        for extra in self.root.iterdir():  # anything an earlier trial left next to the bank
            if extra.is_symlink() or extra.is_file():
                extra.unlink()
            elif extra.is_dir():
                shutil.rmtree(extra)
        (self.victim / "sub").mkdir(parents=True)
        (self.victim / "a.txt").write_bytes(b"sentinel: must never change\n")
        (self.victim / "sub" / "b.bin").write_bytes(bytes(range(256)))
        self.cwd.mkdir()


def _hostile_record(sandbox: _Sandbox, mode: str) -> None:
    """Add ``good`` and ``evil`` normally, then append a record of ``evil`` whose paths leave the bank."""
    bank = ExpertBank(sandbox.bank)
    bank.add(make_expert("good", 2))
    entry = bank.add(make_expert("evil", 3))
    record = json.loads(json.dumps(asdict(entry)))
    victim_rel = "experts/../../victim"
    if mode == "folder ../..":
        record["folder"] = victim_rel
    elif mode == "folder absolute":
        record["folder"] = str(sandbox.victim)
    elif mode == "folder without slash":
        record["folder"] = "victim"
    elif mode == "files ../..":
        record["folder"] = victim_rel
        record["files"] = {
            "expert": {"path": f"{victim_rel}/a.txt", "sha256": _sha(sandbox.victim / "a.txt")},
            "weights": {"path": f"{victim_rel}/sub/b.bin", "sha256": _sha(sandbox.victim / "sub" / "b.bin")},
        }
    elif mode == "files absolute":
        record["files"] = {
            "expert": {"path": str(sandbox.victim / "a.txt"), "sha256": _sha(sandbox.victim / "a.txt")},
            "weights": {
                "path": str(sandbox.victim / "sub" / "b.bin"),
                "sha256": _sha(sandbox.victim / "sub" / "b.bin"),
            },
        }
    elif mode == "folder is a symlink out":
        link = sandbox.bank / "experts" / "evil--link00000000"
        link.symlink_to(sandbox.victim, target_is_directory=True)
        record["folder"] = "experts/evil--link00000000"
    elif mode == "in manifest.json: folder ../..":
        record["folder"] = victim_rel
        manifest = json.loads((sandbox.bank / bank_module.MANIFEST).read_text())
        manifest["entries"]["evil"] = record
        (sandbox.bank / bank_module.MANIFEST).write_text(json.dumps(manifest))
        return
    else:
        raise AssertionError(mode)
    line = json.dumps({"op": "add", "entry": record}, sort_keys=True) + "\n"
    with open(sandbox.bank / bank_module.JOURNAL, "a") as handle:
        handle.write(line)


def _symlink_setup(sandbox: _Sandbox, mode: str) -> None:
    """Banks holding a symlink that leaves the bank."""
    bank = ExpertBank(sandbox.bank)
    if mode == "unreferenced symlink in experts/":
        bank.add(make_expert("good", 2))
        (sandbox.bank / "experts" / "ghost--000000000000").symlink_to(sandbox.victim, target_is_directory=True)
    elif mode == "experts/ is a symlink out":
        (sandbox.bank / "experts").symlink_to(sandbox.victim, target_is_directory=True)
    elif mode == "cache/ is a symlink out":
        bank.add(make_expert("good", 2))
        bank.add(make_expert("evil", 3))
        shutil.rmtree(sandbox.bank / "cache", ignore_errors=True)
        (sandbox.bank / "cache").symlink_to(sandbox.victim, target_is_directory=True)
    elif mode == "expert file is a symlink out":
        entry = bank.add(make_expert("evil", 3))
        path = sandbox.bank / entry.files["weights"]["path"]
        path.unlink()
        path.symlink_to(sandbox.victim / "sub" / "b.bin")
        bank.add(make_expert("good", 2))
    else:
        raise AssertionError(mode)


def _bank_ops(sandbox: _Sandbox) -> dict[str, Callable[[], Any]]:
    """The operations tried on a bank holding hostile records or symlinks (each from a fresh handle)."""
    loc = sandbox.bank

    def add_overwrite() -> Any:
        return ExpertBank(loc, create=False).add(make_expert("evil", 5), overwrite=True)

    return {
        "list": lambda: ExpertBank(loc, create=False).list(),
        "get": lambda: ExpertBank(loc, create=False).get("evil"),
        "similar": lambda: ExpertBank(loc, create=False).similar("good", k=3),
        "verify": lambda: ExpertBank(loc, create=False).verify(),
        "gc": lambda: ExpertBank(loc, create=False).gc(),
        "remove": lambda: ExpertBank(loc, create=False).remove("evil"),
        "add overwrite": add_overwrite,
    }


@contextlib.contextmanager
def _chdir(path: Path) -> Iterator[None]:
    """Run a block in another working directory (a bank location ``""`` is the working directory)."""
    old = Path.cwd()
    os.chdir(path)
    try:
        yield
    finally:
        os.chdir(old)


def hostile_paths(work: Path) -> dict[str, Any]:
    """d. Hostile names, records, symlinks and locations; nothing outside the bank may change."""
    sandbox = _Sandbox(work / "hostile")
    trials: list[dict[str, Any]] = []

    def trial(group: str, case: str, op: str, setup: Callable[[], None] | None, action: Callable[[], Any]) -> None:
        """Reset the workspace, set the case up, run ``action`` and record its outcome and what changed outside."""
        sandbox.reset()
        if setup is not None:
            setup()
        skip = {sandbox.bank} if sandbox.bank.is_dir() and not sandbox.bank.is_symlink() else set()
        before = _snapshot(sandbox.root, skip)
        error = None
        with _chdir(sandbox.cwd):
            try:
                action()
                outcome = "accepted"
            except Exception as err:
                error = describe(err)
                outcome = "refused" if error["pituning"] else "raw exception"
        if sandbox.bank.is_dir() and not sandbox.bank.is_symlink():
            skip = {sandbox.bank}
        after = _snapshot(sandbox.root, skip)
        touched = sorted(k for k in set(before) | set(after) if before.get(k) != after.get(k))
        trials.append(
            {"group": group, "case": case, "op": op, "outcome": outcome, "error": error, "touched_outside": touched}
        )

    def with_good() -> None:
        ExpertBank(sandbox.bank).add(make_expert("good", 2))

    for label, name in HOSTILE_NAMES.items():
        ops: dict[str, Callable[[], Any]] = {
            "add": lambda name=name: ExpertBank(sandbox.bank).add(make_expert(name, 1)),
            "average into": lambda name=name: ExpertBank(sandbox.bank).average(["good"], name=name),
            "get": lambda name=name: ExpertBank(sandbox.bank).get(name),
            "remove": lambda name=name: ExpertBank(sandbox.bank).remove(name),
            "similar": lambda name=name: ExpertBank(sandbox.bank).similar(name),
        }
        for op, action in ops.items():
            trial("names", label, op, with_good, action)
    record_modes = [
        "folder ../..",
        "folder absolute",
        "folder without slash",
        "files ../..",
        "files absolute",
        "folder is a symlink out",
        "in manifest.json: folder ../..",
    ]
    for mode in record_modes:
        for op, action in _bank_ops(sandbox).items():
            trial("records", mode, op, lambda mode=mode: _hostile_record(sandbox, mode), action)
    symlink_modes = [
        "unreferenced symlink in experts/",
        "experts/ is a symlink out",
        "cache/ is a symlink out",
        "expert file is a symlink out",
    ]
    for mode in symlink_modes:
        for op, action in _bank_ops(sandbox).items():
            trial("symlinks", mode, op, lambda mode=mode: _symlink_setup(sandbox, mode), action)

    afile = sandbox.root / "afile"
    locations: dict[str, Callable[[], str]] = {
        "a regular file": lambda: str(afile),
        "a path under a file": lambda: str(afile / "bank"),
        "empty string": lambda: "",
        "unknown protocol": lambda: "unknownproto://x",
        "NUL in the path": lambda: str(sandbox.root / "ba\x00nk"),
        "unknown user's home": lambda: "~no_such_user_pituning_zz/bank",
        "file:// under a file": lambda: f"file://{afile}/bank",
    }

    def make_afile() -> None:
        afile.write_bytes(b"not a bank\n")

    for label, where in locations.items():

        def create_and_add(where: Callable[[], str] = where) -> None:
            bank = ExpertBank(where())
            bank.add(make_expert("good", 2))
            bank.names()

        def open_existing(where: Callable[[], str] = where) -> None:
            ExpertBank(where(), create=False).names()

        trial("locations", label, "open + add", make_afile, create_and_add)
        trial("locations", label, "open create=False", make_afile, open_existing)
    sandbox.reset()
    outcomes = Counter(t["outcome"] for t in trials)
    per_group: dict[str, Counter[str]] = {}
    for t in trials:
        per_group.setdefault(t["group"], Counter())[t["outcome"]] += 1
        if t["touched_outside"]:
            per_group[t["group"]]["touched outside"] += 1
    return {
        "tried": len(trials),
        "refused": outcomes["refused"],
        "accepted": outcomes["accepted"],
        "raw_exceptions": outcomes["raw exception"],
        "touched_outside": sum(bool(t["touched_outside"]) for t in trials),
        "per_group": {k: dict(v) for k, v in per_group.items()},
        "failures": [t for t in trials if t["outcome"] == "raw exception" or t["touched_outside"]],
        "accepted_cases": [f"{t['group']} / {t['case']} / {t['op']}" for t in trials if t["outcome"] == "accepted"],
        "all_trials": trials,
    }


# ------------------------------------------------------------------------------------------ e. PEFT
def _llama() -> Any:
    """A tiny Llama config (2 layers, width 32, 2 key/value heads); no download."""
    import transformers

    return transformers.LlamaConfig(
        vocab_size=99,
        hidden_size=32,
        intermediate_size=37,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )


@contextlib.contextmanager
def _no_unpickling(attempts: list[str]) -> Iterator[None]:
    """Make ``pickle.load(s)``, ``pickle.Unpickler`` and ``torch.load`` raise (and record the attempt)."""
    saved = (pickle.load, pickle.loads, pickle.Unpickler, torch.load)

    def trap(what: str) -> Callable[..., Any]:
        def refuse(*args: Any, **kwargs: Any) -> Any:
            attempts.append(what)
            raise RuntimeError(f"reliability benchmark: {what} was called (unpickling is forbidden)")

        return refuse

    pickle.load, pickle.loads, pickle.Unpickler = trap("pickle.load"), trap("pickle.loads"), trap("pickle.Unpickler")  # type: ignore[assignment]
    torch.load = trap("torch.load")  # type: ignore[assignment]
    try:
        yield
    finally:
        pickle.load, pickle.loads, pickle.Unpickler, torch.load = saved  # type: ignore[misc]


def _edit_config(**changes: Any) -> Callable[[Path], None]:
    """A mutation setting (or, with ``_DELETE``, removing) keys of ``adapter_config.json``."""

    def edit(path: Path) -> None:
        cfg = json.loads((path / "adapter_config.json").read_text())
        for key, value in changes.items():
            if value is _DELETE:
                cfg.pop(key, None)
            else:
                cfg[key] = value
        (path / "adapter_config.json").write_text(json.dumps(cfg))

    return edit


_DELETE = object()


def _write_config_text(text: str) -> Callable[[Path], None]:
    """A mutation replacing ``adapter_config.json`` by ``text``."""

    def edit(path: Path) -> None:
        (path / "adapter_config.json").write_text(text)

    return edit


def _write_weights(data: bytes | None, name: str = "adapter_model.safetensors") -> Callable[[Path], None]:
    """A mutation replacing the weights file by ``data`` written to ``name`` (or by nothing)."""

    def edit(path: Path) -> None:
        (path / "adapter_model.safetensors").unlink()
        if data is not None:
            (path / name).write_bytes(data)

    return edit


def _edit_tensors(fn: Callable[[dict[str, Tensor]], dict[str, Tensor]]) -> Callable[[Path], None]:
    """A mutation rewriting the (valid) weights file through ``fn``."""

    def edit(path: Path) -> None:
        from safetensors.torch import load_file, save_file

        tensors = load_file(str(path / "adapter_model.safetensors"))
        save_file({k: v.contiguous() for k, v in fn(dict(tensors)).items()}, str(path / "adapter_model.safetensors"))

    return edit


def _poison(value: float, which: str) -> Callable[[dict[str, Tensor]], dict[str, Tensor]]:
    """Set the first element of the first tensor whose key contains ``which`` to ``value``."""

    def fn(tensors: dict[str, Tensor]) -> dict[str, Tensor]:
        key = sorted(k for k in tensors if which in k)[0]
        tensors[key] = tensors[key].clone()
        tensors[key].view(-1)[0] = value
        return tensors

    return fn


def _drop(which: str) -> Callable[[dict[str, Tensor]], dict[str, Tensor]]:
    """Delete the first tensor whose key contains ``which``."""

    def fn(tensors: dict[str, Tensor]) -> dict[str, Tensor]:
        del tensors[sorted(k for k in tensors if which in k)[0]]
        return tensors

    return fn


def _rename_prompt(tensors: dict[str, Tensor]) -> dict[str, Tensor]:
    """A prefix adapter whose only tensor is not ``prompt_embeddings``."""
    return {"prefix_task_embeddings": tensors["prompt_embeddings"]}


def _narrow_prompt(tensors: dict[str, Tensor]) -> dict[str, Tensor]:
    """``prompt_embeddings`` 5 columns narrower than ``2 * num_layers * token_dim``."""
    return {"prompt_embeddings": tensors["prompt_embeddings"][:, :-5]}


def _extra_tensor(tensors: dict[str, Tensor]) -> dict[str, Tensor]:
    """A trained (random) ``lm_head``, as PEFT saves a ``modules_to_save`` module."""
    weight = torch.randn(99, 32, generator=torch.Generator().manual_seed(5))
    return {**tensors, "base_model.model.lm_head.weight": weight}


def _then(*edits: Callable[[Path], None]) -> Callable[[Path], None]:
    """Several mutations in order."""

    def edit(path: Path) -> None:
        for one in edits:
            one(path)

    return edit


def adapter_cases() -> list[tuple[str, str, Callable[[Path], None]]]:
    """``(label, base adapter 'lora' or 'prefix', mutation of a copy of it)``: each must be refused."""
    pickled = pickle.dumps({"weights": [1.0, 2.0], "note": "harmless dict, never loaded"})
    huge = struct.pack("<Q", 2**60) + b"{}"
    return [
        ("config: malformed JSON", "lora", _write_config_text('{"peft_type": "LORA", "r": ')),
        ("config: a JSON list", "lora", _write_config_text("[1, 2, 3]")),
        ("config: JSON null", "lora", _write_config_text("null")),
        ("config: not UTF-8", "lora", lambda p: (p / "adapter_config.json").write_bytes(b"\xff\xfe{")),
        ("config: peft_type missing", "lora", _edit_config(peft_type=_DELETE)),
        ("config: peft_type IA3", "lora", _edit_config(peft_type="IA3")),
        ("config: r missing", "lora", _edit_config(r=_DELETE)),
        ("config: r a string", "lora", _edit_config(r="four")),
        ("config: r = 0", "lora", _edit_config(r=0)),
        ("config: r = -2", "lora", _edit_config(r=-2)),
        ("config: r = 8, tensors of rank 2", "lora", _edit_config(r=8)),
        ("config: lora_alpha a string", "lora", _edit_config(lora_alpha="big")),
        ("config: lora_alpha NaN", "lora", _write_config_text_patch("lora_alpha", "NaN")),
        ("weights: missing", "lora", _write_weights(None)),
        ("weights: empty file", "lora", _write_weights(b"")),
        ("weights: garbage bytes", "lora", _write_weights(bytes(random.Random(0).randrange(256) for _ in range(512)))),
        ("weights: header length 2**60", "lora", _write_weights(huge)),
        ("weights: header length past the end", "lora", _write_weights(struct.pack("<Q", 4096) + b"{}")),
        ("weights: a pickle renamed .safetensors", "lora", _write_weights(pickled)),
        ("weights: only a pickled adapter_model.bin", "lora", _write_weights(pickled, "adapter_model.bin")),
        ("weights: a lora_B missing", "lora", _edit_tensors(_drop("lora_B"))),
        ("weights: an extra trained lm_head tensor", "lora", _edit_tensors(_extra_tensor)),
        ("weights: NaN in lora_A", "lora", _edit_tensors(_poison(float("nan"), "lora_A"))),
        ("weights: inf in lora_B", "lora", _edit_tensors(_poison(float("inf"), "lora_B"))),
        ("PiSSA: init_lora_weights=pissa", "lora", _edit_config(init_lora_weights="pissa")),
        ("PiSSA: init_lora_weights=pissa_niter_4", "lora", _edit_config(init_lora_weights="pissa_niter_4")),
        ("OLoRA: init_lora_weights=olora", "lora", _edit_config(init_lora_weights="olora")),
        ("LoftQ: init_lora_weights=loftq", "lora", _edit_config(init_lora_weights="loftq")),
        ("aLoRA: alora_invocation_tokens", "lora", _edit_config(alora_invocation_tokens=[5, 6])),
        ("DoRA: use_dora=true", "lora", _edit_config(use_dora=True)),
        (
            "modules_to_save: a trained lm_head",
            "lora",
            _then(_edit_config(modules_to_save=["lm_head"]), _edit_tensors(_extra_tensor)),
        ),
        ("prefix: no prompt_embeddings", "prefix", _edit_tensors(_rename_prompt)),
        ("prefix: token_dim 15 (wrong width)", "prefix", _edit_config(token_dim=15)),
        ("prefix: prompt_embeddings 5 columns short", "prefix", _edit_tensors(_narrow_prompt)),
        ("prefix: num_virtual_tokens != rows", "prefix", _edit_config(num_virtual_tokens=7)),
        ("prefix: num_layers a string", "prefix", _edit_config(num_layers="two")),
        ("prefix: prefix_projection=true", "prefix", _edit_config(prefix_projection=True)),
        ("prefix: NaN in prompt_embeddings", "prefix", _edit_tensors(_poison(float("nan"), "prompt"))),
    ]


def _write_config_text_patch(key: str, literal: str) -> Callable[[Path], None]:
    """Set ``key`` to a raw JSON literal (``NaN``, which Python's json reads as float nan)."""

    def edit(path: Path) -> None:
        cfg = json.loads((path / "adapter_config.json").read_text())
        cfg[key] = "__PLACEHOLDER__"
        (path / "adapter_config.json").write_text(json.dumps(cfg).replace('"__PLACEHOLDER__"', literal))

    return edit


def hostile_adapters(work: Path) -> dict[str, Any]:
    """e. Import hostile PEFT adapter directories into a bank; each must be refused with a pituning error."""
    from pituning import ExpertModel, PrefixConfig, load_backbone

    root = work / "adapters"
    root.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    model = ExpertModel(load_backbone(_llama(), task="causal-lm")).eval()
    bank = ExpertBank(root / "bank")
    gen = torch.Generator().manual_seed(0)
    for name, config in (("v", LoraConfig(r=2)), ("p", PrefixConfig(num_tokens=3))):
        model.add_expert(name, config)
        with torch.no_grad():
            for param in model.expert_parameters(name).values():
                param.copy_(torch.randn(param.shape, generator=gen) * 0.1)
        bank.add(Expert.from_model(model, name, TaskInfo(name)))
        model.remove_expert(name)
    valid = {
        "lora": bank.export_peft("v", root / "valid-lora"),
        "prefix": bank.export_peft("p", root / "valid-prefix", num_attention_heads=2),
    }
    attempts: list[str] = []
    rows: list[dict[str, Any]] = []
    with _no_unpickling(attempts):
        for base in ("lora", "prefix"):  # controls: the untouched adapters import
            try:
                bank.import_peft(valid[base], model, f"control_{base}", TaskInfo("t"))
                rows.append({"case": f"control: valid {base}", "outcome": "accepted (control)", "error": None})
            except Exception as err:
                rows.append({"case": f"control: valid {base}", "outcome": "control refused", "error": describe(err)})
            for name in list(model.experts):
                model.remove_expert(name)
        for i, (label, base, mutate) in enumerate(adapter_cases()):
            case_dir = root / f"case{i:02d}"
            shutil.copytree(valid[base], case_dir)
            mutate(case_dir)
            before = bank.names()
            name = f"case{i:02d}"
            error = None
            try:
                bank.import_peft(case_dir, model, name, TaskInfo("t"))
                outcome = "silently accepted"
            except Exception as err:
                error = describe(err)
                outcome = "refused" if error["pituning"] else "raw exception"
            dirty = sorted(model.experts)
            for leftover in dirty:
                model.remove_expert(leftover)
            changed = outcome != "silently accepted" and bank.names() != before
            rows.append(
                {
                    "case": label,
                    "outcome": outcome,
                    "error": error,
                    "model_left_with_expert": dirty,
                    "bank_changed_on_refusal": changed,
                }
            )
    hostile = [r for r in rows if not r["case"].startswith("control")]
    outcomes = Counter(r["outcome"] for r in hostile)
    return {
        "tried": len(hostile),
        "refused": outcomes["refused"],
        "raw_exceptions": outcomes["raw exception"],
        "silently_accepted": outcomes["silently accepted"],
        "controls_ok": all(r["outcome"] == "accepted (control)" for r in rows if r["case"].startswith("control")),
        "unpickling_attempts": attempts,
        "model_left_dirty": sum(bool(r.get("model_left_with_expert")) for r in hostile),
        "bank_changed_on_refusal": sum(bool(r.get("bank_changed_on_refusal")) for r in hostile),
        "failures": [r for r in rows if r["outcome"] not in ("refused", "accepted (control)")],
        "all_cases": rows,
    }


# ------------------------------------------------------------------------------------------ run
def goals(items: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The headline numbers and whether each goal is met."""
    a, b, c, d, e = (items[k] for k in ("a_kill", "b_gc_race", "c_bit_flips", "d_hostile_paths", "e_hostile_adapters"))
    lost = a["lost"] + b["unreadable"]
    raw = a["raw_exceptions"] + b["raw_exceptions"] + c["raw_exceptions"] + d["raw_exceptions"] + e["raw_exceptions"]
    return {
        "acknowledged_adds": a["acknowledged_adds"] + a["torn_tail"]["acknowledged"] + b["acknowledged_adds"],
        "lost": lost,
        "flips": c["flips"],
        "flips_detected_or_harmless_pct": c["detected_or_harmless_pct"],
        "silent_flips": c["silent"],
        "gc_deleted_intact_folder": c["gc_deleted_intact_folder"],
        "raw_exceptions": raw,
        "touched_outside": d["touched_outside"],
        "adapters_silently_accepted": e["silently_accepted"],
        "met": {
            "0 lost": lost == 0,
            "100% of flips detected or harmless": c["silent"] == 0 and c["raw_exceptions"] == 0,
            "gc never deletes an intact folder": c["gc_deleted_intact_folder"] == 0,
            "0 raw exceptions": raw == 0,
            "0 files touched outside the bank": d["touched_outside"] == 0,
            "0 hostile adapters accepted": e["silently_accepted"] == 0 and not e["unpickling_attempts"],
        },
    }


def run_catalogue(work: Path, *, smoke: bool = False, seed: int = 0, only: str = "abcde") -> dict[str, Any]:
    """Run the catalogue (or the items in ``only``) with banks under ``work``; returns the per-item results."""
    settings = SETTINGS["smoke" if smoke else "full"]
    work.mkdir(parents=True, exist_ok=True)
    items: dict[str, dict[str, Any]] = {}
    timings: dict[str, float] = {}
    steps: list[tuple[str, str, Callable[[], dict[str, Any]]]] = [
        ("a", "a_kill", lambda: kill_trials(work / "a", settings, random.Random(seed * 1000 + 1))),
        ("b", "b_gc_race", lambda: gc_race(work / "b", settings, random.Random(seed * 1000 + 2))),
        ("c", "c_bit_flips", lambda: bit_flips(work / "c", settings, random.Random(seed * 1000 + 3))),
        ("d", "d_hostile_paths", lambda: hostile_paths(work / "d")),
        ("e", "e_hostile_adapters", lambda: hostile_adapters(work / "e")),
    ]
    for letter, key, fn in steps:
        if letter not in only:
            continue
        (work / letter).mkdir(parents=True, exist_ok=True)
        start = time.perf_counter()
        print(f"{key} ...", flush=True)
        items[key] = fn()
        timings[key] = round(time.perf_counter() - start, 1)
        print(f"{key}: {json.dumps(_headline(key, items[key]))} ({timings[key]} s)", flush=True)
    return {"settings": {"smoke": smoke, "seed": seed, **asdict(settings)}, "items": items, "seconds": timings}


def _headline(key: str, item: dict[str, Any]) -> dict[str, Any]:
    """The few numbers of an item printed while the catalogue runs."""
    keep = {
        "a_kill": ("trials", "acknowledged_adds", "lost", "raw_exceptions", "n_stray_temp_files"),
        "b_gc_race": ("acknowledged_adds", "gc_rounds", "unreadable", "raw_exceptions", "corruption_errors"),
        "c_bit_flips": ("flips", "detected", "harmless", "silent", "raw_exceptions", "gc_deleted_intact_folder"),
        "d_hostile_paths": ("tried", "refused", "accepted", "raw_exceptions", "touched_outside"),
        "e_hostile_adapters": ("tried", "refused", "raw_exceptions", "silently_accepted"),
    }[key]
    return {k: item[k] for k in keep}


def _cell(value: Any) -> str:
    """``value`` as a markdown table cell."""
    return str(value).replace("|", "\\|").replace("\n", " ")


def write_markdown(results: dict[str, Any], path: Path) -> None:
    """The human-readable report: headline, one table per item, and every failure found."""
    g = results["goals"]
    items = results["items"]
    a, b, c, d, e = (items[k] for k in ("a_kill", "b_gc_race", "c_bit_flips", "d_hostile_paths", "e_hostile_adapters"))
    load = results["load_average"]
    lines = [
        "# ExpertBank reliability",
        "",
        f"Command: `{results['command']}`  ",
        f"Date: {results['date']}  ",
        f"Machine: {results['machine']}  ",
        f"Load average (1, 5, 15 min): start {load['start']}, end {load['end']}  ",
        f"Duration: {results['duration_s']} s"
        + (" (smoke run: tiny counts, for CI)" if results["settings"]["smoke"] else ""),
        "",
        "Goal: 0 acknowledged adds lost, 100% of flips detected or harmless, 0 raw exceptions, 0 files touched outside "
        "the bank (and 0 hostile PEFT adapters accepted).",
        "",
        "| goal | measured | met |",
        "| --- | --- | --- |",
        f"| 0 acknowledged adds lost | {g['lost']} lost of {g['acknowledged_adds']} | {_yes(g['met']['0 lost'])} |",
        f"| 100% of flips detected or harmless | {g['flips_detected_or_harmless_pct']}% of {g['flips']} "
        f"({g['silent_flips']} silent) | {_yes(g['met']['100% of flips detected or harmless'])} |",
        f"| gc never deletes an intact expert folder after a flip | {g['gc_deleted_intact_folder']} flips where it did "
        f"| {_yes(g['met']['gc never deletes an intact folder'])} |",
        f"| 0 raw exceptions | {g['raw_exceptions']} | {_yes(g['met']['0 raw exceptions'])} |",
        f"| 0 files touched outside the bank | {g['touched_outside']} trials touched something "
        f"| {_yes(g['met']['0 files touched outside the bank'])} |",
        f"| 0 hostile PEFT adapters accepted | {g['adapters_silently_accepted']} | "
        f"{_yes(g['met']['0 hostile adapters accepted'])} |",
        "",
        "## a. kill -9 during adds",
        "",
        "A child process adds experts in a loop (every 5th op an overwrite; every 3rd trial `add_many` batches of 3; "
        "every 2nd trial a journal compaction every 7 records) and prints each acknowledged add; it is killed with "
        "SIGKILL at a random time after it is ready. Then every acknowledged add must be present and intact.",
        "",
        "| trials | acknowledged adds | experts | lost | torn unacknowledged entries | writer errors | raw exceptions "
        "| verify problems after | orphan folders (gc) | stray temp files |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
        f"| {a['trials']} | {a['acknowledged_adds']} | {a['unique_experts']} | {a['lost']} | "
        f"{a['torn_unacknowledged']} | {a['writer_errors']} | {a['raw_exceptions']} | "
        f"{a['after'].get('n_problems', _cell(a['after'].get('error')))} | {a['after'].get('orphans', '-')} | "
        f"{a['n_stray_temp_files']} |",
        "",
        f"Torn journal tail, then a normal add: {len(a['torn_tail']['lost'])} of {a['torn_tail']['acknowledged']} "
        f"acknowledged adds lost"
        + (f" ({_cell(a['torn_tail']['lost'][0]['why'])})" if a["torn_tail"]["lost"] else "")
        + ".",
        "",
        "## b. writer + gc race",
        "",
        f"One process adds {b['adds_attempted']} experts back to back while another runs `gc()` then `verify()`, "
        f"pausing {results['settings']['gc_interval_s'][0]}-{results['settings']['gc_interval_s'][1]} s between "
        "rounds. A pituning error that is not a corruption report counts as a handled refusal; any other exception "
        "is a crash.",
        "",
        "| acknowledged adds | writer time (s) | gc rounds | folders gc removed | unreadable afterwards "
        "| raw exceptions | corruption errors | handled refusals | verify problems during the race |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
        f"| {b['acknowledged_adds']} | {b['writer_seconds']} | {b['gc_rounds']} | {b['gc_removed_folders']} | "
        f"{b['unreadable']} | {b['raw_exceptions']} | {b['corruption_errors']} | {b['handled_refusals']} | "
        f"{b['verify_problems_during_race']} |",
        "",
        "Exceptions by side and type: " + (", ".join(f"{k} x{v}" for k, v in b["exceptions"].items()) or "none") + ".",
        "",
        "## c. one-bit flips",
        "",
        "A bank of 5 experts (3 folded into manifest.json, 2 in the journal; 3 with heads; all with embeddings; the "
        "similarity cache written). Per flip: a copy of the bank, one random bit of one file of the kind flipped, then "
        "open, list(), get() and similar() of every expert, verify(), and gc(). *Detected*: a pituning error other "
        "than a plain 'no expert' lookup miss, or a problem from verify(). *Harmless*: every result identical. "
        "*Silent*: something changed and nothing said so.",
        "",
        "| file | flips | detected | harmless | silent | raw exception |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for kind, counts in c["per_kind"].items():
        n = sum(v for k, v in counts.items() if k != "no such file")
        lines.append(
            f"| {kind} | {n} | {counts.get('detected', 0)} | {counts.get('harmless', 0)} | {counts.get('silent', 0)} | "
            f"{counts.get('raw exception', 0)} |"
        )
    lines += [
        f"| **all** | {c['flips']} | {c['detected']} | {c['harmless']} | {c['silent']} | {c['raw_exceptions']} |",
        "",
        f"gc() deleted an intact expert folder after {c['gc_deleted_intact_folder']} flip(s). Reference observation "
        f"deterministic: {c['reference_deterministic']}.",
        "",
        "## d. hostile names, records, symlinks and locations",
        "",
        "A sentinel directory `victim/` sits next to the bank; after every trial the workspace outside the bank must "
        "be unchanged. Hostile names (`../x`, `a/b`, empty, `.`, `..`, 129 and 10,000 characters, NUL, bidi and "
        "zero-width characters ...) are tried with add, average, get, remove and similar. Records (in the journal or "
        "manifest.json) whose folder or file paths are `experts/../../victim`, the sentinel's absolute path, a folder "
        "without a slash or a symlink to the sentinel, and banks whose `experts/`, `cache/` or an expert file is a "
        "symlink out, are tried with list, get, similar, verify, gc, remove and add(overwrite=True). Locations (a "
        'file, a path under a file, `""`, `unknownproto://x`, NUL, `~unknown_user`) with open + add and open.',
        "",
        "| group | tried | refused (pituning error) | accepted | raw exception | touched outside |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for group, counts in d["per_group"].items():
        n = sum(v for k, v in counts.items() if k != "touched outside")
        lines.append(
            f"| {group} | {n} | {counts.get('refused', 0)} | {counts.get('accepted', 0)} | "
            f"{counts.get('raw exception', 0)} | {counts.get('touched outside', 0)} |"
        )
    lines += [
        f"| **all** | {d['tried']} | {d['refused']} | {d['accepted']} | {d['raw_exceptions']} | "
        f"{d['touched_outside']} |",
        "",
        "## e. hostile PEFT adapter directories",
        "",
        "A valid LoRA and a valid prefix adapter of a tiny Llama (exported by the bank) are copied and broken, then "
        "imported with `ExpertBank.import_peft`. `pickle` and `torch.load` are trapped throughout.",
        "",
        "| tried | refused (pituning error) | raw exception | silently accepted | unpickling attempts | valid controls "
        "import |",
        "| --- | --- | --- | --- | --- | --- |",
        f"| {e['tried']} | {e['refused']} | {e['raw_exceptions']} | {e['silently_accepted']} | "
        f"{len(e['unpickling_attempts'])} | {_yes(e['controls_ok'])} |",
        "",
        "## Failures",
        "",
    ]
    failures = _failure_lines(items)
    lines += failures or ["None."]
    path.write_text("\n".join(lines) + "\n")


def _yes(flag: bool) -> str:
    """``yes`` or a bold ``no``."""
    return "yes" if flag else "**no**"


def _failure_lines(items: dict[str, dict[str, Any]]) -> list[str]:
    """One bullet per failing fault (capped per item), for the report."""
    out: list[str] = []
    a, b, c, d, e = (items[k] for k in ("a_kill", "b_gc_race", "c_bit_flips", "d_hostile_paths", "e_hostile_adapters"))
    for x in a["lost_examples"][:10]:
        out.append(f"- a. lost `{x['name']}`: {_cell(x['why'])}")
    for x in a["raw_examples"][:5]:
        out.append(f"- a. raw exception: {_cell(_short(x))}")
    if a["n_stray_temp_files"]:
        out.append(f"- a. {a['n_stray_temp_files']} temp file(s) left in the bank root (gc does not remove them)")
    for x in b["unreadable_examples"][:10]:
        out.append(f"- b. acknowledged `{x['name']}` unreadable after the race: {_cell(x['why'])}")
    for x in b["exception_examples"][:10]:
        if _classify_error(x) != "refusal":
            out.append(f"- b. {x['side']} raised {_cell(_short(x))}")
    for x in b["verify_problem_examples"][:3]:
        out.append(f"- b. verify() during the race: {_cell(x[:200])}")
    for x in c["failures"][:40]:
        extra = f"; gc deleted intact {x['gc_deleted_intact']}" if x["gc_deleted_intact"] else ""
        out.append(f"- c. {x['outcome']}: `{x['file']}` byte {x['offset']} bit {x['bit']}: {_cell(x['detail'])}{extra}")
    for x in d["failures"][:60]:
        what = _cell(_short(x["error"])) if x["error"] else "no error"
        touched = f"; touched outside: {_cell(x['touched_outside'][:5])}" if x["touched_outside"] else ""
        out.append(f"- d. {x['group']} / {_cell(repr(x['case']))} / {x['op']}: {x['outcome']} ({what}){touched}")
    for x in e["failures"]:
        what = _cell(_short(x["error"])) if x["error"] else "imported"
        out.append(f"- e. {x['case']}: {x['outcome']} ({what})")
    for x in e["unpickling_attempts"]:
        out.append(f"- e. unpickling attempted: {x}")
    return out


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Command line entry point; returns the results (also written to ``--out``)."""
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["_child"]:
        spec = json.loads(argv[1])
        (_child_writer if spec["role"] == "writer" else _child_gc)(spec)
        return {}
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="tiny counts (CI); the numbers mean little")
    parser.add_argument("--out", type=Path, default=RESULTS, help="where reliability.json and .md go")
    parser.add_argument("--work", type=Path, default=None, help="where the banks go (default: a temp dir)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--only", default="abcde", help="run only these items, e.g. 'ce' (the report needs all)")
    args = parser.parse_args(argv)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the bank's work is I/O and hashing; keep the cores for the child processes
    start = time.perf_counter()
    load_start = [round(x, 2) for x in os.getloadavg()]
    with contextlib.ExitStack() as stack:
        stack.callback(torch.set_num_threads, threads)  # main() also runs inside pytest
        work = args.work or Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="pituning-reliability-")))
        results = run_catalogue(work, smoke=args.smoke, seed=args.seed, only=args.only)
        text = json.dumps(results, default=str)
        for prefix in sorted({str(work), str(work.resolve())}, key=len, reverse=True):
            text = text.replace(json.dumps(prefix)[1:-1], "<work>")  # messages name temp paths: keep them short
        results = json.loads(text)
    command = "python benchmarks/reliability/run.py" + (" --smoke" if args.smoke else "")
    command += f" --seed {args.seed}" if args.seed else ""
    results = {
        "command": command,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": machine(),
        "load_average": {"start": load_start, "end": [round(x, 2) for x in os.getloadavg()]},
        "duration_s": round(time.perf_counter() - start, 1),
        **results,
    }
    if set(args.only) >= set("abcde"):
        results["goals"] = goals(results["items"])
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "reliability.json").write_text(json.dumps(results, indent=2, default=str))
        write_markdown(results, args.out / "reliability.md")
        print(json.dumps(results["goals"], indent=2))
        print(f"wrote {args.out / 'reliability.json'} and reliability.md")
    return results


if __name__ == "__main__":
    main()
