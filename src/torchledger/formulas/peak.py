"""The peak memory of one training step of the reference workloads: the largest moment of its timeline."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from ._validate import one_of, positive_int
from .activations import (
    Activations,
    activation_bytes,
    buffer_bytes,
    cnn_activation_bytes,
    mlp_activation_bytes,
)
from .memory import (
    OPTIMIZER_STATES,
    ModelStates,
    dtype_bytes,
    get_recipe,
    kv_cache_bytes,
    model_state_bytes,
)
from .specs import CNNSpec, MLPSpec, ModelSpec, check_seq_len, param_counts
from .timeline import (
    StepConfig,
    StepTimeline,
    balanced_routing,
    check_routing,
    cnn_timeline,
    mlp_timeline,
    transformer_timeline,
)
from .vocabulary import OPTIMIZER_IMPLS, STEP_CHECKPOINTING


@dataclass(frozen=True)
class TrainPeak:
    """The peak of one optimizer step at steady state (optimizer state exists; grads freed by ``zero_grad``): the
    largest total over the step's timeline (:mod:`torchledger.formulas.timeline`).

    ``phases``: the largest total within each of forward, backward and optimizer; ``moment``: the op at the peak;
    ``states``/``activations``/``buffers``: the parts the estimate reports beside it."""

    states: ModelStates
    activations: Activations
    phases: dict[str, int]
    grad_accum: int
    buffers: int = 0
    moment: str = ""
    by_category: dict[str, int] = field(default_factory=dict)

    @property
    def peak(self) -> int:
        return max(self.phases.values())

    @property
    def phase(self) -> str:
        """The phase where the peak falls: ``forward``, ``backward`` or ``optimizer``."""
        return max(self.phases, key=lambda k: self.phases[k])

    def breakdown(self) -> dict[str, int]:
        """The peak by category, as the memory tracker reports a measurement: params (and buffers), grads,
        optimizer (state, step counters), activations (tensors autograd saved), temporaries (the rest)."""
        return dict(self.by_category)


def _from_timeline(walk: StepTimeline, states: ModelStates, acts: Activations, grad_accum: int,
                   buffers: int) -> TrainPeak:
    return TrainPeak(
        states=states, activations=acts, phases={k: m.total for k, m in walk.phases.items()}, grad_accum=grad_accum,
        buffers=buffers, moment=walk.peak.name, by_category=dict(walk.peak.by_category),
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
    clip: bool = False,
    device: str = "cpu",
    routing: Sequence[Sequence[int]] | None = None,
) -> TrainPeak:
    """Peak bytes of one training step of a reference transformer: the largest moment of its timeline (see
    :func:`torchledger.formulas.timeline.transformer_timeline` for every op it walks).

    A Mixture of Experts routes by the data: ``routing`` gives the rows each expert of each block received (read
    from the model after the step: :attr:`torchledger.workloads.models.MoE.tokens_per_expert`), and without it the
    routing is taken as balanced (:func:`torchledger.formulas.timeline.balanced_routing`). What autograd saves
    depends only on the B T k routed rows in all, not on their balance; the transients of one expert at a time
    (its hidden tensors in the forward, its gradients in the backward) grow with that expert's rows.

    Where it falls: at the start of the backward (saved tensors, the logits and the gradients of the
    log-probabilities), at a block's weight gradients, at the end of the backward (a tied embedding's two gradients
    summed beside its ``.grad`` under accumulation), inside a recomputed block (full or every-other checkpointing),
    or in the optimizer (AdamW ``foreach``: ``torch._foreach_sqrt`` of every exp_avg_sq at once).
    NB: steady state; the very first step has no optimizer state until the step itself.
    """
    positive_int("grad_accum", grad_accum)
    positive_int("batch", batch)
    check_seq_len(spec, seq_len)
    n = param_counts(spec).total
    states = model_state_bytes(n, recipe, optimizer)
    acts = activation_bytes(spec, batch, seq_len, recipe, checkpointing)
    config = _config(recipe, optimizer, optimizer_impl, checkpointing, grad_accum, clip)
    walk = transformer_timeline(spec, batch, seq_len, config, device, routing)
    return _from_timeline(walk, states, acts, grad_accum, buffer_bytes(spec, recipe))


def _config(recipe: str, optimizer: str, impl: str, checkpointing: str, grad_accum: int, clip: bool) -> StepConfig:
    get_recipe(recipe)
    one_of("optimizer", optimizer, OPTIMIZER_STATES)
    one_of("impl", impl, OPTIMIZER_IMPLS)
    one_of("checkpointing", checkpointing, STEP_CHECKPOINTING)
    return StepConfig(recipe, optimizer, impl, checkpointing, grad_accum, clip)


def mlp_train_peak_bytes(
    spec: MLPSpec, batch: int, *, recipe: str = "32-true", optimizer: str = "adamw", grad_accum: int = 1,
    optimizer_impl: str = "foreach", clip: bool = False, device: str = "cpu",
) -> TrainPeak:
    """Peak bytes of one training step of the reference MLP (cross-entropy over its last width): the largest moment
    of :func:`torchledger.formulas.timeline.mlp_timeline`."""
    positive_int("grad_accum", grad_accum)
    positive_int("batch", batch)
    states = model_state_bytes(spec.n_params, recipe, optimizer)
    acts = mlp_activation_bytes(spec, batch, recipe)
    walk = mlp_timeline(spec, batch, _config(recipe, optimizer, optimizer_impl, "none", grad_accum, clip), device)
    return _from_timeline(walk, states, acts, grad_accum, 0)


def cnn_train_peak_bytes(
    spec: CNNSpec, batch: int, *, recipe: str = "32-true", optimizer: str = "adamw", grad_accum: int = 1,
    optimizer_impl: str = "foreach", clip: bool = False, device: str = "cpu",
) -> TrainPeak:
    """Peak bytes of one training step of the reference CNN: the largest moment of
    :func:`torchledger.formulas.timeline.cnn_timeline` (inside the backward, the pooling's gradient expanded to
    B C H W by ``div`` and the last ReLU's gradient exist together while the ReLU outputs are still saved)."""
    positive_int("grad_accum", grad_accum)
    positive_int("batch", batch)
    states = model_state_bytes(spec.n_params, recipe, optimizer)
    acts = cnn_activation_bytes(spec, batch, recipe)
    walk = cnn_timeline(spec, batch, _config(recipe, optimizer, optimizer_impl, "none", grad_accum, clip), device)
    return _from_timeline(walk, states, acts, grad_accum, 0)


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
        """By the storage tracker's categories: without autograd nothing is saved, so the live tensors are
        temporaries, and the cache has a category of its own."""
        return {"params": self.params, "grads": 0, "optimizer": 0, "activations": 0, "temporaries": self.activations,
                "kv_cache": self.kv_cache}


def inference_peak_bytes(spec: ModelSpec, batch: int, seq_len: int, *, recipe: str = "bf16-true",
                         routing: Sequence[Sequence[int]] | None = None) -> InferencePeak:
    """Peak bytes of the reference transformer's prefill (no autograd): parameters and buffers, the KV cache of
    every block, and the last block's live tensors at its MLP.

    Without autograd a block holds only what its code still references: the block input, the fused qkv output
    (GPT-2; the q, k, v views keep it) or the rotated q and v's projection (LLaMA), the attention output, the
    residual sum, for LLaMA the second norm's output, and the MLP's widest moment (GELU: its input and output;
    SwiGLU: silu(gate), up and their product). The cache is full by then; the LM head runs on the last position.
    Runs in the parameters' dtype: the ``*-true`` recipes only.

    A Mixture of Experts holds, beside the attention's tensors, the router's logits and fp32 softmax, the routing
    weights and expert indices, the output being summed, and at one expert's widest moment its slot and token
    indices, gathered rows, silu(gate), up and their product, with the previous expert's weighted rows still
    referenced: the peak is in the block whose largest expert (with the cache filled so far) is largest.
    ``routing``: the rows per expert per block (:attr:`torchledger.workloads.models.MoE.tokens_per_expert`);
    default balanced (:func:`torchledger.formulas.timeline.balanced_routing`).
    """
    r = get_recipe(recipe)
    if r.autocast or r.master_dtype:
        raise ValueError(f"precision={recipe!r}: inference runs in the parameters' dtype; use 32-true, 16-true or "
                         "bf16-true")
    positive_int("batch", batch)
    positive_int("seq_len", seq_len)
    b = dtype_bytes(r.param_dtype)
    d, f, q, kv = spec.d_model, spec.d_ff, spec.q_dim, spec.kv_dim
    fam = spec.description
    tokens = batch * seq_len
    # elements per token alive at the peak
    # GPT-2: x, qkv, attention out, x + attn; LLaMA: x, rotated q, v_proj out, attention out, x + attn, norm
    live = d + (q + 2 * kv) + q + d if fam.projections == "fused" else d + q + kv + q + d + d
    if fam.mlp == "gelu":
        live += 2 * f  # GELU input and output
    elif fam.mlp == "swiglu":
        live += 3 * f  # silu(gate), up, their product
    activations = tokens * live * b
    if fam.moe:
        k, E = spec.experts_per_token, spec.n_experts
        rows = balanced_routing(spec, tokens) if routing is None else check_routing(spec, tokens, routing)
        # logits, fp32 softmax, the routing weights (in the input's dtype) and expert indices, the output
        activations += tokens * E * (b + 4) + tokens * k * (b + 8) + tokens * d * b
        cache_per_block = kv_cache_bytes(spec, batch, seq_len, r.param_dtype) // spec.n_layers
        widest = []
        for i, layer in enumerate(rows):
            previous, most = 0, 0
            for n in layer:
                if n:
                    most = max(most, n * (16 + d * b + 3 * f * b) + previous * d * b)
                    previous = n
            # block i runs with the cache of blocks 0..i only
            widest.append(most - (spec.n_layers - 1 - i) * cache_per_block)
        activations += max(widest)
    return InferencePeak(
        params=param_counts(spec).total * b + buffer_bytes(spec, recipe),
        kv_cache=kv_cache_bytes(spec, batch, seq_len, r.param_dtype),
        activations=activations,
    )
