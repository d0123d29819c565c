"""Sharding packed quantized weights consistently with the dense kernels they replace.

A `QuantLinear`'s arrays take the logical axes `(input, output)` of the dense kernel at the same
path: `qweight[in*bits/32, out]`, `scales[groups, out]`, `qzeros[groups, out*bits/32]` and
`g_idx[in]` split together, so a column-parallel layer splits along its output and a
row-parallel one along its input at group (and packed word) boundaries. With a single group
(groupsize -1) the scales and zeros are replicated along it, as every input shard needs them.
"""
from __future__ import annotations

import functools
from typing import Mapping

from flax import nnx

from pyllama_jax.model.config import ModelConfig
from pyllama_jax.model.llama import Block, Llama, abstract_model
from pyllama_jax.quant.qlinear import QuantLinear
from pyllama_jax.sharding import rules as sr

PACKED = ("qweight", "scales", "qzeros", "g_idx")


def quantized_modules(model: Llama) -> dict[str, QuantLinear]:
    """Every `QuantLinear` of `model` by dotted path."""
    return {".".join(str(p) for p in path): m for path, m in nnx.iter_graph(model) if isinstance(m, QuantLinear)}


@functools.lru_cache(maxsize=8)
def _kernel_axes_table(config: ModelConfig) -> dict[str, tuple[str, ...]]:
    """Dense linear path -> logical axes of its kernel: `lm_head` from a model without layers, and
    `attn.q`, ... from one decoder block (all blocks are alike), both abstract."""
    table = {}
    for prefix, module in (("", abstract_model(config.replace(n_layers=0))),
                           ("layers.", nnx.eval_shape(lambda: Block(config, nnx.Rngs(0))))):
        for path, var in nnx.to_flat_state(nnx.state(module)):
            if path[-1] == "kernel":
                table[prefix + ".".join(str(p) for p in path[:-1])] = var.get_metadata()["logical_axes"]
    return table


def _kernel_axes(config: ModelConfig, path: str) -> tuple[str, ...]:
    """Logical axes of the dense kernel a quantized module at `path` stands for: the linear at
    `path` or, for a wrapped one (a LoRA adapter's `base`), above it."""
    table = _kernel_axes_table(config)
    parts = path.split(".")
    key = ".".join(["layers", *parts[2:]] if parts[0] == "layers" else parts)
    while key and key not in table:
        key = key.rpartition(".")[0]
    if not key or key == "layers":
        raise ValueError(f"{path}: no dense linear of the model at or above this path, so its packed "
                         "weights have no logical axes to shard by")
    return table[key]


def annotate(model: Llama) -> Llama:
    """Give each packed array without `logical_axes` those of the dense kernel it replaced (in place)."""
    for path, module in quantized_modules(model).items():
        kernel_axes = _kernel_axes(model.config, path)
        for field in PACKED:
            var = getattr(module, field)
            if var.get_metadata().get("logical_axes"):
                continue
            shape = var.get_value().shape
            logical = tuple(kernel_axes[:len(shape)])
            if field in ("scales", "qzeros") and shape[0] == 1:
                logical = (None, *logical[1:])
            var.set_metadata("logical_axes", logical)
    return model


def check(model: Llama, mesh_shape: Mapping[str, int], rules: sr.Rules = sr.RULES) -> None:
    """Raise, naming the layer, where the mesh cannot split a weight's groups at shard boundaries.

    (Packed words and other dimensions are checked, like every parameter, by `rules.checked_spec`.)
    """
    for path, m in quantized_modules(model).items():
        in_axis = m.qweight.get_metadata()["logical_axes"][0]
        ways = sr.split_ways(in_axis, mesh_shape, rules)
        n_groups = m.scales.get_value().shape[0]
        if n_groups > 1 and n_groups % ways:
            raise ValueError(
                f"{path} ({m.bits}-bit, groupsize {m.groupsize}): its {n_groups} quantization groups cannot "
                f"be split {ways} ways along its {m.in_features} inputs (logical axis {in_axis!r}); choose a "
                f"groupsize giving a multiple of {ways} groups, or a mesh that splits {in_axis!r} fewer ways")
