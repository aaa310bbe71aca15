"""Human units, used only at the edges (CLI tables, reports): binary for bytes (GiB = 2**30), decimal for FLOPs."""

from __future__ import annotations

_BINARY = (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10))
_DECIMAL = (("P", 10**15), ("T", 10**12), ("G", 10**9), ("M", 10**6), ("k", 10**3))


def format_bytes(n: float) -> str:
    """``1.50 GiB`` style: binary prefixes, three significant decimals; plain bytes below 1 KiB."""
    for unit, size in _BINARY:
        if abs(n) >= size:
            return f"{n / size:.2f} {unit}"
    return f"{int(n)} B"


def format_flops(n: float, unit: str = "FLOP") -> str:
    """``874.94 GFLOP`` style: decimal prefixes (``unit='FLOP/s'`` for rates)."""
    for prefix, size in _DECIMAL:
        if abs(n) >= size:
            return f"{n / size:.2f} {prefix}{unit}"
    return f"{n:g} {unit}"


def format_count(n: int) -> str:
    """``124,439,808 (124.4M)``: the exact integer with a short form beside it."""
    for prefix, size in (("B", 10**9), ("M", 10**6), ("k", 10**3)):
        if abs(n) >= size:
            return f"{n:,} ({n / size:.1f}{prefix})"
    return f"{n:,}"


def format_seconds(x: float) -> str:
    """``27.2 us`` style: three significant digits in s, ms, us or ns (the unit that puts the number at >= 1)."""
    for unit, scale in (("s", 1.0), ("ms", 1e-3), ("us", 1e-6)):
        if abs(x) >= scale:
            return f"{x / scale:.3g} {unit}"
    return f"{x / 1e-9:.3g} ns"


def format_rate(value: float, unit: str) -> str:
    """``752 TFLOP/s``, ``4,142 GB/s``: three significant digits, whole numbers with thousands separators from 1000."""
    text = f"{value:,.0f}" if abs(value) >= 1000 else f"{value:.3g}"
    return f"{text} {unit}"
