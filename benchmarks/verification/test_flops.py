"""FLOP formulas against first-principles arithmetic and published figures (each expected value written out)."""

from __future__ import annotations

import pytest

from torchledger.formulas import flops as F
from torchledger.formulas.specs import get_preset, param_counts

GPT2 = get_preset("gpt2-small")
LLAMA7 = get_preset("llama-7b")


# ------------------------------------------------------------------------------------------------ primitives


def test_matmul_is_two_flops_per_mac() -> None:
    assert F.matmul_flops(3, 5, 7) == 2 * 3 * 5 * 7 == 210
    assert F.bmm_flops(4, 3, 5, 7) == 4 * 210


def test_linear_counts_flops_not_macs() -> None:
    # nn.Linear(768, 3072) over 1024 tokens: 1024*768*3072 = 2,415,919,104 MACs (what the lecture notes counted)
    assert F.linear_flops(1024, 768, 3072) == 2 * 1024 * 768 * 3072 == 4_831_838_208
    # the bias add is one FLOP per output element, outside the default convention
    assert F.linear_flops(1024, 768, 3072, bias=True) == 4_831_838_208 + 1024 * 3072


def test_linear_backward_data_and_weight_grads() -> None:
    fwd = 2 * 8 * 16 * 32
    assert F.linear_backward_flops(8, 16, 32) == 2 * fwd
    assert F.linear_backward_flops(8, 16, 32, input_grad=False) == fwd
    assert F.linear_backward_flops(8, 16, 32, weight_grad=False) == fwd


def test_two_layer_mlp_on_plain_input_is_2_5x_forward() -> None:
    # Two equal Linear layers; the first one's input needs no gradient, so it skips its data-grad:
    # forward 2F, backward F (layer 1 weight-grad) + 2F (layer 2) = 3F, total 5F = 2.5 x forward.
    layer = F.linear_flops(64, 256, 256)
    forward = 2 * layer
    backward = F.linear_backward_flops(64, 256, 256, input_grad=False) + F.linear_backward_flops(64, 256, 256)
    assert (forward + backward) / forward == 2.5


def test_conv2d_resnet_stem() -> None:
    # ResNet-50's stem Conv2d(3, 64, 7, stride 2, padding 3) on 224x224: output 112x112; He et al.'s ~118M MACs.
    assert F.conv_output_size(224, 7, 2, 3) == (224 + 2 * 3 - 7) // 2 + 1 == 112
    expected = 2 * 1 * 64 * 112 * 112 * 3 * 7 * 7
    assert expected == 236_027_904  # 118,013,952 MACs
    assert F.conv_flops(1, 3, 64, (224, 224), 7, stride=2, padding=3) == expected


def test_conv1d_stride_padding_dilation() -> None:
    # Conv1d(16, 32, kernel 5, stride 2, padding 4, dilation 2) on length 100:
    # out = floor((100 + 8 - 2*4 - 1) / 2) + 1 = 50
    assert F.conv_output_size(100, 5, 2, 4, 2) == 50
    assert F.conv_flops(8, 16, 32, 100, 5, stride=2, padding=4, dilation=2) == 2 * 8 * 32 * 50 * 16 * 5


def test_conv3d_anisotropic() -> None:
    # Conv3d(4, 8, kernel (3, 3, 1), stride (1, 2, 2)) on 9 x 16 x 16: out 7 x 7 x 8
    out = (9 - 3 + 1, (16 - 3) // 2 + 1, (16 - 1) // 2 + 1)
    assert out == (7, 7, 8)
    assert F.conv_flops(2, 4, 8, (9, 16, 16), (3, 3, 1), stride=(1, 2, 2)) == 2 * 2 * 8 * (7 * 7 * 8) * 4 * (3 * 3 * 1)


def test_grouped_and_depthwise_conv() -> None:
    # groups divide the input channels each filter sees
    assert F.conv_flops(1, 32, 64, (10, 10), 3, padding=1, groups=4) == 2 * 64 * 100 * (32 // 4) * 9
    # depthwise: one input channel per output channel
    assert F.conv_flops(1, 32, 32, (10, 10), 3, padding=1, groups=32) == 2 * 32 * 100 * 1 * 9


def test_transposed_conv_scatters_each_input() -> None:
    # ConvTranspose2d(16, 8, kernel 4, stride 2, padding 1) on 8x8: output (8-1)*2 - 2 + 3 + 1 = 16
    assert F.conv_transpose_output_size(8, 4, 2, 1) == 16
    # every input element (16 channels x 64 positions) meets every weight of its group (8 out channels x 16 taps)
    assert F.conv_flops(2, 16, 8, (8, 8), 4, stride=2, padding=1, transposed=True) == 2 * 2 * 16 * 64 * 8 * 16
    assert F.conv_flops(1, 16, 8, (8, 8), 4, stride=2, padding=1, transposed=True, groups=2) == 2 * 16 * 64 * 4 * 16


def test_conv_backward_is_one_forward_per_gradient() -> None:
    fwd = F.conv_flops(1, 3, 8, (16, 16), 3)
    assert F.conv_backward_flops(fwd) == 2 * fwd
    assert F.conv_backward_flops(fwd, input_grad=False) == fwd


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"in_channels": 30, "groups": 4}, "groups=4 must divide in_channels=30"),
        ({"out_channels": 30, "groups": 4}, "groups=4 must divide out_channels=30"),
        ({"input_size": (2, 2), "kernel_size": 5}, "too small"),
        ({"stride": 0}, "stride=0"),
        ({"padding": -1}, "padding=-1"),
        ({"batch": 0}, "batch=0"),
        ({"kernel_size": (3, 3, 3)}, "kernel_size=.* must have 2 entries"),
    ],
)
def test_conv_bad_arguments(kwargs: dict[str, object], message: str) -> None:
    args: dict[str, object] = {"batch": 1, "in_channels": 32, "out_channels": 64, "input_size": (8, 8),
                               "kernel_size": 3}
    args.update(kwargs)
    with pytest.raises(ValueError, match=message):
        F.conv_flops(**args)  # type: ignore[arg-type]


# ------------------------------------------------------------------------------------------------ attention


def test_attention_default_is_dense_without_softmax() -> None:
    # B=2, H=12, T=1024, head_dim 64: QK^T and AV are each 2*B*H*T*T*64
    qk = 2 * 2 * 12 * 1024 * 1024 * 64
    assert F.attention_flops(2, 12, 1024, 1024, 64) == 2 * qk == 6_442_450_944


def test_attention_options() -> None:
    dense = F.attention_flops(1, 4, 128, 128, 32)
    assert F.attention_flops(1, 4, 128, 128, 32, causal=True) == dense // 2
    # Chinchilla's softmax convention: 3 FLOPs per score, B*H*T*T scores
    assert F.attention_flops(1, 4, 128, 128, 32, softmax_flops_per_element=3) == dense + 3 * 4 * 128 * 128
    # cross-attention with a different value width
    assert F.attention_flops(1, 2, 10, 20, 8, v_head_dim=16) == 2 * 2 * 10 * 20 * 8 + 2 * 2 * 10 * 20 * 16


def test_attention_backward() -> None:
    fwd = F.attention_flops(1, 4, 128, 128, 32)
    assert F.attention_backward_flops(1, 4, 128, 128, 32) == 2 * fwd
    # fused kernels recompute QK^T: 5 bmm-equivalents, FlopCounterMode's 2.5x
    assert F.attention_backward_flops(1, 4, 128, 128, 32, recompute_scores=True) == 5 * fwd // 2


def test_gqa_attention_core_costs_the_same_as_mha() -> None:
    tiny = get_preset("llama-tiny")
    mha = F.layer_forward_flops_breakdown(tiny, 2, 64)
    tokens = 2 * 64
    assert mha["attn.scores"] == mha["attn.av"] == 2 * 2 * 4 * 64 * 64 * 32
    # q: 128 -> 128, k and v: 128 -> 64 each (2 KV heads of 32)
    assert mha["attn.qkv"] == 2 * tokens * 128 * (128 + 64 + 64)
    assert mha["mlp.gate"] == mha["mlp.up"] == mha["mlp.down"] == 2 * tokens * 128 * 344


# ------------------------------------------------------------------------------------------------ models


def test_gpt2_small_forward_backward_matches_nanogpt() -> None:
    # nanoGPT transformer_sizing.ipynb, B=1, T=1024: per block kqv 2*T*d*3d, scores 2*T*T*d, reduce 2*T*T*d,
    # proj 2*T*d*d, mlp 2*2*T*d*4d; dense (LM head) 2*T*d*V; total = 3 x forward.
    T, d, L, V = 1024, 768, 12, 50257
    block = 2 * T * d * 3 * d + 2 * T * T * d + 2 * T * T * d + 2 * T * d * d + 2 * 2 * T * d * 4 * d
    forward = L * block + 2 * T * d * V
    assert forward == 291_648_307_200
    flops = F.model_flops(GPT2, 1, 1024)
    assert flops.forward == forward
    assert flops.forward + flops.backward == 874_944_921_600
    assert flops.recompute == 0


def test_gpt2_small_per_token_forward() -> None:
    # The lecture notes' "6M FLOP per token" is one block's projections in MACs. Per token at T=1024 one block is
    # 2*12*d^2 + 4*T*d FLOPs and the model 12 blocks + the head 2*d*V.
    per_block = 2 * 12 * 768**2 + 4 * 1024 * 768
    assert per_block == 17_301_504
    assert F.layer_forward_flops(GPT2, 1, 1024) == 1024 * per_block
    assert F.model_flops(GPT2, 1, 1024).forward // 1024 == 12 * per_block + 2 * 768 * 50257 == 284_812_800


def test_llama_7b_forward_backward() -> None:
    # REFERENCE: LLaMA-2-7B forward+backward at T=2048 is about 87.785 TFLOP, within 0.01% of 6N+12LHQT.
    T, d, L, f, V = 2048, 4096, 32, 11008, 32000
    per_token_layer = 2 * (4 * d * d + 3 * d * f) + 4 * T * d
    forward = T * (L * per_token_layer + 2 * d * V)
    flops = F.model_flops(LLAMA7, 1, T)
    assert flops.forward == forward
    assert flops.forward + flops.backward == 3 * forward == 87_784_836_562_944
    palm = F.palm_train_flops_per_token(LLAMA7, T) * T
    assert abs(palm - 3 * forward) / (3 * forward) < 1e-4


def test_backward_is_twice_forward_and_batch_scales() -> None:
    one = F.model_flops(LLAMA7, 1, 512)
    four = F.model_flops(LLAMA7, 4, 512)
    assert one.backward == 2 * one.forward
    assert four.forward == 4 * one.forward


def test_recompute_full_and_selective() -> None:
    tiny = get_preset("gpt-tiny")
    layer = F.layer_forward_flops_breakdown(tiny, 2, 256)
    # each of the 2 blocks runs forward again, the head does not; the early stop of torch.utils.checkpoint skips
    # each block's last matmul (the MLP's down projection), whose output no backward needs
    full = F.model_flops(tiny, 2, 256, checkpointing="full")
    assert full.recompute == 2 * (sum(layer.values()) - layer["mlp.proj"])
    whole = F.model_flops(tiny, 2, 256, checkpointing="full", checkpoint_early_stop=False)
    assert whole.recompute == 2 * sum(layer.values())
    assert whole.recompute - full.recompute == 2 * (2 * 2 * 256 * 512 * 128)
    sel = F.model_flops(tiny, 2, 256, checkpointing="selective")
    assert sel.recompute == 2 * (2 * 2 * 4 * 256 * 256 * 32) * 2  # 2 blocks x (QK^T + AV)
    with pytest.raises(ValueError, match="checkpointing='partial'"):
        F.model_flops(tiny, 2, 256, checkpointing="partial")


def test_train_step_and_per_token() -> None:
    tiny = get_preset("gpt-tiny")
    micro = F.model_flops(tiny, 4, 128)
    assert F.train_step_flops(tiny, 4, 128, grad_accum=8) == 8 * (micro.forward + micro.backward)
    assert F.flops_per_token_train(tiny, 128) == micro.train / (4 * 128)


def test_mfu() -> None:
    # 10,000 tokens/s at 6e9 FLOPs per token on a 989.4 TFLOP/s chip
    assert F.mfu(10_000, 6e9, 989.4e12) == pytest.approx(6e13 / 989.4e12)
    with pytest.raises(ValueError, match="tokens_per_second=0"):
        F.mfu(0, 6e9, 989.4e12)


# ------------------------------------------------------------------------------------------------ published formulas


def test_kaplan_forward_drops_the_head_and_half_the_attention() -> None:
    # Kaplan et al. 2020, Table 1: C_forward = 2N + 2 L n_ctx d_attn, N = 2 d L (2 d_attn + d_ff) = 12 L d^2.
    N = 2 * 768 * 12 * (2 * 768 + 3072)
    assert N == 12 * 12 * 768**2 == 84_934_656
    kaplan = F.kaplan_forward_flops_per_token(GPT2, 1024)
    assert kaplan == 2 * N + 2 * 12 * 1024 * 768 == 188_743_680
    exact = F.model_flops(GPT2, 1, 1024).forward // 1024
    # the difference is the LM head (2 d V) plus the second attention matmul (2 L T d)
    assert exact - kaplan == 2 * 768 * 50257 + 2 * 12 * 1024 * 768 == 96_069_120
    assert (exact - kaplan) / exact == pytest.approx(0.3373, abs=1e-4)
    # with a causal mask halved, the attention term agrees and only the head remains
    causal = F.model_flops(GPT2, 1, 1024, causal=True).forward // 1024
    assert causal - kaplan == 2 * 768 * 50257
    assert F.kaplan_train_flops_per_token(GPT2) == 6 * N


def test_palm_equals_exact_with_matmul_weights_and_over_counts_with_all_parameters() -> None:
    # PaLM App. B: 6N + 12 L H Q T per token. nanoGPT's notebook takes N = all parameters but the position table.
    T = 1024
    exact = (F.model_flops(GPT2, 1, T).forward * 3) // T
    assert F.palm_train_flops_per_token(GPT2, T) == exact == 854_438_400
    counts = param_counts(GPT2)
    n_nanogpt = counts.total - counts.position_embedding  # 123,653,376: includes biases and LayerNorms
    palm_nanogpt = 6 * n_nanogpt + 12 * 12 * 12 * 64 * T
    # each of the 121,344 bias and norm parameters is charged 6 FLOPs per token
    biases_norms = 12 * (2 * 2 * 768 + 3 * 768 + 768 + 3072 + 768) + 2 * 768
    assert biases_norms == 121_344
    assert palm_nanogpt - exact == 6 * biases_norms == 728_064
    # nanoGPT's own figure, for its bias-free model (N = 123,551,232): 875,062,886,400 vs exact 874,944,921,600
    assert (6 * 123_551_232 + 12 * 12 * 12 * 64 * T) * T == 875_062_886_400


def test_megatron_model_flops_equal_exact_for_gpt2() -> None:
    # Korthikanti et al. eq. 7: 72 B s L h^2 (1 + s/6h + V/12hL), exact for MHA with a 4h MLP.
    exact = F.model_flops(GPT2, 1, 1024)
    assert F.megatron_model_flops(1, 1024, 12, 768, 50257) == exact.forward + exact.backward
    b, s, L, h, V = 1, 1024, 12, 768, 50257
    as_published = 72 * b * s * L * h**2 * (1 + s / (6 * h) + V / (12 * h * L))
    assert as_published == pytest.approx(874_944_921_600, rel=1e-12)


def test_megatron_with_recompute_is_exact_full_checkpointing_for_gpt2() -> None:
    # Narayanan et al. eq. 3: 96 B s L h^2 (1 + s/6h + V/16Lh) = model FLOPs + one more forward of every layer.
    full = F.model_flops(GPT2, 2, 1024, checkpointing="full", checkpoint_early_stop=False)
    assert F.megatron_flops_with_recompute(2, 1024, 12, 768, 50257) == full.train
    # PyTorch's early stop saves each block's MLP down projection: 12 x 2*(2*1024)*3072*768 FLOPs fewer
    early = F.model_flops(GPT2, 2, 1024, checkpointing="full")
    assert full.train - early.train == 12 * 2 * 2048 * 3072 * 768


def test_megatron_misses_swiglu() -> None:
    # LLaMA's MLP is 3 d f per token, not Megatron's 8 d^2: exact - Megatron = 6 B s L (3 d f - 8 d^2)
    exact = F.model_flops(LLAMA7, 1, 2048)
    meg = F.megatron_model_flops(1, 2048, 32, 4096, 32000)
    diff = 6 * 2048 * 32 * (3 * 4096 * 11008 - 8 * 4096**2)
    assert diff == 412_316_860_416
    assert exact.forward + exact.backward - meg == diff
    assert diff / (exact.forward + exact.backward) == pytest.approx(0.004697, abs=1e-6)


@pytest.mark.parametrize("bad", [0, -1, 1.5, True, "8"])
def test_sizes_must_be_positive_integers(bad: object) -> None:
    with pytest.raises(ValueError, match=f"m={bad!r}"):
        F.matmul_flops(bad, 2, 2)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=f"batch={bad!r}"):
        F.model_flops(GPT2, bad, 16)  # type: ignore[arg-type]
