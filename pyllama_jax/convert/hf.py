"""Hugging Face `LlamaForCausalLM` folders: read (safetensors, sharded or not, `pytorch_model*.bin`)
and write (safetensors + config.json + tokenizer files)."""
from __future__ import annotations

import contextlib
import math
import os
import shutil
from typing import Any, Iterable, Iterator

import numpy as np

from pyllama_jax import tokenizer as tok
from pyllama_jax.convert.checkpoint import Checkpoint, NameMap
from pyllama_jax.convert.tensorfile import (NUMPY_DTYPES, SAFETENSORS_DTYPES, SafetensorsWriter, atomic_folder, load_torch, read_json,
                                            read_safetensors, safetensors_header, torch_to_numpy, write_json)
from pyllama_jax.model.config import ModelConfig, RopeScaling
from pyllama_jax.model.params import expected_shapes

NAMES = NameMap(
    top={"model.embed_tokens.weight": "embed", "model.norm.weight": "norm.scale", "lm_head.weight": "lm_head.kernel"},
    layer_prefix="model.layers.",
    layer={"input_layernorm.weight": "attn_norm.scale", "post_attention_layernorm.weight": "mlp_norm.scale",
           "self_attn.q_proj.weight": "attn.q.kernel", "self_attn.k_proj.weight": "attn.k.kernel",
           "self_attn.v_proj.weight": "attn.v.kernel", "self_attn.o_proj.weight": "attn.o.kernel",
           "mlp.gate_proj.weight": "mlp.gate.kernel", "mlp.up_proj.weight": "mlp.up.kernel",
           "mlp.down_proj.weight": "mlp.down.kernel"})
_WEIGHTS = (("model.safetensors.index.json", "model.safetensors"), ("pytorch_model.bin.index.json", "pytorch_model.bin"))


def detect(path: str) -> bool:
    return os.path.isfile(os.path.join(path, "config.json"))


def config_from_hf(cfg: dict[str, Any], source: str, **overrides: Any) -> ModelConfig:
    """Our config from a `LlamaConfig` dict (`config.json`), or a `MistralConfig` whose sliding window has
    no effect (null, or not shorter than the context): the same layers; `source` names the file in errors."""
    if cfg.get("model_type") not in ("llama", "mistral"):
        raise ValueError(f"{source}: model_type is {cfg.get('model_type')!r}, expected 'llama' (LlamaForCausalLM) "
                         "or 'mistral' without a sliding window")
    window, context = cfg.get("sliding_window"), cfg.get("max_position_embeddings", 2048)
    if cfg["model_type"] == "mistral" and window is not None and window < context:
        raise ValueError(f"{source}: sliding_window={window} is shorter than max_position_embeddings={context}; "
                         "sliding-window attention is not supported (Mistral v0.2+ has sliding_window null)")

    def need(key: str) -> Any:
        if key not in cfg:
            raise ValueError(f"{source}: field {key!r} is missing")
        return cfg[key]

    dim, n_heads = int(need("hidden_size")), int(need("num_attention_heads"))
    if cfg.get("head_dim") not in (None, dim // n_heads):
        raise ValueError(f"{source}: head_dim={cfg['head_dim']} is not hidden_size/num_attention_heads="
                         f"{dim // n_heads}; such models are not supported")
    for key in ("attention_bias", "mlp_bias"):
        if cfg.get(key):
            raise ValueError(f"{source}: {key}=true is not supported (LLaMA layers have no biases)")
    if cfg.get("hidden_act", "silu") != "silu":
        raise ValueError(f"{source}: hidden_act={cfg['hidden_act']!r} is not supported; expected 'silu'")
    # transformers 5 writes rope_parameters; older files write rope_theta and rope_scaling.
    rope = {"rope_theta": cfg.get("rope_theta", 10000.0), **(cfg.get("rope_scaling") or {}),
            **(cfg.get("rope_parameters") or {})}
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type not in ("default", "llama3"):
        raise ValueError(f"{source}: rope type {rope_type!r} is not supported; expected 'default' or 'llama3'")
    scaling = None if rope_type == "default" else RopeScaling(
        factor=float(rope["factor"]), low_freq_factor=float(rope["low_freq_factor"]),
        high_freq_factor=float(rope["high_freq_factor"]),
        original_max_position_embeddings=int(rope["original_max_position_embeddings"]))
    fields = dict(vocab_size=int(need("vocab_size")), dim=dim, n_layers=int(need("num_hidden_layers")),
                  n_heads=n_heads, n_kv_heads=int(cfg.get("num_key_value_heads") or n_heads),
                  hidden_dim=int(need("intermediate_size")), norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
                  rope_theta=float(rope["rope_theta"]), rope_scaling=scaling,
                  max_seq_len=int(cfg.get("max_position_embeddings", 2048)),
                  tie_embeddings=bool(cfg.get("tie_word_embeddings", False)))
    return ModelConfig(**{**fields, **overrides})


def config_to_hf(config: ModelConfig, dtype: str, tokenizer: tok.Tokenizer | None = None) -> dict[str, Any]:
    """The `config.json` of a `LlamaForCausalLM` with our config."""
    s = config.rope_scaling
    return {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": config.vocab_size,
        "hidden_size": config.dim, "intermediate_size": config.hidden_dim,
        "num_hidden_layers": config.n_layers, "num_attention_heads": config.n_heads,
        "num_key_value_heads": config.kv_heads, "head_dim": config.head_dim, "hidden_act": "silu",
        "max_position_embeddings": config.max_seq_len, "rms_norm_eps": config.norm_eps,
        "rope_theta": config.rope_theta,
        "rope_scaling": None if s is None else {"rope_type": "llama3", "factor": s.factor,
                                                "low_freq_factor": s.low_freq_factor,
                                                "high_freq_factor": s.high_freq_factor,
                                                "original_max_position_embeddings": s.original_max_position_embeddings},
        "tie_word_embeddings": config.tie_embeddings, "attention_bias": False, "mlp_bias": False,
        "torch_dtype": dtype,
        "bos_token_id": tokenizer.bos_id if tokenizer else None,
        "eos_token_id": tokenizer.eos_id if tokenizer else None,
    }


def weight_files(folder: str) -> list[str]:
    """Paths of an HF folder's weight files, from its index when sharded; all must exist."""
    for index, single in _WEIGHTS:
        index_path = os.path.join(folder, index)
        if os.path.isfile(index_path):
            weight_map = read_json(index_path).get("weight_map")
            if not isinstance(weight_map, dict) or not weight_map:
                raise ValueError(f"{index_path}: field 'weight_map' is missing or empty")
            paths = [os.path.join(folder, f) for f in sorted(set(weight_map.values()))]
            for p in paths:
                if not os.path.isfile(p):
                    raise FileNotFoundError(f"{p}: listed in {index_path} but missing")
            return paths
        if os.path.isfile(os.path.join(folder, single)):
            return [os.path.join(folder, single)]
    raise FileNotFoundError(f"{folder}: no weights found; expected one of "
                            f"{[f for pair in _WEIGHTS for f in pair]}")


def stored_dtype(folder: str) -> str:
    """The dtype transformers' `dtype="auto"` picks: config.json's `dtype`/`torch_dtype`, else the
    first floating-point weight's."""
    cfg = read_json(os.path.join(folder, "config.json"))
    named = cfg.get("dtype") or cfg.get("torch_dtype")
    if isinstance(named, str):
        return named.removeprefix("torch.")
    return first_float_dtype(weight_files(folder)[0])


def first_float_dtype(path: str) -> str:
    """The dtype name (`bfloat16`, ...) of the first floating-point tensor in a weight file."""
    if path.endswith(".safetensors"):
        dtypes = (SAFETENSORS_DTYPES[info["dtype"]] for info in safetensors_header(path).values())
        names = [d.name for d in dtypes if d.kind == "f" or d.name == "bfloat16"]
    else:
        names = [str(t.dtype).removeprefix("torch.") for t in load_torch(path).values() if t.is_floating_point()]
    return names[0] if names else "float32"


def read_tokenizer(*folders: str) -> tok.Tokenizer | None:
    """The tokenizer in the first of `folders` holding tokenizer.json or tokenizer.model, else None."""
    for folder in folders:
        if any(os.path.isfile(os.path.join(folder, f)) for f in ("tokenizer.json", "tokenizer.model")):
            return tok.from_hf_folder(folder)
    return None


def write_tokenizer(tokenizer: tok.Tokenizer, folder: str) -> None:
    """Write `tokenizer` as HF tokenizer files (tokenizer.json or tokenizer.model + tokenizer_config.json)."""
    if tokenizer.kind in ("sentencepiece", "tiktoken"):  # both are a tokenizer.model file
        shutil.copyfile(tokenizer.source, os.path.join(folder, "tokenizer.model"))
    else:
        tokenizer.backend.save(os.path.join(folder, "tokenizer.json"))
    write_json(os.path.join(folder, "tokenizer_config.json"), {
        "tokenizer_class": "LlamaTokenizer" if tokenizer.kind == "sentencepiece" else "PreTrainedTokenizerFast",
        "bos_token": tokenizer.token_text(tokenizer.bos_id) or None,
        "eos_token": tokenizer.token_text(tokenizer.eos_id) or None,
        "add_bos_token": tokenizer.add_bos, "chat_template": tokenizer.chat_template})


def read(folder: str, **overrides: Any) -> Checkpoint:
    """An HF folder as a checkpoint; every weight file is checked (present, readable) up front."""
    config_path = os.path.join(folder, "config.json")
    config = config_from_hf(read_json(config_path), config_path, **overrides)
    files = weight_files(folder)
    torch_states = {p: load_torch(p) for p in files if not p.endswith(".safetensors")}
    for path in files:
        if path not in torch_states:
            safetensors_header(path)
    return Checkpoint(config, _tensors(config, files, torch_states), read_tokenizer(folder), folder)


def _tensors(config: ModelConfig, files: list[str],
             torch_states: dict[str, dict[str, Any]]) -> Iterator[tuple[str, np.ndarray]]:
    for path in files:
        items = read_safetensors(path) if path not in torch_states else (
            (k, torch_to_numpy(t)) for k, t in torch_states[path].items())
        for name, w in items:
            ours = NAMES.ours(name)
            if ours is None and name.endswith("rotary_emb.inv_freq"):
                continue  # a buffer older transformers saved; recomputed from the config
            if ours is None:
                raise ValueError(f"{path}: unexpected tensor {name!r} in a LlamaForCausalLM checkpoint")
            if ours == "lm_head.kernel" and config.tie_embeddings:
                continue
            yield ours, w.T if ours.endswith(".kernel") else w


def save(out: str, config: ModelConfig, tensors: Iterable[tuple[str, np.ndarray]],
         tokenizer: tok.Tokenizer | None = None, *, dtype: str | None = None,
         max_shard_bytes: int = 5 * 2**30, overwrite: bool = False) -> None:
    """Write our named tensors as an HF `LlamaForCausalLM` folder, streamed tensor by tensor.

    Weights go to `model.safetensors`, or to shards of at most `max_shard_bytes` plus
    `model.safetensors.index.json`; `dtype` defaults to `config.param_dtype`.
    """
    dtype = dtype or config.param_dtype
    np_dtype = NUMPY_DTYPES[dtype]
    specs = {NAMES.theirs(n): (s[::-1] if n.endswith(".kernel") else s, np_dtype)
             for n, s in expected_shapes(config).items()}
    shards: list[dict[str, Any]] = [{}]
    size = 0
    for name, (shape, dt) in specs.items():
        nbytes = math.prod(shape) * dt.itemsize
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = (shape, dt)
        size += nbytes
    files = (["model.safetensors"] if len(shards) == 1 else
             [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))])
    with atomic_folder(out, overwrite) as tmp:
        with contextlib.ExitStack() as stack:
            owner: dict[str, SafetensorsWriter] = {}
            for f, s in zip(files, shards):
                writer = stack.enter_context(SafetensorsWriter(os.path.join(tmp, f), s, {"format": "pt"}))
                owner.update(dict.fromkeys(s, writer))
            for name, w in tensors:
                theirs = NAMES.theirs(name)
                owner[theirs].write(theirs, w.T if name.endswith(".kernel") else w)
        if len(shards) > 1:
            total = sum(math.prod(shape) * dt.itemsize for shape, dt in specs.values())
            write_json(os.path.join(tmp, "model.safetensors.index.json"), {
                "metadata": {"total_size": total},
                "weight_map": {name: f for f, s in zip(files, shards) for name in s}})
        write_json(os.path.join(tmp, "config.json"), config_to_hf(config, dtype, tokenizer))
        if tokenizer is not None:
            write_tokenizer(tokenizer, tmp)
