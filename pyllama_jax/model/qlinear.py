"""The quantized linear layer, its matmul dispatch, and swapping it into a model.

`qmatmul(x, qw, kernel)` is the one entry point for `x @ W` with a packed `QuantWeight`:
"xla" dequantizes then multiplies (the reference; on a CPU, a few rows go through the packed-word
kernel of `pyllama_jax/kernels/cpu.py` instead); "pallas" runs the kernel of
`pyllama_jax/kernels/dequant_matmul.py` where it applies (GPU, supported shapes).
"""
from __future__ import annotations

import functools
from typing import Callable

import jax
import jax.numpy as jnp
from flax import nnx

from pyllama_jax.kernels import cpu as cpu_kernels
from pyllama_jax.model.order import after
from pyllama_jax.model.packing import QuantWeight, dequantize
from pyllama_jax.sharding.rules import packed_axes

LAYER_LINEARS = ("attn.q", "attn.k", "attn.v", "attn.o", "mlp.gate", "mlp.up", "mlp.down")


@jax.custom_vjp
def _xla_qmatmul(x: jax.Array, qw: QuantWeight) -> jax.Array:
    """`x @ dequantize(qw)`, each layer's dense weight made just before its use, in the forward
    pass and again in the backward one (never saved: a QLoRA step holds one layer's at a time).
    A decode step on a CPU reads the packed words directly instead (`pyllama_jax.kernels.cpu`)."""
    if cpu_kernels.applies(x):
        return cpu_kernels.packed_matmul(x, qw.qweight, qw.scales, qw.qzeros, qw.g_idx, qw.bits,
                                         qw.groupsize).astype(x.dtype)
    return jnp.dot(x, dequantize(jax.tree.map(functools.partial(after, x), qw), x.dtype))


def _qmatmul_fwd(x: jax.Array, qw: QuantWeight) -> tuple[jax.Array, tuple[jax.Array, QuantWeight]]:
    return _xla_qmatmul(x, qw), (x, qw)


def _qmatmul_bwd(res: tuple[jax.Array, QuantWeight], dy: jax.Array) -> tuple[jax.Array, None]:
    x, qw = res
    w = dequantize(jax.tree.map(functools.partial(after, dy), qw), dy.dtype)
    return jnp.dot(dy, w.T).astype(x.dtype), None  # the packed weight is frozen: no gradient


_xla_qmatmul.defvjp(_qmatmul_fwd, _qmatmul_bwd)


def _pallas_qmatmul(x: jax.Array, qw: QuantWeight) -> jax.Array:
    from pyllama_jax.kernels import dequant_matmul  # Pallas is imported only when chosen

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
    """A bias-free linear layer over a packed weight; called like `Linear`: `y = x @ W`.

    `axes`, the logical axes `(input, output)` of the dense kernel it replaces, shard the packed
    arrays with their layer as `pyllama_jax.sharding.rules.PACKED_AXES` declares (`replace_linear`
    takes them from the `Linear` it replaces; without them the layer cannot be placed on a mesh).
    """

    def __init__(self, qw: QuantWeight, dtype=jnp.float32, kernel: str = "xla",
                 axes: tuple[str | None, str | None] | None = None):
        meta = lambda field: {} if axes is None else {"logical_axes": packed_axes(field, axes, qw.scales.shape[0])}
        self.qweight = QuantParam(qw.qweight, **meta("qweight"))
        self.scales = QuantParam(qw.scales, **meta("scales"))
        self.qzeros = QuantParam(qw.qzeros, **meta("qzeros"))
        self.g_idx = QuantParam(qw.g_idx, **meta("g_idx"))
        self.bits, self.groupsize, self.in_features = qw.bits, qw.groupsize, qw.in_features
        self.dtype, self.kernel = dtype, kernel

    @property
    def weight(self) -> QuantWeight:
        return QuantWeight(self.qweight[...], self.scales[...], self.qzeros[...], self.g_idx[...],
                           self.bits, self.groupsize, self.in_features)

    def __call__(self, x: jax.Array) -> jax.Array:
        return qmatmul(x.astype(self.dtype), self.weight, self.kernel)


def replace_linear(root: nnx.Module, path: str, qw: QuantWeight, kernel: str = "xla") -> None:
    """Swap the dense `Linear` at `path` for a `QuantLinear` over `qw`, keeping its compute dtype
    and logical axes."""
    lin = get_module(root, path)
    set_linear(root, path, QuantLinear(qw, lin.dtype, kernel, lin.kernel.get_metadata().get("logical_axes")))


def abstract_quantized(model: nnx.Module, layout: dict[str, dict]) -> nnx.Module:
    """An abstract model (`nnx.eval_shape`) with the linears of `layout` declared quantized, in place.

    `layout[path]` has `bits`, `groupsize` and `scales_dtype`; the packed shapes follow from the
    dense kernel's, so no dense placeholder is ever made.
    """
    for path, spec in layout.items():
        k, n = get_module(model, path).kernel.get_value().shape
        replace_linear(model, path, QuantWeight.abstract(k, n, spec["bits"], spec["groupsize"],
                                                         spec.get("scales_dtype", "float16")))
    return model


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
