"""FLOP formulas: matmul, linear, convolution, attention, transformer layers and models; forward, backward, recompute.

Convention, stated once: one FLOP is one floating-point multiply or add, so a multiply-accumulate (MAC) is 2 FLOPs
and an (m, k) x (k, n) matmul is 2mkn FLOPs (strictly mn(2k - 1); everyone uses 2mkn). The default counts
matmul-like work only (mm, addmm, bmm, convolution, the two attention matmuls): bias adds, norms, activations and
softmax are not counted, and attention is counted densely even when causal. This is the convention of PyTorch's
FlopCounterMode and of PaLM's MFU (Chowdhery et al. 2022, App. B), so counts here can be compared with both.
Softmax FLOPs, causal halving and a causal sliding window (exact pair counts) are explicit options of
:func:`attention_flops`; :data:`ATTENTION_CONVENTIONS` names the three ways attention can be counted.

NB: fvcore, ptflops and thop report MACs under the name "flops"; halve nothing here to compare, double theirs.
The lecture notes this project started from mixed the two units in one total (linear and conv layers in MACs,
matmul in FLOPs); every function here returns FLOPs.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from itertools import pairwise
from math import prod

from ._validate import int_tuple, non_negative_int, one_of, positive_int, positive_number
from .specs import CNNSpec, MLPSpec, ModelSpec, param_counts
from .vocabulary import CHECKPOINTING, checkpointed_blocks

# --------------------------------------------------------------------------------------------------- primitives


def matmul_flops(m: int, k: int, n: int) -> int:
    """FLOPs of an (m, k) x (k, n) matrix product: 2mkn.

    NB: the exact count of multiplies and adds is mn(2k - 1); 2mkn is the universal convention.
    """
    return 2 * positive_int("m", m) * positive_int("k", k) * positive_int("n", n)


def bmm_flops(batch: int, m: int, k: int, n: int) -> int:
    """FLOPs of a batched (b, m, k) x (b, k, n) product: 2bmkn."""
    return positive_int("batch", batch) * matmul_flops(m, k, n)


def linear_flops(tokens: int, in_features: int, out_features: int, *, bias: bool = False) -> int:
    """FLOPs of ``nn.Linear`` applied to ``tokens`` rows: 2 * tokens * in * out, plus tokens * out if ``bias``.

    ``bias=True`` adds the bias additions, which the default convention (and FlopCounterMode's addmm) leaves out.
    NB: the lecture notes counted tokens * in * out (MACs) here; the FLOP count is twice that.
    """
    flops = matmul_flops(tokens, in_features, out_features)
    return flops + (tokens * out_features if bias else 0)


def linear_backward_flops(
    tokens: int, in_features: int, out_features: int, *, input_grad: bool = True, weight_grad: bool = True
) -> int:
    """Backward FLOPs of ``nn.Linear``: data-grad (2 * tokens * in * out) if ``input_grad`` plus weight-grad (same).

    The first layer of a network whose input needs no gradient skips the data-grad (``input_grad=False``).
    NB: the bias gradient is a reduction over tokens and, like the bias add, is not counted.
    """
    fwd = matmul_flops(tokens, in_features, out_features)
    return fwd * (int(input_grad) + int(weight_grad))


def conv_output_size(size: int, kernel: int, stride: int = 1, padding: int = 0, dilation: int = 1) -> int:
    """Output length of a convolution along one dimension (PyTorch's ``nn.Conv*d`` shape formula)."""
    out = (size + 2 * padding - dilation * (kernel - 1) - 1) // stride + 1
    if out < 1:
        raise ValueError(
            f"input size={size} is too small for kernel={kernel}, stride={stride}, padding={padding}, "
            f"dilation={dilation}: the output would be empty"
        )
    return out


def conv_transpose_output_size(
    size: int, kernel: int, stride: int = 1, padding: int = 0, dilation: int = 1, output_padding: int = 0
) -> int:
    """Output length of a transposed convolution along one dimension (``nn.ConvTranspose*d``'s shape formula)."""
    out = (size - 1) * stride - 2 * padding + dilation * (kernel - 1) + output_padding + 1
    if out < 1:
        raise ValueError(f"transposed conv with size={size}, padding={padding} gives an empty output")
    return out


@dataclass(frozen=True)
class ConvShape:
    """The resolved shapes of one convolution: what the FLOP formulas need."""

    batch: int
    in_channels: int
    out_channels: int
    groups: int
    input_size: tuple[int, ...]
    output_size: tuple[int, ...]
    kernel_size: tuple[int, ...]
    transposed: bool


def conv_shape(
    batch: int,
    in_channels: int,
    out_channels: int,
    input_size: int | Iterable[int],
    kernel_size: int | Iterable[int],
    *,
    stride: int | Iterable[int] = 1,
    padding: int | Iterable[int] = 0,
    dilation: int | Iterable[int] = 1,
    groups: int = 1,
    transposed: bool = False,
    output_padding: int | Iterable[int] = 0,
    ndim: int | None = None,
) -> ConvShape:
    """Validate a convolution's arguments (as ``nn.Conv*d`` / ``nn.ConvTranspose*d`` take them) and resolve shapes."""
    positive_int("batch", batch)
    positive_int("in_channels", in_channels)
    positive_int("out_channels", out_channels)
    positive_int("groups", groups)
    if ndim is None:
        ndim = 1 if isinstance(input_size, int) else len(tuple(input_size))
    if ndim not in (1, 2, 3):
        raise ValueError(f"input_size={input_size!r}: convolutions have 1, 2 or 3 spatial dimensions")
    size = int_tuple("input_size", input_size, ndim, minimum=1)
    kernel = int_tuple("kernel_size", kernel_size, ndim, minimum=1)
    strides = int_tuple("stride", stride, ndim, minimum=1)
    pads = int_tuple("padding", padding, ndim, minimum=0)
    dils = int_tuple("dilation", dilation, ndim, minimum=1)
    out_pads = int_tuple("output_padding", output_padding, ndim, minimum=0)
    if in_channels % groups:
        raise ValueError(f"groups={groups} must divide in_channels={in_channels}")
    if out_channels % groups:
        raise ValueError(f"groups={groups} must divide out_channels={out_channels}")
    if transposed:
        out = tuple(
            conv_transpose_output_size(*args) for args in zip(size, kernel, strides, pads, dils, out_pads, strict=True)
        )
    else:
        out = tuple(conv_output_size(*args) for args in zip(size, kernel, strides, pads, dils, strict=True))
    return ConvShape(batch, in_channels, out_channels, groups, size, out, kernel, transposed)


def conv_flops(
    batch: int,
    in_channels: int,
    out_channels: int,
    input_size: int | Iterable[int],
    kernel_size: int | Iterable[int],
    *,
    stride: int | Iterable[int] = 1,
    padding: int | Iterable[int] = 0,
    dilation: int | Iterable[int] = 1,
    groups: int = 1,
    transposed: bool = False,
    output_padding: int | Iterable[int] = 0,
) -> int:
    """Forward FLOPs of a 1d/2d/3d (transposed) convolution, bias add excluded.

    Regular: 2 * N * C_out * prod(out spatial) * (C_in / groups) * prod(kernel): every output element is a dot
    product over its receptive field. Transposed: 2 * N * C_in * prod(in spatial) * (C_out / groups) * prod(kernel):
    every input element scatters into a kernel-sized window. Both equal FlopCounterMode's ``conv_flop_count``.
    NB: products with padded zeros (and, for transposed conv, with outputs cropped by ``padding``) are counted,
    as every implementation computes them. The lecture notes counted MACs plus bias adds here.
    """
    s = conv_shape(
        batch, in_channels, out_channels, input_size, kernel_size, stride=stride, padding=padding,
        dilation=dilation, groups=groups, transposed=transposed, output_padding=output_padding,
    )
    return _conv_shape_flops(s)


def _conv_shape_flops(s: ConvShape) -> int:
    return conv_flops_from_shapes(
        s.batch, s.in_channels, s.out_channels, s.kernel_size, input_size=s.input_size, output_size=s.output_size,
        groups=s.groups, transposed=s.transposed,
    )


def conv_flops_from_shapes(
    batch: int,
    in_channels: int,
    out_channels: int,
    kernel_size: Iterable[int],
    *,
    input_size: Iterable[int],
    output_size: Iterable[int],
    groups: int = 1,
    transposed: bool = False,
) -> int:
    """:func:`conv_flops` from the input and output spatial sizes (for ``padding="same"`` and other cases where
    the output size is known rather than the padding)."""
    per_group = (out_channels if transposed else in_channels) // positive_int("groups", groups)
    positions = prod(input_size if transposed else output_size)
    channels = in_channels if transposed else out_channels
    return 2 * positive_int("batch", batch) * channels * positions * per_group * prod(kernel_size)


def conv_backward_flops(forward_flops: int, *, input_grad: bool = True, weight_grad: bool = True) -> int:
    """Backward FLOPs of a convolution: its data-grad and its weight-grad each cost one forward.

    The data-grad is the transposed convolution of the output gradient and the weight-grad the correlation of the
    input with it; each touches the same MACs as the forward (FlopCounterMode's ``conv_backward_flop``).
    """
    return non_negative_int("forward_flops", forward_flops) * (int(input_grad) + int(weight_grad))


# --------------------------------------------------------------------------------------------------- attention

ATTENTION_CONVENTIONS: tuple[str, ...] = ("dense", "causal", "window")


def attention_convention(causal: bool = False, window: int | None = None) -> str:
    """The name of an attention counting convention: ``dense`` (every query-key pair, what SDPA's kernels compute
    with or without a mask), ``causal`` (halved) or ``window W`` (the pairs a causal window of W keys attends)."""
    if window is not None:
        return f"window {positive_int('window', window)}"
    return "causal" if causal else "dense"


def window_pairs(q_len: int, kv_len: int, window: int) -> int:
    """(query, key) pairs that causal sliding-window attention attends: query i (at position kv_len - q_len + i)
    sees the keys at positions max(0, p - window + 1) .. p, i.e. min(p + 1, window) of them.

    Exact: sum over p of min(p + 1, w) = S(kv_len) - S(kv_len - q_len), with S(n) = n(n + 1)/2 for n <= w and
    w(w + 1)/2 + (n - w) w beyond. A window at least kv_len long gives the causal triangle T(T + 1)/2 (diagonal
    included, unlike the ``causal`` halving's T^2/2).
    """
    positive_int("q_len", q_len)
    positive_int("kv_len", kv_len)
    positive_int("window", window)
    if q_len > kv_len:
        raise ValueError(f"q_len={q_len} exceeds kv_len={kv_len}: a causal query needs its own key")

    def prefix(n: int) -> int:
        if n <= window:
            return n * (n + 1) // 2
        return window * (window + 1) // 2 + (n - window) * window

    return prefix(kv_len) - prefix(kv_len - q_len)


def attention_flops(
    batch: int,
    n_heads: int,
    q_len: int,
    kv_len: int,
    head_dim: int,
    *,
    v_head_dim: int | None = None,
    causal: bool = False,
    softmax_flops_per_element: int = 0,
    window: int | None = None,
) -> int:
    """Forward FLOPs of scaled dot-product attention: QK^T (2 B H Tq Tk d) plus AV (2 B H Tq Tk d_v).

    Default: dense, no softmax, as FlopCounterMode counts ``scaled_dot_product_attention`` and PaLM's MFU counts
    attention (12LHQT per token over forward and backward). The projections are Linear layers, counted apart.
    Grouped-query attention costs the same here: every query head attends over all keys.

    Args:
        causal: halve the count, as FlashAttention's benchmarks and current Megatron do for a causal mask.
            NB: exact halving ignores the diagonal (T(T+1)/2 entries, not T^2/2), as both of those do.
        softmax_flops_per_element: add this many FLOPs per score (0 by default; Chinchilla App. F uses 3,
            a numerically stable softmax is about 5: max, subtract, exp, sum, divide).
        window: count only the (query, key) pairs that a causal sliding window of ``window`` keys attends
            (:func:`window_pairs`, exact), in place of the dense count or the causal halving. NB: SDPA given a
            window mask still computes every score; this counts the work a windowed kernel needs.
    """
    positive_int("batch", batch)
    positive_int("n_heads", n_heads)
    positive_int("q_len", q_len)
    positive_int("kv_len", kv_len)
    positive_int("head_dim", head_dim)
    dv = head_dim if v_head_dim is None else positive_int("v_head_dim", v_head_dim)
    non_negative_int("softmax_flops_per_element", softmax_flops_per_element)
    pairs = q_len * kv_len if window is None else window_pairs(q_len, kv_len, window)
    scores = batch * n_heads * pairs
    flops = 2 * scores * head_dim + 2 * scores * dv + softmax_flops_per_element * scores
    return flops // 2 if causal and window is None else flops


def attention_backward_flops(
    batch: int,
    n_heads: int,
    q_len: int,
    kv_len: int,
    head_dim: int,
    *,
    v_head_dim: int | None = None,
    causal: bool = False,
    recompute_scores: bool = False,
    window: int | None = None,
) -> int:
    """Backward FLOPs of attention's two matmuls: 2x their forward (grads of Q and K through QK^T, of P and V
    through AV), plus one more QK^T when the kernel recomputes the scores instead of saving them.

    ``recompute_scores=True`` is what fused flash/memory-efficient kernels do (FlopCounterMode counts their backward
    as 5 bmm-equivalents, 2.5x the forward); the default (2x) is the math path and PaLM's/nanoGPT's convention.
    Softmax backward is elementwise and not counted. ``window``: the pairs of a causal sliding window only.
    """
    dv = head_dim if v_head_dim is None else v_head_dim
    fwd = attention_flops(batch, n_heads, q_len, kv_len, head_dim, v_head_dim=dv, window=window)
    flops = 2 * fwd
    if recompute_scores:  # QK^T once more, over the same pairs
        pairs = q_len * kv_len if window is None else window_pairs(q_len, kv_len, window)
        flops += 2 * batch * n_heads * pairs * head_dim
    return flops // 2 if causal and window is None else flops


# --------------------------------------------------------------------------------------------------- transformers


def layer_forward_flops_breakdown(
    spec: ModelSpec, batch: int, seq_len: int, *, causal: bool = False, softmax_flops_per_element: int = 0,
    window: int | None = None,
) -> dict[str, int]:
    """Forward FLOPs of one transformer block of ``spec`` on ``batch`` sequences of ``seq_len`` tokens, by matmul.

    Keys: ``attn.qkv`` (query, key and value projections), ``attn.scores`` (QK^T), ``attn.av`` (attention x V),
    ``attn.out`` (output projection), for a Mixture of Experts ``moe.router`` (d_model -> n_experts logits), and
    ``mlp.<matrix>`` (the family's matrices: ``fc``/``proj`` for GELU, ``gate``/``up``/``down`` for SwiGLU and for
    the experts). Norms, activations, residual adds, bias adds, the router's softmax and top-k, and the experts'
    gathers and weighted sums are not counted (see the module docstring).

    A Mixture of Experts runs each of the B T tokens through ``experts_per_token`` experts: B T k rows in all pass
    through the experts' matrices, however the router spreads them (expert e gets n_e rows with sum n_e = B T k,
    and every matmul is linear in its rows), so the count is exact whatever the routing's balance.
    ``window``: count attention over the pairs of a causal sliding window of that many keys (:func:`window_pairs`).
    """
    positive_int("batch", batch)
    positive_int("seq_len", seq_len)
    n = batch * seq_len
    d, f = spec.d_model, spec.d_ff
    fam = spec.description
    non_negative_int("softmax_flops_per_element", softmax_flops_per_element)
    heads = batch * spec.n_heads
    if window is None:
        qk = bmm_flops(heads, seq_len, spec.head_dim, seq_len)  # (B*H, T, hd) x (B*H, hd, T)
        av = bmm_flops(heads, seq_len, seq_len, spec.head_dim)  # (B*H, T, T) x (B*H, T, hd)
        qk += softmax_flops_per_element * heads * seq_len * seq_len
        if causal:
            qk, av = qk // 2, av // 2
    else:  # the (query, key) pairs a causal window attends, exactly
        pairs = heads * window_pairs(seq_len, seq_len, window)
        qk = 2 * pairs * spec.head_dim + softmax_flops_per_element * pairs
        av = 2 * pairs * spec.head_dim
    out = {
        "attn.qkv": matmul_flops(n, d, spec.q_dim + 2 * spec.kv_dim),
        "attn.scores": qk,
        "attn.av": av,
        "attn.out": matmul_flops(n, spec.q_dim, d),
    }
    rows = n
    if fam.moe:
        out["moe.router"] = matmul_flops(n, d, spec.n_experts)
        rows = n * spec.experts_per_token  # token-rows through the experts, in all
    *inner, last = fam.mlp_names
    for name in inner:
        out[f"mlp.{name}"] = matmul_flops(rows, d, f)
    out[f"mlp.{last}"] = matmul_flops(rows, f, d)
    return out


def layer_forward_flops(spec: ModelSpec, batch: int, seq_len: int, *, causal: bool = False,
                        window: int | None = None) -> int:
    """Forward FLOPs of one transformer block (sum of :func:`layer_forward_flops_breakdown`)."""
    return sum(layer_forward_flops_breakdown(spec, batch, seq_len, causal=causal, window=window).values())


def lm_head_flops(spec: ModelSpec, batch: int, seq_len: int) -> int:
    """Forward FLOPs of the LM head over all positions: 2 * B * T * d_model * vocab (training computes every logit)."""
    return matmul_flops(positive_int("batch", batch) * positive_int("seq_len", seq_len), spec.d_model, spec.vocab_size)


@dataclass(frozen=True)
class ModelFlops:
    """FLOPs of one micro-batch through a model: forward, backward, and recomputation under checkpointing."""

    forward: int
    backward: int
    recompute: int
    tokens: int

    @property
    def train(self) -> int:
        """Forward + backward + recompute: one micro-batch of training."""
        return self.forward + self.backward + self.recompute

    @property
    def per_token_train(self) -> float:
        return self.train / self.tokens


def model_flops(
    spec: ModelSpec,
    batch: int,
    seq_len: int,
    *,
    checkpointing: str = "none",
    causal: bool = False,
    recompute_attention_scores: bool = False,
    checkpoint_early_stop: bool = True,
    window: int | None = None,
) -> ModelFlops:
    """FLOPs of one micro-batch of ``batch`` sequences of ``seq_len`` tokens through the whole model of ``spec``.

    Forward: every block plus the LM head over all positions (embedding lookups cost no FLOPs).
    Backward: data-grad + weight-grad of every matmul, i.e. exactly 2x the forward, because every matmul's input
    depends on trainable parameters (the embedding, the norms) and so needs its gradient;
    ``recompute_attention_scores`` adds the QK^T that fused attention kernels recompute.
    Recompute: ``full`` checkpointing runs each block's forward again in the backward (the LM head is not
    checkpointed), ``every-other`` that of blocks 0, 2, 4, ...; ``selective`` recomputes only the attention core
    (QK^T and AV), as Korthikanti et al. 2022 do (the modes: :mod:`torchledger.formulas.vocabulary`).
    NB: PyTorch's non-reentrant ``torch.utils.checkpoint`` stops recomputing once every tensor the backward needs
    is back (``set_checkpoint_early_stop``, on by default), so a block's last matmul (the MLP's down projection,
    whose output nothing saves) is not run again: ``checkpoint_early_stop=False`` counts the whole forward, as
    reentrant checkpointing and Megatron's 96BsLh^2 formula do. A Mixture of Experts block saves every expert's
    down-projection output (its product with the routing weight needs it), so all of it is recomputed.

    ``causal`` halves attention; ``window`` counts the pairs of a causal sliding window exactly
    (:func:`attention_flops`); neither is what SDPA's kernels execute, which is the dense default.

    ``recompute_attention_scores`` describes the attention kernel: fused kernels (flash, memory-efficient, cuDNN,
    PyTorch's CPU flash) recompute QK^T in the backward; the math path (and the meta device) does not.

    Check: GPT-2 small (12 layers, d 768, vocab 50257), B=1, T=1024: forward 291,648,307,200 and forward+backward
    874,944,921,600 FLOPs, as nanoGPT's transformer sizing notebook gives. The lecture notes' "6M FLOP per token"
    for GPT-2 is one block's projections in MACs; one GPT-2 small block is 2*12*768^2 + 4*1024*768 = 17,301,504
    FLOPs per token at T=1024, and the whole forward 284,812,800 FLOPs per token.
    """
    one_of("checkpointing", checkpointing, CHECKPOINTING)
    layer = layer_forward_flops_breakdown(spec, batch, seq_len, causal=causal, window=window)
    layer_fwd = sum(layer.values())
    head = lm_head_flops(spec, batch, seq_len)
    forward = spec.n_layers * layer_fwd + head
    backward = 2 * forward
    if recompute_attention_scores:
        backward += spec.n_layers * layer["attn.scores"]
    recompute = 0
    blocks = len(checkpointed_blocks(checkpointing, spec.n_layers))
    if blocks:
        fam = spec.description
        # the last matmul, whose output nothing saves (a Mixture of Experts saves it for the routing weights)
        last = 0 if fam.moe else layer[f"mlp.{fam.mlp_names[-1]}"]
        recompute = blocks * (layer_fwd - (last if checkpoint_early_stop else 0))
    elif checkpointing == "selective":
        recompute = spec.n_layers * (layer["attn.scores"] + layer["attn.av"])
    return ModelFlops(forward=forward, backward=backward, recompute=recompute, tokens=batch * seq_len)


def train_step_flops(
    spec: ModelSpec, batch: int, seq_len: int, *, grad_accum: int = 1, checkpointing: str = "none",
    causal: bool = False, window: int | None = None,
) -> int:
    """FLOPs of one optimizer step: ``grad_accum`` micro-batches of forward, backward and recompute.

    NB: the optimizer update itself is elementwise (a few FLOPs per parameter) and not counted.
    """
    positive_int("grad_accum", grad_accum)
    return grad_accum * model_flops(spec, batch, seq_len, checkpointing=checkpointing, causal=causal,
                                    window=window).train


def flops_per_token_train(spec: ModelSpec, seq_len: int, *, checkpointing: str = "none", causal: bool = False) -> float:
    """Training FLOPs per token (forward + backward + recompute) at context ``seq_len``; independent of batch size."""
    return model_flops(spec, 1, seq_len, checkpointing=checkpointing, causal=causal).per_token_train


def mfu(tokens_per_second: float, flops_per_token: float, peak_flops_per_second: float) -> float:
    """Model FLOPs utilization: achieved model FLOP/s over the hardware peak (PaLM, App. B).

    Pass ``flops_per_token`` without recomputation: MFU counts the model's FLOPs, not the hardware's (recompute
    included, the same ratio is HFU).
    """
    positive_number("tokens_per_second", tokens_per_second)
    positive_number("flops_per_token", flops_per_token)
    positive_number("peak_flops_per_second", peak_flops_per_second)
    return tokens_per_second * flops_per_token / peak_flops_per_second


# --------------------------------------------------------------------------------------------------- published


def kaplan_forward_flops_per_token(spec: ModelSpec, n_ctx: int) -> int:
    """Kaplan et al. 2020 (arXiv 2001.08361, Table 1): C_forward = 2N + 2 n_layer n_ctx d_attn per token.

    NB: N is the non-embedding parameter count 2 d_model n_layer (2 d_attn + d_ff) (biases and norms left out), the
    LM head ("de-embed", 2 d_model n_vocab) is dropped, and the context term counts one of the two attention matmuls
    per layer, which equals the dense count halved for a causal mask. Against the exact dense count the difference is
    2 d_model V + 2 n_layer n_ctx d_attn per token.
    """
    positive_int("n_ctx", n_ctx)
    return 2 * _kaplan_n(spec) + 2 * spec.n_layers * n_ctx * spec.q_dim


def kaplan_train_flops_per_token(spec: ModelSpec) -> int:
    """Kaplan et al. 2020, Sec. 2.1: training C ~= 6N per token (the context term dropped; N non-embedding)."""
    return 6 * _kaplan_n(spec)


def _kaplan_n(spec: ModelSpec) -> int:
    """Kaplan's N = 2 d_model n_layer (2 d_attn + d_ff) for MHA with a two-matrix MLP; the exact block weight count
    (which it equals there) for GQA or SwiGLU shapes that the published expression does not describe."""
    if spec.description.mlp == "gelu" and spec.kv_dim == spec.q_dim:
        return 2 * spec.d_model * spec.n_layers * (2 * spec.q_dim + spec.d_ff)
    counts = param_counts(spec)
    return (counts.per_layer_matmul - counts.per_layer_inactive) * spec.n_layers


def palm_train_flops_per_token(spec: ModelSpec, seq_len: int) -> int:
    """Chowdhery et al. 2022, PaLM (arXiv 2204.02311, App. B): 6N + 12 L H Q T training FLOPs per token.

    N is taken as every weight that enters a matmul (:attr:`ParamCounts.matmul`: block weights plus the LM head,
    a tied embedding counted there), as nanoGPT's sizing notebook does. NB: applied to a parameter count that also
    holds biases and norm weights (as "non-embedding parameters" usually does), it charges 6 FLOPs per token to each
    of them, which the exact count does not; with N = matmul weights it equals the exact dense count.
    """
    positive_int("seq_len", seq_len)
    n = param_counts(spec).matmul
    return 6 * n + 12 * spec.n_layers * spec.n_heads * spec.head_dim * seq_len


def megatron_model_flops(batch: int, seq_len: int, n_layers: int, d_model: int, vocab_size: int) -> int:
    """Korthikanti et al. 2022 (arXiv 2205.05198, App. A, eq. 7): 72 B s L h^2 (1 + s/(6h) + V/(12 h L)).

    Model FLOPs of forward and backward without recomputation, expanded to integers:
    72 B L s h^2 + 12 B L s^2 h + 6 B s h V. NB: assumes MHA, a 4h two-matrix MLP and an untied-or-tied head over
    all positions; for GPT-2 style specs it equals the exact count, for SwiGLU/GQA specs it differs.
    """
    b, s, L, h, v = (positive_int(n, x) for n, x in (
        ("batch", batch), ("seq_len", seq_len), ("n_layers", n_layers), ("d_model", d_model), ("vocab_size", vocab_size)
    ))
    return 72 * b * L * s * h * h + 12 * b * L * s * s * h + 6 * b * s * h * v


def megatron_flops_with_recompute(batch: int, seq_len: int, n_layers: int, d_model: int, vocab_size: int) -> int:
    """Narayanan et al. 2021 (arXiv 2104.04473, eq. 3): 96 B s L h^2 (1 + s/(6h) + V/(16 L h)), full recomputation.

    Expanded: 96 B L s h^2 + 16 B L s^2 h + 6 B s h V, i.e. the model FLOPs plus one more forward of every layer.
    """
    b, s, L, h, v = (positive_int(n, x) for n, x in (
        ("batch", batch), ("seq_len", seq_len), ("n_layers", n_layers), ("d_model", d_model), ("vocab_size", vocab_size)
    ))
    return 96 * b * L * s * h * h + 16 * b * L * s * s * h + 6 * b * s * h * v


# --------------------------------------------------------------------------------------------------- small workloads


def mlp_flops(spec: MLPSpec, batch: int, *, input_grad: bool = False) -> ModelFlops:
    """FLOPs of one batch through an :class:`MLPSpec` (ReLU and bias adds not counted).

    Backward: every layer's weight-grad, and the data-grad of every layer but the first unless ``input_grad``
    (the input batch needs no gradient): a two-layer MLP of equal layers costs 2.5x its forward in all.
    """
    positive_int("batch", batch)
    layers = list(pairwise(spec.dims))
    forward = sum(linear_flops(batch, a, b) for a, b in layers)
    backward = sum(
        linear_backward_flops(batch, a, b, input_grad=input_grad or i > 0) for i, (a, b) in enumerate(layers)
    )
    return ModelFlops(forward=forward, backward=backward, recompute=0, tokens=batch)


def cnn_flops(spec: CNNSpec, batch: int, *, input_grad: bool = False) -> ModelFlops:
    """FLOPs of one batch of images through a :class:`CNNSpec`: 3x3 same-padding convolutions and the Linear head.

    Pooling, ReLU and bias adds are not counted; the first convolution skips its data-grad (the images need none).
    """
    positive_int("batch", batch)
    widths = (spec.in_channels, *spec.channels)
    hw = (spec.image_size, spec.image_size)
    forward = backward = 0
    for i, (cin, cout) in enumerate(pairwise(widths)):
        conv = conv_flops(batch, cin, cout, hw, 3, padding=1)
        forward += conv
        backward += conv_backward_flops(conv, input_grad=input_grad or i > 0)
    head = linear_flops(batch, spec.channels[-1], spec.n_classes)
    return ModelFlops(forward=forward + head, backward=backward + 2 * head, recompute=0, tokens=batch)
