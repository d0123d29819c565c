"""LoRA: low-rank adapters beside frozen linear layers, `y = base(x) + (alpha / r) * dropout(x) @ A @ B`.

`apply_lora` swaps a `LoRALinear` in for each targeted layer of a model (dense `Linear` or
`QuantLinear` alike: both are called as `lin(x)`). Adapter weights are `LoRAParam` variables, so
`nnx` filters pick them out: only they are differentiated and optimized. `merge_lora` folds the
adapters back into dense kernels (dequantizing a quantized base) and leaves a plain model that
any exporter can save.
"""
from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from pyllama_jax.model.config import ModelConfig
from pyllama_jax.model.llama import Linear, Llama, abstract_model
from pyllama_jax.model.params import LAYER_LINEARS
from pyllama_jax.model.packing import dequantize
from pyllama_jax.model.qlinear import QuantLinear, get_module, set_linear


class LoRAParam(nnx.Param):
    """A low-rank adapter weight (the only trainable variables of LoRA fine-tuning)."""


class LoRALinear(nnx.Module):
    """A frozen linear layer plus a trainable low-rank update (B starts at zero: no change at init)."""

    def __init__(self, base: nnx.Module, shape: tuple[int, int], axes: tuple[str, str], rank: int, alpha: float,
                 dropout: float, *, rngs: nnx.Rngs):
        """`shape` is the base's `(in_features, out_features)`, `axes` their logical axis names."""
        (in_f, out_f), (in_axis, out_axis) = shape, axes
        self.base, self.axes = base, axes
        bound = 1.0 / in_f ** 0.5  # PEFT's kaiming-uniform(a=sqrt(5)) for A
        self.a = LoRAParam(jax.random.uniform(rngs.params(), (in_f, rank), jnp.float32, -bound, bound),
                           logical_axes=(in_axis, None))
        self.b = LoRAParam(jnp.zeros((rank, out_f), jnp.float32), logical_axes=(None, out_axis))
        self.scale = alpha / rank
        self.dropout = nnx.Dropout(dropout, deterministic=True, rngs=rngs) if dropout > 0 else None

    def __call__(self, x: jax.Array) -> jax.Array:
        y = self.base(x)
        h = x if self.dropout is None else self.dropout(x)
        h = jnp.dot(jnp.dot(h.astype(y.dtype), self.a[...].astype(y.dtype)), self.b[...].astype(y.dtype))
        return y + (self.scale * h).astype(y.dtype)

    def merged(self, config: ModelConfig) -> Linear:
        """A dense `Linear` with kernel `W + scale * A @ B` (a quantized `W` is dequantized first)."""
        return _dense(_kernel(self.base) + self.scale * (self.a[...] @ self.b[...]), self.axes, config)


def _kernel(lin: nnx.Module) -> jax.Array:
    """The float32 `[in, out]` weight of a dense or quantized linear layer."""
    return lin.kernel[...].astype(jnp.float32) if isinstance(lin, Linear) else dequantize(lin.weight)


def _dense(kernel: jax.Array, axes: tuple[str, str], config: ModelConfig) -> Linear:
    out = nnx.eval_shape(lambda: Linear(*kernel.shape, axes, config=config, rngs=nnx.Rngs(0)))
    out.kernel = nnx.Param(kernel.astype(config.weight_dtype), logical_axes=axes)
    return out


def check_targets(targets: Sequence[str]) -> tuple[str, ...]:
    bad = [t for t in targets if t not in LAYER_LINEARS]
    if bad or not targets:
        raise ValueError(f"train.lora_targets={tuple(targets)!r}: expected a non-empty subset of {LAYER_LINEARS}")
    return tuple(targets)


def apply_lora(model: Llama, targets: Sequence[str], rank: int, alpha: float, dropout: float = 0.0,
               seed: int = 0) -> Llama:
    """Wrap the `targets` linears (e.g. "attn.q", "mlp.down") of every layer in place; returns `model`."""
    if rank < 1:
        raise ValueError(f"train.lora_rank={rank}; expected a positive integer")
    if not 0 <= dropout < 1:
        raise ValueError(f"train.lora_dropout={dropout}; expected a value in [0, 1)")
    rngs = nnx.Rngs(params=seed, dropout=seed)
    dense = abstract_model(model.config)  # shapes and logical axes of the dense layers
    for i in range(model.config.n_layers):
        for target in check_targets(targets):
            path = f"layers.{i}.{target}"
            base, kernel = get_module(model, path), get_module(dense, path).kernel
            if isinstance(base, LoRALinear):
                raise ValueError(f"{path} already has a LoRA adapter")
            set_linear(model, path, LoRALinear(base, kernel.shape, kernel.get_metadata()["logical_axes"], rank,
                                               alpha, dropout, rngs=rngs))
    return model


def merge_lora(model: Llama) -> Llama:
    """Fold every adapter into its layer's kernel, in place, and dequantize any quantized linear
    left: the result is a plain dense model that every exporter can save."""
    dense = abstract_model(model.config)
    for kind in (LoRALinear, QuantLinear):  # adapters first: they dequantize their own base
        for path, lin in [(p, m) for p, m in nnx.iter_graph(model) if isinstance(m, kind)]:
            name = ".".join(map(str, path))
            axes = get_module(dense, name).kernel.get_metadata()["logical_axes"]
            set_linear(model, name, lin.merged(model.config) if kind is LoRALinear
                       else _dense(_kernel(lin), axes, model.config))
    return model
