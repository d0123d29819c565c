"""The quantized linear layer, its matmul dispatch, and swapping it into a model.

`qmatmul(x, qw, kernel)` is the one entry point for `x @ W` with a packed `QuantWeight`:
"xla" dequantizes then multiplies (the reference); "pallas" runs the kernel of
`pyllama_jax/quant/kernels/dequant_matmul.py` where it applies (GPU, supported shapes).
"""
from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
from flax import nnx

from pyllama_jax.quant.packing import QuantWeight, dequantize

LAYER_LINEARS = ("attn.q", "attn.k", "attn.v", "attn.o", "mlp.gate", "mlp.up", "mlp.down")


def _xla_qmatmul(x: jax.Array, qw: QuantWeight) -> jax.Array:
    return jnp.dot(x, dequantize(qw, x.dtype))


def _pallas_qmatmul(x: jax.Array, qw: QuantWeight) -> jax.Array:
    from pyllama_jax.quant.kernels import dequant_matmul  # Pallas is imported only when chosen

    return dequant_matmul.qmatmul(x, qw, _xla_qmatmul)  # warns and falls back where it cannot run


KERNELS: dict[str, Callable[[jax.Array, QuantWeight], jax.Array]] = {"xla": _xla_qmatmul, "pallas": _pallas_qmatmul}


def qmatmul(x: jax.Array, qw: QuantWeight, kernel: str = "xla") -> jax.Array:
    """`x[..., in] @ W[in, out]` for a packed weight, with the named kernel."""
    if kernel not in KERNELS:
        raise ValueError(f"quantized matmul kernel {kernel!r} is not available; expected one of {sorted(KERNELS)}")
    return KERNELS[kernel](x, qw)


class QuantParam(nnx.Variable):
    """An array of a packed quantized weight (not trainable)."""


class QuantLinear(nnx.Module):
    """A bias-free linear layer over a packed weight; called like `Linear`: `y = x @ W`."""

    def __init__(self, qw: QuantWeight, dtype=jnp.float32, kernel: str = "xla"):
        self.qweight = QuantParam(qw.qweight)
        self.scales = QuantParam(qw.scales)
        self.qzeros = QuantParam(qw.qzeros)
        self.g_idx = QuantParam(qw.g_idx)
        self.bits, self.groupsize, self.in_features = qw.bits, qw.groupsize, qw.in_features
        self.dtype, self.kernel = dtype, kernel

    @property
    def weight(self) -> QuantWeight:
        return QuantWeight(self.qweight[...], self.scales[...], self.qzeros[...], self.g_idx[...],
                           self.bits, self.groupsize, self.in_features)

    def __call__(self, x: jax.Array) -> jax.Array:
        return qmatmul(x.astype(self.dtype), self.weight, self.kernel)


def get_module(root: nnx.Module, path: str) -> nnx.Module:
    """The submodule at a dotted path such as `layers.3.attn.q`."""
    node = root
    for part in path.split("."):
        node = node[int(part)] if part.isdigit() else getattr(node, part)
    return node


def set_linear(root: nnx.Module, path: str, module: nnx.Module) -> None:
    """Replace the linear layer at a dotted path (e.g. a `Linear` by a `QuantLinear`)."""
    parent, _, name = path.rpartition(".")
    setattr(get_module(root, parent) if parent else root, name, module)


def quantized_linears(root: nnx.Module) -> dict[str, QuantWeight]:
    """Every `QuantLinear` under `root`, by dotted path, as packed weights."""
    return {".".join(str(p) for p in path): m.weight for path, m in nnx.iter_graph(root)
            if isinstance(m, QuantLinear)}


def set_kernel(root: nnx.Module, kernel: str) -> nnx.Module:
    """Make every `QuantLinear` under `root` use the named matmul kernel; returns `root`."""
    if kernel not in KERNELS:
        raise ValueError(f"quantized matmul kernel {kernel!r} is not available; expected one of {sorted(KERNELS)}")
    for _, m in nnx.iter_graph(root):
        if isinstance(m, QuantLinear):
            m.kernel = kernel
    return root
