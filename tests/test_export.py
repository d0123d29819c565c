"""Exports other tools run: the HF GPTQ layout (read by transformers + optimum + gptqmodel) and GGUF
(read by the gguf package and transformers' GGUF loader), each against references written from the
published formats, not from our packing code."""
from __future__ import annotations

import json
import os

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from safetensors.numpy import load_file, save_file

import pyllama_jax as pj
from pyllama_jax.api import Model
from pyllama_jax.quant.calibrate import quantize_rtn
from pyllama_jax.quant.checkpoint import export_autogptq
from pyllama_jax.quant.packing import dequantize, pack, unpack_codes, unpack_zeros
from pyllama_jax.quant.qlinear import LAYER_LINEARS, get_module, quantized_linears
from pyllama_jax.quant.rtn import QuantSpec, rtn_quantize
from pyllama_jax.train.tiny import random_model

IDS = np.array([[1, 5, 9, 33, 100, 7, 200, 3, 64, 18]], np.int32)
HF_LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
              "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")


# --- GPTQ -------------------------------------------------------------------------------------------

def autogptq_dequantize(qweight, qzeros, scales, g_idx, bits: int, v2: bool) -> np.ndarray:
    """AutoGPTQ's published dequantization (`QuantLinear` torch path) for 2/4/8 bits, in numpy: word
    `r` of `qweight[:, o]` holds inputs `r*32/bits ...`, least significant first; `qzeros` packs the
    zero points along outputs the same way, stored minus one in v1. Returns torch's `[out, in]`."""
    per, mask = 32 // bits, 2 ** bits - 1
    shifts = (bits * np.arange(per)).astype(np.uint32)
    q = ((qweight.view(np.uint32)[:, None, :] >> shifts[None, :, None]) & mask).reshape(-1, qweight.shape[1])
    z = ((qzeros.view(np.uint32)[:, :, None] >> shifts) & mask).reshape(len(qzeros), -1)[:, :scales.shape[1]]
    z = z.astype(np.int64) + (0 if v2 else 1)  # v1 adds one without wrapping: a stored 2**bits-1 is read as 2**bits
    w = scales.astype(np.float32)[g_idx] * (q.astype(np.int64) - z[g_idx]).astype(np.float32)
    return np.ascontiguousarray(w.T)


def dense_from_gptq(folder, dtype=np.float32) -> dict[str, np.ndarray]:
    """The folder's tensors with every packed linear replaced by `autogptq_dequantize` of it."""
    qc = json.load(open(os.path.join(folder, "config.json")))["quantization_config"]
    t = load_file(os.path.join(folder, "model.safetensors"))
    out = {k: v for k, v in t.items() if k.rpartition(".")[2] not in ("qweight", "qzeros", "scales", "g_idx")}
    for base in {k.rpartition(".")[0] for k in t if k.endswith(".qweight")}:
        w = autogptq_dequantize(*(t[f"{base}.{f}"] for f in ("qweight", "qzeros", "scales", "g_idx")),
                                qc["bits"], qc["checkpoint_format"] == "gptq_v2")
        out[f"{base}.weight"] = w.astype(dtype).astype(np.float32)
    return out


def hf_dense_logits(folder, tensors: dict[str, np.ndarray], tmp_path, ids) -> np.ndarray:
    """transformers' float32 `LlamaForCausalLM` on dense `tensors` with the folder's config."""
    from transformers import LlamaForCausalLM

    config = json.load(open(os.path.join(folder, "config.json")))
    config.pop("quantization_config")
    dense = tmp_path / "dense"
    dense.mkdir(exist_ok=True)
    (dense / "config.json").write_text(json.dumps(config))
    save_file(tensors, str(dense / "model.safetensors"))
    model = LlamaForCausalLM.from_pretrained(str(dense), dtype=torch.float32).eval()
    with torch.no_grad():
        return model(torch.tensor(ids)).logits.numpy()


def act_order_rtn(w: np.ndarray, spec: QuantSpec, perm: np.ndarray):
    """RTN over groups of the permuted rows `w[perm]`, stored in the natural order with a non-trivial
    `g_idx` (what GPTQ's `desc_act` without static groups writes)."""
    qw = rtn_quantize(w[perm], spec)
    inv = np.argsort(perm)
    codes = np.asarray(unpack_codes(qw))[inv]
    return pack(codes, np.asarray(qw.scales), np.asarray(unpack_zeros(qw)), (inv // spec.groupsize).astype(np.int32),
                spec.bits, spec.groupsize)


def set_weight(module, path: str, qw) -> None:
    lin = get_module(module, path)
    for field in ("qweight", "scales", "qzeros", "g_idx"):
        getattr(lin, field)[...] = getattr(qw, field)


def check_transformers_gptq(folder, ours: np.ndarray, ids, tmp_path) -> dict[str, float]:
    """transformers (optimum + gptqmodel's CPU kernel) loads the export: every linear it dequantizes
    equals float16(the published-format reference), and its logits match a dense float32 model on
    those float16 weights. Returns the logit gaps (ours - reference, transformers' GPTQ - ours)."""
    from transformers import AutoModelForCausalLM

    ref32 = dense_from_gptq(folder)
    ref16 = {k: (v.astype(np.float16).astype(np.float32) if k.endswith("proj.weight") else v) for k, v in ref32.items()}
    gap_ours = np.abs(hf_dense_logits(folder, ref32, tmp_path, ids) - ours).max()
    assert gap_ours < 1e-3, f"our logits vs the published-format reference: {gap_ours}"
    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32, device_map="cpu").eval()
    for i, layer in enumerate(model.model.layers):
        for name in HF_LINEARS:
            lin = get_module(layer, name)
            assert type(lin).__module__.startswith("gptqmodel"), type(lin)  # not a randomly initialised Linear
            with torch.no_grad():
                theirs = lin.dequantize_weight().T.float().numpy()
            np.testing.assert_array_equal(theirs, ref16[f"model.layers.{i}.{name}.weight"])
    with torch.no_grad():
        theirs = model(torch.tensor(ids)).logits.numpy()
    gap16 = np.abs(theirs - hf_dense_logits(folder, ref16, tmp_path, ids)).max()
    assert gap16 < 1e-3, f"transformers' GPTQ logits vs a dense model on its float16 weights: {gap16}"
    return {"ours_vs_reference": float(gap_ours), "transformers_vs_ours": float(np.abs(theirs - ours).max())}


@pytest.fixture(scope="module")
def smollm2_q4():
    """SmolLM2 with RTN 4-bit g128 block linears (a fresh copy: quantizing changes a model in place)."""
    m = pj.load("smollm2-135m")
    quantize_rtn(m.module, QuantSpec(4, 128))
    return Model(m.module, m.tokenizer, "smollm2-135m", quant={"recipe": {"wbits": 4, "groupsize": 128,
                                                                           "nearest": True}})


@pytest.mark.parametrize("act_order", [False, True], ids=["g128", "act-order"])
def test_gptq_export_of_smollm2_runs_in_transformers(smollm2_q4, act_order, tmp_path):
    model = smollm2_q4
    ids = np.array([model.tokenizer.encode("The quick brown fox jumps over the lazy dog, and then it runs")])
    saved = {p: get_module(model.module.layers[0], p).weight for p in LAYER_LINEARS}
    if act_order:  # layer 0's linears get act-order groups (a permuted g_idx); the rest keep theirs
        dense = pj.load("smollm2-135m").module
        for j, path in enumerate(LAYER_LINEARS):
            w = np.asarray(get_module(dense.layers[0], path).kernel[...])
            perm = np.random.default_rng(j).permutation(w.shape[0])
            set_weight(model.module.layers[0], path, act_order_rtn(w, QuantSpec(4, 128), perm))
        model = Model(model.module, model.tokenizer, "smollm2-135m", quant=model.quant)
    try:
        out = tmp_path / "gptq"
        model.save(str(out), format="gptq")
        qc = json.load(open(out / "config.json"))["quantization_config"]
        assert qc == json.load(open(out / "quantize_config.json"))
        assert (qc["quant_method"], qc["bits"], qc["group_size"], qc["desc_act"], qc["sym"],
                qc["checkpoint_format"]) == ("gptq", 4, 128, act_order, False, "gptq")
        gaps = check_transformers_gptq(out, np.asarray(model.logits(ids)), ids, tmp_path)
    finally:
        for path, qw in saved.items():
            set_weight(smollm2_q4.module.layers[0], path, qw)
    # transformers' kernel rounds each dequantized weight to float16 (scale * (q - zero) in half), which
    # moves SmolLM2's logits (|x| up to ~27) by a few hundredths; the float16 check above is exact.
    assert gaps["transformers_vs_ours"] < 0.15, gaps
    print(f"gptq {'act-order' if act_order else 'g128'}: {gaps}")


def test_gptq_zero_point_zero_writes_v2_and_round_trips(tmp_path):
    """A group of non-negative weights has zero point 0: v1 cannot hold it, so the export is
    `gptq_v2` (zeros unshifted, read as such by transformers/gptqmodel), and our reader takes it back."""
    m = random_model("random:tiny", 0)
    lin = get_module(m.module.layers[0], "attn.q")
    k = np.array(lin.kernel[...])
    k[:32] = np.abs(k[:32])
    lin.kernel[...] = jnp.asarray(k)
    quantize_rtn(m.module, QuantSpec(4, 32))
    assert (np.asarray(unpack_zeros(quantized_linears(m.module)["layers.0.attn.q"])) == 0).any()
    model = Model(m.module, m.tokenizer, "random:tiny")
    qc = export_autogptq(model.module, str(tmp_path / "gptq"), {}, model.tokenizer)
    assert qc["checkpoint_format"] == "gptq_v2" and qc["format"] == "gptq_v2"
    # the published v1 reading of these zeros is wrong where a zero is 0, the v2 reading is right
    t = load_file(str(tmp_path / "gptq" / "model.safetensors"))
    args = [t[f"model.layers.0.self_attn.q_proj.{f}"] for f in ("qweight", "qzeros", "scales", "g_idx")]
    exact = np.asarray(dequantize(quantized_linears(m.module)["layers.0.attn.q"])).T
    np.testing.assert_array_equal(autogptq_dequantize(*args, 4, v2=True), exact)
    assert not np.array_equal(autogptq_dequantize(*args, 4, v2=False), exact)
    back = pj.load(str(tmp_path / "gptq"))
    for name, qw in quantized_linears(back.module).items():
        mine = quantized_linears(m.module)[name]
        for field in ("qweight", "scales", "qzeros", "g_idx"):
            np.testing.assert_array_equal(np.asarray(getattr(qw, field)), np.asarray(getattr(mine, field)))
    np.testing.assert_array_equal(np.asarray(back.logits(IDS)), np.asarray(model.logits(IDS)))
    gaps = check_transformers_gptq(tmp_path / "gptq", np.asarray(model.logits(IDS)), IDS, tmp_path)
    assert gaps["transformers_vs_ours"] < 1e-3, gaps
