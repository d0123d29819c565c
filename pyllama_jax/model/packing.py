"""Int32 bit packing of quantized weights in GPTQ-for-LLaMa / AutoGPTQ's layout, and `QuantWeight`.

Values of `bits` bits (2, 3, 4 or 8) form one little-endian bit stream per column: value `j`
occupies bits `j*bits ... j*bits+bits-1`, word `k` holds stream bits `32k ... 32k+31` (least
significant first), so 3-bit values straddle words (32 values in 3 words). `qweight[in*bits/32, out]`
is packed along the input dimension, `qzeros[n_groups, out*bits/32]` along the output dimension and
stores `zero - 1` (AutoGPTQ's "v1" convention). Shapes that are not whole words are zero-padded.
Packing runs once on the host (numpy); unpacking is jnp so it runs inside jit.
"""
from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np

SUPPORTED_BITS = (2, 3, 4, 8)


def check_bits(bits: int, what: str = "bits") -> None:
    """Raise for a bit width we cannot pack."""
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"{what}={bits!r} is not supported; expected one of {SUPPORTED_BITS}")


def _period(bits: int) -> tuple[int, int]:
    """(values, words) of the shortest whole-word run: 16/1, 32/3, 8/1, 4/1 for 2/3/4/8 bits."""
    n = math.lcm(bits, 32)
    return n // bits, n // 32


def packed_rows(n: int, bits: int) -> int:
    """Words needed for `n` values of `bits` bits."""
    return -(-n * bits // 32)


def pack_rows(values: np.ndarray, bits: int) -> np.ndarray:
    """Pack `values[n, m]` (integers in `[0, 2**bits)`) along axis 0 into int32 `[ceil(n*bits/32), m]`."""
    check_bits(bits)
    v = np.asarray(values).astype(np.int64)
    if v.size and (v.min() < 0 or v.max() >= 2 ** bits):
        raise ValueError(f"values to pack must lie in [0, {2 ** bits}) for {bits}-bit packing, "
                         f"got [{v.min()}, {v.max()}]")
    n, m = v.shape
    per, words = _period(bits)
    v = np.pad(v, ((0, -n % per), (0, 0))).astype(np.uint64).reshape(-1, per, m)
    out = np.zeros((v.shape[0], words, m), np.uint64)
    for k in range(per):
        w, s = divmod(k * bits, 32)
        out[:, w] |= (v[:, k] << np.uint64(s)) & np.uint64(0xFFFFFFFF)
        if s + bits > 32:
            out[:, w + 1] |= v[:, k] >> np.uint64(32 - s)
    return out.reshape(-1, m)[:packed_rows(n, bits)].astype(np.uint32).view(np.int32)


def unpack_rows(packed: jax.Array, bits: int, n: int) -> jax.Array:
    """Inverse of `pack_rows`: int32 `[words, m]` -> int32 values `[n, m]` (jnp, jit-friendly).

    One gather-shift-or over whole periods, so the program size does not grow with `bits`.
    """
    per, words = _period(bits)
    k = np.arange(per)
    word, shift = (k * bits) // 32, (k * bits) % 32
    straddle = shift + bits > 32
    u = jax.lax.bitcast_convert_type(jnp.asarray(packed, jnp.int32), jnp.uint32)
    u = jnp.pad(u, ((0, -u.shape[0] % words), (0, 0))).reshape(-1, words, u.shape[1])
    lo = u[:, word] >> jnp.asarray(shift, jnp.uint32)[:, None]
    hi = u[:, np.minimum(word + 1, words - 1)] << jnp.asarray(np.where(straddle, 32 - shift, 0), jnp.uint32)[:, None]
    v = jnp.where(jnp.asarray(straddle)[:, None], lo | hi, lo) & jnp.uint32(2 ** bits - 1)
    return v.reshape(-1, u.shape[2])[:n].astype(jnp.int32)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class QuantWeight:
    """A packed quantized weight for `y = x @ W`, `W[in_features, out_features]`.

    `W[i, o] = scales[g_idx[i], o] * (q[i, o] - zero[g_idx[i], o])` with `q` unpacked from
    `qweight` and `zero = (stored + 1) mod 2**bits` unpacked from `qzeros`. Arrays are pytree
    leaves; `bits`, `groupsize` (-1: one group per output column) and `in_features` are static.
    """

    qweight: jax.Array  # int32 [ceil(in*bits/32), out]
    scales: jax.Array  # float [n_groups, out]
    qzeros: jax.Array  # int32 [n_groups, ceil(out*bits/32)], zero - 1
    g_idx: jax.Array  # int32 [in], group of each input row
    bits: int = dataclasses.field(metadata=dict(static=True))
    groupsize: int = dataclasses.field(metadata=dict(static=True))
    in_features: int = dataclasses.field(metadata=dict(static=True))

    @property
    def out_features(self) -> int:
        return self.scales.shape[1]

    @property
    def shape(self) -> tuple[int, int]:
        return self.in_features, self.out_features

    @classmethod
    def abstract(cls, in_features: int, out_features: int, bits: int, groupsize: int,
                 scales_dtype: str = "float16") -> "QuantWeight":
        """Shapes and dtypes only (`jax.ShapeDtypeStruct` leaves): the target a loader fills in."""
        check_bits(bits)
        n_groups = 1 if groupsize == -1 else -(-in_features // groupsize)
        s = jax.ShapeDtypeStruct
        return cls(s((packed_rows(in_features, bits), out_features), jnp.int32),
                   s((n_groups, out_features), jnp.dtype(scales_dtype)),
                   s((n_groups, packed_rows(out_features, bits)), jnp.int32), s((in_features,), jnp.int32),
                   bits, groupsize, in_features)

    def nbytes(self) -> int:
        """Bytes held by the packed arrays."""
        return sum(int(np.prod(a.shape)) * np.dtype(a.dtype).itemsize
                   for a in (self.qweight, self.scales, self.qzeros, self.g_idx))


def unpack_zeros(qw: QuantWeight) -> jax.Array:
    """Integer zero points `[n_groups, out]` (the stored `zero - 1`, plus one, modulo `2**bits`)."""
    stored = unpack_rows(qw.qzeros.T, qw.bits, qw.out_features).T
    return (stored + 1) & (2 ** qw.bits - 1)


def unpack_codes(qw: QuantWeight) -> jax.Array:
    """Integer codes `[in, out]`."""
    return unpack_rows(qw.qweight, qw.bits, qw.in_features)


def dequantize(qw: QuantWeight, dtype=jnp.float32) -> jax.Array:
    """The dense weight `[in, out]`: the reference every matmul kernel is tested against."""
    codes = unpack_codes(qw)
    zeros = unpack_zeros(qw)[qw.g_idx]
    return (qw.scales[qw.g_idx].astype(jnp.float32) * (codes - zeros).astype(jnp.float32)).astype(dtype)


def group_index(in_features: int, groupsize: int) -> np.ndarray:
    """`g_idx` of contiguous groups: input row `i` is in group `i // groupsize` (all 0 per-row)."""
    if groupsize == -1:
        return np.zeros(in_features, np.int32)
    return (np.arange(in_features) // groupsize).astype(np.int32)


def pack(codes: np.ndarray, scales: np.ndarray, zeros: np.ndarray, g_idx: np.ndarray, bits: int,
         groupsize: int) -> QuantWeight:
    """Build a `QuantWeight` from integer `codes[in, out]`, `scales`/`zeros` `[n_groups, out]`, `g_idx[in]`."""
    codes, zeros = np.asarray(codes), np.asarray(zeros)
    stored = (zeros.astype(np.int64) - 1) % (2 ** bits)  # zero 0 is stored as 2**bits - 1
    return QuantWeight(
        qweight=jnp.asarray(pack_rows(codes, bits)),
        scales=jnp.asarray(scales),
        qzeros=jnp.asarray(pack_rows(stored.T, bits).T),
        g_idx=jnp.asarray(np.asarray(g_idx, np.int32)),
        bits=bits, groupsize=groupsize, in_features=codes.shape[0])
