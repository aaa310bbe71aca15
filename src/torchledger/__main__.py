"""``python -m torchledger``: the same as the ``torchledger`` console script."""

import sys

from torchledger.cli import main

sys.exit(main())
