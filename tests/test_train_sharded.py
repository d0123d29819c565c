"""Sharded fine-tuning on 8 simulated CPU devices matches single-device fine-tuning step by step.

XLA fixes the CPU device count when JAX starts, so the cases run in a fresh subprocess
(`python tests/test_train_sharded.py`) with 8 devices and LLVM optimisation off (both the
reference and the sharded runs use the same flags).
"""
from __future__ import annotations

import os
import subprocess
import sys

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = 3
LR = 1e-2
RTOL = 2e-5  # losses
# Parameters: Adam turns each gradient into a step of about +-lr, so a summation-order difference
# in a near-zero gradient moves that weight visibly; allow 1% of the largest possible move.
PARAM_ATOL = 0.01 * LR * STEPS


def test_sharded_training_matches_single_device():
    flags = "--xla_force_host_platform_device_count=8 --xla_backend_optimization_level=0"
    env = dict(os.environ, XLA_FLAGS=flags, JAX_PLATFORMS="cpu",
               PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, os.path.abspath(__file__)], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, f"{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    assert proc.stdout.count("ok ") == 2, proc.stdout


def _train(model, batch, lora: bool, accum: int, mesh=None):
    from pyllama_jax.model import place
    from pyllama_jax.train.trainer import OptimConfig, Trainer

    if mesh is not None:
        model = place.shard(model, mesh)
    trainer = Trainer(model, OptimConfig(steps=STEPS, lr=LR, warmup_steps=0, grad_accum=accum), lora=lora,
                      mesh=mesh)
    losses = [float(trainer.step(batch, s)["loss"]) for s in range(STEPS)]
    return trainer, losses


def main() -> None:
    import jax

    from pyllama_jax.data import alpaca
    from pyllama_jax.sharding import mesh as pm
    from pyllama_jax.train import lora as lora_lib
    from tests.models import random_model

    assert jax.device_count() == 8
    examples = [alpaca.Example(f"Repeat {w}.", "", f"{w} {w}") for w in
                ("red", "green", "blue", "cyan", "pink", "gold", "grey", "teal")]
    cases = [  # (mesh data/fsdp/tensor, lora, grad_accum)
        ((2, 4, 1), False, 1),  # data parallel + fsdp, full fine-tuning
        ((2, 2, 2), True, 2),  # data + fsdp + tensor, LoRA with dropout, accumulation
    ]
    for shape, lora, accum in cases:
        def build():
            m = random_model("tiny", seed=4, n_heads=8, n_kv_heads=8, vocab_size=264)
            if lora:
                lora_lib.apply_lora(m.module, ("attn.q", "attn.v", "mlp.up"), 4, 8.0, dropout=0.1)
            return m

        m = build()
        seqs, _ = alpaca.tokenize(examples, m.tokenizer, "chat", 32)
        batch = alpaca.layout(seqs, 32, pack=False).take(np.arange(8))
        ref, ref_losses = _train(m.module, batch, lora, accum)
        mesh = pm.make_mesh(*shape)
        sharded, losses = _train(build().module, batch, lora, accum, mesh)
        np.testing.assert_allclose(losses, ref_losses, rtol=RTOL)
        diffs = [np.abs(np.asarray(a) - np.asarray(b)) for a, b in
                 zip(jax.tree.leaves(sharded.params), jax.tree.leaves(ref.params), strict=True)]
        worst, median = max(float(d.max()) for d in diffs), float(np.median(np.concatenate([d.ravel() for d in diffs])))
        assert worst < PARAM_ATOL and median < 1e-7, (shape, worst, median)
        # Parameters and Adam moments really are split across devices (fsdp over `embed`).
        mu = sharded.opt_state[1][0].mu  # clip, then adamw = (scale_by_adam, ...)
        kernel = (sharded.params if not lora else sharded.frozen)["layers"][0]["attn"]["o"]["kernel"]
        assert kernel[...].addressable_shards[0].data.shape == (64 // shape[2], 64 // shape[1]), kernel[...].sharding
        assert len({str(s.index) for s in jax.tree.leaves(mu)[0].addressable_shards}) > 1
        print(f"ok mesh {shape} lora={lora} accum={accum}: losses {np.round(losses, 4).tolist()}, "
              f"parameter difference max {worst:.1e}, median {median:.1e}")


if __name__ == "__main__":
    main()
