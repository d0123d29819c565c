"""Perplexity protocol on real data (SmolLM2 + WikiText-2) against HF transformers' PyTorch model."""
import os

import numpy as np
import pytest

from pyllama_jax.data.text import calibration_windows, data_dir, eval_windows, load_text
from pyllama_jax.eval.perplexity import benchmark, corpus_ids, perplexity, window_nlls
from pyllama_jax.model.config import preset
from pyllama_jax.model.llama import init_model
from pyllama_jax.quant.calibrate import quantize_rtn
from pyllama_jax.quant.rtn import QuantSpec

WIKI = os.path.join(data_dir(), "wikitext-2-raw", "wiki.test.raw")
NOVEL = os.path.join(data_dir(), "gutenberg", "pride_and_prejudice.txt")


def test_windows_drop_remainder_and_cap():
    w = eval_windows(list(range(10)), 3)
    np.testing.assert_array_equal(w, [[0, 1, 2], [3, 4, 5], [6, 7, 8]])
    assert eval_windows(list(range(10)), 3, max_windows=2).shape == (2, 3)
    with pytest.raises(ValueError, match="fewer than one window of seqlen=16"):
        eval_windows(list(range(10)), 16)


def test_local_text_slices_and_errors(tmp_path):
    (tmp_path / "t.txt").write_bytes(b"ab\r\ncd\r\n")
    assert load_text(str(tmp_path / "t.txt")) == "ab\ncd\n"
    assert load_text(f"{tmp_path / 't.txt'}@3:") == "cd\n"
    with pytest.raises(FileNotFoundError, match="no such file"):
        load_text(str(tmp_path / "missing.txt"))
    with pytest.raises(ValueError, match="expected `path@start:end`"):
        load_text(f"{tmp_path / 't.txt'}@x:")


def test_benchmark_check_equals_window_perplexity():
    model = init_model(preset("tiny"), seed=0)
    ids = np.random.default_rng(0).integers(0, 256, size=24)
    result = benchmark(model, ids, check=True)
    want = float(np.exp(window_nlls(model, ids[None], progress=False)[0]))
    assert result.perplexity == pytest.approx(want, rel=1e-4)
    assert result.median_seconds_per_token > 0


def test_calibration_windows_reproduce_reference_starts(smollm2):
    ids = corpus_ids(smollm2.tokenizer, NOVEL)
    calib = calibration_windows(ids, 16, 512, seed=0)
    starts = [100989, 110250, 10612, 67873, 134027, 127383, 106151, 79511, 124937, 93860, 152930, 57263,
              132300, 36509, 73882, 36633]  # ../shared/reference/gptq-smollm2.md
    np.testing.assert_array_equal(calib, np.stack([ids[s:s + 512] for s in starts]))


def _torch_rtn(weight, bits, groupsize):
    """GPTQ's quantizer (asymmetric, range through 0) on an HF weight `[out, in]`, in PyTorch."""
    import torch

    maxq = 2 ** bits - 1
    out = torch.empty_like(weight)
    for g in range(0, weight.shape[1], groupsize):
        x = weight[:, g:g + groupsize]
        xmin = torch.clamp(x.min(1, keepdim=True).values, max=0)
        xmax = torch.clamp(x.max(1, keepdim=True).values, min=0)
        scale = (xmax - xmin) / maxq
        zero = torch.round(-xmin / scale)
        out[:, g:g + groupsize] = scale * (torch.clamp(torch.round(x / scale) + zero, 0, maxq) - zero)
    return out


def test_fp32_and_rtn_perplexity_match_hf_transformers(smollm2, hf_smollm2):
    """First 2 windows of 256 tokens of WikiText-2 test; ours vs transformers on the same GGUF weights
    (the session's models; both are quantized below, so each on its own copy)."""
    import copy

    import torch
    from flax import nnx

    windows = eval_windows(corpus_ids(smollm2.tokenizer, WIKI), 256, 2)
    assert windows[0, :8].tolist() == [446, 6356, 389, 9226, 352, 446, 3717, 6356]
    hf = copy.deepcopy(hf_smollm2)  # its weights are overwritten in place below

    def hf_ppl():
        with torch.no_grad():
            logits = hf(torch.as_tensor(windows, dtype=torch.long)).logits[:, :-1].float()
            nll = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                                                    torch.as_tensor(windows[:, 1:].reshape(-1), dtype=torch.long),
                                                    reduction="none").reshape(len(windows), -1).mean(1)
        return float(torch.exp(nll.mean()))

    fp32 = perplexity(smollm2, WIKI, seqlen=256, max_windows=2, progress=False)
    assert fp32.windows == 2
    assert fp32.perplexity == pytest.approx(hf_ppl(), rel=1e-3)
    with torch.no_grad():
        for layer in hf.model.layers:
            for lin in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj, layer.self_attn.o_proj,
                        layer.mlp.gate_proj, layer.mlp.up_proj, layer.mlp.down_proj):
                lin.weight.copy_(_torch_rtn(lin.weight, 3, 128))
    # RTN replaces linears in place: on a new module tree over the session model's arrays, not on it
    quantized = quantize_rtn(nnx.merge(*nnx.split(smollm2.module)), QuantSpec(bits=3, groupsize=128))
    assert type(quantized.layers[0].attn.q) is not type(smollm2.module.layers[0].attn.q)
    rtn = np.exp(window_nlls(quantized, windows, progress=False).mean())
    assert rtn > 1.1 * fp32.perplexity  # 3-bit RTN visibly hurts
    assert rtn == pytest.approx(hf_ppl(), rel=2e-3)
