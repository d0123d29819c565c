"""Bit packing: exact round trips and hand-written vectors from the GPTQ-for-LLaMa/AutoGPTQ format."""
import jax.numpy as jnp
import numpy as np
import pytest

from pyllama_jax.model import packing
from pyllama_jax.model.packing import pack, pack_rows, unpack_rows


def _as_int32(words):
    return np.array(words, np.uint32).view(np.int32)


def _gptq_for_llama_pack(intweight: np.ndarray, bits: int) -> np.ndarray:
    """GPTQ-for-LLaMa's `QuantLinear.pack` loop, transcribed (rows must be a multiple of 32)."""
    intweight = intweight.astype(np.uint32)
    qweight = np.zeros((intweight.shape[0] // 32 * bits, intweight.shape[1]), np.uint32)
    i = row = 0
    while row < qweight.shape[0]:
        if bits in (2, 4, 8):
            for j in range(i, i + 32 // bits):
                qweight[row] |= intweight[j] << (bits * (j - i))
            i += 32 // bits
            row += 1
        else:
            for j in range(i, i + 10):
                qweight[row] |= intweight[j] << (3 * (j - i))
            i += 10
            qweight[row] |= intweight[i] << 30
            row += 1
            qweight[row] |= (intweight[i] >> 2) & 1
            i += 1
            for j in range(i, i + 10):
                qweight[row] |= intweight[j] << (3 * (j - i) + 1)
            i += 10
            qweight[row] |= intweight[i] << 31
            row += 1
            qweight[row] |= (intweight[i] >> 1) & 0x3
            i += 1
            for j in range(i, i + 10):
                qweight[row] |= intweight[j] << (3 * (j - i) + 2)
            i += 10
            row += 1
    return qweight.view(np.int32)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("shape", [(64, 8), (100, 3), (7, 5), (33, 1)])
def test_round_trip_exact(bits, shape):
    rng = np.random.default_rng(bits * 1000 + shape[0])
    v = rng.integers(0, 2 ** bits, size=shape)
    packed = pack_rows(v, bits)
    assert packed.dtype == np.int32
    assert packed.shape == (-(-shape[0] * bits // 32), shape[1])
    np.testing.assert_array_equal(np.asarray(unpack_rows(jnp.asarray(packed), bits, shape[0])), v)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_matches_gptq_for_llama_pack_loop(bits):
    v = np.random.default_rng(bits).integers(0, 2 ** bits, size=(96, 6))
    np.testing.assert_array_equal(pack_rows(v, bits), _gptq_for_llama_pack(v, bits))


def test_hand_written_vectors():
    # 4-bit: values 1..8 down one column fill one word from the least significant nibble.
    np.testing.assert_array_equal(pack_rows(np.arange(1, 9)[:, None], 4), _as_int32([[0x87654321]]))
    # 2-bit: 16 values 3,0,1,2,... -> 0b...10_01_00_11 repeated.
    np.testing.assert_array_equal(pack_rows(np.tile([3, 0, 1, 2], 4)[:, None], 2), _as_int32([[0x93939393]]))
    # 8-bit: bytes little-endian.
    np.testing.assert_array_equal(pack_rows(np.array([[0x11], [0x22], [0x33], [0xFF]]), 8), _as_int32([[0xFF332211]]))
    # 3-bit straddling: value 10 (0b111) spans bits 30-31 of word 0 and bit 0 of word 1;
    # value 21 (0b101) spans bit 31 of word 1 and bits 0-1 of word 2.
    v = np.zeros((32, 1), np.int64)
    v[10], v[21], v[31] = 7, 5, 6
    np.testing.assert_array_equal(pack_rows(v, 3), _as_int32([[0xC0000000], [0x80000001], [0xC0000002]]))


def test_qzeros_store_zero_minus_one_along_output():
    # zeros 1..8 for 8 output columns -> stored 0..7 -> one 4-bit word 0x76543210.
    qw = pack(np.zeros((8, 8), np.int64), np.ones((1, 8), np.float32), np.arange(1, 9)[None], np.zeros(8), 4, -1)
    np.testing.assert_array_equal(np.asarray(qw.qzeros), _as_int32([[0x76543210]]))
    np.testing.assert_array_equal(np.asarray(packing.unpack_zeros(qw)), np.arange(1, 9)[None])


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_dequantize_matches_formula(bits):
    rng = np.random.default_rng(7)
    n, m, gs = 70, 40, 32  # neither a multiple of 32; last group is short
    codes = rng.integers(0, 2 ** bits, size=(n, m))
    g_idx = packing.group_index(n, gs)
    scales = rng.uniform(0.01, 0.1, size=(3, m)).astype(np.float32)
    zeros = rng.integers(0, 2 ** bits, size=(3, m))  # includes zero 0, stored as 2**bits - 1
    qw = pack(codes, scales, zeros, g_idx, bits, gs)
    want = scales[g_idx] * (codes - zeros[g_idx]).astype(np.float32)
    np.testing.assert_array_equal(np.asarray(packing.dequantize(qw)), want)
    np.testing.assert_array_equal(np.asarray(packing.unpack_zeros(qw)), zeros)


@pytest.mark.parametrize("bad", [1, 5, 16])
def test_unsupported_bits(bad):
    with pytest.raises(ValueError, match="not supported"):
        pack_rows(np.zeros((32, 1), np.int64), bad)


def test_out_of_range_values():
    with pytest.raises(ValueError, match=r"\[0, 16\)"):
        pack_rows(np.array([[16]]), 4)
