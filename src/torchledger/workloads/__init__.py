"""Reference workloads: plain-PyTorch models built from the analytic core's specs."""

from torchledger.workloads.models import (
    CNN,
    GPT,
    MLP,
    AttentionCore,
    Int8Linear,
    Llama,
    Mixtral,
    MoE,
    build_transformer,
    quantize_int8,
    token_batch,
)

__all__ = [
    "CNN", "GPT", "MLP", "AttentionCore", "Int8Linear", "Llama", "Mixtral", "MoE", "build_transformer", "quantize_int8",
    "token_batch",
]
