"""The model against HF transformers' PyTorch LlamaForCausalLM: real SmolLM2 weights and tiny random ones."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import pyllama_jax as pj
from pyllama_jax.model.config import RopeScaling, preset
from pyllama_jax.model.kv_cache import KVCache
from pyllama_jax.model.llama import init_model
from pyllama_jax.model.params import build_model

PROMPTS = ["The capital of France is",
           "Once upon a time, in a small village at the edge of a great forest, there lived an old",
           "def fibonacci(n):\n    "]


def hf_logits(hf, ids: list[int] | np.ndarray, mask=None) -> np.ndarray:
    x = torch.tensor(np.asarray(ids))
    x = x[None] if x.ndim == 1 else x
    with torch.no_grad():
        m = None if mask is None else torch.tensor(np.asarray(mask))
        return hf(x, attention_mask=m).logits.numpy()


@pytest.mark.parametrize("prompt", PROMPTS)
def test_smollm2_logits_match_transformers(smollm2, hf_smollm2, prompt):
    ids = smollm2.tokenizer.encode(prompt)
    ours = np.asarray(smollm2.logits(ids))
    np.testing.assert_allclose(ours, hf_logits(hf_smollm2, ids), atol=1e-3, rtol=0)


@pytest.mark.parametrize("side", ["left", "right"])
def test_smollm2_padded_batch_matches_transformers(smollm2, hf_smollm2, side):
    rows = [smollm2.tokenizer.encode(p) for p in PROMPTS]
    width = max(len(r) for r in rows)
    ids = np.zeros((len(rows), width), np.int32)
    mask = np.zeros_like(ids)
    for i, r in enumerate(rows):
        sl = slice(width - len(r), width) if side == "left" else slice(0, len(r))
        ids[i, sl], mask[i, sl] = r, 1
    ours = np.asarray(smollm2.logits(ids, attention_mask=mask))
    ref = hf_logits(hf_smollm2, ids, mask)
    real = mask.astype(bool)
    np.testing.assert_allclose(ours[real], ref[real], atol=1e-3, rtol=0)


def hf_greedy(hf, ids: list[int], n: int) -> list[int]:
    """n greedy tokens from HF's model, straight argmax (no logits processors)."""
    x, out = torch.tensor([ids]), []
    with torch.no_grad():
        res = hf(x, use_cache=True)
        for _ in range(n):
            nxt = int(res.logits[0, -1].argmax())
            out.append(nxt)
            res = hf(torch.tensor([[nxt]]), past_key_values=res.past_key_values, use_cache=True)
    return out


def test_smollm2_greedy_continuation_matches_transformers(smollm2, hf_smollm2):
    # A batch of different lengths generated together must equal HF's one-by-one greedy output.
    gen = smollm2.generate(PROMPTS, max_new_tokens=32, ignore_eos=True)
    for prompt, ours in zip(PROMPTS, gen.tokens):
        assert ours == hf_greedy(hf_smollm2, smollm2.tokenizer.encode(prompt), 32)


def test_bfloat16_compute_stays_close_to_float32(smollm2):
    bf16 = pj.load("smollm2-135m", dtype="bfloat16", param_dtype="bfloat16")
    ids = smollm2.tokenizer.encode(PROMPTS[1])
    ref, low = np.asarray(smollm2.logits(ids))[0], np.asarray(bf16.logits(ids))[0]
    # Stated tolerance: bf16 has an 8-bit mantissa; through 30 layers logits move by <= 5% of
    # their range and the most likely next token agrees at >= 90% of positions.
    assert np.abs(low - ref).max() <= 0.05 * (ref.max() - ref.min())
    assert np.mean(low.argmax(-1) == ref.argmax(-1)) >= 0.9
    text = bf16.generate("The capital of France is", max_new_tokens=8).texts[0]
    assert "Paris" in text


def _tiny_hf_pair(rope_scaling: RopeScaling | None, tie: bool):
    """A random tiny HF LlamaForCausalLM and our model built from its state dict."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = preset("tiny", rope_scaling=rope_scaling, tie_embeddings=tie, rope_theta=500000.0,
                 max_seq_len=64)
    hf_cfg = LlamaConfig(vocab_size=cfg.vocab_size, hidden_size=cfg.dim, intermediate_size=cfg.hidden_dim,
                         num_hidden_layers=cfg.n_layers, num_attention_heads=cfg.n_heads,
                         num_key_value_heads=cfg.kv_heads, rms_norm_eps=cfg.norm_eps,
                         rope_theta=cfg.rope_theta, max_position_embeddings=cfg.max_seq_len,
                         tie_word_embeddings=tie,
                         rope_scaling=None if rope_scaling is None else {
                             "rope_type": "llama3", "factor": rope_scaling.factor,
                             "low_freq_factor": rope_scaling.low_freq_factor,
                             "high_freq_factor": rope_scaling.high_freq_factor,
                             "original_max_position_embeddings": rope_scaling.original_max_position_embeddings})
    torch.manual_seed(0)
    hf = LlamaForCausalLM(hf_cfg).eval()
    with torch.no_grad():  # non-trivial norms, so a misplaced scale shows
        for name, p in hf.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
    names = {"self_attn.q_proj": "attn.q", "self_attn.k_proj": "attn.k", "self_attn.v_proj": "attn.v",
             "self_attn.o_proj": "attn.o", "mlp.gate_proj": "mlp.gate", "mlp.up_proj": "mlp.up",
             "mlp.down_proj": "mlp.down"}

    def tensors():
        for k, v in hf.state_dict().items():
            a = v.numpy()
            if k == "model.embed_tokens.weight":
                yield "embed", a
            elif k == "model.norm.weight":
                yield "norm.scale", a
            elif k == "lm_head.weight":
                if not tie:
                    yield "lm_head.kernel", a.T
            else:
                _, _, i, rest = k.split(".", 3)
                rest = rest.removesuffix(".weight")
                if rest == "input_layernorm":
                    yield f"layers.{i}.attn_norm.scale", a
                elif rest == "post_attention_layernorm":
                    yield f"layers.{i}.mlp_norm.scale", a
                else:
                    yield f"layers.{i}.{names[rest]}.kernel", a.T

    return hf, build_model(cfg, tensors(), "tiny-hf")


@pytest.mark.parametrize("rope_scaling,tie", [(None, False), (RopeScaling(factor=8.0, original_max_position_embeddings=16), True)])
def test_tiny_random_model_matches_transformers(rope_scaling, tie):
    hf, ours = _tiny_hf_pair(rope_scaling, tie)
    ids = np.random.default_rng(1).integers(0, 256, (2, 48))
    logits, _ = ours(ids)
    np.testing.assert_allclose(np.asarray(logits), hf_logits(hf, ids), atol=2e-5, rtol=1e-4)


def test_kv_cache_decode_equals_full_forward():
    import jax
    from flax import nnx

    model = init_model(preset("tiny"), seed=3)
    graphdef, state = nnx.split(model)
    # jitted (eager dispatch of every op took most of this test's time): full forward, prefill, one step
    run = jax.jit(lambda s, ids, pos, cache: nnx.merge(graphdef, s)(ids, pos, cache))
    ids = np.random.default_rng(2).integers(0, 256, (2, 20)).astype(np.int32)
    full, _ = jax.jit(lambda s, ids: nnx.merge(graphdef, s)(ids))(state, ids)
    cache = KVCache.create(model.config, 2, 32)
    pos = np.broadcast_to(np.arange(12), (2, 12))
    step, cache = run(state, ids[:, :12], pos, cache)
    outs = [step]
    for t in range(12, 20):
        step, cache = run(state, ids[:, t:t + 1], np.full((2, 1), t), cache)
        outs.append(step)
    np.testing.assert_allclose(np.concatenate([np.asarray(o) for o in outs], 1), np.asarray(full),
                               atol=1e-5, rtol=1e-5)
