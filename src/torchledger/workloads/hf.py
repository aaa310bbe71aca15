"""Hugging Face models built from a ``config.json``, as a training step runs them.

transformers is an optional extra (``pip install 'torchledger[hf]'``): :func:`require_transformers` says so in one
line when it is missing. A model is built with ``AutoModelForCausalLM.from_config`` from the config as the file
gives it, with three settings a training-step measurement needs:

- **SDPA attention** (``attn_implementation="sdpa"``, transformers' default where PyTorch has it): with no padding
  mask and full attention the model passes no mask and ``is_causal=True``, so the fused kernel runs;
- **dropout off**: every ``*dropout`` / ``*pdrop`` probability of the config is set to 0, so a training step
  saves no dropout masks and computes what the eval-mode forward computes;
- **no KV cache** (``use_cache=False``): a training step has no use for one.

:class:`HFCausalLM` wraps the model in the reference transformers' interface (``model(idx, targets)`` returns the
logits and the loss; ``set_checkpointing``), so that the training step and the meters run it unchanged. The loss is
the model's own (``labels=idx``: transformers shifts the labels and upcasts the logits itself).
"""

from __future__ import annotations

import copy
import os
from typing import Any

import torch
from torch import Tensor, nn

from torchledger.formulas._validate import one_of
from torchledger.formulas.vocabulary import STEP_CHECKPOINTING, checkpointed_blocks

ATTENTION = "sdpa"
INSTALL_HINT = "pip install 'torchledger[hf]'"


class TransformersMissing(RuntimeError):
    """transformers is not installed."""


def require_transformers() -> Any:
    """The ``transformers`` module; :class:`TransformersMissing` (one line naming the extra) when it is absent."""
    try:
        import transformers
    except ImportError:
        raise TransformersMissing(
            f"--hf-config builds the Hugging Face model with transformers, which is not installed ({INSTALL_HINT})"
        ) from None
    return transformers


def has_transformers() -> bool:
    """Whether transformers can be imported."""
    try:
        require_transformers()
    except TransformersMissing:
        return False
    return True


def load_config(path: str | os.PathLike[str], *, use_cache: bool = False) -> Any:
    """The transformers config of ``path`` (a config.json or a folder holding one), made ready for a training step:
    SDPA attention, every dropout probability 0, no KV cache (``use_cache=True`` keeps one: see
    :func:`torchledger.counting.model_count.count_model`)."""
    transformers = require_transformers()
    config = transformers.AutoConfig.from_pretrained(os.fspath(path))
    for name, value in list(vars(config).items()):
        if (name.endswith("dropout") or name.endswith("pdrop")) and isinstance(value, float):
            setattr(config, name, 0.0)
    config.use_cache = use_cache
    config._attn_implementation = ATTENTION
    return config


def build_hf_model(config: Any, *, device: str | torch.device = "cpu", dtype: torch.dtype | None = None) -> nn.Module:
    """``AutoModelForCausalLM.from_config(config)`` on ``device`` (``"meta"``: shapes only) in ``dtype`` (default:
    the default dtype), in training mode."""
    transformers = require_transformers()
    dtype = dtype or torch.get_default_dtype()
    with torch.device(device):
        try:
            model: nn.Module = transformers.AutoModelForCausalLM.from_config(
                config, attn_implementation=ATTENTION, dtype=dtype)
        except TypeError:  # transformers before 4.56 names it torch_dtype
            model = transformers.AutoModelForCausalLM.from_config(
                config, attn_implementation=ATTENTION, torch_dtype=dtype)
    return model.train()


def _layers(model: nn.Module) -> list[nn.Module]:
    """The decoder layers that transformers checkpoints (its ``GradientCheckpointingLayer`` subclasses, since
    transformers 4.52; none before it, where the switch is the model's alone)."""
    try:
        from transformers.modeling_layers import GradientCheckpointingLayer
    except ImportError:
        return []
    return [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]


def enable_checkpointing(model: nn.Module, mode: str) -> None:
    """Checkpoint ``model``'s decoder layers through transformers' own switch (``activation_checkpointing_enable``,
    ``gradient_checkpointing_enable`` before it; non-reentrant ``torch.utils.checkpoint``): ``full`` every layer,
    ``every-other`` layers 0, 2, 4, ..., ``none`` none."""
    one_of("checkpointing", mode, STEP_CHECKPOINTING)
    hf: Any = model
    if mode == "none":
        if getattr(hf, "is_gradient_checkpointing", False):
            hf.gradient_checkpointing_disable()
        return
    kwargs = {"use_reentrant": False}
    if hasattr(hf, "activation_checkpointing_enable"):
        hf.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        hf.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    layers = _layers(model)
    if mode != "full" and not layers:
        raise ValueError(f"checkpointing={mode!r}: this transformers checkpoints every layer or none")
    keep = set(checkpointed_blocks(mode, len(layers)))
    for i, layer in enumerate(layers):
        setattr(layer, "gradient_checkpointing", i in keep)  # noqa: B010 (a plain attribute of the layer)


class HFCausalLM(nn.Module):
    """A Hugging Face causal LM behind the reference transformers' interface: ``forward(idx, targets)`` returns
    (logits, loss) with the model's own loss of ``labels=idx`` (``targets`` is not read: transformers shifts the
    labels itself); ``set_checkpointing(mode)`` checkpoints through transformers."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.checkpointing = "none"

    def set_checkpointing(self, mode: str) -> None:
        enable_checkpointing(self.model, mode)
        self.checkpointing = mode

    def forward(self, idx: Tensor, targets: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
        # idx: (B, T) int64 -> logits (B, T, V), mean cross-entropy of the next tokens
        out = self.model(input_ids=idx, labels=idx if targets is not None else None)
        return out.logits, out.loss


def fake_copy(model: nn.Module) -> nn.Module:
    """A copy of a model built on the meta device whose parameters and buffers are fake tensors on the CPU (call
    it under a ``FakeTensorMode``): shapes only, nothing allocated. Tied parameters stay tied (one copy each)."""
    memo: dict[int, Any] = {}
    for p in model.parameters():
        memo[id(p)] = nn.Parameter(torch.empty(p.shape, dtype=p.dtype, device="cpu"), requires_grad=p.requires_grad)
    for b in model.buffers():
        memo[id(b)] = torch.empty(b.shape, dtype=b.dtype, device="cpu")
    return copy.deepcopy(model, memo)


def build_hf_causal_lm(path: str | os.PathLike[str], *, device: str | torch.device = "cpu",
                       dtype: torch.dtype | None = None, fake: bool = False) -> HFCausalLM:
    """The Hugging Face model of the config.json at ``path`` (see the module docstring), wrapped, on ``device``;
    ``fake=True``: built on the meta device, then copied to fake CPU tensors (:func:`fake_copy`)."""
    model = build_hf_model(load_config(path), device="meta" if fake else device, dtype=dtype)
    return HFCausalLM(fake_copy(model) if fake else model)
