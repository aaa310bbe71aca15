"""Suite-wide pytest configuration: the torchledger plugin, and the suite's benchmark groups.

The plugin (:mod:`torchledger.pytest_plugin`) brings the ``--ledger-`` options, the ``device`` fixture, CUDA skipping,
where runs are stored and the ``ledger`` fixture. Installed, torchledger registers it through its ``pytest11`` entry
point; from a bare checkout (``pythonpath = ["src"]``) the ``pytest_plugins`` line below loads it, and pytest skips
that line when the entry point has registered the module under the same name already.
"""

from __future__ import annotations

import pytest

pytest_plugins = ["torchledger.pytest_plugin"]

# The benchmark groups of benchmarks/performance, which --ledger-groups selects from.
BENCHMARK_GROUPS = ("precision", "accumulation", "checkpointing", "fusion", "dataloader", "roofline", "collectives",
                    "formulas", "count")


def pytest_ledger_benchmark_groups(config: pytest.Config) -> tuple[str, ...]:
    """The plugin's hook: --ledger-groups names are checked against these before collection."""
    return BENCHMARK_GROUPS
