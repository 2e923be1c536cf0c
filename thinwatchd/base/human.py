"""Sizes and durations as people read them, for logs, messages and reports."""

from __future__ import annotations

__all__ = ["format_bytes", "format_duration"]


def format_bytes(size: int) -> str:
    """Return size in the largest binary unit that keeps it >= 1, like '1.5GiB'.

    It takes any int, not just Bytes: it also shows rates (bytes a second) and sums and
    differences of sizes, which arithmetic leaves as int.
    """
    value = float(size)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(value) < 1024 or unit == "TiB":
            return f"{int(value)}{unit}" if unit == "B" else f"{value:.1f}{unit}"
        value /= 1024
    raise AssertionError("unreachable")


def format_duration(seconds: float) -> str:
    """Return a rough duration for people: '45 s', '12 min', '3 h 20 min', '4 days'."""
    if seconds < 60:
        return f"{seconds:.0f} s"
    if seconds < 3600:
        return f"{seconds // 60:.0f} min"
    if seconds < 2 * 86400:
        hours, rest = divmod(seconds, 3600)
        return f"{hours:.0f} h {rest // 60:.0f} min"
    return f"{seconds // 86400:.0f} days"
