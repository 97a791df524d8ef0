"""Byte sizes as people write them in settings: ``"20GiB"``, ``"500MB"``, ``"1.5 G"``, ``"1048576"``.

Binary units (KiB, MiB, GiB, TiB) are powers of 1024; decimal ones (KB, MB, GB, TB) powers
of 1000; a bare ``K``/``M``/``G``/``T`` means the binary unit, as in ``dd`` and Kubernetes'
habits. A percentage (``"80%"``) is returned as a fraction for the caller to apply to a disk.
"""

from __future__ import annotations

import re

_UNITS = {
    "": 1,
    "b": 1,
    "k": 1024, "kib": 1024, "kb": 1000,
    "m": 1024**2, "mib": 1024**2, "mb": 1000**2,
    "g": 1024**3, "gib": 1024**3, "gb": 1000**3,
    "t": 1024**4, "tib": 1024**4, "tb": 1000**4,
}
_SIZE = re.compile(r"^\s*(?P<num>\d+(?:\.\d+)?)\s*(?P<unit>[a-zA-Z]*)\s*$")


def parse_size(value: str | float) -> int:
    """Bytes from an int or a string like ``"20GiB"``; raises ValueError for anything else."""
    if isinstance(value, bool):
        raise TypeError(f"not a byte size: {value!r}")
    if isinstance(value, (int, float)):
        if value < 0:
            raise ValueError(f"byte size must not be negative: {value!r}")
        return int(value)
    match = _SIZE.match(str(value))
    if match is None or match.group("unit").lower() not in _UNITS:
        raise ValueError(f"not a byte size: {value!r} (write e.g. 20GiB, 500MB or 1048576)")
    return int(float(match.group("num")) * _UNITS[match.group("unit").lower()])


def format_size(size: int) -> str:
    """``21474836480`` → ``"20.0 GiB"``: for log lines and error messages."""
    amount = float(size)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(amount) < 1024:
            return f"{amount:.0f} {unit}" if unit == "B" else f"{amount:.1f} {unit}"
        amount /= 1024
    return f"{amount:.1f} TiB"
