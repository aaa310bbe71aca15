"""Reference workloads: plain-PyTorch models built from the specs of :mod:`torchledger.formulas.specs`.

Each is constructible on the meta device (``device="meta"``: shapes only, no weights allocated) so that FLOPs and
memory of any size can be counted. The transformers are the exact architectures the formulas describe, chosen by
the family's description (:mod:`torchledger.formulas.families`), never by its name:

- :class:`GPT`: pre-norm blocks, fused QKV projection, GELU MLP, LayerNorm, learned positions, tied LM head.
- :class:`Llama`: pre-norm blocks, separate q/k/v projections with grouped-query attention, rotary positions,
  SwiGLU MLP, RMSNorm (``F.rms_norm``), untied LM head, no biases (``llama`` and ``mistral`` specs).
- :class:`Mixtral`: LLaMA's blocks with a :class:`MoE` in place of the MLP: a router, softmax, top-k, and SwiGLU
  experts that each run on the tokens routed to them (``index_select``), weighted and summed back (``index_add_``).

All call ``F.scaled_dot_product_attention`` through :class:`AttentionCore`, which counters recognize; a spec's
``sliding_window`` becomes a causal window mask there once the sequence is longer than the window.
"""

from __future__ import annotations

from itertools import pairwise

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from torchledger.formulas._validate import one_of
from torchledger.formulas.families import FamilyDescription
from torchledger.formulas.specs import CNNSpec, MLPSpec, ModelSpec
from torchledger.formulas.vocabulary import STEP_CHECKPOINTING, checkpointed_blocks


class AttentionCore(nn.Module):
    """``softmax(q k^T / sqrt(d)) v`` over (B, H, T, D) tensors through ``F.scaled_dot_product_attention``.

    No parameters: the projections around it are ordinary Linear layers. Counters recognize it by the class
    attribute ``torchledger_attention_core``.
    """

    torchledger_attention_core = True

    def __init__(self, is_causal: bool = True, enable_gqa: bool = False, window: int | None = None) -> None:
        super().__init__()
        self.is_causal = is_causal
        self.enable_gqa = enable_gqa
        self.window = window

    def forward(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        # q: (B, H, T, D); k, v: (B, H_kv, T, D) -> (B, H, T, D)
        q_len, kv_len = q.size(-2), k.size(-2)
        if self.window is not None and self.is_causal and kv_len > self.window:
            # Mistral's sliding window: the query at position p sees the keys at p - window < j <= p.
            # SDPA with this mask still computes every score (the dense count).
            pos_q = torch.arange(kv_len - q_len, kv_len, device=q.device)[:, None]  # (T, 1)
            pos_k = torch.arange(kv_len, device=q.device)[None, :]  # (1, S)
            mask = (pos_k <= pos_q) & (pos_k > pos_q - self.window)  # (T, S) bool: True = attend
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=self.enable_gqa)
        if self.enable_gqa:
            return F.scaled_dot_product_attention(q, k, v, is_causal=self.is_causal, enable_gqa=True)
        return F.scaled_dot_product_attention(q, k, v, is_causal=self.is_causal)


class MLP(nn.Sequential):
    """Linear layers with ReLU between them (the lecture notes' MLP by default)."""

    def __init__(self, spec: MLPSpec | None = None, *, device: str | torch.device | None = None) -> None:
        spec = spec or MLPSpec()
        layers: list[nn.Module] = []
        pairs = list(pairwise(spec.dims))
        for i, (a, b) in enumerate(pairs):
            layers.append(nn.Linear(a, b, device=device))
            if i < len(pairs) - 1:
                layers.append(nn.ReLU())
        super().__init__(*layers)
        self.spec = spec


class CNN(nn.Module):
    """3x3 convolutions with ReLU, global average pool, Linear head (the lecture notes' small CNN by default)."""

    def __init__(self, spec: CNNSpec | None = None, *, device: str | torch.device | None = None) -> None:
        super().__init__()
        self.spec = spec = spec or CNNSpec()
        widths = (spec.in_channels, *spec.channels)
        convs: list[nn.Module] = []
        for cin, cout in pairwise(widths):
            convs += [nn.Conv2d(cin, cout, 3, padding=1, device=device), nn.ReLU()]
        self.features = nn.Sequential(*convs)
        self.head = nn.Linear(spec.channels[-1], spec.n_classes, device=device)

    def forward(self, x: Tensor) -> Tensor:
        x = self.features(x)  # (B, C, H, W)
        x = x.mean(dim=(2, 3))  # (B, C): global average pool
        logits: Tensor = self.head(x)  # (B, classes)
        return logits


class _Transformer(nn.Module):
    """Embedding, blocks, final norm and LM head, with optional full activation checkpointing per block."""

    blocks: nn.ModuleList
    spec: ModelSpec

    def __init__(self) -> None:
        super().__init__()
        self.checkpointing = "none"
        self._checkpointed_blocks: set[int] = set()

    def init_weights(self) -> None:
        """GPT-2's initialization (normal, std 0.02; zero biases), so losses start near log(vocab)."""
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if isinstance(module, nn.Linear) and module.bias is not None:
                nn.init.zeros_(module.bias)

    def set_checkpointing(self, mode: str) -> None:
        """``"full"``: recompute every block's forward in the backward (non-reentrant ``torch.utils.checkpoint``);
        ``"every-other"``: only blocks 0, 2, 4, ..., trading half the saving for half the cost (the modes:
        :mod:`torchledger.formulas.vocabulary`)."""
        self.checkpointing = one_of("checkpointing", mode, STEP_CHECKPOINTING)
        self._checkpointed_blocks = set(checkpointed_blocks(mode, len(self.blocks)))

    def _checkpointed(self, index: int) -> bool:
        return index in self._checkpointed_blocks

    def embed(self, idx: Tensor) -> Tensor:
        raise NotImplementedError

    def final(self, x: Tensor) -> Tensor:
        raise NotImplementedError

    def prefill(self, idx: Tensor, cache: list[tuple[Tensor, Tensor]] | None = None) -> tuple[
            Tensor, list[tuple[Tensor, Tensor]]]:
        """Inference over a prompt: the next-token logits (B, V) and the KV cache, one (k, v) pair per block, each
        (B, H_kv, T, D), appended to ``cache`` when given (so that a caller can see it fill). Call under
        ``torch.no_grad()``."""
        cache = [] if cache is None else cache
        x = self.embed(idx)  # (B, T, d)
        for block in self.blocks:
            x = block(x, cache)
        return self.final(x[:, -1:, :])[:, 0, :], cache  # logits of the last position only: (B, V)

    def forward(self, idx: Tensor, targets: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
        # idx, targets: (B, T) int64 -> logits (B, T, V), mean cross-entropy
        x = self.embed(idx)  # (B, T, d)
        for i, block in enumerate(self.blocks):
            if self._checkpointed(i) and torch.is_grad_enabled():
                x = checkpoint(block, x, use_reentrant=False)
            else:
                x = block(x)
        logits = self.final(x)  # (B, T, V)
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1))
        return logits, loss


class GPTBlock(nn.Module):
    def __init__(self, spec: ModelSpec, device: str | torch.device | None = None, causal: bool = True) -> None:
        super().__init__()
        d = spec.d_model
        self.spec = spec
        self.ln_1 = nn.LayerNorm(d, device=device)
        self.c_attn = nn.Linear(d, spec.q_dim + 2 * spec.kv_dim, bias=bool(spec.bias), device=device)
        self.attn = AttentionCore(is_causal=causal, enable_gqa=spec.n_kv_heads != spec.n_heads,
                                  window=spec.sliding_window)
        self.c_proj = nn.Linear(spec.q_dim, d, bias=bool(spec.bias), device=device)
        self.ln_2 = nn.LayerNorm(d, device=device)
        self.c_fc = nn.Linear(d, spec.d_ff, bias=bool(spec.bias), device=device)
        self.mlp_proj = nn.Linear(spec.d_ff, d, bias=bool(spec.bias), device=device)

    def forward(self, x: Tensor, cache: list[tuple[Tensor, Tensor]] | None = None) -> Tensor:
        s = self.spec
        B, T, _ = x.shape
        q, k, v = self.c_attn(self.ln_1(x)).split([s.q_dim, s.kv_dim, s.kv_dim], dim=2)
        q = q.view(B, T, s.n_heads, s.head_dim).transpose(1, 2)  # (B, H, T, D)
        k = k.view(B, T, s.n_kv_heads, s.head_dim).transpose(1, 2)  # (B, H_kv, T, D)
        v = v.view(B, T, s.n_kv_heads, s.head_dim).transpose(1, 2)
        if cache is not None:
            cache.append((k.contiguous(), v.contiguous()))  # copies: views would keep all of qkv alive
        y = self.attn(q, k, v).transpose(1, 2).contiguous().view(B, T, s.q_dim)  # (B, T, H*D)
        x = x + self.c_proj(y)
        out: Tensor = x + self.mlp_proj(F.gelu(self.c_fc(self.ln_2(x))))
        return out


class GPT(_Transformer):
    """GPT-2 style decoder (the ``gpt2`` family)."""

    def __init__(self, spec: ModelSpec, *, device: str | torch.device | None = None, causal: bool = True) -> None:
        super().__init__()
        _check_architecture(spec, GPT)
        self.spec = spec
        self.wte = nn.Embedding(spec.vocab_size, spec.d_model, device=device)
        self.wpe = nn.Embedding(spec.max_seq_len, spec.d_model, device=device)
        self.blocks = nn.ModuleList(GPTBlock(spec, device, causal) for _ in range(spec.n_layers))
        self.ln_f = nn.LayerNorm(spec.d_model, device=device)
        self.lm_head = nn.Linear(spec.d_model, spec.vocab_size, bias=False, device=device)
        if spec.tied_embeddings:
            self.lm_head.weight = self.wte.weight
        if torch.device(device or "cpu").type != "meta":
            self.init_weights()

    def embed(self, idx: Tensor) -> Tensor:
        pos = torch.arange(idx.size(1), device=idx.device)  # (T,)
        x: Tensor = self.wte(idx) + self.wpe(pos)  # (B, T, d)
        return x

    def final(self, x: Tensor) -> Tensor:
        return self.lm_head(self.ln_f(x))  # type: ignore[no-any-return]


class RMSNorm(nn.Module):
    def __init__(self, d: int, eps: float = 1e-5, device: str | torch.device | None = None) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(d, device=device))

    def forward(self, x: Tensor) -> Tensor:
        return F.rms_norm(x, (x.size(-1),), self.weight, self.eps)


def _rotate_half(x: Tensor) -> Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class Rotary(nn.Module):
    """Rotary position tables (cos, sin: max_seq_len x head_dim), one module shared by every block."""

    cos: Tensor
    sin: Tensor

    def __init__(self, spec: ModelSpec, device: str | torch.device | None = None) -> None:
        super().__init__()
        inv_freq = 1.0 / (10000 ** (torch.arange(0, spec.head_dim, 2, device=device).float() / spec.head_dim))
        angles = torch.outer(torch.arange(spec.max_seq_len, device=device).float(), inv_freq)  # (T_max, D/2)
        angles = torch.cat((angles, angles), dim=-1)  # (T_max, D)
        dtype = torch.get_default_dtype()  # computed in fp32, stored as the model's parameters are
        self.register_buffer("cos", angles.cos().to(dtype), persistent=False)
        self.register_buffer("sin", angles.sin().to(dtype), persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        # x: (B, H, T, D)
        T = x.size(-2)
        out: Tensor = x * self.cos[:T] + _rotate_half(x) * self.sin[:T]
        return out


class SwiGLU(nn.Module):
    """One expert: ``down(silu(gate(x)) * up(x))``, no biases."""

    def __init__(self, d_model: int, d_ff: int, device: str | torch.device | None = None) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(d_model, d_ff, bias=False, device=device)
        self.up_proj = nn.Linear(d_model, d_ff, bias=False, device=device)
        self.down_proj = nn.Linear(d_ff, d_model, bias=False, device=device)

    def forward(self, x: Tensor) -> Tensor:
        # x: (n, d) -> (n, d)
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))  # type: ignore[no-any-return]


def _has_data(t: Tensor) -> bool:
    """Whether ``t`` holds values (not a meta tensor, not a FakeTensor): routing can then be read from it."""
    if t.device.type == "meta":
        return False
    from torch._subclasses.fake_tensor import is_fake

    return not is_fake(t)


def balanced_slots(n_slots: int, n_experts: int, expert: int, device: torch.device | str) -> Tensor:
    """The stand-in routing used where tensors hold no values (meta, FakeTensorMode): slot j (token j // k, its
    (j % k)-th choice) goes to expert j mod n_experts, so expert e gets n_slots // E slots, one more for the
    first n_slots mod E experts (:func:`torchledger.formulas.timeline.balanced_routing`)."""
    return torch.arange(expert, n_slots, n_experts, device=device)


class MoE(nn.Module):
    """Mixtral's sparse MLP, as Hugging Face's ``MixtralSparseMoeBlock`` computes it, in its plainest form.

    router logits (N, E) -> fp32 softmax -> top-k weights, renormalized over the k -> for each expert e: the slots
    routed to it (``nonzero``), their tokens gathered (``index_select``), the SwiGLU expert, the product with the
    routing weights, summed into the output (``index_add_``). An expert that no token chose is skipped.
    ``tokens_per_expert`` holds the last forward's routing (rows per expert). Where tensors hold no values (meta,
    FakeTensorMode) the routing is :func:`balanced_slots`, with the same shapes a balanced router gives.
    """

    torchledger_moe = True

    def __init__(self, spec: ModelSpec, device: str | torch.device | None = None) -> None:
        super().__init__()
        self.top_k = spec.experts_per_token
        self.router = nn.Linear(spec.d_model, spec.n_experts, bias=False, device=device)
        self.experts = nn.ModuleList(SwiGLU(spec.d_model, spec.d_ff, device) for _ in range(spec.n_experts))
        self.tokens_per_expert: list[int] = []

    def forward(self, x: Tensor) -> Tensor:
        shape = x.shape
        h = x.reshape(-1, shape[-1])  # (N, d)
        logits = self.router(h)  # (N, E)
        probs = F.softmax(logits, dim=-1, dtype=torch.float)  # (N, E), fp32 as Mixtral's code computes it
        weights, chosen = torch.topk(probs, self.top_k, dim=-1)  # (N, k) each
        weights = (weights / weights.sum(dim=-1, keepdim=True)).to(h.dtype).view(-1)  # (N k,) renormalized
        chosen = chosen.view(-1)  # (N k,) expert of each slot
        out = torch.zeros_like(h)  # (N, d)
        real = _has_data(x)
        counts = []
        for e, expert in enumerate(self.experts):
            hit = chosen == e  # (N k,) bool
            # (n_e,) the slots routed to e
            slots = hit.nonzero().squeeze(1) if real else balanced_slots(chosen.numel(), len(self.experts), e,
                                                                          x.device)
            del hit
            n_e = int(slots.shape[0])
            counts.append(n_e)
            if n_e == 0:
                continue
            rows = slots // self.top_k  # (n_e,) their tokens
            y = expert(h.index_select(0, rows))  # (n_e, d)
            y = y * weights.index_select(0, slots).unsqueeze(1)  # (n_e, d) weighted
            out.index_add_(0, rows, y)
        self.tokens_per_expert = counts
        return out.view(shape)


class LlamaBlock(nn.Module):
    def __init__(self, spec: ModelSpec, rotary: Rotary, device: str | torch.device | None = None,
                 causal: bool = True) -> None:
        super().__init__()
        d = spec.d_model
        self.spec = spec
        self.norm_1 = RMSNorm(d, device=device)
        self.q_proj = nn.Linear(d, spec.q_dim, bias=False, device=device)
        self.k_proj = nn.Linear(d, spec.kv_dim, bias=False, device=device)
        self.v_proj = nn.Linear(d, spec.kv_dim, bias=False, device=device)
        self.attn = AttentionCore(is_causal=causal, enable_gqa=spec.n_kv_heads != spec.n_heads,
                                  window=spec.sliding_window)
        self.o_proj = nn.Linear(spec.q_dim, d, bias=False, device=device)
        self.norm_2 = RMSNorm(d, device=device)
        if spec.description.moe:
            self.moe = MoE(spec, device)
        else:
            self.gate_proj = nn.Linear(d, spec.d_ff, bias=False, device=device)
            self.up_proj = nn.Linear(d, spec.d_ff, bias=False, device=device)
            self.down_proj = nn.Linear(spec.d_ff, d, bias=False, device=device)
        self.rotary = rotary

    def mlp(self, h: Tensor) -> Tensor:
        """SwiGLU, or the Mixture of Experts of a ``moe`` family."""
        if self.spec.description.moe:
            return self.moe(h)  # type: ignore[no-any-return]
        return self.down_proj(F.silu(self.gate_proj(h)) * self.up_proj(h))  # type: ignore[no-any-return]

    def forward(self, x: Tensor, cache: list[tuple[Tensor, Tensor]] | None = None) -> Tensor:
        s = self.spec
        B, T, _ = x.shape
        h = self.norm_1(x)
        q = self.q_proj(h).view(B, T, s.n_heads, s.head_dim).transpose(1, 2)  # (B, H, T, D)
        k = self.k_proj(h).view(B, T, s.n_kv_heads, s.head_dim).transpose(1, 2)  # (B, H_kv, T, D)
        v = self.v_proj(h).view(B, T, s.n_kv_heads, s.head_dim).transpose(1, 2)
        q, k = self.rotary(q), self.rotary(k)
        if cache is not None:
            cache.append((k, v.contiguous()))  # rotated k is a new tensor; v is a view of v_proj's output
        y = self.attn(q, k, v).transpose(1, 2).contiguous().view(B, T, s.q_dim)  # (B, T, H*D)
        x = x + self.o_proj(y)
        h = self.norm_2(x)
        out: Tensor = x + self.mlp(h)
        return out


class Llama(_Transformer):
    """LLaMA style decoder (the ``llama`` and ``mistral`` families)."""

    def __init__(self, spec: ModelSpec, *, device: str | torch.device | None = None, causal: bool = True) -> None:
        super().__init__()
        _check_architecture(spec, type(self))
        self.spec = spec
        self.embed_tokens = nn.Embedding(spec.vocab_size, spec.d_model, device=device)
        rotary = Rotary(spec, device)
        self.blocks = nn.ModuleList(LlamaBlock(spec, rotary, device, causal) for _ in range(spec.n_layers))
        self.norm = RMSNorm(spec.d_model, device=device)
        self.lm_head = nn.Linear(spec.d_model, spec.vocab_size, bias=False, device=device)
        if spec.tied_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        if torch.device(device or "cpu").type != "meta":
            self.init_weights()

    def embed(self, idx: Tensor) -> Tensor:
        return self.embed_tokens(idx)  # type: ignore[no-any-return]

    def final(self, x: Tensor) -> Tensor:
        return self.lm_head(self.norm(x))  # type: ignore[no-any-return]


class Mixtral(Llama):
    """Mixtral style decoder (the ``mixtral`` family): LLaMA's blocks with a :class:`MoE` as the MLP."""


# The reference model of each architecture, keyed by what the family description says of its blocks.
_ARCHITECTURES: dict[tuple[str, str, str, str], type[GPT] | type[Llama]] = {
    ("fused", "gelu", "layernorm", "learned"): GPT,
    ("separate", "swiglu", "rmsnorm", "rotary"): Llama,
    ("separate", "moe", "rmsnorm", "rotary"): Mixtral,
}


def _architecture(fam: FamilyDescription) -> type[GPT] | type[Llama]:
    key = (fam.projections, fam.mlp, fam.norm, fam.positions)
    if key not in _ARCHITECTURES:
        raise ValueError(f"family={fam.name!r}: no reference model has {', '.join(key)} blocks")
    return _ARCHITECTURES[key]


def _check_architecture(spec: ModelSpec, cls: type) -> None:
    if _architecture(spec.description) is not cls:
        raise ValueError(f"family={spec.family!r}: {cls.__name__} builds {', '.join(_families_of(cls))} specs")


def _families_of(cls: type) -> list[str]:
    from torchledger.formulas.families import FAMILIES

    return [name for name, fam in FAMILIES.items() if _ARCHITECTURES.get(
        (fam.projections, fam.mlp, fam.norm, fam.positions)) is cls]


def build_transformer(
    spec: ModelSpec, *, device: str | torch.device | None = None, causal: bool = True
) -> GPT | Llama:
    """The reference transformer for ``spec`` (``device="meta"`` allocates nothing; ``causal=False`` drops the mask)."""
    return _architecture(spec.description)(spec, device=device, causal=causal)


def token_batch(spec: ModelSpec, batch: int, seq_len: int, *, device: str | torch.device = "cpu",
                seed: int = 0) -> tuple[Tensor, Tensor]:
    """Random token ids and next-token targets, (B, T) int64 each, each with its own storage of B T 8 bytes (empty
    tensors on the meta device). NB: both are copied out of the (B, T + 1) ids; at batch 1 ``contiguous()`` would
    return views sharing that storage, 8 bytes more than the two tensors, which a storage tracker then counts."""
    if torch.device(device).type == "meta":
        idx = torch.empty(batch, seq_len, dtype=torch.long, device=device)
        return idx, torch.empty_like(idx)
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, spec.vocab_size, (batch, seq_len + 1), generator=gen)
    return (ids[:, :-1].clone(memory_format=torch.contiguous_format).to(device),
            ids[:, 1:].clone(memory_format=torch.contiguous_format).to(device))


class Int8Linear(nn.Module):
    """A Linear layer run as an int8 x int8 -> int32 matmul (``torch._int_mm``) with dynamic per-row activation scales
    and per-channel weight scales, symmetric. Counters recognize it by ``torchledger_int_matmul``.
    """

    torchledger_int_matmul = True
    weight_int8: Tensor
    weight_scale: Tensor
    bias: Tensor | None

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        w = linear.weight.detach()  # (out, in)
        scale = w.abs().amax(dim=1).clamp(min=1e-8) / 127  # (out,)
        w_int8 = (w / scale[:, None]).round().clamp(-128, 127).to(torch.int8)  # (out, in)
        self.register_buffer("weight_int8", w_int8.t().contiguous())  # (in, out): _int_mm's (k, n)
        self.register_buffer("weight_scale", scale.float())
        self.register_buffer("bias", None if linear.bias is None else linear.bias.detach().clone())

    def forward(self, x: Tensor) -> Tensor:
        shape = x.shape
        x2 = x.reshape(-1, self.in_features)  # (N, in)
        x_scale = x2.abs().amax(dim=1, keepdim=True).clamp(min=1e-8) / 127  # (N, 1)
        xq = (x2 / x_scale).round().clamp(-128, 127).to(torch.int8)
        acc = torch._int_mm(xq, self.weight_int8)  # (N, out) int32
        y = acc.to(x.dtype) * x_scale * self.weight_scale.to(x.dtype)
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*shape[:-1], self.out_features)


def quantize_int8(model: nn.Module) -> nn.Module:
    """Replace every ``nn.Linear`` of ``model`` by an :class:`Int8Linear` (in place; returns ``model``)."""
    for name, child in model.named_children():
        if isinstance(child, nn.Linear):
            setattr(model, name, Int8Linear(child))
        else:
            quantize_int8(child)
    return model
