"""What every counter returns: FLOPs by phase (and integer ops apart), in the units of :mod:`torchledger.formulas`."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class FlopCount:
    """FLOPs one counter saw.

    ``forward`` is the forward pass; ``backward`` everything the backward pass ran, including the forward of
    checkpointed blocks recomputed during it, which counters that can tell (hooks) report apart in ``recompute``
    (then ``backward`` excludes it). ``int_ops`` counts integer multiply-adds (``torch._int_mm``) apart from FLOPs.
    ``by_module`` and ``by_op`` break the total down where the counter can.
    """

    counter: str
    forward: int = 0
    backward: int = 0
    recompute: int = 0
    int_ops: int = 0
    by_module: dict[str, int] = field(default_factory=dict)
    by_op: dict[str, int] = field(default_factory=dict)

    @property
    def total(self) -> int:
        """Every FLOP counted: forward + backward + recompute."""
        return self.forward + self.backward + self.recompute

    def to_dict(self) -> dict[str, object]:
        return {
            "counter": self.counter,
            "forward": self.forward,
            "backward": self.backward,
            "recompute": self.recompute,
            "total": self.total,
            "int_ops": self.int_ops,
            "by_module": dict(self.by_module),
            "by_op": dict(self.by_op),
        }
