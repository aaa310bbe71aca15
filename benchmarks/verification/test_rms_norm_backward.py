"""The CPU's ``F.rms_norm`` backward, op by op: small LLaMA shapes whose step peaks inside it.

With a narrow MLP (``d_ff`` < ``d_model``) and a vocabulary no wider than the model, the largest moment of the step
is the final norm's backward, in ``pow``'s node: ``grad * (2 * x.pow(1))`` holds three B x T x d fp32 tensors beside
``mean``'s expanded gradient and the first ``mul`` node's input gradient. A walk that made the input's gradient in
one piece missed 3.8% (32-true) and 11% (16-true) of these peaks.
"""

from __future__ import annotations

import pytest

from torchledger.formulas.specs import ModelSpec
from torchledger.formulas.timeline import StepConfig, _TransformerStep, _walk
from torchledger.measuring.training import MemoryCase, measure, relative_error
from torchledger.workloads.train_step import TrainConfig

TOLERANCE = 0.02  # the CPU tolerance of test_memory_measured.py


def _spec(d_ff: int, vocab: int) -> ModelSpec:
    return ModelSpec("random-llama", "llama", 1, 48, 2, vocab_size=vocab, max_seq_len=128, n_kv_heads=2, d_ff=d_ff)


@pytest.mark.parametrize(("precision", "d_ff", "vocab", "accum"), [
    ("32-true", 16, 32, 1), ("32-true", 32, 48, 1), ("32-true", 96, 32, 2), ("16-true", 16, 32, 1),
    ("bf16-mixed", 16, 32, 2),
])
def test_measured_peak_inside_the_norm_backward(precision: str, d_ff: int, vocab: int, accum: int) -> None:
    case = MemoryCase("random-llama", 2, TrainConfig(precision, grad_accum=accum), seq_len=32,
                      spec=_spec(d_ff, vocab))
    predicted, measured = case.predict("cpu"), measure(case, "cpu")
    assert measured.peak_op == "mul.Tensor"
    err = relative_error(predicted.peak, measured.peak)
    assert err <= TOLERANCE, f"predicted {predicted.peak:,} B, measured {measured.peak:,} B: {100 * err:.2f}% apart"


def test_pow_node_adds_three_full_tensors() -> None:
    """From the final norm's rsqrt gradient (``-0.5 * grad * result.pow(3)``: its output made, the row-sized
    ``pow`` and ``-0.5 *`` temporaries still alive) to ``pow``'s node (derivatives.yaml: ``pow_backward``): the two
    temporaries, the rsqrt node's incoming gradient and the saved rstd go (four rows); ``mean``'s expanded gradient
    (B x T x d fp32) replaces the rsqrt gradient (a row); then ``x.pow(1)``, ``2 * x.pow(1)`` and their product
    with the gradient are alive at once, each B x T x d fp32."""
    rows, d = 2 * 32, 48
    full, row = rows * d * 4, rows * 4
    step = _TransformerStep(_spec(16, 32), 2, 32, StepConfig(), "cpu")
    step.tl.moments = []
    _walk(step, step.forward)
    totals = {m.label: m.total for m in step.tl.moments if m.phase == "backward" and m.label.startswith("norm ")}
    assert totals["norm grad pow"] - totals["norm grad rsqrt"] == -4 * row + (full - row) + 3 * full
