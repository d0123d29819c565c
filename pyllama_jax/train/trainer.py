"""The optax training step: masked cross-entropy, gradient accumulation, AdamW with warmup + cosine.

A model is split once into the trainable variables (every `nnx.Param` for full fine-tuning, only
`LoRAParam` adapters for LoRA) and everything else (frozen weights, packed quantized weights, RNG
state). Only the trainable part is differentiated, optimized and checkpointed. Parameters keep
their storage dtype (float32 master weights) while the model computes in `config.dtype`.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from pyllama_jax.data.alpaca import IGNORE
from pyllama_jax.model.llama import Llama
from pyllama_jax.model import place
from pyllama_jax.sharding.rules import logical_to_spec, replicated
from pyllama_jax.train.lora import LoRAParam

BATCH_KEYS = ("tokens", "targets", "segment_ids")  # the arrays of a batch (`data.alpaca.Rows.take`)


@dataclasses.dataclass(frozen=True)
class OptimConfig:
    """AdamW with linear warmup then cosine decay, global-norm clipping and accumulation."""

    steps: int = 300  # optimizer steps in the whole run
    lr: float = 2e-4  # peak learning rate
    warmup_steps: int = 20  # linear warmup from 0 to `lr`
    end_lr_ratio: float = 0.1  # cosine decays to lr * end_lr_ratio at `steps`
    weight_decay: float = 0.0  # AdamW decay of matrices (never of norms)
    b1: float = 0.9  # Adam first-moment decay
    b2: float = 0.999  # Adam second-moment decay
    clip_norm: float = 1.0  # global gradient-norm clip; 0 = off
    grad_accum: int = 1  # micro-batches per optimizer step
    seed: int = 0  # dropout RNG seed


def schedule(c: OptimConfig) -> optax.Schedule:
    return optax.warmup_cosine_decay_schedule(0.0, c.lr, c.warmup_steps, max(c.steps, c.warmup_steps + 1),
                                              c.lr * c.end_lr_ratio)


def optimizer(c: OptimConfig) -> optax.GradientTransformation:
    decay_mask = lambda params: jax.tree.map(lambda p: p.ndim >= 2, params)
    adamw = optax.adamw(schedule(c), c.b1, c.b2, weight_decay=c.weight_decay, mask=decay_mask)
    return optax.chain(optax.clip_by_global_norm(c.clip_norm), adamw) if c.clip_norm > 0 else adamw


def masked_nll(logits: jax.Array, targets: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Sum of next-token negative log-likelihoods over positions with a target, and their count."""
    valid = targets != IGNORE
    nll = optax.softmax_cross_entropy_with_integer_labels(logits, jnp.where(valid, targets, 0))
    return jnp.sum(jnp.where(valid, nll, 0.0)), jnp.sum(valid)


def _has_dropout(model: nnx.Module) -> bool:
    return any(isinstance(m, nnx.Dropout) for _, m in nnx.iter_graph(model))


class Trainer:
    """Holds the split model and the optimizer state; `step` runs one jitted optimizer step.

    `lora=True` trains only the adapters. With a `mesh`, the model must already be placed on it
    (`sharding.place.shard`): the optimizer state follows the parameters' shardings and batch
    rows are split over the data axes (`batch` in the sharding rules).
    """

    def __init__(self, model: Llama, optim: OptimConfig, lora: bool, mesh: Mesh | None = None):
        self.optim, self.mesh = optim, mesh
        trainable = LoRAParam if lora else nnx.Param
        self.eval_graphdef, self.params, self.frozen = nnx.split(model, trainable, ...)
        train_view = nnx.view(model, deterministic=False) if _has_dropout(model) else model
        self.train_graphdef = nnx.split(train_view, trainable, ...)[0]
        if not jax.tree.leaves(self.params):
            raise ValueError("the model has no trainable parameters (LoRA without adapters?)")
        self.tx = optimizer(optim)
        self.lr = schedule(optim)
        shardings = lambda tree: jax.tree.map(lambda x: x.sharding, tree)
        commit = lambda tree: jax.device_put(tree, shardings(tree))  # as the step's outputs will be
        self.params, self.frozen = commit(self.params), commit(self.frozen)
        ps, fs = shardings(self.params), shardings(self.frozen)
        if mesh is None:
            self.opt_state = commit(jax.jit(self.tx.init)(self.params))
        else:  # Adam's moments are sharded like their parameters, counters replicated
            os_ = optax.tree_map_params(self.tx, lambda _, s: s, jax.eval_shape(self.tx.init, self.params), ps,
                                        transform_non_params=lambda _: replicated(mesh))
            self.opt_state = jax.jit(self.tx.init, out_shardings=os_)(self.params)
        os_ = shardings(self.opt_state)
        rows = None if mesh is None else NamedSharding(mesh, logical_to_spec(("batch", "length")))
        micro_rows = None if mesh is None else NamedSharding(mesh, PartitionSpec(None, *rows.spec))
        batch = lambda s: {k: s for k in BATCH_KEYS}
        self._step = place.jit(self._step_fn, mesh, (ps, os_, fs, batch(micro_rows), replicated(mesh)),
                               (ps, os_, replicated(mesh)), donate_argnums=(0, 1))
        self._eval = place.jit(self._eval_fn, mesh, (ps, fs, batch(rows)), replicated(mesh))

    # --- pure functions (traced) ---

    def _nll(self, params, frozen, batch, graphdef, key=None):
        model = nnx.merge(graphdef, params, frozen, copy=True)  # fresh variables: reseed may mutate them
        if key is not None:
            nnx.reseed(model, dropout=key)
        logits, _ = model(batch["tokens"], segment_ids=batch["segment_ids"])
        return masked_nll(logits, batch["targets"])

    def _step_fn(self, params, opt_state, frozen, batch, step):
        key = jax.random.fold_in(jax.random.key(self.optim.seed), step)

        def micro(carry, xs):
            i, mb = xs
            (nll, n), g = jax.value_and_grad(self._nll, has_aux=True)(
                params, frozen, mb, self.train_graphdef, jax.random.fold_in(key, i))
            return jax.tree.map(jnp.add, carry, (nll, n, g)), None

        zero = (jnp.zeros((), jnp.float32), jnp.zeros((), jnp.int32), jax.tree.map(jnp.zeros_like, params))
        accum = batch["tokens"].shape[0]
        (nll, n, grads), _ = jax.lax.scan(micro, zero, (jnp.arange(accum), batch))
        denom = jnp.maximum(n, 1).astype(jnp.float32)
        grads = jax.tree.map(lambda g: g / denom, grads)
        updates, opt_state = self.tx.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        metrics = {"loss": nll / denom, "grad_norm": optax.global_norm(grads), "loss_tokens": n,
                   "lr": self.lr(step)}
        return params, opt_state, metrics

    def _eval_fn(self, params, frozen, batch):
        return self._nll(params, frozen, batch, self.eval_graphdef)

    # --- host side ---

    def step(self, batch: dict[str, np.ndarray], step: int) -> dict[str, Any]:
        """One optimizer step on `batch` (rows split into `grad_accum` micro-batches); its metrics."""
        rows, accum = len(batch["tokens"]), self.optim.grad_accum
        if rows % accum:
            raise ValueError(f"train.batch_size={rows} is not divisible by train.grad_accum={accum}")
        micro = {k: v.reshape(accum, rows // accum, *v.shape[1:]) for k, v in batch.items()}
        self.params, self.opt_state, metrics = self._step(self.params, self.opt_state, self.frozen, micro,
                                                          np.int32(step))
        return metrics

    def eval_loss(self, batches: list[dict[str, np.ndarray]]) -> float:
        """Mean next-token loss over every target token of `batches` (no dropout)."""
        total, count = 0.0, 0
        for batch in batches:
            nll, n = self._eval(self.params, self.frozen, batch)
            total, count = total + float(nll), count + int(n)
        return total / max(count, 1)

    def model(self) -> Llama:
        """The model with the current trainable parameters, without dropout (for generation)."""
        return nnx.merge(self.eval_graphdef, self.params, self.frozen)
