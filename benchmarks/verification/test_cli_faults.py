"""Bad input and faults of ``estimate``, ``count`` and ``measure``: one line, the right exit status, no traceback.

Bad usage exits 2 with one line naming the argument and the value; out of memory is a result of ``measure`` (exit 1
with the prediction, the free memory and the shortfall). Nothing here allocates more than a tiny model: where a
measurement would be large, the functions that would run it are replaced by ones that fail the test if called.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import psutil
import pytest

from torchledger.cli import main
from torchledger.formulas import distributed
from torchledger.measuring import training
from torchledger.reporting.units import format_bytes
from torchledger.workloads.train_step import TrainConfig

ROOT = Path(__file__).resolve().parents[2]
GPT_TINY_PARAMS = 557_568  # see test_cli_measure: 2*128*1000 (wte) + 256*128 (wpe) + 2 blocks + ln_f
GPT2_TINY = {"model_type": "gpt2", "n_layer": 2, "n_embd": 128, "n_head": 4, "vocab_size": 1000, "n_positions": 256}
LLAMA_TINY = {"model_type": "llama", "num_hidden_layers": 2, "hidden_size": 128, "num_attention_heads": 4,
              "num_key_value_heads": 2, "intermediate_size": 344, "vocab_size": 1000, "max_position_embeddings": 256}


class _Reached(Exception):
    """Raised by a stand-in for a measurement: the command got past its checks."""


def _must_not_run(*args: object, **kwargs: object) -> None:
    raise AssertionError("the measurement ran: the command should have refused before allocating")


@pytest.fixture
def no_measurement(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every measurement fails the test if called (the CLI looks them up on the module at each call)."""
    for name in ("measure", "measure_inference", "simulate", "simulate_inference"):
        monkeypatch.setattr(training, name, _must_not_run)


def one_line(capsys: pytest.CaptureFixture[str]) -> str:
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1, captured.err
    assert "Traceback" not in captured.err
    return lines[0]


def _fake_available(monkeypatch: pytest.MonkeyPatch, available: int) -> None:
    monkeypatch.setattr(psutil, "virtual_memory", lambda: SimpleNamespace(available=available))


# --- measure: out of memory is a result, and is refused before allocating when predicted ------------------------------


@pytest.mark.parametrize("inference", [False, True])
def test_measure_refuses_when_the_prediction_exceeds_free_memory(
    inference: bool, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], no_measurement: None
) -> None:
    free = 2**20
    _fake_available(monkeypatch, free)
    case = training.MemoryCase("gpt-tiny", 2, TrainConfig(), seq_len=64)
    peak = training.predict_inference(case).peak if inference else case.predict().peak
    assert peak > free  # gpt-tiny's fp32 weights alone are 4 x 557,568 bytes
    argv = ["measure", "--model", "gpt-tiny", "--batch-size", "2", "--seq-len", "64", "--device", "cpu"]
    assert main([*argv, *(["--inference"] if inference else [])]) == 1
    line = one_line(capsys)
    assert (f"out of memory on cpu: predicted peak {format_bytes(peak)}, free {format_bytes(free)}, "
            f"short by {format_bytes(peak - free)}") in line


def test_an_impossible_step_is_refused_without_allocating(
    capsys: pytest.CaptureFixture[str], no_measurement: None
) -> None:
    # 10^10 sequences of 256 tokens: the logits alone are 10^10 x 256 x 1000 x 4 bytes, beyond any machine's memory
    logits = 10**10 * 256 * 1000 * 4
    assert logits > psutil.virtual_memory().total
    assert main(["measure", "--model", "gpt-tiny", "--batch-size", str(10**10), "--device", "cpu"]) == 1
    line = one_line(capsys)
    assert "out of memory on cpu: predicted peak" in line and "short by" in line


@pytest.mark.parametrize(
    "message",
    [
        "[enforce fail at alloc_cpu.cpp:127] err == 0. DefaultCPUAllocator: can't allocate memory: you tried to "
        "allocate 20560000000000 bytes. Error code 12 (Cannot allocate memory)",
        "[enforce fail at alloc_cpu.cpp:114] data. DefaultCPUAllocator: not enough memory: you tried to allocate "
        "20560000000000 bytes.",
    ],
)
def test_cpu_allocator_failure_is_out_of_memory(
    message: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    def fail(case: object, device: str, **_: object) -> None:
        raise RuntimeError(message)

    free = 2**50  # the prediction fits: the run starts, then the allocator fails
    _fake_available(monkeypatch, free)
    monkeypatch.setattr(training, "measure", fail)
    assert main(["measure", "--model", "gpt-tiny", "--seq-len", "16", "--device", "cpu"]) == 1
    line = one_line(capsys)
    assert "out of memory on cpu: predicted peak" in line
    assert f"free {format_bytes(free)}, short by 0 B" in line


def test_other_runtime_errors_stay_usage_errors(monkeypatch: pytest.MonkeyPatch,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    def fail(case: object, device: str, **_: object) -> None:
        raise RuntimeError("\"addmm_impl_cpu_\" not implemented for 'Half'")

    monkeypatch.setattr(training, "measure", fail)
    assert main(["measure", "--model", "gpt-tiny", "--seq-len", "16", "--device", "cpu"]) == 2
    assert "32-true on cpu: \"addmm_impl_cpu_\" not implemented" in one_line(capsys)


# --- config.json fields are checked by type, in every command ---------------------------------------------------------

COMMANDS = [["estimate"], ["count"], ["measure", "--simulate"]]


@pytest.mark.parametrize("command", COMMANDS, ids=lambda c: c[0])
@pytest.mark.parametrize(
    ("base", "field", "value"),
    [
        (GPT2_TINY, "model_type", ["llama"]),
        (GPT2_TINY, "model_type", {"name": "gpt2"}),
        (GPT2_TINY, "model_type", 2),
        (GPT2_TINY, "n_layer", "2"),
        (GPT2_TINY, "n_layer", True),
        (GPT2_TINY, "n_embd", 128.0),
        (GPT2_TINY, "n_head", 0),
        (GPT2_TINY, "n_inner", "512"),
        (GPT2_TINY, "tie_word_embeddings", "false"),
        (GPT2_TINY, "tie_word_embeddings", 0),
        (GPT2_TINY, "_name_or_path", 7),
        (LLAMA_TINY, "num_key_value_heads", "2"),
        (LLAMA_TINY, "head_dim", -32),
        (LLAMA_TINY, "attention_bias", "no"),
        (LLAMA_TINY, "mlp_bias", None),
    ],
)
def test_mistyped_config_field(
    command: list[str], base: dict[str, Any], field: str, value: object, tmp_path: Path,
    capsys: pytest.CaptureFixture[str], no_measurement: None,
) -> None:
    path = tmp_path / "config.json"
    path.write_text(json.dumps({**base, field: value}))
    assert main([*command, "--hf-config", str(path), "--seq-len", "16"]) == 2
    line = one_line(capsys)
    assert f"{field}={value!r} in {path} must be " in line
    assert capsys.readouterr().out == ""


def test_json_false_unties_the_head(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "config.json"
    params = []
    for tied in (True, False):
        path.write_text(json.dumps({**GPT2_TINY, "tie_word_embeddings": tied}))
        assert main(["estimate", "--hf-config", str(path), "--json"]) == 0
        params.append(json.loads(capsys.readouterr().out)["params"])
    assert params == [GPT_TINY_PARAMS, GPT_TINY_PARAMS + 1000 * 128]  # an LM head of its own: vocab x d_model


# --- a sequence beyond the model's context: one message, every command ------------------------------------------------

SEQ_COMMANDS = [
    ["estimate"],
    ["count"],
    ["measure", "--device", "cpu"],
    ["measure", "--simulate"],
    ["measure", "--inference", "--device", "cpu"],
    ["measure", "--inference", "--simulate"],
]


@pytest.mark.parametrize("command", SEQ_COMMANDS, ids=" ".join)
@pytest.mark.parametrize(("model", "table"), [("gpt-tiny", "learned position table"),
                                              ("llama-tiny", "rotary position table")])
def test_seq_len_beyond_the_context(
    command: list[str], model: str, table: str, capsys: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture, no_measurement: None,
) -> None:
    assert main([*command, "--model", model, "--seq-len", "257"]) == 2
    line = one_line(capsys)
    assert f"torchledger {command[0]}: error: --seq-len 257: seq_len=257 exceeds max_seq_len=256" in line
    assert f"the context of {model}: its {table} has 256 rows" in line
    assert not caplog.records  # nothing ran, so nothing logged a traceback


@pytest.mark.parametrize("config", [GPT2_TINY, LLAMA_TINY], ids=["gpt2", "llama"])
def test_seq_len_beyond_a_config_context(config: dict[str, Any], tmp_path: Path,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "config.json"
    path.write_text(json.dumps(config))
    for command in (["estimate"], ["count"]):
        assert main([*command, "--hf-config", str(path), "--seq-len", "300"]) == 2
        assert "--seq-len 300: seq_len=300 exceeds max_seq_len=256" in one_line(capsys)
    assert main(["estimate", "--hf-config", str(path), "--seq-len", "256", "--json"]) == 0  # the context itself runs
    assert json.loads(capsys.readouterr().out)["seq_len"] == 256


# --- integer flags: torch's int64 sizes -------------------------------------------------------------------------------


INT_FLAGS = [
    *[(["estimate"], flag) for flag in ("--batch-size", "--seq-len", "--grad-accum", "--world-size")],
    *[(["count"], flag) for flag in ("--batch-size", "--seq-len")],
    *[(["measure", "--simulate"], flag) for flag in ("--batch-size", "--seq-len", "--grad-accum")],
]


@pytest.mark.parametrize(("command", "flag"), INT_FLAGS, ids=[f"{c[0]}{f}" for c, f in INT_FLAGS])
def test_integer_beyond_int64(command: list[str], flag: str, capsys: pytest.CaptureFixture[str],
                              no_measurement: None) -> None:
    for value in (str(2**63), "9" * 5000):  # 5,000 digits: more than int() converts
        assert main([*command, "--model", "gpt-tiny", flag, value]) == 2
        line = one_line(capsys)
        assert f"argument {flag}: '{value[:24]}" in line and "exceeds 2**63 - 1" in line


@pytest.mark.parametrize("command", [["estimate"], ["count"], ["measure", "--simulate"]], ids=lambda c: c[0])
def test_tensor_beyond_int64_sizes(command: list[str], capsys: pytest.CaptureFixture[str],
                                   no_measurement: None) -> None:
    batch = 2**62  # fits an int64, but not the step's tensors
    assert main([*command, "--model", "gpt-tiny", "--batch-size", str(batch)]) == 2
    line = one_line(capsys)
    assert f"--batch-size {batch} with --seq-len 256" in line
    # at 256 tokens the widest is the attention scores, 4 heads x 256 keys per token, beyond the 1000 logits
    assert f"{batch * 256 * 4 * 256:,} elements" in line


def test_int64_bound_is_the_largest_tensor(capsys: pytest.CaptureFixture[str]) -> None:
    # At one token per sequence gpt-tiny's widest tensor is the logits (vocab 1000 > d_ff 512 > qkv 384 > d_model
    # 128): 2^60 elements at 8 bytes fill int64, so batch 2^60 // 1000 is the largest that counts.
    batch = 2**60 // 1000
    assert main(["count", "--model", "gpt-tiny", "--seq-len", "1", "--batch-size", str(batch), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    # per token: 2 blocks of 2 x (12 d^2 + 4 T d) matmul FLOPs (T = 1) and the head's 2 d V
    expected = batch * (2 * (2 * 12 * 128 * 128 + 4 * 1 * 128) + 2 * 128 * 1000)
    assert out["formula"] == out["dispatch"] == out["hooks"] == expected
    assert main(["count", "--model", "gpt-tiny", "--seq-len", "1", "--batch-size", str(batch + 1)]) == 2
    assert f"{(batch + 1) * 1000:,} elements" in one_line(capsys)


# --- --hf-config: one line naming the path; only regular files are read -----------------------------------------------


def test_count_missing_config_is_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setitem(sys.modules, "transformers", None)  # the message must not depend on it
    missing = tmp_path / "absent" / "config.json"
    assert main(["count", "--hf-config", str(missing)]) == 2
    line = one_line(capsys)
    assert f"hf_config={str(missing)!r}: no such file" in line
    assert "transformers" not in line


@pytest.mark.parametrize("command", [["estimate"], ["count"], ["measure", "--simulate"]], ids=lambda c: c[0])
def test_config_that_is_a_directory(command: list[str], tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                    no_measurement: None) -> None:
    assert main([*command, "--hf-config", str(tmp_path)]) == 2
    assert f"hf_config={str(tmp_path)!r} is not a regular file" in one_line(capsys)


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="named pipes are POSIX")
@pytest.mark.parametrize("command", ["estimate", "count"])
def test_named_pipe_config_is_refused_not_read(command: str, tmp_path: Path) -> None:
    fifo = tmp_path / "config.json"
    os.mkfifo(fifo)
    # A read would block until a writer opens the pipe: the timeout turns a regression into a failure, not a hang.
    proc = subprocess.run(
        [sys.executable, "-m", "torchledger", command, "--hf-config", str(fifo)],
        capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT / "src")}, timeout=600,
        check=False,
    )
    assert proc.returncode == 2
    assert proc.stdout == "" and "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and f"hf_config={str(fifo)!r} is not a regular file" in lines[0]


# --- measure: flags it would ignore, its grad-accum bound, the workloads it lists -------------------------------------


def test_measure_grad_accum_bound(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["measure", "--model", "mlp", "--grad-accum", "1025", "--device", "cpu"]) == 2
    assert "--grad-accum 1025 exceeds 1024" in one_line(capsys)

    def reached(case: training.MemoryCase, device: str, **_: object) -> None:
        assert case.config.grad_accum == 1024
        raise _Reached

    monkeypatch.setattr(training, "measure", reached)
    with pytest.raises(_Reached):
        main(["measure", "--model", "mlp", "--grad-accum", "1024", "--device", "cpu"])


def test_estimate_takes_a_large_grad_accum() -> None:
    # In a process of its own, with a timeout: a cost that grows with the number of micro-batches fails, not hangs.
    runs = []
    for accum in ("2", str(10**9)):
        try:
            proc = subprocess.run(
                [sys.executable, "-m", "torchledger", "estimate", "--model", "gpt-tiny", "--grad-accum", accum,
                 "--json"],
                capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT / "src")}, timeout=300,
                check=False,
            )
        except subprocess.TimeoutExpired:
            pytest.fail(f"estimate --grad-accum {accum} took over 300 s: its cost must not grow with the micro-batches")
        assert proc.returncode == 0, proc.stderr
        runs.append(json.loads(proc.stdout))
    two, huge = runs
    micro = huge["flops"]["forward"] + huge["flops"]["backward"] + huge["flops"]["recompute"]
    assert huge["flops"]["train_step"] == 10**9 * micro == 5 * 10**8 * two["flops"]["train_step"]
    assert huge["flops"]["per_token_train"] == two["flops"]["per_token_train"]
    assert huge["memory"] == two["memory"]  # accumulation adds steps, not memory


@pytest.mark.parametrize(
    ("flag", "value"),
    [("--checkpointing", "full"), ("--checkpointing", "none"), ("--grad-accum", "2"), ("--optimizer", "sgd"),
     ("--optimizer-impl", "fused"), ("--clip-grad-norm", "1.0")],
)
def test_training_flag_with_inference(flag: str, value: str, capsys: pytest.CaptureFixture[str],
                                      no_measurement: None) -> None:
    assert main(["measure", "--model", "gpt-tiny", "--inference", "--device", "cpu", flag, value]) == 2
    assert f"error: {flag} {value} does not apply to --inference" in one_line(capsys)


def test_training_flags_still_default_for_a_training_step(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[TrainConfig] = []

    def reached(case: training.MemoryCase, device: str, **_: object) -> None:
        seen.append(case.config)
        raise _Reached

    monkeypatch.setattr(training, "measure", reached)
    with pytest.raises(_Reached):
        main(["measure", "--model", "gpt-tiny", "--seq-len", "16", "--device", "cpu"])
    assert seen == [TrainConfig("32-true", "adamw", "foreach", "none", 1, None)]


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--model", "gpt5"], "--model 'gpt5' is not a workload; choose one of mlp, cnn, gpt-tiny, llama-tiny"),
        (["--model", "mlp", "--seq-len", "64"], "--seq-len 64 does not apply to --model mlp"),
        (["--model", "cnn", "--simulate", "--device", "cpu"], "--device cpu does not apply to --simulate"),
    ],
)
def test_measure_refuses_what_it_would_ignore(args: list[str], needle: str, capsys: pytest.CaptureFixture[str],
                                              no_measurement: None) -> None:
    assert main(["measure", *args]) == 2
    assert needle in one_line(capsys)


# --- world size: ddp replicates, sharding schemes need an element per rank --------------------------------------------


def test_ddp_takes_any_world_size(capsys: pytest.CaptureFixture[str]) -> None:
    ranks = 10**6  # more ranks than gpt-tiny has parameters
    assert ranks > GPT_TINY_PARAMS
    assert main(["estimate", "--model", "gpt-tiny", "--world-size", str(ranks), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    grads = 4 * GPT_TINY_PARAMS  # fp32: every rank holds every gradient
    assert (out["memory"]["params"], out["memory"]["grads"], out["memory"]["optimizer"]) == (grads, grads, 2 * grads)
    # ring all-reduce: 2 (N - 1) / N of the gradients, rounded up
    assert out["communication"] == {"all_reduce": -(-2 * (ranks - 1) * grads // ranks)}
    states = distributed.sharded_state_bytes(3, world_size=4, sharding="ddp")
    assert states.states.params == 3 * 4
    assert distributed.collective_payloads(3, world_size=4, sharding="ddp") == {"all_reduce": 3 * 4}


@pytest.mark.parametrize("sharding", ["zero1", "zero2", "zero3", "fsdp", "fsdp-grad-op"])
def test_sharding_needs_an_element_per_rank(sharding: str, capsys: pytest.CaptureFixture[str]) -> None:
    ranks = GPT_TINY_PARAMS + 1
    assert main(["estimate", "--model", "gpt-tiny", "--world-size", str(ranks), "--sharding", sharding]) == 2
    line = one_line(capsys)
    assert f"--world-size {ranks} exceeds the 557,568 parameters that --sharding {sharding} splits" in line
    assert main(["estimate", "--model", "gpt-tiny", "--world-size", str(GPT_TINY_PARAMS), "--sharding", sharding,
                 "--json"]) == 0  # one element per rank is the limit
    capsys.readouterr()
    with pytest.raises(ValueError, match=f"world_size={ranks} exceeds the {GPT_TINY_PARAMS} elements"):
        distributed.sharded_state_bytes(GPT_TINY_PARAMS, world_size=ranks, sharding=sharding)


def test_no_traceback_end_to_end() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "torchledger", "count", "--model", "gpt-tiny", "--batch-size", str(2**62)],
        capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT / "src")}, timeout=300, check=False,
    )
    assert proc.returncode == 2 and proc.stdout == ""
    assert "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) == 1


def test_a_closed_standard_output_is_one_status_no_traceback(monkeypatch: pytest.MonkeyPatch,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    # `torchledger estimate ... | head -1`: the reader leaves, the next write raises BrokenPipeError
    class Closed:
        def write(self, text: str) -> int:
            raise BrokenPipeError(32, "Broken pipe")

        def flush(self) -> None:
            raise BrokenPipeError(32, "Broken pipe")

        def fileno(self) -> int:
            raise OSError("no file descriptor")

    monkeypatch.setattr(sys, "stdout", Closed())
    assert main(["estimate", "--model", "gpt-tiny"]) == 3
    assert capsys.readouterr().err.strip().splitlines() == [
        "torchledger estimate: error: standard output was closed (Broken pipe)"]


def test_snapshot_of_measure(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import pickle

    from torchledger.measuring.snapshot import snapshot_peak

    path = tmp_path / "step.pickle"
    assert main(["measure", "--model", "gpt-tiny", "--batch-size", "2", "--seq-len", "32", "--device", "cpu",
                 "--snapshot", str(path), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["snapshot"] == str(path)
    assert snapshot_peak(pickle.loads(path.read_bytes())) == out["measured"]["peak"]
    # a path that cannot be written: one line, exit 2, nothing run and nothing written
    bad = tmp_path / "missing" / "s.pickle"
    assert main(["measure", "--model", "gpt-tiny", "--snapshot", str(bad)]) == 2
    assert "--snapshot" in one_line(capsys)
    assert not bad.parent.exists()
