"""One optimizer step under a precision recipe, with gradient accumulation, checkpointing and gradient clipping.

The loop is the one the lecture notes' training loop and nanoGPT run: for each micro-batch, forward under autocast
(``*-mixed``), scale the loss by 1/k, backward (through a GradScaler for ``16-mixed``); then clip, step and
``zero_grad(set_to_none=True)``. The logits stay referenced until the micro-batch's backward is done, as they do in
``logits, loss = model(x, y)`` loops.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from torchledger.formulas._validate import one_of, positive_int
from torchledger.formulas.memory import get_recipe
from torchledger.formulas.vocabulary import OPTIMIZER_IMPLS, OPTIMIZERS, STEP_CHECKPOINTING

_TORCH_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def param_dtype(precision: str) -> torch.dtype:
    """The torch dtype a recipe keeps its parameters in (the one place a recipe's dtype names become torch's)."""
    return _TORCH_DTYPES[get_recipe(precision).param_dtype]


def compute_dtype(precision: str) -> torch.dtype:
    """The torch dtype a recipe's matmuls run in (autocast's dtype under ``*-mixed``)."""
    return _TORCH_DTYPES[get_recipe(precision).compute_dtype]


@dataclass(frozen=True)
class TrainConfig:
    """How a step is run: recipe, optimizer and its implementation, checkpointing, accumulation, clipping."""

    precision: str = "32-true"
    optimizer: str = "adamw"
    optimizer_impl: str = "foreach"
    checkpointing: str = "none"
    grad_accum: int = 1
    clip_grad_norm: float | None = None
    lr: float = 1e-3

    def __post_init__(self) -> None:
        recipe = get_recipe(self.precision)
        if recipe.master_dtype is not None:
            raise ValueError(f"precision={self.precision!r}: the reference training step runs Lightning's recipes")
        one_of("optimizer", self.optimizer, OPTIMIZERS)
        one_of("optimizer_impl", self.optimizer_impl, OPTIMIZER_IMPLS)
        one_of("checkpointing", self.checkpointing, STEP_CHECKPOINTING)
        positive_int("grad_accum", self.grad_accum)
        if self.clip_grad_norm is not None and not self.clip_grad_norm > 0:
            raise ValueError(f"clip_grad_norm={self.clip_grad_norm!r} must be > 0")


def make_optimizer(params: Sequence[nn.Parameter] | object, config: TrainConfig) -> torch.optim.Optimizer:
    """The optimizer of ``config``: ``foreach`` / ``for-loop`` / ``fused`` chosen explicitly, not by device default."""
    impls = {"foreach": {"foreach": True}, "for-loop": {"foreach": False}, "fused": {"fused": True}}
    impl = impls[config.optimizer_impl]
    if config.optimizer in ("sgd", "momentum"):
        momentum = 0.9 if config.optimizer == "momentum" else 0.0
        return torch.optim.SGD(params, lr=config.lr, momentum=momentum, **impl)  # type: ignore[arg-type]
    cls = torch.optim.AdamW if config.optimizer == "adamw" else torch.optim.Adam
    return cls(params, lr=config.lr, **impl)  # type: ignore[arg-type]


class TrainStep:
    """Runs optimizer steps of ``model`` on micro-batches; ``loss_fn(model, batch)`` returns (output, loss)."""

    def __init__(self, model: nn.Module, config: TrainConfig,
                 loss_fn: Callable[[nn.Module, tuple[Tensor, ...]], tuple[Tensor, Tensor]]) -> None:
        self.model, self.config, self.loss_fn = model, config, loss_fn
        self.recipe = get_recipe(config.precision)
        device = next(iter(model.parameters())).device
        self.device_type = device.type
        dtype = param_dtype(config.precision)
        if any(p.dtype != dtype for p in model.parameters()):
            model.to(dtype)
        set_ckpt = getattr(model, "set_checkpointing", None)
        if config.checkpointing != "none":
            if set_ckpt is None:
                raise ValueError(f"checkpointing={config.checkpointing!r}: {type(model).__name__} has no blocks to "
                                 "checkpoint")
            set_ckpt(config.checkpointing)
        self.optimizer = make_optimizer(model.parameters(), config)
        self.scaler = None
        if config.precision == "16-mixed":
            self.scaler = torch.amp.GradScaler(self.device_type)

    def step(self, micro_batches: Sequence[tuple[Tensor, ...]], mark: Callable[[str], None] | None = None) -> None:
        """One optimizer step over ``grad_accum`` micro-batches. ``mark``, where given, is called with the name of
        each phase as it begins (``forward``, ``backward``, once per micro-batch; ``optimizer``) and with ``end``
        after the last: a caller times the phases by it."""
        if len(micro_batches) != self.config.grad_accum:
            raise ValueError(f"got {len(micro_batches)} micro-batches for grad_accum={self.config.grad_accum}")
        autocast_dtype = compute_dtype(self.config.precision)
        for batch in micro_batches:
            if mark is not None:
                mark("forward")
            with torch.autocast(self.device_type, dtype=autocast_dtype, enabled=self.recipe.autocast):
                output, loss = self.loss_fn(self.model, batch)
                loss = loss / self.config.grad_accum
            if mark is not None:
                mark("backward")
            if self.scaler is not None:
                self.scaler.scale(loss).backward()
            else:
                loss.backward()
            del output, loss
        if mark is not None:
            mark("optimizer")
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
        if self.config.clip_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.config.clip_grad_norm)
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if mark is not None:
            mark("end")


    def warm_up(self, micro_batches: Sequence[tuple[Tensor, ...]], *, limit: int = 32) -> int:
        """Run steps until the optimizer has stepped once, so that its state exists (the steady state): one step,
        or under GradScaler (``16-mixed``) as many as it skips, each lowering its scale (initially 2^16) after
        inf or NaN gradients, at most ``limit``. Returns the number of steps run."""
        positive_int("limit", limit)
        for n in range(1, limit + 1):
            scale = self.scaler.get_scale() if self.scaler is not None else 0.0
            self.step(micro_batches)
            if self.scaler is None or self.scaler.get_scale() >= scale:  # lowered only when it skipped the step
                return n
        raise RuntimeError(f"GradScaler skipped {limit} steps in a row: the gradients are not finite at any scale")


def lm_loss(model: nn.Module, batch: tuple[Tensor, ...]) -> tuple[Tensor, Tensor]:
    """Next-token cross-entropy of a reference transformer on (ids, targets)."""
    logits, loss = model(batch[0], batch[1])
    return logits, loss


def classifier_loss(model: nn.Module, batch: tuple[Tensor, ...]) -> tuple[Tensor, Tensor]:
    """Cross-entropy of a classifier (the MLP, the CNN) on (inputs, labels)."""
    logits = model(batch[0])
    return logits, nn.functional.cross_entropy(logits, batch[1])


class default_dtype:
    """Context manager: build modules directly in ``dtype`` (no conversion afterwards, which FakeTensorMode
    cannot do in place)."""

    def __init__(self, dtype: torch.dtype) -> None:
        self.dtype = dtype

    def __enter__(self) -> None:
        self._previous = torch.get_default_dtype()
        torch.set_default_dtype(self.dtype)

    def __exit__(self, *exc: object) -> None:
        torch.set_default_dtype(self._previous)
