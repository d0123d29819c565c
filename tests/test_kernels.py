"""The Pallas dequantize-matmul kernel against `packing.dequantize` + a float32 dot.

Off GPU the kernel runs interpreted: interpret mode fills every output with NaN before the kernel
runs (`test_unwritten_outputs_stay_nan` checks that), so a finite result means every element was
written. On a GPU host the same tests run the compiled kernel.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental import pallas as pl

from pyllama_jax.kernels import dequant_matmul as dm
from pyllama_jax.model.packing import QuantWeight, dequantize, group_index, pack

# Interpreted kernels are large unrolled XLA programs: these options cut their CPU compile time ~2x.
FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_cpu_use_fusion_emitters": False}


def random_weight(rng: np.random.Generator, k: int, n: int, bits: int, groupsize: int, act_order: bool,
                  scale_dtype=np.float16) -> QuantWeight:
    """Random codes, zero points and scales; act-order shuffles which rows belong to which group."""
    n_groups = 1 if groupsize == -1 else -(-k // groupsize)
    g_idx = group_index(k, groupsize)
    if act_order:
        g_idx = g_idx[rng.permutation(k)]
    scales = (rng.uniform(0.5, 2.0, (n_groups, n)) / 2 ** bits).astype(scale_dtype)
    return pack(rng.integers(0, 2 ** bits, (k, n)), scales, rng.integers(0, 2 ** bits, (n_groups, n)),
                g_idx, bits, groupsize)


def kernel(x: jax.Array, qw: QuantWeight, config: dm.TileConfig | None = None) -> np.ndarray:
    """The kernel's output as float32: interpreted off GPU, compiled on a GPU."""
    options = FAST_COMPILE if jax.default_backend() == "cpu" else None
    f = jax.jit(functools.partial(dm.dequant_matmul, config=config), compiler_options=options)
    return np.asarray(f(x, qw).astype(jnp.float32))


def assert_matches(y: np.ndarray, x: jax.Array, qw: QuantWeight) -> None:
    """Every element written, and within two roundings to x's dtype of the float32 reference."""
    ref = np.asarray(jnp.dot(x.astype(jnp.float32), dequantize(qw, jnp.float32)))
    assert y.shape == ref.shape
    assert np.isfinite(y).all(), f"{np.isnan(y).sum()} outputs left unwritten (NaN)"
    err = np.abs(y - ref).max() / np.abs(ref).max()
    assert err <= float(jnp.finfo(x.dtype).eps), f"relative error {err:.2e}"


# Odd batch sizes on both paths: 1 or 3 rows take the GEMV path (1 where 16-32 chunks per tile
# make the unrolled interpreter program slow to compile), 19 the tensor-core dot path.
CASES = [(bits, groupsize, 19 if groupsize in (64, 128) else 1 if bits in (2, 3) else 3)
         for bits in (2, 3, 4, 8) for groupsize in (32, 64, 128, -1)]


@pytest.mark.parametrize("bits,groupsize,m", CASES, ids=[f"{b}bit-g{g}-m{m}" for b, g, m in CASES])
def test_matches_reference(bits, groupsize, m):
    """Static-group and act-order g_idx (same compiled kernel, fresh random inputs each)."""
    rng = np.random.default_rng([bits, groupsize + 1, m])
    for act_order in (False, True):
        qw = random_weight(rng, 512, 96, bits, groupsize, act_order)
        x = jnp.asarray(rng.standard_normal((m, 512)), jnp.bfloat16)
        assert_matches(kernel(x, qw), x, qw)


def test_float16_leading_dims_uneven_split_k():
    """float16 activations `[2, 5, K]`, float32 scales, 5 K tiles over 3 programs (2, 2, 1)."""
    rng = np.random.default_rng(7)
    qw = random_weight(rng, 640, 64, 4, 128, act_order=True, scale_dtype=np.float32)
    x = jnp.asarray(rng.standard_normal((2, 5, 640)), jnp.float16)
    config = dm.TileConfig(block_m=16, block_n=32, block_k=128, split_k=3)
    y = kernel(x, qw, config)
    assert y.shape == (2, 5, 64)
    assert_matches(y.reshape(10, 64), x.reshape(10, 640), qw)


def test_prefill_batch():
    """A prefill-sized batch: 300 rows in blocks of 128 (the last one padded)."""
    rng = np.random.default_rng(8)
    qw = random_weight(rng, 256, 128, 4, 128, act_order=False)
    x = jnp.asarray(rng.standard_normal((300, 256)), jnp.bfloat16)
    assert dm.default_config(300, 256, 128, 4).block_m == 128
    assert_matches(kernel(x, qw), x, qw)


def test_gemv_row_blocks_odd_k_groupsize_40():
    """K = 200 = 8 * 25 has no dot tile, so 20 rows run as three 8-row GEMV blocks; groups of 40
    rows (not a power of 2) hold whole 8-row tiles. Static and act-order g_idx."""
    rng = np.random.default_rng(9)
    config = dm.default_config(20, 200, 64, 4)
    assert (config.block_m, config.block_k) == (8, 8)
    for act_order in (False, True):
        qw = random_weight(rng, 200, 64, 4, 40, act_order)
        x = jnp.asarray(rng.standard_normal((20, 200)), jnp.bfloat16)
        assert_matches(kernel(x, qw), x, qw)


def test_unwritten_outputs_stay_nan():
    """The poison behind the finiteness checks: interpret mode NaN-fills outputs before a kernel runs."""
    def half(x_ref, o_ref):
        o_ref[:4] = x_ref[:4]

    y = pl.pallas_call(half, out_shape=jax.ShapeDtypeStruct((8, 32), jnp.float32), interpret=True)(
        jnp.ones((8, 32), jnp.float32))
    assert np.isfinite(np.asarray(y[:4])).all() and np.isnan(np.asarray(y[4:])).all()


UNSUPPORTED = [  # (k, n, bits, m, what the reason names)
    (256, 48, 4, 1, "out_features must be a multiple of 32"),
    (100, 64, 4, 1, "in_features a multiple of 8"),
    (800, 64, 3, 100, "in_features a multiple of 512"),
]


@pytest.mark.parametrize("k,n,bits,m,why", UNSUPPORTED, ids=["n48", "k100", "3bit-k800-prefill"])
def test_unsupported_shapes_fall_back(k, n, bits, m, why):
    """Shapes the kernel cannot tile are refused by name and routed to the XLA path, never run wrong."""
    rng = np.random.default_rng(k + n)
    qw = random_weight(rng, k, n, bits, 32 if k % 32 == 0 else -1, act_order=False)
    x = jnp.asarray(rng.standard_normal((m, k)), jnp.bfloat16)
    interpret = jax.default_backend() != "gpu"
    reason = dm.supports(qw, x.shape, interpret=interpret)
    assert reason is not None and why in reason
    with pytest.raises(ValueError, match="dequant_matmul"):
        dm.dequant_matmul(x, qw, interpret=interpret)
    xla = lambda x, qw: jnp.dot(x, dequantize(qw, x.dtype), preferred_element_type=jnp.float32)
    with pytest.warns(RuntimeWarning, match="falls back to the XLA"):
        y = dm.qmatmul(x, qw, xla, interpret=interpret)
    assert_matches(np.asarray(y), x, qw)


def test_bad_config_is_refused():
    qw = random_weight(np.random.default_rng(3), 256, 64, 4, 128, act_order=False)
    x = jnp.ones((1, 256), jnp.bfloat16)
    with pytest.raises(ValueError, match="block_k=384"):
        dm.dequant_matmul(x, qw, config=dm.TileConfig(1, 64, 384))
    with pytest.raises(ValueError, match="dot path needs"):
        dm.dequant_matmul(x, qw, config=dm.TileConfig(16, 64, 64))


def test_off_gpu_routes_to_fallback():
    """Without a GPU the `quant.kernel = "pallas"` route warns and uses the XLA path."""
    rng = np.random.default_rng(4)
    qw = random_weight(rng, 256, 64, 4, 128, act_order=False)
    x = jnp.asarray(rng.standard_normal((1, 256)), jnp.bfloat16)
    if jax.default_backend() == "gpu":
        pytest.skip("this check is for hosts without a GPU")
    with pytest.warns(RuntimeWarning, match="needs a GPU"):
        y = dm.qmatmul(x, qw, lambda x, qw: jnp.dot(x, dequantize(qw, x.dtype)))
    assert_matches(np.asarray(y.astype(jnp.float32)), x, qw)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_lowers_to_triton_for_cuda(bits):
    """The GPU code paths (GEMV and dot) pass Pallas' Triton lowering, checked without a GPU."""
    from jax._src.lib import triton, version

    if version > (0, 10, 2) and not triton.has_compilation_handler("CUDA"):
        pytest.skip("this jaxlib compiles Triton IR while lowering, which needs its CUDA plugin")
    k, n, gs = 4096, 256, 128
    args = (jax.ShapeDtypeStruct((k * bits // 32, n), jnp.int32), jax.ShapeDtypeStruct((k,), jnp.int32),
            jax.ShapeDtypeStruct((k // gs, n), jnp.float16), jax.ShapeDtypeStruct((k // gs, n * bits // 32), jnp.int32))
    for m in (1, 64):
        x = jax.ShapeDtypeStruct((m, k), jnp.bfloat16)
        lowered = dm._dequant_matmul.trace(x, *args, bits=bits, groupsize=gs, config=dm.default_config(m, k, n, bits),
                                           interpret=False).lower(lowering_platforms=("cuda",))
        assert "triton" in lowered.as_text()
