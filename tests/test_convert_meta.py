"""Meta checkpoints (params.json + consolidated.NN.pth) made from real SmolLM2 weights.

The shards are cut here independently, as Meta's model-parallel layers hold them (fairscale's
ColumnParallelLinear/RowParallelLinear/ParallelEmbedding), from transformers' state dict, and
compared with what our exporter writes and what our loader merges.
"""
from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch

import pyllama_jax as pj
from pyllama_jax.convert import hf, meta
from pyllama_jax.model.config import preset
from pyllama_jax.model.llama import init_model
from pyllama_jax.model.params import named_tensors

SMOLLM2_PARAMS = {"dim": 576, "n_layers": 30, "n_heads": 9, "n_kv_heads": 3, "vocab_size": -1,
                  "multiple_of": 256, "norm_eps": 1e-5, "rope_theta": 100000.0}
HF_TO_META = {"self_attn.q_proj": "attention.wq", "self_attn.k_proj": "attention.wk",
              "self_attn.v_proj": "attention.wv", "self_attn.o_proj": "attention.wo",
              "mlp.gate_proj": "feed_forward.w1", "mlp.down_proj": "feed_forward.w2",
              "mlp.up_proj": "feed_forward.w3", "input_layernorm": "attention_norm",
              "post_attention_layernorm": "ffn_norm"}
SPLIT_DIM = {"wq": 0, "wk": 0, "wv": 0, "w1": 0, "w3": 0, "output": 0,  # ColumnParallelLinear: out features
             "wo": 1, "w2": 1,  # RowParallelLinear: in features
             "tok_embeddings": 1}  # ParallelEmbedding: the embedding dim


def interleave_rows(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """HF's half-split q/k rows back to Meta's order: Meta row h*hd + 2i + c is HF row h*hd + c*hd/2 + i."""
    hd = w.shape[0] // n_heads
    order = [h * hd + c * (hd // 2) + i for h in range(n_heads) for i in range(hd // 2) for c in range(2)]
    return w[order]


def meta_state(hf_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """transformers' state dict renamed and re-ordered to Meta's whole (unsharded) tensors."""
    out = {"tok_embeddings.weight": hf_state["model.embed_tokens.weight"], "norm.weight": hf_state["model.norm.weight"],
           "output.weight": hf_state["lm_head.weight"]}
    for name, w in hf_state.items():
        if name.startswith("model.layers."):
            i, module = name.removeprefix("model.layers.").removesuffix(".weight").split(".", 1)
            meta_name = f"layers.{i}.{HF_TO_META[module]}.weight"
            if module == "self_attn.q_proj":
                w = interleave_rows(w, SMOLLM2_PARAMS["n_heads"])
            elif module == "self_attn.k_proj":
                w = interleave_rows(w, SMOLLM2_PARAMS["n_kv_heads"])
            out[meta_name] = w
    return out


def split(state: dict[str, torch.Tensor], shards: int) -> list[dict[str, torch.Tensor]]:
    """Each model-parallel rank's piece of every tensor, as Meta's checkpoints store them."""
    pieces: list[dict[str, torch.Tensor]] = [{} for _ in range(shards)]
    for name, w in state.items():
        dim = SPLIT_DIM.get(name.split(".")[-2])
        parts = [w] * shards if dim is None else torch.chunk(w, shards, dim=dim)
        for rank, part in enumerate(parts):
            pieces[rank][name] = part.clone()
    return pieces


@pytest.fixture(scope="module")
def independent(hf_smollm2):
    """`{shards: [state dict per rank]}` cut from transformers' weights, for 3 shards (9 heads, 3 kv heads)."""
    whole = meta_state({k: v.detach() for k, v in hf_smollm2.state_dict().items()})
    return {n: split(whole, n) for n in (3,)}


@pytest.fixture(scope="module")
def exported(smollm2, tmp_path_factory):
    """`{shards: folder}` written by our exporter from our model (loaded from the GGUF file)."""
    root = tmp_path_factory.mktemp("meta")
    for n in (1, 3):
        meta.save(str(root / f"x{n}"), smollm2.config, named_tensors(smollm2.module), smollm2.tokenizer, shards=n)
    return {n: root / f"x{n}" for n in (1, 3)}


@pytest.mark.parametrize("shards", [3])
def test_exporter_cuts_shards_like_meta(shards, exported, independent):
    for rank, expected in enumerate(independent[shards]):
        written = torch.load(exported[shards] / f"consolidated.{rank:02d}.pth", weights_only=True)
        assert sorted(written) == sorted(expected)
        for name, w in expected.items():
            assert torch.equal(written[name], w), (rank, name)
    params = json.loads((exported[shards] / "params.json").read_text())
    assert params == {**SMOLLM2_PARAMS, "vocab_size": 49152, "norm_eps": pytest.approx(1e-5)}


@pytest.mark.parametrize("shards", [3])
def test_loader_merges_independent_shards(shards, independent, smollm2, smollm2_batch, smollm2_torch_logits,
                                          logits_of, tmp_path):
    for rank, state in enumerate(independent[shards]):
        torch.save(state, tmp_path / f"consolidated.{rank:02d}.pth")
    (tmp_path / "params.json").write_text(json.dumps(SMOLLM2_PARAMS))
    model = pj.load(str(tmp_path))
    assert model.config.vocab_size == 49152 and model.config.tie_embeddings  # output.weight == embedding
    original = dict(named_tensors(smollm2.module))
    for name, w in named_tensors(model.module):  # merged and permuted back: exactly the original
        np.testing.assert_array_equal(w, original[name], err_msg=name)
    ids, mask = smollm2_batch
    real = mask.astype(bool)
    assert np.abs(logits_of(model, ids, mask)[real] - smollm2_torch_logits[real]).max() <= 1e-3


def test_export_then_reload_gives_identical_logits(exported, smollm2, smollm2_batch, logits_of):
    model = pj.load(str(exported[3]))
    ids, mask = smollm2_batch
    np.testing.assert_array_equal(logits_of(model, ids, mask), logits_of(smollm2, ids, mask))
    assert model.tokenizer.encode("Hi there, 1234!") == smollm2.tokenizer.encode("Hi there, 1234!")


# --- bad input: one clear error each ---------------------------------------------------------------

@pytest.fixture()
def tiny_meta(tmp_path):
    model = init_model(preset("tiny", n_kv_heads=4), seed=2)  # 4 kv heads: 4 shards hold one each
    out = tmp_path / "7B"
    meta.save(str(out), model.config, named_tensors(model), shards=4)
    return out


def test_tiny_roundtrip_with_bfloat16_storage(tiny_meta, tmp_path):
    model = pj.load(str(tiny_meta))
    meta.save(str(tmp_path / "bf16"), model.config, named_tensors(model.module), dtype="bfloat16", shards=2)
    assert torch.load(tmp_path / "bf16" / "consolidated.01.pth")["output.weight"].dtype == torch.bfloat16
    reloaded = dict(named_tensors(pj.load(str(tmp_path / "bf16"), param_dtype="bfloat16").module))
    for name, w in named_tensors(model.module):
        np.testing.assert_array_equal(reloaded[name], w.astype(reloaded[name].dtype), err_msg=name)


def test_missing_shard_in_the_middle(tiny_meta):
    (tiny_meta / "consolidated.01.pth").unlink()
    with pytest.raises(FileNotFoundError, match=r"consolidated.01.pth is missing"):
        pj.load(str(tiny_meta))


def test_missing_last_shard(tiny_meta):
    (tiny_meta / "consolidated.03.pth").unlink()
    with pytest.raises(FileNotFoundError, match=r"4 shards are expected but only 3 were found: "
                                                r"consolidated.03.pth is missing"):
        pj.load(str(tiny_meta))


def test_truncated_shard(tiny_meta):
    shard = tiny_meta / "consolidated.02.pth"
    shard.write_bytes(shard.read_bytes()[:-200])
    with pytest.raises(ValueError, match=r"consolidated.02.pth: not a readable PyTorch checkpoint"):
        pj.load(str(tiny_meta))


@pytest.mark.parametrize("field,value,message", [
    ("dim", 80, r"field dim gives 80, but the checkpoint has 64 tok_embeddings.weight columns"),
    ("n_layers", 3, r"field n_layers gives 3, but the checkpoint has 2 layers"),
    ("n_kv_heads", 2, r"field n_kv_heads gives 32, but the checkpoint has 64 layers.0.attention.wk.weight rows"),
    ("multiple_of", 1024, r"field multiple_of/ffn_dim_multiplier .* gives 1024, but the checkpoint has 160"),
    ("vocab_size", 300, r"field vocab_size gives 300, but the checkpoint has 256"),
    ("n_heads", None, r"field 'n_heads' is missing"),
])
def test_params_json_that_does_not_match_the_tensors(tiny_meta, field, value, message):
    params = json.loads((tiny_meta / "params.json").read_text())
    if value is None:
        del params[field]
    else:
        params[field] = value
    (tiny_meta / "params.json").write_text(json.dumps(params))
    with pytest.raises(ValueError, match=r"params.json: " + message):
        pj.load(str(tiny_meta))


def test_tokenizer_in_the_parent_folder_is_used_and_checked(tiny_meta, smollm2):
    hf.write_tokenizer(smollm2.tokenizer, str(tiny_meta.parent))  # Meta's layout: llama/tokenizer.model, llama/7B/
    with pytest.raises(ValueError, match=rf"{tiny_meta.parent}/tokenizer.json: tokenizer has 49152 tokens but "
                                         r"the model's vocabulary is 256"):
        pj.load(str(tiny_meta))


@pytest.mark.parametrize("changes,shards,message", [
    ({}, 4, r"n_kv_heads=2 is not a multiple of 4; valid shard counts: 1, 2$"),
    ({"n_heads": 8, "n_kv_heads": 8, "hidden_dim": 164}, 8,
     r"hidden_dim=164 is not a multiple of 8; valid shard counts: 1, 2, 4$"),
    ({}, 0, r"valid shard counts: 1, 2$"),
])
def test_shards_must_split_whole_heads(tmp_path, changes, shards, message):
    """Meta's model-parallel layers hold n_heads/shards and n_kv_heads/shards whole heads per rank."""
    model = init_model(preset("tiny", **changes))
    with pytest.raises(ValueError, match=message):
        meta.save(str(tmp_path / "out"), model.config, named_tensors(model), shards=shards)
    assert not (tmp_path / "out").exists()


def test_params_json_without_shards(tmp_path):
    (tmp_path / "params.json").write_text(json.dumps(SMOLLM2_PARAMS))
    with pytest.raises(FileNotFoundError, match=r"no consolidated.NN.pth files"):
        pj.load(str(tmp_path))


def test_sentencepiece_tokenizer_travels_with_the_checkpoint(tiny_meta, data_dir, tmp_path):
    import sentencepiece

    from pyllama_jax import tokenizer as tok

    with open(os.path.join(data_dir, "gutenberg", "pride_and_prejudice.txt"), encoding="utf-8") as f:
        text = f.read(200_000)
    sentencepiece.SentencePieceTrainer.train(sentence_iterator=iter(text.splitlines()), vocab_size=200,
                                             model_prefix=str(tmp_path / "sp"), model_type="bpe")
    sp = tok.from_sentencepiece(str(tmp_path / "sp.model"))
    model = pj.load(str(tiny_meta))
    meta.save(str(tmp_path / "with_sp"), model.config, named_tensors(model.module), sp)
    reloaded = pj.load(str(tmp_path / "with_sp")).tokenizer
    assert reloaded.kind == "sentencepiece" and (reloaded.bos_id, reloaded.eos_id) == (sp.bos_id, sp.eos_id)
    sample = "It is a truth universally acknowledged."
    assert reloaded.encode(sample) == sp.encode(sample) and len(sp.encode(sample)) > 5
