"""Write llama GGUF files (llama.cpp's format) with the `gguf` package's `GGUFWriter`.

Dense weights go out as F32, F16, BF16 or Q8_0 (llama.cpp's own quantizer); packed weights whose groups
are GGUF blocks (32 consecutive inputs of one output row) go out block for block: 4-bit g32 as Q4_1
(`w = d*q + m` with `d = scale`, `m = -scale*zero`, both float16), 8-bit symmetric g32 as Q8_0
(`w = d*q`, `q = code - 128`). Norms are F32. q/k rows are permuted back to GGUF's interleaved RoPE
(the inverse of `convert.gguf`'s reading), and the tokenizer goes into the `tokenizer.ggml.*` fields as
llama.cpp's converter writes them.
"""
from __future__ import annotations

import json
import os
from typing import Iterable, Iterator

import numpy as np

from pyllama_jax import tokenizer as tok
from pyllama_jax.convert.gguf import NAMES
from pyllama_jax.model.config import ModelConfig
from pyllama_jax.model.params import permute_rope

TYPES = ("f32", "f16", "bf16", "q8_0", "q4_1")
BLOCK = 32  # weights per Q8_0 / Q4_1 block
_FILE_TYPES = {"f32": 0, "f16": 1, "q4_1": 3, "q8_0": 7, "bf16": 32}  # gguf.LlamaFileType
_CONTROL, _NORMAL = 3, 1  # tokenizer.ggml.token_type values


def _qtype(name: str):
    from gguf import GGMLQuantizationType

    return GGMLQuantizationType[name.upper()]


def dense_block(w: np.ndarray, gguf_type: str) -> np.ndarray:
    """A dense `[rows, cols]` float tensor in `gguf_type` (bytes for BF16/Q8_0, as GGUFWriter takes them)."""
    from gguf.quants import quantize

    if gguf_type == "q4_1":
        raise ValueError("q4_1 holds 4-bit quantized weights, not dense ones: quantize the model to 4-bit "
                         "groupsize 32 first (pj.quantize(model, wbits=4, groupsize=32)), or write q8_0")
    return quantize(np.asarray(w, np.float32), _qtype(gguf_type))


def q4_1_blocks(codes: np.ndarray, scales: np.ndarray, zeros: np.ndarray) -> tuple[np.ndarray, float]:
    """Q4_1 rows for `codes[in, out]` with `scales`/`zeros[in/32, out]`: per row (output) and block of 32
    inputs, f16 `d`, f16 `m`, then 16 bytes whose low nibbles are weights 0-15 and high nibbles 16-31.
    Returns the `[out, in/32*20]` bytes and the largest `|gguf - ours| / scale` (0.0: bit-exact)."""
    n_in, n_out = codes.shape
    s = np.asarray(scales, np.float32).T  # [out, blocks]
    d = s.astype(np.float16)
    m = (-(d.astype(np.float32) * np.asarray(zeros, np.float32).T)).astype(np.float16)
    q = np.asarray(codes, np.uint8).T.reshape(n_out, n_in // BLOCK, BLOCK)
    ggml = d.astype(np.float32)[..., None] * q + m.astype(np.float32)[..., None]
    ours = s[..., None] * (q.astype(np.float32) - np.asarray(zeros, np.float32).T[..., None])
    err = float(np.max(np.abs(ggml - ours) / np.where(s == 0, 1, s)[..., None])) if q.size else 0.0
    packed = q[..., :16] | (q[..., 16:] << 4)
    blocks = np.concatenate([d[..., None].view(np.uint8), m[..., None].view(np.uint8), packed], axis=-1)
    return blocks.reshape(n_out, -1), err


def q8_0_blocks(codes: np.ndarray, scales: np.ndarray, bits: int) -> tuple[np.ndarray, float]:
    """Q8_0 rows for symmetric 8-bit `codes[in, out]` (zero 128): per block f16 `d` then 32 int8s."""
    n_in, n_out = codes.shape
    s = np.asarray(scales, np.float32).T
    d = s.astype(np.float16)
    q = (np.asarray(codes, np.int16).T - 2 ** (bits - 1)).astype(np.int8).reshape(n_out, n_in // BLOCK, BLOCK)
    err = float(np.max(np.abs(d.astype(np.float32) - s) / np.where(s == 0, 1, s)) * 2 ** (bits - 1)) if q.size else 0.0
    blocks = np.concatenate([d[..., None].view(np.uint8), q.view(np.uint8)], axis=-1)
    return blocks.reshape(n_out, -1), err


def _tokenizer_fields(writer, tokenizer: tok.Tokenizer, vocab_size: int, where: str) -> None:
    if tokenizer.kind == "sentencepiece":
        sp = tokenizer.backend
        pieces = [sp.id_to_piece(i) for i in range(sp.get_piece_size())]
        types = [3 if sp.is_control(i) else 2 if sp.is_unknown(i) else 6 if sp.is_byte(i) else
                 5 if sp.is_unused(i) else 1 for i in range(len(pieces))]
        writer.add_tokenizer_model("llama")
        writer.add_tokenizer_pre("default")
        writer.add_token_scores([float(sp.get_score(i)) for i in range(len(pieces))])
        writer.add_unk_token_id(int(sp.unk_id()))
    else:
        spec = json.loads(tokenizer.backend.to_str())
        model, pre = spec["model"], json.dumps(spec.get("pre_tokenizer"))
        if model.get("type") != "BPE" or "ByteLevel" not in pre:
            raise ValueError(f"{where}: GGUF export writes byte-level BPE or sentencepiece vocabularies; "
                             f"this tokenizer is {model.get('type')} with pre-tokenizer {pre}")
        special = {t["id"] for t in spec.get("added_tokens", []) if t.get("special")}
        pieces = [""] * tokenizer.vocab_size
        for text, i in {**model["vocab"], **{t["content"]: t["id"] for t in spec.get("added_tokens", [])}}.items():
            pieces[i] = text
        types = [_CONTROL if i in special else _NORMAL for i in range(len(pieces))]
        writer.add_tokenizer_model("gpt2")
        writer.add_tokenizer_pre("smollm" if '"individual_digits": true' in pre else "gpt2")
        writer.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])])
    # like llama.cpp's converter, pad the vocabulary to the embedding's rows
    pieces += [f"[PAD{i}]" for i in range(len(pieces), vocab_size)]
    types += [5] * (vocab_size - len(types))
    writer.add_token_list(pieces)
    writer.add_token_types(types)
    for value, add in ((tokenizer.bos_id, writer.add_bos_token_id), (tokenizer.eos_id, writer.add_eos_token_id)):
        if value is not None:
            add(int(value))
    writer.add_add_bos_token(bool(tokenizer.add_bos))
    if tokenizer.chat_template:
        writer.add_chat_template(tokenizer.chat_template)


def _metadata(writer, config: ModelConfig, gguf_type: str, name: str) -> None:
    writer.add_name(name)
    writer.add_context_length(config.max_seq_len)
    writer.add_embedding_length(config.dim)
    writer.add_block_count(config.n_layers)
    writer.add_feed_forward_length(config.hidden_dim)
    writer.add_head_count(config.n_heads)
    writer.add_head_count_kv(config.kv_heads)
    writer.add_rope_dimension_count(config.head_dim)
    writer.add_rope_freq_base(config.rope_theta)
    writer.add_layer_norm_rms_eps(config.norm_eps)
    writer.add_vocab_size(config.vocab_size)
    writer.add_file_type(_FILE_TYPES[gguf_type])
    writer.add_quantization_version(2)


def to_gguf_layout(name: str, w: np.ndarray, config: ModelConfig) -> np.ndarray:
    """One of our tensors (kernels `[in, out]`, half-split q/k) as GGUF stores it (`[out, in]`,
    interleaved q/k rows); also takes already-blocked `[out, bytes]` rows of a kernel."""
    if name.endswith("attn.q.kernel"):
        return permute_rope(w, config.n_heads, to_half_split=False)
    if name.endswith("attn.k.kernel"):
        return permute_rope(w, config.kv_heads, to_half_split=False)
    return w


def write(path: str, config: ModelConfig, tensors: Iterable[tuple[str, np.ndarray, str]],
          tokenizer: tok.Tokenizer, gguf_type: str, overwrite: bool = False) -> None:
    """Write a GGUF file from `(our name, GGUF-layout array, GGML type name)` triples; the array is
    float data for `f32`/`f16`, else the bytes of a row-blocked type. Written to a temporary name,
    then renamed."""
    from gguf import GGUFWriter

    if config.rope_scaling is not None:
        raise ValueError(f"{path}: LLaMA-3.1 RoPE scaling needs GGUF's rope_freqs tensor, which is not written "
                         "here; export format 'hf' instead")
    if tokenizer is None:
        raise ValueError(f"{path}: a GGUF file carries its tokenizer, and this model has none")
    if os.path.exists(path) and not overwrite:
        raise FileExistsError(f"{path} already exists; choose another output file or overwrite it")
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp-{os.getpid()}"
    writer = GGUFWriter(tmp, "llama")
    try:
        _metadata(writer, config, gguf_type, os.path.splitext(os.path.basename(path))[0])
        _tokenizer_fields(writer, tokenizer, config.vocab_size, path)
        for name, array, kind in tensors:
            if name == "lm_head.kernel" and config.tie_embeddings:
                continue
            raw = None if kind in ("f32", "f16") else _qtype(kind)
            writer.add_tensor(NAMES.theirs(name), np.ascontiguousarray(array), raw_dtype=raw)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def dense_tensors(named: Iterable[tuple[str, np.ndarray]], config: ModelConfig,
                  gguf_type: str) -> Iterator[tuple[str, np.ndarray, str]]:
    """Our dense named tensors in GGUF layout and type (1-D norms stay F32, as llama.cpp keeps them)."""
    for name, w in named:
        w = np.asarray(w, np.float32)
        if name.endswith(".kernel"):
            w = to_gguf_layout(name, w.T, config)
        kind = "f32" if w.ndim == 1 else gguf_type
        if kind in ("q8_0",) and w.shape[-1] % BLOCK:
            raise ValueError(f"{name}: {w.shape[-1]} columns is not a multiple of {BLOCK}, which {kind} needs; "
                             "write f16 instead")
        yield name, dense_block(w, kind), kind
