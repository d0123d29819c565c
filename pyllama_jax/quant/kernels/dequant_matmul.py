"""A Pallas kernel for `y = x @ dequantize(qw)` that reads the packed int32 words directly.

The kernel targets Pallas' Triton GPU backend (`plt.CompilerParams`; there is no Mosaic GPU
variant, see `benchmarks/RESULTS.md`) and runs under `interpret=True` on CPU for tests.

Tiling. Program `(i, j, s)` owns rows `i*bm ...` of `x`, output columns `j*bn ...` and a run `s`
of the K tiles (split-K: float32 partial sums, added outside the kernel). A K tile of `bk` input
rows is `bk*bits/32` word rows of `qweight`. Bit-stream position `p` of a `per`-value period
(`per` = 16/32/8/4 for 2/3/4/8 bits) holds input rows `k0 + per*r + p`, so a tile is `per`
chunks of `bk/per` rows, each multiplied by the strided columns `x[:, k0+p::per]`: permuting x's
columns in the load replaces any in-register interleave of the unpacked values.

Unpacking. A chunk's codes are masked in place and OR-ed into the mantissa of float32 2**23
(`2**23 + q*2**e`, exact), so subtracting `2**23 + z*2**e` gives `(q - z) * 2**e` with one integer
op and no int-to-float conversion; the power of two is folded into x or the scale.

Groups. A tile whose `g_idx` follows the contiguous `i // groupsize` pattern takes its scales and
zero points from `bk/groupsize` (or one) group rows; any other tile (act-order `g_idx`) gathers a
scale and zero point per input row through `g_idx`. The test is made per tile at run time, so
static-group and act-order checkpoints are both exact with one compiled kernel.

Accumulation is float32: batches of 16+ rows use a tensor-core `dot` per chunk on weights rounded
to x's dtype exactly as `packing.dequantize` rounds them; smaller batches (decode) run on CUDA
cores with one `[bk/per, bn]` accumulator per row of x, scaled once per tile and reduced at the
end, with the next tile's loads issued before the current tile's arithmetic.
"""
from __future__ import annotations

import dataclasses
import functools
import math
import warnings
from typing import Callable

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from pyllama_jax.quant.packing import SUPPORTED_BITS, QuantWeight

try:  # deprecated from JAX 0.11 and to be removed: the kernel then reports itself unsupported
    from jax.experimental.pallas import triton as plt
except ImportError:  # pragma: no cover - depends on the installed JAX
    plt = None

MIN_DOT = 16  # Triton's smallest dot operand side
GEMV_MAX_M = 8  # batches up to this many rows take the GEMV path (block_m < MIN_DOT)
GEMV_UNROLL = 64  # GEMV block_m * values per period: the unrolled code Triton compiles in seconds
GEMV_ACC = 2048  # GEMV path: accumulator elements per row of x (or tile words) per program
MAGIC = 0x4B000000  # float32 bits of 2**23: OR-ing an integer q < 2**23 into them gives 2**23 + q
TWO23 = float(2 ** 23)


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


def _static_groups(groupsize: int, n_groups: int, bk: int, bits: int) -> bool:
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


def _default_interpret() -> bool:
    return jax.default_backend() != "gpu"


def supports(qw: QuantWeight, x_shape: tuple[int, ...], *, config: TileConfig | None = None,
             interpret: bool | None = None) -> str | None:
    """Why the kernel cannot compute `x @ qw` for an `x` of shape `x_shape` (None: it can)."""
    if plt is None:
        return "this JAX has no Pallas Triton backend (jax.experimental.pallas.triton)"
    interpret = _default_interpret() if interpret is None else interpret
    if not interpret and jax.default_backend() != "gpu":
        return f"the Pallas kernel needs a GPU (backend is {jax.default_backend()}); interpret=True runs it slowly"
    if qw.bits not in SUPPORTED_BITS:
        return f"bits={qw.bits} is not one of {SUPPORTED_BITS}"
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


def _srl(a: jax.Array, s) -> jax.Array:
    """Logical right shift of int32 words by a static or per-element amount in [0, 31]."""
    return lax.shift_right_logical(a, jnp.broadcast_to(jnp.asarray(s, a.dtype), a.shape))


def _sll(a: jax.Array, s) -> jax.Array:
    return lax.shift_left(a, jnp.broadcast_to(jnp.asarray(s, a.dtype), a.shape))


def _chunk(words: list[jax.Array], high: list[jax.Array], p: int, bits: int) -> tuple[jax.Array, int]:
    """`2**23 + q * 2**e` in float32 (exact) for the codes `q` at bit-stream position `p`, and `e`.

    The code is masked in place and OR-ed into the mantissa of 2**23: one AND-OR per value and
    no int-to-float conversion. Values in a word's upper half come from `high` (the words shifted
    right by 16) so that `e + bits <= 23`; word-straddling 3-bit values are shifted into place.
    """
    w, s = divmod(p * bits, 32)
    mask = 2 ** bits - 1
    if s + bits > 32:
        v, e = (_srl(words[w], s) | _sll(words[w + 1], 32 - s)) & mask, 0
    elif s < 16:
        v, e = words[w] & (mask << s), s
    else:
        v, e = high[w] & (mask << (s - 16)), s - 16
    return lax.bitcast_convert_type(v | MAGIC, jnp.float32), e


def _zero_words(z_ref, groups: jax.Array, bits: int, block_n: int):
    """The packed `qzeros` word(s) holding each column's zero point, `[len(groups), block_n]` each."""
    word = (lax.broadcasted_iota(jnp.int32, (block_n,), 0) * bits) >> 5
    lo = z_ref[groups[:, None], word[None, :]]
    if 32 % bits == 0:
        return lo, None
    return lo, z_ref[groups[:, None], jnp.minimum(word + 1, z_ref.shape[1] - 1)[None, :]]


def _unpack_zeros(lo: jax.Array, hi: jax.Array | None, bits: int) -> jax.Array:
    """Zero points (float32) from `_zero_words`: the stored `zero - 1`, plus one, modulo 2**bits."""
    shift = (lax.broadcasted_iota(jnp.int32, lo.shape, 1) * bits) & 31
    v = _srl(lo, shift)
    if hi is not None:  # 3 bits: values straddle words; `<< 1 << (31 - s)` keeps shifts below 32
        v = v | _sll(_sll(hi, 1), 31 - shift)
    return ((v + 1) & (2 ** bits - 1)).astype(jnp.float32)


def _kernel(x_ref, q_ref, g_ref, s_ref, z_ref, o_ref, *, bits: int, groupsize: int, block_k: int,
            tiles: int, tiles_per: int, static: bool):
    per, wpp = period(bits)
    rows = block_k // per
    block_m, block_n = o_ref.shape[-2:]
    f32 = jnp.float32
    n_groups = s_ref.shape[0]
    n_win = 1 if groupsize == -1 else max(1, block_k // groupsize)

    def expand(a):
        """Window rows `[n_win, block_n]` -> chunk rows: chunk row r lies in group r // (rows / n_win)."""
        if n_win == 1 or n_win == rows:
            return a
        return jnp.broadcast_to(a[:, None, :], (n_win, rows // n_win, block_n)).reshape(rows, block_n)

    def fetch(t):
        """The tile's global loads: period words, and (static groups) g_idx and the group window."""
        k0 = pl.multiple_of(t * block_k, block_k)
        w0 = pl.multiple_of(t * rows * wpp, wpp)
        tile = dict(words=[q_ref[pl.ds(w0 + w, rows, stride=wpp), :] for w in range(wpp)])
        if static:
            first = 0 if groupsize == -1 else jnp.minimum(lax.div(k0, jnp.int32(groupsize)), n_groups - n_win)
            group = first + lax.broadcasted_iota(jnp.int32, (n_win,), 0)
            tile.update(g=g_ref[pl.ds(k0, block_k)], scale=s_ref[group, :],
                        zero=_zero_words(z_ref, group, bits, block_n))
        return tile

    def is_static(k0, g):
        """Does this tile's g_idx follow the contiguous `i // groupsize` pattern?"""
        expect = (jnp.zeros_like(g) if groupsize == -1
                  else lax.div(k0 + lax.broadcasted_iota(jnp.int32, g.shape, 0), jnp.int32(groupsize)))
        return jnp.sum((g != expect).astype(jnp.int32)) == 0

    def gathered(k0, p, qf, e):
        """`(q - z) * s` for chunk p with each row's scale and zero point gathered through g_idx."""
        group = g_ref[pl.ds(k0 + p, rows, stride=per)]
        zf = _unpack_zeros(*_zero_words(z_ref, group, bits, block_n), bits) * 2.0 ** e + TWO23
        return (qf - zf) * (s_ref[group, :].astype(f32) * 2.0 ** -e)

    def chunks(tile):
        high = [_srl(a, 16) for a in tile["words"]]
        return [_chunk(tile["words"], high, p, bits) for p in range(per)]

    def gemv_static(k0, tile, xs, acc):
        """Sum `x * (q - z)` over the tile's chunks, then scale once per element."""
        zero = _unpack_zeros(*tile["zero"], bits)
        part = [jnp.zeros((rows, block_n), f32) for _ in range(block_m)]
        for p, (qf, e) in enumerate(chunks(tile)):
            d = qf - expand(zero * 2.0 ** e + TWO23)  # (q - z) * 2**e, exact
            part = [a + (x[p] * 2.0 ** -e)[:, None] * d for a, x in zip(part, xs)]
        scale = expand(tile["scale"].astype(f32))
        return [a + b * scale for a, b in zip(acc, part)]

    def gemv_gathered(k0, tile, xs, acc):
        for p, (qf, e) in enumerate(chunks(tile)):
            w = gathered(k0, p, qf, e)
            acc = [a + x[p][:, None] * w for a, x in zip(acc, xs)]
        return acc

    def gemv_body(t, carry):
        """Small batches on CUDA cores, one `[rows, block_n]` accumulator per row of x.

        The next tile's loads are issued before this tile's arithmetic (register double buffering:
        Triton pipelines only loads that feed a dot).
        """
        acc, tile = carry
        nxt = fetch(jnp.minimum(t + 1, hi - 1))
        k0 = t * block_k
        xs = [[x_ref[pl.ds(m, 1), pl.ds(k0 + p, rows, stride=per)].reshape(rows).astype(f32)
               for p in range(per)] for m in range(block_m)]
        if static:
            acc = lax.cond(is_static(k0, tile["g"]), gemv_static, gemv_gathered, k0, tile, xs, acc)
        else:
            acc = gemv_gathered(k0, tile, xs, acc)
        return acc, nxt

    def dot_body(t, acc):
        """Tensor-core dots: each chunk dequantized to x's dtype, exactly as `packing.dequantize`."""
        tile = fetch(t)
        k0 = t * block_k
        if static:
            pred = is_static(k0, tile["g"])
            scale, zero = tile["scale"].astype(f32), _unpack_zeros(*tile["zero"], bits)
        for p, (qf, e) in enumerate(chunks(tile)):
            if static:
                def contiguous(q, e=e):
                    return (q - expand(zero * 2.0 ** e + TWO23)) * expand(scale * 2.0 ** -e)
                w = lax.cond(pred, contiguous, lambda q: gathered(k0, p, q, e), qf)
            else:
                w = gathered(k0, p, qf, e)
            xp = x_ref[:, pl.ds(k0 + p, rows, stride=per)]
            acc = acc + jnp.dot(xp, w.astype(x_ref.dtype), preferred_element_type=f32)
        return acc

    lo = pl.program_id(2) * tiles_per
    hi = jnp.minimum(lo + tiles_per, tiles)
    if block_m < MIN_DOT:
        acc0 = [jnp.zeros((rows, block_n), f32) for _ in range(block_m)]
        acc, _ = lax.fori_loop(lo, hi, gemv_body, (acc0, fetch(lo)))
        for m, a in enumerate(acc):
            o_ref[pl.ds(m, 1), :] = a.sum(axis=0, keepdims=True).astype(o_ref.dtype)
    else:
        o_ref[...] = lax.fori_loop(lo, hi, dot_body, jnp.zeros((block_m, block_n), f32)).astype(o_ref.dtype)


@functools.partial(jax.jit, static_argnames=("bits", "groupsize", "config", "interpret"))
def _dequant_matmul(x, qweight, g_idx, scales, qzeros, *, bits: int, groupsize: int,
                    config: TileConfig, interpret: bool):
    m, k = x.shape
    n = scales.shape[1]
    c = config
    m_pad = -(-m // c.block_m) * c.block_m
    if m_pad != m:
        x = jnp.pad(x, ((0, m_pad - m), (0, 0)))
    tiles = k // c.block_k
    tiles_per = -(-tiles // c.split_k)
    split = -(-tiles // tiles_per)
    n_groups, zwords = qzeros.shape
    kernel = functools.partial(
        _kernel, bits=bits, groupsize=groupsize, block_k=c.block_k, tiles=tiles, tiles_per=tiles_per,
        static=_static_groups(groupsize, n_groups, c.block_k, bits))
    zw = c.block_n * bits // 32
    in_specs = [
        pl.BlockSpec((c.block_m, k), lambda i, j, s: (i, 0)),
        pl.BlockSpec((qweight.shape[0], c.block_n), lambda i, j, s: (0, j)),
        pl.BlockSpec((k,), lambda i, j, s: (0,)),
        pl.BlockSpec((n_groups, c.block_n), lambda i, j, s: (0, j)),
        pl.BlockSpec((n_groups, zw), lambda i, j, s: (0, j)),
    ]
    if split == 1:
        out_shape = jax.ShapeDtypeStruct((m_pad, n), x.dtype)
        out_spec = pl.BlockSpec((c.block_m, c.block_n), lambda i, j, s: (i, j))
    else:
        out_shape = jax.ShapeDtypeStruct((split, m_pad, n), jnp.float32)
        out_spec = pl.BlockSpec((pl.squeezed, c.block_m, c.block_n), lambda i, j, s: (s, i, j))
    y = pl.pallas_call(
        kernel, out_shape=out_shape, grid=(m_pad // c.block_m, n // c.block_n, split),
        in_specs=in_specs, out_specs=out_spec, interpret=interpret, name="dequant_matmul",
        compiler_params=plt.CompilerParams(num_warps=c.num_warps, num_stages=c.num_stages),
    )(x, qweight, g_idx, scales, qzeros)
    if split > 1:
        y = y.sum(axis=0).astype(x.dtype)
    return y[:m]


def dequant_matmul(x: jax.Array, qw: QuantWeight, *, config: TileConfig | None = None,
                   interpret: bool | None = None) -> jax.Array:
    """`x[..., in] @ dequantize(qw)` by the Pallas kernel, in `x.dtype` (accumulated in float32).

    `interpret` defaults to True off GPU. Raises ValueError where `supports` gives a reason.
    """
    k, n = qw.shape
    if x.shape[-1] != k:
        raise ValueError(f"x has {x.shape[-1]} features in its last axis; the weight expects {k}")
    interpret = _default_interpret() if interpret is None else interpret
    x2 = x.reshape(-1, k)
    config = config or default_config(x2.shape[0], k, n, qw.bits)
    reason = supports(qw, x.shape, config=config, interpret=interpret)
    if reason is not None:
        raise ValueError(f"dequant_matmul: {reason}")
    y = _dequant_matmul(x2, qw.qweight, qw.g_idx, qw.scales, qw.qzeros, bits=qw.bits,
                        groupsize=qw.groupsize, config=config, interpret=interpret)
    return y.reshape(*x.shape[:-1], n)


def qmatmul(x: jax.Array, qw: QuantWeight, fallback: Callable[[jax.Array, QuantWeight], jax.Array], *,
            interpret: bool = False) -> jax.Array:
    """The kernel where it applies, else `fallback(x, qw)` after a warning that says why.

    Meant for `qlinear.KERNELS["pallas"]`; off GPU (unless `interpret`) it always falls back.
    """
    reason = supports(qw, x.shape, interpret=interpret)
    if reason is None:
        return dequant_matmul(x, qw, interpret=interpret)
    warnings.warn(f"quant.kernel='pallas' falls back to the XLA dequantize-then-dot path for a "
                  f"{qw.shape} {qw.bits}-bit weight: {reason}", RuntimeWarning, stacklevel=2)
    return fallback(x, qw)
