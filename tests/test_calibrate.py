"""The layer-by-layer GPTQ driver against a plain one, resuming, and GPTQ vs RTN on real SmolLM2 layers."""
import os

import jax.numpy as jnp
import numpy as np
import pytest

from pyllama_jax.data.text import calibration_windows, data_dir
from pyllama_jax.model.config import preset
from pyllama_jax.model.llama import init_model
from pyllama_jax.model import packing
from pyllama_jax.quant.calibrate import SEQUENTIAL, CalibrationConfig, quantize_gptq
from pyllama_jax.quant.gptq import HessianAccumulator, gptq_quantize
from pyllama_jax.model.qlinear import get_module, quantized_linears, set_linear
from pyllama_jax.quant.rtn import QuantSpec, rtn_quantize

SPEC = QuantSpec(bits=3, groupsize=16)


class _Record:
    def __init__(self, lin, seen):
        self.lin, self.seen = lin, seen

    def __call__(self, x):
        self.seen.append(np.asarray(x))
        return self.lin(x)


def _plain_driver(model, ids):
    """GPTQ's llama.py loop: run the whole block on every sample for each group, fake-quantize."""
    x = np.asarray(jnp.take(model.embed[...], jnp.asarray(ids), axis=0))
    pos = jnp.broadcast_to(jnp.arange(ids.shape[1]), (1, ids.shape[1]))
    for i, layer in enumerate(model.layers):
        for group in SEQUENTIAL:
            seen = []
            original = get_module(layer, group[0])
            set_linear(layer, group[0], _Record(original, seen))
            for row in x:
                layer(jnp.asarray(row[None]), pos)
            set_linear(layer, group[0], original)
            acc = HessianAccumulator(seen[0].shape[-1])
            for a in seen:
                acc.add(jnp.asarray(a))
            for path in group:
                lin = get_module(layer, path)
                qw, _ = gptq_quantize(lin.kernel[...], acc.hessian(), SPEC, name=f"layers.{i}.{path}")
                lin.kernel[...] = packing.dequantize(qw)
        x = np.stack([np.asarray(layer(jnp.asarray(row[None]), pos)[0][0]) for row in x])
    return model


def test_driver_matches_plain_gptq_loop(tmp_path):
    config = preset("tiny")
    ids = np.random.default_rng(0).integers(0, config.vocab_size, size=(6, 24))
    ours = quantize_gptq(init_model(config, seed=1), ids, SPEC, config=CalibrationConfig(batch_size=4))
    plain = _plain_driver(init_model(config, seed=1), ids)
    for name, qw in quantized_linears(ours).items():
        np.testing.assert_allclose(np.asarray(packing.dequantize(qw)),
                                   np.asarray(get_module(plain, name).kernel[...]), atol=1e-5)


def test_resume_continues_at_first_unfinished_block(tmp_path, monkeypatch):
    """Killed during block 2 of 4: the rerun solves only blocks 2 and 3 and ends as an uninterrupted run."""
    import pyllama_jax.quant.calibrate as calibrate

    config = preset("tiny", n_layers=4)
    ids = np.random.default_rng(1).integers(0, config.vocab_size, size=(4, 16))
    full = quantize_gptq(init_model(config, seed=2), ids, SPEC, config=CalibrationConfig(2))
    solved, killed = [], []

    def solve(w, h, spec, gptq, name):
        if name.startswith("layers.2.") and not killed:
            killed.append(name)
            raise KeyboardInterrupt  # the first run is killed here
        solved.append(name)
        return gptq_quantize(w, h, spec, gptq, name)

    monkeypatch.setattr(calibrate, "gptq_quantize", solve)
    with pytest.raises(KeyboardInterrupt):
        quantize_gptq(init_model(config, seed=2), ids, SPEC, config=CalibrationConfig(2, str(tmp_path)))
    solved.clear()
    resumed = quantize_gptq(init_model(config, seed=2), ids, SPEC, config=CalibrationConfig(2, str(tmp_path)))
    assert sorted(solved) == sorted(f"layers.{i}.{p}" for i in (2, 3) for g in SEQUENTIAL for p in g)
    probe = jnp.asarray(ids[:1])
    np.testing.assert_array_equal(np.asarray(resumed(probe)[0]), np.asarray(full(probe)[0]))
    with pytest.raises(ValueError, match="settings.json: this folder holds a run with other settings"):
        quantize_gptq(init_model(config, seed=2), ids, QuantSpec(bits=4), config=CalibrationConfig(2, str(tmp_path)))


def test_gptq_beats_rtn_on_real_layers(smollm2):
    """Output error ||XW - XQ|| on real calibration activations of SmolLM2's block 0 and 1 (the session
    model: its linears are wrapped only for one forward, then put back)."""
    model = smollm2.module
    text = open(os.path.join(data_dir(), "gutenberg", "pride_and_prejudice.txt"), encoding="utf-8").read()
    ids = calibration_windows(smollm2.tokenizer.encode(text[:200_000], bos=False), 16, 256, seed=0)
    x = jnp.take(model.embed[...], jnp.asarray(ids), axis=0)
    pos = jnp.broadcast_to(jnp.arange(ids.shape[1]), ids.shape)
    acts = {}
    for i in range(2):
        layer = model.layers[i]
        seen = {}
        for path in ("attn.q", "mlp.down"):
            seen[path] = []
            set_linear(layer, path, _Record(get_module(layer, path), seen[path]))
        try:
            y = layer(x, pos)[0]
        finally:
            for path in ("attn.q", "mlp.down"):
                set_linear(layer, path, get_module(layer, path).lin)
        for path in ("attn.q", "mlp.down"):
            acts[f"layers.{i}.{path}"] = seen[path][0].reshape(-1, seen[path][0].shape[-1])
        x = y
    for name, a in acts.items():
        w = np.asarray(get_module(model, name).kernel[...])
        acc = HessianAccumulator(a.shape[1])
        acc.add(jnp.asarray(a))
        ref = a @ w
        for bits in (3, 4):
            spec = QuantSpec(bits=bits, groupsize=128)
            err_gptq = np.linalg.norm(a @ np.asarray(packing.dequantize(gptq_quantize(w, acc.hessian(), spec)[0])) - ref)
            err_rtn = np.linalg.norm(a @ np.asarray(packing.dequantize(rtn_quantize(w, spec))) - ref)
            assert err_gptq < 0.8 * err_rtn, (name, bits, err_gptq, err_rtn)
