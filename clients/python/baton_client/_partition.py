"""Partitioning (protocol section 2): FNV-1a-64 of the buffer's UTF-8 bytes, modulo N."""

from __future__ import annotations

FNV_OFFSET_BASIS = 0xCBF29CE484222325
FNV_PRIME = 0x100000001B3
_MASK64 = 0xFFFFFFFFFFFFFFFF

__all__ = ["fnv1a64", "partition"]


def fnv1a64(data: bytes | str) -> int:
    """FNV-1a-64 of ``data`` (a ``str`` is hashed as its UTF-8 bytes), as an unsigned integer."""
    if isinstance(data, str):
        data = data.encode("utf-8")
    h = FNV_OFFSET_BASIS
    for b in data:
        h = ((h ^ b) * FNV_PRIME) & _MASK64
    return h


def partition(buffer: str, n: int = 16) -> int:
    """The partition (0..n-1) that every request about ``buffer`` goes to."""
    if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= 1024:
        raise ValueError(f"partition count must be an integer from 1 to 1024, got {n!r}")
    return fnv1a64(buffer) % n
