"""QuantLinear / qmatmul against numpy, and a quantized model against its fake-quantized dense twin."""
import jax.numpy as jnp
import numpy as np
import pytest

from pyllama_jax.model.config import preset
from pyllama_jax.model.llama import init_model
from pyllama_jax.model import packing
from pyllama_jax.quant.calibrate import quantize_rtn
from pyllama_jax.model.qlinear import LAYER_LINEARS, QuantLinear, get_module, qmatmul, quantized_linears
from pyllama_jax.quant.rtn import QuantSpec


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_quant_linear_matches_numpy(bits):
    rng = np.random.default_rng(bits)
    n_in, n_out, gs = 96, 40, 32
    codes = rng.integers(0, 2 ** bits, size=(n_in, n_out))
    scales = rng.uniform(0.01, 0.05, size=(3, n_out)).astype(np.float32)
    zeros = rng.integers(0, 2 ** bits, size=(3, n_out))
    g_idx = rng.permutation(packing.group_index(n_in, gs))  # act-order style arbitrary groups
    qw = packing.pack(codes, scales, zeros, g_idx, bits, gs)
    x = rng.normal(size=(2, 5, n_in)).astype(np.float32)
    w = scales[g_idx] * (codes - zeros[g_idx])
    np.testing.assert_allclose(np.asarray(QuantLinear(qw)(jnp.asarray(x))), x @ w, rtol=2e-5, atol=2e-5)


def test_unknown_kernel():
    qw = packing.pack(np.zeros((32, 8), np.int64), np.ones((1, 8), np.float32), np.ones((1, 8)), np.zeros(32), 4, -1)
    with pytest.raises(ValueError, match="kernel 'cuda' is not available; expected one of"):
        qmatmul(jnp.zeros((1, 32)), qw, kernel="cuda")


def _np_rtn(w, bits, gs):
    """GPTQ's quantizer in numpy on `w[in, out]`, per group of input rows."""
    out = np.zeros_like(w)
    maxq = 2 ** bits - 1
    for g in range(0, w.shape[0], gs):
        x = w[g:g + gs]
        xmin, xmax = np.minimum(x.min(0), 0), np.maximum(x.max(0), 0)
        scale = (xmax - xmin) / maxq
        zero = np.round(-xmin / scale)
        out[g:g + gs] = scale * (np.clip(np.round(x / scale) + zero, 0, maxq) - zero)
    return out


def test_rtn_model_equals_fake_quantized_dense_model():
    config = preset("tiny")
    dense, quant = init_model(config, seed=3), init_model(config, seed=3)
    for layer in dense.layers:
        for path in LAYER_LINEARS:
            lin = get_module(layer, path)
            lin.kernel[...] = jnp.asarray(_np_rtn(np.asarray(lin.kernel[...]), 4, 32))
    quantize_rtn(quant, QuantSpec(bits=4, groupsize=32))
    assert len(quantized_linears(quant)) == config.n_layers * len(LAYER_LINEARS)
    ids = jnp.asarray(np.random.default_rng(0).integers(0, config.vocab_size, size=(2, 16)))
    np.testing.assert_allclose(np.asarray(quant(ids)[0]), np.asarray(dense(ids)[0]), rtol=1e-4, atol=1e-4)
