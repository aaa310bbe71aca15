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

from torchledger.formulas.distributed import SHARDINGS
from torchledger.formulas.estimate import Estimate, estimate
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


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """The model flags shared by ``estimate``, ``count`` and ``measure``."""
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--model", metavar="PRESET", help=f"a preset: {', '.join(PRESETS)}")
    source.add_argument("--hf-config", metavar="PATH", help="a Hugging Face config.json (GPT-2, LLaMA, Mistral)")
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
    est.add_argument("--world-size", type=_positive_int, default=1, help="data-parallel ranks (default 1)")
    est.add_argument("--sharding", choices=list(SHARDINGS), default="ddp",
                     help="how model states are split across ranks (default ddp)")
    est.add_argument("--optimizer-impl", choices=list(OPTIMIZER_IMPLS), default="foreach",
                     help="optimizer implementation (default foreach; fused keeps no temporaries)")
    est.add_argument("--device", choices=["cuda", "cpu"], default="cuda",
                     help="the device whose allocation behaviour the peak includes (default cuda)")
    est.add_argument("--gpu", type=_gpu_name, default=None, metavar="NAME",
                     help="also say whether the step fits this GPU of the hardware table, less the CUDA context and "
                     f"cuBLAS workspaces, and the largest micro-batch that does: {', '.join(device_names())}")
    est.add_argument("--json", action="store_true", help="print one JSON object instead of a table")

    cnt = sub.add_parser(
        "count",
        help="count FLOPs of the model with hooks, the dispatcher and the profiler, beside the formula",
        description="Build the model on the meta device (no weights allocated), run it once, and print each "
        "counter's FLOPs beside the formula's.",
    )
    add_model_arguments(cnt)
    cnt.add_argument("--backward", action="store_true", help="count forward + backward (default: forward)")
    cnt.add_argument(
        "--profiler", action="store_true",
        help="also count with torch.profiler (a pass of its own, about 1.4x the cost of the others)",
    )
    cnt.add_argument("--json", action="store_true", help="print one JSON object instead of a table")

    mea = sub.add_parser(
        "measure",
        help="run one training step and print its measured peak memory beside the prediction",
        description="Run one steady-state training step (after a warm-up step) and print the measured peak memory "
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


def _estimate_table(e: Estimate) -> str:
    d = e.to_dict()
    f, m = d["flops"], d["memory"]
    tokens = e.batch * e.seq_len
    rows = [
        ("model", f"{e.spec.name} ({e.spec.family}, {e.spec.n_layers} layers, d_model {e.spec.d_model})"),
        ("parameters", format_count(d["params"])),
        ("step", f"{e.grad_accum} x {e.batch} x {e.seq_len} tokens, {e.precision}, {e.optimizer} "
                 f"({e.optimizer_impl}), checkpointing {e.checkpointing}, on {e.device}"),
        ("", ""),
        ("FLOPs forward (micro-batch)", format_flops(f["forward"])),
        ("FLOPs backward (micro-batch)", format_flops(f["backward"])),
        ("FLOPs recompute (micro-batch)", format_flops(f["recompute"])),
        ("FLOPs per optimizer step", format_flops(f["train_step"])),
        ("FLOPs per training token", format_flops(f["per_token_train"])),
        ("", ""),
        ("parameters", format_bytes(m["params"])),
        ("gradients", format_bytes(m["grads"])),
        ("master weights", format_bytes(m["master_params"])),
        ("optimizer state", format_bytes(m["optimizer"])),
        (f"activations ({tokens:,} tokens)", format_bytes(m["activations"])),
        ("peak of the step", f"{format_bytes(m['peak_train'])} (at {m['peak_moment']})"),
        ("KV cache (inference)", format_bytes(m["kv_cache"])),
    ]
    if e.world_size > 1:
        rows[10:10] = [("ranks", f"{e.world_size}, {e.sharding} (memory per rank)")]
        rows += [(f"sent per rank per step: {k}", format_bytes(v)) for k, v in d["communication"].items()]
    rows += _fit_rows(e)
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" if k else "" for k, v in rows)


def _run_estimate(args: argparse.Namespace) -> int:
    _fill_step_defaults(args)
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
    )
    print(json.dumps(result.to_dict()) if args.json else _estimate_table(result))
    return 0


_COUNT_SEQ_LEN_FALLBACK = 128


def _run_count(args: argparse.Namespace) -> int:
    from torchledger.counting.model_count import count_model, load_hf_spec

    errors: list[str] = []
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
    report = count_model(spec, args.batch_size, seq_len, backward=args.backward, profiler=args.profiler,
                         hf_config=args.hf_config)
    report.errors[:0] = errors
    if args.json:
        print(json.dumps(report.to_dict()))
    else:
        name = spec.name if spec else args.hf_config
        phase = "forward + backward" if args.backward else "forward"
        print(f"{name} on the meta device, {args.batch_size} x {seq_len} tokens, {phase} (FLOPs)")
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

    from torchledger.measuring import training
    from torchledger.measuring.memory import ALLOCATOR_OVERHEAD, MemoryMeasurement
    from torchledger.measuring.training import MemoryCase, relative_error
    from torchledger.workloads.train_step import TrainConfig

    _check_measure_flags(args)
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
        case = MemoryCase(spec.name, args.batch_size, config, seq_len=seq_len, spec=spec)
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
    error_pct = 100 * relative_error(predicted.peak, measured.peak)
    pred_cats = dict(predicted.breakdown())
    if ALLOCATOR_OVERHEAD in measured.by_category:
        pred_cats[ALLOCATOR_OVERHEAD] = 0  # the prediction's 512-byte rounding is inside its categories
    moment = getattr(predicted, "moment", "the last block's MLP, every cache filled")
    result: dict[str, Any] = {
        "device": "simulated" if args.simulate else device,
        "measured": {"peak": measured.peak, "by_category": measured.by_category,
                     "reserved_peak": measured.reserved_peak, "outside_allocator": measured.outside_allocator,
                     "tracked_peak": measured.tracked_peak, "library_workspaces": measured.library_workspaces,
                     "peak_op": measured.peak_op},
        "predicted": {"peak": predicted.peak, "by_category": pred_cats, "moment": moment},
        "error_pct": error_pct,
    }
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
        print(f"{case.workload}, batch {case.batch}, {args.precision}, {args.optimizer} ({args.optimizer_impl}), "
              f"checkpointing {args.checkpointing}, grad-accum {args.grad_accum}, on {where}")
    width = max(len(c) for c in [*measured.by_category, *pred_cats, "peak"])
    print(f"  {'':<{width}} {'measured':>12} {'predicted':>12}")
    for cat in dict.fromkeys([*measured.by_category, *pred_cats]):
        got, want = measured.by_category.get(cat), pred_cats.get(cat)
        print(f"  {cat:<{width}} {format_bytes(got) if got is not None else '-':>12} "
              f"{format_bytes(want) if want is not None else '-':>12}")
    print(f"  {'peak':<{width}} {format_bytes(measured.peak):>12} {format_bytes(predicted.peak):>12}"
          f"  ({error_pct:.2f}% apart; predicted at {moment})")
    if snapshot is not None:
        print(f"  memory history written to {snapshot} (open it in https://pytorch.org/memory_viz)")
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
                    "report": _run_report}
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
