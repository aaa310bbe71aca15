"""torchledger: what a PyTorch model should cost (FLOPs, bytes, time on a chip), and what it measurably does.

``import torchledger`` loads only the analytic core (:mod:`torchledger.formulas`), which never imports torch.
:func:`count_flops` and :func:`measure_step` (:mod:`torchledger.api`) import torch when first named
(``from torchledger import count_flops``).
"""

from typing import Any

from torchledger.formulas import *  # noqa: F403
from torchledger.formulas import __all__ as _formulas_all

__version__ = "0.1.0"
_API = ("count_flops", "measure_step", "FlopReport")
# the API stays out of __all__: ``from torchledger import *`` imports no torch
__all__ = ["__version__", *_formulas_all]


def __getattr__(name: str) -> Any:
    if name in _API:
        from torchledger import api

        return getattr(api, name)
    raise AttributeError(f"module 'torchledger' has no attribute {name!r}")
