"""The meters themselves: categories beside the CUDA allocator, the KV cache's own category, and memory snapshots
that give back the measured peak."""

from __future__ import annotations

import io
import os
import pickle
from contextlib import redirect_stdout
from pathlib import Path

import pytest
import torch

from torchledger.measuring.memory import ALLOCATOR_OVERHEAD, CATEGORIES, measure_cpu
from torchledger.measuring.snapshot import check_snapshot_path, snapshot_peak
from torchledger.measuring.training import MemoryCase, measure, measure_inference, simulate
from torchledger.workloads.train_step import TrainConfig

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)]
STEP = MemoryCase("gpt-tiny", 2, TrainConfig("bf16-mixed", "adamw", "foreach", "full", 2, 1.0), seq_len=64)
PREFILL = MemoryCase("llama-tiny", 2, TrainConfig("bf16-true"), seq_len=64)


@pytest.mark.parametrize("device", DEVICES)
def test_categories_add_up_to_the_peak(device: str) -> None:
    measured = measure(STEP, device)
    cats = measured.by_category
    assert set(CATEGORIES) <= set(cats)
    tracked = sum(cats[c] for c in CATEGORIES)
    if device == "cpu":
        assert tracked == measured.peak
        assert ALLOCATOR_OVERHEAD not in cats
    else:
        # the allocator's peak = the tracked tensors' peak + what the allocator holds beyond them
        assert tracked == measured.tracked_peak
        assert tracked + cats[ALLOCATOR_OVERHEAD] == measured.peak
    # AdamW's two moments and one step counter per parameter tensor, all in fp32 (gpt-tiny: 557,568 parameters in
    # 28 tensors, see test_memory_measured)
    assert cats["optimizer"] == 2 * 557_568 * 4 + 4 * 28 if device == "cpu" else cats["optimizer"] > 0
    assert cats["params"] == 557_568 * 4


@pytest.mark.parametrize("device", DEVICES)
def test_prefill_files_its_kv_cache_apart(device: str) -> None:
    measured = measure_inference(PREFILL, device)
    # llama-tiny: 2 blocks x (k, v) x batch 2 x 2 KV heads x 64 positions x head_dim 32 x 2 bytes (bf16)
    assert measured.by_category["kv_cache"] == 2 * 2 * 2 * 2 * 64 * 32 * 2
    assert measured.by_category["activations"] == 0  # no autograd in a prefill


def _viz_trace_lines(data: dict[str, object]) -> str:
    import torch.cuda._memory_viz as memory_viz

    out = io.StringIO()
    with redirect_stdout(out):
        text = memory_viz.trace(data)
    return (text or "") + out.getvalue()


@pytest.mark.parametrize("device", DEVICES)
def test_snapshot_gives_back_the_measured_peak(device: str, tmp_path: Path) -> None:
    path = tmp_path / "step.pickle"
    measured = measure(STEP, device, snapshot=path)
    data = pickle.loads(path.read_bytes())
    assert snapshot_peak(data) == measured.peak
    # PyTorch's own memory_viz tooling reads it: its text trace lists every event of the device
    events = len(data["device_traces"][data["torchledger"].get("device_index", 0)])
    assert f"{events} entries" in _viz_trace_lines(data)


def test_simulated_snapshot_equals_the_real_one(tmp_path: Path) -> None:
    real = measure(STEP, "cpu", snapshot=tmp_path / "real.pickle")
    fake = simulate(STEP, snapshot=tmp_path / "fake.pickle")
    a = pickle.loads((tmp_path / "real.pickle").read_bytes())
    b = pickle.loads((tmp_path / "fake.pickle").read_bytes())
    assert snapshot_peak(a) == snapshot_peak(b) == real.peak == fake.peak
    # the same storages made (frees may come in another order: fake tensors are collected at other times)
    assert sorted(e["size"] for e in a["device_traces"][0] if e["action"] == "alloc") == sorted(
        e["size"] for e in b["device_traces"][0] if e["action"] == "alloc")


def test_bad_snapshot_paths_name_the_path(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"--snapshot .*does not exist"):
        check_snapshot_path(tmp_path / "missing" / "s.pickle")
    with pytest.raises(ValueError, match=r"--snapshot .*not a regular file"):
        check_snapshot_path(tmp_path)
    if os.geteuid() != 0:  # root writes anywhere
        ro = tmp_path / "ro"
        ro.mkdir()
        ro.chmod(0o500)
        with pytest.raises(ValueError, match=r"--snapshot .*not writable"):
            check_snapshot_path(ro / "s.pickle")


def test_a_failing_step_leaves_no_snapshot(tmp_path: Path) -> None:
    path = tmp_path / "s.pickle"

    def fails() -> None:
        torch.ones(1000) + 1
        raise RuntimeError("the step failed")

    with pytest.raises(RuntimeError, match="the step failed"):
        measure_cpu(fails, snapshot=path)
    assert list(tmp_path.iterdir()) == []
