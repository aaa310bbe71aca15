"""Activation memory, in bytes: what one micro-batch of training holds for backward, tensor by tensor.

Exact for the reference workloads of :mod:`torchledger.workloads` (checked against a live-storage tracker in
``benchmarks/verification/test_memory_measured.py``); Korthikanti et al.'s published per-layer formula is in
:func:`torchledger.formulas.memory.korthikanti_layer_activation_bytes` for comparison.
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import pairwise

from ._validate import one_of, positive_int
from .memory import Recipe, dtype_bytes, get_recipe
from .specs import CNNSpec, MLPSpec, ModelSpec, param_counts
from .vocabulary import STEP_CHECKPOINTING, checkpointed_blocks


@dataclass(frozen=True)
class Activations:
    """Bytes held by one micro-batch of training at the end of its forward pass.

    - ``per_layer``: what one block saves for backward without checkpointing (itemized in ``layer_items``);
    - ``layers``: all blocks (under full checkpointing only each block's input);
    - ``embedding``: GPT-2's position ids, made in the forward (the input batch belongs to the caller);
    - ``head``: the final norm's and the LM head's saved tensors and the log-probabilities cross-entropy saves;
    - ``logits``: the logits the model returns (held by the caller, not saved by autograd);
    - ``autocast_copies``: 16-bit copies of the matmul weights that autocast caches during the forward (``*-mixed``
      only); ``saved_copies``: those of them saved for backward (all without checkpointing; under full
      checkpointing only the LM head's, the others being freed when the autocast region ends);
    - ``recompute_layer``: one block's saved tensors (and, under autocast, its weights' copies), alive while it is
      recomputed (full checkpointing only).
    """

    per_layer: int
    layers: int
    embedding: int
    head: int
    logits: int
    autocast_copies: int
    saved_copies: int
    recompute_layer: int
    layer_items: tuple[tuple[str, int], ...]
    checkpointing: str

    @property
    def saved(self) -> int:
        """Bytes saved for backward once the forward has finished and autocast has exited."""
        return self.layers + self.embedding + self.head + self.saved_copies

    @property
    def forward_end(self) -> int:
        """Bytes alive at the end of the forward, inside autocast: saved tensors, logits, autocast's weight cache."""
        return self.layers + self.embedding + self.head + self.logits + self.autocast_copies


def layer_activation_items(spec: ModelSpec, batch: int, seq_len: int, recipe: str = "32-true") -> dict[str, int]:
    """Bytes that one block of the reference implementation saves for backward, tensor by tensor.

    The blocks are composed from the family's description (:mod:`torchledger.formulas.families`). The reference
    blocks (pre-norm, no dropout, ``F.scaled_dot_product_attention`` with a fused kernel) save:
    the norm inputs (residual stream) and their fp32 statistics; the projection inputs (norm outputs, or under
    autocast their 16-bit copies); the fused qkv output (q, k, v are views of it that SDPA saves) or, for LLaMA,
    the rotated q and k and the v projection (SDPA with ``enable_gqa=True``, so k and v keep n_kv_heads); SDPA's
    output and fp32 log-sum-exp; the MLP's hidden tensors (GELU: its input and output; SwiGLU: gate, silu(gate), up
    and their product). A Mixture of Experts saves the router's input, its fp32 softmax, the top-k indices, weights
    and their sum, and for the B T k routed rows: the slot and token indices, the experts' inputs and hidden tensors,
    their outputs and routing weights (the product that weights them saves both) and the weighted rows (saved by
    ``index_add_``). Every routed term is linear in
    the rows an expert gets, so the sum is exact whatever the routing's balance.

    Korthikanti et al. 2022 (arXiv 2205.05198, Sec. 4.1) count 34 s b h + 5 a s^2 b bytes per 16-bit GPT layer.
    This count differs by what the reference layers do differently: no dropout masks (-2 sbh in the 34, and the
    5as^2b attention-matrix term is gone because fused attention keeps no s x s matrix), plus the small fp32 norm
    statistics and log-sum-exp that the formula leaves out. ``F.rms_norm`` computes in fp32 and saves its fp32
    input copy and normalized tensor whatever the recipe.
    NB: on CPU a 16-bit LayerNorm keeps its mean and rstd in the 16-bit dtype, half the fp32 bytes counted here
    (as CUDA keeps them): 4 B T bytes per layer, far below any tolerance.
    """
    positive_int("batch", batch)
    positive_int("seq_len", seq_len)
    r = get_recipe(recipe)
    tokens = batch * seq_len
    c = dtype_bytes(r.compute_dtype)
    # Under autocast the residual stream is fp32 (fp32 embeddings + 16-bit branch outputs promote to fp32).
    res = dtype_bytes(r.param_dtype)
    d, f, q, kv = spec.d_model, spec.d_ff, spec.q_dim, spec.kv_dim
    fam = spec.description
    stats = tokens * 4  # one fp32 value per token (mean or rstd)
    items: dict[str, int] = {}

    def norm(name: str) -> None:
        if fam.norm == "layernorm":
            items[f"{name}.input"] = tokens * d * res
            items[f"{name}.stats"] = 2 * stats  # mean and rstd
        else:
            # F.rms_norm upcasts its input to fp32 and saves that, the fp32 rstd, and the fp32 normalized tensor.
            items[f"{name}.input"] = tokens * d * 4
            items[f"{name}.rstd"] = stats
            items[f"{name}.normalized"] = tokens * d * 4

    norm(fam.norm_names[0])
    if fam.projections == "fused":
        items["attn.qkv.input"] = tokens * d * c
        items["attn.qkv.output"] = tokens * (q + 2 * kv) * c
    else:
        # Under autocast each projection casts the fp32 norm output to 16 bits for itself (autocast caches casts
        # of leaf weights only): q, k and v save three copies, gate and up two. Without autocast they share one.
        casts = 3 if r.autocast else 1
        items["attn.proj.input"] = casts * tokens * d * c
        items["attn.q_rotated"] = tokens * q * c
        items["attn.k_rotated"] = tokens * kv * c
        items["attn.v"] = tokens * kv * c
    items["attn.sdpa.output"] = tokens * q * c
    items["attn.sdpa.logsumexp"] = batch * spec.n_heads * seq_len * 4
    norm(fam.norm_names[1])
    rows = tokens
    if fam.moe:
        # the router: its input (autocast's 16-bit cast, or the norm output), the fp32 softmax that the top-k
        # reads, the top-k's indices, the top-k weights and their sum (saved by the renormalizing division)
        k, h = spec.experts_per_token, 4 if r.autocast else res  # h: the norm output's bytes per element
        rows = tokens * k  # every token's k routed copies, however the router spreads them over the experts
        items["moe.router.input"] = tokens * d * c
        items["moe.probs"] = tokens * spec.n_experts * 4
        items["moe.topk.indices"] = tokens * k * 8
        items["moe.topk.values"] = tokens * k * 4
        items["moe.topk.sum"] = tokens * 4
        items["moe.slots"] = rows * 8  # the slots routed to each expert (nonzero), saved by the weights' gather
        items["moe.rows"] = rows * 8  # their tokens, saved by index_select and by index_add_
        items["moe.weights"] = rows * h  # each routed row's weight, saved by the weighting product
        items["moe.expert.output"] = rows * d * c  # each expert's output, saved by the weighting product
        items["moe.weighted"] = rows * d * h  # the weighted rows, saved by index_add_ (its backward's expand_as)
    if fam.mlp == "gelu":
        items["mlp.fc.input"] = tokens * d * c
        items["mlp.gelu.input"] = tokens * f * c
        items["mlp.proj.input"] = tokens * f * c
    else:
        items["mlp.input"] = (2 if r.autocast else 1) * rows * d * c
        items["mlp.gate"] = rows * f * c
        items["mlp.silu"] = rows * f * c
        items["mlp.up"] = rows * f * c
        items["mlp.down.input"] = rows * f * c
    return items


def logprob_bytes(r: Recipe) -> int:
    """Bytes per log-probability: cross-entropy runs in fp32 under autocast, else in the parameters' dtype."""
    return 4 if r.autocast else dtype_bytes(r.param_dtype)


def activation_bytes(
    spec: ModelSpec, batch: int, seq_len: int, recipe: str = "32-true", checkpointing: str = "none"
) -> Activations:
    """Activation memory of one training micro-batch (see :class:`Activations` for the parts).

    Full checkpointing keeps only each block's input (the residual stream, B T d in the residual dtype; Korthikanti's
    "2sbh" for 16-bit) and recomputes one block at a time in the backward; ``every-other`` does so for blocks 0, 2,
    4, ... and the others save as without checkpointing.
    """
    one_of("checkpointing", checkpointing, STEP_CHECKPOINTING)
    r = get_recipe(recipe)
    items = layer_activation_items(spec, batch, seq_len, recipe)
    per_layer = sum(items.values())
    tokens = batch * seq_len
    c = dtype_bytes(r.compute_dtype)
    res = dtype_bytes(r.param_dtype)
    logprob = logprob_bytes(r)
    # The input batch (token ids, targets) belongs to the caller; GPT-2's position ids are made in the forward.
    fam = spec.description
    embedding = seq_len * 8 if fam.learned_positions else 0
    if fam.norm == "layernorm":
        head = tokens * spec.d_model * res + 2 * tokens * 4  # ln_f input, mean and rstd
    else:
        head = 2 * tokens * spec.d_model * 4 + tokens * 4  # fp32 norm input and normalized tensor, rstd
    head += tokens * spec.d_model * c + tokens * spec.vocab_size * logprob  # head input, saved log-probabilities
    logits = tokens * spec.vocab_size * c
    counts = param_counts(spec)
    # every expert that receives a token has its weights cast: all of them, under the balanced routing
    copies = (counts.matmul + counts.per_layer_inactive * spec.n_layers) * c if r.autocast else 0
    head_copy = spec.vocab_size * spec.d_model * c if r.autocast else 0
    layer_copies = counts.per_layer_matmul * c if r.autocast else 0
    ckpt = len(checkpointed_blocks(checkpointing, spec.n_layers))
    if ckpt:
        # a checkpointed block keeps only its input; the others save as usual, with their autocast weight copies
        layers = ckpt * tokens * spec.d_model * res + (spec.n_layers - ckpt) * per_layer
        recompute = per_layer + layer_copies
        saved_copies = head_copy + (spec.n_layers - ckpt) * layer_copies
    else:
        layers = spec.n_layers * per_layer
        recompute, saved_copies = 0, copies
    return Activations(
        per_layer=per_layer, layers=layers, embedding=embedding, head=head, logits=logits,
        autocast_copies=copies, saved_copies=saved_copies, recompute_layer=recompute,
        layer_items=tuple(items.items()), checkpointing=checkpointing,
    )


def buffer_bytes(spec: ModelSpec, recipe: str = "32-true") -> int:
    """Bytes of the reference model's buffers: the rotary cos and sin tables (max_seq_len x head_dim each) of the
    rotary families, in the parameters' dtype; learned positions (GPT-2) have none."""
    if not spec.description.rotary:
        return 0
    return 2 * spec.max_seq_len * spec.head_dim * dtype_bytes(get_recipe(recipe).param_dtype)


def _classifier(saved_layers: int, head_saved: int, n_classes: int, batch: int, r: Recipe, weights: int,
                first_weight: int) -> Activations:
    """Under autocast every weight's 16-bit copy is cached through the forward, but the first layer's is not saved
    for backward: its input needs no gradient, so its data-grad (the only use of the weight) never runs."""
    c = dtype_bytes(r.compute_dtype)
    copies = weights * c if r.autocast else 0
    return Activations(
        per_layer=0, layers=saved_layers, embedding=0,
        head=head_saved + batch * n_classes * logprob_bytes(r),  # cross-entropy's saved log-probabilities
        logits=batch * n_classes * c, autocast_copies=copies,
        saved_copies=copies - (first_weight * c if r.autocast else 0), recompute_layer=0,
        layer_items=(), checkpointing="none",
    )


def mlp_activation_bytes(spec: MLPSpec, batch: int, recipe: str = "32-true") -> Activations:
    """Activations of the reference MLP on ``batch`` rows: each hidden ReLU output (saved by the ReLU and by the
    next Linear, one tensor), under autocast the 16-bit copy of the input, and cross-entropy's log-probabilities."""
    positive_int("batch", batch)
    r = get_recipe(recipe)
    c = dtype_bytes(r.compute_dtype)
    hidden = sum(spec.dims[1:-1]) * batch * c
    input_copy = spec.dims[0] * batch * c if r.autocast else 0
    weights = sum(a * b for a, b in pairwise(spec.dims))
    return _classifier(hidden + input_copy, 0, spec.dims[-1], batch, r, weights, spec.dims[0] * spec.dims[1])


def cnn_activation_bytes(spec: CNNSpec, batch: int, recipe: str = "32-true") -> Activations:
    """Activations of the reference CNN: each ReLU output (saved by the ReLU and by the next convolution), the
    pooled features (saved by the head), under autocast the 16-bit copy of the images, and the log-probabilities."""
    positive_int("batch", batch)
    r = get_recipe(recipe)
    c = dtype_bytes(r.compute_dtype)
    pixels = spec.image_size**2
    relu_outputs = sum(spec.channels) * batch * pixels * c
    input_copy = spec.in_channels * batch * pixels * c if r.autocast else 0
    pooled = batch * spec.channels[-1] * c
    widths = (spec.in_channels, *spec.channels)
    weights = sum(a * b * 9 for a, b in pairwise(widths)) + spec.channels[-1] * spec.n_classes
    return _classifier(relu_outputs + input_copy, pooled, spec.n_classes, batch, r, weights,
                       spec.in_channels * spec.channels[0] * 9)
