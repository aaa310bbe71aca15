"""``torchledger estimate --gpu``: whether a step fits one GPU of the hardware table, and the largest micro-batch.

The usable memory is derived here from its parts (the device's total, the CUDA context, two cuBLAS workspaces), and
the largest micro-batch is checked against the prediction evaluated batch by batch, not against the search.
"""

from __future__ import annotations

import json

import pytest

from torchledger.cli import main
from torchledger.formulas import hardware as H
from torchledger.formulas.estimate import estimate, largest_fitting
from torchledger.formulas.specs import get_preset, n_params

CONTEXT = 804_061_184  # "outside_allocator" measured on one H200 (torch 2.11)
HOPPER_WORKSPACES = 2 * 32 * 2**20  # two 32 MiB cuBLAS workspaces on compute capability 9.x
OLDER_WORKSPACES = 2 * (2 * 4096 + 8 * 16) * 1024  # ":4096:2:16:8" per workspace before Hopper
H100_USABLE = 80 * 2**30 - CONTEXT - HOPPER_WORKSPACES
H200_USABLE = 150_754_820_096 - CONTEXT - HOPPER_WORKSPACES


def peak(model: str, batch: int, seq_len: int, **options: str) -> int:
    """The predicted peak on one CUDA device, straight from the estimate (no fit involved)."""
    return estimate(get_preset(model), batch, seq_len, device="cuda", **options).peak_per_rank  # type: ignore[arg-type]


def run_json(capsys: pytest.CaptureFixture[str], *args: str) -> dict[str, object]:
    assert main(["estimate", *args, "--json"]) == 0
    out: dict[str, object] = json.loads(capsys.readouterr().out)
    return out


def test_the_usable_memory_is_the_total_less_the_context_and_two_workspaces() -> None:
    h100 = estimate(get_preset("gpt-tiny"), 1, 128, gpu="H100 SXM").fit
    h200 = estimate(get_preset("gpt-tiny"), 1, 128, gpu="h200-sxm").fit
    v100 = estimate(get_preset("gpt-tiny"), 1, 128, gpu="V100 PCIe").fit
    assert h100 is not None and h200 is not None and v100 is not None
    assert h100.usable == H100_USABLE == 85_028_175_872
    assert h200.capacity == 150_754_820_096  # NVML's total, not the datasheet's 141 x 10^9
    assert h200.usable == H200_USABLE
    assert v100.usable == 16 * 2**30 - CONTEXT - OLDER_WORKSPACES
    assert h100.headroom == H100_USABLE - peak("gpt-tiny", 1, 128)


@pytest.mark.parametrize(
    ("model", "seq_len", "gpu", "usable", "options"),
    [
        ("gpt2-small", 1024, "H200 SXM", H200_USABLE, {"precision": "bf16-mixed"}),
        ("gpt2-medium", 1024, "H100 SXM", H100_USABLE, {"precision": "32-true", "checkpointing": "full"}),
        ("llama-tiny", 256, "T4", 16 * 10**9 - CONTEXT - OLDER_WORKSPACES, {"optimizer": "sgd"}),
    ],
)
def test_the_max_batch_is_the_largest_that_fits(model: str, seq_len: int, gpu: str, usable: int,
                                                options: dict[str, str]) -> None:
    e = estimate(get_preset(model), 1, seq_len, gpu=gpu, **options)  # type: ignore[arg-type]
    assert e.fit is not None
    best = e.fit.max_batch
    assert best >= 1
    assert peak(model, best, seq_len, **options) <= usable
    assert peak(model, best + 1, seq_len, **options) > usable
    if best <= 200:  # every smaller batch fits too: the whole scan, not only the boundary
        assert all(peak(model, b, seq_len, **options) <= usable for b in range(1, best + 1))


def test_the_search_finds_the_boundary_of_any_growing_function() -> None:
    for limit in (0, 1, 2, 3, 7, 8, 9, 1000, 1023, 1024, 12345):
        assert largest_fitting(lambda n: 10 * n, 10 * limit) == limit
        assert largest_fitting(lambda n: 10 * n, 10 * limit + 9) == limit
    calls: list[int] = []
    largest_fitting(lambda n: calls.append(n) or n, 10**6)
    assert len(calls) <= 2 * 20 + 2  # doubling then bisecting: about 2 log2(10^6) evaluations


def test_a_model_that_does_not_fit_at_batch_1_says_so(capsys: pytest.CaptureFixture[str]) -> None:
    # LLaMA-7B in fp32 with AdamW: 16 bytes per parameter of states alone, far beyond a 24 GB card
    assert 16 * n_params(get_preset("llama-7b")) > 24 * 2**30
    d = run_json(capsys, "--model", "llama-7b", "--seq-len", "512", "--gpu", "L4")
    assert d["fits"] is False and d["max_batch_size"] == 0
    assert d["headroom_bytes"] == 24 * 2**30 - CONTEXT - OLDER_WORKSPACES - d["memory"]["peak_train"]  # type: ignore[index]
    assert main(["estimate", "--model", "llama-7b", "--seq-len", "512", "--gpu", "L4"]) == 0
    out = capsys.readouterr().out
    assert "none: batch 1 does not fit" in out
    assert "fits                           no: " in out


def test_llama2_7b_full_fine_tuning_at_4x2048_does_not_fit_an_80gb_h100(capsys: pytest.CaptureFixture[str]) -> None:
    """"Will Llama-2-7B full fine-tuning in bf16-mixed with AdamW at 4 x 2048 fit on an 80 GB H100?" No."""
    args = ["--model", "llama-7b", "--batch-size", "4", "--seq-len", "2048", "--precision", "bf16-mixed",
            "--optimizer", "adamw", "--gpu", "H100 SXM"]
    foreach = run_json(capsys, *args)
    fused = run_json(capsys, *args, "--optimizer-impl", "fused")
    n = n_params(get_preset("llama-7b"))
    for d in (foreach, fused):
        assert d["gpu"] == "H100 SXM" and d["capacity_bytes"] == 80 * 2**30
        assert d["fits"] is False and d["max_batch_size"] == 0
        # fp32 weights, fp32 grads and AdamW's two fp32 moments alone exceed what the H100 offers
        assert d["headroom_bytes"] <= H100_USABLE - 16 * n  # type: ignore[operator]
        assert d["headroom_bytes"] == H100_USABLE - d["memory"]["peak_train"]  # type: ignore[index]
    # foreach's temporaries: torch._foreach_sqrt(exp_avg_sq), 4 bytes per parameter (every llama-7b tensor is a
    # multiple of 512 B), made after the step increment (a 4-byte tensor) is freed
    temporaries = 4 * n
    assert foreach["memory"]["phases"]["optimizer"] - fused["memory"]["phases"]["optimizer"] == temporaries  # type: ignore[index]
    # at 4 x 2048 the peak is in the backward (the activations of 8,192 tokens), above either optimizer phase:
    # fused does not move the shortfall there
    assert foreach["memory"]["peak_phase"] == fused["memory"]["peak_phase"] == "backward"  # type: ignore[index]
    assert foreach["headroom_bytes"] == fused["headroom_bytes"]
    assert main(["estimate", *args]) == 0
    out = capsys.readouterr().out
    short = -foreach["headroom_bytes"]  # type: ignore[operator]
    assert f"fits                           no: {short / 2**30:.2f} GiB short of the 79.19 GiB usable" in out
    assert "largest micro-batch            none: batch 1 does not fit (at 2,048 tokens)" in out


def test_fused_moves_the_headroom_by_at_most_the_temporaries(capsys: pytest.CaptureFixture[str]) -> None:
    # GPT-2 XL at 1 x 128 in fp32: the peak is foreach's sqrt in the optimizer; without it (fused) the backward,
    # which holds the gradients beside all the states, is the peak: the headroom grows by the difference only
    args = ["--model", "gpt2-xl", "--seq-len", "128", "--gpu", "A10G"]
    foreach, fused = run_json(capsys, *args), run_json(capsys, *args, "--optimizer-impl", "fused")
    mem_foreach, mem_fused = foreach["memory"], fused["memory"]
    assert mem_foreach["peak_phase"] == "optimizer" and mem_fused["peak_phase"] == "backward"  # type: ignore[index]
    n = n_params(get_preset("gpt2-xl"))
    sqrt = mem_foreach["phases"]["optimizer"] - mem_fused["phases"]["optimizer"]  # type: ignore[index]
    assert 4 * n + 512 <= sqrt < 4 * n + 512 * 600  # 4 B per parameter, each of the ~580 tensors rounded to 512 B
    gained = fused["headroom_bytes"] - foreach["headroom_bytes"]  # type: ignore[operator]
    assert gained == mem_foreach["peak_train"] - mem_fused["phases"]["backward"]  # type: ignore[index]
    assert 0 < gained < sqrt


def test_json_keeps_its_keys_and_adds_the_fit_only_with_gpu(capsys: pytest.CaptureFixture[str]) -> None:
    plain = run_json(capsys, "--model", "gpt-tiny", "--seq-len", "128")
    sized = run_json(capsys, "--model", "gpt-tiny", "--seq-len", "128", "--gpu", "A100 40GB")
    # the fit, and the predicted step time on that GPU (test_steptime.py checks it)
    added = {"gpu", "capacity_bytes", "fits", "headroom_bytes", "max_batch_size", "reserved_bytes", "time"}
    assert set(sized) == set(plain) | added and not added & set(plain)
    assert {k: v for k, v in sized.items() if k not in added} == plain
    assert sized["reserved_bytes"] == {"cuda_context": CONTEXT, "cublas_workspaces": OLDER_WORKSPACES}
    assert sized["capacity_bytes"] == 40 * 2**30 and sized["fits"] is True


@pytest.mark.parametrize("name", [dev.name for dev in H.DEVICES])
def test_every_table_entry_is_a_gpu_choice(name: str, capsys: pytest.CaptureFixture[str]) -> None:
    d = run_json(capsys, "--model", "gpt-tiny", "--seq-len", "64", "--gpu", name)
    assert d["gpu"] == name
    assert d["capacity_bytes"] == H.get_device(name).capacity_bytes


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--gpu", "H300"], "argument --gpu: 'H300' is not in the hardware table; choices: H100 SXM, H100 PCIe"),
        (["--gpu", "H100 SXM", "--device", "cpu"], "--device cpu with --gpu 'H100 SXM'"),
    ],
)
def test_bad_gpu_usage_is_one_line(args: list[str], needle: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["estimate", "--model", "gpt-tiny", *args]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0], captured.err
    if args[1] == "H300":
        assert all(dev.name in lines[0] for dev in H.DEVICES)


def test_get_device_names_the_value_and_the_choices() -> None:
    with pytest.raises(ValueError, match=r"gpu='B200' is not in the hardware table; choices: H100 SXM"):
        H.get_device("B200")
    assert H.get_device("rtx_4090").name == "RTX 4090"
