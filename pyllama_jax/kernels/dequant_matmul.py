"""A Pallas kernel for `y = x @ dequantize(qw)` that reads the packed int32 words directly.

The kernel targets Pallas' Triton GPU backend (`plt.CompilerParams`; there is no Mosaic GPU
variant, see `benchmarks/RESULTS.md`) and runs under `interpret=True` on CPU for tests.

Tiling, and when the kernel applies: `dequant_tiles.py`.

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

import functools
import warnings
from typing import Callable

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from pyllama_jax.kernels.dequant_tiles import (MIN_DOT, PackedWeight, TileConfig, default_config, default_interpret,
                                               period, plt, static_groups, supports)

MAGIC = 0x4B000000  # float32 bits of 2**23: OR-ing an integer q < 2**23 into them gives 2**23 + q
TWO23 = float(2 ** 23)


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
        static=static_groups(groupsize, n_groups, c.block_k, bits))
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


def dequant_matmul(x: jax.Array, qw: PackedWeight, *, config: TileConfig | None = None,
                   interpret: bool | None = None) -> jax.Array:
    """`x[..., in] @ dequantize(qw)` by the Pallas kernel, in `x.dtype` (accumulated in float32).

    `interpret` defaults to True off GPU. Raises ValueError where `supports` gives a reason.
    """
    k, n = qw.shape
    if x.shape[-1] != k:
        raise ValueError(f"x has {x.shape[-1]} features in its last axis; the weight expects {k}")
    interpret = default_interpret() if interpret is None else interpret
    x2 = x.reshape(-1, k)
    config = config or default_config(x2.shape[0], k, n, qw.bits)
    reason = supports(qw, x.shape, config=config, interpret=interpret)
    if reason is not None:
        raise ValueError(f"dequant_matmul: {reason}")
    y = _dequant_matmul(x2, qw.qweight, qw.g_idx, qw.scales, qw.qzeros, bits=qw.bits,
                        groupsize=qw.groupsize, config=config, interpret=interpret)
    return y.reshape(*x.shape[:-1], n)


def qmatmul(x: jax.Array, qw: PackedWeight, fallback: Callable[[jax.Array, PackedWeight], jax.Array], *,
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
