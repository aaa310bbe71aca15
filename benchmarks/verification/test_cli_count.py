"""``torchledger count``: each counter's figure beside the formula's, on the meta device; errors in one line."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from torch import Tensor, nn

from torchledger.cli import main
from torchledger.counting import model_count


def run(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, dict[str, object], str]:
    code = main(["count", *args, "--json"])
    captured = capsys.readouterr()
    return code, json.loads(captured.out), captured.err


def test_llama_tiny_forward(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run(capsys, "--model", "llama-tiny")
    # per token at T=256: per block 2*(128*(128+64+64) + 128*128 + 3*128*344) + 4*256*128 = 493,568;
    # two blocks and the head 2*128*1000: 1,243,136 per token, x 256 tokens
    expected = (2 * 493_568 + 256_000) * 256
    assert expected == 318_242_816
    assert (code, err) == (0, "")
    assert out["formula"] == out["hooks"] == out["dispatch"] == expected
    assert out["profiler"] is None  # opt-in
    assert out["int_ops"] == 0
    assert out["by_module"]["lm_head"] == 2 * 256 * 128 * 1000  # type: ignore[index]


def test_gpt2_small_forward_backward_with_profiler(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "--model", "gpt2-small", "--seq-len", "1024", "--backward", "--profiler")
    assert code == 0
    # nanoGPT's figure; on the meta device attention takes the math path, which the profiler counts too
    assert out["formula"] == out["hooks"] == out["dispatch"] == out["profiler"] == 874_944_921_600


def test_table(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["count", "--model", "gpt-tiny", "--batch-size", "2", "--seq-len", "64", "--backward"]) == 0
    out = capsys.readouterr().out
    assert "forward + backward" in out
    assert out.count("= formula") == 2  # hooks and dispatch
    assert "not run (add --profiler)" in out


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--model", "gpt5"], "model='gpt5' is not a preset"),
        (["--model", "gpt-tiny", "--seq-len", "1.5"], "'1.5' is not an integer"),
        (["--model", "gpt-tiny", "--seq-len", "512"], "seq_len=512 exceeds max_seq_len=256"),
    ],
)
def test_bad_usage(args: list[str], needle: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["count", *args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and needle in err[0]


class _NeedsData(nn.Module):
    """A model whose forward reads a value: impossible on meta tensors."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(128, 1000, device="meta")

    def forward(self, idx: Tensor, targets: Tensor) -> tuple[Tensor, Tensor]:
        if idx.max().item() > 0:  # data-dependent control flow
            pass
        logits = self.proj(torch.zeros(*idx.shape, 128, device=idx.device))
        return logits, logits.mean()


def test_forward_failing_on_meta_keeps_the_formula(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(model_count, "build_transformer", lambda spec, device: _NeedsData())
    code, out, err = run(capsys, "--model", "gpt-tiny", "--seq-len", "16")
    assert code == 2
    assert out["formula"] == 16 * (2 * (2 * 12 * 128 * 128 + 4 * 16 * 128) + 2 * 128 * 1000)
    assert out["hooks"] is None and out["dispatch"] is None
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "fails on meta tensors" in lines[0] and "Traceback" not in err


def test_a_failing_profiler_pass_keeps_the_counts_of_the_first_pass(monkeypatch: pytest.MonkeyPatch) -> None:
    # the profiler runs a pass of its own after hooks and dispatcher: its failure must not discard their counts
    def fails(*args: object, **kwargs: object) -> None:
        raise RuntimeError("profiler unavailable")

    monkeypatch.setattr(model_count, "count_with_profiler", fails)
    from torchledger.formulas.specs import get_preset

    report = model_count.count_model(get_preset("gpt-tiny"), 1, 16, profiler=True)
    assert report.figure("dispatch") == report.figure("hooks") == report.formula
    assert report.counters["profiler"] is None
    assert len(report.errors) == 1 and "profiler unavailable" in report.errors[0]


GPT2_TINY = {"model_type": "gpt2", "n_layer": 2, "n_embd": 128, "n_head": 4, "vocab_size": 1000, "n_positions": 256}


def test_hf_config_without_transformers(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    cfg = tmp_path / "config.json"
    cfg.write_text(json.dumps(GPT2_TINY))
    monkeypatch.setitem(sys.modules, "transformers", None)  # makes `import transformers` fail
    code, out, err = run(capsys, "--hf-config", str(cfg), "--seq-len", "64")
    assert code == 2
    assert out["formula"] == 64 * (2 * (2 * 12 * 128 * 128 + 4 * 64 * 128) + 2 * 128 * 1000)
    assert out["dispatch"] is None
    assert "pip install 'torchledger[hf]'" in err


def test_hf_gpt2_counts_like_the_reference(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("transformers")
    cfg = tmp_path / "config.json"
    cfg.write_text(json.dumps(GPT2_TINY))
    code, out, _ = run(capsys, "--hf-config", str(cfg), "--seq-len", "64", "--backward")
    assert code == 0
    assert out["dispatch"] == out["formula"]
    # Hugging Face's attention is not the project's AttentionCore: hooks see the projections (transformers' Conv1D
    # included) but not QK^T and AV, 2 layers x 3 x (2 * 2 * 64*64*128) in forward + backward
    assert out["formula"] - out["hooks"] == 2 * 3 * 2 * 2 * 64 * 64 * 128  # type: ignore[operator]


def test_hf_unsupported_architecture(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("transformers")
    cfg = tmp_path / "config.json"
    cfg.write_text(json.dumps({"model_type": "bert", "num_hidden_layers": 2, "hidden_size": 128,
                               "num_attention_heads": 4, "intermediate_size": 512, "vocab_size": 1000,
                               "max_position_embeddings": 256, "is_decoder": True}))
    code, out, err = run(capsys, "--hf-config", str(cfg), "--seq-len", "32")
    assert code == 2
    assert out["formula"] is None
    assert isinstance(out["dispatch"], int) and out["dispatch"] > 0  # the counters that could run still report
    assert "model_type='bert'" in err and len(err.strip().splitlines()) == 1
