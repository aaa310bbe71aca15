"""Turning figures into things people read: human units (units.py), reading runs back (results.py), regressions over
a machine's history (regression.py) and hardware comparison reports (report.py)."""

from torchledger.reporting.units import format_bytes, format_count, format_flops, format_rate, format_seconds

__all__ = ["format_bytes", "format_count", "format_flops", "format_rate", "format_seconds"]
