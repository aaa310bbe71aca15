"""torchledger: what a PyTorch model should cost (FLOPs, bytes, time on a chip), and what it measurably does.

``import torchledger`` loads only the analytic core (:mod:`torchledger.formulas`), which never imports torch.
"""

from torchledger.formulas import *  # noqa: F403
from torchledger.formulas import __all__ as _formulas_all

__version__ = "0.1.0"
__all__ = ["__version__", *_formulas_all]
