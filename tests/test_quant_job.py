"""The quantization job from a config: quantize, save, reload, and `scripts/eval_ppl.py` on the result."""
from __future__ import annotations

import os
import re
import subprocess
import sys

import numpy as np

from pyllama_jax.serve.process import REPO


def test_job_quantizes_saves_reloads_and_evaluates(tmp_path, data_dir):
    import pyllama_jax as pj
    from pyllama_jax.config import base_config
    from pyllama_jax.data.text import calibration_windows, load_text
    from pyllama_jax.quant.calibrate import quantize_gptq
    from pyllama_jax.quant.recipe import load_or_quantize, quant_config, recipe_from

    wiki = os.path.join(data_dir, "wikitext-2-raw", "wiki.test.raw")
    folder = tmp_path / "q3"
    c = base_config()
    c.quant = quant_config(wbits=3, groupsize=64, calibration=wiki + "@640000:700000", nsamples=2, seqlen=64,
                           save=str(folder), eval=(wiki,), eval_windows=2)
    made = load_or_quantize(c)
    assert os.listdir(folder) and not os.path.exists(folder / "resume")

    # the same GPTQ run done by hand: windows drawn from the slice with the model's tokenizer
    by_hand = pj.load("smollm2-135m")
    ids = by_hand.tokenizer.encode(load_text(c.quant.calibration), bos=False)
    recipe = recipe_from(c.quant)
    quantize_gptq(by_hand.module, calibration_windows(ids, 2, 64, 0), recipe.spec, recipe.gptq)

    reloaded = load_or_quantize(c)  # the checkpoint exists now: loaded, not quantized again
    x = np.asarray([by_hand.tokenizer.encode("The tower is 324 metres tall,", bos=True)], np.int32)
    want = np.asarray(by_hand.module(x)[0])
    np.testing.assert_allclose(np.asarray(made.module(x)[0]), want, atol=2e-4, rtol=0)
    np.testing.assert_allclose(np.asarray(reloaded.module(x)[0]), want, atol=2e-4, rtol=0)

    expected = pj.perplexity(reloaded, wiki, seqlen=64, max_windows=2, progress=False).perplexity
    out = subprocess.run([sys.executable, "scripts/eval_ppl.py", "--config=configs/smollm2_135m.py",
                          f"--config.quant.load={folder}", f"--config.quant.eval={wiki}",
                          "--config.quant.seqlen=64", "--config.quant.eval_windows=2"],
                         cwd=REPO, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    printed = float(re.search(r"perplexity ([\d.]+) over 2 windows of 64", out.stdout).group(1))
    assert abs(printed - expected) < 1e-3 * expected
