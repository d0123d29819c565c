"""Hub ids in `pj.load`: resolved through huggingface_hub's cache, one clear error when offline."""
from __future__ import annotations

import numpy as np
import pytest

import pyllama_jax as pj
from pyllama_jax.convert import hf, hub
from pyllama_jax.model.config import preset
from pyllama_jax.model.llama import init_model
from pyllama_jax.model.params import named_tensors

REVISION = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture()
def offline_cache(tmp_path, monkeypatch):
    """An empty HF cache in `tmp_path`, with the Hub offline (huggingface_hub reads both at call time)."""
    from huggingface_hub import constants

    cache = tmp_path / "hub"
    cache.mkdir()
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return cache


def test_offline_id_with_nothing_cached_names_the_id(offline_cache):
    with pytest.raises(FileNotFoundError, match=r"'someone/tiny-llama'.*offline or unreachable"):
        pj.load("someone/tiny-llama")


def test_cached_snapshot_loads_offline(offline_cache):
    """A snapshot placed in the documented cache layout (models--owner--name/snapshots/<rev>, refs/main)."""
    from huggingface_hub import scan_cache_dir

    model = init_model(preset("tiny"), seed=4)
    repo = offline_cache / "models--someone--tiny-llama"
    hf.save(str(repo / "snapshots" / REVISION), model.config, named_tensors(model))
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(REVISION)
    (cached,) = scan_cache_dir(offline_cache).repos  # huggingface_hub itself reads the layout
    assert cached.repo_id == "someone/tiny-llama" and {r.commit_hash for r in cached.revisions} == {REVISION}

    loaded = pj.load("someone/tiny-llama")
    assert loaded.source.endswith(f"snapshots/{REVISION}")
    expected = dict(named_tensors(model))
    for name, w in named_tensors(loaded.module):
        np.testing.assert_array_equal(np.asarray(w), expected[name], err_msg=name)


@pytest.mark.parametrize("name, is_id", [("meta-llama/Llama-3.2-1B", True), ("HuggingFaceTB/SmolLM2-135M", True),
                                         ("models/x.gguf", False), ("a/b/c", False), ("/abs/path", False),
                                         ("smollm2-135m", False), ("./rel", False)])
def test_what_counts_as_a_hub_id(name, is_id):
    assert hub.is_hub_id(name) is is_id


def test_an_existing_relative_folder_is_not_a_hub_id(tmp_path, monkeypatch):
    (tmp_path / "owner" / "name").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    assert not hub.is_hub_id("owner/name")
