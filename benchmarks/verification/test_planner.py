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
    fit): the planner's top 5 are the 5 fastest of every configuration estimated exactly, hsdp in shard groups of
    2 (the one power of two below 4) among them."""
    spec, dev, gpus, seqs = get_preset("gpt2-medium"), get_device("T4"), 4, 8
    found, tried = plan(spec, "T4", gpus, gpus * 1024 * seqs, 1024, precisions=("16-mixed", "32-true"))
    cal = datasheet_calibration(dev)
    usable = _fit_of(dev, 0, 1024, 1).usable
    exact = []
    for precision in ("16-mixed", "32-true"):
        for sharding, group in [*((s, None) for s in _PLAIN), ("hsdp", 2)]:
            for mode in ("none", "full", "every-other"):
                for batch in (1, 2, 4, 8):
                    kw = {"precision": precision, "checkpointing": mode, "grad_accum": seqs // batch,
                          "world_size": gpus, "sharding": sharding, "shard_group_size": group}
                    if estimate(spec, batch, 1024, **kw).peak_per_rank <= usable:  # type: ignore[arg-type]
                        exact.append(config_time(spec, batch, 1024, cal, **kw).tokens_per_s)  # type: ignore[arg-type]
    assert tried == 2 * (len(_PLAIN) + 1) * 3 * 4
    assert 5 < len(exact) < tried  # some configurations do not fit
    exact.sort(reverse=True)
    assert [p.tokens_per_s for p in found] == pytest.approx(exact[:5])
    assert all(p.fit.fits and p.estimate.peak_per_rank <= usable for p in found)


def test_plan_with_hybrid_sharding_agrees_with_the_exhaustive_exact_search() -> None:
    """8 T4s in nodes of 2, 100 GB/s within a node and 10 GB/s between nodes: hsdp in groups of 2 (one node) gathers
    over the fast link and is among the 5 fastest; the planner's top 5 are still those of the exhaustive search over
    every sharding, hsdp in groups of 2 and 4 (the powers of two below 8)."""
    spec, dev, gpus, seqs = get_preset("gpt2-medium"), get_device("T4"), 8, 8
    links = {"gpus_per_node": 2, "intra_node_bandwidth": 100e9, "link_bandwidth": 10e9}
    found, tried = plan(spec, "T4", gpus, gpus * 1024 * seqs, 1024, precisions=("16-mixed",), **links)
    cal = datasheet_calibration(dev)
    usable = _fit_of(dev, 0, 1024, 1).usable
    exact = []
    for sharding, group in [*((s, None) for s in _PLAIN), ("hsdp", 2), ("hsdp", 4)]:
        for mode in ("none", "full", "every-other"):
            for batch in (1, 2, 4, 8):
                kw = {"precision": "16-mixed", "checkpointing": mode, "grad_accum": seqs // batch,
                      "world_size": gpus, "sharding": sharding, "shard_group_size": group}
                if estimate(spec, batch, 1024, **kw).peak_per_rank <= usable:  # type: ignore[arg-type]
                    exact.append(config_time(spec, batch, 1024, cal, **kw, **links).tokens_per_s)  # type: ignore[arg-type]
    assert tried == (len(_PLAIN) + 2) * 3 * 4
    exact.sort(reverse=True)
    assert [p.tokens_per_s for p in found] == pytest.approx(exact[:5])
    assert any(p.estimate.sharding == "hsdp" and p.estimate.shard_group_size == 2 for p in found)


def test_hsdp_communication_is_ring_arithmetic_over_the_two_links() -> None:
    """gpt2-small (124,439,808 parameters, 39,385,344 of them in the embeddings and final norm: the root unit) on
    16 GPUs in shard groups of 8, bf16-true (FSDP2 gathers and reduces in bf16): within a group a ring all-gather
    sends (g - 1) / g of its output, a reduce-scatter (g - 1) / g of its input (NCCL's ring algorithms); across the
    2 replicas the all-reduce of each rank's bf16 gradient shard sends 2 (r - 1) / r of it."""
    spec = get_preset("gpt2-small")
    # root: token table 50,257 x 768, position table 1,024 x 768, final LayerNorm 2 x 768; a block: qkv
    # 768 x 2,304 + 2,304, out 768 x 768 + 768, MLP 768 x 3,072 + 3,072 and 3,072 x 768 + 768, 2 LayerNorms 4 x 768
    n, root, g, r = 124_439_808, 50_257 * 768 + 1_024 * 768 + 2 * 768, 8, 2
    block = 768 * 2304 + 2304 + 768 * 768 + 768 + 768 * 3072 + 3072 + 3072 * 768 + 768 + 4 * 768
    assert n_params(spec) == n == root + 12 * block
    shard = -(-n // g)
    gather = 2 * (shard * g) * 2 - root * 2  # forward and backward, bf16, the root gathered once
    reduce = shard * g * 2
    intra, inter = 400e9, 50e9
    expected = ((g - 1) / g * (gather + reduce)) / intra + (2 * (r - 1) / r * shard * 2) / inter
    cal = datasheet_calibration(get_device("H100 SXM"))
    t = config_time(spec, 1, 1024, cal, precision="bf16-true", world_size=16, sharding="hsdp", shard_group_size=g,
                    gpus_per_node=8, intra_node_bandwidth=intra, link_bandwidth=inter)
    assert t.phases["communication"].seconds == pytest.approx(expected)
    # groups of 16 span two nodes: everything crosses the slower link
    t16 = config_time(spec, 1, 1024, cal, precision="bf16-true", world_size=32, sharding="hsdp",
                      shard_group_size=16, gpus_per_node=8, intra_node_bandwidth=intra, link_bandwidth=inter)
    shard16 = -(-n // 16)
    gather16, reduce16 = 2 * (shard16 * 16) * 2 - root * 2, shard16 * 16 * 2
    assert t16.phases["communication"].seconds == pytest.approx(
        (15 / 16 * (gather16 + reduce16) + shard16 * 2) / inter)
    # groups of 4 on nodes of 6 (consecutive ranks): the second group, ranks 4-7, straddles two nodes, so the
    # gathers and reduce-scatters wait on the slower link too; 3 replicas all-reduce 2 x 2 / 3 of a bf16 shard
    t4 = config_time(spec, 1, 1024, cal, precision="bf16-true", world_size=12, sharding="hsdp", shard_group_size=4,
                     gpus_per_node=6, intra_node_bandwidth=intra, link_bandwidth=inter)
    shard4 = -(-n // 4)
    gather4, reduce4 = 2 * (shard4 * 4) * 2 - root * 2, shard4 * 4 * 2
    assert t4.phases["communication"].seconds == pytest.approx(
        (3 / 4 * (gather4 + reduce4) + 2 * 2 / 3 * shard4 * 2) / inter)
    # the optimizer updates one rank's 1/8 of the parameters: as fsdp on one group of 8
    fsdp8 = config_time(spec, 1, 1024, cal, precision="bf16-true", world_size=8, sharding="fsdp")
    assert t.phases["optimizer"].seconds == pytest.approx(fsdp8.phases["optimizer"].seconds)
    with pytest.raises(ValueError, match="shard_group_size=3"):
        config_time(spec, 1, 1024, cal, world_size=16, sharding="hsdp", shard_group_size=3)


def test_plan_tries_every_power_of_two_shard_group() -> None:
    spec = get_preset("gpt-tiny")
    # 16 GPUs: hsdp in groups of 2, 4 and 8 beside the 6 other schemes; 4 precisions, 3 checkpointing modes, and
    # micro-batches 1 and 2 of the 2 sequences per rank
    found, tried = plan(spec, "H100 SXM", 16, 16 * 128 * 2, 128, top=100)
    assert tried == 4 * (6 + 3) * 3 * 2
    assert {p.estimate.shard_group_size for p in found if p.estimate.sharding == "hsdp"} == {2, 4, 8}
    found, _ = plan(spec, "H100 SXM", 16, 16 * 128 * 2, 128, top=100, shard_group_sizes=(4,), shardings=("hsdp",))
    assert {(p.estimate.sharding, p.estimate.shard_group_size) for p in found} == {("hsdp", 4)}
    with pytest.raises(ValueError, match="shard_group_size=3"):
        plan(spec, "H100 SXM", 16, 16 * 128 * 2, 128, shard_group_sizes=(3,))
    with pytest.raises(ValueError, match="shardings="):
        plan(spec, "H100 SXM", 16, 16 * 128 * 2, 128, shardings=("ring",))
    with pytest.raises(ValueError, match="shardings='ring'"):  # one GPU runs ddp only: the name is still checked
        plan(spec, "H100 SXM", 1, 128 * 2, 128, shardings=("ring",))
    # hsdp asked for where no group divides the GPUs (3; 2 has no group below it): an error, not an empty plan
    for gpus in (2, 3):
        with pytest.raises(ValueError, match="no shard group"):
            plan(spec, "H100 SXM", gpus, gpus * 128 * 2, 128, shardings=("hsdp",))
    # by default the same GPUs simply try no hsdp
    assert all(p.estimate.sharding != "hsdp" for p in plan(spec, "H100 SXM", 3, 3 * 128 * 2, 128, top=100)[0])
    # the link arguments are checked before anything is tried, not only when a configuration reaches the timing
    for kwargs, message in [({"gpus_per_node": 0}, "gpus_per_node=0"),
                            ({"intra_node_bandwidth": -1.0}, "intra_node_bandwidth=-1"),
                            ({"link_bandwidth": 0.0}, "link_bandwidth=0")]:
        with pytest.raises(ValueError, match=message):
            plan(spec, "H100 SXM", 16, 16 * 128 * 2, 128, precisions=(), **kwargs)  # type: ignore[arg-type]


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


def test_plan_takes_an_hf_config(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    # a GPT-2 config.json of the gpt-tiny preset's shapes (2 blocks, width 128, 4 heads, MLP 4 x 128, vocabulary
    # 1,000, context 256): the same plan
    cfg = tmp_path / "config.json"
    cfg.write_text(json.dumps({"model_type": "gpt2", "n_layer": 2, "n_embd": 128, "n_head": 4, "vocab_size": 1000,
                               "n_positions": 256}))
    common = ["--gpu", "h100-sxm", "--gpus", "2", "--global-batch-tokens", str(2 * 256 * 2), "--top", "4",
              "--json"]
    assert main(["plan", "--hf-config", str(cfg), *common]) == 0
    from_config = json.loads(capsys.readouterr().out)
    assert main(["plan", "--model", "gpt-tiny", *common]) == 0
    from_preset = json.loads(capsys.readouterr().out)
    assert from_config["seq_len"] == 256  # the config's n_positions
    assert from_config["configurations"] == from_preset["configurations"]
    assert from_config["tried"] == from_preset["tried"]
    assert str(cfg) in from_config["model"]
    # the table names the shard groups of an hsdp configuration: on nodes of 2 with NVLink 4 inside (450 GB/s),
    # groups of 2 gather over it and only the all-reduce of a shard crosses the 50 GB/s link
    assert main(["plan", "--hf-config", str(cfg), "--gpu", "h100-sxm", "--gpus", "4", "--global-batch-tokens",
                 str(4 * 256), "--top", "1", "--gpus-per-node", "2", "--intra-node-gbps", "450"]) == 0
    assert "1. bf16-true, hsdp (shard groups of 2)" in capsys.readouterr().out


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
    (["--hf-config", "/nonexistent/config.json", "--gpu", "h100-sxm", "--gpus", "1", "--global-batch-tokens",
      "1024"], "--hf-config /nonexistent/config.json"),
    (["--model", "gpt2-small", "--hf-config", "x.json", "--gpu", "h100-sxm", "--gpus", "1",
      "--global-batch-tokens", "1024"], "not allowed with argument"),
    (["--gpu", "h100-sxm", "--gpus", "1", "--global-batch-tokens", "1024"], "--model --hf-config"),
    (["--model", "gpt2-small", "--gpu", "h100-sxm", "--gpus", "8", "--global-batch-tokens", "8192",
      "--gpus-per-node", "0"], "--gpus-per-node"),
    (["--model", "gpt2-small", "--gpu", "h100-sxm", "--gpus", "8", "--global-batch-tokens", "8192",
      "--intra-node-gbps", "-1"], "--intra-node-gbps"),
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
