"""Each layer of our decoder against transformers' PyTorch module holding the same weights, in float32.

A small random `LlamaForCausalLM` (grouped-query attention: 4 heads, 2 kv heads) is saved by transformers
and read back through our own HF converter, so both sides hold one set of weights; each test then feeds
one layer of each the same random input. One test per layer, so a break names its layer; the last test
does the same for block 0 of SmolLM2's real weights (there 1e-5 relative or absolute, per element).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM
from transformers.models.llama import modeling_llama as hf_llama

from pyllama_jax.convert import hf
from pyllama_jax.model import llama
from pyllama_jax.model.params import build_model

TOL = 1e-5  # max abs difference, float32
BATCH, LENGTH = 2, 7
Pair = tuple[llama.Block, hf_llama.LlamaDecoderLayer, LlamaForCausalLM]
REAL = np.array([[1] * LENGTH, [1] * (LENGTH - 2) + [0] * 2], np.int32)  # row 1: two padding tokens at the end


def small_config(**rope: float | str) -> LlamaConfig:
    config = LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=176, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         rms_norm_eps=1e-5, rope_parameters={"rope_theta": 10000.0, "rope_type": "default", **rope},
                         tie_word_embeddings=False)
    config._attn_implementation = "eager"
    return config


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> Pair:
    """(our block 0, transformers' layer 0, transformers' model) of one random model."""
    torch.manual_seed(0)
    theirs = LlamaForCausalLM(small_config()).to(torch.float32).eval()
    with torch.no_grad():
        for name, p in theirs.named_parameters():  # norm weights near 1 (not exactly, so a lost scale shows)
            p.copy_(1 + 0.2 * torch.randn_like(p) if p.ndim == 1 else torch.randn_like(p) / p.shape[-1] ** 0.5)
    folder = str(tmp_path_factory.mktemp("random_llama"))
    theirs.save_pretrained(folder)
    ckpt = hf.read(folder)
    ours = build_model(ckpt.config, ckpt.tensors, ckpt.source)
    return ours.layers[0], theirs.model.layers[0], theirs


def hidden(seed: int, dim: int = 64, length: int = LENGTH) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((BATCH, length, dim)).astype(np.float32)


def positions(real: np.ndarray) -> np.ndarray:
    """Positions as our model counts them: real tokens only (padding repeats the last position)."""
    return np.maximum(np.cumsum(real, axis=1) - 1, 0).astype(np.int32)


def additive_mask(real: np.ndarray) -> torch.Tensor:
    """transformers' `[b, 1, q, k]` additive mask: causal, padding keys hidden (built here in numpy)."""
    t = real.shape[1]
    visible = np.tril(np.ones((t, t), bool))[None] & (real[:, None, :] > 0)
    return torch.tensor(np.where(visible, 0.0, np.finfo(np.float32).min)[:, None], dtype=torch.float32)


def rotary(model: LlamaForCausalLM, x: torch.Tensor, pos: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    return model.model.rotary_emb(x, torch.tensor(pos, dtype=torch.long))


def within(ours: jax.Array, theirs: torch.Tensor) -> None:
    """Max abs difference at most TOL, both numbers in the message."""
    diff = float(np.max(np.abs(np.asarray(ours) - theirs.detach().numpy())))
    assert diff <= TOL, f"max abs difference {diff:.3g} > {TOL:.3g}"


def test_rmsnorm(pair: Pair) -> None:
    block, layer, _ = pair
    assert isinstance(layer.input_layernorm, hf_llama.LlamaRMSNorm)
    x = hidden(1) * 3
    with torch.no_grad():
        expected = layer.input_layernorm(torch.tensor(x))
    within(block.attn_norm(jnp.asarray(x)), expected)


@pytest.mark.parametrize("rope", [{}, {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                       "high_freq_factor": 4.0, "original_max_position_embeddings": 32}],
                         ids=["default", "llama3"])
def test_rotary_embedding(rope: dict[str, float | str]) -> None:
    config = small_config(**rope)
    ours_config = hf.config_from_hf(config.to_dict(), "LlamaConfig")
    emb = hf_llama.LlamaRotaryEmbedding(config)
    inv_freq = np.asarray(llama.rope_frequencies(ours_config))
    np.testing.assert_allclose(inv_freq, emb.inv_freq.numpy(), rtol=1e-6)
    rng = np.random.default_rng(2)
    q = rng.standard_normal((BATCH, LENGTH, 4, 16)).astype(np.float32)
    k = rng.standard_normal((BATCH, LENGTH, 2, 16)).astype(np.float32)
    pos = rng.integers(0, 200, (BATCH, LENGTH)).astype(np.int32)  # past the llama3 original context
    with torch.no_grad():
        cos, sin = emb(torch.tensor(q), torch.tensor(pos, dtype=torch.long))
        q_rot, k_rot = hf_llama.apply_rotary_pos_emb(torch.tensor(q).transpose(1, 2), torch.tensor(k).transpose(1, 2),
                                                    cos, sin)
    within(llama.apply_rope(jnp.asarray(q), jnp.asarray(pos), jnp.asarray(inv_freq)),
                    q_rot.transpose(1, 2))
    within(llama.apply_rope(jnp.asarray(k), jnp.asarray(pos), jnp.asarray(inv_freq)),
                    k_rot.transpose(1, 2))


@pytest.mark.parametrize("length", [LENGTH, 150])  # 150: causal_attention's query blocks of 64, 64 and 22
def test_attention_gqa_with_padding(pair: Pair, length: int) -> None:
    block, layer, model = pair
    assert isinstance(layer.self_attn, hf_llama.LlamaAttention) and block.attn.kv_heads < block.attn.n_heads
    real = np.ones((BATCH, length), np.int32)
    real[1, length - 2:] = 0  # row 1: two padding tokens at the end
    x, pos = hidden(3, length=length), positions(real)
    mask = llama.causal_mask(jnp.asarray(pos), None, jnp.asarray(real > 0))
    out, _ = block.attn(jnp.asarray(x), jnp.asarray(pos), llama.rope_frequencies(block.config), mask, None)
    with torch.no_grad():
        expected, _ = layer.self_attn(torch.tensor(x), position_embeddings=rotary(model, torch.tensor(x), pos),
                                      attention_mask=additive_mask(real))
    within(out, expected)


def test_mlp(pair: Pair) -> None:
    block, layer, _ = pair
    assert isinstance(layer.mlp, hf_llama.LlamaMLP)
    x = hidden(4)
    with torch.no_grad():
        expected = layer.mlp(torch.tensor(x))
    within(block.mlp(jnp.asarray(x)), expected)


def test_decoder_block(pair: Pair) -> None:
    block, layer, model = pair
    assert isinstance(layer, hf_llama.LlamaDecoderLayer)
    x, pos = hidden(5), positions(REAL)
    out, _ = block(jnp.asarray(x), jnp.asarray(pos), llama.causal_mask(jnp.asarray(pos), None, jnp.asarray(REAL > 0)))
    with torch.no_grad():
        expected = layer(torch.tensor(x), attention_mask=additive_mask(REAL),
                         position_embeddings=rotary(model, torch.tensor(x), pos))
    within(out, expected)


def test_smollm2_block0(smollm2, hf_smollm2, smollm2_batch) -> None:
    """Block 0 of SmolLM2-135M (real weights, both loaded from the same GGUF) on its own embedded prompts."""
    ids, real = smollm2_batch
    pos = positions(real)
    layer = hf_smollm2.model.layers[0]
    implementation = hf_smollm2.config._attn_implementation
    hf_smollm2.config._attn_implementation = "eager"  # the session's model: restored below
    try:
        with torch.no_grad():
            x = hf_smollm2.model.embed_tokens(torch.tensor(ids, dtype=torch.long))
            expected = layer(x, attention_mask=additive_mask(real), position_embeddings=rotary(hf_smollm2, x, pos))
    finally:
        hf_smollm2.config._attn_implementation = implementation
    jpos = jnp.asarray(pos)
    mask = llama.causal_mask(jpos, None, jnp.asarray(real > 0))
    out, _ = smollm2.module.layers[0](jnp.asarray(x.numpy()), jpos, mask)
    # Block 0's MLP writes outliers near 30, where a float32 ulp is 2e-6: TOL relative there, absolute elsewhere.
    np.testing.assert_allclose(np.asarray(out), expected.numpy(), rtol=TOL, atol=TOL)
