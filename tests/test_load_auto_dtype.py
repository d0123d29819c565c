"""`pj.load(..., dtype="auto")`: the checkpoint's stored dtype, as transformers' `dtype="auto"` picks it."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import pyllama_jax as pj
from pyllama_jax.convert import hf, meta
from pyllama_jax.model.config import preset
from pyllama_jax.model.llama import init_model
from pyllama_jax.model.params import named_tensors


@pytest.fixture(scope="module")
def tiny():
    return init_model(preset("tiny"), seed=3)


@pytest.fixture(scope="module")
def bf16_folder(tiny, tmp_path_factory):
    out = tmp_path_factory.mktemp("bf16") / "hf"
    hf.save(str(out), tiny.config, named_tensors(tiny), dtype="bfloat16")
    return out


def _dtypes(model: pj.Model) -> set[str]:
    return {str(np.asarray(w).dtype) for _, w in named_tensors(model.module)}


def test_auto_keeps_bfloat16_as_transformers_does(bf16_folder, tiny):
    from transformers import AutoModelForCausalLM

    theirs = AutoModelForCausalLM.from_pretrained(str(bf16_folder), dtype="auto")
    assert theirs.dtype == torch.bfloat16
    ours = pj.load(str(bf16_folder), dtype="auto", param_dtype="auto")
    assert (ours.config.param_dtype, ours.config.dtype) == ("bfloat16", "bfloat16")
    assert _dtypes(ours) == {"bfloat16"}
    expected = dict(named_tensors(tiny))
    for name, w in named_tensors(ours.module):
        np.testing.assert_array_equal(np.asarray(w), expected[name].astype(w.dtype), err_msg=name)


def test_default_is_still_float32(bf16_folder):
    model = pj.load(str(bf16_folder))
    assert (model.config.param_dtype, model.config.dtype) == ("float32", "float32")
    assert _dtypes(model) == {"float32"}


def test_auto_without_a_dtype_in_config_uses_the_weights(bf16_folder, tmp_path, tiny):
    """No `torch_dtype` in config.json: the first floating-point weight decides (transformers' rule)."""
    folder = tmp_path / "nodtype"
    hf.save(str(folder), tiny.config, named_tensors(tiny), dtype="float16")
    cfg = json.loads((folder / "config.json").read_text())
    del cfg["torch_dtype"]
    (folder / "config.json").write_text(json.dumps(cfg))
    assert pj.load(str(folder), param_dtype="auto").config.param_dtype == "float16"


def test_auto_for_a_meta_folder(tiny, tmp_path):
    meta.save(str(tmp_path / "7B"), tiny.config, named_tensors(tiny), dtype="bfloat16")
    model = pj.load(str(tmp_path / "7B"), param_dtype="auto")
    assert model.config.param_dtype == "bfloat16" and _dtypes(model) == {"bfloat16"}
