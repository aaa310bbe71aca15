"""``torchledger plan`` and formulas/planner.py: the LLaMA-2-70B preset as arithmetic, the planner's answer against
an exhaustive exact search, its JSON, and one-line errors with exit status 2."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from torchledger.cli import main
from torchledger.formulas.estimate import estimate
from torchledger.formulas.hardware import get_device
from torchledger.formulas.planner import _PLAIN, _fit_of, config_time, plan
from torchledger.formulas.specs import get_preset, n_params
from torchledger.formulas.steptime import datasheet_calibration


def test_llama_70b_preset_is_llama_2_70b() -> None:
    # meta-llama/Llama-2-70b-hf config.json: 80 layers, hidden 8192, 64 heads, 8 KV heads, intermediate 28672,
    # vocab 32000, untied head
    spec = get_preset("llama-70b")
    per_layer = (8192 * 8192 * 2  # q and o projections
                 + 8192 * (8 * 128) * 2  # k and v: 8 KV heads of 128
                 + 3 * 8192 * 28672  # gate, up, down
                 + 2 * 8192)  # two RMSNorm weights
    total = 80 * per_layer + 2 * 32000 * 8192 + 8192  # + embedding, LM head, final norm
    assert total == 68_976_648_192  # the parameter count the model card gives (70B)
    assert n_params(spec) == total
    assert (spec.n_kv_heads, spec.head_dim, spec.max_seq_len) == (8, 128, 4096)


def test_plan_agrees_with_the_exhaustive_exact_search() -> None:
    """gpt2-medium (24 blocks: the planner screens by extrapolation) on 4 T4s (16 GB: many configurations do not
    fit): the planner's top 5 are the 5 fastest of every configuration estimated exactly."""
    spec, dev, gpus, seqs = get_preset("gpt2-medium"), get_device("T4"), 4, 8
    found, tried = plan(spec, "T4", gpus, gpus * 1024 * seqs, 1024, precisions=("16-mixed", "32-true"))
    cal = datasheet_calibration(dev)
    usable = _fit_of(dev, 0, 1024, 1).usable
    exact = []
    for precision in ("16-mixed", "32-true"):
        for sharding in _PLAIN:
            for mode in ("none", "full", "every-other"):
                for batch in (1, 2, 4, 8):
                    kw = {"precision": precision, "checkpointing": mode, "grad_accum": seqs // batch,
                          "world_size": gpus, "sharding": sharding}
                    if estimate(spec, batch, 1024, **kw).peak_per_rank <= usable:  # type: ignore[arg-type]
                        exact.append(config_time(spec, batch, 1024, cal, **kw).tokens_per_s)  # type: ignore[arg-type]
    assert tried == 2 * len(_PLAIN) * 3 * 4
    assert 5 < len(exact) < tried  # some configurations do not fit
    exact.sort(reverse=True)
    assert [p.tokens_per_s for p in found] == pytest.approx(exact[:5])
    assert all(p.fit.fits and p.estimate.peak_per_rank <= usable for p in found)


def test_plan_rejects_a_batch_that_does_not_split() -> None:
    with pytest.raises(ValueError, match="global_batch_tokens=1000"):
        plan(get_preset("gpt2-small"), "H100 SXM", 2, 1000, 1024)
    with pytest.raises(ValueError, match="gpu="):
        plan(get_preset("gpt2-small"), "Z9000", 2, 2048, 1024)


def test_plan_json(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["plan", "--model", "gpt2-small", "--gpu", "h100-sxm", "--gpus", "8", "--global-batch-tokens",
                 str(8 * 1024 * 4), "--seq-len", "1024", "--top", "3", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["gpus"] == 8 and out["tried"] > 3
    configs = out["configurations"]
    assert len(configs) == 3
    speeds = [c["tokens_per_s"] for c in configs]
    assert speeds == sorted(speeds, reverse=True)
    for c in configs:
        assert c["micro_batch"] * c["grad_accum"] == 4  # sequences per rank per step
        assert c["peak_bytes"] <= c["usable_bytes"]
        assert set(c["time"]) >= {"step_s", "tokens_per_s", "mfu", "phases"}
        assert {p["bound"] for p in c["time"]["phases"].values()} <= {"compute", "memory", "launch",
                                                                      "communication"}
        # tokens/s over all ranks: 8 ranks x 4 sequences x 1024 tokens per step
        assert c["tokens_per_s"] == pytest.approx(8 * 4 * 1024 / c["time"]["step_s"])


def test_plan_table(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["plan", "--model", "gpt2-small", "--gpu", "h100-sxm", "--gpus", "1", "--global-batch-tokens",
                 "4096", "--seq-len", "1024", "--top", "2"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("gpt2-small on 1 x H100 SXM")
    assert "1. " in out and "2. " in out and "tokens/s" in out and "usable" in out


@pytest.mark.parametrize(("args", "message"), [
    (["--model", "llama-70b", "--gpu", "h100-sxm", "--gpus", "64", "--global-batch-tokens", "4194303"],
     "not a multiple of --seq-len x --gpus"),
    (["--model", "llama-99b", "--gpu", "h100-sxm", "--gpus", "64", "--global-batch-tokens", "4194304"],
     "--model"),
    (["--model", "llama-70b", "--gpu", "z9000", "--gpus", "64", "--global-batch-tokens", "4194304"], "--gpu"),
    (["--model", "llama-70b", "--gpu", "h100-sxm", "--gpus", "0", "--global-batch-tokens", "4194304"], "--gpus"),
    (["--model", "llama-70b", "--gpu", "h100-sxm", "--global-batch-tokens", "4194304"], "--gpus"),
    (["--model", "llama-70b", "--gpu", "h100-sxm", "--gpus", "8", "--global-batch-tokens", "65536",
      "--seq-len", "8192"], "--seq-len 8192"),
    (["--model", "gpt2-small", "--gpu", "h100-sxm", "--gpus", "1", "--global-batch-tokens", "1024",
      "--calibration", "/nonexistent"], "--calibration"),
    (["--model", "gpt-tiny", "--gpu", "h100-sxm", "--gpus", "1", "--global-batch-tokens", "256",
      "--calibration", str(Path(__file__).resolve().parents[2] / "results" / "cpu-amd-epyc")],
     "the runs of a CPU"),
])
def test_plan_bad_usage_exits_2_with_one_line(capsys: pytest.CaptureFixture[str], args: list[str],
                                              message: str) -> None:
    assert main(["plan", *args]) == 2
    err = capsys.readouterr().err
    assert message in err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err


def test_plan_and_calibration_need_no_torch() -> None:
    # the planner, the step-time model and the calibration reader are pure Python: torch unimportable
    root = Path(__file__).resolve().parents[2]
    code = (
        "import sys; sys.modules['torch'] = None\n"
        "import torchledger.cli\n"
        "assert torchledger.cli.main(['plan', '--model', 'gpt2-small', '--gpu', 'h100-sxm', '--gpus', '1',\n"
        "    '--global-batch-tokens', '2048', '--seq-len', '1024', '--top', '1', '--json']) == 0\n"
        f"sys.exit(torchledger.cli.main(['estimate', '--model', 'gpt2-small', '--calibration',\n"
        f"    {str(root / 'results' / 'cuda-nvidia-h200')!r}, '--json']))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env={"PYTHONPATH": str(root / "src")}, check=False)
    assert proc.returncode == 0, proc.stderr
    first, second = proc.stdout.splitlines()
    assert json.loads(first)["configurations"][0]["micro_batch"] in (1, 2)
    assert json.loads(second)["time"]["calibration"] == "NVIDIA H200"
