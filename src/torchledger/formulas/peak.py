"""The peak memory of one training step, by phase, for the reference workloads."""

from __future__ import annotations

from dataclasses import dataclass
from itertools import pairwise

from ._validate import positive_int
from .activations import (
    Activations,
    activation_bytes,
    buffer_bytes,
    cnn_activation_bytes,
    logprob_bytes,
    mlp_activation_bytes,
)
from .memory import (
    ModelStates,
    dtype_bytes,
    get_recipe,
    kv_cache_bytes,
    model_state_bytes,
    optimizer_step_temp_bytes,
)
from .specs import CNNSpec, MLPSpec, ModelSpec, param_counts


@dataclass(frozen=True)
class TrainPeak:
    """The peak of one optimizer step at steady state (optimizer state exists; grads freed by ``zero_grad``)."""

    states: ModelStates
    activations: Activations
    phases: dict[str, int]
    grad_accum: int
    buffers: int = 0

    @property
    def peak(self) -> int:
        return max(self.phases.values())

    @property
    def phase(self) -> str:
        """The phase where the peak falls: ``forward``, ``backward`` or ``optimizer``."""
        return max(self.phases, key=lambda k: self.phases[k])

    def breakdown(self) -> dict[str, int]:
        """The peak by category, as the memory tracker reports a measurement: params (and buffers), grads,
        optimizer (and master weights), activations (what autograd saved), temporaries (the rest: logits, gradient
        transients, the optimizer's temporaries)."""
        s, a, phase = self.states, self.activations, self.phase
        out = {
            "params": s.params + self.buffers,
            "grads": s.grads if phase == "optimizer" or self.grad_accum > 1 else 0,
            "optimizer": s.optimizer + s.master_params,
            "activations": {"forward": a.forward_end - a.logits, "backward": a.saved, "optimizer": 0}[phase],
        }
        out["temporaries"] = max(self.peak - sum(out.values()), 0)
        return out


def _step_peak(
    states: ModelStates, buffers: int, acts: Activations, *, grad_accum: int, head_grads: int, inner_backward: int,
    optimizer_temps: int,
) -> TrainPeak:
    """The three phases from their parts (see :func:`train_peak_bytes`)."""
    persistent = states.params + states.master_params + states.optimizer + buffers
    accumulated = states.grads if grad_accum > 1 else 0
    backward_start = persistent + acts.saved + acts.logits + accumulated + head_grads
    return TrainPeak(
        states=states,
        activations=acts,
        buffers=buffers,
        phases={
            "forward": persistent + acts.forward_end + accumulated,
            "backward": max(backward_start, persistent + inner_backward),
            "optimizer": persistent + states.grads + optimizer_temps,
        },
        grad_accum=grad_accum,
    )


def train_peak_bytes(
    spec: ModelSpec,
    batch: int,
    seq_len: int,
    *,
    recipe: str = "32-true",
    optimizer: str = "adamw",
    checkpointing: str = "none",
    grad_accum: int = 1,
    optimizer_impl: str = "foreach",
) -> TrainPeak:
    """Peak bytes of one training step of a reference transformer, by phase.

    - ``forward``: persistent states (params, buffers, master, optimizer) + what the last micro-batch holds at the
      end of its forward (:attr:`Activations.forward_end`) + the gradients when ``grad_accum > 1`` (accumulated by
      the earlier micro-batches; with ``grad_accum == 1`` they are still freed).
    - ``backward``: the larger of two moments. Its start: the saved tensors and logits, plus the gradients of the
      log-probabilities and of the logits (B T V each). The last block's MLP backward: the head's saved tensors are
      gone; the head's and the down projection's weight gradients, the residual stream's gradient and the MLP's
      gradient transients exist (GELU: the gradients of its output and input, one B T d_ff more than the down
      projection's freed input; SwiGLU: those of silu(gate), up and their product, two more); under full
      checkpointing the block's saved tensors are back.
    - ``optimizer``: persistent states + gradients + the optimizer step's temporaries.
    NB: steady state; the very first step has no optimizer state until the step itself. Inside the backward the
    moment is approximate: measured 1.2-1.3% higher for llama-tiny under full checkpointing, where the peak falls a
    few weight gradients later.
    """
    positive_int("grad_accum", grad_accum)
    counts = param_counts(spec)
    n = counts.total
    r = get_recipe(recipe)
    states = model_state_bytes(n, recipe, optimizer)
    acts = activation_bytes(spec, batch, seq_len, recipe, checkpointing)
    tokens = batch * seq_len
    g = dtype_bytes(r.grad_dtype)
    head_weight_grads = ((counts.lm_head or counts.token_embedding) + counts.final_norm) * g
    grads_so_far = states.grads if grad_accum > 1 else head_weight_grads + spec.d_ff * spec.d_model * g
    residual_grad = tokens * spec.d_model * dtype_bytes(r.param_dtype)
    mlp_transient = (1 if spec.family == "gpt2" else 2) * tokens * spec.d_ff * dtype_bytes(r.compute_dtype)
    inner = (acts.saved - acts.head + acts.logits + grads_so_far + residual_grad + acts.recompute_layer
             + mlp_transient)
    # The end of the backward: every gradient exists, and the token embedding's gradient is made as a new dense
    # V x d tensor, added into an existing .grad when the head is tied to it or when accumulating.
    embedding_added = spec.tied_embeddings or grad_accum > 1
    inner = max(inner, states.grads + (counts.token_embedding * g if embedding_added else 0))
    largest = max(counts.token_embedding, counts.lm_head, spec.d_model * max(spec.d_ff, spec.q_dim + 2 * spec.kv_dim))
    return _step_peak(
        states, buffer_bytes(spec, recipe), acts, grad_accum=grad_accum,
        head_grads=2 * tokens * spec.vocab_size * logprob_bytes(r), inner_backward=inner,
        optimizer_temps=optimizer_step_temp_bytes(n, largest, optimizer, recipe, optimizer_impl),
    )


def mlp_train_peak_bytes(
    spec: MLPSpec, batch: int, *, recipe: str = "32-true", optimizer: str = "adamw", grad_accum: int = 1,
    optimizer_impl: str = "foreach",
) -> TrainPeak:
    """Peak bytes of one training step of the reference MLP (cross-entropy over its last width), by phase."""
    positive_int("grad_accum", grad_accum)
    r = get_recipe(recipe)
    states = model_state_bytes(spec.n_params, recipe, optimizer)
    acts = mlp_activation_bytes(spec, batch, recipe)
    layers = list(pairwise(spec.dims))
    largest = max(a * b for a, b in layers)
    g, c = dtype_bytes(r.grad_dtype), dtype_bytes(r.compute_dtype)
    # Walking the backward from the last layer: when layer i's weight gradient is made, the gradients of the layers
    # after it exist (all of them when accumulating), and the new one is a temporary: computed in 16 bits and cast
    # to the fp32 .grad under autocast, or added into the existing .grad when accumulating. The activations of the
    # layers before it are still saved.
    inner = 0
    grads_after = 0
    for i in reversed(range(len(layers))):
        a, b = layers[i]
        weight = a * b + b
        existing = states.grads if grad_accum > 1 else grads_after
        new_grad = weight * g if (grad_accum > 1 or r.autocast) else 0
        new_grad += weight * c if r.autocast else 0
        saved_before = sum(spec.dims[1:i + 1]) * batch * c + (spec.dims[0] * batch * c if r.autocast else 0)
        if r.autocast:  # 16-bit weight copies still saved by the layers before it (the first layer saves none)
            saved_before += sum(x * y for x, y in layers[1:i]) * c
        inner = max(inner, existing + new_grad + saved_before + acts.logits)
        grads_after += weight * g
    return _step_peak(
        states, 0, acts, grad_accum=grad_accum, head_grads=2 * batch * spec.dims[-1] * logprob_bytes(r),
        inner_backward=inner,
        optimizer_temps=optimizer_step_temp_bytes(spec.n_params, largest, optimizer, recipe, optimizer_impl),
    )


def cnn_train_peak_bytes(
    spec: CNNSpec, batch: int, *, recipe: str = "32-true", optimizer: str = "adamw", grad_accum: int = 1,
    optimizer_impl: str = "foreach",
) -> TrainPeak:
    """Peak bytes of one training step of the reference CNN, by phase.

    Inside the backward: the pooling's and the last ReLU's gradients (B C H W each) exist together while every
    saved tensor but the log-probabilities is still alive, with the head's weight gradients.
    """
    positive_int("grad_accum", grad_accum)
    r = get_recipe(recipe)
    states = model_state_bytes(spec.n_params, recipe, optimizer)
    acts = cnn_activation_bytes(spec, batch, recipe)
    c, g = dtype_bytes(r.compute_dtype), dtype_bytes(r.grad_dtype)
    last = spec.channels[-1]
    grads_so_far = states.grads if grad_accum > 1 else (last * spec.n_classes + spec.n_classes) * g
    inner = acts.saved - batch * spec.n_classes * logprob_bytes(r) + acts.logits + grads_so_far
    inner += 2 * batch * last * spec.image_size**2 * c
    widths = (spec.in_channels, *spec.channels)
    largest = max(max(a * b * 9 for a, b in pairwise(widths)), last * spec.n_classes)
    return _step_peak(
        states, 0, acts, grad_accum=grad_accum, head_grads=2 * batch * spec.n_classes * logprob_bytes(r),
        inner_backward=inner,
        optimizer_temps=optimizer_step_temp_bytes(spec.n_params, largest, optimizer, recipe, optimizer_impl),
    )


@dataclass(frozen=True)
class InferencePeak:
    """The peak of a forward-only pass over a prompt that fills a KV cache (``prefill``), by part."""

    params: int
    kv_cache: int
    activations: int

    @property
    def peak(self) -> int:
        return self.params + self.kv_cache + self.activations

    def breakdown(self) -> dict[str, int]:
        return {"params": self.params, "kv_cache": self.kv_cache, "activations": self.activations}


def inference_peak_bytes(spec: ModelSpec, batch: int, seq_len: int, *, recipe: str = "bf16-true") -> InferencePeak:
    """Peak bytes of the reference transformer's prefill (no autograd): parameters and buffers, the KV cache of
    every block, and the last block's live tensors at its MLP.

    Without autograd a block holds only what its code still references: the block input, the fused qkv output
    (GPT-2; the q, k, v views keep it) or the rotated q and v's projection (LLaMA), the attention output, the
    residual sum, for LLaMA the second norm's output, and the MLP's widest moment (GELU: its input and output;
    SwiGLU: silu(gate), up and their product). The cache is full by then; the LM head runs on the last position.
    Runs in the parameters' dtype: the ``*-true`` recipes only.
    """
    r = get_recipe(recipe)
    if r.autocast or r.master_dtype:
        raise ValueError(f"precision={recipe!r}: inference runs in the parameters' dtype; use 32-true, 16-true or "
                         "bf16-true")
    positive_int("batch", batch)
    positive_int("seq_len", seq_len)
    b = dtype_bytes(r.param_dtype)
    d, f, q, kv = spec.d_model, spec.d_ff, spec.q_dim, spec.kv_dim
    # elements per token alive at the peak
    gpt_live = d + (q + 2 * kv) + q + d + 2 * f  # x, qkv, attention out, x + attn, GELU input and output
    llama_live = d + q + kv + q + d + d + 3 * f  # x, rotated q, v_proj out, attention out, x + attn, norm, 3 f
    live = gpt_live if spec.family == "gpt2" else llama_live
    return InferencePeak(
        params=param_counts(spec).total * b + buffer_bytes(spec, recipe),
        kv_cache=kv_cache_bytes(spec, batch, seq_len, r.param_dtype),
        activations=batch * seq_len * live * b,
    )
