"""``torchledger measure``: one real (or simulated) training step, measured beside predicted; faults in one line."""

from __future__ import annotations

import json

import pytest
import torch

from torchledger.cli import main
from torchledger.measuring import training


def run(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, dict[str, object], str]:
    code = main(["measure", *args, "--json"])
    captured = capsys.readouterr()
    return code, (json.loads(captured.out) if captured.out else {}), captured.err


def test_json_contract(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run(capsys, "--model", "gpt-tiny", "--batch-size", "4", "--seq-len", "128", "--device", "cpu",
                         "--precision", "bf16-mixed")
    assert (code, err) == (0, "")
    assert out["device"] == "cpu"
    measured, predicted = out["measured"], out["predicted"]
    assert isinstance(measured, dict) and isinstance(predicted, dict)
    assert set(measured["by_category"]) == set(predicted["by_category"]) == {
        "params", "grads", "optimizer", "activations", "temporaries"}
    assert sum(predicted["by_category"].values()) == predicted["peak"]
    assert measured["by_category"]["params"] == predicted["by_category"]["params"] == 557_568 * 4
    assert isinstance(out["error_pct"], float) and out["error_pct"] <= 2.0
    assert out["error_pct"] == pytest.approx(100 * abs(predicted["peak"] - measured["peak"]) / measured["peak"])


def test_reference_workloads_and_simulation(capsys: pytest.CaptureFixture[str]) -> None:
    code, real, _ = run(capsys, "--model", "cnn", "--batch-size", "8", "--optimizer", "momentum", "--device", "cpu")
    assert code == 0 and real["error_pct"] <= 2.0  # type: ignore[operator]
    code, fake, _ = run(capsys, "--model", "cnn", "--batch-size", "8", "--optimizer", "momentum", "--simulate")
    assert code == 0 and fake["device"] == "simulated"
    assert fake["measured"] == real["measured"]  # FakeTensorMode sees the same storages, allocating none


def test_table(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["measure", "--model", "llama-tiny", "--seq-len", "64", "--device", "cpu", "--grad-accum", "2",
                 "--checkpointing", "full"]) == 0
    out = capsys.readouterr().out
    assert "measured" in out and "predicted" in out and "% apart" in out


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--model", "mlp", "--checkpointing", "full"], "checkpointing='full': the mlp has no blocks"),
        (["--model", "gpt-tiny", "--clip-grad-norm", "-1"], "'-1' must be a finite number > 0"),
        (["--model", "gpt-tiny", "--precision", "16-mixed", "--simulate"], "cannot be simulated"),
        (["--model", "gpt-tiny", "--seq-len", "300"], "seq_len=300 exceeds max_seq_len=256"),
        (["--model", "gpt-tiny", "--precision", "16-mixed-master"], "invalid choice"),
    ],
)
def test_bad_usage(args: list[str], needle: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["measure", *args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and needle in err[0], err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message for a machine without a GPU")
def test_cuda_requested_without_gpu(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["measure", "--model", "gpt-tiny", "--device", "cuda"]) == 2
    assert "no CUDA GPU" in capsys.readouterr().err


def test_out_of_memory_is_a_result(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    def oom(case: object, device: str) -> None:
        raise torch.OutOfMemoryError("simulated: tried to allocate 80 GiB")

    monkeypatch.setattr(training, "measure", oom)  # the CLI looks it up on the module at each call
    assert main(["measure", "--model", "llama-7b", "--seq-len", "2048", "--device", "cpu"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1
    assert "out of memory on cpu: predicted peak" in err[0] and "short by" in err[0]


def test_inference_prefill(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run(capsys, "--model", "llama-tiny", "--batch-size", "4", "--seq-len", "128", "--inference",
                         "--precision", "bf16-true", "--device", "cpu")
    assert (code, err) == (0, "")
    predicted = out["predicted"]
    assert isinstance(predicted, dict)
    # KV cache: 2 (K, V) x 2 blocks x 2 KV heads x 32 x 128 tokens x 4 sequences x 2 bytes
    assert predicted["by_category"]["kv_cache"] == 2 * 2 * 2 * 32 * 128 * 4 * 2
    assert out["error_pct"] == 0.0


def test_inference_needs_a_true_recipe(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["measure", "--model", "gpt-tiny", "--inference", "--precision", "bf16-mixed"]) == 2
    assert "inference runs in the parameters' dtype" in capsys.readouterr().err
