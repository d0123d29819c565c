"""Blocked JAX GPTQ against an unblocked, column-by-column numpy GPTQ; quantizer; bad input."""
import jax.numpy as jnp
import numpy as np
import pytest

from pyllama_jax.model import packing
from pyllama_jax.quant.gptq import GPTQConfig, HessianAccumulator, gptq_quantize
from pyllama_jax.quant.rtn import QuantSpec, rtn_quantize


def _np_params(x, maxq, sym):
    """GPTQ's `find_params` on `x[out, k]` (its own layout), without MSE search."""
    xmin = np.minimum(x.min(1), 0)
    xmax = np.maximum(x.max(1), 0)
    if sym:
        xmax = np.maximum(np.abs(xmin), xmax)
        xmin = np.where(xmin < 0, -xmax, xmin)
    empty = (xmin == 0) & (xmax == 0)
    xmin, xmax = np.where(empty, -1, xmin), np.where(empty, 1, xmax)
    scale = (xmax - xmin) / maxq
    zero = np.full_like(scale, (maxq + 1) / 2) if sym else np.round(-xmin / scale)
    return scale, zero


def _np_gptq(w_in_out, h, bits, groupsize, act_order, sym=False, percdamp=0.01):
    """Unblocked GPTQ: quantize one column, update all later columns, repeat (float64)."""
    W = w_in_out.T.astype(np.float64)  # GPTQ's [out, in]
    H = h.astype(np.float64).copy()
    maxq = 2 ** bits - 1
    n = W.shape[1]
    scale, zero = _np_params(W, maxq, sym)
    dead = np.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    static = None
    if act_order and groupsize != -1:
        static = [_np_params(W[:, g:g + groupsize], maxq, sym) for g in range(0, n, groupsize)]
    perm = np.argsort(-np.diag(H), kind="stable") if act_order else np.arange(n)
    W, H = W[:, perm], H[perm][:, perm]
    H += percdamp * np.mean(np.diag(H)) * np.eye(n)
    U = np.linalg.cholesky(np.linalg.inv(H)).T
    Q = np.zeros_like(W)
    for i in range(n):
        if groupsize != -1:
            if static is not None:
                scale, zero = static[perm[i] // groupsize]
            elif i % groupsize == 0:
                scale, zero = _np_params(W[:, i:i + groupsize], maxq, sym)
        w = W[:, i]
        Q[:, i] = scale * (np.clip(np.round(w / scale) + zero, 0, maxq) - zero)
        W[:, i:] -= np.outer((w - Q[:, i]) / U[i, i], U[i, i:])
    return Q[:, np.argsort(perm)].T


def _problem(n_in, n_out, seed, dead=()):
    rng = np.random.default_rng(seed)
    w = rng.normal(size=(n_in, n_out)).astype(np.float32)
    x = rng.normal(size=(4 * n_in, n_in)) * rng.uniform(0.2, 3.0, size=n_in)  # uneven input scales
    x[:, list(dead)] = 0
    acc = HessianAccumulator(n_in)
    acc.add(jnp.asarray(x[: 2 * n_in], jnp.float32))
    acc.add(jnp.asarray(x[2 * n_in:], jnp.float32))
    return w, np.asarray(acc.hessian())


@pytest.mark.parametrize("n_in,n_out,bits,groupsize,act_order,blocksize", [
    (96, 40, 4, -1, False, 32),
    (96, 40, 3, 32, False, 32),
    (100, 24, 4, 16, False, 48),  # groups smaller than blocks, ragged last block and group
    (160, 16, 2, 64, False, 32),  # groups spanning several blocks
    (96, 40, 4, 48, False, 32),  # groupsize not a multiple of blocksize
    (96, 40, 4, -1, True, 32),
    (96, 40, 3, 32, True, 32),
    (100, 24, 8, 25, True, 48),
])
def test_blocked_matches_unblocked_reference(n_in, n_out, bits, groupsize, act_order, blocksize):
    w, h = _problem(n_in, n_out, seed=n_in + bits + groupsize, dead=(5,))
    spec = QuantSpec(bits=bits, groupsize=groupsize)
    qw, loss = gptq_quantize(w, h, spec, GPTQConfig(blocksize=blocksize, act_order=act_order))
    got = np.asarray(packing.dequantize(qw))
    want = _np_gptq(w, h, bits, groupsize, act_order)
    step = np.asarray(qw.scales).max()
    assert np.mean(np.abs(got - want) < 1e-4 * step) > 0.999  # a rare rounding tie may flip a code
    np.testing.assert_allclose(got, want, atol=1.01 * step)
    assert np.all(got[5] == np.asarray(packing.dequantize(qw))[5])
    assert loss > 0


def test_gptq_beats_rtn_on_correlated_inputs():
    rng = np.random.default_rng(0)
    n_in, n_out = 128, 64
    x = rng.normal(size=(2048, 16)) @ rng.normal(size=(16, n_in)) + 0.1 * rng.normal(size=(2048, n_in))
    w = rng.normal(size=(n_in, n_out)).astype(np.float32)
    acc = HessianAccumulator(n_in)
    acc.add(jnp.asarray(x, jnp.float32))
    spec = QuantSpec(bits=3, groupsize=32)
    err = {name: np.linalg.norm(x @ w - x @ np.asarray(packing.dequantize(qw)))
           for name, qw in (("gptq", gptq_quantize(w, acc.hessian(), spec)[0]), ("rtn", rtn_quantize(w, spec)))}
    assert err["gptq"] < 0.5 * err["rtn"]


def test_identity_hessian_reduces_to_rtn():
    w = np.random.default_rng(1).normal(size=(64, 32)).astype(np.float32)
    spec = QuantSpec(bits=4, groupsize=16, sym=True)
    g, _ = gptq_quantize(w, jnp.eye(64), spec)
    r = rtn_quantize(w, spec)
    np.testing.assert_array_equal(np.asarray(g.qweight), np.asarray(r.qweight))
    np.testing.assert_array_equal(np.asarray(g.scales), np.asarray(r.scales))


def test_rtn_matches_numpy_quantizer():
    w = np.random.default_rng(2).normal(size=(70, 12)).astype(np.float32)
    for sym in (False, True):
        qw = rtn_quantize(w, QuantSpec(bits=3, groupsize=32, sym=sym))
        want = np.zeros_like(w)
        for g in range(0, 70, 32):
            x = w[g:g + 32].T  # GPTQ's [out, in] layout
            s, z = _np_params(x, 7, sym)
            want[g:g + 32] = (s[:, None] * (np.clip(np.round(x / s[:, None]) + z[:, None], 0, 7) - z[:, None])).T
        np.testing.assert_array_equal(np.asarray(packing.dequantize(qw)), want)


def test_mse_search_lowers_error():
    w = np.random.default_rng(3).standard_t(df=3, size=(256, 64)).astype(np.float32)  # heavy tails
    err = [np.mean(np.abs(np.asarray(packing.dequantize(rtn_quantize(w, QuantSpec(bits=3, mse=m)))) - w) ** 2.4)
           for m in (False, True)]
    assert err[1] < 0.9 * err[0]


def test_damping_retry_then_clear_error():
    w = np.random.default_rng(4).normal(size=(32, 8)).astype(np.float32)
    h = np.eye(32, dtype=np.float32)
    h[3, 3] = -0.05  # indefinite; percdamp 0.01 is not enough, 0.1 is
    qw, _ = gptq_quantize(w, h, QuantSpec(bits=4))
    assert np.all(np.isfinite(np.asarray(packing.dequantize(qw))))
    with pytest.raises(np.linalg.LinAlgError, match="layers.0.attn.q: the Hessian is not positive definite"):
        gptq_quantize(w, -np.eye(32, dtype=np.float32), QuantSpec(bits=4), name="layers.0.attn.q")
    with pytest.raises(np.linalg.LinAlgError, match="inf/NaN"):
        gptq_quantize(w, np.full((32, 32), np.nan, np.float32), QuantSpec(bits=4))


@pytest.mark.parametrize("kwargs,match", [
    (dict(bits=5), "wbits=5 is not supported"),
    (dict(bits=4, groupsize=0), "groupsize=0"),
    (dict(bits=4, groupsize=-2), "groupsize=-2"),
])
def test_bad_spec(kwargs, match):
    with pytest.raises(ValueError, match=match):
        QuantSpec(**kwargs)


def test_bad_shapes():
    w = np.zeros((32, 8), np.float32)
    with pytest.raises(ValueError, match="groupsize=64 exceeds its 32 input features"):
        rtn_quantize(w, QuantSpec(bits=4, groupsize=64))
    with pytest.raises(ValueError, match=r"Hessian has shape \(16, 16\), expected \(32, 32\)"):
        gptq_quantize(w, np.eye(16), QuantSpec(bits=4))
