"""The GPU evidence command: its time budget fits 8 minutes, and without a GPU it says so instead of running."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "gpu-evidence.sh"


def _limit(text: str, command: str) -> int:
    found = re.search(r'timeout -k 5 "\$\(limit (\d+)\)" ' + command, text)
    assert found is not None, command
    return int(found.group(1))


def test_time_limits_fit_eight_minutes() -> None:
    text = SCRIPT.read_text()
    default = int(re.search(r'limit "\$\{MEASURE_LIMIT:-(\d+)\}"', text).group(1))  # type: ignore[union-attr]
    measures = [int(n) if n else default
                for n in re.findall(r"^(?:MEASURE_LIMIT=(\d+) )?measure \S+ --model", text, flags=re.M)]
    verification = _limit(text, r"\$PY -m pytest benchmarks/verification")
    groups = [int(n) for n in re.findall(r"^group \S+ (\d+) ", text, flags=re.M)]
    assert len(measures) == 5 and len(groups) == 6
    total = sum(measures) + verification + sum(groups)
    assert f"The time limits add up to {total} s" in text
    # each part may also take the 5 s of `timeout -k 5` to be killed; starting Python and packing need the rest
    assert total + 5 * (len(measures) + 1 + len(groups)) <= 8 * 60 - 20, total


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is present: the command would run for minutes")
def test_without_a_gpu_it_refuses(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHON": sys.executable}
    before = sorted(ROOT.glob("results/gpu-evidence-*"))
    done = subprocess.run(["bash", str(SCRIPT)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600,
                          check=False)
    assert done.returncode == 2, done.stdout + done.stderr
    assert "no CUDA GPU here" in done.stderr
    assert sorted(ROOT.glob("results/gpu-evidence-*")) == before  # nothing packed
