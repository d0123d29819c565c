"""Writing models: quantized ones as our native folder (`convert/native.py`, read back by `pj.load`),
the HF GPTQ layout (`convert/gptq.py`), GGUF (`convert/gguf_write.py`, dense ones too), and the packed
weights of single GPTQ blocks (for resuming a calibration run); `save_model` picks by format.
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

from pyllama_jax.convert import gguf_write, gptq, hf, native
from pyllama_jax.convert.tensorfile import NUMPY_DTYPES, atomic_folder, write_json
from pyllama_jax.model.llama import Llama
from pyllama_jax.model.params import named_tensors
from pyllama_jax.model.packing import QuantWeight, dequantize, group_index, unpack_codes, unpack_zeros
from pyllama_jax.tokenizer import Tokenizer
from pyllama_jax.model.qlinear import LAYER_LINEARS, quantized_linears

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


def _uniform(qweights: dict[str, QuantWeight], field: str) -> int:
    values = {getattr(qw, field) for qw in qweights.values()}
    if len(values) != 1:
        raise ValueError(f"export_autogptq: the block linears mix {field} {sorted(values)}; a GPTQ checkpoint "
                         "holds one setting (save the native format instead)")
    return values.pop()


def gptq_settings(qweights: dict[str, QuantWeight], recipe: dict[str, Any]) -> dict[str, Any]:
    """The `quantization_config` of these packed weights, as transformers' `GPTQConfig` and GPTQModel
    read it. Bits, groupsize, symmetry and act-order come from the weights themselves (`sym`: every zero
    point is `2**(bits-1)`; `desc_act`: the recipe's act-order, or any `g_idx` not `i // groupsize`);
    `checkpoint_format` is `gptq_v2` when a zero point is 0, which v1 (stored `zero - 1`) cannot hold."""
    bits, groupsize = _uniform(qweights, "bits"), _uniform(qweights, "groupsize")
    zeros = [np.asarray(unpack_zeros(qw)) for qw in qweights.values()]
    trivial = all(np.array_equal(np.asarray(qw.g_idx), group_index(qw.in_features, groupsize))
                  for qw in qweights.values())
    desc_act = bool(recipe.get("act_order")) or not trivial
    fmt = "gptq_v2" if any((z == 0).any() for z in zeros) else "gptq"
    return {"quant_method": "gptq", "bits": bits, "group_size": groupsize, "desc_act": desc_act,
            "static_groups": desc_act and trivial, "sym": all((z == 2 ** (bits - 1)).all() for z in zeros),
            "true_sequential": True, "damp_percent": float(recipe.get("percdamp", 0.01)), "lm_head": False,
            "checkpoint_format": fmt, "format": fmt, "pack_dtype": "int32", "model_file_base_name": "model",
            "meta": {"quantizer": ["pyllama-jax"]}}


def export_autogptq(model: Llama, folder: str, quant: dict[str, Any] | None = None,
                    tokenizer: Tokenizer | None = None, *, overwrite: bool = False) -> dict[str, Any]:
    """Write `model` (all block linears quantized) as a Hugging Face GPTQ folder; returns its settings.

    transformers (with optimum + gptqmodel), GPTQModel and AutoGPTQ load it: `model.safetensors`
    (packed linears; scales in float16, as AutoGPTQ stores them; other tensors in the model's compute
    dtype), `config.json` with `quantization_config`, the same in `quantize_config.json`, and the
    tokenizer if given. `quant` is the recipe (or a checkpoint's `quant` record holding one). A model
    with a zero point of 0 is written in GPTQModel's `gptq_v2` format (zeros stored unshifted), since
    v1's stored `zero - 1` wraps to `2**bits - 1` and AutoGPTQ's v1 kernels read it as `2**bits`;
    AutoGPTQ itself cannot read v2. The folder appears only when complete.
    """
    qweights = quantized_linears(model)
    missing = [f"layers.{i}.{p}" for i in range(model.config.n_layers) for p in LAYER_LINEARS
               if f"layers.{i}.{p}" not in qweights]
    if missing:
        raise ValueError(f"export_autogptq: {len(missing)} block linears are not quantized, e.g. {missing[:2]}")
    quant = quant or {}
    qc = gptq_settings(qweights, quant.get("recipe", quant))
    tensors, _ = _flatten(qweights, lambda n: gptq.theirs(n + '.qweight').rpartition('.')[0])
    dense = NUMPY_DTYPES[model.config.dtype]
    for name in list(tensors):
        if name.endswith(".qzeros") and qc["checkpoint_format"] == "gptq_v2":
            tensors[name] = gptq.shift_zeros(tensors[name], qc["bits"], +1)
    for name, value in named_tensors(model):
        if name.rpartition(".")[0] not in qweights:
            tensors[gptq.theirs(name)] = (value.T if name.endswith(".kernel") else value).astype(dense)
    if qc["checkpoint_format"] == "gptq_v2":
        print(f"note: {folder}: a zero point of 0 occurs, which GPTQ's v1 format cannot hold; writing "
              "GPTQModel's checkpoint_format 'gptq_v2' (zeros unshifted: transformers with gptqmodel, GPTQModel, "
              "vLLM read it; AutoGPTQ does not)")
    with atomic_folder(folder, overwrite) as tmp:
        _save_safetensors(os.path.join(tmp, "model.safetensors"), tensors, {"format": "pt"})
        if tokenizer is not None:
            hf.write_tokenizer(tokenizer, tmp)
        write_json(os.path.join(tmp, "config.json"),
                   {**hf.config_to_hf(model.config, model.config.dtype, tokenizer), "quantization_config": qc})
        write_json(os.path.join(tmp, "quantize_config.json"), qc)
    return qc


def _gguf_linear(name: str, qw: QuantWeight, gguf_type: str) -> tuple[np.ndarray, float]:
    """A packed linear as GGUF blocks, refusing (with the nearest supported setting) what they cannot hold."""
    setting = f"{qw.bits}-bit groupsize {qw.groupsize}"
    zeros = np.asarray(unpack_zeros(qw))
    sym = bool((zeros == 2 ** (qw.bits - 1)).all())
    wanted = {"q4_1": "4-bit groupsize 32 (symmetric or not)", "q8_0": "8-bit symmetric groupsize 32"}[gguf_type]
    holds = (qw.bits == 4) if gguf_type == "q4_1" else (qw.bits == 8 and sym)
    if not holds or qw.groupsize != gguf_write.BLOCK:
        nearest = "q4_1" if qw.bits <= 4 else "q8_0" if sym else "f16 (dequantized) or 8-bit sym=True"
        raise ValueError(f"{name}: {setting}{'' if sym else ' asymmetric'} cannot be written as GGUF {gguf_type}, "
                         f"which holds {wanted}; nearest supported: {nearest} (re-quantize with wbits="
                         f"{4 if qw.bits <= 4 else 8}, groupsize=32), or a float type (f32/f16/bf16) of the "
                         "dequantized weights")
    if qw.in_features % gguf_write.BLOCK:
        raise ValueError(f"{name}: {qw.in_features} inputs are not whole GGUF blocks of {gguf_write.BLOCK}; "
                         "write a float type (f32/f16/bf16) of the dequantized weights")
    if not np.array_equal(np.asarray(qw.g_idx), group_index(qw.in_features, qw.groupsize)):
        raise ValueError(f"{name}: act-order groups (a permuted g_idx) are not consecutive 32-input GGUF blocks; "
                         "write a float type (f32/f16/bf16) of the dequantized weights")
    codes = np.asarray(unpack_codes(qw))
    if gguf_type == "q4_1":
        return gguf_write.q4_1_blocks(codes, np.asarray(qw.scales), zeros)
    return gguf_write.q8_0_blocks(codes, np.asarray(qw.scales), qw.bits)


def export_gguf(model: Llama, path: str, tokenizer: Tokenizer, gguf_type: str | None = None, *,
                overwrite: bool = False) -> str:
    """Write `model` as a llama GGUF file; returns the type written.

    Dense models: `f32`, `f16`, `bf16` or `q8_0` (default: the weights' dtype). Quantized models: `q4_1`
    (4-bit g32) or `q8_0` (8-bit symmetric g32), block for block (the default when one fits); their
    other tensors stay in the model's compute dtype. Q4_1 stores `d = scale` and `m = -scale*zero` in
    float16: bit-exact where both are float16 numbers, else each weight moves by at most about
    30 * 2**-11 of its quantization step (the largest move is printed). `f32`/`f16`/`bf16` of a
    quantized model write its dequantized weights.
    """
    qweights = quantized_linears(model)
    if gguf_type is None:
        gguf_type = ({"float32": "f32", "float16": "f16", "bfloat16": "bf16"}[model.config.param_dtype] if not qweights
                     else "q4_1" if next(iter(qweights.values())).bits == 4 else "q8_0")
    if gguf_type not in gguf_write.TYPES:
        raise ValueError(f"gguf_type={gguf_type!r} is not supported; expected one of {gguf_write.TYPES}")
    blocked = gguf_type in ("q4_1", "q8_0") and bool(qweights)
    other = {"float32": "f32", "float16": "f16", "bfloat16": "bf16"}[model.config.dtype] if blocked else gguf_type
    worst = [0.0]

    def tensors():
        done = set()
        for name, value in named_tensors(model):
            base = name.rpartition(".")[0]
            if base in done:
                continue
            if base in qweights:
                done.add(base)
                qw = qweights[base]
                if blocked:
                    rows, err = _gguf_linear(base, qw, gguf_type)
                    worst[0] = max(worst[0], err)
                    yield base + ".kernel", gguf_write.to_gguf_layout(base + ".kernel", rows, model.config), gguf_type
                else:
                    yield from gguf_write.dense_tensors([(base + ".kernel", np.asarray(dequantize(qw)))],
                                                        model.config, gguf_type)
            else:
                yield from gguf_write.dense_tensors([(name, value)], model.config, other)

    gguf_write.write(path, model.config, tensors(), tokenizer, gguf_type, overwrite)
    if worst[0] > 0:
        print(f"note: {path}: {gguf_type}'s float16 d/m round the scales or offsets; weights moved by at most "
              f"{worst[0]:.2e} of a quantization step")
    return gguf_type


FORMATS = ("native", "hf", "gptq", "gguf")


def save_model(model: Llama, path: str, format: str = "native", tokenizer: Tokenizer | None = None,
               quant: dict[str, Any] | None = None, *, overwrite: bool = False, dtype: str | None = None,
               gguf_type: str | None = None) -> None:
    """Write a dense or quantized model in `format` (see `FORMATS`): `native` (ours; `quant` is a quantized
    model's record), `hf` (dense `LlamaForCausalLM`; `dtype` as for `hf.save`), `gptq` (`export_autogptq`)
    or `gguf` (`export_gguf`, a file). The output appears only when complete."""
    if format not in FORMATS:
        raise ValueError(f"format={format!r} is not supported; expected one of {FORMATS}")
    qweights = quantized_linears(model)
    if format == "gptq":
        export_autogptq(model, path, quant, tokenizer, overwrite=overwrite)
    elif format == "gguf":
        export_gguf(model, path, tokenizer, gguf_type, overwrite=overwrite)
    elif qweights and format == "hf":
        raise ValueError(f"{path}: a quantized model is written to Hugging Face's layout as format='gptq'")
    elif qweights:
        if os.path.exists(path) and not overwrite:
            raise FileExistsError(f"{path} already exists; choose another output folder or overwrite it")
        save_quantized(model, path, quant or {"recipe": {}}, tokenizer)
    else:
        writer = native.save if format == "native" else hf.save
        writer(path, model.config, named_tensors(model), tokenizer, dtype=dtype, overwrite=overwrite)
