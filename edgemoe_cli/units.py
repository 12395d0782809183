"""Sizes in bytes, read and written the same way by every command (no heavy imports: the CLI loads this at start)."""

from __future__ import annotations

import re
from fractions import Fraction

from .errors import EdgeMoEError

MAX_SIZE = 1 << 60  # 1 EiB: no size edgemoe reads is near it, and every size fits an int64 (ctypes, numpy)

_SIZE = re.compile(r"\s*(\d+(?:\.\d+)?|\.\d+)\s*([KMGT]?)(i?)(B?)\s*", re.IGNORECASE)


def parse_size(text: str, what: str = "the size") -> int:
    """Bytes from '123456', '900M' / '12G' / '12GiB' (binary) or '11.5GB' (decimal, as disks are sold).

    One reading for every option and variable that takes a size (plan --budget, prune --budget,
    EDGEMOE_DISK_RESERVE), so the same text never means two sizes.
    """
    m = _SIZE.fullmatch(str(text))
    if not m:
        raise EdgeMoEError(f"cannot read {what} {text!r}", "write bytes or a size like 12GiB, 11.5GB or 800M")
    power = " KMGT".index(m.group(2).upper() or " ")
    decimal = m.group(4) and not m.group(3)  # "GB" is 10^9; "G" and "GiB" are 2^30
    # exact arithmetic, bounded: a float overflows on "9" * 400 and an int of thousands of digits is refused
    number = m.group(1)
    value = Fraction(number) * (1000 if decimal else 1024) ** power if len(number) <= 32 else None
    if value is None or value > MAX_SIZE:
        raise EdgeMoEError(
            f"{what} {str(text)[:40]!r} is larger than any disk or memory", f"give at most {human_bytes(MAX_SIZE)}"
        )
    return int(value)


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return f"{n:.2f} TiB"


def human_duration(seconds: float) -> str:
    """12 s, 4 min 05 s, 3 h 20 min."""
    s = int(round(seconds))
    if s < 60:
        return f"{seconds:.0f} s" if seconds >= 1 else f"{seconds:.1f} s"
    if s < 3600:
        return f"{s // 60} min {s % 60:02d} s"
    return f"{s // 3600} h {s % 3600 // 60:02d} min"
