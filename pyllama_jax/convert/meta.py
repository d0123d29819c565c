"""Meta's LLaMA checkpoints: `params.json` + `consolidated.00.pth` ... `consolidated.NN.pth`.

Meta's model-parallel code splits each weight across the NN shards: column-parallel layers (wq, wk,
wv, w1, w3, output) along dim 0 of the PyTorch `[out, in]` weight, row-parallel layers (wo, w2) and
the embedding (its embedding dim) along dim 1; norms are replicated. Reading concatenates the
pieces back, one tensor at a time; writing with `shards=N` splits them exactly so, for an N that
gives every rank whole heads. Meta's format
cannot say that the output layer is tied to the embedding, so a tied model is written with both,
and a checkpoint whose `output.weight` equals its embedding is read back as tied. Meta's q/k rows
rotate interleaved pairs, so they are permuted to our half-split layout and back.
"""
from __future__ import annotations

import math
import os
import re
from typing import Any, Iterable, Iterator

import numpy as np

from pyllama_jax import tokenizer as tok
from pyllama_jax.chat_templates import builtin_template
from pyllama_jax.convert import hf
from pyllama_jax.convert.checkpoint import Checkpoint, NameMap
from pyllama_jax.convert.tensorfile import (NUMPY_DTYPES, atomic_folder, load_torch, numpy_to_torch, read_json,
                                            torch_files, torch_to_numpy, write_json)
from pyllama_jax.model.config import ModelConfig, RopeScaling, _meta_hidden_dim
from pyllama_jax.model.params import expected_shapes, permute_rope

NAMES = NameMap(
    top={"tok_embeddings.weight": "embed", "norm.weight": "norm.scale", "output.weight": "lm_head.kernel"},
    layer_prefix="layers.",
    layer={"attention_norm.weight": "attn_norm.scale", "ffn_norm.weight": "mlp_norm.scale",
           "attention.wq.weight": "attn.q.kernel", "attention.wk.weight": "attn.k.kernel",
           "attention.wv.weight": "attn.v.kernel", "attention.wo.weight": "attn.o.kernel",
           "feed_forward.w1.weight": "mlp.gate.kernel", "feed_forward.w3.weight": "mlp.up.kernel",
           "feed_forward.w2.weight": "mlp.down.kernel"})
_COLUMN_PARALLEL = {"wq", "wk", "wv", "w1", "w3", "output"}  # split along dim 0
_ROW_PARALLEL = {"wo", "w2", "tok_embeddings"}  # split along dim 1
_SHARD = re.compile(r"consolidated\.(\d+)\.pth")


def split_axis(meta_name: str) -> int | None:
    """The axis Meta's model parallelism splits this weight along; None if it is replicated."""
    layer = meta_name.rsplit(".", 2)[-2]
    return 0 if layer in _COLUMN_PARALLEL else 1 if layer in _ROW_PARALLEL else None


def detect(path: str) -> bool:
    return os.path.isfile(os.path.join(path, "params.json"))


def shard_paths(folder: str) -> list[str]:
    """`consolidated.00.pth` ... in order; a gap in the numbering is a missing file."""
    numbers = sorted(int(m.group(1)) for f in os.listdir(folder) if (m := _SHARD.fullmatch(f)))
    if not numbers:
        raise FileNotFoundError(f"{folder}: no consolidated.NN.pth files beside params.json")
    missing = sorted(set(range(numbers[-1] + 1)) - set(numbers))
    if missing:
        raise FileNotFoundError(f"{os.path.join(folder, f'consolidated.{missing[0]:02d}.pth')} is missing "
                                f"(found shards {numbers})")
    return [os.path.join(folder, f"consolidated.{n:02d}.pth") for n in numbers]


def stored_dtype(folder: str) -> str:
    """The dtype of the first floating-point tensor of `consolidated.00.pth` (Meta's: bfloat16)."""
    return hf.first_float_dtype(shard_paths(folder)[0])


def read(folder: str, **overrides: Any) -> Checkpoint:
    """A Meta folder as a checkpoint: params.json checked against the shards' tensor shapes."""
    params_path = os.path.join(folder, "params.json")
    params = read_json(params_path)
    paths = shard_paths(folder)
    states = [load_torch(p) for p in paths]
    shapes = _merged_shapes(states, paths)
    tied = "output.weight" in shapes and np.array_equal(_merged(states, "output.weight"),
                                                        _merged(states, "tok_embeddings.weight"))
    config = config_from_params(params, params_path, shapes, **{"tie_embeddings": tied, **overrides})
    tokenizer = hf.read_tokenizer(folder, os.path.dirname(os.path.abspath(folder)))
    if tokenizer is not None and not tokenizer.chat_template:  # Meta ships none: LLaMA-2's or LLaMA-3's
        tokenizer.chat_template = builtin_template(tokenizer)
    return Checkpoint(config, _tensors(config, states, paths), tokenizer, folder)


def _merged_shapes(states: list[dict[str, Any]], paths: list[str]) -> dict[str, tuple[int, ...]]:
    """Shapes of the whole tensors; every shard must hold the same names."""
    for name in ("tok_embeddings.weight", "norm.weight"):
        if name not in states[0]:
            raise ValueError(f"{paths[0]}: tensor {name!r} is missing")
    # The replicated final norm has the whole model dim; the embedding holds 1/shards of it.
    dim, columns = states[0]["norm.weight"].shape[0], states[0]["tok_embeddings.weight"].shape[1]
    if dim % columns == 0 and dim // columns > len(paths):
        raise FileNotFoundError(
            f"{os.path.dirname(paths[0])}: each shard holds {columns} of the model's {dim} embedding columns, "
            f"so {dim // columns} shards are expected but only {len(paths)} were found: "
            f"consolidated.{len(paths):02d}.pth is missing")
    shapes = {}
    for name, t in states[0].items():
        axis, shape = split_axis(name), list(t.shape)
        for state, path in zip(states[1:], paths[1:]):
            if name not in state:
                raise ValueError(f"{path}: tensor {name!r} is missing (it is in {paths[0]})")
            if axis is not None:
                shape[axis] += state[name].shape[axis]
        shapes[name] = tuple(shape)
    return shapes


def config_from_params(params: dict[str, Any], path: str, shapes: dict[str, tuple[int, ...]],
                       **overrides: Any) -> ModelConfig:
    """Our config from params.json, each field checked against the merged tensor shapes."""
    def need(key: str) -> Any:
        if key not in params:
            raise ValueError(f"{path}: field {key!r} is missing")
        return params[key]

    dim, n_layers, n_heads = int(need("dim")), int(need("n_layers")), int(need("n_heads"))
    n_kv_heads = int(params.get("n_kv_heads") or n_heads)
    vocab, emb_dim = shapes["tok_embeddings.weight"]
    vocab_size = vocab if params.get("vocab_size", -1) in (-1, None) else int(params["vocab_size"])
    ffn = {k: params.get(k) for k in ("multiple_of", "ffn_dim_multiplier")}
    hidden_dim = _meta_hidden_dim(dim, int(ffn["multiple_of"] or 256), ffn["ffn_dim_multiplier"])
    layers = {int(n.split(".")[1]) for n in shapes if n.startswith("layers.")}
    head_dim = dim // n_heads
    checks = [("vocab_size", vocab_size, vocab, "tok_embeddings.weight rows"),
              ("dim", dim, emb_dim, "tok_embeddings.weight columns"),
              ("n_layers", n_layers, len(layers), "layers in the shards"),
              ("n_kv_heads", n_kv_heads * head_dim, shapes.get("layers.0.attention.wk.weight", (0,))[0],
               f"layers.0.attention.wk.weight rows (n_kv_heads * head_dim, head_dim={head_dim})"),
              (f"multiple_of/ffn_dim_multiplier ({ffn})", hidden_dim,
               shapes.get("layers.0.feed_forward.w1.weight", (0,))[0], "layers.0.feed_forward.w1.weight rows")]
    for field, expected, actual, what in checks:
        if expected != actual:
            raise ValueError(f"{path}: field {field} gives {expected}, but the checkpoint has {actual} "
                             f"{what}")
    fields = dict(vocab_size=vocab_size, dim=dim, n_layers=n_layers, n_heads=n_heads, n_kv_heads=n_kv_heads,
                  hidden_dim=hidden_dim, norm_eps=float(params.get("norm_eps", 1e-5)),
                  rope_theta=float(params.get("rope_theta", 10000.0)),
                  rope_scaling=RopeScaling() if params.get("use_scaled_rope") else None,
                  max_seq_len=int(params.get("max_seq_len", ModelConfig.max_seq_len)))
    try:
        return ModelConfig(**{**fields, **overrides})
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from e


def params_json(config: ModelConfig) -> dict[str, Any]:
    """Meta's params.json for our config; multiple_of/ffn_dim_multiplier reproduce hidden_dim."""
    if config.rope_scaling not in (None, RopeScaling()):
        raise ValueError(f"rope_scaling={config.rope_scaling} cannot be written to params.json, which only "
                         "knows LLaMA-3.1's scaling (use_scaled_rope)")
    params: dict[str, Any] = {"dim": config.dim, "n_layers": config.n_layers, "n_heads": config.n_heads,
                              "n_kv_heads": config.kv_heads, "vocab_size": config.vocab_size,
                              "norm_eps": config.norm_eps, "rope_theta": config.rope_theta}
    if _meta_hidden_dim(config.dim, 256) == config.hidden_dim:
        params["multiple_of"] = 256
    else:  # rounding up to a multiple of hidden_dim itself gives hidden_dim from anything in (0, hidden_dim]
        base = int(2 * (4 * config.dim) / 3)
        params["multiple_of"] = config.hidden_dim
        if base > config.hidden_dim:
            params["ffn_dim_multiplier"] = config.hidden_dim / base
    if config.rope_scaling is not None:
        params["use_scaled_rope"] = True
    return params


def _merged(states: list[dict[str, Any]], name: str) -> np.ndarray:
    """One whole tensor from its pieces in every shard."""
    axis = split_axis(name)
    pieces = [torch_to_numpy(s[name]) for s in states]
    return pieces[0] if axis is None else np.concatenate(pieces, axis=axis)


def _rope_heads(config: ModelConfig, name: str) -> int | None:
    """Heads of a q or k kernel (whose rows Meta orders for interleaved RoPE); None for others."""
    if name.endswith("attn.q.kernel"):
        return config.n_heads
    return config.kv_heads if name.endswith("attn.k.kernel") else None


def _tensors(config: ModelConfig, states: list[dict[str, Any]], paths: list[str]) -> Iterator[tuple[str, np.ndarray]]:
    for name in states[0]:
        if name == "rope.freqs":
            continue  # LLaMA-1 files store the rotary frequencies; we compute them from the config
        ours = NAMES.ours(name)
        if ours is None:
            raise ValueError(f"{paths[0]}: unexpected tensor {name!r} in a Meta LLaMA checkpoint")
        if name == "output.weight" and config.tie_embeddings:
            continue
        w = _merged(states, name)
        heads = _rope_heads(config, ours)
        if heads is not None:
            w = permute_rope(w, heads, to_half_split=True)
        yield ours, w.T if ours.endswith(".kernel") else w


def _to_meta(config: ModelConfig, name: str, w: np.ndarray) -> Iterator[tuple[str, np.ndarray]]:
    """Meta's tensor(s) for one of ours; a tied embedding is also written as `output.weight`."""
    if name.endswith(".kernel"):
        w = w.T
    heads = _rope_heads(config, name)
    if heads is not None:
        w = permute_rope(w, heads, to_half_split=False)
    yield NAMES.theirs(name), w
    if name == "embed" and config.tie_embeddings:
        yield "output.weight", w


def check_shards(config: ModelConfig, shards: int) -> None:
    """Meta's model-parallel ranks each hold n_heads/shards whole heads, n_kv_heads/shards kv heads and
    an equal part of the embedding, hidden and vocabulary dims: refuse a count that does not divide them."""
    sizes = {"n_heads": config.n_heads, "n_kv_heads": config.kv_heads, "dim": config.dim,
             "hidden_dim": config.hidden_dim, "vocab_size": config.vocab_size}
    bad = [f"{k}={v} is not a multiple of {shards}" for k, v in sizes.items() if shards > 0 and v % shards]
    if shards < 1 or bad:
        common = math.gcd(*sizes.values())
        valid = ", ".join(str(n) for n in range(1, common + 1) if common % n == 0)
        raise ValueError(f"cannot write {shards} model-parallel shards: {'; '.join(bad) or 'need at least 1'}; "
                         f"valid shard counts: {valid}")


def save(out: str, config: ModelConfig, tensors: Iterable[tuple[str, np.ndarray]],
         tokenizer: tok.Tokenizer | None = None, *, dtype: str | None = None, shards: int = 1,
         overwrite: bool = False) -> None:
    """Write our named tensors as Meta's params.json + `shards` consolidated.NN.pth files."""
    check_shards(config, shards)
    np_dtype = NUMPY_DTYPES[dtype or config.param_dtype]
    params = params_json(config)
    full: dict[str, tuple[int, ...]] = {}
    for name, shape in expected_shapes(config).items():
        full[NAMES.theirs(name)] = shape[::-1] if name.endswith(".kernel") else shape
    if config.tie_embeddings:
        full["output.weight"] = full["tok_embeddings.weight"]
    pieces: dict[str, tuple[int, ...]] = {}
    for name, shape in full.items():
        axis = split_axis(name)
        pieces[name] = shape if axis is None else tuple(d // shards if i == axis else d for i, d in enumerate(shape))
    with atomic_folder(out, overwrite) as tmp:
        paths = [os.path.join(tmp, f"consolidated.{i:02d}.pth") for i in range(shards)]
        with torch_files({p: {n: (s, np_dtype) for n, s in pieces.items()} for p in paths}) as files:
            pending = set(full)
            for name, w in tensors:
                for meta_name, mw in _to_meta(config, name, w):
                    axis = split_axis(meta_name)
                    parts = [mw] * shards if axis is None else np.split(mw, shards, axis=axis)
                    for path, part in zip(paths, parts):
                        files[path][meta_name].copy_(numpy_to_torch(part.astype(np_dtype)))
                    pending.discard(meta_name)
        if pending:
            raise ValueError(f"{out}: {len(pending)} tensor(s) never written, e.g. {sorted(pending)[:3]}")
        write_json(os.path.join(tmp, "params.json"), params)
        if tokenizer is not None:
            hf.write_tokenizer(tokenizer, tmp)
