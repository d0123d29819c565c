"""`random:<preset>` is a model name like any other: `pj.load` resolves it in convert/, to the preset's
shapes with the weights `init_model` draws, and the byte tokenizer."""
from __future__ import annotations

import numpy as np
import pytest

import pyllama_jax as pj
from pyllama_jax.model.config import preset
from pyllama_jax.model.llama import init_model
from pyllama_jax.model.params import named_tensors


def test_random_name_loads_the_presets_random_model():
    model = pj.load("random:tiny")
    reference = init_model(preset("tiny", vocab_size=257), seed=0)  # 256 bytes + <|endoftext|>
    ours, theirs = dict(named_tensors(model.module)), dict(named_tensors(reference))
    assert ours.keys() == theirs.keys()
    for name in ours:
        np.testing.assert_array_equal(ours[name], theirs[name], err_msg=name)
    ids = np.array([[5, 17, 200, 3]], np.int32)
    np.testing.assert_allclose(np.asarray(model.logits(ids)), np.asarray(reference(ids)[0]), rtol=1e-5, atol=1e-6)
    assert model.tokenizer.decode(model.tokenizer.encode("héllo")) == "héllo"
    assert model.source == "random:tiny" and model.config.vocab_size == 257


def test_random_name_takes_dtype_overrides():
    assert pj.load("random:tiny", dtype="bfloat16", param_dtype="bfloat16").config.param_dtype == "bfloat16"


def test_unknown_preset_is_named():
    with pytest.raises(ValueError, match="unknown model preset 'nope'"):
        pj.load("random:nope")
