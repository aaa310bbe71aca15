"""The memory of one training step as a timeline: every tensor the step makes, from its op to its release.

The step is walked op by op, as PyTorch runs it, in pure Python: each forward op allocates its output and its
autograd node keeps what it saves; the loss and its gradient; the backward runs the nodes in reverse, each
allocating the gradients of its inputs and releasing what it saved and the gradient it received (two gradients of
one tensor are summed out of place, as autograd's input buffer does); a weight's gradient is stolen as its
``.grad`` or, when a ``.grad`` exists (accumulation), added into it in place; GradScaler's unscale and inf checks,
the gradient norms of clipping, and the optimizer's temporaries follow. The peak is the largest total after any
allocation; it is named by its moment (``"backward: block 1 mlp.fc weight grad"``).

Each tensor is in one of the tracker's categories (:class:`torchledger.measuring.memory.StorageTracker`): params
(buffers included), grads (``.grad``), optimizer (state, step counters), activations (tensors autograd saved; under
non-reentrant checkpointing a block saves through the checkpoint's own hooks, so its tensors count as temporaries,
except the block's input, which the checkpoint saves itself), temporaries (everything else).

``device`` selects the device-specific terms of :mod:`torchledger.formulas.device`: on CUDA every allocation is
rounded to the caching allocator's 512-byte blocks, ``F.rms_norm`` is the fused kernel, and cross-entropy's
``log_softmax`` reads 16-bit logits directly under autocast; the CPU has none. NB: on the CPU a 16-bit LayerNorm
keeps its statistics in 16 bits.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from itertools import pairwise

from .device import device_terms
from .families import FamilyDescription
from .memory import OPTIMIZER_STATES, Recipe, dtype_bytes, get_recipe
from .specs import CNNSpec, MLPSpec, ModelSpec
from .vocabulary import checkpointed_blocks

CATEGORIES = ("params", "grads", "optimizer", "activations", "temporaries")
PHASES = ("forward", "backward", "optimizer")


@dataclass(frozen=True)
class Moment:
    """The state of memory just after one allocation."""

    phase: str
    label: str
    total: int
    by_category: dict[str, int]
    size: int = 0  # the bytes of the allocation that made this moment

    @property
    def name(self) -> str:
        return f"{self.phase}: {self.label}"


class Timeline:
    """Live tensors by reference count and category; records the largest total (overall and per phase)."""

    def __init__(self, device: str = "cpu") -> None:
        self.device = device
        self.terms = device_terms(device)
        self._size: dict[int, int] = {}
        self._refs: dict[int, int] = {}
        self._cat: dict[int, str] = {}
        self._next = 0
        self.by_category = dict.fromkeys(CATEGORIES, 0)
        self.total = 0
        self.phase = "forward"
        self.peak: Moment | None = None
        self.phase_peaks: dict[str, Moment] = {}
        self.moments: list[Moment] | None = None  # every moment, when a caller sets a list here

    def alloc(self, size: int, label: str, category: str = "temporaries") -> int:
        """A new tensor of ``size`` bytes (one reference), made by the op ``label``, as the device's allocator counts
        it: the CPU allocates exactly the storage's bytes, CUDA's caching allocator a multiple of 512."""
        size = self.terms.round(size)
        t = self._next
        self._next += 1
        self._size[t], self._refs[t], self._cat[t] = size, 1, category
        self.total += size
        self.by_category[category] += size
        if self.moments is not None:
            self.moments.append(Moment(self.phase, label, self.total, dict(self.by_category), size))
        best = self.phase_peaks.get(self.phase)
        if best is None or self.total > best.total:
            moment = Moment(self.phase, label, self.total, dict(self.by_category))
            self.phase_peaks[self.phase] = moment
            if self.peak is None or moment.total > self.peak.total:
                self.peak = moment
        return t

    def ref(self, t: int) -> int:
        self._refs[t] += 1
        return t

    def unref(self, t: int) -> None:
        self._refs[t] -= 1
        if self._refs[t] == 0:
            size, cat = self._size.pop(t), self._cat.pop(t)
            del self._refs[t]
            self.total -= size
            self.by_category[cat] -= size

    def recategorize(self, t: int, category: str) -> None:
        """``t`` becomes a ``.grad`` or is saved for backward (params take precedence, as the tracker's do)."""
        old = self._cat[t]
        if CATEGORIES.index(category) < CATEGORIES.index(old):
            self._cat[t] = category
            self.by_category[old] -= self._size[t]
            self.by_category[category] += self._size[t]

    def size(self, t: int) -> int:
        return self._size[t]


# ------------------------------------------------------------------------------------------------ the autograd walk


@dataclass
class Param:
    """One parameter tensor: ``numel`` elements; ``uses`` gradients arrive before its AccumulateGrad runs (2 for a
    tied embedding). ``grad`` is its ``.grad`` tensor once it exists."""

    name: str
    numel: int
    uses: int = 1
    grad: int | None = None
    pending: int | None = None
    arrived: int = 0


@dataclass
class Node:
    """An autograd node: ``out`` receives the gradient; ``grads`` are (target, bytes, label, cast bytes) made by its
    backward, target a tensor or a :class:`Param`; ``reduced`` are made after it by the engine, which sums a
    gradient over the dimensions its input was broadcast along (``validate_outputs``' ``sum_to``: the bias of
    ``addmm``); ``saved`` are released after it runs, or, in a checkpointed block's recomputation, before
    ``reduced``: the checkpoint hands each saved tensor over once (its unpack hook drops its own reference), so it
    dies with the node's own locals, where autograd releases saved variables after ``validate_outputs``."""

    label: str
    out: int | None
    grads: list[tuple[int | Param, int, str, int]] = field(default_factory=list)
    saved: list[int] = field(default_factory=list)
    backward: Callable[[Node], None] | None = None
    reduced: list[tuple[int | Param, int, str, int]] = field(default_factory=list)
    recomputed: bool = False


class Graph:
    """Records the forward's nodes and runs the backward over them.

    ``mode``: ``"normal"`` (saved tensors are activations), ``"checkpoint"`` (a checkpointed block's forward: its
    nodes keep nothing), ``"recompute"`` (its recomputation in the backward: saved, but through the checkpoint's
    hooks, so temporaries)."""

    def __init__(self, tl: Timeline, grad_bytes: int) -> None:
        self.tl = tl
        self.g = grad_bytes
        self.nodes: list[Node] = []
        self.mode = "normal"
        self.buffer: dict[int, int] = {}  # tensor -> its gradient so far

    def new(self, size: int, label: str) -> int:
        return self.tl.alloc(size, label)

    def drop(self, *ts: int | None) -> None:
        for t in ts:
            if t is not None:
                self.tl.unref(t)

    def convert(self, t: int, size: int, label: str) -> int:
        """``_to_copy`` of ``t`` into another dtype: the copy of ``size`` bytes is made while ``t`` still lives,
        then ``t``'s reference is dropped; returns the copy."""
        copy = self.new(size, label)
        self.drop(t)
        return copy

    def node(self, label: str, out: int | None, saved: Sequence[int] = (),
             grads: Sequence[tuple[int | Param, int, str, int]] = (),
             backward: Callable[[Node], None] | None = None,
             reduced: Sequence[tuple[int | Param, int, str, int]] = ()) -> Node:
        n = Node(label, out, list(grads), [], backward, list(reduced), self.mode == "recompute")
        for t in saved:
            self.save(n, t)
        self.nodes.append(n)
        return n

    def save(self, n: Node, t: int) -> None:
        if self.mode == "checkpoint":
            return
        self.tl.ref(t)
        if self.mode == "normal":
            self.tl.recategorize(t, "activations")
        n.saved.append(t)

    # -- backward
    def route(self, target: int | Param, grad: int) -> None:
        """Deliver ``grad``: into a tensor's input buffer (summed out of place with an earlier one), or to a
        parameter's AccumulateGrad once all its uses have delivered."""
        if isinstance(target, Param):
            target.arrived += 1
            if target.pending is not None:
                grad = self._sum(target.pending, grad, f"{target.name} grad sum")
            target.pending = grad
            if target.arrived == target.uses:
                self.accumulate(target, grad)
                target.pending, target.arrived = None, 0
            return
        if target in self.buffer:
            grad = self._sum(self.buffer[target], grad, "grad sum")
        self.buffer[target] = grad

    def _sum(self, a: int, b: int, label: str) -> int:
        s = self.new(self.tl.size(a), label)
        self.drop(a, b)
        return s

    def accumulate(self, p: Param, grad: int) -> None:
        """AccumulateGrad: the gradient becomes ``.grad`` (stolen, no copy) or is added into it in place."""
        if p.grad is None:
            p.grad = grad
            self.tl.recategorize(grad, "grads")
        else:
            self.drop(grad)

    def run_node(self, n: Node) -> None:
        if n.backward is not None:
            n.backward(n)
            return
        gout = self.buffer.pop(n.out) if n.out is not None and n.out in self.buffer else None
        made = [(target, self.new(size, n.label + " " + what), cast, what) for target, size, what, cast in n.grads]
        if n.recomputed:
            self.release(n)
        made += [(target, self.new(size, n.label + " " + what), cast, what) for target, size, what, cast in n.reduced]
        self.release(n, gout)
        for target, grad, cast, what in made:
            if cast:  # the backward of autocast's cast (_to_copy): the gradient in the source's dtype
                grad = self.convert(grad, cast, f"{n.label} {what} cast")
            self.route(target, grad)

    def release(self, n: Node, *grads: int | None) -> None:
        for t in n.saved:
            self.tl.unref(t)
        n.saved.clear()
        self.drop(*grads)


@dataclass(frozen=True)
class StepConfig:
    """How the step runs (see :class:`torchledger.workloads.train_step.TrainConfig`)."""

    recipe: str = "32-true"
    optimizer: str = "adamw"
    optimizer_impl: str = "foreach"
    checkpointing: str = "none"
    grad_accum: int = 1
    clip: bool = False


class _Step:
    """Shared parts of a training step: dtypes, the parameters, the loss head, the optimizer."""

    def __init__(self, params: list[Param], config: StepConfig, device: str, buffers: int = 0) -> None:
        self.r: Recipe = get_recipe(config.recipe)
        self.config = config
        self.device = device
        self.c = dtype_bytes(self.r.compute_dtype)
        self.p = dtype_bytes(self.r.param_dtype)
        self.g = dtype_bytes(self.r.grad_dtype)
        self.s = dtype_bytes(self.r.optimizer_dtype)
        self.lp = 4 if self.r.autocast else self.p  # cross-entropy runs in fp32 under autocast
        self.params = params
        self.tl = Timeline(device)
        for q in params:
            self.tl.alloc(q.numel * self.p, q.name, "params")
        if buffers:
            self.tl.alloc(buffers, "buffers", "params")
        # *-mixed-master recipes (ZeRO, DeepSpeed, Megatron): an fp32 master copy of every 16-bit parameter, filed
        # with the optimizer state as the tracker files it
        self.master = dtype_bytes(self.r.master_dtype) if self.r.master_dtype else 0
        states = OPTIMIZER_STATES[config.optimizer]
        for q in params:
            if self.master:
                self.tl.alloc(q.numel * self.master, f"{q.name} master", "optimizer")
            for _ in range(states):
                self.tl.alloc(q.numel * self.s, f"{q.name} state", "optimizer")
            if config.optimizer in ("adam", "adamw"):
                self.tl.alloc(4, "step", "optimizer")  # Adam's fp32 step counter, one per tensor
        self.graph = Graph(self.tl, self.g)
        self.cache: dict[str, int] = {}  # autocast's cache of 16-bit copies of the weights

    # -- forward helpers
    def weight(self, q: Param, numel: int | None = None) -> tuple[int | None, int]:
        """The weight as a matmul sees it: under autocast a 16-bit copy (``_to_copy``), cached until autocast
        exits; returns (the copy or None, its gradient's cast bytes)."""
        if not self.r.autocast:
            return None, 0
        if q.name not in self.cache:
            self.cache[q.name] = self.tl.alloc((numel or q.numel) * self.c, f"{q.name} autocast copy")
        return self.cache[q.name], (numel or q.numel) * self.g

    def exit_autocast(self) -> None:
        for t in self.cache.values():
            self.tl.unref(t)
        self.cache.clear()

    def linear(self, label: str, x: int, x_bytes_per_row: int, rows: int, w: Param, out_features: int,
               bias: Param | None, *, needs_input_grad: bool = True, input_target: int | None = None,
               cast_input: bool = False) -> int:
        """``F.linear`` (addmm / mm): the output; saves its input (for the weight's gradient) and, when the input
        needs a gradient, the weight (its autocast copy). ``cast_input``: autocast casts an fp32 input to 16 bits
        first (``_to_copy``), and the cast is what is saved."""
        G = self.graph
        if bias is not None and self.r.autocast:
            self.weight(bias)
        w_copy, w_cast = self.weight(w)
        inp = x
        in_cast = 0
        if cast_input:
            inp = G.new(rows * x_bytes_per_row // 4 * self.c, f"{label} input cast")
            in_cast = rows * x_bytes_per_row
        stop = G.mode == "recompute" and label.endswith(("mlp.proj", "mlp.down"))  # checkpoint's early stop
        out = G.new(0 if stop else rows * out_features * self.c, label)
        saved = [inp] + ([w_copy] if needs_input_grad and w_copy is not None else [])
        grads: list[tuple[int | Param, int, str, int]] = []
        target = input_target if input_target is not None else x
        in_features = w.numel // out_features
        if needs_input_grad:
            grads.append((target, rows * in_features * self.c, "input grad", in_cast))
        grads.append((w, w.numel * self.c if self.r.autocast else w.numel * self.g, "weight grad", w_cast))
        reduced: list[tuple[int | Param, int, str, int]] = []
        if bias is not None:  # addmm broadcasts the bias: its gradient is the engine's sum of the output's
            reduced.append((bias, bias.numel * (self.c if self.r.autocast else self.g), "bias grad",
                            bias.numel * self.g if self.r.autocast else 0))
        G.node(label, out, saved, grads, reduced=reduced)
        if cast_input:
            G.drop(inp)
        return out

    def cross_entropy(self, logits: int, rows: int, classes: int) -> tuple[int, int]:
        """``F.cross_entropy``: under autocast an fp32 copy of the logits, ``_log_softmax`` (saved), ``nll_loss``;
        returns (the loss, the log-probabilities)."""
        G = self.graph
        src = logits
        # CUDA's autocast gives log_softmax an fp32 output dtype and its kernel reads the 16-bit logits (no fp32
        # copy); its backward writes the logits' gradient in their 16-bit dtype (no fp32 gradient to cast down)
        direct = self.r.autocast and self.tl.terms.log_softmax_half_to_float
        if self.r.autocast and not direct:
            src = G.new(rows * classes * 4, "cross-entropy fp32 logits")
        logp = G.new(rows * classes * self.lp, "log_softmax")
        cast = rows * classes * self.c if self.r.autocast and not direct else 0

        def backward(n: Node) -> None:
            gout = G.buffer.pop(loss, None)  # the loss's gradient (from the caller's division)
            d_nll = G.new(rows * classes * self.lp, "nll_loss grad")
            n.saved.remove(total_weight)  # nll_loss's backward returns: its total_weight and gradient go
            G.drop(total_weight, gout)
            d_logits = G.new(rows * classes * (self.c if direct else self.lp), "log_softmax grad")
            G.drop(d_nll)
            G.release(n)
            if cast:
                d_logits = G.convert(d_logits, cast, "logits grad cast")
            G.route(logits, d_logits)

        node = G.node("loss", None, [logp], backward=backward)
        # nll_loss's output and total_weight (scalars) are made while autocast's fp32 copy of the logits still
        # lives: cross_entropy is one composite op, and autocast holds the copy it passed in until the op returns;
        # total_weight is saved for nll_loss's backward, which releases it
        loss = G.new(self.lp, "nll_loss")  # scalars in the log-probabilities' dtype
        node.out = loss
        total_weight = G.new(self.lp, "nll_loss total_weight")
        G.save(node, total_weight)
        G.drop(total_weight)
        if src != logits:
            G.drop(src)
        G.drop(logp)
        return loss, logp

    def backward(self) -> None:
        G = self.graph
        self.tl.phase = "backward"
        nodes, G.nodes = G.nodes, []
        for n in reversed(nodes):
            G.run_node(n)
        G.buffer.clear()

    # -- after the backward
    def finish(self) -> None:
        """GradScaler's unscale and inf check (``16-mixed``), clipping, the optimizer step, ``zero_grad``: each over
        the parameters that have a gradient (a Mixture of Experts' expert that no token chose has none)."""
        tl = self.tl
        tl.phase = "optimizer"
        n = len(self.updated())
        if self.config.recipe == "16-mixed":
            # unscale_: _amp_foreach_non_finite_check_and_unscale_ works in place; its inverse scale is a local of
            # unscale_, freed as it returns, and the found-inf flag is kept for step() and update()
            inverse = tl.alloc(4, "grad scaler inverse scale")
            tl.alloc(4, "grad scaler found inf")
            tl.unref(inverse)
        if self.config.clip:
            # clip_grad_norm_ (foreach): _foreach_norm makes one norm per tensor, stack and vector_norm the total;
            # _foreach_mul_ scales the gradients in place
            norms = [tl.alloc(self.g, "clip: per-tensor norm") for _ in range(n)]
            stacked = tl.alloc(n * self.g, "clip: stacked norms")
            total = tl.alloc(self.g, "clip: total norm")
            for t in (*norms, stacked, total):
                tl.unref(t)
        self.optimizer_step()
        for q in self.params:
            if q.grad is not None:
                tl.unref(q.grad)
                q.grad = None

    def optimizer_step(self) -> None:
        """The optimizer's temporaries: SGD and momentum update in place (``_foreach_add_``, ``add_``); Adam and
        AdamW ``foreach`` make ``torch._foreach_sqrt(exp_avg_sq)`` (one state-sized tensor per parameter, all at
        once); ``for-loop`` makes ``exp_avg_sq.sqrt()`` and its quotient by the bias correction per parameter, the
        previous parameter's denominator still referenced; ``fused`` makes none."""
        tl, c = self.tl, self.config
        name = f"{c.optimizer} {c.optimizer_impl}"
        # a master recipe first copies the 16-bit gradients into fp32 for the update of the fp32 master weights
        master_grads = [tl.alloc(q.numel * self.master, f"{q.name} fp32 gradient") for q in self.updated()] \
            if self.master else []
        self._optimizer_temporaries(name)
        for t in master_grads:
            tl.unref(t)

    def _optimizer_temporaries(self, name: str) -> None:
        tl, c = self.tl, self.config
        if OPTIMIZER_STATES[c.optimizer] != 2 or c.optimizer_impl == "fused":
            tl.alloc(0, name)
            return
        if c.optimizer_impl == "foreach":
            # the scalar tensor _foreach_add_ adds to the step counters, freed as that op returns
            tl.unref(tl.alloc(4, f"{name} step increment"))
            sqrt = [tl.alloc(q.numel * self.s, f"{name} sqrt") for q in self.updated()]
            for t in sqrt:
                tl.unref(t)
            return
        previous = None
        for q in self.updated():
            root = tl.alloc(q.numel * self.s, f"{name} sqrt ({q.name})")
            denom = tl.alloc(q.numel * self.s, f"{name} denominator ({q.name})")
            tl.unref(root)
            if previous is not None:
                tl.unref(previous)
            previous = denom
        if previous is not None:
            tl.unref(previous)

    def updated(self) -> list[Param]:
        """The parameters with a ``.grad`` after the backward: what the optimizer, clipping and GradScaler see."""
        return [q for q in self.params if q.grad is not None]

    def caller_bytes(self) -> int:
        """Bytes of one micro-batch's caller-owned batch that the measurement counts (an op outputs its storage) and
        the caller keeps to the step's end: none here."""
        return 0

    def micro_batches(self, forward: Callable[[], tuple[int, int]]) -> None:
        """``grad_accum`` micro-batches: forward (autocast exits after it), backward, then the logits released.

        Only the first two are walked: the first starts without gradients, every later one starts with all of them
        and leaves memory as it found it (the same tensors made and released) but for what it keeps of the caller's
        batch (:meth:`caller_bytes`), so the last micro-batch repeats the second moment for moment with the kept
        batches of those between them beside it: the walked second stands for the last."""
        accum = self.config.grad_accum
        for k in range(min(accum, 2)):
            if k == 1 and accum > 2 and self.caller_bytes():
                # held to the step's end (never released), as the caller holds the batches
                self.tl.alloc((accum - 2) * self.caller_bytes(), f"kept batches of micro-batches 2-{accum - 1}",
                              "activations")
            self.tl.phase = "forward"
            logits, loss = forward()
            self.backward_from(loss)
            self.graph.drop(logits)

    def backward_from(self, loss: int) -> None:
        """What :class:`torchledger.workloads.train_step.TrainStep` does with the loss: ``loss / grad_accum`` (a new
        scalar in the loss's dtype; the loss's own goes with the rebinding) under autocast, which then exits;
        ``16-mixed``: ``GradScaler.scale(loss)``, an fp32 one; ``backward()``, whose gradient seed (``ones_like``) the
        caller holds to the end with those scalars, and whose first nodes (the scale's ``mul``, the division) hand
        the loss node its gradient: a scalar each."""
        G = self.graph
        size = self.tl.size(loss)
        held = [G.new(size, "loss / grad_accum")]
        G.drop(loss)
        self.exit_autocast()
        scaled = self.config.recipe == "16-mixed"
        if scaled:
            held.append(G.new(4, "GradScaler.scale(loss)"))
        held.append(G.new(4 if scaled else size, "backward: gradient seed (ones_like)"))
        G.tl.phase = "backward"
        upstream = G.new(4, "backward: GradScaler.scale grad") if scaled else None
        G.buffer[loss] = G.new(size, "backward: loss / grad_accum grad")
        G.drop(upstream)
        self.backward()
        G.drop(*held)


# ------------------------------------------------------------------------------------------------ the workloads


def transformer_params(spec: ModelSpec) -> tuple[list[Param], dict[str, Param]]:
    """The parameters in the reference model's order, named as the blocks of :class:`_TransformerStep` read them;
    the layout is the family description's (:mod:`torchledger.formulas.families`)."""
    d, f, q, kv = spec.d_model, spec.d_ff, spec.q_dim, spec.kv_dim
    fam = spec.description
    ps: dict[str, Param] = {}

    def add(name: str, numel: int) -> None:
        ps[name] = Param(name, numel)

    add(fam.embedding_name, spec.vocab_size * d)
    if fam.learned_positions:
        add("wpe", spec.max_seq_len * d)
    n1, n2, nf = fam.norm_names
    for i in range(spec.n_layers):
        b = f"block {i} "
        if fam.projections == "fused":
            layer = [(f"{n1}.weight", d), (f"{n1}.bias", d), ("attn.qkv.weight", d * (q + 2 * kv)),
                     ("attn.qkv.bias", q + 2 * kv), ("attn.proj.weight", q * d), ("attn.proj.bias", d)]
        else:
            layer = [(f"{n1}.weight", d), ("attn.q.weight", d * q), ("attn.k.weight", d * kv),
                     ("attn.v.weight", d * kv), ("attn.o.weight", q * d)]
        layer += [(f"{n2}.weight", d), (f"{n2}.bias", d)] if fam.norm == "layernorm" else [(f"{n2}.weight", d)]
        if fam.mlp == "gelu":
            layer += [("mlp.fc.weight", d * f), ("mlp.fc.bias", f), ("mlp.proj.weight", f * d), ("mlp.proj.bias", d)]
        elif fam.mlp == "swiglu":
            layer += [("mlp.gate.weight", d * f), ("mlp.up.weight", d * f), ("mlp.down.weight", f * d)]
        else:  # moe: the router, then each expert's gate, up and down
            layer += [("moe.router.weight", d * spec.n_experts)]
            for e in range(spec.n_experts):
                layer += [(f"moe.expert{e}.gate.weight", d * f), (f"moe.expert{e}.up.weight", d * f),
                          (f"moe.expert{e}.down.weight", f * d)]
        for name, numel in layer:
            if spec.bias or not name.endswith(".bias") or name.startswith(fam.norm_names):
                add(b + name, numel)
    add(f"{nf}.weight", d)
    if fam.norm == "layernorm":
        add(f"{nf}.bias", d)
    if not spec.tied_embeddings:
        add("lm_head", spec.vocab_size * d)
    return list(ps.values()), ps


def balanced_routing(spec: ModelSpec, tokens: int) -> tuple[tuple[int, ...], ...]:
    """The routing assumed when none is given: the ``tokens * k`` (token, choice) slots spread as evenly as they
    go, expert e of every block getting ``tokens * k // E`` slots and one more for the first ``tokens * k % E``
    experts (what the reference MoE runs where tensors hold no values: meta, FakeTensorMode)."""
    slots, n = tokens * spec.experts_per_token, spec.n_experts
    return tuple(tuple(slots // n + int(e < slots % n) for e in range(n)) for _ in range(spec.n_layers))


def check_routing(spec: ModelSpec, tokens: int, routing: Sequence[Sequence[int]]) -> tuple[tuple[int, ...], ...]:
    """``routing`` (rows per expert, one sequence per block) as tuples, if it routes ``tokens * k`` slots in every
    block of ``spec``; ValueError naming it otherwise."""
    out = tuple(tuple(int(n) for n in layer) for layer in routing)
    if len(out) != spec.n_layers or any(len(layer) != spec.n_experts for layer in out):
        raise ValueError(f"routing={routing!r} must give {spec.n_experts} counts for each of {spec.n_layers} blocks")
    for layer in out:
        if min(layer) < 0 or sum(layer) != tokens * spec.experts_per_token:
            raise ValueError(f"routing={routing!r}: each block routes tokens * experts_per_token = "
                             f"{tokens * spec.experts_per_token} slots, as non-negative counts")
    return out


# The timeline's block of each architecture, keyed by the family description's projections and MLP.
_BLOCKS: dict[tuple[str, str], str] = {("fused", "gelu"): "gpt_block", ("separate", "swiglu"): "llama_block",
                                       ("separate", "moe"): "moe_block"}


class _TransformerStep(_Step):
    def __init__(self, spec: ModelSpec, batch: int, seq_len: int, config: StepConfig, device: str,
                 routing: Sequence[Sequence[int]] | None = None) -> None:
        self.family: FamilyDescription = spec.description
        params, self.ps = transformer_params(spec)
        self.buffers = self.buffer_bytes(spec, config)
        super().__init__(params, config, device, self.buffers)
        self.spec, self.batch, self.seq = spec, batch, seq_len
        # a checkpointed block's last residual gradient, cast to 16 bits before its recomputation starts (see
        # checkpointed_block); the residual add's backward takes it instead of casting again
        self._precast: int | None = None
        self.checkpointed = set(checkpointed_blocks(config.checkpointing, spec.n_layers))
        self.rows = batch * seq_len
        self.routing = ((balanced_routing(spec, self.rows) if routing is None else
                         check_routing(spec, self.rows, routing)) if self.family.moe else ())
        key = (self.family.projections, self.family.mlp)
        if key not in _BLOCKS:
            raise ValueError(f"family={spec.family!r}: the timeline has no block of {', '.join(key)}")
        self._block: Callable[[int, int], int] = getattr(self, _BLOCKS[key])
        emb = self.ps[self.family.embedding_name]
        self.embedding = emb
        self.head = emb if spec.tied_embeddings else self.ps["lm_head"]
        if spec.tied_embeddings:
            emb.uses = 2
        # the residual stream: fp32 under autocast (fp32 embeddings plus 16-bit branches promote)
        self.res = self.p
        # LayerNorm's mean and rstd: fp32, but kept in the input's 16-bit dtype on the CPU
        self.stats = 4 if (self.r.autocast or self.tl.terms.fp32_layer_norm_stats) else self.p

    def buffer_bytes(self, spec: ModelSpec, config: StepConfig) -> int:
        """The model's buffers, alive before the step: the reference's rotary cos and sin tables (max_seq_len x
        head_dim each, in the parameters' dtype)."""
        return 2 * spec.max_seq_len * spec.head_dim * dtype_bytes(get_recipe(config.recipe).param_dtype) \
            if spec.description.rotary else 0

    # -- pieces of a block
    def layer_norm(self, label: str, x: int, w: Param, b: Param | None) -> int:
        """``native_layer_norm``: output, mean and rstd; saves the input and the statistics. LLaMA's ``F.rms_norm``
        on the CPU: ``pow`` (fp32, a temporary), ``mean``, ``rsqrt``, the fp32 normalized tensor and the output;
        saves the fp32 input (a copy when the input is 16-bit), the rstd and the normalized tensor; its backward runs
        one autograd node per op."""
        G, rows, d = self.graph, self.rows, self.spec.d_model
        if b is not None:
            out = G.new(rows * d * self.res, label)
            stats = [G.new(rows * self.stats, f"{label} mean"), G.new(rows * self.stats, f"{label} rstd")]
            G.node(label, out, [x, *stats], [(x, rows * d * self.res, "input grad", 0), (w, d * self.g, "weight grad",
                                                                                      0),
                                              (b, d * self.g, "bias grad", 0)])
            G.drop(*stats)
            return out
        if self.tl.terms.fused_rms_norm:
            # CUDA's fused kernel (_fused_rms_norm): the output and the fp32 rstd; saves the input as it is and the
            # rstd; its backward writes the input's gradient in the input's dtype
            out = G.new(rows * d * (4 if self.r.autocast else self.p), label)
            rstd = G.new(rows * 4, f"{label} rstd")
            G.node(label, out, [x, rstd], [(x, rows * d * self.res, "input grad", 0), (w, d * self.g, "weight grad",
                                                                                     0)])
            G.drop(rstd)
            return out
        x32 = x
        if self.res != 4:
            x32 = G.new(rows * d * 4, f"{label} fp32 input")
        sq = G.new(rows * d * 4, f"{label} pow")
        mean = G.new(rows * 4, f"{label} mean")
        rstd = G.new(rows * 4, f"{label} rsqrt")
        G.drop(mean, sq)
        normed = G.new(rows * d * 4, f"{label} normalized")
        out_bytes = rows * d * (4 if self.r.autocast else self.p)
        out = G.new(out_bytes, label)
        full, row = rows * d * 4, rows * 4

        def backward(n: Node) -> None:
            # The CPU's F.rms_norm is CompositeImplicitAutograd (rms_norm_symint in
            # aten/src/ATen/native/layer_norm.cpp): x.to(fp32), pow(2), mean, add_(eps), rsqrt, x * rstd, * weight
            # (in fp32), type_as(x). Autograd runs one node per op, each with the formula of
            # tools/autograd/derivatives.yaml, and a node's saved tensors go after its last user runs.
            def unsave(t: int) -> None:
                if t in n.saved:
                    n.saved.remove(t)
                    self.tl.unref(t)

            gout = G.buffer.pop(out)
            if out_bytes != full:  # type_as's ToCopyBackward: the gradient back in fp32
                gout = G.convert(gout, full, f"{label} grad to(float32)")
            # MulBackward0 (normed * weight): grad * weight, then grad * normed reduced to the weight's shape (then
            # cast to its dtype, validate_outputs)
            d_normed = G.new(full, f"{label} grad normalized")
            d_w_full = G.new(full, f"{label} grad weight (full)")
            d_w = G.new(d * 4, f"{label} weight grad")
            G.drop(d_w_full)
            if self.g != 4:
                d_w = G.convert(d_w, d * self.g, f"{label} weight grad cast")
            unsave(normed)
            G.drop(gout)
            G.route(w, d_w)
            # MulBackward0 (x * rstd): grad * rstd, then grad * x reduced to one per row
            d_x = G.new(full, f"{label} input grad (x * rstd)")
            d_rstd_full = G.new(full, f"{label} grad rstd (full)")
            d_rstd = G.new(row, f"{label} grad rstd")
            G.drop(d_rstd_full, d_normed)
            if x32 == x:  # the node is done: its input's gradient goes to the input's buffer now
                G.route(x, d_x)
            # RsqrtBackward0: -0.5 * grad * result.pow(3); add_'s backward passes the gradient through
            cube = G.new(row, f"{label} grad rsqrt pow")
            half = G.new(row, f"{label} grad rsqrt -0.5*")
            d_var = G.new(row, f"{label} grad rsqrt")
            G.drop(cube, half, d_rstd)
            unsave(rstd)
            # MeanBackward1: grad.expand(x's shape) / d
            d_sq = G.new(full, f"{label} grad mean")
            G.drop(d_var)
            # PowBackward0: grad * (2 * x.pow(1)), the C++ temporaries alive to the end of the expression
            p1 = G.new(full, f"{label} grad pow x.pow(1)")
            two = G.new(full, f"{label} grad pow 2*")
            d_pow = G.new(full, f"{label} grad pow")
            G.drop(p1, two, d_sq)
            unsave(x32)
            n.saved.clear()
            if x32 == x:
                G.route(x, d_pow)
            else:  # both gradients meet in the fp32 copy's buffer; its ToCopyBackward casts the sum back
                summed = G.new(full, f"{label} grad sum")
                G.drop(d_x, d_pow)
                G.route(x, G.convert(summed, rows * d * self.res, f"{label} input grad cast"))

        G.node(label, out, [x32, rstd, normed], backward=backward)
        G.drop(rstd, normed)
        if x32 != x:
            G.drop(x32)
        return out

    def proj(self, label: str, x: int, w: Param, out_features: int, bias: Param | None) -> int:
        """A projection of ``x`` (B T in): under autocast a 16-bit cast of an fp32 input is made for each."""
        in_features = w.numel // out_features
        fp32_input = self.r.autocast and self.tl.size(x) == self.rows * in_features * 4
        return self.linear(label, x, in_features * (4 if fp32_input else self.c), self.rows, w, out_features, bias,
                           cast_input=fp32_input)

    def sdpa(self, label: str, q: int, k: int, v: int, qkv: int | None) -> int:
        """``scaled_dot_product_attention`` (flash kernel): output and fp32 log-sum-exp; saves q, k, v (views of
        the fused qkv for GPT-2), the output and the log-sum-exp. Backward: dq, dk, dv, then ``cat`` into the
        fused qkv's gradient (GPT-2).

        A sliding window shorter than the sequence (Mistral): the reference's attention core builds the window
        mask in every call (two int64 ``arange`` of T positions, ``le``, ``sub``, ``gt``, ``bitwise_and``: T x T
        bools), and SDPA converts a boolean mask to the query's dtype (``where`` over two scalar tensors) and saves
        that copy for the backward. NB: measured on the CPU's flash kernel; on CUDA a masked call runs the
        memory-efficient kernel, whose own padding of the mask and of the log-sum-exp is not modelled."""
        G, s, rows, T = self.graph, self.spec, self.rows, self.seq
        window = s.sliding_window is not None and s.sliding_window < T
        locals_: list[int] = []
        mask = None
        if window:
            locals_ = [G.new(T * 8, f"{label} window query positions"), G.new(T * 8, f"{label} window key positions")]
            le = G.new(T * T, f"{label} window le")
            shifted = G.new(T * 8, f"{label} window positions - window")
            gt = G.new(T * T, f"{label} window gt")
            G.drop(shifted)
            locals_.append(G.new(T * T, f"{label} window mask"))
            G.drop(le, gt)
            scalars = [G.new(self.c, f"{label} mask fill {what}") for what in ("0", "-inf")]
            mask = G.new(T * T * self.c, f"{label} mask in the query's dtype")
            G.drop(*scalars)
        out = G.new(rows * s.q_dim * self.c, label)
        lse = G.new(self.batch * s.n_heads * self.seq * 4, f"{label} logsumexp")
        sizes = (rows * s.q_dim * self.c, rows * s.kv_dim * self.c, rows * s.kv_dim * self.c)
        inputs = (q, k, v)

        def backward(n: Node) -> None:
            gout = G.buffer.pop(out)
            grads = [G.new(size, f"{label} grad") for size in sizes]
            G.release(n, gout)
            if qkv is not None:
                fused = G.new(sum(sizes), f"{label} qkv grad (cat)")
                G.drop(*grads)
                G.route(qkv, fused)
            else:
                for t, grad in zip(inputs, grads, strict=True):
                    G.route(t, grad)

        saved = [qkv] if qkv is not None else [q, k, v]
        G.node(label, out, [*saved, out, lse, *([mask] if mask is not None else [])], backward=backward)
        G.drop(lse, mask, *locals_)
        return out

    def rotary(self, label: str, x: int, width: int, tables: Sequence[int] = ()) -> int:
        """``x * cos + rotate_half(x) * sin`` (``neg``, ``cat``, two ``mul``, ``add``): saves only the tables (the
        reference's are buffers; ``tables`` names those made in the forward, which the node then keeps alive);
        backward: the two products' gradients and ``rotate_half``'s (slices of a ``neg``). ``x`` is the caller's to
        drop (a local of the block)."""
        G, rows = self.graph, self.rows
        b = 4 if self.r.autocast else self.p  # fp32 tables promote a 16-bit input under autocast
        a = G.new(rows * width * b, f"{label} x cos")
        neg = G.new(rows * width * self.c // 2, f"{label} neg")
        rot = G.new(rows * width * self.c, f"{label} cat")
        G.drop(neg)
        m = G.new(rows * width * b, f"{label} rotated x sin")
        G.drop(rot)
        out = G.new(rows * width * b, label)
        G.drop(a, m)

        def backward(n: Node) -> None:
            gout = G.buffer.pop(out)
            d1 = G.new(rows * width * b, f"{label} grad x cos")
            d2 = G.new(rows * width * b, f"{label} grad x sin")
            d3 = G.new(rows * width * b, f"{label} grad rotate_half")
            G.drop(d2)
            dsum = G.new(rows * width * b, f"{label} grad sum")
            G.drop(d1, d3)
            G.release(n, gout)
            if b != self.c:
                dsum = G.convert(dsum, rows * width * self.c, f"{label} grad cast")
            G.route(x, dsum)

        G.node(label, out, list(tables), backward=backward)
        return out

    def add(self, label: str, a: int, branch: int, branch_bytes: int | None = None) -> int:
        """The residual sum (saves nothing; its backward passes the gradient to both sides). ``branch_bytes``: the
        branch's size when it is not a compute-dtype output (a Mixture of Experts sums in the norm's dtype)."""
        G = self.graph
        # under checkpointing the recomputation stops before the block's last op (nothing after it is saved)
        stop = G.mode == "recompute" and label.endswith("mlp residual")
        out = G.new(0 if stop else self.rows * self.spec.d_model * self.res, label)
        res_bytes = self.rows * self.spec.d_model * self.res
        if branch_bytes is None:
            branch_bytes = self.rows * self.spec.d_model * self.c

        def backward(n: Node) -> None:
            gout = G.buffer.pop(out)
            G.tl.ref(gout)
            G.route(a, gout)
            if branch_bytes != res_bytes:  # the 16-bit branch: its gradient cast down
                if self._precast is not None:
                    G.drop(gout)
                    gout, self._precast = self._precast, None
                else:
                    gout = G.convert(gout, branch_bytes, f"{label} grad cast")
            G.route(branch, gout)

        G.node(label, out, backward=backward)
        G.drop(branch)
        return out

    def gpt_block(self, i: int, x: int) -> int:
        s, G, ps = self.spec, self.graph, self.ps
        b = f"block {i} "

        def bias(name: str) -> Param | None:
            return ps.get(b + name)

        h = self.layer_norm(b + "ln_1", x, ps[b + "ln_1.weight"], ps[b + "ln_1.bias"])
        qkv = self.proj(b + "attn.qkv", h, ps[b + "attn.qkv.weight"], s.q_dim + 2 * s.kv_dim, bias("attn.qkv.bias"))
        G.drop(h)
        y = self.sdpa(b + "attn.sdpa", qkv, qkv, qkv, qkv)
        a = self.proj(b + "attn.proj", y, ps[b + "attn.proj.weight"], s.d_model, bias("attn.proj.bias"))
        x2 = self.add(b + "attn residual", x, a)
        h = self.layer_norm(b + "ln_2", x2, ps[b + "ln_2.weight"], ps[b + "ln_2.bias"])
        u = self.proj(b + "mlp.fc", h, ps[b + "mlp.fc.weight"], s.d_ff, bias("mlp.fc.bias"))
        G.drop(h)
        gelu = G.new(self.rows * s.d_ff * self.c, b + "mlp.gelu")
        G.node(b + "mlp.gelu", gelu, [u], [(u, self.rows * s.d_ff * self.c, "grad", 0)])
        G.drop(u)
        m = self.proj(b + "mlp.proj", gelu, ps[b + "mlp.proj.weight"], s.d_model, bias("mlp.proj.bias"))
        G.drop(gelu)
        out = self.add(b + "mlp residual", x2, m)
        G.drop(x2, qkv, y)
        return out

    def llama_block(self, i: int, x: int) -> int:
        s, G, ps, rows = self.spec, self.graph, self.ps, self.rows
        b = f"block {i} "
        x2, held = self.llama_attention(i, x)
        h = self.norm_2(b, x2, held)
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
        G.drop(prod)
        out = self.add(b + "mlp residual", x2, m)
        G.drop(x2, h, *held)  # the block returns: its locals go
        return out

    def llama_attention(self, i: int, x: int) -> tuple[int, list[int]]:
        """The first half of a LLaMA block: RMSNorm, q/k/v projections, rotary, SDPA, output projection and the
        residual sum; returns the sum and the tensors the block's locals still hold, first the norm's output.

        :class:`torchledger.workloads.models.LlamaBlock`'s ``forward`` binds each intermediate to a local, so a
        tensor lives until its name is rebound or the block returns, whatever autograd saves: the first norm's
        output ``h`` until the second norm's output is bound to ``h``; the projections until both rotations are
        made (``q, k = rotary(q), rotary(k)``); the rotated q and k (fp32 under autocast: the fp32 tables promote;
        SDPA casts them to 16 bits itself, and saves the casts), v and the attention output until the block
        returns. Where autograd saves them anyway this changes nothing; it matters for the fp32 rotated q and k
        and, in a checkpointed block's non-saving forward, for every one of them."""
        s, G, ps = self.spec, self.graph, self.ps
        b = f"block {i} "
        rows = self.rows
        h = self.layer_norm(b + "norm_1", x, ps[b + "norm_1.weight"], None)
        q = self.proj(b + "attn.q", h, ps[b + "attn.q.weight"], s.q_dim, None)
        k = self.proj(b + "attn.k", h, ps[b + "attn.k.weight"], s.kv_dim, None)
        v = self.proj(b + "attn.v", h, ps[b + "attn.v.weight"], s.kv_dim, None)
        q_rot = self.rotary(b + "attn.q rotary", q, s.q_dim)
        k_rot = self.rotary(b + "attn.k rotary", k, s.kv_dim)
        G.drop(q, k)
        q_in, k_in = q_rot, k_rot
        if self.r.autocast:  # autocast's _to_copy of SDPA's fp32 inputs: what SDPA saves; freed after it unless saved
            q_in = G.new(rows * s.q_dim * self.c, b + "attn.q cast")
            G.node(b + "attn.q cast", q_in, [], [(q_rot, rows * s.q_dim * 4, "grad", 0)])
            k_in = G.new(rows * s.kv_dim * self.c, b + "attn.k cast")
            G.node(b + "attn.k cast", k_in, [], [(k_rot, rows * s.kv_dim * 4, "grad", 0)])
        y = self.sdpa(b + "attn.sdpa", q_in, k_in, v, None)
        if self.r.autocast:
            G.drop(q_in, k_in)
        a = self.proj(b + "attn.o", y, ps[b + "attn.o.weight"], s.d_model, None)
        return self.add(b + "attn residual", x, a), [h, q_rot, k_rot, v, y]

    def norm_2(self, b: str, x2: int, held: list[int]) -> int:
        """The second RMSNorm of a LLaMA block: once its output is bound to ``h``, the first norm's output
        (``held[0]``, from :meth:`llama_attention`) goes."""
        h = self.layer_norm(b + "norm_2", x2, self.ps[b + "norm_2.weight"], None)
        self.graph.drop(held.pop(0))
        return h

    def moe_block(self, i: int, x: int) -> int:
        """A Mixtral block: LLaMA's attention half, RMSNorm, the Mixture of Experts, the residual sum (the block's
        locals held as :meth:`llama_attention` says, the second norm's output until the block returns)."""
        G = self.graph
        b = f"block {i} "
        x2, held = self.llama_attention(i, x)
        h = self.norm_2(b, x2, held)
        m = self.moe(i, h)
        out = self.add(b + "mlp residual", x2, m, branch_bytes=self.rows * self.spec.d_model * (
            4 if self.r.autocast else self.p))
        G.drop(x2, h, *held)  # the block returns: its locals go
        return out

    def moe(self, i: int, h: int) -> int:
        """:class:`torchledger.workloads.models.MoE` on the norm output ``h`` (N x d), expert e getting
        ``self.routing[i][e]`` rows: the router (Linear, fp32 softmax, top-k, renormalizing division), then per
        expert the ``nonzero`` slots and their tokens, ``index_select`` of the rows, the SwiGLU expert, the product
        with the gathered routing weights, ``index_add_`` into the zero-filled output (returned).

        Backward, in the engine's order (latest node first): each expert's chain in turn from the last expert, its
        ``index_add_`` passing the output's gradient on to the previous one; each ``index_select`` makes a gradient
        of its whole source (N x d for the tokens, N k for the weights), summed into that source's gradient.
        NB: the saved tensors are linear in the rows per expert, so only the transients depend on the routing.
        """
        s, G, ps, N = self.spec, self.graph, self.ps, self.rows
        b = f"block {i} moe."
        E, k, d = s.n_experts, s.experts_per_token, s.d_model
        c, hb = self.c, (4 if self.r.autocast else self.p)  # hb: the norm output's (and the weights') bytes
        logits = self.proj(b + "router", h, ps[b + "router.weight"], E, None)  # (N, E)
        src = logits
        if c != 4:  # softmax(dtype=float) converts the 16-bit logits first
            src = G.new(N * E * 4, b + "router logits fp32")
        probs = G.new(N * E * 4, b + "softmax")
        G.node(b + "softmax", probs, [probs], [(logits, N * E * 4, "grad", N * E * c if c != 4 else 0)])
        if src != logits:
            G.drop(src)
        values = G.new(N * k * 4, b + "topk values")
        indices = G.new(N * k * 8, b + "topk indices")
        G.node(b + "topk", values, [indices], [(probs, N * E * 4, "grad (scatter)", 0)])
        total = G.new(N * 4, b + "topk sum")
        G.node(b + "topk sum", total, [], [(values, N * k * 4, "grad (expand)", 0)])
        weights = G.new(N * k * 4, b + "renormalized weights")
        div = G.node(b + "div", weights, [values, total], [(values, N * k * 4, "grad self", 0)])

        def div_backward(n: Node, weights: int = weights, total: int = total, values: int = values) -> None:
            gout = G.buffer.pop(weights)
            d_self = G.new(N * k * 4, b + "div grad self")
            tmp = G.new(N * k * 4, b + "div grad other")
            d_other = G.new(N * 4, b + "div grad other (sum)")
            G.drop(tmp)
            G.release(n, gout)
            G.route(values, d_self)
            G.route(total, d_other)

        div.backward = div_backward
        G.drop(values, total)
        if hb != 4:  # .to(h.dtype)
            w32 = weights
            weights = G.new(N * k * hb, b + "weights cast")
            G.node(b + "weights cast", weights, [], [(w32, N * k * hb, "grad", N * k * 4)])
            G.drop(w32)
        out = G.new(N * d * hb, b + "zeros")
        index_nodes: list[Node] = []
        slots = rows = y = None
        for e, n_e in enumerate(self.routing[i]):
            x = f"{b}expert{e}."
            hit = G.new(N * k, x + "eq")
            new_slots = G.new(n_e * 8, x + "nonzero")
            G.drop(hit, slots)
            slots = new_slots
            if n_e == 0:
                continue
            new_rows = G.new(n_e * 8, x + "floor_divide")
            G.drop(rows)
            rows = new_rows
            gathered = G.new(n_e * d * hb, x + "index_select")
            G.node(x + "index_select", gathered, [rows], [(h, N * d * hb, "grad (index_add)", 0)])
            down = self._expert(x, gathered, n_e)
            G.drop(gathered, y)  # the argument, then the previous expert's weighted output (rebound)
            w = G.new(n_e * hb, x + "weights index_select")
            G.node(x + "weights index_select", w, [slots], [(weights, N * k * hb, "grad (index_add)", 0)])
            new_y = G.new(n_e * d * hb, x + "weighted")
            mul = G.node(x + "weighted", new_y, [down, w])

            def mul_backward(n: Node, y: int = new_y, down: int = down, w: int = w, n_e: int = n_e,
                             x: str = x) -> None:
                gout = G.buffer.pop(y)
                d_down = G.new(n_e * d * hb, x + "weighted grad down")
                tmp = G.new(n_e * d * hb, x + "weighted grad weights")
                d_w = G.new(n_e * hb, x + "weighted grad weights (sum)")
                G.drop(tmp)
                G.release(n, gout)
                if hb != c:  # the engine casts the gradient to the 16-bit output's dtype
                    d_down = G.convert(d_down, n_e * d * c, x + "weighted grad down cast")
                G.route(down, d_down)
                G.route(w, d_w)

            mul.backward = mul_backward
            G.drop(w, down)
            y = new_y
            add = G.node(x + "index_add_", out, [rows, new_y])  # saves its source too (for expand_as)

            def add_backward(n: Node, y: int = new_y, n_e: int = n_e, x: str = x, first: bool = not index_nodes
                             ) -> None:
                gout = G.buffer.pop(out)
                d_src = G.new(n_e * d * hb, x + "index_add_ grad source")
                G.release(n)
                G.route(y, d_src)
                if first:  # the zeros need no gradient
                    G.drop(gout)
                else:
                    G.buffer[out] = gout

            add.backward = add_backward
            index_nodes.append(add)
        G.drop(slots, rows, y, weights, indices, probs, logits)  # the forward's locals, as it returns
        return out

    def _expert(self, x: str, gathered: int, n: int) -> int:
        """One SwiGLU expert on ``n`` gathered rows (``linear`` casts an fp32 input under autocast, for each of
        gate and up); returns the down projection's output."""
        s, G, ps = self.spec, self.graph, self.ps
        d, f = s.d_model, s.d_ff
        fp32 = self.r.autocast and self.tl.size(gathered) == n * d * 4
        row = d * (4 if fp32 else self.c)
        gate = self.linear(x + "gate", gathered, row, n, ps[x + "gate.weight"], f, None, cast_input=fp32)
        fb = n * f * self.c
        silu = G.new(fb, x + "silu")
        G.node(x + "silu", silu, [gate], [(gate, fb, "grad", 0)])
        G.drop(gate)
        up = self.linear(x + "up", gathered, row, n, ps[x + "up.weight"], f, None, cast_input=fp32)
        prod = G.new(fb, x + "mul")
        G.node(x + "mul", prod, [silu, up], [(silu, fb, "grad silu", 0), (up, fb, "grad up", 0)])
        G.drop(silu, up)
        down = self.linear(x + "down", prod, f * self.c, n, ps[x + "down.weight"], d, None)
        G.drop(prod)
        return down

    def block(self, i: int, x: int) -> int:
        """Block ``i`` as the family's description builds it (``gpt_block``, ``llama_block``, ``moe_block``)."""
        return self._block(i, x)

    def caller_bytes(self) -> int:
        """The int64 targets (``targets.view(-1)`` outputs their storage, which the storage tracker then counts); on
        CUDA the measurement leaves the caller's batches out (``measure_cuda``'s ``inputs``): none."""
        return 0 if self.device == "cuda" else self.rows * 8

    def checkpointed_block(self, i: int, x: int) -> int:
        """Non-reentrant ``torch.utils.checkpoint``: the forward keeps only the block's input (the checkpoint
        holds it) and output; the backward recomputes the block (under the forward's autocast state) up to the
        last tensor it saves (early stop), then runs its nodes."""
        G = self.graph
        G.mode = "checkpoint"
        start = len(G.nodes)
        G.tl.ref(x)  # saved by the checkpoint's own node (save_for_backward, outside its hooks): an activation
        G.tl.recategorize(x, "activations")
        out = self.block(i, x)
        G.mode = "normal"
        inner = G.nodes[start:]
        del G.nodes[start:]

        def backward(n: Node) -> None:
            gout = G.buffer.pop(out)
            if self.r.autocast and self.res != self.c and self.family.mlp != "moe":
                # the residual add saves nothing: autograd runs it (its cast of the gradient) before the first
                # unpack of a saved tensor starts the recomputation
                self._precast = G.new(self.rows * self.spec.d_model * self.c, f"block {i} mlp residual grad cast")
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
            G.buffer[rec_out] = gout
            for m in reversed(nodes):
                G.run_node(m)
            G.drop(x)

        del inner
        G.node(f"block {i} checkpoint", out, backward=backward)
        return out

    def forward(self) -> tuple[int, int]:
        s, G, rows, d = self.spec, self.graph, self.rows, self.spec.d_model
        emb = self.embedding
        if self.family.learned_positions:
            pos = G.new(self.seq * 8, "position ids")
            tok = G.new(rows * d * self.p, "wte")
            pe = G.new(self.seq * d * self.p, "wpe")
            x = G.new(rows * d * self.p, "embedding sum")
            G.drop(tok, pe)
            wpe = self.ps["wpe"]

            def backward(n: Node, x: int = x) -> None:
                gout = G.buffer.pop(x)
                summed = G.new(self.seq * d * self.g, "wpe grad (sum over the batch)")
                dense = G.new(wpe.numel * self.g, "wpe grad (embedding_dense_backward)")
                G.drop(summed)
                G.release(n)
                dtok = G.new(emb.numel * self.g, "wte grad (embedding_dense_backward)")
                G.drop(gout)
                G.route(wpe, dense)
                G.route(emb, dtok)

            G.node("embedding", x, [pos], backward=backward)
            G.drop(pos)
        else:
            x = G.new(rows * d * self.p, "embed_tokens")

            def backward(n: Node, x: int = x) -> None:
                gout = G.buffer.pop(x)
                dtok = G.new(emb.numel * self.g, "embed_tokens grad (embedding_dense_backward)")
                G.drop(gout)
                G.route(emb, dtok)

            G.node("embedding", x, backward=backward)
        for i in range(s.n_layers):
            ckpt = i in self.checkpointed
            nxt = self.checkpointed_block(i, x) if ckpt else self.block(i, x)
            G.drop(x)
            x = nxt
        nf = self.family.norm_names[2]
        h = self.layer_norm(nf, x, self.ps[f"{nf}.weight"], self.ps.get(f"{nf}.bias"))
        G.drop(x)
        logits = self.proj("lm_head", h, self.head, s.vocab_size, None)
        G.drop(h)
        if self.caller_bytes():
            # ``targets.view(-1)``: an op outputs the caller's targets storage, so the storage tracker counts it from
            # here; the caller holds it to the step's end, past nll_loss's backward (one per micro-batch)
            targets = G.new(self.caller_bytes(), "targets view")
            G.node("targets", None, [targets], backward=lambda n: None)
            G.drop(targets)
        loss, _ = self.cross_entropy(logits, rows, s.vocab_size)
        return logits, loss


class _MLPStep(_Step):
    def __init__(self, spec: MLPSpec, batch: int, config: StepConfig, device: str) -> None:
        params = []
        for i, (a, b) in enumerate(pairwise(spec.dims)):
            params += [Param(f"layer {i} weight", a * b), Param(f"layer {i} bias", b)]
        super().__init__(params, config, device)
        self.spec, self.batch = spec, batch

    def forward(self) -> tuple[int, int]:
        """Linear (addmm) and ReLU (saves its output, which the next Linear saves too); the input batch belongs
        to the caller (its autocast cast does not)."""
        G, B, dims = self.graph, self.batch, self.spec.dims
        x = G.new(0, "input")
        n = len(dims) - 1
        for i in range(n):
            a, b = dims[i], dims[i + 1]
            w, bias = self.params[2 * i], self.params[2 * i + 1]
            out = self.linear(f"layer {i}", x, a * (4 if (i == 0 and self.r.autocast) else self.c), B, w, b, bias,
                              needs_input_grad=i > 0, cast_input=i == 0 and self.r.autocast)
            G.drop(x)
            if i < n - 1:
                relu = G.new(B * b * self.c, f"relu {i}")
                G.node(f"relu {i}", relu, [relu], [(out, B * b * self.c, "grad", 0)])
                G.drop(out)
                out = relu
            x = out
        loss, _ = self.cross_entropy(x, B, dims[-1])
        return x, loss


class _CNNStep(_Step):
    def __init__(self, spec: CNNSpec, batch: int, config: StepConfig, device: str) -> None:
        widths = (spec.in_channels, *spec.channels)
        params = []
        for i, (a, b) in enumerate(pairwise(widths)):
            params += [Param(f"conv {i} weight", a * b * 9), Param(f"conv {i} bias", b)]
        params += [Param("head weight", spec.channels[-1] * spec.n_classes), Param("head bias", spec.n_classes)]
        super().__init__(params, config, device)
        self.spec, self.batch = spec, batch

    def forward(self) -> tuple[int, int]:
        """``convolution`` (saves its input and weight), ReLU, the global mean (its backward: ``div`` expands the
        gradient to B C H W), the Linear head."""
        G, B, s = self.graph, self.batch, self.spec
        px = s.image_size**2
        widths = (s.in_channels, *s.channels)
        x = G.new(0, "input")
        if self.r.autocast:
            x = G.convert(x, B * s.in_channels * px * self.c, "input cast")
        for i, (a, b) in enumerate(pairwise(widths)):
            w, bias = self.params[2 * i], self.params[2 * i + 1]
            if self.r.autocast:
                self.weight(bias)
            w_copy, w_cast = self.weight(w)
            conv = G.new(B * b * px * self.c, f"conv {i}")
            grads: list[tuple[int | Param, int, str, int]] = []
            if i > 0:
                grads.append((x, B * a * px * self.c, "input grad", 0))
            grads.append((w, w.numel * (self.c if self.r.autocast else self.g), "weight grad", w_cast))
            grads.append((bias, b * (self.c if self.r.autocast else self.g), "bias grad",
                          b * self.g if self.r.autocast else 0))
            G.node(f"conv {i}", conv, [x] + ([w_copy] if w_copy is not None else []), grads)
            G.drop(x)
            relu = G.new(B * b * px * self.c, f"relu {i}")
            G.node(f"relu {i}", relu, [relu], [(conv, B * b * px * self.c, "grad", 0)])
            G.drop(conv)
            x = relu
        last = s.channels[-1]
        pooled = G.new(B * last * self.c, "mean pool")
        G.node("mean pool", pooled, [], [(x, B * last * px * self.c, "grad (div)", 0)])
        G.drop(x)
        logits = self.linear("head", pooled, last * self.c, B, self.params[-2], s.n_classes, self.params[-1])
        G.drop(pooled)
        loss, _ = self.cross_entropy(logits, B, s.n_classes)
        return logits, loss


@dataclass(frozen=True)
class StepTimeline:
    """The result of walking a step: the peak moment and the largest moment of each phase."""

    peak: Moment
    phases: dict[str, Moment]


def _walk(step: _Step, forward: Callable[[], tuple[int, int]]) -> StepTimeline:
    step.micro_batches(forward)
    step.finish()
    assert step.tl.peak is not None
    return StepTimeline(step.tl.peak, {p: step.tl.phase_peaks[p] for p in PHASES})


def transformer_timeline(spec: ModelSpec, batch: int, seq_len: int, config: StepConfig,
                         device: str = "cpu", routing: Sequence[Sequence[int]] | None = None) -> StepTimeline:
    """Walk one training step of the reference transformer (:mod:`torchledger.workloads.models`).

    ``routing`` (Mixture of Experts only): the rows each expert of each block gets, as the router chose them in
    the step (every micro-batch and recomputation taken to route alike); default :func:`balanced_routing`.
    """
    step = _TransformerStep(spec, batch, seq_len, config, device, routing)
    return _walk(step, step.forward)


def mlp_timeline(spec: MLPSpec, batch: int, config: StepConfig, device: str = "cpu") -> StepTimeline:
    """Walk one training step of the reference MLP."""
    step = _MLPStep(spec, batch, config, device)
    return _walk(step, step.forward)


def cnn_timeline(spec: CNNSpec, batch: int, config: StepConfig, device: str = "cpu") -> StepTimeline:
    """Walk one training step of the reference CNN."""
    step = _CNNStep(spec, batch, config, device)
    return _walk(step, step.forward)
