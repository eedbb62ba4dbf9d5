"""ExpertBank.sync_ across 2 CPU processes (gloo), run as a torchrun subprocess."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.ddp, pytest.mark.slow]


def test_sync_gives_the_single_process_average_on_every_rank(tmp_path: Path) -> None:
    script = Path(__file__).with_name("ddp_sync.py")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", str(script)]
    done = subprocess.run([*command, str(tmp_path)], capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    for rank in (0, 1):
        result = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert result["model_err"] <= 1e-6
        assert result["expert_err"] <= 1e-6
