"""Our native checkpoint format, and scripts/convert.py across every format."""
from __future__ import annotations

import importlib.util
import json
import os

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.numpy import load_file

import pyllama_jax as pj
from pyllama_jax.convert import native
from pyllama_jax.model.config import preset
from pyllama_jax.model.llama import init_model
from pyllama_jax.model.params import named_tensors

_SCRIPT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "scripts", "convert.py")
_spec = importlib.util.spec_from_file_location("convert_script", _SCRIPT)
convert_script = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(convert_script)


@pytest.fixture()
def tiny(tmp_path):
    """A random tiny model saved as a native checkpoint: `(module, folder)`."""
    model = init_model(preset("tiny"), seed=4)
    native.save(str(tmp_path / "tiny"), model.config, named_tensors(model))
    return model, tmp_path / "tiny"


def test_script_converts_the_embedded_gguf_and_native_reloads_bitwise(smollm2, smollm2_batch, logits_of,
                                                                      tmp_path, capsys):
    out = str(tmp_path / "smollm2")
    assert convert_script.main(["--src", "smollm2-135m", "--to", "native", "--out", out]) == 0
    model = pj.load(out)
    assert model.config == smollm2.config
    ids, mask = smollm2_batch
    np.testing.assert_array_equal(logits_of(model, ids, mask), logits_of(smollm2, ids, mask))
    assert model.tokenizer.eos_ids == smollm2.tokenizer.eos_ids
    assert model.tokenizer.apply_chat_template([{"role": "user", "content": "Hi"}]) == \
        smollm2.tokenizer.apply_chat_template([{"role": "user", "content": "Hi"}])
    assert convert_script.main(["--src", "smollm2-135m", "--to", "native", "--out", out]) == 0
    assert "already exists; nothing to do" in capsys.readouterr().out


def test_native_file_is_plain_safetensors(tiny):
    model, folder = tiny
    stored = load_file(str(folder / native.WEIGHTS))  # the safetensors package's own reader
    ours = dict(named_tensors(model))
    assert sorted(stored) == sorted(ours)
    for name, w in ours.items():
        np.testing.assert_array_equal(stored[name], w, err_msg=name)
    manifest = json.loads((folder / native.MANIFEST).read_text())
    assert manifest["format"] == native.FORMAT and manifest["config"] == model.config.to_dict()


def test_script_chain_through_every_format(tiny, tmp_path):
    model, folder = tiny
    meta2, hf_dir, back = (str(tmp_path / n) for n in ("meta2", "hf", "back"))
    for src, fmt, out, extra in [(folder, "meta", meta2, ["--shards", "2"]), (meta2, "hf", hf_dir, []),
                                 (hf_dir, "native", back, ["--dtype", "bfloat16"])]:
        assert convert_script.main(["--src", str(src), "--to", fmt, "--out", out, *extra]) == 0
    assert sorted(os.listdir(meta2)) == ["consolidated.00.pth", "consolidated.01.pth", "params.json"]
    with safe_open(os.path.join(back, native.WEIGHTS), framework="pt") as f:  # stored as bfloat16
        for name, w in named_tensors(model):
            t = f.get_tensor(name)
            assert t.dtype == torch.bfloat16
            assert torch.equal(t, torch.tensor(np.asarray(w)).to(torch.bfloat16)), name
    # params.json has no context length, so the Meta step falls back to ModelConfig's default.
    assert pj.load(back).config == model.config.replace(param_dtype="bfloat16", max_seq_len=2048)


def test_failed_write_leaves_nothing_behind(tiny, tmp_path):
    model, _ = tiny

    def broken():
        for i, item in enumerate(named_tensors(model)):
            if i == 5:
                raise RuntimeError("disk full")
            yield item

    with pytest.raises(RuntimeError, match="disk full"):
        native.save(str(tmp_path / "out"), model.config, broken())
    assert sorted(os.listdir(tmp_path)) == ["tiny"]


def test_existing_output_is_not_overwritten_by_accident(tiny):
    model, folder = tiny
    with pytest.raises(FileExistsError, match="already exists"):
        native.save(str(folder), model.config, named_tensors(model))


# --- bad input: one clear error each ---------------------------------------------------------------

def test_truncated_native_weights(tiny):
    _, folder = tiny
    weights = folder / native.WEIGHTS
    weights.write_bytes(weights.read_bytes()[:-64])
    with pytest.raises(ValueError, match=r"model.safetensors: truncated file"):
        pj.load(str(folder))


def test_missing_native_weights(tiny):
    _, folder = tiny
    (folder / native.WEIGHTS).unlink()
    with pytest.raises(FileNotFoundError, match=r"model.safetensors"):
        pj.load(str(folder))


def test_manifest_of_another_version(tiny):
    _, folder = tiny
    manifest = json.loads((folder / native.MANIFEST).read_text())
    (folder / native.MANIFEST).write_text(json.dumps({**manifest, "version": 99}))
    with pytest.raises(ValueError, match=r"pyllama.json: format/version is 'pyllama-native'/99, expected"):
        pj.load(str(folder))


def test_script_reports_bad_input_in_one_line(tmp_path):
    with pytest.raises(SystemExit, match=r"^error: no model at .*missing"):
        convert_script.main(["--src", str(tmp_path / "missing"), "--to", "hf", "--out", str(tmp_path / "o")])
