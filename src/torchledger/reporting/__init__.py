"""Turning figures into things people read: units now; results, regressions and reports as they are built."""

from torchledger.reporting.units import format_bytes, format_count, format_flops

__all__ = ["format_bytes", "format_count", "format_flops"]
