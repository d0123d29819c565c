"""The training step: overfitting, the loss against numpy, accumulation, mixed precision, schedule."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax

from pyllama_jax.data import alpaca
from tests.models import random_model
from pyllama_jax.train.trainer import OptimConfig, Trainer, masked_nll, optimizer, schedule

EXAMPLES = [alpaca.Example("Add.", "2 3", "5"), alpaca.Example("Greet.", "", "hello"),
            alpaca.Example("Colour?", "", "blue sky"), alpaca.Example("Opposite.", "up", "down"),
            alpaca.Example("Count.", "", "1 2 3"), alpaca.Example("Animal?", "", "a cat"),
            alpaca.Example("Echo.", "zz", "zz"), alpaca.Example("Day?", "", "monday")]


def _rows(model, examples, pack=False, seq_len=48):
    seqs, stats = alpaca.tokenize(examples, model.tokenizer, "chat", seq_len)  # short "user: ..." prompts
    assert stats.dropped == 0
    return alpaca.layout(seqs, seq_len, pack)


def _params(trainer: Trainer) -> list[np.ndarray]:
    return [np.asarray(x) for x in jax.tree.leaves(trainer.params)]


def test_loss_equals_numpy_masked_cross_entropy_then_tiny_model_overfits():
    """The trainer's loss on a padded batch == a float64 numpy cross-entropy over response tokens
    only (logits from the model's plain padded call, mask rebuilt from prompt lengths); then the
    same trainer drives the loss on these 4 examples down by more than 90%."""
    m = random_model("tiny", seed=3)
    batch = _rows(m, EXAMPLES[:4]).take(np.arange(4))
    mask = (batch["segment_ids"] > 0).astype(np.int32)
    logits = np.asarray(m.module(jnp.asarray(batch["tokens"]), attention_mask=jnp.asarray(mask))[0], np.float64)
    top = logits.max(-1, keepdims=True)
    logp = logits - top - np.log(np.exp(logits - top).sum(-1, keepdims=True))
    total, count = 0.0, 0
    for r, ex in enumerate(EXAMPLES[:4]):
        n_prompt = len(m.tokenizer.encode(alpaca.prompt_text(ex, m.tokenizer, "chat")))
        ids = batch["tokens"][r, :mask[r].sum()]
        assert m.tokenizer.decode(ids[n_prompt:]) == ex.output
        for i in range(n_prompt - 1, len(ids) - 1):
            total -= logp[r, i, ids[i + 1]]
            count += 1
    expected = total / count
    trainer = Trainer(m.module, OptimConfig(steps=60, lr=1e-2, warmup_steps=5), lora=False)
    np.testing.assert_allclose(trainer.eval_loss([batch]), expected, rtol=2e-6)
    losses = [float(trainer.step(batch, s)["loss"]) for s in range(60)]
    np.testing.assert_allclose(losses[0], expected, rtol=2e-6)  # the loss before the first update
    assert losses[-1] < 0.1 * losses[0], losses[::10]
    # The trained model now answers a training prompt with its response.
    from pyllama_jax.api import Model

    out = Model(trainer.model(), m.tokenizer).generate(alpaca.prompt_text(EXAMPLES[1], m.tokenizer, "chat"),
                                                      max_new_tokens=8)
    assert out.texts[0] == "hello"


def test_gradient_accumulation_matches_one_large_batch():
    m = random_model("tiny", seed=1)
    rows = _rows(m, EXAMPLES)
    batch = rows.take(np.arange(8))
    runs, lr, steps = [], 1e-3, 3
    for accum in (1, 4):
        model = random_model("tiny", seed=1).module
        trainer = Trainer(model, OptimConfig(steps=steps, lr=lr, warmup_steps=0, grad_accum=accum), lora=False)
        losses = [float(trainer.step(batch, s)["loss"]) for s in range(steps)]
        runs.append((losses, _params(trainer)))
    np.testing.assert_allclose(runs[0][0], runs[1][0], rtol=1e-5)
    # The two runs sum the same gradients in another order (float32 rounding, ~1e-7 relative), and
    # Adam's normalised update moves each weight by up to `lr` a step: require the updates to agree
    # to 1% of their size. A wrong accumulation (a micro-batch dropped or counted twice) changes
    # them by a good part of `lr`; summation order alone moved one of 4,096 weights by 1.03e-6.
    for a, b in zip(runs[0][1], runs[1][1]):
        np.testing.assert_allclose(a, b, atol=0.01 * lr * steps, rtol=0)


def test_bfloat16_compute_keeps_float32_master_weights():
    batch = _rows(random_model("tiny"), EXAMPLES[:4]).take(np.arange(4))
    f32 = random_model("tiny", seed=2).module
    l32 = masked_nll(f32(jnp.asarray(batch["tokens"]), segment_ids=jnp.asarray(batch["segment_ids"]))[0],
                     jnp.asarray(batch["targets"]))
    bf16 = Trainer(random_model("tiny", seed=2, dtype="bfloat16", param_dtype="float32").module,
                   OptimConfig(steps=2, lr=1e-3, warmup_steps=0), lora=False)
    before = _params(bf16)
    l16 = float(bf16.step(batch, 0)["loss"])
    l32 = float(l32[0] / l32[1])
    assert abs(l32 - l16) < 2e-2 * l32 and l32 != l16  # computed in bf16, close to f32
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(bf16.params))
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(bf16.opt_state) if jnp.ndim(x) > 0)
    # Updates of ~lr=1e-3 survive in float32 masters (bf16 storage would round most of them away).
    changed = [np.mean(a != b) for a, b in zip(before, _params(bf16)) if a.ndim == 2 and a.shape[0] != 257]
    assert len(changed) == 15 and min(changed) > 0.9  # 2 layers x 7 linears + lm_head


def test_schedule_warmup_then_cosine():
    c = OptimConfig(steps=50, lr=1e-3, warmup_steps=10, end_lr_ratio=0.1)
    lr = schedule(c)
    assert float(lr(0)) == 0.0 and np.isclose(float(lr(5)), 5e-4) and np.isclose(float(lr(10)), 1e-3)
    assert np.isclose(float(lr(30)), 1e-4 + 0.5 * (1e-3 - 1e-4) * (1 + np.cos(np.pi * 20 / 40)))
    assert np.isclose(float(lr(50)), 1e-4)


def test_clipping_bounds_the_gradient_adam_sees():
    params = {"w": jnp.zeros((3, 4))}
    grads = {"w": jnp.full((3, 4), 5.0)}  # global norm sqrt(12) * 5
    tx = optimizer(OptimConfig(clip_norm=1.0, b1=0.9))
    state = tx.init(params)
    _, state = tx.update(grads, state, params)
    mu = state[1][0].mu["w"]  # adamw's first moment = (1 - b1) * clipped gradient
    np.testing.assert_allclose(float(optax.global_norm(mu)), 0.1, rtol=1e-6)
