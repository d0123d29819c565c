"""Shape buckets: lengths and batch sizes rounded up to powers of two, so a session compiles a
handful of programs rather than one per request."""
from __future__ import annotations


def pow2(n: int, low: int, high: int) -> int:
    """The smallest `low * 2**k` >= n, capped at `high`."""
    b = low
    while b < n:
        b *= 2
    return min(b, high)


def pow2s(low: int, high: int) -> list[int]:
    """Every value `pow2(n, low, high)` can take: low, 2 low, 4 low, ... capped at high."""
    sizes = [min(low, high)]
    while sizes[-1] < high:
        sizes.append(min(2 * sizes[-1], high))
    return sizes
