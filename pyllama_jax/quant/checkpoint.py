"""Quantized checkpoints: our native folder, and AutoGPTQ / GPTQ-for-LLaMa safetensors.

Native: `<dir>/config.json` (model config + quantization settings) and `<dir>/model.safetensors`
with the dense tensors under the model's own names and, per quantized linear, `<name>.qweight`,
`.scales`, `.qzeros`, `.g_idx` in AutoGPTQ's packing.
AutoGPTQ: `model.safetensors` with `model.layers.N.self_attn.q_proj.qweight`, ... ,
`quantize_config.json` (`bits`, `group_size`, `desc_act`, `sym`) and HF's `config.json`;
the packed arrays are the same, so import and export only rename (HF's q/k layout is ours).
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

from pyllama_jax.convert import hf
from pyllama_jax.model.config import ModelConfig
from pyllama_jax.model.llama import Llama
from pyllama_jax.model.params import build_model
from pyllama_jax.quant.packing import SUPPORTED_BITS, QuantWeight
from pyllama_jax.tokenizer import Tokenizer
from pyllama_jax.quant.qlinear import LAYER_LINEARS, QuantLinear, get_module, quantized_linears, set_linear

QUANT_FIELDS = ("qweight", "scales", "qzeros", "g_idx")
HF_NAMES = {"attn.q": "self_attn.q_proj", "attn.k": "self_attn.k_proj", "attn.v": "self_attn.v_proj",
            "attn.o": "self_attn.o_proj", "mlp.gate": "mlp.gate_proj", "mlp.up": "mlp.up_proj",
            "mlp.down": "mlp.down_proj"}


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
    """Save a model with `QuantLinear` layers (and its tokenizer) as our native checkpoint; returns bytes."""
    os.makedirs(folder, exist_ok=True)
    if tokenizer is not None:
        hf.write_tokenizer(tokenizer, folder)
    qweights = quantized_linears(model)
    tensors, layout = _flatten(qweights)
    _, state = nnx.split(model)
    for path, var in nnx.to_flat_state(state):
        name = ".".join(str(p) for p in path)
        if name.rpartition(".")[0] not in qweights:
            tensors[name] = np.asarray(jax.device_get(var[...]))
    config = {"model": model.config.to_dict(), "quant": quant, "layout": layout}
    tmp = os.path.join(folder, "config.json.tmp")
    with open(tmp, "w") as f:
        json.dump(config, f, indent=1)
    _save_safetensors(os.path.join(folder, "model.safetensors"), tensors, {"format": "pyllama_jax.quant"})
    os.replace(tmp, os.path.join(folder, "config.json"))
    return checkpoint_bytes(folder)


def checkpoint_bytes(folder: str) -> int:
    return sum(os.path.getsize(os.path.join(folder, f)) for f in os.listdir(folder))


def is_quantized_checkpoint(folder: str) -> bool:
    path = os.path.join(folder, "config.json")
    if not os.path.isfile(path):
        return False
    with open(path) as f:
        return "layout" in json.load(f)


def _model_with(config: ModelConfig, dense: dict[str, np.ndarray], qweights: dict[str, QuantWeight],
                source: str) -> Llama:
    """Build a model: dense tensors loaded, quantized linears swapped in."""
    kernels = {f"{n}.kernel" for n in qweights}
    placeholder = {n: np.zeros(s, np.float32) for n, s in _kernel_shapes(config, kernels).items()}
    model = build_model(config, list(dense.items()) + list(placeholder.items()), source)
    for name, qw in qweights.items():
        set_linear(model, name, QuantLinear(qw, config.compute_dtype))
    return model


def _kernel_shapes(config: ModelConfig, names: set[str]) -> dict[str, tuple[int, ...]]:
    from pyllama_jax.model.params import expected_shapes

    shapes = expected_shapes(config)
    return {n: shapes[n] for n in names if n in shapes}


def load_quantized(folder: str) -> tuple[Llama, dict[str, Any], Tokenizer | None]:
    """Load our native quantized checkpoint: the model, its quantization settings and tokenizer."""
    path = os.path.join(folder, "config.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{folder}: no config.json; not a quantized checkpoint")
    with open(path) as f:
        meta = json.load(f)
    tensors, _ = _load_safetensors(os.path.join(folder, "model.safetensors"))
    qweights = _unflatten(tensors, meta["layout"], folder)
    dense = {k: v for k, v in tensors.items() if k.rpartition(".")[0] not in qweights}
    config = ModelConfig.from_dict(meta["model"])
    return _model_with(config, dense, qweights, folder), meta["quant"], hf.read_tokenizer(folder)


# ---- AutoGPTQ / GPTQ-for-LLaMa -------------------------------------------------------------

def _hf_name(name: str) -> str:
    """Our linear path `layers.3.attn.q` -> `model.layers.3.self_attn.q_proj`."""
    _, i, rest = name.split(".", 2)
    return f"model.layers.{i}.{HF_NAMES[rest]}"


def _hf_dense_names(config: ModelConfig) -> dict[str, str]:
    """Our dense tensor names -> HF's."""
    names = {"embed": "model.embed_tokens.weight", "norm.scale": "model.norm.weight"}
    for i in range(config.n_layers):
        names[f"layers.{i}.attn_norm.scale"] = f"model.layers.{i}.input_layernorm.weight"
        names[f"layers.{i}.mlp_norm.scale"] = f"model.layers.{i}.post_attention_layernorm.weight"
    if not config.tie_embeddings:
        names["lm_head.kernel"] = "lm_head.weight"  # HF stores it [vocab, dim]
    return names


def _read_quantize_config(folder: str) -> dict[str, Any]:
    path = os.path.join(folder, "quantize_config.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{folder}: no quantize_config.json; not an AutoGPTQ checkpoint")
    with open(path) as f:
        q = json.load(f)
    fmt = q.get("checkpoint_format", "gptq")
    if q.get("quant_method", "gptq") != "gptq" or fmt != "gptq":
        raise ValueError(f"{path}: quant_method={q.get('quant_method', 'gptq')!r}, checkpoint_format={fmt!r} "
                         "is not supported; expected GPTQ's packed format (quant_method 'gptq', "
                         "checkpoint_format 'gptq')")
    if q.get("bits") not in SUPPORTED_BITS:
        raise ValueError(f"{path}: bits={q.get('bits')!r} is not supported; expected one of {SUPPORTED_BITS}")
    return q


def load_autogptq(folder: str) -> tuple[Llama, dict[str, Any], Tokenizer | None]:
    """Load an AutoGPTQ / GPTQ-for-LLaMa LLaMA checkpoint (config.json, quantize_config.json, *.safetensors)."""
    q = _read_quantize_config(folder)
    config_path = os.path.join(folder, "config.json")
    if not os.path.isfile(config_path):
        raise FileNotFoundError(f"{folder}: no config.json")
    with open(config_path) as f:
        config = hf.config_from_hf(json.load(f), config_path)
    files = sorted(f for f in os.listdir(folder) if f.endswith(".safetensors"))
    if not files:
        raise FileNotFoundError(f"{folder}: no .safetensors file")
    tensors: dict[str, np.ndarray] = {}
    for f in files:
        tensors.update(_load_safetensors(os.path.join(folder, f))[0])
    meta = {"bits": q["bits"], "groupsize": q.get("group_size", -1)}
    layout = {f"layers.{i}.{p}": {**meta, "in_features": _in_features(config, p)}
              for i in range(config.n_layers) for p in LAYER_LINEARS}
    qweights = _unflatten(tensors, layout, folder, _hf_name)
    dense = {}
    for ours, theirs in _hf_dense_names(config).items():
        if theirs not in tensors:
            raise ValueError(f"{folder}: missing tensor {theirs!r}")
        dense[ours] = tensors[theirs].T if ours == "lm_head.kernel" else tensors[theirs]
    quant = {"wbits": q["bits"], "groupsize": meta["groupsize"], "act_order": bool(q.get("desc_act", False)),
             "sym": bool(q.get("sym", False)), "source": "autogptq"}
    return _model_with(config, dense, qweights, folder), quant, hf.read_tokenizer(folder)


def _in_features(config: ModelConfig, path: str) -> int:
    return config.hidden_dim if path == "mlp.down" else (
        config.n_heads * config.head_dim if path == "attn.o" else config.dim)


def export_autogptq(model: Llama, folder: str, quant: dict[str, Any], tokenizer: Tokenizer | None = None) -> None:
    """Write `model` (all block linears quantized) as an AutoGPTQ checkpoint, with its tokenizer if given."""
    qweights = quantized_linears(model)
    missing = [f"layers.{i}.{p}" for i in range(model.config.n_layers) for p in LAYER_LINEARS
               if f"layers.{i}.{p}" not in qweights]
    if missing:
        raise ValueError(f"export_autogptq: {len(missing)} block linears are not quantized, e.g. {missing[:2]}")
    os.makedirs(folder, exist_ok=True)
    tensors, _ = _flatten(qweights, _hf_name)
    tensors = {k: (v.astype(np.float16) if k.endswith(".scales") else v) for k, v in tensors.items()}
    for ours, theirs in _hf_dense_names(model.config).items():
        value = np.asarray(jax.device_get(get_module(model, ours)[...]))
        tensors[theirs] = value.T if ours == "lm_head.kernel" else value
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
