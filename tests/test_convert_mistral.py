"""Mistral HF folders without a sliding window in effect: LlamaForCausalLM's layers, against transformers."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import pyllama_jax as pj


def _mistral(folder, **overrides) -> torch.nn.Module:
    from transformers import MistralConfig, MistralForCausalLM

    torch.manual_seed(0)
    cfg = MistralConfig(vocab_size=300, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                        rms_norm_eps=1e-5, rope_theta=1e6, tie_word_embeddings=False, **overrides)
    model = MistralForCausalLM(cfg).eval()
    model.save_pretrained(folder)
    return model


@pytest.mark.parametrize("window", [None, 128])  # v0.2+: null; a window as long as the context does nothing
def test_mistral_logits_match_transformers(tmp_path, window):
    theirs = _mistral(tmp_path, sliding_window=window)
    ours = pj.load(str(tmp_path))
    assert ours.config.kv_heads == 2 and ours.config.rope_theta == 1e6
    ids = np.random.default_rng(0).integers(0, 300, size=(2, 40))
    with torch.no_grad():
        expected = theirs(torch.tensor(ids)).logits.numpy()
    np.testing.assert_allclose(np.asarray(ours.logits(ids)), expected, atol=2e-4, rtol=1e-4)


def test_sliding_window_in_effect_is_refused(tmp_path):
    _mistral(tmp_path, sliding_window=16)
    with pytest.raises(ValueError, match=r"config.json: sliding_window=16 is shorter than max_position_embeddings=128"):
        pj.load(str(tmp_path))
