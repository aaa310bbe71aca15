"""``torchledger estimate``: the JSON contract, the table, and one-line errors with exit status 2."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from torchledger.cli import main

ROOT = Path(__file__).resolve().parents[2]


def run_json(capsys: pytest.CaptureFixture[str], *args: str) -> dict[str, object]:
    assert main(["estimate", *args, "--json"]) == 0
    return json.loads(capsys.readouterr().out)  # type: ignore[no-any-return]


def test_json_contract(capsys: pytest.CaptureFixture[str]) -> None:
    out = run_json(capsys, "--model", "gpt2-small", "--batch-size", "1", "--seq-len", "1024")
    assert out["params"] == 124_439_808
    flops = out["flops"]
    assert isinstance(flops, dict)
    assert set(flops) >= {"forward", "backward", "recompute", "train_step", "per_token_train"}
    assert flops["forward"] + flops["backward"] == 874_944_921_600  # nanoGPT's figure
    assert flops["train_step"] == 874_944_921_600
    assert flops["per_token_train"] == 874_944_921_600 / 1024
    memory = out["memory"]
    assert isinstance(memory, dict)
    assert set(memory) >= {"params", "grads", "master_params", "optimizer", "activations", "kv_cache", "peak_train"}
    n = 124_439_808
    assert (memory["params"], memory["grads"], memory["master_params"], memory["optimizer"]) == (4 * n, 4 * n, 0, 8 * n)
    # fp32 KV cache: 2 x 12 layers x 768 x 1024 tokens x 4 bytes
    assert memory["kv_cache"] == 2 * 12 * 768 * 1024 * 4
    for key in ("params", "grads", "master_params", "optimizer", "activations", "kv_cache", "peak_train"):
        assert isinstance(memory[key], int)
    assert memory["peak_train"] >= memory["params"] + memory["optimizer"] + memory["activations"]


def test_grad_accum_and_checkpointing(capsys: pytest.CaptureFixture[str]) -> None:
    base = run_json(capsys, "--model", "gpt2-small", "--seq-len", "1024")
    acc = run_json(capsys, "--model", "gpt2-small", "--seq-len", "1024", "--grad-accum", "4")
    assert acc["flops"]["train_step"] == 4 * base["flops"]["train_step"]  # type: ignore[index]
    assert acc["flops"]["per_token_train"] == base["flops"]["per_token_train"]  # type: ignore[index]
    ckpt = run_json(capsys, "--model", "gpt2-small", "--seq-len", "1024", "--checkpointing", "full")
    # one more forward of the 12 blocks (17,301,504 FLOPs per token each), not of the LM head, and without each
    # block's last matmul (2 * 3072 * 768 per token), which checkpointing's early stop never reruns
    assert ckpt["flops"]["recompute"] == 12 * 1024 * (17_301_504 - 2 * 3072 * 768)  # type: ignore[index]
    assert ckpt["memory"]["activations"] < base["memory"]["activations"]  # type: ignore[index]


def test_llama_kv_cache_in_the_recipes_compute_dtype(capsys: pytest.CaptureFixture[str]) -> None:
    out = run_json(capsys, "--model", "llama-7b", "--seq-len", "4096", "--precision", "bf16-true")
    assert out["memory"]["kv_cache"] == 2 * 2**30  # type: ignore[index]
    out = run_json(capsys, "--model", "llama-7b", "--seq-len", "4096", "--precision", "bf16-mixed",
                   "--optimizer", "sgd")
    assert out["memory"]["kv_cache"] == 2 * 2**30  # type: ignore[index]
    assert out["memory"]["optimizer"] == 0  # type: ignore[index]


def test_hf_config(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = tmp_path / "config.json"
    cfg.write_text(json.dumps({"model_type": "gpt2", "n_layer": 12, "n_embd": 768, "n_head": 12,
                               "vocab_size": 50257, "n_positions": 1024}))
    assert run_json(capsys, "--hf-config", str(cfg))["params"] == 124_439_808


def test_table(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["estimate", "--model", "llama-7b", "--seq-len", "2048", "--precision", "bf16-mixed"]) == 0
    out = capsys.readouterr().out
    assert "6,738,415,616" in out
    assert "GiB" in out and "TFLOP" in out
    assert "peak of the step" in out


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--model", "gpt5"], "model='gpt5'"),
        (["--model", "gpt2-small", "--batch-size", "0"], "'0' must be a positive integer"),
        (["--model", "gpt2-small", "--batch-size", "two"], "'two' is not an integer"),
        (["--model", "gpt2-small", "--precision", "fp8"], "--precision: invalid choice: 'fp8'"),
        (["--model", "gpt2-small", "--optimizer", "lion"], "invalid choice: 'lion'"),
        (["--model", "gpt2-small", "--seq-len", "4096"], "seq_len=4096 exceeds max_seq_len=1024"),
        (["--hf-config", "/nonexistent/config.json"], "no such file"),
        ([], "one of the arguments --model --hf-config is required"),
        (["--model", "gpt2-small", "--hf-config", "x.json"], "not allowed with argument"),
    ],
)
def test_bad_usage_is_one_line_and_exit_2(
    args: list[str], needle: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["estimate", *args]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1, captured.err
    assert needle in lines[0]


def test_console_entry_point_without_torch() -> None:
    # The analytic core and `estimate` never import torch: make it unimportable and run the CLI end to end.
    code = (
        "import sys; sys.modules['torch'] = None\n"
        "import torchledger, torchledger.formulas, torchledger.cli\n"
        "sys.exit(torchledger.cli.main(['estimate', '--model', 'llama-tiny', '--json']))\n"
    )
    env_path = str(ROOT / "src")
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env={"PYTHONPATH": env_path}, check=False
    )
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["params"] == 619_136  # 2*1000*128 + 2*(...) + 128, see test_specs


def test_python_dash_m_bad_usage_has_no_traceback() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "torchledger", "estimate", "--model", "gpt2-small", "--grad-accum", "-1"],
        capture_output=True, text=True, env={"PYTHONPATH": str(ROOT / "src")}, check=False,
    )
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert "'-1' must be a positive integer" in proc.stderr


def test_device_and_optimizer_impl(capsys: pytest.CaptureFixture[str]) -> None:
    # gpt-tiny, 4 x 128, bf16-mixed: on CUDA the logits' gradient at the start of the backward is bf16 (2 B) where
    # the CPU makes it in fp32 (4 B): 512 tokens x 1,000 x 2 B fewer, give or take the allocator's 512-byte rounding
    args = ["--model", "gpt-tiny", "--batch-size", "4", "--seq-len", "128", "--precision", "bf16-mixed"]
    cuda = run_json(capsys, *args)
    cpu = run_json(capsys, *args, "--device", "cpu")
    assert (cuda["device"], cpu["device"]) == ("cuda", "cpu")
    assert cpu["memory"]["peak_train"] - cuda["memory"]["peak_train"] == pytest.approx(  # type: ignore[index]
        512 * 1000 * 2, rel=0.05)
    # foreach AdamW's sqrt(exp_avg_sq) is one fp32 buffer of all 557,568 parameters, made after its step increment
    # (torch._foreach_add_ of the step counters by a 4-byte tensor 1.0 on the CPU) is freed: fused makes neither
    opt_args = ["--model", "gpt-tiny", "--batch-size", "1", "--seq-len", "8", "--device", "cpu"]
    foreach = run_json(capsys, *opt_args)
    fused = run_json(capsys, *opt_args, "--optimizer-impl", "fused")
    assert fused["optimizer_impl"] == "fused"
    assert foreach["memory"]["phases"]["optimizer"] - fused["memory"]["phases"]["optimizer"] == (  # type: ignore[index]
        557_568 * 4)


def test_every_other_checkpointing_recomputes_half_the_blocks(capsys: pytest.CaptureFixture[str]) -> None:
    base = ["--model", "gpt2-small", "--seq-len", "1024"]
    full = run_json(capsys, *base, "--checkpointing", "full")
    half = run_json(capsys, *base, "--checkpointing", "every-other")
    # GPT-2 small has 12 blocks: blocks 0, 2, ..., 10 are checkpointed
    assert half["flops"]["recompute"] * 2 == full["flops"]["recompute"]  # type: ignore[index]
    none = run_json(capsys, *base)
    assert none["memory"]["activations"] > half["memory"]["activations"] > full["memory"]["activations"]  # type: ignore[index]
