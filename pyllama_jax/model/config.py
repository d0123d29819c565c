"""Model hyper-parameters and presets for the LLaMA family."""
from __future__ import annotations

import dataclasses
from typing import Any

import jax.numpy as jnp

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


@dataclasses.dataclass(frozen=True)
class RopeScaling:
    """LLaMA-3.1 style frequency scaling of the rotary embedding."""

    factor: float = 8.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Shape and numerics of a LLaMA-architecture decoder."""

    vocab_size: int = 32000
    dim: int = 4096  # hidden size
    n_layers: int = 32
    n_heads: int = 32
    n_kv_heads: int | None = None  # None: same as n_heads (no grouped-query attention)
    hidden_dim: int = 11008  # SwiGLU inner size
    norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | None = None
    max_seq_len: int = 2048
    tie_embeddings: bool = False
    dtype: str = "float32"  # compute dtype
    param_dtype: str = "float32"  # storage dtype of the weights
    kv_dtype: str = "auto"  # KV cache: "auto" (the compute dtype) or "int8" (per-position, per-head scales)

    def __post_init__(self) -> None:
        kv = self.n_kv_heads or self.n_heads
        if self.dim % self.n_heads:
            raise ValueError(f"ModelConfig.dim={self.dim} is not divisible by n_heads={self.n_heads}")
        if self.n_heads % kv:
            raise ValueError(f"ModelConfig.n_heads={self.n_heads} is not divisible by n_kv_heads={kv}")
        if self.kv_dtype not in ("auto", "int8"):
            raise ValueError(f"ModelConfig.kv_dtype={self.kv_dtype!r}; expected 'auto' or 'int8'")
        for field in ("dtype", "param_dtype"):
            if getattr(self, field) not in DTYPES:
                raise ValueError(f"ModelConfig.{field}={getattr(self, field)!r}; expected one of {sorted(DTYPES)}")

    @property
    def kv_heads(self) -> int:
        return self.n_kv_heads or self.n_heads

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @property
    def compute_dtype(self) -> Any:
        return DTYPES[self.dtype]

    @property
    def weight_dtype(self) -> Any:
        return DTYPES[self.param_dtype]

    def replace(self, **changes: Any) -> "ModelConfig":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ModelConfig":
        d = dict(d)
        if d.get("rope_scaling"):
            d["rope_scaling"] = RopeScaling(**d["rope_scaling"])
        return cls(**d)

    def num_params(self) -> int:
        attn = self.dim * self.dim * 2 + 2 * self.dim * self.kv_heads * self.head_dim
        mlp = 3 * self.dim * self.hidden_dim
        emb = self.vocab_size * self.dim * (1 if self.tie_embeddings else 2)
        return self.n_layers * (attn + mlp + 2 * self.dim) + emb + self.dim


def _meta_hidden_dim(dim: int, multiple_of: int, ffn_dim_multiplier: float | None = None) -> int:
    """The SwiGLU inner size Meta's code derives from `dim` (4*dim*2/3, scaled, rounded up)."""
    hidden = int(2 * (4 * dim) / 3)
    if ffn_dim_multiplier is not None:
        hidden = int(ffn_dim_multiplier * hidden)
    return multiple_of * ((hidden + multiple_of - 1) // multiple_of)


PRESETS: dict[str, ModelConfig] = {
    "tiny": ModelConfig(vocab_size=256, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=160,
                        norm_eps=1e-5, max_seq_len=128),
    "smollm2-135m": ModelConfig(vocab_size=49152, dim=576, n_layers=30, n_heads=9, n_kv_heads=3,
                                hidden_dim=1536, norm_eps=1e-5, rope_theta=100000.0, max_seq_len=8192,
                                tie_embeddings=True),
    "llama-7b": ModelConfig(dim=4096, n_layers=32, n_heads=32, hidden_dim=_meta_hidden_dim(4096, 256)),
    "llama-13b": ModelConfig(dim=5120, n_layers=40, n_heads=40, hidden_dim=_meta_hidden_dim(5120, 256)),
    "llama-30b": ModelConfig(dim=6656, n_layers=60, n_heads=52, hidden_dim=_meta_hidden_dim(6656, 256)),
    "llama-65b": ModelConfig(dim=8192, n_layers=80, n_heads=64, hidden_dim=_meta_hidden_dim(8192, 256)),
    "llama2-7b": ModelConfig(dim=4096, n_layers=32, n_heads=32, hidden_dim=11008, norm_eps=1e-5,
                             max_seq_len=4096),
    "llama2-13b": ModelConfig(dim=5120, n_layers=40, n_heads=40, hidden_dim=13824, norm_eps=1e-5,
                              max_seq_len=4096),
    "llama2-70b": ModelConfig(dim=8192, n_layers=80, n_heads=64, n_kv_heads=8,
                              hidden_dim=_meta_hidden_dim(8192, 4096, 1.3), norm_eps=1e-5, max_seq_len=4096),
    "llama3-8b": ModelConfig(vocab_size=128256, dim=4096, n_layers=32, n_heads=32, n_kv_heads=8,
                             hidden_dim=14336, norm_eps=1e-5, rope_theta=500000.0, max_seq_len=8192),
    "llama3.1-8b": ModelConfig(vocab_size=128256, dim=4096, n_layers=32, n_heads=32, n_kv_heads=8,
                               hidden_dim=14336, norm_eps=1e-5, rope_theta=500000.0,
                               rope_scaling=RopeScaling(), max_seq_len=131072),
}


def preset(name: str, **changes: Any) -> ModelConfig:
    """A named preset, optionally with fields replaced."""
    if name not in PRESETS:
        raise ValueError(f"unknown model preset {name!r}; expected one of {sorted(PRESETS)}")
    return PRESETS[name].replace(**changes)
