"""Writing quantized models: our native folder (`convert/native.py`, read back by `pj.load`), the
AutoGPTQ / GPTQModel layout (`convert/gptq.py`), and the packed weights of single GPTQ blocks
(for resuming a calibration run).
"""
from __future__ import annotations

import json
import os
from typing import Any

import jax
import numpy as np
from flax import nnx
from safetensors import SafetensorError
from safetensors.numpy import load_file, save_file

from pyllama_jax.convert import gptq, hf, native
from pyllama_jax.convert.tensorfile import NUMPY_DTYPES
from pyllama_jax.model.llama import Llama
from pyllama_jax.model.params import named_tensors
from pyllama_jax.quant.packing import QuantWeight
from pyllama_jax.tokenizer import Tokenizer
from pyllama_jax.quant.qlinear import LAYER_LINEARS, quantized_linears

QUANT_FIELDS = gptq.QUANT_FIELDS


def _save_safetensors(path: str, tensors: dict[str, np.ndarray], metadata: dict[str, str]) -> None:
    tmp = path + ".tmp"
    save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()}, tmp, metadata=metadata)
    os.replace(tmp, path)


def _load_safetensors(path: str) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    from safetensors import safe_open

    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no such quantized checkpoint file")
    try:
        with safe_open(path, "np") as f:
            metadata = f.metadata() or {}
        return load_file(path), metadata
    except (SafetensorError, OSError, ValueError) as e:
        raise ValueError(f"{path}: not a readable safetensors file (truncated or corrupt?): {e}") from None


def _flatten(weights: dict[str, QuantWeight], rename=lambda n: n) -> tuple[dict[str, np.ndarray], dict]:
    tensors, layout = {}, {}
    for name, qw in weights.items():
        for field in QUANT_FIELDS:
            tensors[f"{rename(name)}.{field}"] = np.asarray(getattr(qw, field))
        layout[name] = {"bits": qw.bits, "groupsize": qw.groupsize, "in_features": qw.in_features}
    return tensors, layout


def _unflatten(tensors: dict[str, np.ndarray], layout: dict[str, dict], source: str,
               rename=lambda n: n) -> dict[str, QuantWeight]:
    out = {}
    for name, meta in layout.items():
        missing = [f for f in QUANT_FIELDS if f"{rename(name)}.{f}" not in tensors]
        if missing:
            raise ValueError(f"{source}: {rename(name)} lacks {missing}")
        arrays = {f: jax.numpy.asarray(tensors[f"{rename(name)}.{f}"]) for f in QUANT_FIELDS}
        out[name] = QuantWeight(**arrays, bits=meta["bits"], groupsize=meta["groupsize"],
                                in_features=meta["in_features"])
        _check_shapes(out[name], f"{source}: {rename(name)}")
    return out


def _check_shapes(qw: QuantWeight, where: str) -> None:
    n_out, n_groups = qw.scales.shape[1], qw.scales.shape[0]
    want = {"qweight": (-(-qw.in_features * qw.bits // 32), n_out), "qzeros": (n_groups, -(-n_out * qw.bits // 32)),
            "g_idx": (qw.in_features,)}
    for field, shape in want.items():
        if tuple(getattr(qw, field).shape) != shape:
            raise ValueError(f"{where}.{field} has shape {tuple(getattr(qw, field).shape)}, expected {shape} "
                             f"for {qw.bits}-bit weights with {qw.in_features} inputs")


def save_quant_weights(path: str, weights: dict[str, QuantWeight]) -> None:
    """Write packed weights by name to one safetensors file (temp name, then rename)."""
    tensors, layout = _flatten(weights)
    _save_safetensors(path, tensors, {"quant_layout": json.dumps(layout)})


def load_quant_weights(path: str) -> dict[str, QuantWeight]:
    """Read what `save_quant_weights` wrote."""
    tensors, metadata = _load_safetensors(path)
    if "quant_layout" not in metadata:
        raise ValueError(f"{path}: no `quant_layout` metadata; not written by save_quant_weights")
    return _unflatten(tensors, json.loads(metadata["quant_layout"]), path)


def save_quantized(model: Llama, folder: str, quant: dict[str, Any], tokenizer: Tokenizer | None = None) -> int:
    """Save a model with `QuantLinear` layers as our native checkpoint (`pj.load` reads it); returns bytes.

    `quant` is the manifest's record of what made it (`recipe`, `made_from`); the packed layout is
    added here. Packed arrays keep their dtypes; every other tensor (embedding, norms, an untied
    head) is stored in the compute dtype, which is what the quantized model computes in.
    """
    qweights = quantized_linears(model)
    layout = {name: {"bits": qw.bits, "groupsize": qw.groupsize, "scales_dtype": np.dtype(qw.scales.dtype).name}
              for name, qw in qweights.items()}
    config = model.config.replace(param_dtype=model.config.dtype)
    _, state = nnx.split(model)
    variables = {".".join(str(p) for p in path): v for path, v in nnx.to_flat_state(state)}
    dtype = lambda name: (np.dtype(variables[name].get_value().dtype) if name.rpartition(".")[0] in qweights
                          else NUMPY_DTYPES[config.param_dtype])
    specs = {name: (tuple(v.get_value().shape), dtype(name)) for name, v in variables.items()}
    tensors = ((name, np.asarray(jax.device_get(v.get_value())).astype(specs[name][1], copy=False))
               for name, v in variables.items())
    native.save(folder, config, tensors, tokenizer, overwrite=True, specs=specs, quant={**quant, "layout": layout})
    return sum(os.path.getsize(os.path.join(folder, f)) for f in os.listdir(folder))


def export_autogptq(model: Llama, folder: str, quant: dict[str, Any], tokenizer: Tokenizer | None = None) -> None:
    """Write `model` (all block linears quantized) as an AutoGPTQ checkpoint, with its tokenizer if given."""
    qweights = quantized_linears(model)
    missing = [f"layers.{i}.{p}" for i in range(model.config.n_layers) for p in LAYER_LINEARS
               if f"layers.{i}.{p}" not in qweights]
    if missing:
        raise ValueError(f"export_autogptq: {len(missing)} block linears are not quantized, e.g. {missing[:2]}")
    os.makedirs(folder, exist_ok=True)
    tensors, _ = _flatten(qweights, lambda n: gptq.theirs(n + '.qweight').rpartition('.')[0])
    tensors = {k: (v.astype(np.float16) if k.endswith(".scales") else v) for k, v in tensors.items()}
    for name, value in named_tensors(model):
        if name.rpartition(".")[0] not in qweights:
            tensors[gptq.theirs(name)] = value.T if name.endswith(".kernel") else value
    hf_config = hf.config_to_hf(model.config, "float16", tokenizer)
    qc = {"bits": quant["wbits"], "group_size": quant["groupsize"], "desc_act": bool(quant.get("act_order")),
          "static_groups": bool(quant.get("act_order")), "sym": bool(quant.get("sym")), "true_sequential": True,
          "quant_method": "gptq", "checkpoint_format": "gptq"}
    _save_safetensors(os.path.join(folder, "model.safetensors"), tensors, {"format": "pt"})
    if tokenizer is not None:
        hf.write_tokenizer(tokenizer, folder)
    for name, obj in (("config.json", hf_config), ("quantize_config.json", qc)):
        tmp = os.path.join(folder, name + ".tmp")
        with open(tmp, "w") as f:
            json.dump(obj, f, indent=1)
        os.replace(tmp, os.path.join(folder, name))
