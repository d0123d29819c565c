"""When and how the Pallas dequant-matmul kernel (`dequant_matmul.py`) tiles `x @ W`.

`default_config` picks tile sizes for an `[m, k] @ [k, n]` product, `check_config` says why a tiling
cannot work, `supports` why the kernel cannot run (no GPU, no Triton backend, a shape it cannot tile).

Tiling. Program `(i, j, s)` owns rows `i*bm ...` of `x`, output columns `j*bn ...` and a run `s`
of the K tiles (split-K: float32 partial sums, added outside the kernel). A K tile of `bk` input
rows is `bk*bits/32` word rows of `qweight`. Bit-stream position `p` of a `per`-value period
(`per` = 16/32/8/4 for 2/3/4/8 bits) holds input rows `k0 + per*r + p`, so a tile is `per`
chunks of `bk/per` rows, each multiplied by the strided columns `x[:, k0+p::per]`: permuting x's
columns in the load replaces any in-register interleave of the unpacked values.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Protocol

import jax

try:  # deprecated from JAX 0.11 and to be removed: the kernel then reports itself unsupported
    from jax.experimental.pallas import triton as plt
except ImportError:  # pragma: no cover - depends on the installed JAX
    plt = None

BITS = (2, 3, 4, 8)  # the bit widths the kernel unpacks (those of `pyllama_jax.model.packing`)


class PackedWeight(Protocol):
    """What the kernel reads of a packed weight (`pyllama_jax.model.packing.QuantWeight`)."""

    qweight: jax.Array
    scales: jax.Array
    qzeros: jax.Array
    g_idx: jax.Array
    bits: int
    groupsize: int

    @property
    def shape(self) -> tuple[int, int]: ...


MIN_DOT = 16  # Triton's smallest dot operand side
GEMV_MAX_M = 8  # batches up to this many rows take the GEMV path (block_m < MIN_DOT)
GEMV_UNROLL = 64  # GEMV block_m * values per period: the unrolled code Triton compiles in seconds
GEMV_ACC = 2048  # GEMV path: accumulator elements per row of x (or tile words) per program


@dataclasses.dataclass(frozen=True)
class TileConfig:
    """Tile sizes and launch parameters; `default_config` picks them, benchmarks tune them."""

    block_m: int  # rows of x per program, a power of 2; < 16 selects the GEMV path
    block_n: int  # output columns per program, a power of 2 and a multiple of 32
    block_k: int  # input rows per loop step: per * (a power of 2), >= 16 * per for the dot path
    split_k: int = 1  # programs sharing one output tile, each taking a contiguous run of K tiles
    num_warps: int = 4  # Triton warps per program
    num_stages: int = 3  # Triton software-pipelining depth of the K loop


def period(bits: int) -> tuple[int, int]:
    """(values, words) of the shortest whole-word run of `bits`-bit values."""
    n = math.lcm(bits, 32)
    return n // bits, n // 32


def _pow2(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


def _next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def _num_cores() -> int:
    """Streaming multiprocessors of the default GPU (132 on an H100 SXM when unknown)."""
    return getattr(jax.devices()[0], "core_count", None) or 132


def static_groups(groupsize: int, n_groups: int, bk: int, bits: int) -> bool:
    """Can a tile that follows the contiguous group pattern take its groups from a window?"""
    per = period(bits)[0]
    if groupsize == -1:
        return n_groups == 1
    fits = groupsize % bk == 0 or (bk % groupsize == 0 and groupsize % per == 0)
    return fits and n_groups >= max(1, bk // groupsize)


def check_config(config: TileConfig, m: int, k: int, n: int, bits: int) -> str | None:
    """Why `config` cannot tile an `[m, k] @ [k, n]` product of `bits`-bit weights (None: it can)."""
    per = period(bits)[0]
    c = config
    rows = c.block_k // per
    if not (_pow2(c.block_m) and _pow2(c.block_n) and c.block_n >= 32):
        return f"block_m={c.block_m} and block_n={c.block_n} must be powers of 2, block_n >= 32"
    if c.block_k % per or not _pow2(rows):
        return f"block_k={c.block_k} must be {per} (values per {bits}-bit period) times a power of 2"
    if c.block_m >= MIN_DOT and rows < MIN_DOT:
        return f"block_k={c.block_k} gives {rows}-row chunks; the dot path needs >= {MIN_DOT}"
    if n % c.block_n:
        return f"out_features={n} is not a multiple of block_n={c.block_n}"
    if k % c.block_k:
        return f"in_features={k} is not a multiple of block_k={c.block_k}"
    if not 1 <= c.split_k <= k // c.block_k:
        return f"split_k={c.split_k} must lie in [1, {k // c.block_k}] (the number of K tiles)"
    return None


def _largest_block_k(k: int, per: int, max_rows: int, min_rows: int) -> int | None:
    """The largest `per * 2**i` dividing k with `min_rows <= 2**i <= max_rows`."""
    rows = 1 << (max_rows.bit_length() - 1)
    while rows >= min_rows:
        if k % (rows * per) == 0:
            return rows * per
        rows //= 2
    return None


def default_config(m: int, k: int, n: int, bits: int) -> TileConfig | None:
    """A tiling for `[m, k] @ [k, n]` (None if none fits).

    GEMV up to 8 rows, tensor-core dots above; where no dot tile divides K (3 bits) batches up to
    64 rows take GEMV tiles too. A GEMV tile has at most `GEMV_UNROLL / per` rows (2 at 3 bits),
    reading the weight once per tile. Split-K raises the program count to about two per
    streaming multiprocessor.
    """
    per = period(bits)[0]
    block_n = next((b for b in (128, 64, 32) if n % b == 0 and (m > 64 or b <= 64)), None)
    if block_n is None:
        return None
    block_k = None
    if m > GEMV_MAX_M:
        block_m = max(MIN_DOT, min(_next_pow2(m), 64 if m <= 64 else 128))
        block_k = _largest_block_k(k, per, max(MIN_DOT, 256 // per), MIN_DOT)
        warps = 8 if block_m * block_n >= 128 * 128 else 4
    if block_k is None and m <= 64:
        block_m = min(_next_pow2(m), GEMV_MAX_M, max(1, GEMV_UNROLL // per))
        max_rows = GEMV_ACC // (max(block_m, period(bits)[1]) * block_n)  # accumulators, words
        block_k = _largest_block_k(k, per, max(1, max_rows), 1)
        warps = 4
    if block_k is None:
        return None
    programs = -(-m // block_m) * (n // block_n)
    tiles = k // block_k
    split = max(1, min(tiles, round(2 * _num_cores() / programs)))
    split = -(-tiles // -(-tiles // split))  # no empty programs
    return TileConfig(block_m, block_n, block_k, split, warps, 3)


def default_interpret() -> bool:
    return jax.default_backend() != "gpu"


def supports(qw: PackedWeight, x_shape: tuple[int, ...], *, config: TileConfig | None = None,
             interpret: bool | None = None) -> str | None:
    """Why the kernel cannot compute `x @ qw` for an `x` of shape `x_shape` (None: it can)."""
    if plt is None:
        return "this JAX has no Pallas Triton backend (jax.experimental.pallas.triton)"
    interpret = default_interpret() if interpret is None else interpret
    if not interpret and jax.default_backend() != "gpu":
        return f"the Pallas kernel needs a GPU (backend is {jax.default_backend()}); interpret=True runs it slowly"
    if qw.bits not in BITS:
        return f"bits={qw.bits} is not one of {BITS}"
    k, n = qw.shape
    m = math.prod(x_shape[:-1])
    if m == 0:
        return "x has no rows"
    if qw.qzeros.shape[1] * 32 != n * qw.bits:
        return f"qzeros has {qw.qzeros.shape[1]} words per group row; the kernel needs out_features*bits/32"
    config = config or default_config(m, k, n, qw.bits)
    if config is None:
        return (f"no tiling of [{m}, {k}] @ [{k}, {n}] at {qw.bits} bits (out_features must be a multiple "
                f"of 32, in_features a multiple of {period(qw.bits)[0] * (1 if m <= 64 else MIN_DOT)})")
    return check_config(config, m, k, n, qw.bits)

