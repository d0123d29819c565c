"""Memory follows the bytes: a quantized decode step (and a QLoRA backward pass) never holds more
than one layer's dequantized weights, and loading holds one copy of the weights, never a dense
placeholder. Checked by XLA's memory analysis of compiled programs and by the peak RSS of a
fresh process loading a checkpoint of a few wide layers."""
from __future__ import annotations

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from pyllama_jax.model.config import preset
from pyllama_jax.model.kv_cache import KVCache
from pyllama_jax.model.llama import abstract_model
from pyllama_jax.model.qlinear import LAYER_LINEARS, abstract_quantized

WIDE = dict(vocab_size=2048, dim=1024, n_heads=8, hidden_dim=2816, max_seq_len=64)


def _random_quantized(n_layers: int, bits: int = 4, groupsize: int = 128, dtype: str = "float32"):
    """A quantized model of `n_layers` wide layers filled with random packed words (no dense weights)."""
    config = preset("tiny", n_layers=n_layers, dtype=dtype, param_dtype=dtype, **WIDE)
    layout = {f"layers.{i}.{p}": {"bits": bits, "groupsize": groupsize, "scales_dtype": "float16"}
              for i in range(n_layers) for p in LAYER_LINEARS}
    graphdef, state = nnx.split(abstract_quantized(abstract_model(config), layout))
    keys = iter(jax.random.split(jax.random.key(0), 1000))

    def fill(a):
        if a.dtype == jnp.int32:
            return jax.random.randint(next(keys), a.shape, 0, 2 ** 31 - 1, jnp.int32)
        return (0.02 * jax.random.uniform(next(keys), a.shape, jnp.float32, 0.5, 1.0)).astype(a.dtype)

    state = jax.tree.map(fill, state)
    for path, var in nnx.to_flat_state(state):
        if path[-1] == "g_idx":
            var.set_value(jnp.arange(var.get_value().shape[0], dtype=jnp.int32) // groupsize)
    return nnx.merge(graphdef, state), layout


def _dense_layer_bytes(config) -> int:
    """float32 bytes of one layer's seven dense weights: what XLA would materialize to dequantize it."""
    d, h, kv = config.dim, config.hidden_dim, config.kv_heads * config.head_dim
    return 4 * (2 * d * d + 2 * d * kv + 3 * d * h)


def _temp_bytes(fn, *args) -> int:
    return jax.jit(fn).lower(*args).compile().memory_analysis().temp_size_in_bytes


def _decode_temp(n_layers: int) -> tuple[int, int]:
    model, _ = _random_quantized(n_layers)
    graphdef, state = nnx.split(model)

    def step(state, cache, tokens, positions):
        return nnx.merge(graphdef, state)(tokens, positions, cache)

    cache = KVCache.create(model.config, 1, 64)
    ids = jnp.ones((1, 1), jnp.int32)
    return _temp_bytes(step, state, cache, ids, ids), _dense_layer_bytes(model.config)


def test_quantized_decode_step_holds_one_layer_of_dequantized_weights():
    """Four more layers may add at most a quarter of one layer's dense bytes to the step's scratch
    memory; XLA's default schedule dequantizes every layer up front (4 x the layer's bytes)."""
    (small, layer), (deep, _) = _decode_temp(2), _decode_temp(6)
    assert deep - small < 0.25 * layer, (small, deep, layer)
    assert small < 2 * layer, (small, layer)  # and at most a layer's working set to begin with


def _backward_temp(n_layers: int) -> tuple[int, int]:
    model, _ = _random_quantized(n_layers)
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)

    def loss(params, rest, ids):
        logits = nnx.merge(graphdef, params, rest)(ids)[0]
        return jnp.mean(logits ** 2)

    ids = jnp.ones((1, 16), jnp.int32)
    return _temp_bytes(jax.grad(loss), params, rest, ids), _dense_layer_bytes(model.config)


def test_quantized_backward_pass_saves_no_dequantized_weights():
    """A QLoRA step differentiates through frozen packed layers: the backward pass rebuilds each
    layer's dense weight when it needs it instead of keeping every layer's from the forward pass."""
    (small, layer), (deep, _) = _backward_temp(2), _backward_temp(6)
    assert deep - small < 0.25 * layer, (small, deep, layer)


PEAK_SCRIPT = """
import resource, sys
import jax, numpy as np
jax.numpy.zeros(1).block_until_ready()
import pyllama_jax as pj
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
m = pj.load(sys.argv[1])
jax.block_until_ready(jax.tree.leaves(m._state))
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print("PEAK", (peak - base) * 1024)
"""


def _load_peak(folder: str) -> int:
    out = subprocess.run([sys.executable, "-c", PEAK_SCRIPT, folder], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    return int(next(line for line in out.stdout.splitlines() if line.startswith("PEAK")).split()[1])


def _folder_bytes(folder) -> int:
    return sum(os.path.getsize(os.path.join(folder, f)) for f in os.listdir(folder))


@pytest.fixture(scope="module")
def wide_checkpoints(tmp_path_factory):
    """A 4-bit g128 and a dense bfloat16 native checkpoint of the same 6 wide layers."""
    from pyllama_jax.convert import native
    from pyllama_jax.model.params import expected_shapes
    from pyllama_jax.convert.save import save_quantized

    root = tmp_path_factory.mktemp("wide")
    model, _ = _random_quantized(6)
    save_quantized(model, str(root / "q4"), {"recipe": {"wbits": 4, "groupsize": 128}})
    dense = model.config.replace(dtype="bfloat16", param_dtype="bfloat16")
    rng = np.random.default_rng(0)
    tensors = ((n, rng.standard_normal(s, np.float32) * 0.02) for n, s in expected_shapes(dense).items())
    native.save(str(root / "bf16"), dense, tensors)
    return root


def test_quantized_load_peaks_near_its_file_size(wide_checkpoints):
    """Packed tensors stream into a model declared with packed shapes: no float32 placeholder the
    size of each dense kernel (here 6 x 33 MiB) is ever made."""
    folder = str(wide_checkpoints / "q4")
    size, peak = _folder_bytes(folder), _load_peak(folder)
    assert peak < 1.3 * size + (24 << 20), (peak, size)


def test_dense_load_holds_one_copy(wide_checkpoints):
    """A dense checkpoint is read tensor by tensor into its own buffers (a memory map would keep a
    second, file-backed copy resident until the load ends)."""
    folder = str(wide_checkpoints / "bf16")
    size, peak = _folder_bytes(folder), _load_peak(folder)
    assert peak < 1.2 * size + (24 << 20), (peak, size)
