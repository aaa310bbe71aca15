"""Implementation profiles: the memory timeline of a training step as Hugging Face transformers runs the model.

The reference transformers (:mod:`torchledger.workloads.models`) and transformers' models of the same shape hold
different tensors. A profile walks the step op by op as transformers' source runs it (``modeling_gpt2.py``,
``modeling_llama.py``, ``modeling_mistral.py``, ``integrations/sdpa_attention.py``, ``loss/loss_utils.py``), on the
same :class:`torchledger.formulas.timeline.Graph` as the reference walk, for a model built as
:mod:`torchledger.workloads.hf` builds it: SDPA attention, dropout off, no KV cache. What differs, by mechanism:

- **GPT-2's ``gelu_new``** (``NewGELUActivation``) is Python: ``0.5 * x * (1 + tanh(sqrt(2/pi) * (x + 0.044715 *
  x**3)))``. ``pow`` saves its input, ``tanh`` its output, the last ``mul`` both of its operands (``0.5 * x`` and
  ``1 + tanh(...)``): four tensors of the MLP's width saved where ``F.gelu`` saves one. Its backward runs the eight
  nodes (``mul``, ``add``, ``tanh``, ``mul``, ``add``, ``mul``, ``pow``, ``mul``) with their own temporaries.
- **GPT-2's ``Conv1D``** is ``torch.addmm(bias, x.view(-1, nx), weight)``: the same saved tensors and gradients as a
  Linear layer.
- **GPT-2's embeddings**: ``inputs_embeds`` and ``position_embeds`` stay referenced by ``GPT2Model.forward`` until it
  returns; the position ids are ``arange(T) + past_seen_tokens`` (a second int64 tensor); ``input_ids.view(-1, T)``
  hands the caller's ids to an op, so the storage tracker counts them from then on (not on CUDA, whose measurement
  leaves the caller's inputs out).
- **Python locals**: a block's intermediate tensors live until the variable holding them is reassigned or the
  function returns (``GPT2Block``'s ``attn_output`` to the end of the block, the norms' outputs to the next residual
  sum; ``LlamaAttention``'s projections until both rotations are made, its rotated query and key until it returns).
- **LLaMA's and Mistral's RMSNorm** (``LlamaRMSNorm``) is Python: ``x.to(float32)``, ``pow(2)``, ``mean``, ``+ eps``,
  ``rsqrt``, ``x * rstd``, ``.to(input_dtype)``, ``weight * x``. It saves the fp32 input (``pow`` and ``mul``), the
  fp32 rstd and the normalized tensor (``weight * x``, in the input's dtype); its backward makes the products of
  both ``mul`` nodes (reduced to the weight's and the rstd's shapes), ``mean``'s expanded gradient, and ``pow``'s
  ``grad * (2 * x.pow(1))`` (C++ temporaries alive to the end of the expression).
- **Rotary tables**: ``LlamaRotaryEmbedding`` computes cos and sin (1 x T x head_dim, fp32) in each forward from
  its ``inv_freq`` buffers (head_dim / 2 each: ``inv_freq`` and ``original_inv_freq``); every layer's
  ``q * cos`` and ``rotate_half(q) * sin`` save them. Under checkpointing the layers' ``functools.partial`` keeps them
  (and the position ids) until the last checkpointed layer's backward.
- **Attention**: with no padding mask, ``create_causal_mask`` returns None under SDPA and ``sdpa_attention_forward``
  passes ``is_causal=True`` (and ``enable_gqa`` for grouped-query attention): the fused kernel runs, as in the
  reference. Under autocast SDPA casts the fp32 rotated query and key (``q * cos`` promotes to fp32) to 16 bits.
  Mistral's ``sliding_window`` makes a mask once the sequence reaches it (``kv_length >= sliding_window``): a boolean
  T x T, ``repeat_kv``'s copies of the key and value (views from a single key/value head), and SDPA's additive
  B x 1 x T x T mask, which the kernel saves.
- **Checkpointing** (``gradient_checkpointing_enable``: non-reentrant ``torch.utils.checkpoint`` per decoder layer):
  as the reference walks it, except that the layer's last op, the residual sum, saves nothing, so its backward (the
  16-bit branch's gradient cast) runs before the recomputation starts.
- **The loss** (``ForCausalLMLoss``): ``logits.float()`` (an fp32 copy unless fp32, on every device), the labels
  padded by one (``nn.functional.pad``) and shifted (``labels[..., 1:].contiguous()``, saved by ``nll_loss`` and
  released as its backward returns), then ``F.cross_entropy`` with ``ignore_index=-100``.

NB: read from transformers 5.24's source; other releases may save other tensors.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

from ._validate import one_of, positive_int
from .activations import Activations
from .memory import OPTIMIZER_STATES, dtype_bytes, get_recipe, model_state_bytes
from .peak import TrainPeak
from .specs import ModelSpec, check_seq_len, param_counts
from .timeline import Node, Param, StepConfig, StepTimeline, _TransformerStep, _walk
from .vocabulary import OPTIMIZER_IMPLS, STEP_CHECKPOINTING

HF_MODEL_TYPES = ("gpt2", "llama", "mistral")
IMPLEMENTATIONS = ("reference", "hf")


@dataclass(frozen=True)
class HFProfile:
    """What transformers runs for one config: its ``model_type``, GPT-2's ``activation_function`` and Mistral's
    ``sliding_window`` (None: full attention)."""

    model_type: str
    activation: str = "gelu_new"
    sliding_window: int | None = None

    def __post_init__(self) -> None:
        if self.model_type not in HF_MODEL_TYPES:
            raise ValueError(f"model_type={self.model_type!r} has no implementation profile; profiles: "
                             f"{', '.join(HF_MODEL_TYPES)}")
        if self.activation not in _GELUS:
            raise ValueError(f"activation_function={self.activation!r} has no implementation profile; profiles: "
                             f"{', '.join(_GELUS)}")

    @property
    def family(self) -> str:
        return "gpt2" if self.model_type == "gpt2" else "llama"


# GPT-2's activation_function values walked: the Python tanh form, and PyTorch's own kernels
_GELUS = ("gelu_new", "gelu_pytorch_tanh", "gelu")


def hf_profile(config: str | os.PathLike[str] | dict[str, Any]) -> HFProfile:
    """The implementation profile of a Hugging Face ``config.json`` (a path or the parsed dict)."""
    if isinstance(config, dict):
        data = config
    else:
        with open(config, encoding="utf-8") as f:
            data = json.load(f)
        if not isinstance(data, dict):
            raise ValueError(f"config={os.fspath(config)!r} is not a JSON object")
    model_type = data.get("model_type")
    window = data.get("sliding_window") if model_type == "mistral" else None
    if window is not None and (not isinstance(window, int) or isinstance(window, bool) or window < 1):
        raise ValueError(f"sliding_window={window!r} must be a positive integer or null")
    return HFProfile(str(model_type), str(data.get("activation_function", "gelu_new")), window)


def hf_profile_or_none(config: str | os.PathLike[str] | dict[str, Any]) -> HFProfile | None:
    """:func:`hf_profile`, or None for a config it has no profile for (another ``model_type``, another GPT-2
    ``activation_function``): the reference transformer's walk is then the prediction."""
    try:
        return hf_profile(config)
    except ValueError:
        return None


class _HFStep(_TransformerStep):
    """The step of :class:`_TransformerStep` with transformers' blocks, embeddings, rotary tables and loss."""

    def __init__(self, spec: ModelSpec, profile: HFProfile, batch: int, seq_len: int, config: StepConfig,
                 device: str) -> None:
        if profile.family != spec.family:
            raise ValueError(f"model_type={profile.model_type!r} does not build a {spec.family}-family spec")
        super().__init__(spec, batch, seq_len, config, device)
        # ``logits.float()`` makes the fp32 copy on every device: cross-entropy reads fp32 logits, so CUDA's
        # log_softmax of 16-bit logits (a device term of the reference walk) never runs
        self.tl.terms = replace(self.tl.terms, log_softmax_half_to_float=False)
        self.profile = profile
        self.hold: list[int] = []  # what each checkpointed layer's functools.partial keeps (cos, sin, position ids)
        self.cos = self.sin = self.mask = -1  # the forward's rotary tables and Mistral's window mask
        self.saved: dict[str, int] = {}  # bytes saved for backward at the end of the first forward, by part
        self.residual: dict[int, tuple[int, int]] = {}  # a residual sum's output -> its operands

    def buffer_bytes(self, spec: ModelSpec, config: StepConfig) -> int:
        """transformers' LLaMA and Mistral hold ``inv_freq`` and ``original_inv_freq`` (head_dim / 2 each, fp32 in
        every recipe: the rope init computes them from an fp32 arange, and from_config's dtype leaves buffers as
        made) where the reference holds its cos and sin tables, and compute the tables in each forward."""
        return spec.head_dim * 4 if spec.family == "llama" else 0

    # -- helpers
    def _release_saved(self, n: Node, *ts: int) -> None:
        """Release some of a node's saved tensors (those it holds: under checkpointing it may hold none)."""
        for t in ts:
            if t in n.saved:
                n.saved.remove(t)
                self.tl.unref(t)

    def _save(self, n: Node, *ts: int) -> None:
        for t in ts:
            self.graph.save(n, t)

    # -- GPT-2
    def _gelu(self, label: str, u: int) -> int:
        """``ACT2FN[activation_function]`` of the MLP's hidden tensor ``u``: ``gelu_new`` op by op (see the module
        docstring); ``gelu`` and ``gelu_pytorch_tanh`` are ``F.gelu`` (saves its input)."""
        G, F = self.graph, self.rows * self.spec.d_ff * self.c
        if self.profile.activation != "gelu_new":
            out = G.new(F, label)
            G.node(label, out, [u], [(u, F, "grad", 0)])
            return out
        half = G.new(F, f"{label} 0.5*x")
        cube = G.new(F, f"{label} pow")
        scaled = G.new(F, f"{label} 0.044715*x**3")
        G.drop(cube)
        inner = G.new(F, f"{label} x+")
        G.drop(scaled)
        arg = G.new(F, f"{label} sqrt(2/pi)*")
        G.drop(inner)
        th = G.new(F, f"{label} tanh")
        G.drop(arg)
        one = G.new(F, f"{label} 1+tanh")
        out = G.new(F, label)

        def backward(n: Node) -> None:
            gout = G.buffer.pop(out)
            # mul(half, one): grad * one, then grad * half
            d_half = G.new(F, f"{label} grad 0.5*x")
            d_one = G.new(F, f"{label} grad 1+tanh")
            self._release_saved(n, half, one)
            G.drop(gout)
            # add(1, tanh) passes d_one; tanh_backward(grad, tanh)
            d_arg = G.new(F, f"{label} grad tanh")
            self._release_saved(n, th)
            G.drop(d_one)
            d_inner = G.new(F, f"{label} grad sqrt(2/pi)*")  # mul by a scalar
            G.drop(d_arg)
            # add(x, 0.044715*x**3) passes d_inner to both: x's buffer and the scalar mul
            G.tl.ref(d_inner)
            G.route(u, d_inner)
            d_cube = G.new(F, f"{label} grad 0.044715*")
            G.drop(d_inner)
            # pow_backward: grad * (3 * x.pow(2))
            sq = G.new(F, f"{label} grad pow x.pow(2)")
            three = G.new(F, f"{label} grad pow 3*")
            d_pow = G.new(F, f"{label} grad pow")  # the temporaries live to the end of the C++ expression
            G.drop(sq, three, d_cube)
            self._release_saved(n, u)
            G.route(u, d_pow)
            d_x = G.new(F, f"{label} grad 0.5*")  # mul(x, 0.5)
            G.drop(d_half)
            G.route(u, d_x)
            n.saved.clear()

        n = G.node(label, out, backward=backward)
        self._save(n, u, th, half, one)
        G.drop(half, th, one)
        return out

    def gpt_block(self, i: int, x: int) -> int:
        s, G, ps = self.spec, self.graph, self.ps
        b = f"block {i} "

        def bias(name: str) -> Param | None:
            return ps.get(b + name)

        # GPT2Block.forward's locals: ln_1's output lives until ``hidden_states`` is reassigned (the attention
        # residual), ``attn_output`` until the block returns, ln_2's output until the MLP residual
        h = self.layer_norm(b + "ln_1", x, ps[b + "ln_1.weight"], ps[b + "ln_1.bias"])
        qkv = self.proj(b + "attn.qkv", h, ps[b + "attn.qkv.weight"], s.q_dim + 2 * s.kv_dim, bias("attn.qkv.bias"))
        y = self.sdpa(b + "attn.sdpa", qkv, qkv, qkv, qkv)
        G.drop(qkv)
        a = self.proj(b + "attn.proj", y, ps[b + "attn.proj.weight"], s.d_model, bias("attn.proj.bias"))
        G.drop(y)
        G.tl.ref(a)
        x2 = self.residual_add(b + "attn residual", x, a)
        G.drop(h)
        h = self.layer_norm(b + "ln_2", x2, ps[b + "ln_2.weight"], ps[b + "ln_2.bias"])
        u = self.proj(b + "mlp.fc", h, ps[b + "mlp.fc.weight"], s.d_ff, bias("mlp.fc.bias"))
        gelu = self._gelu(b + "mlp.gelu", u)
        G.drop(u)
        m = self.proj(b + "mlp.proj", gelu, ps[b + "mlp.proj.weight"], s.d_model, bias("mlp.proj.bias"))
        G.drop(gelu)
        out = self.residual_add(b + "mlp residual", x2, m)
        G.drop(h, x2, a)
        return out

    # -- LLaMA, Mistral
    def rms_norm(self, label: str, x: int, w: Param) -> int:
        """``LlamaRMSNorm`` op by op (see the module docstring); returns its output (fp32 under autocast)."""
        G, rows, d = self.graph, self.rows, self.spec.d_model
        full, row = rows * d * 4, rows * 4
        out_bytes = rows * d * (4 if self.r.autocast else self.p)
        x32 = x if self.res == 4 else G.new(full, f"{label} to(float32)")
        sq = G.new(full, f"{label} pow")
        mean = G.new(row, f"{label} mean")
        G.drop(sq)
        var = G.new(row, f"{label} +eps")
        G.drop(mean)
        rstd = G.new(row, f"{label} rsqrt")
        G.drop(var)
        normed = G.new(full, f"{label} x*rstd")
        cast = normed if self.res == 4 else G.new(rows * d * self.res, f"{label} to(input_dtype)")
        out = G.new(out_bytes, label)

        def backward(n: Node) -> None:
            gout = G.buffer.pop(out)
            # mul(weight, normed): grad * normed (summed to the weight's shape), then grad * weight
            d_w_full = G.new(out_bytes, f"{label} grad weight (full)")
            d_cast = G.new(rows * d * self.res, f"{label} grad normed")
            self._release_saved(n, cast)
            G.drop(gout)
            d_w = G.new(d * self.g, f"{label} weight grad")
            G.drop(d_w_full)
            G.route(w, d_w)
            if cast != normed:
                d_cast = G.convert(d_cast, full, f"{label} grad to(float32)")
            # mul(x32, rstd): grad * rstd, then grad * x32 (summed to rows)
            d_x32 = G.new(full, f"{label} grad x")
            d_rstd_full = G.new(full, f"{label} grad rstd (full)")
            G.drop(d_cast)
            d_rstd = G.new(row, f"{label} grad rstd")
            G.drop(d_rstd_full)
            if x32 == x:  # the node is done: its input's gradient goes to the input's buffer now
                G.route(x, d_x32)
            # rsqrt: -0.5 * grad * rstd**3 (row-sized); mean: grad.expand(x) / d
            d_var = G.new(row, f"{label} grad rsqrt")
            self._release_saved(n, rstd)
            G.drop(d_rstd)
            d_sq = G.new(full, f"{label} grad mean")
            G.drop(d_var)
            # pow_backward: grad * (2 * x.pow(1))
            p1 = G.new(full, f"{label} grad pow x.pow(1)")
            two = G.new(full, f"{label} grad pow 2*")
            d_pow = G.new(full, f"{label} grad pow")  # the temporaries live to the end of the C++ expression
            G.drop(p1, two, d_sq)
            self._release_saved(n, x32)
            n.saved.clear()
            if x32 == x:
                G.route(x, d_pow)
            else:
                summed = G.new(full, f"{label} grad sum")
                G.drop(d_x32, d_pow)
                G.route(x, G.convert(summed, rows * d * self.res, f"{label} grad to(input_dtype)"))

        # ``x32 * rstd`` saves both operands, ``weight * normed`` the normed tensor (its 16-bit cast for a 16-bit
        # input, the fp32 one then going as soon as the cast is made)
        n = G.node(label, out, backward=backward)
        self._save(n, x32, rstd, cast)
        G.drop(rstd, normed)
        if cast != normed:
            G.drop(cast)
        if x32 != x:
            G.drop(x32)
        return out

    def _attention_input(self, label: str, t: int, width: int) -> int:
        """SDPA's autocast cast of an fp32 input to 16 bits (a new tensor), or ``t`` itself."""
        if not self.r.autocast or self.tl.size(t) == self.rows * width * self.c:
            return t
        return self.graph.new(self.rows * width * self.c, f"{label} cast")

    def hf_attention(self, label: str, q: int, k: int, v: int) -> int:
        """``sdpa_attention_forward``: without a mask, SDPA with ``is_causal`` (and ``enable_gqa``) on the rotated
        query and key and the value; with Mistral's window mask, ``repeat_kv`` first copies the key and value to
        every query head (``expand`` + ``reshape``: its backward sums them back), and SDPA converts the boolean mask
        to an additive one (B x 1 x T x T in the query's dtype, saved). Under autocast SDPA casts its fp32 inputs
        to 16 bits (``_to_copy``: its backward casts the gradient back). The kernel saves its inputs, its output
        and the fp32 log-sum-exp; its backward makes dq, dk, dv."""
        s, G, rows, T, c = self.spec, self.graph, self.rows, self.seq, self.c
        masked = self.mask >= 0
        kw = s.q_dim if masked and s.n_heads != s.n_kv_heads else s.kv_dim
        copies, bases, per = [], [], {q: self.tl.size(q) // (rows * s.q_dim)}
        if kw != s.kv_dim:
            # repeat_kv: expand to every query head, then reshape: a copy, freed as sdpa_attention_forward returns,
            # except from one key/value head, where the reshape is a view (a 0-byte handle here) of the base, which
            # SDPA's saved view then keeps. Its backward sums the heads' gradients back (``expand``'s backward).
            view = s.n_kv_heads == 1
            for name, t in (("k", k), ("v", v)):
                per[t] = self.tl.size(t) // (rows * s.kv_dim)
                r = G.new(0 if view else rows * kw * per[t], f"{label} repeat_kv {name}")
                per[r] = per[t]
                G.node(f"{label} repeat_kv {name}", r, grads=[(t, rows * s.kv_dim * per[t], "grad (sum)", 0)])
                copies.append(r)
                if view:
                    bases.append(t)
            k, v = copies
        else:
            per[k], per[v] = self.tl.size(k) // (rows * kw), self.tl.size(v) // (rows * kw)
        inputs = []
        for name, t, width in (("q", q, s.q_dim), ("k", k, kw), ("v", v, kw)):
            if self.r.autocast and per[t] == 4:  # autocast's cast to 16 bits
                t16 = G.new(rows * width * c, f"{label} {name} cast")
                G.node(f"{label} {name} cast", t16, grads=[(t, rows * width * 4, "grad", 0)])
                inputs.append(t16)
            else:
                inputs.append(t)
                if t in copies and bases:  # the saved view keeps its base
                    inputs.append(bases[copies.index(t)])
        fmask = G.new(self.batch * T * T * c, f"{label} additive mask") if masked else -1
        out = G.new(rows * s.q_dim * c, f"{label}.sdpa")
        lse = G.new(self.batch * s.n_heads * T * 4, f"{label}.sdpa logsumexp")
        sizes = (rows * s.q_dim * c, rows * kw * c, rows * kw * c)

        targets = [t for t in inputs if t not in bases]  # q, k, v as SDPA takes them (its casts, its views)

        def backward(n: Node) -> None:
            gout = G.buffer.pop(out)
            grads = [G.new(size, f"{label}.sdpa grad") for size in sizes]
            G.release(n, gout)
            for t, grad in zip(targets, grads, strict=True):
                G.route(t, grad)

        G.node(f"{label}.sdpa", out, [*inputs, out, lse, *([fmask] if masked else [])], backward=backward)
        G.drop(lse, *([fmask] if masked else []))
        G.drop(*(t for t in targets if t not in (q, k, v)), *copies)
        return out

    def llama_block(self, i: int, x: int) -> int:

        s, G, ps, rows = self.spec, self.graph, self.ps, self.rows
        b = f"block {i} "
        # LlamaDecoderLayer's and LlamaAttention's locals: the norm's output lives until the attention returns;
        # the projections until both rotations are made; the rotated q and k and v until the attention returns
        h = self.rms_norm(b + "norm_1", x, ps[b + "norm_1.weight"])
        q = self.proj(b + "attn.q", h, ps[b + "attn.q.weight"], s.q_dim, None)
        k = self.proj(b + "attn.k", h, ps[b + "attn.k.weight"], s.kv_dim, None)
        v = self.proj(b + "attn.v", h, ps[b + "attn.v.weight"], s.kv_dim, None)
        G.tl.ref(q)
        G.tl.ref(k)
        # the forward's cos and sin tables, saved by both products: the nodes keep them alive
        q_rot = self.rotary(b + "attn.q rotary", q, s.q_dim, tables=(self.cos, self.sin))
        G.drop(q)
        k_rot = self.rotary(b + "attn.k rotary", k, s.kv_dim, tables=(self.cos, self.sin))
        G.drop(k)
        G.drop(q, k)
        y = self.hf_attention(b + "attn", q_rot, k_rot, v)
        a = self.proj(b + "attn.o", y, ps[b + "attn.o.weight"], s.d_model, None)
        G.drop(y, q_rot, k_rot, v, h)
        x2 = self.residual_add(b + "attn residual", x, a)
        h = self.rms_norm(b + "norm_2", x2, ps[b + "norm_2.weight"])
        gate = self.proj(b + "mlp.gate", h, ps[b + "mlp.gate.weight"], s.d_ff, None)
        f = rows * s.d_ff * self.c
        silu = G.new(f, b + "mlp.silu")
        G.node(b + "mlp.silu", silu, [gate], [(gate, f, "grad", 0)])
        G.drop(gate)
        up = self.proj(b + "mlp.up", h, ps[b + "mlp.up.weight"], s.d_ff, None)
        prod = G.new(f, b + "mlp.mul")
        G.node(b + "mlp.mul", prod, [silu, up], [(silu, f, "grad silu", 0), (up, f, "grad up", 0)])
        G.drop(silu, up)
        m = self.proj(b + "mlp.down", prod, ps[b + "mlp.down.weight"], s.d_model, None)
        G.drop(prod, h)  # the norm's output: until the MLP returns
        out = self.residual_add(b + "mlp residual", x2, m)
        G.drop(x2)
        return out

    def block(self, i: int, x: int) -> int:
        return (self.gpt_block if self.spec.family == "gpt2" else self.llama_block)(i, x)

    def residual_add(self, label: str, a: int, branch: int) -> int:
        """The residual sum (saves nothing; its backward passes the gradient to both sides, the 16-bit branch's cast
        down under autocast); notes its operands for :meth:`checkpointed_block`."""
        G = self.graph
        # under checkpointing the recomputation stops before the block's last op (nothing after it is saved)
        stop = G.mode == "recompute" and label.endswith("mlp residual")
        out = G.new(0 if stop else self.rows * self.spec.d_model * self.res, label)
        full = self.rows * self.spec.d_model
        cast = full * self.c if self.c != self.res else 0  # the 16-bit branch beside the stream's dtype

        def backward(n: Node) -> None:
            gout = G.buffer.pop(out)
            G.tl.ref(gout)
            G.route(a, gout)
            G.route(branch, G.convert(gout, cast, f"{label} grad cast") if cast else gout)

        G.node(label, out, backward=backward)
        self.residual[out] = (a, branch)
        G.drop(branch)
        return out

    def checkpointed_block(self, i: int, x: int) -> int:
        """Non-reentrant ``torch.utils.checkpoint`` of a decoder layer, as the reference walks it, with two things
        transformers' layers change: the layer's last op, the residual sum, saves nothing, so autograd runs its
        backward (the 16-bit branch's gradient cast) before anything unpacks a saved tensor and triggers the
        recomputation; and the layer's ``functools.partial`` (its keyword arguments: the rotary tables, the mask,
        the position ids) lives until the layer's backward has run."""
        G = self.graph
        G.mode = "checkpoint"
        start = len(G.nodes)
        G.tl.ref(x)  # saved by the checkpoint's own node (outside its hooks): an activation
        G.tl.recategorize(x, "activations")
        out = self.block(i, x)
        G.mode = "normal"
        del G.nodes[start:]
        held = [self.tl.ref(t) for t in self.hold]
        full = self.rows * self.spec.d_model

        def backward(n: Node) -> None:
            gout = G.buffer.pop(out)
            cast = -1
            if self.c != self.res:  # the residual sum's backward (the branch's cast) runs before the recomputation
                cast = G.new(full * self.c, f"block {i} mlp residual grad cast")
            G.mode = "recompute"
            mark = len(G.nodes)
            saved_cache = dict(self.cache)
            self.cache.clear()
            rec_out = self.block(i, x)
            self.exit_autocast()
            self.cache.update(saved_cache)
            G.mode = "normal"
            nodes = G.nodes[mark:]
            del G.nodes[mark:]
            G.drop(rec_out)  # made empty: the recomputation stops before it
            nodes.pop()  # the residual sum, run above
            a, branch = self.residual.pop(rec_out)
            if cast < 0:
                G.tl.ref(gout)
            G.route(a, gout)
            G.route(branch, gout if cast < 0 else cast)
            for m in reversed(nodes):
                G.run_node(m)
            G.drop(x, *held)

        G.node(f"block {i} checkpoint", out, backward=backward)
        return out

    # -- the model
    def caller_bytes(self) -> int:
        """transformers' loss shifts the labels into new storage (``labels[..., 1:]`` padded or made contiguous): no
        op outputs the caller's batch."""
        return 0

    def forward(self) -> tuple[int, int]:
        s, G, rows, d, T = self.spec, self.graph, self.rows, self.spec.d_model, self.seq
        emb = self.embedding
        if s.family == "gpt2":
            if self.tl.terms.device != "cuda":
                # ``input_ids.view(-1, T)``: a view of the caller's ids, which the storage tracker then counts
                # (CUDA's measurement leaves the caller's inputs out); held by the caller past the step
                G.new(rows * 8, "input_ids view")
            tok = G.new(rows * d * self.p, "wte")
            arange = G.new(T * 8, "position ids arange")
            pos = G.new(T * 8, "position ids")  # arange(T) + past_seen_tokens
            G.drop(arange)
            pe = G.new(T * d * self.p, "wpe")
            x = G.new(rows * d * self.p, "embedding sum")
            wpe = self.ps["wpe"]

            def embed_backward(n: Node, x: int = x) -> None:
                gout = G.buffer.pop(x)
                summed = G.new(T * d * self.g, "wpe grad (sum over the batch)")
                dense = G.new(wpe.numel * self.g, "wpe grad (embedding_dense_backward)")
                G.drop(summed)
                G.release(n)
                dtok = G.new(emb.numel * self.g, "wte grad (embedding_dense_backward)")
                G.drop(gout)
                G.route(wpe, dense)
                G.route(emb, dtok)

            G.node("embedding", x, [pos], backward=embed_backward)
            self.hold = [pos]
            x = self._blocks(x)
            h = self.layer_norm("ln_f", x, self.ps["ln_f.weight"], self.ps["ln_f.bias"])
            G.drop(x, tok, pe, pos)  # GPT2Model.forward returns: its locals go
        else:
            x = G.new(rows * d * self.p, "embed_tokens")

            def embed_backward(n: Node, x: int = x) -> None:
                gout = G.buffer.pop(x)
                dtok = G.new(emb.numel * self.g, "embed_tokens grad (embedding_dense_backward)")
                G.drop(gout)
                G.route(emb, dtok)

            G.node("embedding", x, backward=embed_backward)
            arange = G.new(T * 8, "position ids arange")
            pos = G.new(T * 8, "position ids")
            G.drop(arange)
            window = self.profile.sliding_window
            if window is not None and window <= T:
                # create_sliding_window_causal_mask: _ignore_causal_mask_sdpa skips the mask only below the window;
                # sdpa_mask builds a boolean 1 x 1 x T x T (expanded over the batch)
                self.mask = G.new(T * T, "sliding window mask")
            # LlamaRotaryEmbedding: position_ids[..., None].float() * inv_freq, cat, cos and sin (each times the
            # attention scaling: a second tensor), returned as ``.to(x.dtype)``: copies in the hidden states' dtype
            # where the weights are 16-bit (a *-true recipe; under autocast the embeddings stay fp32)
            hd = s.head_dim
            pos_f = G.new(T * 4, "rotary position ids float")
            freqs = G.new(T * hd // 2 * 4, "rotary freqs")
            G.drop(pos_f)
            cat = G.new(T * hd * 4, "rotary cat")
            G.drop(freqs)
            tables = []
            for name in ("cos", "sin"):
                raw = G.new(T * hd * 4, f"rotary {name}")
                tables.append(G.new(T * hd * 4, f"rotary {name} * attention_scaling"))
                G.drop(raw)
            if self.p != 4:
                fp32 = tables
                tables = [G.new(T * hd * self.p, f"rotary {name} to the hidden dtype") for name in ("cos", "sin")]
                G.drop(*fp32)
            G.drop(cat)
            self.cos, self.sin = tables
            self.hold = [self.cos, self.sin, pos, *([self.mask] if self.mask >= 0 else [])]
            x = self._blocks(x)
            h = self.rms_norm("norm", x, self.ps["norm.weight"])
            G.drop(x, self.cos, self.sin, pos, *([self.mask] if self.mask >= 0 else []))
        logits = self.proj("lm_head", h, self.head, s.vocab_size, None)
        G.drop(h)
        loss = self.hf_loss(logits)
        if "total" not in self.saved:
            self.saved["total"] = self.tl.by_category["activations"]
        return logits, loss

    def _blocks(self, x: int) -> int:
        """The decoder layers; notes the bytes saved before them and by each."""
        G, acts = self.graph, self.tl.by_category
        first = "total" not in self.saved
        if first:
            self.saved["embedding"] = acts["activations"]
        for i in range(self.spec.n_layers):
            before = acts["activations"]
            nxt = self.checkpointed_block(i, x) if i in self.checkpointed else self.block(i, x)
            G.drop(x)
            x = nxt
            if first:
                self.saved[f"block {i}"] = acts["activations"] - before
        return x

    def hf_loss(self, logits: int) -> int:
        """``ForCausalLMLoss``: ``logits.float()`` (a copy unless the logits are fp32), the labels padded by one
        and shifted (``labels[..., 1:].contiguous()``), ``F.cross_entropy``: ``_log_softmax`` (fp32, saved) and
        ``nll_loss`` (saves the shifted labels and its total weight). Backward: ``nll_loss``'s gradient (its saved
        tensors released as it returns), ``log_softmax``'s, then the cast back to the logits' dtype."""
        G, rows, V, c = self.graph, self.rows, self.spec.vocab_size, self.c
        src = logits if c == 4 else G.new(rows * V * 4, "logits.float()")
        padded = G.new(self.batch * (self.seq + 1) * 8, "labels pad")
        shifted = G.new(rows * 8, "shift_labels contiguous")
        logp = G.new(rows * V * 4, "log_softmax")
        loss = G.new(4, "nll_loss")
        total = G.new(4, "nll_loss total_weight")

        def backward(n: Node) -> None:
            gout = G.buffer.pop(loss, None)  # the loss's gradient (from the caller's division)
            d_nll = G.new(rows * V * 4, "nll_loss grad")
            self._release_saved(n, shifted, total)
            G.drop(gout)
            d_logp = G.new(rows * V * 4, "log_softmax grad")
            G.drop(d_nll)
            G.release(n)
            if c != 4:
                d_logp = G.convert(d_logp, rows * V * c, "logits.float() grad cast")
            G.route(logits, d_logp)

        n = G.node("loss", loss, backward=backward)
        self._save(n, shifted, total, logp)
        G.drop(shifted, total, logp, padded)
        if src != logits:
            G.drop(src)
        return loss


def hf_timeline(spec: ModelSpec, profile: HFProfile, batch: int, seq_len: int, config: StepConfig,
                device: str = "cpu") -> StepTimeline:
    """Walk one training step of the Hugging Face model of ``profile`` with the shapes of ``spec``."""
    step = _HFStep(spec, profile, batch, seq_len, config, device)
    forward: Callable[[], tuple[int, int]] = step.forward
    return _walk(step, forward)


def hf_train_peak_bytes(
    spec: ModelSpec,
    profile: HFProfile,
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
) -> TrainPeak:
    """Peak bytes of one training step of transformers' model of ``profile`` (the largest moment of
    :func:`hf_timeline`), in the terms of :func:`torchledger.formulas.peak.train_peak_bytes`.

    ``activations`` holds what the walk saved at the end of the first forward: ``embedding`` before the first
    layer, ``layers`` by the layers (``per_layer``: the first), ``head`` after them (final norm, LM head,
    loss); the 16-bit weight copies autocast saved count where they are saved (``saved_copies`` 0).
    """
    if not isinstance(profile, HFProfile):
        raise ValueError(f"profile={profile!r} must be an HFProfile (see hf_profile)")
    positive_int("grad_accum", grad_accum)
    positive_int("batch", batch)
    check_seq_len(spec, seq_len)
    get_recipe(recipe)
    one_of("optimizer", optimizer, OPTIMIZER_STATES)
    one_of("optimizer_impl", optimizer_impl, OPTIMIZER_IMPLS)
    one_of("checkpointing", checkpointing, STEP_CHECKPOINTING)
    config = StepConfig(recipe, optimizer, optimizer_impl, checkpointing, grad_accum, clip)
    step = _HFStep(spec, profile, batch, seq_len, config, device)
    walk = _walk(step, step.forward)
    saved = step.saved
    layers = sum(v for k, v in saved.items() if k.startswith("block "))
    r = get_recipe(recipe)
    acts = Activations(
        per_layer=saved.get("block 0", 0), layers=layers, embedding=saved["embedding"],
        head=saved["total"] - layers - saved["embedding"],
        logits=batch * seq_len * spec.vocab_size * dtype_bytes(r.compute_dtype), autocast_copies=0, saved_copies=0,
        recompute_layer=0, layer_items=(), checkpointing=checkpointing)
    return TrainPeak(
        states=model_state_bytes(param_counts(spec).total, recipe, optimizer), activations=acts,
        phases={k: m.total for k, m in walk.phases.items()}, grad_accum=grad_accum, buffers=step.buffers,
        moment=walk.peak.name, by_category=dict(walk.peak.by_category))
