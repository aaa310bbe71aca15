"""Memory formulas, in bytes: dtypes, model states under precision recipes, activations, KV cache, the step's peak.

Every figure is an exact integer of bytes. Human units only at the edges (GiB = 2**30, GB = 10**9).

Precision recipes use Lightning's names (``32-true``, ``16-mixed``, ``bf16-mixed``, ``16-true``, ``bf16-true``),
which describe what PyTorch does: under ``*-mixed`` the parameters stay fp32 and autocast makes 16-bit copies for
each matmul, so the fp32 parameters are themselves the master weights and no separate master copy exists. The two
``*-mixed-master`` recipes describe the other common scheme (ZeRO/DeepSpeed and Megatron fp16/bf16 optimizers):
16-bit parameters and gradients with fp32 master weights and fp32 optimizer state, which ZeRO (Rajbhandari et al.
2020, Sec. 3.1) counts as 2 + 2 + 12 = 16 bytes per parameter with Adam.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from ._validate import one_of, positive_int
from .specs import ModelSpec
from .vocabulary import OPTIMIZER_IMPLS, OPTIMIZERS

DTYPE_BYTES: dict[str, int] = {
    "float64": 8,
    "float32": 4,
    "tfloat32": 4,  # a compute mode: stored as float32
    "bfloat16": 2,
    "float16": 2,
    "float8_e4m3fn": 1,
    "float8_e5m2": 1,
    "int64": 8,
    "int32": 4,
    "int16": 2,
    "int8": 1,
    "uint8": 1,
    "bool": 1,
}
_DTYPE_ALIASES: dict[str, str] = {
    "fp64": "float64", "double": "float64", "fp32": "float32", "float": "float32", "tf32": "tfloat32",
    "bf16": "bfloat16", "fp16": "float16", "half": "float16", "fp8": "float8_e4m3fn", "long": "int64", "int": "int32",
}


def canonical_dtype(dtype: str) -> str:
    """Canonical name of ``dtype`` (accepts ``torch.float16``, ``fp16``, ``half``...); ValueError if unknown."""
    if not isinstance(dtype, str):
        raise ValueError(f"dtype={dtype!r} must be a dtype name such as 'bfloat16'")
    name = dtype.removeprefix("torch.").lower()
    name = _DTYPE_ALIASES.get(name, name)
    if name not in DTYPE_BYTES:
        raise ValueError(f"dtype={dtype!r} is not known; known: {', '.join(sorted(DTYPE_BYTES))}")
    return name


def dtype_bytes(dtype: str) -> int:
    """Bytes per element of ``dtype``."""
    return DTYPE_BYTES[canonical_dtype(dtype)]


# --------------------------------------------------------------------------------------------------- recipes


@dataclass(frozen=True)
class Recipe:
    """Where each kind of model state lives, by dtype, under one precision recipe."""

    name: str
    param_dtype: str
    grad_dtype: str
    compute_dtype: str
    master_dtype: str | None
    optimizer_dtype: str
    autocast: bool
    source: str


_LIGHTNING = "Lightning Fabric/Trainer precision plugins; torch.autocast"
_ZERO = "Rajbhandari et al. 2020, ZeRO (arXiv 1910.02054), Sec. 3.1; DeepSpeed and Megatron fp16/bf16 optimizers"

RECIPES: dict[str, Recipe] = {
    "32-true": Recipe("32-true", "float32", "float32", "float32", None, "float32", False, _LIGHTNING),
    "16-mixed": Recipe("16-mixed", "float32", "float32", "float16", None, "float32", True, _LIGHTNING),
    "bf16-mixed": Recipe("bf16-mixed", "float32", "float32", "bfloat16", None, "float32", True, _LIGHTNING),
    "16-true": Recipe("16-true", "float16", "float16", "float16", None, "float16", False, _LIGHTNING),
    "bf16-true": Recipe("bf16-true", "bfloat16", "bfloat16", "bfloat16", None, "bfloat16", False, _LIGHTNING),
    "16-mixed-master": Recipe("16-mixed-master", "float16", "float16", "float16", "float32", "float32", False, _ZERO),
    "bf16-mixed-master": Recipe(
        "bf16-mixed-master", "bfloat16", "bfloat16", "bfloat16", "float32", "float32", False, _ZERO
    ),
}

#: State tensors each optimizer keeps per parameter: momentum buffer; Adam's exp_avg and exp_avg_sq.
OPTIMIZER_STATES: dict[str, int] = dict(zip(OPTIMIZERS, (0, 1, 2, 2), strict=True))  # state tensors per parameter


def get_recipe(name: str) -> Recipe:
    """The recipe called ``name``; ValueError listing the recipes when there is none."""
    return RECIPES[one_of("precision", name, RECIPES)]


@dataclass(frozen=True)
class ModelStates:
    """Bytes of the model states: parameters, gradients, master weights, optimizer state."""

    params: int
    grads: int
    master_params: int
    optimizer: int

    @property
    def total(self) -> int:
        return self.params + self.grads + self.master_params + self.optimizer


def param_bytes(n_params: int, recipe: str = "32-true") -> int:
    """Bytes of the parameters as the recipe stores them (fp32 under ``*-mixed``)."""
    return positive_int("n_params", n_params) * dtype_bytes(get_recipe(recipe).param_dtype)


def grad_bytes(n_params: int, recipe: str = "32-true") -> int:
    """Bytes of the gradients (one per parameter, in the recipe's gradient dtype)."""
    return positive_int("n_params", n_params) * dtype_bytes(get_recipe(recipe).grad_dtype)


def master_param_bytes(n_params: int, recipe: str = "32-true") -> int:
    """Bytes of a separate fp32 master copy: only ``*-mixed-master`` recipes keep one."""
    r = get_recipe(recipe)
    return positive_int("n_params", n_params) * (dtype_bytes(r.master_dtype) if r.master_dtype else 0)


def optimizer_state_bytes(n_params: int, optimizer: str = "adamw", recipe: str = "32-true") -> int:
    """Bytes of optimizer state: 0 for SGD, one buffer for momentum, two (exp_avg, exp_avg_sq) for Adam/AdamW.

    State lives in the dtype of the tensor the optimizer updates (``torch.zeros_like``): the fp32 parameters or
    master copy, or the 16-bit parameters under ``*-true``. NB: Adam's per-tensor ``step`` counters (one scalar per
    parameter tensor) are left out.
    """
    states = OPTIMIZER_STATES[one_of("optimizer", optimizer, OPTIMIZER_STATES)]
    return positive_int("n_params", n_params) * states * dtype_bytes(get_recipe(recipe).optimizer_dtype)


def model_state_bytes(n_params: int, recipe: str = "32-true", optimizer: str = "adamw") -> ModelStates:
    """Parameters, gradients, master weights and optimizer state of ``n_params`` parameters.

    Per parameter with AdamW: 16 bytes under ``32-true`` (4 + 4 + 8), ``*-mixed`` (4 + 4 + 8: the fp32 weights are
    the master) and ``*-mixed-master`` (2 + 2 + 4 + 8, ZeRO's accounting); 8 under ``*-true`` 16-bit (2 + 2 + 4).
    """
    return ModelStates(
        params=param_bytes(n_params, recipe),
        grads=grad_bytes(n_params, recipe),
        master_params=master_param_bytes(n_params, recipe),
        optimizer=optimizer_state_bytes(n_params, optimizer, recipe),
    )


def optimizer_step_temp_bytes(
    n_params: int, largest_param: int, optimizer: str = "adamw", recipe: str = "32-true", impl: str = "foreach",
    *, sizes: Sequence[int] | None = None,
) -> int:
    """Bytes of the temporaries alive at the peak of the optimizer step.

    - Adam/AdamW ``foreach`` (the CUDA default): ``_foreach_sqrt(exp_avg_sq)`` allocates one state-sized buffer for
      every parameter at once; ``for-loop`` (the CPU default) allocates ``sqrt`` and the bias-corrected quotient for
      one tensor at a time while the previous tensor's quotient is still referenced by the loop's local variable
      (``torch.optim.adam._single_tensor_adam`` rebinds ``denom`` only on the next iteration): the largest
      ``2 n_i + n_(i-1)`` over the parameters in order when ``sizes`` (element counts, in the optimizer's order) is
      given, else its bound ``3 x largest_param``; ``fused`` allocates nothing.
    - SGD and momentum update in place: nothing.
    - ``*-mixed-master`` recipes first copy the 16-bit gradients into fp32 (4 bytes per parameter).
    NB: gradient clipping adds one scalar per tensor, left out.
    """
    one_of("impl", impl, OPTIMIZER_IMPLS)
    positive_int("n_params", n_params)
    positive_int("largest_param", largest_param)
    r = get_recipe(recipe)
    state = dtype_bytes(r.optimizer_dtype)
    temp = 0
    if OPTIMIZER_STATES[one_of("optimizer", optimizer, OPTIMIZER_STATES)] == 2:
        if sizes is not None:
            numels = [positive_int("sizes[]", n) for n in sizes]
            if not numels or sum(numels) != n_params or max(numels) != largest_param:
                raise ValueError(f"sizes={list(sizes)!r} must be the parameters' element counts: they sum to "
                                 f"n_params={n_params} and their largest is largest_param={largest_param}")
            loop = max(2 * n + prev for n, prev in zip(numels, [0, *numels[:-1]], strict=True))
        else:
            loop = 3 * largest_param
        temp = {"foreach": n_params * state, "for-loop": loop * state, "fused": 0}[impl]
    if r.master_dtype:
        temp += n_params * dtype_bytes(r.master_dtype)
    return temp


def korthikanti_layer_activation_bytes(
    seq_len: int, batch: int, d_model: int, n_heads: int, *, flash: bool = False
) -> int:
    """Korthikanti et al. 2022 (arXiv 2205.05198, Sec. 4.1, eq. 1): s b h (34 + 5 a s / h) bytes per 16-bit layer.

    Exact integer form 34 s b h + 5 a s^2 b. ``flash=True`` drops the 5 a s^2 b attention-matrix term, which fused
    attention never stores. NB: counts dropout masks and a specific implementation (see
    :func:`layer_activation_items` for the reference layers' exact count).
    """
    s, b, h, a = (positive_int(n, x) for n, x in (
        ("seq_len", seq_len), ("batch", batch), ("d_model", d_model), ("n_heads", n_heads)
    ))
    return 34 * s * b * h + (0 if flash else 5 * a * s * s * b)


def kv_cache_bytes(spec: ModelSpec, batch: int, seq_len: int, dtype: str = "bfloat16") -> int:
    """KV cache for inference: 2 (K and V) x layers x n_kv_heads x head_dim x seq_len x batch x bytes.

    Check: LLaMA-2-7B (32 layers, 32 KV heads, head_dim 128) in bf16 holds 2*32*32*128*2 = 524,288 bytes per token:
    1 GiB at 2,048 tokens, 2 GiB at 4,096. NB: the lecture notes claimed 536 MB per layer and 17 GB in all at 2,048
    tokens (they multiplied by the layer count twice and dropped K/V's factor 2); the right total is 1 GiB.
    """
    positive_int("batch", batch)
    positive_int("seq_len", seq_len)
    return 2 * spec.n_layers * spec.kv_dim * seq_len * batch * dtype_bytes(dtype)
