"""Hugging Face folders: read what transformers writes, write what transformers reads, bad input."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch

import pyllama_jax as pj
from pyllama_jax.convert import hf
from pyllama_jax.model.config import preset
from pyllama_jax.model.llama import init_model, rope_frequencies
from pyllama_jax.model.params import named_tensors

KINDS = ("safetensors", "sharded", "bin")


def save_bin(model: torch.nn.Module, folder) -> None:
    """What transformers 4 wrote with `safe_serialization=False` (transformers 5 writes safetensors only)."""
    model.config.save_pretrained(folder)
    torch.save(model.state_dict(), os.path.join(folder, "pytorch_model.bin"))


@pytest.fixture(scope="module")
def hf_folders(hf_smollm2, smollm2, tmp_path_factory):
    """The torch model saved by transformers itself (one safetensors file, and shards) and as pytorch_model.bin."""
    from transformers import LlamaForCausalLM

    with torch.device("meta"):  # GGUF-loaded models must be rebuilt from their config before saving
        model = LlamaForCausalLM(hf_smollm2.config)
    model.load_state_dict(hf_smollm2.state_dict(), assign=True)
    root = tmp_path_factory.mktemp("hf")
    model.save_pretrained(root / "safetensors")
    model.save_pretrained(root / "sharded", max_shard_size="100MB")
    save_bin(model, root / "bin")
    hf.write_tokenizer(smollm2.tokenizer, str(root / "safetensors"))
    return root


@pytest.fixture(scope="module")
def loaded(hf_folders):
    """`loaded(kind)`: `pj.load` of one of `hf_folders`, once per module."""
    models = {}

    def load(kind: str) -> pj.Model:
        if kind not in models:
            models[kind] = pj.load(str(hf_folders / kind))
        return models[kind]

    return load


def test_saved_folders_have_the_intended_layouts(hf_folders):
    assert os.path.isfile(hf_folders / "safetensors" / "model.safetensors")
    index = json.loads((hf_folders / "sharded" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) >= 3
    assert os.path.isfile(hf_folders / "bin" / "pytorch_model.bin")


@pytest.mark.parametrize("kind", KINDS)
def test_hf_folder_logits_match_transformers(kind, loaded, smollm2_batch, smollm2_torch_logits, logits_of):
    model = loaded(kind)
    ids, mask = smollm2_batch
    real = mask.astype(bool)
    diff = np.abs(logits_of(model, ids, mask)[real] - smollm2_torch_logits[real]).max()
    assert diff <= 1e-3, diff
    assert model.config.tie_embeddings and model.config.n_kv_heads == 3 and model.config.rope_theta == 100000.0


def test_hf_folder_greedy_continuation_matches_transformers(loaded, hf_smollm2, logits_of):
    model = loaded("safetensors")
    prompt = model.tokenizer.encode("Once upon a time, in a small village at the edge of a great forest, "
                                    "there lived an old")
    with torch.no_grad():  # transformers' greedy search (its generation config adds no logits processors)
        ids = hf_smollm2.generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=32).numpy()
    assert ids.shape[1] == len(prompt) + 32
    # Our greedy choice after every prefix of that sequence (one causal forward) must be its next
    # token: then, by induction, our 32-token greedy continuation is identical.
    ours = logits_of(model, ids.astype(np.int32), np.ones_like(ids, np.int32))[0, len(prompt) - 1:-1].argmax(-1)
    assert ours.tolist() == ids[0, len(prompt):].tolist()


def test_hf_export_reloads_bitwise_and_transformers_reads_it(smollm2, hf_smollm2, smollm2_batch, logits_of,
                                                              tmp_path):
    from transformers import LlamaForCausalLM

    out = tmp_path / "export"
    hf.save(str(out), smollm2.config, named_tensors(smollm2.module), smollm2.tokenizer, max_shard_bytes=200 * 2**20)
    assert len(json.loads((out / "model.safetensors.index.json").read_text())["weight_map"]) == 272
    ours = pj.load(str(out))
    ids, mask = smollm2_batch
    np.testing.assert_array_equal(logits_of(ours, ids, mask), logits_of(smollm2, ids, mask))
    assert ours.tokenizer.encode("Hi there, 1234!") == smollm2.tokenizer.encode("Hi there, 1234!")
    assert ours.tokenizer.chat_template == smollm2.tokenizer.chat_template

    theirs = LlamaForCausalLM.from_pretrained(out, dtype=torch.float32).state_dict()
    reference = hf_smollm2.state_dict()
    assert set(theirs) == set(reference)
    for name, w in reference.items():
        assert torch.equal(theirs[name], w), name


@pytest.mark.parametrize("rope", ["legacy", "rope_parameters"])
def test_config_rope_scaling_matches_transformers(rope):
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    scaling = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 8192}
    cfg = LlamaConfig(hidden_size=512, intermediate_size=1024, num_attention_heads=8, num_key_value_heads=2,
                      num_hidden_layers=2, vocab_size=1000, max_position_embeddings=131072, rms_norm_eps=1e-5,
                      rope_theta=500000.0, rope_scaling=scaling, tie_word_embeddings=True)
    d = cfg.to_dict()
    if rope == "legacy":  # transformers < 5 wrote the scaling and theta as separate fields
        d.pop("rope_parameters")
        d.update(rope_theta=500000.0, rope_scaling=scaling)
    ours = hf.config_from_hf(d, "config.json")
    inv_freq, _ = ROPE_INIT_FUNCTIONS["llama3"](cfg, "cpu")
    np.testing.assert_allclose(np.asarray(rope_frequencies(ours)), inv_freq.numpy(), rtol=1e-6)
    assert (ours.dim, ours.n_heads, ours.kv_heads, ours.hidden_dim, ours.max_seq_len, ours.tie_embeddings,
            ours.norm_eps) == (512, 8, 2, 1024, 131072, True, 1e-5)


# --- bad input: one clear error each ---------------------------------------------------------------

@pytest.fixture()
def tiny_hf(tmp_path):
    model = init_model(preset("tiny"), seed=1)
    out = tmp_path / "tiny"
    hf.save(str(out), model.config, named_tensors(model), max_shard_bytes=150_000)
    return out


def test_truncated_safetensors_names_the_file(tiny_hf):
    shard = sorted(tiny_hf.glob("model-*.safetensors"))[1]
    shard.write_bytes(shard.read_bytes()[:-100])
    with pytest.raises(ValueError, match=rf"{shard.name}: truncated file"):
        pj.load(str(tiny_hf))


def test_truncated_pytorch_bin_names_the_file(tiny_hf, tmp_path):
    from transformers import LlamaForCausalLM

    folder = tmp_path / "bin"
    save_bin(LlamaForCausalLM.from_pretrained(tiny_hf), folder)
    data = (folder / "pytorch_model.bin").read_bytes()
    (folder / "pytorch_model.bin").write_bytes(data[:len(data) // 2])
    with pytest.raises(ValueError, match=r"pytorch_model.bin: not a readable PyTorch checkpoint"):
        pj.load(str(folder))


def test_shard_listed_in_index_but_missing(tiny_hf):
    shard = sorted(tiny_hf.glob("model-*.safetensors"))[-1]
    shard.unlink()
    with pytest.raises(FileNotFoundError, match=rf"{shard.name}: listed in .*index.json but missing"):
        pj.load(str(tiny_hf))


def test_config_of_another_architecture(tiny_hf):
    cfg = json.loads((tiny_hf / "config.json").read_text())
    (tiny_hf / "config.json").write_text(json.dumps({**cfg, "model_type": "qwen2"}))
    with pytest.raises(ValueError, match=r"config.json: model_type is 'qwen2', expected 'llama'"):
        pj.load(str(tiny_hf))


def test_config_that_does_not_match_the_tensors(tiny_hf):
    cfg = json.loads((tiny_hf / "config.json").read_text())
    (tiny_hf / "config.json").write_text(json.dumps({**cfg, "intermediate_size": 128}))
    with pytest.raises(ValueError, match=r"tensor 'layers\.\d+\.mlp\.\w+\.kernel' has shape .*, expected .*128"):
        pj.load(str(tiny_hf))


def test_tokenizer_larger_than_the_vocabulary(tiny_hf, smollm2):
    hf.write_tokenizer(smollm2.tokenizer, str(tiny_hf))
    with pytest.raises(ValueError, match=r"tokenizer has 49152 tokens but the model's vocabulary is 256"):
        pj.load(str(tiny_hf))


def test_folder_without_weights(tiny_hf):
    for f in tiny_hf.glob("model*"):
        f.unlink()
    with pytest.raises(FileNotFoundError, match=r"no weights found"):
        pj.load(str(tiny_hf))


def test_unrecognised_folder(tmp_path):
    (tmp_path / "notes.txt").write_text("not a model")
    with pytest.raises(ValueError, match=r"not a recognised checkpoint"):
        pj.load(str(tmp_path))
