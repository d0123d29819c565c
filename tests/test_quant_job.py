"""The quantization job from a config: quantize, save, reload, and `scripts/eval_ppl.py` on the result."""
from __future__ import annotations

import os
import re
import subprocess
import sys

import numpy as np

from pyllama_jax.serve.process import REPO


def test_job_quantizes_saves_reloads_and_evaluates(tmp_path, data_dir, logits_of):
    """On a dense random:tiny folder (GPTQ through the job on SmolLM2 is tests/test_readme.py's
    quantization commands): the job's quantize/save/reload equals a GPTQ run by hand, and the CLI
    prints the perplexity the facade computes."""
    import pyllama_jax as pj
    from pyllama_jax.config import base_config
    from pyllama_jax.convert import native
    from pyllama_jax.model.params import named_tensors
    from pyllama_jax.data.text import calibration_windows, load_text
    from pyllama_jax.quant.calibrate import quantize_gptq
    from pyllama_jax.jobs.quantize import load_or_quantize, quant_config
    from pyllama_jax.quant.recipe import recipe_from
    from tests.models import random_model

    source = random_model("random:tiny", 0)
    dense = str(tmp_path / "dense")
    native.save(dense, source.config, named_tensors(source.module), source.tokenizer)
    wiki = os.path.join(data_dir, "wikitext-2-raw", "wiki.test.raw")
    folder = tmp_path / "q3"
    c = base_config()
    c.model = dense
    c.quant = quant_config(wbits=3, groupsize=64, calibration=wiki + "@640000:700000", nsamples=2, seqlen=64,
                           save=str(folder), eval=(wiki,), eval_windows=2)
    made = load_or_quantize(c)
    assert os.listdir(folder) and not os.path.exists(folder / "resume")

    # the same GPTQ run done by hand: windows drawn from the slice with the model's tokenizer
    by_hand = pj.load(dense)
    ids = by_hand.tokenizer.encode(load_text(c.quant.calibration), bos=False)
    recipe = recipe_from(c.quant)
    quantize_gptq(by_hand.module, calibration_windows(ids, 2, 64, 0), recipe.spec, recipe.gptq)

    reloaded = load_or_quantize(c)  # the checkpoint exists now: loaded, not quantized again
    x = np.asarray([by_hand.tokenizer.encode("The tower is 324 metres tall,", bos=True)], np.int32)
    mask = np.ones_like(x)  # one jitted forward per structure (eager dispatch took 13 s on tiny)
    want = logits_of(by_hand, x, mask)
    np.testing.assert_allclose(logits_of(made, x, mask), want, atol=2e-4, rtol=0)
    np.testing.assert_allclose(logits_of(reloaded, x, mask), want, atol=2e-4, rtol=0)

    expected = pj.perplexity(reloaded, wiki, seqlen=64, max_windows=2, progress=False).perplexity
    out = subprocess.run([sys.executable, "scripts/eval_ppl.py", "--config=configs/smollm2_135m.py",
                          f"--config.model={dense}", f"--config.quant.load={folder}", f"--config.quant.eval={wiki}",
                          "--config.quant.seqlen=64", "--config.quant.eval_windows=2"],
                         cwd=REPO, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    printed = float(re.search(r"perplexity ([\d.]+) over 2 windows of 64", out.stdout).group(1))
    assert abs(printed - expected) < 1e-3 * expected


def test_saved_checkpoint_is_reused_only_for_its_own_recipe(tmp_path):
    """A checkpoint records the recipe and source that made it: a job asking for another recipe is
    refused with what differs, a dense job ignores it, and the loaded model is labelled by it."""
    import pytest

    from pyllama_jax.config import base_config
    from pyllama_jax.convert import native
    from pyllama_jax.model.params import named_tensors
    from pyllama_jax.jobs.quantize import load_or_quantize, quant_config
    from tests.models import random_model

    source = random_model("random:tiny", 0)
    native.save(str(tmp_path / "dense"), source.config, named_tensors(source.module), source.tokenizer)
    c = base_config()
    c.model = str(tmp_path / "dense")
    c.quant = quant_config(wbits=4, groupsize=32, nearest=True, save=str(tmp_path / "q"))
    made = load_or_quantize(c)
    assert "RTN 4-bit g32" in made.describe()
    reloaded = load_or_quantize(c)
    assert reloaded.source == str(tmp_path / "q") and reloaded.quant["recipe"] == made.quant["recipe"]
    assert "RTN 4-bit g32" in reloaded.describe() and str(tmp_path / "dense") in reloaded.describe()
    c.quant.nearest = False  # GPTQ asked for, an RTN checkpoint on disk
    with pytest.raises(ValueError, match="nearest: checkpoint True, config False"):
        load_or_quantize(c)
    c.quant.nearest, c.quant.groupsize = True, 64
    with pytest.raises(ValueError, match="groupsize: checkpoint 32, config 64"):
        load_or_quantize(c)
    c.quant.wbits = 0  # the dense model, whatever quant.save holds
    dense = load_or_quantize(c)
    assert dense.quant is None and "dense" in dense.describe()
