"""All three counters in one pass: what ``torchledger count`` runs.

The profiler is entered first (outermost), then the dispatcher counter, then the hooks; the profiler's own
de-duplication drops the second record of each op that a dispatch mode re-dispatches, so one forward (and backward)
serves all three.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import Tensor, nn

from torchledger.counting.dispatch import DispatchCounter
from torchledger.counting.hooks import HookCounter
from torchledger.counting.profiler import ProfilerCounter
from torchledger.counting.result import FlopCount


def count_all(model: nn.Module, step: Callable[[], Tensor], *, backward: bool = True) -> dict[str, FlopCount]:
    """Run ``step()`` (and its backward) once under hooks, dispatcher and profiler; a :class:`FlopCount` each.

    The profiler's figures are the matmul-like ops only (see :mod:`torchledger.counting.profiler`).
    """
    with ProfilerCounter() as prof, DispatchCounter() as dispatch, HookCounter(model, backward=backward) as hooks:
        loss = step()
        forward = dispatch.total
        if backward:
            with prof.backward():
                loss.backward()
    prof_forward = ProfilerCounter.matmul(prof.forward_by_op)
    return {
        "hooks": hooks.result,
        "dispatch": FlopCount("dispatch", forward=forward, backward=dispatch.total - forward,
                              int_ops=dispatch.int_ops, by_module=dispatch.by_module(), by_op=dispatch.by_op()),
        "profiler": FlopCount("profiler", forward=prof_forward,
                              backward=ProfilerCounter.matmul(prof.by_op) - prof_forward, by_op=prof.by_op),
    }
