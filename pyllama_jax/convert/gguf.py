"""Read llama GGUF files (llama.cpp's format): config, tensors (dequantized), tokenizer fields."""
from __future__ import annotations

import os
from typing import Any, Iterator

import numpy as np

from pyllama_jax.convert.checkpoint import NameMap
from pyllama_jax.convert.gguf_format import GGUFContainer
from pyllama_jax.model.config import ModelConfig, RopeScaling
from pyllama_jax.model.llama import rope_frequencies
from pyllama_jax.model.params import permute_rope

NAMES = NameMap(
    top={"token_embd.weight": "embed", "output_norm.weight": "norm.scale", "output.weight": "lm_head.kernel"},
    layer_prefix="blk.",
    layer={"attn_norm.weight": "attn_norm.scale", "ffn_norm.weight": "mlp_norm.scale",
           "attn_q.weight": "attn.q.kernel", "attn_k.weight": "attn.k.kernel",
           "attn_v.weight": "attn.v.kernel", "attn_output.weight": "attn.o.kernel",
           "ffn_gate.weight": "mlp.gate.kernel", "ffn_up.weight": "mlp.up.kernel",
           "ffn_down.weight": "mlp.down.kernel"})

class GGUFFile:
    """A memory-mapped GGUF file with its metadata as plain Python values."""

    def __init__(self, path: str | os.PathLike):
        self.path = str(path)
        if not os.path.isfile(self.path):
            raise FileNotFoundError(f"GGUF file not found: {self.path}")
        self.container = GGUFContainer(self.path)
        self.fields: dict[str, Any] = self.container.fields
        arch = self.fields.get("general.architecture")
        if arch != "llama":
            raise ValueError(f"{self.path}: general.architecture is {arch!r}, expected 'llama'")

    def get(self, key: str, default: Any = None) -> Any:
        return self.fields.get(key, default)

    def require(self, key: str) -> Any:
        if key not in self.fields:
            raise ValueError(f"{self.path}: metadata field {key!r} is missing")
        return self.fields[key]

    def stored_dtype(self) -> str:
        """The float type of the token embedding (F32/F16/BF16); float32 for quantized ones, which
        are dequantized to float32."""
        embed = next((t for t in self.container.tensors if t.name == "token_embd.weight"), None)
        kind = embed.type_name if embed is not None else "F32"
        return {"F16": "float16", "BF16": "bfloat16"}.get(kind, "float32")

    def config(self, **overrides: Any) -> ModelConfig:
        names = {t.name for t in self.container.tensors}
        n_heads = int(self.require("llama.attention.head_count"))
        cfg = dict(
            vocab_size=int(self.get("llama.vocab_size", len(self.require("tokenizer.ggml.tokens")))),
            dim=int(self.require("llama.embedding_length")),
            n_layers=int(self.require("llama.block_count")),
            n_heads=n_heads,
            n_kv_heads=int(self.get("llama.attention.head_count_kv", n_heads)),
            hidden_dim=int(self.require("llama.feed_forward_length")),
            norm_eps=float(self.get("llama.attention.layer_norm_rms_epsilon", 1e-5)),
            rope_theta=float(self.get("llama.rope.freq_base", 10000.0)),
            max_seq_len=int(self.get("llama.context_length", 2048)),
            tie_embeddings="output.weight" not in names,
        )
        if "rope_freqs.weight" in names:
            cfg["rope_scaling"] = self._rope_scaling(ModelConfig(**cfg))
        cfg.update(overrides)
        return ModelConfig(**cfg)

    def _rope_scaling(self, config: ModelConfig) -> RopeScaling:
        """LLaMA-3.1's scaling from `rope_freqs.weight` (the factors llama.cpp divides each frequency by):
        `factor` is their largest, the rest LLaMA-3.1's (low 1, high 4, original context 8192 unless
        `llama.rope.scaling.original_context_length` says), checked against every factor."""
        t = next(t for t in self.container.tensors if t.name == "rope_freqs.weight")
        factors = self.container.tensor(t).astype(np.float64).reshape(-1)
        if factors.shape != (config.head_dim // 2,):
            raise ValueError(f"{self.path}: rope_freqs.weight has {factors.size} values, expected head_dim/2="
                             f"{config.head_dim // 2}")
        scaling = RopeScaling(factor=float(factors.max()), low_freq_factor=1.0, high_freq_factor=4.0,
                              original_max_position_embeddings=int(self.get(
                                  "llama.rope.scaling.original_context_length", 8192)))
        base = np.asarray(rope_frequencies(config), np.float64)
        expected = base / np.asarray(rope_frequencies(config.replace(rope_scaling=scaling)), np.float64)
        if not np.allclose(factors, expected, rtol=1e-4):
            raise ValueError(f"{self.path}: rope_freqs.weight is not LLaMA-3.1's llama3 RoPE scaling (factor "
                             f"{scaling.factor:g}, low 1, high 4, original context "
                             f"{scaling.original_max_position_embeddings}); load this model from its HF folder")
        return scaling

    def tensors(self, config: ModelConfig) -> Iterator[tuple[str, np.ndarray]]:
        """Our named tensors, dequantized to float32 one at a time, q/k permuted to half-split."""
        for t in self.container.tensors:
            name = NAMES.ours(t.name)
            if t.name == "rope_freqs.weight":
                continue  # read into config.rope_scaling
            if name is None:
                raise ValueError(f"{self.path}: unexpected tensor {t.name!r} in a llama GGUF file")
            try:
                w = self.container.tensor(t)
            except NotImplementedError as e:
                raise ValueError(f"{self.path}: tensor {t.name!r} uses {t.type_name}, which "
                                 "cannot be dequantized here") from e
            if name.endswith("attn.q.kernel"):
                w = permute_rope(w, config.n_heads, to_half_split=True)
            elif name.endswith("attn.k.kernel"):
                w = permute_rope(w, config.kv_heads, to_half_split=True)
            if name.endswith(".kernel"):
                w = w.T  # PyTorch [out, in] -> ours [in, out]
            yield name, w

