"""The analytic core: FLOPs, bytes and hardware peaks from shapes alone. Pure Python; never imports torch."""

from torchledger.formulas.estimate import Estimate, estimate
from torchledger.formulas.flops import (
    ModelFlops,
    attention_backward_flops,
    attention_flops,
    bmm_flops,
    conv_backward_flops,
    conv_flops,
    flops_per_token_train,
    kaplan_forward_flops_per_token,
    kaplan_train_flops_per_token,
    layer_forward_flops,
    layer_forward_flops_breakdown,
    linear_backward_flops,
    linear_flops,
    lm_head_flops,
    matmul_flops,
    megatron_flops_with_recompute,
    megatron_model_flops,
    mfu,
    model_flops,
    palm_train_flops_per_token,
    train_step_flops,
)
from torchledger.formulas.hardware import (
    DEVICES,
    DeviceSpec,
    arithmetic_intensity,
    attainable_flops,
    lookup_device,
    matmul_intensity,
    peak_flops,
    ridge_point,
)
from torchledger.formulas.memory import (
    RECIPES,
    Activations,
    ModelStates,
    Recipe,
    TrainPeak,
    activation_bytes,
    dtype_bytes,
    korthikanti_layer_activation_bytes,
    kv_cache_bytes,
    layer_activation_items,
    model_state_bytes,
    optimizer_state_bytes,
    optimizer_step_temp_bytes,
    train_peak_bytes,
)
from torchledger.formulas.specs import (
    PRESETS,
    ModelSpec,
    ParamCounts,
    get_preset,
    n_params,
    param_counts,
    spec_from_hf_config,
)

__all__ = [
    "DEVICES", "PRESETS", "RECIPES", "Activations", "DeviceSpec", "Estimate", "ModelFlops", "ModelSpec",
    "ModelStates", "ParamCounts", "Recipe", "TrainPeak", "activation_bytes", "arithmetic_intensity",
    "attainable_flops", "attention_backward_flops", "attention_flops", "bmm_flops", "conv_backward_flops",
    "conv_flops", "dtype_bytes", "estimate", "flops_per_token_train", "get_preset", "kaplan_forward_flops_per_token",
    "kaplan_train_flops_per_token", "korthikanti_layer_activation_bytes", "kv_cache_bytes", "layer_activation_items",
    "layer_forward_flops", "layer_forward_flops_breakdown", "linear_backward_flops", "linear_flops", "lm_head_flops",
    "lookup_device", "matmul_flops", "matmul_intensity", "megatron_flops_with_recompute", "megatron_model_flops",
    "mfu", "model_flops", "model_state_bytes", "n_params", "optimizer_state_bytes", "optimizer_step_temp_bytes",
    "palm_train_flops_per_token", "param_counts", "peak_flops", "ridge_point", "spec_from_hf_config",
    "train_peak_bytes", "train_step_flops",
]
