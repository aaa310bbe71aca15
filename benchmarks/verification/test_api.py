"""``torchledger.count_flops`` and ``torchledger.measure_step`` on a module defined here, not a project workload.

The expected figures are derived by hand from the module's shapes: a 2-layer MLP's matmuls, and AdamW's states.
"""

from __future__ import annotations

import contextlib
import io
import re
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import Tensor, nn

from torchledger import count_flops, measure_step

README = Path(__file__).resolve().parents[2] / "README.md"
B, D_IN, H, D_OUT = 16, 24, 40, 6


class TwoLayer(nn.Module):
    def __init__(self, d_in: int = D_IN, hidden: int = H, d_out: int = D_OUT) -> None:
        super().__init__()
        self.first, self.second = nn.Linear(d_in, hidden), nn.Linear(hidden, d_out)

    def forward(self, x: Tensor) -> Tensor:
        return self.second(torch.tanh(self.first(x)))


def xent(module: nn.Module, batch: tuple[Tensor, ...]) -> Tensor:
    return nn.functional.cross_entropy(module(batch[0]), batch[1])


def batch(b: int = B) -> tuple[Tensor, Tensor]:
    gen = torch.Generator().manual_seed(0)
    return torch.randn(b, D_IN, generator=gen), torch.randint(0, D_OUT, (b,), generator=gen)


FORWARD = 2 * B * (D_IN * H + H * D_OUT)
# backward: both gradients of the second layer (data and weight), only the weight gradient of the first (its input
# needs none): 2 x the second layer's forward + 1 x the first's
BACKWARD = 2 * (2 * B * H * D_OUT) + 2 * B * D_IN * H
PARAM_BYTES = 4 * (D_IN * H + H + H * D_OUT + D_OUT)


def test_forward_flops_are_the_two_matmuls() -> None:
    report = count_flops(TwoLayer(), batch()[0])
    assert report.figure("hooks") == report.figure("dispatch") == FORWARD == 38_400
    assert report.profiler is None and report.figure("profiler") is None
    assert report.to_dict() == {"backward": False, "hooks": FORWARD, "dispatch": FORWARD, "profiler": None}


def test_backward_flops_and_the_profiler() -> None:
    model = TwoLayer()
    report = count_flops(model, batch()[0], backward=True, profiler=True)
    assert report.hooks.forward == report.dispatch.forward == report.profiler.forward == FORWARD  # type: ignore[union-attr]
    assert report.hooks.backward == report.dispatch.backward == report.profiler.backward == BACKWARD  # type: ignore[union-attr]
    assert all(p.grad is None for p in model.parameters())  # the counting leaves no gradients behind


def test_an_input_that_needs_a_gradient_adds_the_first_layers_data_gradient() -> None:
    x = batch()[0].requires_grad_()
    report = count_flops(TwoLayer(), x, backward=True)
    assert report.dispatch.backward == report.hooks.backward == BACKWARD + 2 * B * D_IN * H


def test_a_meta_module_counts_without_weights() -> None:
    with torch.device("meta"):
        model = TwoLayer(4096, 16384, 4096)
    x = torch.empty(8, 4096, device="meta")
    assert count_flops(model, x).figure("dispatch") == 2 * 8 * (4096 * 16384 + 16384 * 4096)


def test_the_steps_peak_is_adamw_foreachs_update_and_the_sum_of_its_categories() -> None:
    model = TwoLayer()
    before = [p.detach().clone() for p in model.parameters()]
    m = measure_step(model, xent, [batch()])
    # params + grads + two fp32 moments and a 4-byte step per tensor (4 tensors) + _foreach_sqrt(exp_avg_sq)
    assert m.peak == 5 * PARAM_BYTES + 4 * 4
    assert m.by_category == {"params": PARAM_BYTES, "grads": PARAM_BYTES, "optimizer": 2 * PARAM_BYTES + 16,
                             "activations": 0, "temporaries": PARAM_BYTES}
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))  # a copy was trained


@pytest.mark.parametrize(
    "options",
    [
        {},
        {"precision": "bf16-mixed", "grad_accum": 2},
        {"precision": "bf16-true", "optimizer": "sgd", "clip_grad_norm": 1.0},
        {"optimizer": "adam", "optimizer_impl": "for-loop"},
        {"optimizer": "momentum", "optimizer_impl": "fused", "grad_accum": 3},
    ],
)
def test_peak_is_the_sum_of_categories_and_simulate_equals_real(options: dict[str, Any]) -> None:
    k = options.get("grad_accum", 1)
    batches = [batch(256) for _ in range(k)]  # activations large enough to matter
    real = measure_step(TwoLayer(), xent, batches, **options)
    assert real.peak == sum(real.by_category.values()) > 0
    simulated = measure_step(TwoLayer(), xent, batches, simulate=True, **options)
    assert (simulated.peak, simulated.by_category) == (real.peak, real.by_category)
    assert simulated.device == "simulated"


def test_simulate_measures_a_meta_module_from_its_shapes() -> None:
    with torch.device("meta"):
        big = TwoLayer(2048, 8192, 2048)
    m = measure_step(big, xent, [(torch.randn(4, 2048), torch.randint(0, 2048, (4,)))], simulate=True)
    params = 4 * (2048 * 8192 + 8192 + 8192 * 2048 + 2048)
    assert m.by_category["params"] == params
    assert m.peak == sum(m.by_category.values()) >= 5 * params


def test_a_loss_fn_may_return_output_and_loss() -> None:
    def both(module: nn.Module, b: tuple[Tensor, ...]) -> tuple[Tensor, Tensor]:
        out = module(b[0])
        return out, nn.functional.cross_entropy(out, b[1])

    assert measure_step(TwoLayer(), both, [batch()]).peak == 5 * PARAM_BYTES + 16


@pytest.mark.parametrize(
    ("kwargs", "needle"),
    [
        ({"optimizer": "lion"}, "optimizer='lion'"),
        ({"optimizer_impl": "turbo"}, "optimizer_impl='turbo'"),
        ({"precision": "fp8"}, "fp8"),
        ({"grad_accum": 0}, "grad_accum=0"),
        ({"clip_grad_norm": -1.0}, "clip_grad_norm=-1.0"),
        ({"device": "tpu"}, "device='tpu'"),
        ({"simulate": "yes"}, "simulate='yes'"),
        ({"simulate": True, "device": "cuda"}, "device='cuda'"),
        ({"simulate": True, "precision": "16-mixed"}, "precision='16-mixed'"),
        ({"grad_accum": 2}, "batches"),
    ],
)
def test_bad_step_arguments_raise_value_error_naming_them(kwargs: dict[str, Any], needle: str) -> None:
    with pytest.raises(ValueError, match=re.escape(needle)):
        measure_step(TwoLayer(), xent, [batch()], **kwargs)


def test_bad_module_loss_fn_and_batches_raise_value_error() -> None:
    with pytest.raises(ValueError, match="module="):
        measure_step(xent, xent, [batch()])  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="module=Tanh"):
        measure_step(nn.Tanh(), xent, [batch()])
    with pytest.raises(ValueError, match="loss_fn="):
        measure_step(TwoLayer(), 3, [batch()])  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="batches="):
        measure_step(TwoLayer(), xent, batch()[0])  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="module="):
        count_flops("mlp", batch()[0])  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="backward='yes'"):
        count_flops(TwoLayer(), batch()[0], backward="yes")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="backward=True"):
        count_flops(TwoLayer().requires_grad_(False), batch()[0], backward=True)
    with pytest.raises(ValueError, match="counter='flops'"):
        count_flops(TwoLayer(), batch()[0]).figure("flops")


def test_the_package_exports_the_api() -> None:
    import torchledger.api

    # reached through the package (lazily, so that importing torchledger alone imports no torch)
    assert torchledger.count_flops is torchledger.api.count_flops
    assert torchledger.measure_step is torchledger.api.measure_step


def test_the_readmes_python_example_runs_and_prints_what_it_shows() -> None:
    text = README.read_text()
    section = text[text.index("## Python API") :]
    section = section[: section.index("\n## ", 1)]
    code = re.search(r"```python\n(.*?)```", section, re.S)
    shown = re.search(r"```text\n(.*?)```", section, re.S)
    assert code and shown, "the Python API section has no python example followed by its output"
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(code.group(1), f"{README}:Python API", "exec"), {"__name__": "readme_example"})
    assert out.getvalue() == shown.group(1)
