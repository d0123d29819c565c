"""GPTQ checkpoints of AutoGPTQ / GPTQModel / GPTQ-for-LLaMa: an HF folder whose block linears are packed.

`config.json` (HF's), `quantize_config.json` (`bits`, `group_size`, `desc_act`, `sym`; or the same
fields as `config.json`'s `quantization_config`) and `*.safetensors` with, per linear,
`model.layers.N.self_attn.q_proj.{qweight,scales,qzeros,g_idx}` in the v1 packing
(`pyllama_jax.model.packing`), which is ours: reading only renames (HF's q/k layout is ours too).
GPTQModel's `checkpoint_format: "gptq_v2"` stores the zero points unshifted (`zero`, not
`zero - 1`); reading shifts them into v1 (`shift_zeros`).
"""
from __future__ import annotations

import os
from typing import Any, Iterator

import numpy as np

from pyllama_jax.convert import hf
from pyllama_jax.convert.checkpoint import Checkpoint
from pyllama_jax.convert.tensorfile import SAFETENSORS_DTYPES, read_json, read_safetensors, safetensors_header
from pyllama_jax.model.config import ModelConfig
from pyllama_jax.model.params import LAYER_LINEARS

QUANT_FIELDS = ("qweight", "scales", "qzeros", "g_idx")
SUPPORTED_BITS = (2, 3, 4, 8)  # what our packing reads (pyllama_jax.model.packing)
FORMATS = ("gptq", "gptq_v2")  # checkpoint_format: zeros stored as zero - 1 (v1), or as zero (v2)


def quantize_config(folder: str) -> dict[str, Any] | None:
    """The folder's GPTQ settings (`quantize_config.json`, else `config.json`'s `quantization_config`)."""
    path = os.path.join(folder, "quantize_config.json")
    if os.path.isfile(path):
        return {**read_json(path), "_path": path}
    config = os.path.join(folder, "config.json")
    q = read_json(config).get("quantization_config") if os.path.isfile(config) else None
    return {**q, "_path": config} if isinstance(q, dict) else None


def detect(path: str) -> bool:
    """A `quantize_config.json`, or a `quantization_config` of GPTQ's (transformers writes others,
    e.g. `gguf` for weights it dequantized, into plain HF folders)."""
    if not os.path.isdir(path):
        return False
    q = quantize_config(path)
    return q is not None and (q["_path"].endswith("quantize_config.json") or q.get("quant_method") == "gptq")


def checkpoint_format(q: dict[str, Any]) -> str:
    """`checkpoint_format` (GPTQModel also writes it as `format`), default v1's `gptq`."""
    return q.get("checkpoint_format", q.get("format", "gptq"))


def _check(q: dict[str, Any]) -> None:
    path, fmt = q["_path"], checkpoint_format(q)
    if q.get("quant_method", "gptq") != "gptq" or fmt not in FORMATS:
        raise ValueError(f"{path}: quant_method={q.get('quant_method', 'gptq')!r}, checkpoint_format={fmt!r} "
                         "is not supported; expected GPTQ's packed format (quant_method 'gptq', "
                         f"checkpoint_format one of {FORMATS})")
    if q.get("bits") not in SUPPORTED_BITS:
        raise ValueError(f"{path}: bits={q.get('bits')!r} is not supported; expected one of {SUPPORTED_BITS}")


def shift_zeros(qzeros: np.ndarray, bits: int, delta: int) -> np.ndarray:
    """Add `delta` (modulo `2**bits`) to every packed zero point of int32 `qzeros[n_groups, words]`:
    +1 turns v1's stored `zero - 1` into v2's `zero`, -1 the reverse. Each row is one little-endian
    bit stream of `bits`-bit values (3-bit values straddle words); padding bits are kept."""
    stream = np.unpackbits(np.ascontiguousarray(qzeros, "<i4").view(np.uint8), axis=1, bitorder="little")
    n = stream.shape[1] // bits
    values = stream[:, :n * bits].reshape(len(stream), n, bits).astype(np.int64) @ (1 << np.arange(bits))
    values = (values + delta) % 2 ** bits
    stream[:, :n * bits] = ((values[..., None] >> np.arange(bits)) & 1).reshape(len(stream), n * bits)
    return np.packbits(stream, axis=1, bitorder="little").view("<i4").astype(np.int32)


def ours(name: str) -> str | None:
    """Our name for an HF tensor name, packed fields included (`...q_proj.qweight` -> `...attn.q.qweight`)."""
    base, _, field = name.rpartition(".")
    if field in QUANT_FIELDS:
        linear = hf.NAMES.ours(f"{base}.weight")
        return None if linear is None else f"{linear.rpartition('.')[0]}.{field}"
    return hf.NAMES.ours(name)


def theirs(name: str) -> str:
    """Inverse of `ours`."""
    base, _, field = name.rpartition(".")
    if field in QUANT_FIELDS:
        return f"{hf.NAMES.theirs(base + '.kernel').rpartition('.')[0]}.{field}"
    return hf.NAMES.theirs(name)


def stored_dtype(folder: str) -> str:
    """The dtype of the checkpoint's unquantized weights (embedding, norms), as transformers reads it."""
    return hf.stored_dtype(folder)


def read(folder: str, **overrides: Any) -> Checkpoint:
    """A GPTQ folder as a checkpoint whose `quant` holds the recipe and the packed layout."""
    q = quantize_config(folder)
    _check(q)
    config_path = os.path.join(folder, "config.json")
    config = hf.config_from_hf(read_json(config_path), config_path, **overrides)
    files = sorted(os.path.join(folder, f) for f in os.listdir(folder) if f.endswith(".safetensors"))
    if not files:
        raise FileNotFoundError(f"{folder}: no .safetensors file in this GPTQ checkpoint")
    scales_dtype = "float16"
    for path in files:
        for name, info in safetensors_header(path).items():
            if name.endswith(".scales"):
                scales_dtype = SAFETENSORS_DTYPES[info["dtype"]].name
    groupsize = int(q.get("group_size", -1))
    layout = {f"layers.{i}.{p}": {"bits": q["bits"], "groupsize": groupsize, "scales_dtype": scales_dtype}
              for i in range(config.n_layers) for p in LAYER_LINEARS}
    recipe = {"wbits": q["bits"], "groupsize": groupsize, "act_order": bool(q.get("desc_act", False)),
              "sym": bool(q.get("sym", False))}
    quant = {"recipe": recipe, "made_by": "GPTQ checkpoint (AutoGPTQ/GPTQModel layout)", "layout": layout}
    unshift = q["bits"] if checkpoint_format(q) == "gptq_v2" else None
    return Checkpoint(config, _tensors(config, files, unshift), hf.read_tokenizer(folder), folder, quant)


def _tensors(config: ModelConfig, files: list[str], v2_bits: int | None) -> Iterator[tuple[str, np.ndarray]]:
    """Our tensors; `v2_bits`: the bit width of a v2 checkpoint, whose zeros are shifted into v1."""
    for path in files:
        for name, w in read_safetensors(path):
            if name.endswith(".bias") and not np.any(w):
                continue  # AutoGPTQ writes all-zero biases for its bias-free linears
            mine = ours(name)
            if mine is None:
                raise ValueError(f"{path}: unexpected tensor {name!r} in a GPTQ LlamaForCausalLM checkpoint")
            if mine == "lm_head.kernel" and config.tie_embeddings:
                continue
            if v2_bits is not None and mine.endswith(".qzeros"):
                w = shift_zeros(w, v2_bits, -1)
            yield mine, w.T if mine.endswith(".kernel") else w
