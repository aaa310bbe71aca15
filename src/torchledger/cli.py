"""The ``torchledger`` command line.

Every subcommand validates its input before doing any work; bad usage prints one line naming the argument and
the value and exits with status 2, never a traceback.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence
from typing import Any, NoReturn

from torchledger.formulas.distributed import INTERCONNECTS, SHARDINGS, SIMULATED_SHARDINGS
from torchledger.formulas.estimate import Estimate, estimate
from torchledger.formulas.flops import attention_convention
from torchledger.formulas.hardware import device_names, get_device
from torchledger.formulas.memory import RECIPES
from torchledger.formulas.specs import (
    PRESETS,
    ModelSpec,
    check_seq_len,
    get_preset,
    n_params,
    spec_from_hf_config,
)
from torchledger.formulas.timeline_hf import IMPLEMENTATIONS
from torchledger.formulas.vocabulary import OPTIMIZER_IMPLS, OPTIMIZERS, REFERENCE_WORKLOADS, STEP_CHECKPOINTING
from torchledger.reporting.units import format_bytes, format_count, format_flops

EXIT_USAGE = 2


class UsageError(Exception):
    """Bad usage: reported in one line, exit status 2."""


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors (its default prints the whole usage block first)."""

    def error(self, message: str) -> NoReturn:
        raise UsageError(f"{self.prog}: error: {message} (see --help)")


_INT64_MAX = 2**63 - 1  # torch's sizes and strides are int64


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        if text.strip().lstrip("+").isdigit():  # more digits than int() converts
            raise argparse.ArgumentTypeError(f"{text[:24]!r}... exceeds 2**63 - 1") from None
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} must be a positive integer")
    if value > _INT64_MAX:
        raise argparse.ArgumentTypeError(f"{text!r} exceeds 2**63 - 1, the largest size torch holds")
    return value


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"{text!r} must be a finite number > 0")
    return value


def add_model_source(parser: argparse.ArgumentParser) -> None:
    """``--model`` or ``--hf-config``, one of them required (what :func:`resolve_spec` reads)."""
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--model", metavar="PRESET", help=f"a preset: {', '.join(PRESETS)}")
    source.add_argument("--hf-config", metavar="PATH",
                        help="a Hugging Face config.json (GPT-2, LLaMA, Mistral, Mixtral)")


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """The model flags shared by ``estimate``, ``count`` and ``measure``."""
    add_model_source(parser)
    parser.add_argument("--implementation", choices=list(IMPLEMENTATIONS), default=None,
                        help="with --hf-config: hf (the default) builds and walks what transformers runs; reference: "
                        "the project's transformer of the same shape (what --model presets always are)")
    parser.add_argument("--batch-size", type=_positive_int, default=1, help="micro-batch size (default 1)")
    parser.add_argument(
        "--seq-len", type=_positive_int, default=None, help="tokens per sequence (default: the model's context)"
    )


STEP_DEFAULTS: dict[str, Any] = {"optimizer": "adamw", "checkpointing": "none", "grad_accum": 1}


def add_step_arguments(parser: argparse.ArgumentParser, recipes: list[str]) -> None:
    """The training-step flags shared by ``estimate`` and ``measure``.

    ``--optimizer``, ``--checkpointing`` and ``--grad-accum`` parse to None when not given (so that ``measure
    --inference`` can refuse them); :func:`_fill_step_defaults` then puts in :data:`STEP_DEFAULTS`.
    """
    parser.add_argument("--precision", choices=recipes, default="32-true", help="precision recipe (default 32-true)")
    parser.add_argument("--optimizer", choices=list(OPTIMIZERS), default=None, help="optimizer (default adamw)")
    parser.add_argument("--checkpointing", choices=list(STEP_CHECKPOINTING), default=None,
                        help="activation checkpointing (default none)")
    parser.add_argument("--grad-accum", type=_positive_int, default=None,
                        help="micro-batches per optimizer step (default 1)")


def _fill_step_defaults(args: argparse.Namespace) -> None:
    for name, value in STEP_DEFAULTS.items():
        if getattr(args, name) is None:
            setattr(args, name, value)


def _implementation(args: argparse.Namespace, command: str) -> str:
    """``hf`` (transformers' model of ``--hf-config``) or ``reference``; bad usage for ``hf`` without a config."""
    if args.implementation == "hf" and args.hf_config is None:
        raise UsageError(f"torchledger {command}: error: --implementation hf needs --hf-config (a --model preset is "
                         "the reference transformer)")
    return "hf" if args.hf_config is not None and args.implementation != "reference" else "reference"


def _hf_profile(args: argparse.Namespace, command: str) -> Any:
    """The implementation profile of ``--hf-config`` (:mod:`torchledger.formulas.timeline_hf`), or None for the
    reference transformer (also where the config's model_type has no profile: the output names the one used)."""
    if _implementation(args, command) != "hf":
        return None
    from torchledger.formulas.timeline_hf import hf_profile_or_none

    return hf_profile_or_none(args.hf_config)


def _profile_name(hf_config: str | None) -> str:
    """How a prediction walked the step: ``hf:<model_type>`` (an implementation profile) or ``reference``."""
    if hf_config is None:
        return "reference"
    from torchledger.formulas.timeline_hf import hf_profile_or_none

    profile = hf_profile_or_none(hf_config)
    return "reference" if profile is None else f"hf:{profile.model_type}"


def _require_transformers(command: str) -> None:
    """Bad usage, one line naming the extra to install, when transformers is missing."""
    from torchledger.workloads.hf import TransformersMissing, require_transformers

    try:
        require_transformers()
    except TransformersMissing as exc:
        raise UsageError(f"torchledger {command}: error: {exc}; or pass --implementation reference") from None


def resolve_spec(args: argparse.Namespace) -> ModelSpec:
    """The spec named by ``--model`` or read from ``--hf-config``."""
    if args.model is not None:
        return get_preset(args.model)
    return spec_from_hf_config(args.hf_config)


_MAX_ELEMENTS = 2**60  # 2**63 bytes at 8 bytes an element: the most a tensor holds within torch's int64 sizes


def _checked_seq_len(spec: ModelSpec, seq_len: int | None, command: str) -> int:
    """``seq_len`` (default: the model's context) if the model can run it; bad usage naming --seq-len if not."""
    value = seq_len or spec.max_seq_len
    try:
        return check_seq_len(spec, value)
    except ValueError as exc:
        raise UsageError(f"torchledger {command}: error: --seq-len {value}: {exc}") from None


def _largest_tensor(spec: ModelSpec, batch: int, seq_len: int) -> int:
    """Elements of the largest tensor one step of ``spec`` builds: the logits, the MLP's hidden activations, the
    query/key/value projections or the attention scores (n_heads x seq_len per token)."""
    width = max(spec.vocab_size, spec.d_ff, spec.q_dim + 2 * spec.kv_dim, spec.d_model, spec.n_heads * seq_len)
    return batch * seq_len * width


def _check_sizes(command: str, batch: int, seq_len: int | None, elements: int) -> None:
    """Bad usage naming --batch-size (and --seq-len) when a tensor of ``elements`` would overflow torch's sizes."""
    if elements > _MAX_ELEMENTS:
        flags = f"--batch-size {batch}" + (f" with --seq-len {seq_len}" if seq_len else "")
        raise UsageError(f"torchledger {command}: error: {flags}: the step's largest tensor would hold {elements:,} "
                         "elements, more than the 2**60 that torch's int64 sizes address at 8 bytes an element")


def _spec_and_seq_len(args: argparse.Namespace, command: str) -> tuple[ModelSpec, int]:
    """The transformer spec and sequence length of a command, checked against the model's context and torch's sizes."""
    spec = resolve_spec(args)
    seq_len = _checked_seq_len(spec, args.seq_len, command)
    _check_sizes(command, args.batch_size, seq_len, _largest_tensor(spec, args.batch_size, seq_len))
    return spec, seq_len


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="torchledger", description="What a PyTorch model costs, predicted and measured.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    est = sub.add_parser(
        "estimate",
        help="predict FLOPs and memory of a training step from shapes alone",
        description="Predict the FLOPs and memory of one optimizer step from the model's shapes (no torch needed).",
    )
    add_model_arguments(est)
    add_step_arguments(est, list(RECIPES))
    est.add_argument("--world-size", type=_positive_int, default=None, help="data-parallel ranks (default 1)")
    est.add_argument("--sharding", choices=list(SHARDINGS), default=None,
                     help="how model states are split across ranks (default ddp; needs --world-size)")
    est.add_argument("--shard-group-size", type=_positive_int, default=None, metavar="RANKS",
                     help="--sharding hsdp: ranks per shard group (e.g. GPUs per node); shards within a group, "
                     "replicates across groups")
    est.add_argument("--interconnect", choices=list(INTERCONNECTS), default=None,
                     help="also time each collective per step on this link (alpha-beta model)")
    est.add_argument("--inter-node", choices=list(INTERCONNECTS), default=None,
                     help="--sharding hsdp: the link of the all-reduce across shard groups (default --interconnect)")
    est.add_argument("--optimizer-impl", choices=list(OPTIMIZER_IMPLS), default="foreach",
                     help="optimizer implementation (default foreach; fused keeps no temporaries)")
    est.add_argument("--device", choices=["cuda", "cpu"], default="cuda",
                     help="the device whose allocation behaviour the peak includes (default cuda)")
    est.add_argument("--gpu", type=_gpu_name, default=None, metavar="NAME",
                     help="also say whether the step fits this GPU of the hardware table, less the CUDA context and "
                     f"cuBLAS workspaces, and the largest micro-batch that does: {', '.join(device_names())}")
    est.add_argument("--calibration", metavar="PATH", default=None,
                     help="with --gpu (or alone): predict the step time from this machine's benchmark runs "
                     "(a results/<device>/ folder) instead of the GPU's datasheet peaks")
    est.add_argument("--attention", type=_attention_flag, default="dense", metavar="CONVENTION",
                     help=_ATTENTION_HELP)
    est.add_argument("--json", action="store_true", help="print one JSON object instead of a table")

    add_plan_parser(sub)
    cnt = sub.add_parser(
        "count",
        help="count FLOPs of the model with hooks, the dispatcher and the profiler, beside the formula",
        description="Build the model on the meta device (no weights allocated), run it once, and print each "
        "counter's FLOPs beside the formula's.",
    )
    add_model_arguments(cnt)
    cnt.add_argument("--backward", action="store_true", help="count forward + backward (default: forward)")
    cnt.add_argument("--attention", type=_attention_flag, default="dense", metavar="CONVENTION",
                     help=_ATTENTION_HELP + "; the counters always see what the kernels run (dense)")
    cnt.add_argument(
        "--profiler", action="store_true",
        help="also count with torch.profiler (a pass of its own, about 1.4x the cost of the others)",
    )
    cnt.add_argument("--json", action="store_true", help="print one JSON object instead of a table")

    mea = sub.add_parser(
        "measure",
        help="run one training step and print its measured peak memory beside the prediction",
        description="Run one steady-state training step (after warm-up steps that create the optimizer state) and "
        "print the measured peak memory "
        "beside the predicted one. --model also takes the reference workloads 'mlp' and 'cnn'. Exit status: 0 "
        "measured, 1 out of memory (refused before running when the predicted peak exceeds the free memory), 2 bad "
        f"usage. --grad-accum is at most {MEASURE_MAX_GRAD_ACCUM} (every micro-batch runs).",
    )
    add_model_arguments(mea)
    add_step_arguments(mea, [r for r in RECIPES if "master" not in r])
    mea.add_argument("--optimizer-impl", choices=list(OPTIMIZER_IMPLS), default=None,
                     help="optimizer implementation (default foreach)")
    mea.add_argument("--clip-grad-norm", type=_positive_float, default=None, help="clip gradients to this norm")
    mea.add_argument("--device", choices=["cpu", "cuda"], default=None,
                     help="default: cuda when available, else cpu")
    mea.add_argument("--inference", action="store_true",
                     help="measure a forward-only prefill that fills a KV cache instead of a training step "
                     "(32-true, 16-true or bf16-true)")
    mea.add_argument("--simulate", action="store_true",
                     help="measure under FakeTensorMode instead: nothing is allocated, any size runs")
    mea.add_argument("--world-size", type=_positive_int, default=None,
                     help="--simulate: one rank of a job of this many ranks (a fake process group)")
    mea.add_argument("--sharding", choices=list(SIMULATED_SHARDINGS), default=None,
                     help="--simulate --world-size: PyTorch's DDP (ddp) or FSDP2 (fully_shard) as this sharding")
    mea.add_argument("--shard-group-size", type=_positive_int, default=None, metavar="RANKS",
                     help="--sharding hsdp: ranks per shard group")
    mea.add_argument("--snapshot", metavar="FILE", default=None,
                     help="also write the step's memory history to FILE, a pickle that PyTorch's memory_viz opens "
                     "(the allocator's history on CUDA, the storage tracker's on the CPU and under --simulate)")
    mea.add_argument("--json", action="store_true", help="print one JSON object instead of a table")

    reg = sub.add_parser(
        "regress",
        help="compare the newest benchmark run of each machine with its history; exit 1 on a regression",
        description="Compare the newest run of each machine under PATH (a storage folder with one folder per "
        "machine, or one machine's folder) with the median of its earlier runs. Files that are not valid runs are "
        "named in a warning and skipped. Exit status: 0 nothing got slower; 1 something got slower beyond threshold "
        "and noise; 2 bad usage (no runs under PATH, too); 3 an I/O failure (standard output cannot be written, "
        "a folder cannot be read) or an internal error; 4 the newest run of a machine's folder (by autosave number) "
        "is not a valid run, so that machine is not judged (1 wins when another machine regressed); 130 "
        "interrupted.",
    )
    reg.add_argument("path", metavar="PATH", nargs="+", help="results folder(s)")
    reg.add_argument("--window", type=_positive_int, default=5, help="earlier runs in the baseline (default 5)")
    reg.add_argument("--threshold", type=_positive_float, default=0.10,
                     help="smallest relative change reported (default 0.10)")
    reg.add_argument("--group-threshold", action="append", default=[], metavar="GROUP=FRACTION",
                     help="a threshold for one benchmark group, e.g. dataloader=0.25 (repeatable)")
    reg.add_argument("--sigmas", type=_positive_float, default=3.0,
                     help="how far beyond the runs' own spread a change must be (default 3)")
    reg.add_argument("--min-history", type=_positive_int, default=3,
                     help="earlier runs a benchmark needs before it is judged (default 3)")

    rep = sub.add_parser(
        "report",
        help="merge the runs of several machines into a Markdown report with figures",
        description="Merge the newest run of each machine under PATH... into DIR/report.md with PNG figures. The "
        "report is built in a new folder beside DIR and renamed onto DIR when whole; on any failure that folder is "
        "removed and nothing else is touched. Exit status: 0 written; 2 bad usage (DIR is a file, a link or a "
        "non-empty folder, or another report took DIR first; no runs under PATH); 3 DIR cannot be written (e.g. a "
        "read-only or full disk) or an internal error; 130 interrupted.",
    )
    rep.add_argument("path", metavar="PATH", nargs="+", help="results folder(s)")
    rep.add_argument("-o", "--output", required=True, metavar="DIR", help="a new (or empty) folder for the report")
    rep.add_argument("--reference", metavar="MACHINE", help="the machine speeds are relative to (default: first)")
    return parser


def _gpu_name(text: str) -> str:
    try:
        return get_device(text).name
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not in the hardware table; choices: {', '.join(device_names())}") from None


def _fit_rows(e: Estimate) -> list[tuple[str, str]]:
    fit = e.fit
    if fit is None:
        return []
    if fit.fits:
        verdict = f"yes: {format_bytes(fit.headroom)} to spare of the {format_bytes(fit.usable)} usable"
    else:
        verdict = f"no: {format_bytes(-fit.headroom)} short of the {format_bytes(fit.usable)} usable"
    largest = f"{fit.max_batch:,}" if fit.max_batch else "none: batch 1 does not fit"
    return [
        ("", ""),
        ("GPU", f"{fit.gpu}, {format_bytes(fit.capacity)} ({fit.capacity_source})"),
        ("reserved", f"{format_bytes(fit.context)} CUDA context, {format_bytes(fit.workspaces)} cuBLAS workspaces"),
        ("fits", verdict),
        ("largest micro-batch", f"{largest} (at {fit.seq_len:,} tokens)"),
    ]


_ATTENTION_HELP = ("how the formula counts attention: dense (default: every score, what SDPA's kernels compute, "
                   "masked or not), causal (halved), window (the pairs of the model's sliding window, exactly) or "
                   "window=N")


def _attention_flag(text: str) -> str:
    """``dense``, ``causal``, ``window`` or ``window=N`` (N a positive integer)."""
    if text in ("dense", "causal", "window"):
        return text
    if text.startswith("window="):
        _positive_int(text.split("=", 1)[1])
        return text
    raise argparse.ArgumentTypeError(f"{text!r} is not one of dense, causal, window, window=N")


def _attention_options(text: str, spec: ModelSpec, command: str) -> tuple[bool, int | None]:
    """(causal, window) for the FLOP formulas; bad usage for ``window`` on a model without a sliding window."""
    if text == "window":
        if spec.sliding_window is None:
            raise UsageError(f"torchledger {command}: error: --attention window: {spec.name} has no sliding_window; "
                             "give --attention window=N")
        return False, spec.sliding_window
    if text.startswith("window="):
        return False, int(text.split("=", 1)[1])
    return text == "causal", None


def _estimate_table(e: Estimate, attention: str = "dense") -> str:
    d = e.to_dict()
    f, m = d["flops"], d["memory"]
    tokens = e.batch * e.seq_len
    rows = [
        ("model", f"{e.spec.name} ({e.spec.family}, {e.spec.n_layers} layers, d_model {e.spec.d_model})"),
        ("parameters", format_count(d["params"])),
        ("step", f"{e.grad_accum} x {e.batch} x {e.seq_len} tokens, {e.precision}, {e.optimizer} "
                 f"({e.optimizer_impl}), checkpointing {e.checkpointing}, on {e.device}"),
        ("", ""),
        ("FLOPs forward (micro-batch)", f"{format_flops(f['forward'])} (attention {attention})"),
        ("FLOPs backward (micro-batch)", format_flops(f["backward"])),
        ("FLOPs recompute (micro-batch)", format_flops(f["recompute"])),
        ("FLOPs per optimizer step", format_flops(f["train_step"])),
        ("FLOPs per training token", format_flops(f["per_token_train"])
         + (" (hardware FLOPs: recompute included)" if f["recompute"] else "")),
        ("", ""),
        ("parameters", format_bytes(m["params"])),
        ("gradients", format_bytes(m["grads"])),
        ("master weights", format_bytes(m["master_params"])),
        ("optimizer state", format_bytes(m["optimizer"])),
        (f"activations ({tokens:,} tokens)", format_bytes(m["activations"])),
        ("peak of the step", f"{format_bytes(m['peak_train'])} (at {m['peak_moment']}"
                             + (f"; as transformers runs {e.implementation.model_type})" if e.implementation else ")")),
        ("KV cache (inference)", format_bytes(m["kv_cache"])),
    ]
    if e.world_size > 1:
        rows[10:10] = [("ranks", f"{e.world_size}, {e.sharding} (memory per rank)")]
        rows += [(f"sent per rank per step: {k}", format_bytes(v)) for k, v in d["communication"].items()]
        seconds = d.get("communication_time", {}).get("seconds", {})
        links = {k: e.inter_node if (k == "all_reduce" and e.sharding == "hsdp" and e.inter_node) else e.interconnect
                 for k in seconds}
        rows += [(f"time per step on {links[k]}: {k}" if k != "total" else "communication per step, no overlap",
                  f"{1e3 * v:.2f} ms") for k, v in seconds.items()]
    # beside the training FLOPs per token (the hardware's: HFU's), the model's (no recompute: MFU's, PaLM App. B)
    rows.insert(rows.index(("FLOPs per optimizer step", format_flops(f["train_step"]))) + 2,
                ("model FLOPs per token (MFU)", format_flops(f["per_token_model"])))
    rows += _fit_rows(e)
    rows += _time_rows(e)
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" if k else "" for k, v in rows)


def _check_sharding_flags(args: argparse.Namespace, command: str) -> None:
    """Bad usage: --sharding without --world-size (a single device has nothing to shard), --shard-group-size
    without --sharding hsdp or not dividing --world-size; then the default sharding."""
    fail = f"torchledger {command}: error:"
    world = args.world_size
    if args.sharding is not None and world is None:
        raise UsageError(f"{fail} --sharding {args.sharding} needs --world-size N (the ranks it shards across)")
    if args.shard_group_size is not None and args.sharding != "hsdp":
        raise UsageError(f"{fail} --shard-group-size {args.shard_group_size} applies to --sharding hsdp only")
    if args.sharding == "hsdp":
        if args.shard_group_size is None:
            raise UsageError(f"{fail} --sharding hsdp needs --shard-group-size (the ranks per shard group)")
        if world % args.shard_group_size:
            raise UsageError(f"{fail} --shard-group-size {args.shard_group_size} must divide --world-size {world}")
    if getattr(args, "interconnect", None) is not None and (world or 1) == 1:
        raise UsageError(f"{fail} --interconnect {args.interconnect} needs --world-size N > 1")
    if getattr(args, "inter_node", None) is not None and (args.sharding != "hsdp" or args.interconnect is None):
        raise UsageError(f"{fail} --inter-node {args.inter_node} applies to --sharding hsdp with --interconnect")
    if command == "estimate":
        args.sharding = args.sharding or "ddp"
        args.world_size = world or 1


def _run_estimate(args: argparse.Namespace) -> int:
    _fill_step_defaults(args)
    _check_sharding_flags(args, "estimate")
    spec, seq_len = _spec_and_seq_len(args, "estimate")
    params = n_params(spec)
    if args.sharding != "ddp" and args.world_size > params:
        raise UsageError(
            f"torchledger estimate: error: --world-size {args.world_size} exceeds the {params:,} parameters that "
            f"--sharding {args.sharding} splits: some ranks would hold nothing (ddp replicates: any world size)"
        )
    if args.gpu is not None and args.device != "cuda":
        raise UsageError(f"torchledger estimate: error: --device {args.device} with --gpu {args.gpu!r}: sizing for "
                         "a GPU takes the prediction with the cuda terms")
    result = estimate(
        spec,
        args.batch_size,
        seq_len,
        precision=args.precision,
        optimizer=args.optimizer,
        checkpointing=args.checkpointing,
        grad_accum=args.grad_accum,
        world_size=args.world_size,
        sharding=args.sharding,
        optimizer_impl=args.optimizer_impl,
        device=args.device,
        gpu=args.gpu,
        shard_group_size=args.shard_group_size,
        interconnect=args.interconnect,
        implementation=_hf_profile(args, "estimate"),
        inter_node=args.inter_node,
    )
    causal, window = _attention_options(args.attention, spec, "estimate")
    attention = attention_convention(causal, window)
    if attention != "dense":
        from dataclasses import replace

        from torchledger.formulas.flops import model_flops

        result = replace(result, flops=model_flops(spec, args.batch_size, seq_len, checkpointing=args.checkpointing,
                                                   causal=causal, window=window))
    if args.gpu is not None or args.calibration is not None:
        result = _with_time(result, args.gpu, args.calibration)
    print(json.dumps({**result.to_dict(), "attention": attention}) if args.json
          else _estimate_table(result, attention))
    return 0


def _calibration(gpu: str | None, path: str | None, command: str) -> Any:
    """The calibration of ``--calibration PATH``, else the datasheet one of ``--gpu``; bad usage (naming
    ``command``) when unreadable."""
    from torchledger.formulas.steptime import datasheet_calibration

    if path is None:
        return datasheet_calibration(get_device(str(gpu)))
    from torchledger.reporting.calibration import read_calibration

    try:
        return read_calibration(path)
    except ValueError as exc:
        raise UsageError(f"torchledger {command}: error: --calibration {path}: {exc}") from None


def _with_time(e: Estimate, gpu: str | None, path: str | None) -> Estimate:
    from dataclasses import replace

    from torchledger.formulas.planner import compute_dtype, estimate_time

    cal = _calibration(gpu, path, "estimate")
    dtype = compute_dtype(e.precision)
    if dtype not in cal.matmul:  # bf16 on a T4: the fit stands, the time is not predicted
        print(f"torchledger estimate: warning: no step time: {cal.device} has no {dtype} matmul path "
              f"(--precision {e.precision})", file=sys.stderr)
        return e
    return replace(e, time=estimate_time(e, cal.for_model(e.spec.name, e.precision)))


def _time_rows(e: Estimate) -> list[tuple[str, str]]:
    t = e.time
    if t is None:
        return []
    rows = [("", ""), ("step time (predicted)", f"{t.step_s * 1e3:,.1f} ms on {t.calibration}"),
            ("tokens/s (predicted)", f"{t.tokens_per_s:,.0f}")]
    if t.mfu is not None and t.hfu is not None:
        rows.append(("MFU / HFU (predicted)", f"{t.mfu:.1%} model FLOPs / {t.hfu:.1%} hardware FLOPs"))
    for name, phase in t.phases.items():
        if phase.seconds:
            rows.append((f"  {name}", f"{phase.seconds * 1e3:,.1f} ms, {phase.bound}-bound"))
    return rows


def add_plan_parser(sub: Any) -> None:
    """``torchledger plan``: the fastest configurations that fit."""
    pl = sub.add_parser("plan", help="rank the training configurations that fit by predicted tokens/s",
                        description="Enumerate micro-batch, accumulation, checkpointing, sharding and precision; "
                        "drop what does not fit the GPU; rank the rest by predicted tokens/s.")
    add_model_source(pl)
    pl.add_argument("--gpu", type=_gpu_name, required=True, metavar="NAME", help=", ".join(device_names()))
    pl.add_argument("--gpus", type=_positive_int, required=True, help="data-parallel ranks (GPUs)")
    pl.add_argument("--global-batch-tokens", type=_positive_int, required=True,
                    help="tokens per optimizer step over all GPUs (a multiple of --seq-len x --gpus)")
    pl.add_argument("--seq-len", type=_positive_int, default=None, help="tokens per sequence (default: context)")
    pl.add_argument("--calibration", metavar="PATH", default=None, help="a results/<device>/ folder to time from")
    pl.add_argument("--link-gbps", type=_positive_float, default=None,
                    help="GB/s each GPU sends to the others (default 50: one 400 Gb/s InfiniBand port per GPU)")
    pl.add_argument("--gpus-per-node", type=_positive_int, default=None,
                    help="GPUs on one node (default 8): collectives among them use --intra-node-gbps; hsdp is tried "
                    "with every power-of-two shard group below --gpus that divides it")
    pl.add_argument("--intra-node-gbps", type=_positive_float, default=None,
                    help="GB/s each GPU sends within a node (e.g. 450 on NVLink 4; default: --link-gbps)")
    pl.add_argument("--top", type=_positive_int, default=5, help="configurations to print (default 5)")
    pl.add_argument("--json", action="store_true", help="print one JSON object instead of a table")


def _run_plan(args: argparse.Namespace) -> int:
    from torchledger.formulas.planner import DEFAULT_GPUS_PER_NODE, DEFAULT_LINK_BANDWIDTH, plan

    try:  # the reference transformer of the preset or of the config's shapes, as estimate takes it
        spec = resolve_spec(args)
    except ValueError as exc:
        flag = "--model" if args.model is not None else f"--hf-config {args.hf_config}"
        raise UsageError(f"torchledger plan: error: {flag}: {exc}") from None
    seq_len = _checked_seq_len(spec, args.seq_len, "plan")
    if args.global_batch_tokens % (seq_len * args.gpus):
        raise UsageError(f"torchledger plan: error: --global-batch-tokens {args.global_batch_tokens} is not a "
                         f"multiple of --seq-len x --gpus = {seq_len} x {args.gpus} = {seq_len * args.gpus}")
    cal = _calibration(args.gpu, args.calibration, "plan")
    if cal.kind != "cuda":
        raise UsageError(f"torchledger plan: error: --calibration {args.calibration}: the runs of a CPU "
                         f"({cal.device}) cannot time steps on --gpu {args.gpu}")
    link = DEFAULT_LINK_BANDWIDTH if args.link_gbps is None else args.link_gbps * 1e9
    intra = None if args.intra_node_gbps is None else args.intra_node_gbps * 1e9
    found, tried = plan(spec, args.gpu, args.gpus, args.global_batch_tokens, seq_len, calibration=cal,
                        link_bandwidth=link, top=args.top, gpus_per_node=args.gpus_per_node or DEFAULT_GPUS_PER_NODE,
                        intra_node_bandwidth=intra)
    if args.json:
        print(json.dumps({"model": spec.name, "gpu": args.gpu, "gpus": args.gpus,
                          "global_batch_tokens": args.global_batch_tokens, "seq_len": seq_len,
                          "tried": tried, "calibration": cal.source,
                          "configurations": [p.to_dict() for p in found]}))
        return 0
    print(f"{spec.name} on {args.gpus} x {args.gpu}, {args.global_batch_tokens:,} tokens per step at {seq_len:,} "
          f"tokens per sequence; {tried} configurations tried; timed from {cal.source}")
    if not found:
        print("none fits")
    for i, p in enumerate(found, 1):
        e, t = p.estimate, p.time
        phases = ", ".join(f"{k} {v.seconds:.3g} s ({v.bound})" for k, v in t.phases.items() if v.seconds)
        mfu = f", MFU {t.mfu:.1%}" if t.mfu is not None else ""
        groups = f" (shard groups of {e.shard_group_size})" if e.shard_group_size else ""
        print(f"{i}. {e.precision}, {e.sharding}{groups}, checkpointing {e.checkpointing}, micro-batch {e.batch} x "
              f"{e.grad_accum} accumulated: {p.tokens_per_s:,.0f} tokens/s, step {t.step_s:.3g} s{mfu}\n"
              f"   memory per GPU {format_bytes(e.peak_per_rank)} of {format_bytes(p.fit.usable)} usable "
              f"(peak in {max(e.phases_per_rank, key=lambda k: e.phases_per_rank[k])}); time: {phases}")
    return 0


_COUNT_SEQ_LEN_FALLBACK = 128


def _run_count(args: argparse.Namespace) -> int:
    from torchledger.counting.model_count import count_model, load_hf_spec

    errors: list[str] = []
    hf = _implementation(args, "count") == "hf"  # without transformers: the formula, and one line naming the extra
    if args.model is not None:
        spec: ModelSpec | None = get_preset(args.model)
    else:
        spec, reason = load_hf_spec(args.hf_config)  # an unusable file: ValueError, one line, exit 2
        if reason:
            errors.append(f"no formula: {reason}")
    if spec is not None:
        seq_len = _checked_seq_len(spec, args.seq_len, "count")
        elements = _largest_tensor(spec, args.batch_size, seq_len)
    else:
        seq_len = args.seq_len or _COUNT_SEQ_LEN_FALLBACK
        elements = args.batch_size * seq_len  # the token ids: the model's own widths are not known here
    _check_sizes("count", args.batch_size, seq_len, elements)
    if spec is None and not hf:
        raise UsageError(f"torchledger count: error: --implementation reference: {errors[0]}")
    report = count_model(spec, args.batch_size, seq_len, backward=args.backward, profiler=args.profiler,
                         hf_config=args.hf_config if hf else None)
    report.errors[:0] = errors
    attention = "dense"
    if spec is not None:
        causal, window = _attention_options(args.attention, spec, "count")
        attention = attention_convention(causal, window)
        if attention != "dense" and report.formula is not None:
            from torchledger.formulas.flops import model_flops

            flops = model_flops(spec, args.batch_size, seq_len, causal=causal, window=window)
            report.formula = flops.train if args.backward else flops.forward
    if args.json:
        print(json.dumps({**report.to_dict(), "attention": attention}))
    else:
        name = spec.name if spec else args.hf_config
        phase = "forward + backward" if args.backward else "forward"
        print(f"{name} on the meta device, {args.batch_size} x {seq_len} tokens, {phase} (FLOPs; the formula "
              f"counts attention {attention})")
        rows = [("formula", report.formula)] + [(c, report.figure(c)) for c in ("hooks", "dispatch", "profiler")]
        for label, value in rows:
            if value is None:
                why = "not run (add --profiler)" if label == "profiler" and not args.profiler else "n/a"
                print(f"  {label:<9} {why}")
                continue
            same = "  = formula" if label != "formula" and value == report.formula else ""
            note = " (matmul ops only)" if label == "profiler" else ""
            print(f"  {label:<9} {format_flops(value):>14}  {value:>22,}{same}{note}")
    for error in report.errors:
        print(f"torchledger count: error: {error}", file=sys.stderr)
    return EXIT_USAGE if report.errors else 0


EXIT_FAILURE = 1
MEASURE_MAX_GRAD_ACCUM = 1024  # measure runs every micro-batch of the step (estimate, being arithmetic, takes any)
_TRAINING_FLAGS = (("--optimizer", "optimizer"), ("--optimizer-impl", "optimizer_impl"),
                   ("--checkpointing", "checkpointing"), ("--grad-accum", "grad_accum"),
                   ("--clip-grad-norm", "clip_grad_norm"))
# What the CPU allocator's RuntimeError says when it cannot allocate (Linux/macOS, Windows)
_CPU_OUT_OF_MEMORY = ("DefaultCPUAllocator: can't allocate memory", "DefaultCPUAllocator: not enough memory")


def _check_measure_flags(args: argparse.Namespace) -> None:
    """Bad usage for a flag the measurement would ignore, an unknown workload, or --grad-accum above the maximum;
    then the defaults of the flags left out."""
    fail = "torchledger measure: error:"
    if args.inference:
        for flag, dest in _TRAINING_FLAGS:
            if getattr(args, dest) is not None:
                raise UsageError(f"{fail} {flag} {getattr(args, dest)} does not apply to --inference (a forward-only "
                                 "prefill: no backward, no optimizer step)")
    if args.simulate and args.device is not None:
        raise UsageError(f"{fail} --device {args.device} does not apply to --simulate, which allocates on no device")
    if args.model is not None and args.model not in (*REFERENCE_WORKLOADS, *PRESETS):
        raise UsageError(f"{fail} --model {args.model!r} is not a workload; choose one of "
                         f"{', '.join((*REFERENCE_WORKLOADS, *PRESETS))}")
    if args.model in REFERENCE_WORKLOADS and args.seq_len is not None:
        raise UsageError(f"{fail} --seq-len {args.seq_len} does not apply to --model {args.model}, which takes no "
                         "sequence")
    if args.grad_accum is not None and args.grad_accum > MEASURE_MAX_GRAD_ACCUM:
        raise UsageError(f"{fail} --grad-accum {args.grad_accum} exceeds {MEASURE_MAX_GRAD_ACCUM}, the most "
                         "micro-batches measure runs in one step (estimate takes any)")
    _fill_step_defaults(args)
    if args.optimizer_impl is None:
        args.optimizer_impl = "foreach"


def _free_bytes(device: str) -> int:
    """Memory free on ``device``: the CUDA driver's figure, or the memory the operating system has available."""
    if device == "cuda":
        import torch

        torch.cuda.empty_cache()
        return int(torch.cuda.mem_get_info()[0])
    import psutil

    return int(psutil.virtual_memory().available)


def _out_of_memory(device: str, peak: int, free: int, *, before: bool = False) -> int:
    """Report out of memory, a result (exit status 1): the prediction, the free memory and the shortfall."""
    when = " (not run: the predicted peak exceeds the free memory)" if before else ""
    print(f"torchledger measure: out of memory on {device}: predicted peak {format_bytes(peak)}, "
          f"free {format_bytes(free)}, short by {format_bytes(max(peak - free, 0))}{when}", file=sys.stderr)
    return EXIT_FAILURE


def _run_measure(args: argparse.Namespace) -> int:
    import torch

    from torchledger.formulas.timeline_hf import HF_MODEL_TYPES
    from torchledger.measuring import training
    from torchledger.measuring.memory import ALLOCATOR_OVERHEAD, MemoryMeasurement
    from torchledger.measuring.training import MemoryCase, relative_error
    from torchledger.workloads.train_step import TrainConfig

    _check_measure_flags(args)
    if args.world_size is not None or args.sharding is not None or args.shard_group_size is not None:
        return _run_measure_sharded(args)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise UsageError("torchledger measure: error: --device cuda: no CUDA GPU is available here")
    config = TrainConfig(args.precision, args.optimizer, args.optimizer_impl, args.checkpointing, args.grad_accum,
                         args.clip_grad_norm)
    if args.model in REFERENCE_WORKLOADS:
        case = MemoryCase(args.model, args.batch_size, config)
        width = max(case.mlp.dims) if args.model == "mlp" else (
            9 * max(case.cnn.in_channels, *case.cnn.channels) * case.cnn.image_size**2)  # a convolution's im2col
        _check_sizes("measure", args.batch_size, None, args.batch_size * width)
    else:
        spec, seq_len = _spec_and_seq_len(args, "measure")
        hf = _implementation(args, "measure") == "hf"
        if hf:
            _require_transformers("measure")
            if args.inference:
                raise UsageError("torchledger measure: error: --inference measures the reference transformer's "
                                 "prefill; pass --implementation reference")
        case = MemoryCase(spec.name, args.batch_size, config, seq_len=seq_len, spec=spec,
                          hf_config=args.hf_config if hf else None)
    snapshot = None
    if args.snapshot is not None:
        from torchledger.measuring.snapshot import check_snapshot_path

        snapshot = check_snapshot_path(args.snapshot)  # a bad path: one line, exit 2, before any work
    terms = "cuda" if device == "cuda" and not args.simulate else "cpu"  # --simulate runs the CPU's kernels
    predicted: Any = training.predict_inference(case) if args.inference else case.predict(terms)
    where = "simulated (FakeTensorMode, the CPU's kernels)" if args.simulate else device
    if args.simulate:
        run = (training.simulate_inference if args.inference else training.simulate)
        measure_it: Callable[[], MemoryMeasurement] = lambda: run(case, snapshot=snapshot)  # noqa: E731
    else:
        free = _free_bytes(device)
        if predicted.peak > free:  # refuse before allocating anything
            return _out_of_memory(device, predicted.peak, free, before=True)
        run_on = training.measure_inference if args.inference else training.measure
        measure_it = lambda: run_on(case, device, snapshot=snapshot)  # noqa: E731
    try:
        measured = measure_it()
    except (RuntimeError, TypeError) as exc:  # out of memory, or e.g. a recipe this build cannot run on this device
        out_of_memory = isinstance(exc, torch.OutOfMemoryError) or any(m in str(exc) for m in _CPU_OUT_OF_MEMORY)
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    else:
        out_of_memory, first = False, ""
    if out_of_memory:  # outside the handler: the failed step's frames, and what they hold, are released by now
        return _out_of_memory(device, predicted.peak, _free_bytes(device))
    if first:
        raise UsageError(f"torchledger measure: error: {args.precision} on {device}: {first}")
    if measured.routing is not None and not args.simulate:  # a Mixture of Experts routes by the data: predict the
        # step from the routing it took (a simulation routes as if balanced, as the prediction does without it)
        predicted = training.predict_inference(case, measured.routing) if args.inference else \
            case.predict(terms, measured.routing)
    error_pct = 100 * relative_error(predicted.peak, measured.peak)
    pred_cats = dict(predicted.breakdown())
    if ALLOCATOR_OVERHEAD in measured.by_category:
        pred_cats[ALLOCATOR_OVERHEAD] = 0  # the prediction's 512-byte rounding is inside its categories
    moment = getattr(predicted, "moment", "the last block's MLP, every cache filled")
    result: dict[str, Any] = {
        "device": "simulated" if args.simulate else device,
        # the model measured: transformers' model of --hf-config ("hf") or the project's transformer ("reference");
        # the walk predicted: "hf:<model_type>" (formulas.timeline_hf) or "reference"
        "implementation": "hf" if case.hf_config is not None else "reference",
        "profile": _profile_name(case.hf_config),
        "measured": {"peak": measured.peak, "by_category": measured.by_category,
                     "reserved_peak": measured.reserved_peak, "outside_allocator": measured.outside_allocator,
                     "tracked_peak": measured.tracked_peak, "library_workspaces": measured.library_workspaces,
                     "peak_op": measured.peak_op},
        "predicted": {"peak": predicted.peak, "by_category": pred_cats, "moment": moment},
        "error_pct": error_pct,
    }
    if measured.routing is not None:
        result["measured"]["routing"] = measured.routing
    if snapshot is not None:
        result["snapshot"] = str(snapshot)
    if not args.inference:
        result["predicted"].update({"phase": predicted.phase, "phases": predicted.phases})
    if args.json:
        print(json.dumps(result))
        return 0
    if args.inference:
        print(f"{case.workload}, prefill of {case.batch} x {case.seq_len} tokens with a KV cache, {args.precision}, "
              f"on {where}")
    else:
        built = " (transformers' model)" if case.hf_config is not None else ""
        print(f"{case.workload}{built}, batch {case.batch}, {args.precision}, {args.optimizer} "
              f"({args.optimizer_impl}), checkpointing {args.checkpointing}, grad-accum {args.grad_accum}, on {where}")
        if case.hf_config is not None and result["profile"] == "reference":
            print("  predicted by the reference transformer's walk: no implementation profile for this model "
                  f"(profiles: {', '.join(HF_MODEL_TYPES)})")
    width = max(len(c) for c in [*measured.by_category, *pred_cats, "peak"])
    print(f"  {'':<{width}} {'measured':>12} {'predicted':>12}")
    for cat in dict.fromkeys([*measured.by_category, *pred_cats]):
        got, want = measured.by_category.get(cat), pred_cats.get(cat)
        print(f"  {cat:<{width}} {format_bytes(got) if got is not None else '-':>12} "
              f"{format_bytes(want) if want is not None else '-':>12}")
    print(f"  {'peak':<{width}} {format_bytes(measured.peak):>12} {format_bytes(predicted.peak):>12}"
          f"  ({error_pct:.2f}% apart; predicted at {moment})")
    if measured.routing is not None:
        how = "as if balanced" if args.simulate else "the rows each expert received in the measured step"
        print(f"  routing: {how} (per block: {', '.join('/'.join(map(str, b)) for b in measured.routing)})")
    if snapshot is not None:
        print(f"  memory history written to {snapshot} (open it in https://pytorch.org/memory_viz)")
    return 0


def _run_measure_sharded(args: argparse.Namespace) -> int:
    """``measure --simulate --world-size N --sharding S``: one rank of the job, simulated, beside the estimate."""
    from torchledger.formulas.distributed import collective_payloads
    from torchledger.formulas.estimate import estimate
    from torchledger.formulas.specs import param_counts
    from torchledger.measuring.distributed import simulate_sharded
    from torchledger.measuring.training import MemoryCase, relative_error
    from torchledger.workloads.train_step import TrainConfig

    fail = "torchledger measure: error:"
    if not args.simulate:
        raise UsageError(f"{fail} --world-size and --sharding measure one simulated rank: add --simulate")
    if args.world_size is None or args.sharding is None:
        raise UsageError(f"{fail} --simulate of a sharded job takes both --world-size N and --sharding S")
    if args.world_size < 2:  # one rank shards and reduces nothing, while DDP still builds its buckets
        raise UsageError(f"{fail} --world-size {args.world_size}: a sharded simulation needs 2 ranks or more "
                         "(one rank is --simulate without --world-size and --sharding)")
    _check_sharding_flags(args, "measure")
    if args.inference or args.snapshot or args.model in REFERENCE_WORKLOADS:
        raise UsageError(f"{fail} a sharded simulation trains a transformer preset (no --inference, --snapshot, "
                         "mlp or cnn)")
    if args.precision == "16-mixed" or args.clip_grad_norm is not None:
        raise UsageError(f"{fail} --precision 16-mixed and --clip-grad-norm cannot be simulated sharded (they read "
                         "values)")
    spec, seq_len = _spec_and_seq_len(args, "measure")
    config = TrainConfig(args.precision, args.optimizer, args.optimizer_impl, args.checkpointing, args.grad_accum)
    case = MemoryCase(spec.name, args.batch_size, config, seq_len=seq_len, spec=spec)
    predicted = estimate(spec, args.batch_size, seq_len, precision=args.precision, optimizer=args.optimizer,
                         checkpointing=args.checkpointing, grad_accum=args.grad_accum, world_size=args.world_size,
                         sharding=args.sharding, optimizer_impl=args.optimizer_impl, device="cpu",
                         shard_group_size=args.shard_group_size)
    measured = simulate_sharded(case, world_size=args.world_size, sharding=args.sharding,
                                shard_group_size=args.shard_group_size)
    n = n_params(spec)
    counts = param_counts(spec)
    formula = collective_payloads(n, recipe=args.precision, world_size=args.world_size, sharding=args.sharding,
                                  root_params=n - counts.layers, shard_group_size=args.shard_group_size)
    formula = {k: v * args.grad_accum for k, v in formula.items()}  # FSDP gathers and reduces per micro-batch
    peak = predicted.peak_per_rank
    error_pct = 100 * relative_error(peak, measured.memory.peak)
    result = {
        "device": "simulated", "world_size": args.world_size, "sharding": args.sharding,
        "shard_group_size": args.shard_group_size,
        "measured": {"peak": measured.memory.peak, "by_category": measured.memory.by_category,
                     "peak_op": measured.memory.peak_op, "collective_payload": measured.collective_payload,
                     "collective_calls": measured.collective_calls},
        "predicted": {"peak": peak, "phases": predicted.phases_per_rank,
                      "moment": predicted.rank_peak.moment if predicted.rank_peak else "",
                      "collective_payload": formula},
        "error_pct": error_pct,
    }
    if args.json:
        print(json.dumps(result))
        return 0
    print(f"{spec.name}, batch {args.batch_size} x {seq_len} per rank, {args.precision}, checkpointing "
          f"{args.checkpointing}: rank 0 of {args.world_size}, {args.sharding}, simulated (FakeTensorMode, fake "
          "process group)")
    print(f"  peak {format_bytes(measured.memory.peak)} measured, {format_bytes(peak)} predicted "
          f"({error_pct:.2f}% apart; predicted at {result['predicted']['moment']})")
    for name in dict.fromkeys([*measured.collective_payload, *formula]):
        got, want = measured.collective_payload.get(name, 0), formula.get(name, 0)
        print(f"  {name:<15} {format_bytes(got):>12} handed to the collective, formula {format_bytes(want)}")
    return 0


EXIT_REGRESSION = 1  # regress: something got slower
EXIT_ERROR = 3  # regress, report: an I/O failure or an internal error, never read as "slower"
EXIT_UNJUDGED = 4  # regress: the newest run of a machine is not a valid run
EXIT_INTERRUPTED = 130


class CommandFailed(Exception):
    """A command that could not finish: its one-line message and its exit status."""

    def __init__(self, message: str, status: int) -> None:
        super().__init__(message)
        self.status = status


def _stdout_failed(command: str, what: str, exc: OSError) -> CommandFailed:
    """After a write to stdout failed: send what is left of it to the null device (so that the interpreter's own
    flush at exit cannot fail again) and describe the failure."""
    import os

    try:
        fd = sys.stdout.fileno()
        null = os.open(os.devnull, os.O_WRONLY)
        try:
            os.dup2(null, fd)
        finally:
            os.close(null)
    except (AttributeError, OSError, ValueError):
        pass
    return CommandFailed(f"torchledger {command}: error: {what} ({exc.strerror or exc})", EXIT_ERROR)


def _load_history(paths: list[str]) -> Any:
    """The runs under ``paths`` (results.Runs), every file left out named in a warning line on stderr."""
    from torchledger.reporting.results import read_runs, skipped_data_as_lines

    with skipped_data_as_lines("torchledger: warning: ", sys.stderr):
        found = read_runs(paths)
    if not found.by_machine and not found.broken_newest:
        raise UsageError(f"torchledger: error: no benchmark runs under {', '.join(paths)}")
    return found


def _run_regress(args: argparse.Namespace) -> int:
    import math

    from torchledger.reporting.regression import compare_history, markdown

    groups: dict[str, float] = {}
    for item in args.group_threshold:
        name, sep, value = item.rpartition("=")
        try:
            fraction = float(value)
        except ValueError:
            fraction = math.nan
        if not sep or not name.strip() or not (math.isfinite(fraction) and fraction > 0):
            raise UsageError(f"torchledger regress: error: --group-threshold {item!r}: expected GROUP=FRACTION with "
                             "a finite FRACTION > 0")
        groups[name] = fraction
    found = _load_history(args.path)
    unjudged: dict[str, str] = {}
    for broken in found.broken_newest:
        machines = ", ".join(broken.machines)
        print(f"torchledger regress: error: {broken.reason}; it is the newest run of its folder, so {machines} is "
              "not judged", file=sys.stderr)
        for machine in broken.machines:
            unjudged[machine] = f"its newest run {broken.path} is not a valid run"
    comparisons = [compare_history(h, window=args.window, threshold=args.threshold, group_thresholds=groups,
                                   sigmas=args.sigmas, min_history=args.min_history)
                   for machine, h in sorted(found.by_machine.items()) if machine not in unjudged]
    text = markdown(comparisons, unjudged)
    try:
        sys.stdout.write(text + "\n")
        sys.stdout.flush()
    except OSError as exc:
        raise _stdout_failed("regress", "cannot write the summary to standard output", exc) from None
    if any(c.regressions for c in comparisons):
        return EXIT_REGRESSION
    return EXIT_UNJUDGED if unjudged else 0


def _run_report(args: argparse.Namespace) -> int:
    from pathlib import Path

    from torchledger.reporting.report import build_report
    from torchledger.reporting.results import skipped_data_as_lines

    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise UsageError(
            "torchledger report: error: the figures need matplotlib (pip install 'torchledger[plots]')"
        ) from None
    found = _load_history(args.path)
    for broken in found.broken_newest:
        print(f"torchledger: warning: skipped {broken.reason}; it is the newest file of its folder: the report "
              f"shows the newest valid run of {', '.join(broken.machines)}, if any", file=sys.stderr)
    if not found.by_machine:
        raise UsageError(f"torchledger: error: no benchmark runs under {', '.join(args.path)}")
    try:
        with skipped_data_as_lines("torchledger: warning: ", sys.stderr):
            page = build_report(found.by_machine, Path(args.output), reference=args.reference)
    except ValueError as exc:
        raise UsageError(f"torchledger report: error: {exc}") from None
    except OSError as exc:
        raise CommandFailed(f"torchledger report: error: -o {args.output}: the report cannot be written there "
                            f"({exc.strerror or exc}); nothing was left behind", EXIT_ERROR) from None
    try:
        print(f"wrote {page}", flush=True)
    except OSError as exc:
        raise _stdout_failed("report", f"the report is written to {page}, but standard output cannot be written",
                                 exc) from None
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; returns the exit status.

    0 ok; 1 a regression (regress) or out of memory (measure); 2 bad usage; 3 an I/O failure (any command whose
    standard output is closed, as by ``| head``) or an internal error (regress, report); 4 the newest run of a
    machine is not a valid run (regress); 130 interrupted. Always one line on stderr at most, no traceback.
    """

    from contextlib import suppress

    def say(line: str) -> None:
        with suppress(OSError, ValueError):  # stderr itself is gone: the status still tells
            print(line, file=sys.stderr, flush=True)

    command = None
    try:
        args = build_parser().parse_args(argv)
        command = args.command
        commands = {"estimate": _run_estimate, "count": _run_count, "measure": _run_measure, "regress": _run_regress,
                    "report": _run_report, "plan": _run_plan}
        return commands[args.command](args)
    except UsageError as exc:
        say(str(exc))
    except ValueError as exc:
        say(f"torchledger: error: {exc}")
    except CommandFailed as exc:
        say(str(exc))
        return exc.status
    except KeyboardInterrupt:
        say(f"torchledger{f' {command}' if command else ''}: interrupted")
        return EXIT_INTERRUPTED
    except BrokenPipeError as exc:  # the reader left (`torchledger estimate ... | head`): nothing more to say
        failed = _stdout_failed(command or "", "standard output was closed", exc)
        say(str(failed))
        return failed.status
    except Exception as exc:
        if command not in ("regress", "report"):
            raise
        text = " ".join(str(exc).split())
        if isinstance(exc, OSError):
            say(f"torchledger {command}: error: {text}")
        else:
            say(f"torchledger {command}: internal error: {type(exc).__name__}: {text[:300]}")
        return EXIT_ERROR
    return EXIT_USAGE


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
