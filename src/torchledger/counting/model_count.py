"""Count a whole model on the meta device (no weights allocated): what ``torchledger count`` reports.

The model is a preset's reference transformer, or a Hugging Face model built from its config.json with
transformers (an optional extra). Hooks and the dispatcher share one forward/backward pass; the profiler, when asked
for, gets a pass of its own: nested with a dispatch mode its recording costs more than a second pass does, and even
alone it costs about 1.4x a bare FlopCounterMode pass.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from torchledger.counting.dispatch import count_with_dispatch
from torchledger.counting.hooks import HookCounter
from torchledger.counting.profiler import count_with_profiler
from torchledger.counting.result import FlopCount
from torchledger.formulas.flops import model_flops
from torchledger.formulas.specs import HFConfigError, ModelSpec, check_seq_len, spec_from_hf_config
from torchledger.workloads.models import build_transformer, token_batch


@dataclass
class CountReport:
    """The formula's figure beside each counter's; None where one could not run, with the reason in ``errors``."""

    formula: int | None
    counters: dict[str, FlopCount | None]
    errors: list[str] = field(default_factory=list)
    backward: bool = False

    def figure(self, name: str) -> int | None:
        """A counter's figure in the formula's terms: forward, or forward + backward (profiler: matmul ops)."""
        counted = self.counters.get(name)
        if counted is None:
            return None
        return counted.total if self.backward else counted.forward

    def to_dict(self) -> dict[str, Any]:
        """The ``--json`` contract of ``torchledger count``."""
        dispatch = self.counters.get("dispatch")
        return {
            "backward": self.backward,
            "formula": self.formula,
            "hooks": self.figure("hooks"),
            "dispatch": self.figure("dispatch"),
            "profiler": self.figure("profiler"),
            "int_ops": None if dispatch is None else dispatch.int_ops,
            "by_module": {} if dispatch is None else dict(dispatch.by_module),
            "errors": list(self.errors),
        }


def count_every_way(model: nn.Module, step: Callable[[], Tensor], *, backward: bool, profiler: bool,
                    counters: dict[str, FlopCount | None] | None = None) -> dict[str, FlopCount | None]:
    """Hooks and the dispatcher in one pass of ``step`` (a forward returning the scalar to differentiate), the
    profiler in a pass of its own when asked for (see the module's docstring for why).

    Each figure is written into ``counters`` (a new dict when None) as soon as it is counted, so that a caller
    catching a failure of a later pass keeps what the earlier ones counted."""
    counted: dict[str, FlopCount | None] = (
        {"hooks": None, "dispatch": None, "profiler": None} if counters is None else counters)
    with HookCounter(model, backward=backward) as hooks:
        counted["dispatch"] = count_with_dispatch(model, step, backward=backward)
    counted["hooks"] = hooks.result
    if profiler:
        counted["profiler"] = count_with_profiler(model, step, backward=backward)
    return counted


def _hf_model(path: str | os.PathLike[str]) -> nn.Module:
    """transformers' model of the config.json at ``path`` on the meta device, as :mod:`torchledger.workloads.hf`
    builds it (SDPA attention, dropout off); TransformersMissing (a RuntimeError) without it.

    NB: with its KV cache on: without one, transformers looks for packed sequences in the position ids, a check
    that reads a value, which a meta tensor has not. The cache (its tensors are the keys and values the layers
    compute anyway) adds no FLOP."""
    from torchledger.workloads.hf import build_hf_model, load_config

    return build_hf_model(load_config(path, use_cache=True), device="meta")


def count_model(
    spec: ModelSpec | None,
    batch: int,
    seq_len: int,
    *,
    backward: bool = False,
    profiler: bool = False,
    hf_config: str | os.PathLike[str] | None = None,
) -> CountReport:
    """Build the model on the meta device, run it once (and its backward), and count it every way asked.

    ``spec`` gives the formula (None: no formula, e.g. an architecture the formulas do not describe); the model is
    the reference transformer of ``spec``, or the Hugging Face model of ``hf_config`` when given.
    """
    report = CountReport(formula=None, counters={"hooks": None, "dispatch": None, "profiler": None},
                         backward=backward)
    if spec is not None:
        check_seq_len(spec, seq_len)
        # The meta device runs attention on the math path: no fused kernel, no recomputed scores in the backward.
        flops = model_flops(spec, batch, seq_len)
        report.formula = flops.train if backward else flops.forward
    try:
        model = _hf_model(hf_config) if hf_config is not None else build_transformer(spec, device="meta")  # type: ignore[arg-type]
    except (RuntimeError, ValueError, TypeError, KeyError, OSError) as exc:  # e.g. a config transformers rejects
        report.errors.append(str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__)
        return report
    model.train()
    idx = torch.empty(batch, seq_len, dtype=torch.long, device="meta")
    if spec is not None and hf_config is None:
        idx, targets = token_batch(spec, batch, seq_len, device="meta")

    def step() -> Tensor:
        out = model(idx, targets) if hf_config is None else model(input_ids=idx, labels=idx)
        loss = out[1] if isinstance(out, tuple) else out.loss
        assert isinstance(loss, Tensor)
        return loss

    try:
        count_every_way(model, step, backward=backward, profiler=profiler, counters=report.counters)
    except Exception as exc:  # the model's own code failed on meta tensors: report it, keep what ran
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        report.errors.append(f"the model's forward/backward fails on meta tensors: {type(exc).__name__}: {first}")
    return report


def load_hf_spec(path: str | os.PathLike[str]) -> tuple[ModelSpec | None, str | None]:
    """The formula spec of a config.json, or None and the reason when the formulas do not describe it.

    Raises HFConfigError (a ValueError) when the file itself is unusable: missing, not a regular file, not a JSON
    object, or a field of the wrong type; nothing can be counted then.
    """
    try:
        return spec_from_hf_config(path), None
    except HFConfigError:
        raise
    except ValueError as exc:
        return None, str(exc)
