"""The facade serves the module as it is now, not as it was when the facade was made."""
from __future__ import annotations

import jax.numpy as jnp
import numpy as np

import pyllama_jax as pj
from pyllama_jax.api import Model
from pyllama_jax.model.config import preset
from pyllama_jax.model.llama import init_model


def test_a_facade_made_before_quantizing_serves_the_quantized_logits():
    model = Model(init_model(preset("tiny")), None, "random:tiny")
    ids = np.arange(12, dtype=np.int32)[None] * 7 % 256
    dense = np.asarray(model.logits(ids))
    pj.quantize(model, nearest=True, wbits=2, groupsize=32)  # changes `model.module` in place
    expected = np.asarray(model.module(jnp.asarray(ids))[0])  # the quantized module, called directly
    assert np.abs(expected - dense).max() > 1e-3  # 2-bit RTN moves the logits
    np.testing.assert_allclose(np.asarray(model.logits(ids)), expected, rtol=1e-5, atol=1e-5)
