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
from torchledger.formulas.estimate import OPTIMIZERS, Estimate, estimate
from torchledger.formulas.memory import RECIPES
from torchledger.formulas.specs import PRESETS, ModelSpec, check_seq_len, get_preset, spec_from_hf_config
from torchledger.reporting.units import format_bytes, format_count, format_flops

EXIT_USAGE = 2


class UsageError(Exception):
    """Bad usage: reported in one line, exit status 2."""


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors (its default prints the whole usage block first)."""

    def error(self, message: str) -> NoReturn:
        raise UsageError(f"{self.prog}: error: {message} (see --help)")


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} must be a positive integer")
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


def add_step_arguments(parser: argparse.ArgumentParser, recipes: list[str]) -> None:
    """The training-step flags shared by ``estimate`` and ``measure``."""
    parser.add_argument("--precision", choices=recipes, default="32-true", help="precision recipe (default 32-true)")
    parser.add_argument("--optimizer", choices=list(OPTIMIZERS), default="adamw", help="optimizer (default adamw)")
    parser.add_argument("--checkpointing", choices=["none", "full"], default="none", help="activation checkpointing")
    parser.add_argument("--grad-accum", type=_positive_int, default=1,
                        help="micro-batches per optimizer step (default 1)")


def resolve_spec(args: argparse.Namespace) -> ModelSpec:
    """The spec named by ``--model`` or read from ``--hf-config``."""
    if args.model is not None:
        return get_preset(args.model)
    return spec_from_hf_config(args.hf_config)


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
        "beside the predicted one. --model also takes the reference workloads 'mlp' and 'cnn'.",
    )
    add_model_arguments(mea)
    add_step_arguments(mea, [r for r in RECIPES if "master" not in r])
    mea.add_argument("--optimizer-impl", choices=["foreach", "for-loop", "fused"], default="foreach",
                     help="optimizer implementation (default foreach)")
    mea.add_argument("--clip-grad-norm", type=_positive_float, default=None, help="clip gradients to this norm")
    mea.add_argument("--device", choices=["cpu", "cuda"], default=None,
                     help="default: cuda when available, else cpu")
    mea.add_argument("--inference", action="store_true",
                     help="measure a forward-only prefill that fills a KV cache instead of a training step "
                     "(32-true, 16-true or bf16-true)")
    mea.add_argument("--simulate", action="store_true",
                     help="measure under FakeTensorMode instead: nothing is allocated, any size runs")
    mea.add_argument("--json", action="store_true", help="print one JSON object instead of a table")

    reg = sub.add_parser(
        "regress",
        help="compare the newest benchmark run of each machine with its history; exit 1 on a regression",
        description="Compare the newest run of each machine under PATH (a storage folder with one folder per "
        "machine, or one machine's folder) with the median of its earlier runs. Exit status: 1 when something got "
        "slower beyond threshold and noise, 0 otherwise, 2 on bad usage.",
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
        description="Merge the newest run of each machine under PATH... into DIR/report.md with PNG figures.",
    )
    rep.add_argument("path", metavar="PATH", nargs="+", help="results folder(s)")
    rep.add_argument("-o", "--output", required=True, metavar="DIR", help="a new (or empty) folder for the report")
    rep.add_argument("--reference", metavar="MACHINE", help="the machine speeds are relative to (default: first)")
    return parser


def _estimate_table(e: Estimate) -> str:
    d = e.to_dict()
    f, m = d["flops"], d["memory"]
    tokens = e.batch * e.seq_len
    rows = [
        ("model", f"{e.spec.name} ({e.spec.family}, {e.spec.n_layers} layers, d_model {e.spec.d_model})"),
        ("parameters", format_count(d["params"])),
        ("step", f"{e.grad_accum} x {e.batch} x {e.seq_len} tokens, {e.precision}, {e.optimizer}, "
                 f"checkpointing {e.checkpointing}"),
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
        ("peak of the step", f"{format_bytes(m['peak_train'])} (in the {m['peak_phase']} phase)"),
        ("KV cache (inference)", format_bytes(m["kv_cache"])),
    ]
    if e.world_size > 1:
        rows[10:10] = [("ranks", f"{e.world_size}, {e.sharding} (memory per rank)")]
        rows += [(f"sent per rank per step: {k}", format_bytes(v)) for k, v in d["communication"].items()]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" if k else "" for k, v in rows)


def _run_estimate(args: argparse.Namespace) -> int:
    spec = resolve_spec(args)
    result = estimate(
        spec,
        args.batch_size,
        args.seq_len or spec.max_seq_len,
        precision=args.precision,
        optimizer=args.optimizer,
        checkpointing=args.checkpointing,
        grad_accum=args.grad_accum,
        world_size=args.world_size,
        sharding=args.sharding,
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
        spec, reason = load_hf_spec(args.hf_config)
        if reason:
            errors.append(f"no formula: {reason}")
    seq_len = args.seq_len or (spec.max_seq_len if spec else _COUNT_SEQ_LEN_FALLBACK)
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


def _run_measure(args: argparse.Namespace) -> int:
    import torch

    from torchledger.measuring import training
    from torchledger.measuring.memory import MemoryMeasurement
    from torchledger.measuring.training import MemoryCase, relative_error
    from torchledger.workloads.train_step import TrainConfig

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise UsageError("torchledger measure: error: --device cuda: no CUDA GPU is available here")
    config = TrainConfig(args.precision, args.optimizer, args.optimizer_impl, args.checkpointing, args.grad_accum,
                         args.clip_grad_norm)
    if args.model in ("mlp", "cnn"):
        case = MemoryCase(args.model, args.batch_size, config)
    else:
        spec = resolve_spec(args)
        seq_len = args.seq_len or spec.max_seq_len
        check_seq_len(spec, seq_len)
        case = MemoryCase(spec.name, args.batch_size, config, seq_len=seq_len, spec=spec)
    predicted: Any = training.predict_inference(case) if args.inference else case.predict()
    where = "simulated" if args.simulate else device
    if args.simulate:
        run = (training.simulate_inference if args.inference else training.simulate)
        measure_it: Callable[[], MemoryMeasurement] = lambda: run(case)  # noqa: E731
    else:
        run_on = training.measure_inference if args.inference else training.measure
        measure_it = lambda: run_on(case, device)  # noqa: E731
    try:
        measured = measure_it()
    except torch.OutOfMemoryError:
        if device == "cuda":
            torch.cuda.empty_cache()
            free = int(torch.cuda.mem_get_info()[0])
        else:
            import psutil

            free = int(psutil.virtual_memory().available)
        print(f"torchledger measure: out of memory on {device}: predicted peak {format_bytes(predicted.peak)}, "
              f"free {format_bytes(free)}, short by {format_bytes(max(predicted.peak - free, 0))}", file=sys.stderr)
        return EXIT_FAILURE
    except (RuntimeError, TypeError) as exc:  # e.g. a recipe this build cannot run on this device
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UsageError(f"torchledger measure: error: {args.precision} on {device}: {first}") from None
    error_pct = 100 * relative_error(predicted.peak, measured.peak)
    result: dict[str, Any] = {
        "device": where,
        "measured": {"peak": measured.peak, "by_category": measured.by_category,
                     "reserved_peak": measured.reserved_peak, "outside_allocator": measured.outside_allocator},
        "predicted": {"peak": predicted.peak, "by_category": predicted.breakdown()},
        "error_pct": error_pct,
    }
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
    print(f"  {'':<12} {'measured':>12} {'predicted':>12}")
    pred_cats = predicted.breakdown()
    for cat in dict.fromkeys([*measured.by_category, *pred_cats]):
        got, want = measured.by_category.get(cat), pred_cats.get(cat)
        print(f"  {cat:<12} {format_bytes(got) if got is not None else '-':>12} "
              f"{format_bytes(want) if want is not None else '-':>12}")
    where_peak = "" if args.inference else f"; predicted in the {predicted.phase} phase"
    print(f"  {'peak':<12} {format_bytes(measured.peak):>12} {format_bytes(predicted.peak):>12}"
          f"  ({error_pct:.2f}% apart{where_peak})")
    return 0


def _load_history(paths: list[str]) -> dict[str, Any]:
    import warnings

    from torchledger.reporting.results import load_runs

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        history = load_runs(paths)
    for w in caught:
        print(f"torchledger: warning: {w.message}", file=sys.stderr)
    if not history:
        raise UsageError(f"torchledger: error: no benchmark runs under {', '.join(paths)}")
    return history


def _run_regress(args: argparse.Namespace) -> int:
    from torchledger.reporting.regression import compare_history, markdown

    groups: dict[str, float] = {}
    for item in args.group_threshold:
        name, _, value = item.partition("=")
        try:
            groups[name] = float(value)
        except ValueError:
            raise UsageError(f"torchledger regress: error: --group-threshold {item!r} is not GROUP=FRACTION") from None
    history = _load_history(args.path)
    comparisons = [compare_history(h, window=args.window, threshold=args.threshold, group_thresholds=groups,
                                   sigmas=args.sigmas, min_history=args.min_history)
                   for _, h in sorted(history.items())]
    print(markdown(comparisons))
    return EXIT_FAILURE if any(c.regressions for c in comparisons) else 0


def _run_report(args: argparse.Namespace) -> int:
    from pathlib import Path

    from torchledger.reporting.report import build_report

    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise UsageError(
            "torchledger report: error: the figures need matplotlib (pip install 'torchledger[plots]')"
        ) from None
    history = _load_history(args.path)
    page = build_report(history, Path(args.output), reference=args.reference)
    print(f"wrote {page}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; returns the exit status (0 ok, 2 bad usage)."""
    try:
        args = build_parser().parse_args(argv)
        commands = {"estimate": _run_estimate, "count": _run_count, "measure": _run_measure, "regress": _run_regress,
                    "report": _run_report}
        return commands[args.command](args)
    except UsageError as exc:
        print(str(exc), file=sys.stderr)
    except ValueError as exc:
        print(f"torchledger: error: {exc}", file=sys.stderr)
    return EXIT_USAGE


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
