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
from pyllama_jax.convert.save import export_autogptq
from pyllama_jax.model.packing import dequantize, pack, unpack_codes, unpack_zeros
from pyllama_jax.model.qlinear import LAYER_LINEARS, get_module, quantized_linears
from pyllama_jax.quant.rtn import QuantSpec, rtn_quantize
from tests.models import random_model

IDS = np.array([[1, 5, 9, 33, 100, 7, 200, 3, 64, 18]], np.int32)
HF_LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
              "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")


BLOCKS = 4  # SmolLM2's first blocks: real weights where parity needs them, at a fraction of the cost


@pytest.fixture(scope="module")
def smollm2_head(smollm2):
    """`make()` -> a fresh dense SmolLM2 cut to its first BLOCKS blocks (its own embedding, final norm and
    tokenizer), to be quantized in place."""
    from pyllama_jax.model.params import build_model, named_tensors

    config = smollm2.config.replace(n_layers=BLOCKS)
    tensors = [(n, w) for n, w in named_tensors(smollm2.module)
               if not n.startswith("layers.") or int(n.split(".")[1]) < BLOCKS]
    return lambda: Model(build_model(config, iter(tensors), "smollm2-135m"), smollm2.tokenizer,
                         f"smollm2-135m, first {BLOCKS} blocks")


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
    """The folder's tensors with every packed linear replaced by `autogptq_dequantize` of it; `dtype`
    float16 rounds the scales and then each weight to half, as a float16 kernel computes them."""
    qc = json.load(open(os.path.join(folder, "config.json")))["quantization_config"]
    t = load_file(os.path.join(folder, "model.safetensors"))
    out = {k: v for k, v in t.items() if k.rpartition(".")[2] not in ("qweight", "qzeros", "scales", "g_idx")}
    for base in {k.rpartition(".")[0] for k in t if k.endswith(".qweight")}:
        qweight, qzeros, scales, g_idx = (t[f"{base}.{f}"] for f in ("qweight", "qzeros", "scales", "g_idx"))
        w = autogptq_dequantize(qweight, qzeros, scales.astype(dtype), g_idx, qc["bits"],
                                qc["checkpoint_format"] == "gptq_v2")
        out[f"{base}.weight"] = w.astype(dtype).astype(np.float32)
    return out


def hf_dense_logits(folder, weights: list[dict[str, np.ndarray]], ids) -> list[np.ndarray]:
    """transformers' float32 `LlamaForCausalLM` (the folder's config) on each set of dense `weights`."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = json.load(open(os.path.join(folder, "config.json")))
    config.pop("quantization_config")
    model = LlamaForCausalLM(LlamaConfig(**config)).eval()
    out = []
    for tensors in weights:
        missing, unexpected = model.load_state_dict({k: torch.from_numpy(v) for k, v in tensors.items()}, strict=False)
        assert not unexpected and set(missing) <= {"lm_head.weight"} and (not missing or config["tie_word_embeddings"])
        with torch.no_grad():
            out.append(model(torch.tensor(ids)).logits.numpy())
    return out


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


def check_transformers_gptq(folder, ours: np.ndarray, ids) -> dict[str, float]:
    """transformers (optimum + gptqmodel's CPU kernel) loads the export: the linears it dequantizes
    equals the published-format reference computed in float16, and its logits match a dense float32
    model on those float16 weights; ours match the float32 reference. Returns the logit gaps."""
    from transformers import AutoModelForCausalLM

    ref32, ref16 = dense_from_gptq(folder), dense_from_gptq(folder, np.float16)
    logits32, logits16 = hf_dense_logits(folder, [ref32, ref16], ids)
    gap_ours = np.abs(logits32 - ours).max()
    assert gap_ours < 1e-3, f"our logits vs the published-format reference: {gap_ours}"
    for package in ("optimum", "gptqmodel"):  # transformers' GPTQ loader needs both (pip install --no-deps)
        pytest.importorskip(package)
    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32, device_map="cpu").eval()
    for i in sorted({0, 1, len(model.model.layers) - 1}):  # each call compiles (torch.compile): a few layers
        for name in HF_LINEARS:
            lin = get_module(model.model.layers[i], name)
            assert type(lin).__module__.startswith("gptqmodel"), type(lin)  # not a randomly initialised Linear
            with torch.no_grad():
                theirs = lin.dequantize_weight().T.float().numpy()
            np.testing.assert_array_equal(theirs, ref16[f"model.layers.{i}.{name}.weight"])
    with torch.no_grad():
        theirs = model(torch.tensor(ids)).logits.numpy()
    gap16 = np.abs(theirs - logits16).max()
    assert gap16 < 1e-3, f"transformers' GPTQ logits vs a dense model on its float16 weights: {gap16}"
    return {"ours_vs_reference": float(gap_ours), "transformers_vs_float16_reference": float(gap16),
            "transformers_vs_ours": float(np.abs(theirs - ours).max())}


def test_gptq_export_of_smollm2_runs_in_transformers(smollm2_head, tmp_path):
    """SmolLM2, RTN 4-bit g128, with act-order groups (a permuted g_idx) in block 0's linears."""
    m = smollm2_head()
    dense = [np.asarray(get_module(m.module.layers[0], p).kernel[...]) for p in LAYER_LINEARS]
    quantize_rtn(m.module, QuantSpec(4, 128))
    for j, (path, w) in enumerate(zip(LAYER_LINEARS, dense)):
        perm = np.random.default_rng(j).permutation(w.shape[0])
        set_weight(m.module.layers[0], path, act_order_rtn(w, QuantSpec(4, 128), perm))
    model = Model(m.module, m.tokenizer, "smollm2-135m", quant={"recipe": {"wbits": 4, "groupsize": 128}})
    ids = np.array([model.tokenizer.encode("The quick brown fox jumps over the lazy dog, and then it runs")])
    out = tmp_path / "gptq"
    model.save(str(out), format="gptq")
    qc = json.load(open(out / "config.json"))["quantization_config"]
    assert qc == json.load(open(out / "quantize_config.json"))
    assert (qc["quant_method"], qc["bits"], qc["group_size"], qc["desc_act"], qc["sym"],
            qc["checkpoint_format"]) == ("gptq", 4, 128, True, False, "gptq")
    gaps = check_transformers_gptq(out, np.asarray(model.logits(ids)), ids)
    # transformers' kernel rounds each dequantized weight to float16 (scale * (q - zero) in half), which
    # moves SmolLM2's logits (|x| up to ~27) by a few hundredths; the float16 checks above are exact.
    assert gaps["transformers_vs_ours"] < 0.15, gaps
    print(f"gptq smollm2 4-bit g128 + act-order block 0: {gaps}")


@pytest.mark.parametrize("zero_point_zero", [True, False], ids=["v2", "v1"])
def test_gptq_tiny_round_trips_and_runs_in_transformers(zero_point_zero, tmp_path):
    """With a group of non-negative weights (zero point 0, which v1 cannot hold) the export is
    `gptq_v2`, zeros unshifted; otherwise v1. Our reader takes either back exactly."""
    m = random_model("random:tiny", 0)
    if zero_point_zero:
        lin = get_module(m.module.layers[0], "attn.q")
        k = np.array(lin.kernel[...])
        k[:32] = np.abs(k[:32])
        lin.kernel[...] = jnp.asarray(k)
    quantize_rtn(m.module, QuantSpec(4, 32))
    q = quantized_linears(m.module)["layers.0.attn.q"]
    assert (np.asarray(unpack_zeros(q)) == 0).any() == zero_point_zero
    model = Model(m.module, m.tokenizer, "random:tiny")
    qc = export_autogptq(model.module, str(tmp_path / "gptq"), {}, model.tokenizer)
    fmt = "gptq_v2" if zero_point_zero else "gptq"
    assert (qc["checkpoint_format"], qc["format"], qc["desc_act"]) == (fmt, fmt, False)
    t = load_file(str(tmp_path / "gptq" / "model.safetensors"))
    args = [t[f"model.layers.0.self_attn.q_proj.{f}"] for f in ("qweight", "qzeros", "scales", "g_idx")]
    exact = np.asarray(dequantize(q)).T
    np.testing.assert_array_equal(autogptq_dequantize(*args, 4, v2=zero_point_zero), exact)
    if zero_point_zero:  # what a v1 reader would make of these zeros
        assert not np.array_equal(autogptq_dequantize(*args, 4, v2=False), exact)
    back = pj.load(str(tmp_path / "gptq"))
    for name, qw in quantized_linears(back.module).items():
        mine = quantized_linears(m.module)[name]
        for field in ("qweight", "scales", "qzeros", "g_idx"):
            np.testing.assert_array_equal(np.asarray(getattr(qw, field)), np.asarray(getattr(mine, field)))
    ours = np.asarray(model.logits(IDS))
    np.testing.assert_array_equal(np.asarray(back.logits(IDS)), ours)
    gaps = check_transformers_gptq(tmp_path / "gptq", ours, IDS)
    assert gaps["transformers_vs_ours"] < 1e-3, gaps


# --- GGUF -------------------------------------------------------------------------------------------

GGUF_NAMES = {"attn.q": "attn_q", "attn.k": "attn_k", "attn.v": "attn_v", "attn.o": "attn_output",
              "mlp.gate": "ffn_gate", "mlp.up": "ffn_up", "mlp.down": "ffn_down"}


def llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's `convert_hf_to_gguf.LlamaModel.permute` of HF q/k rows `[out, in]`."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def gguf_tensors(path, only: tuple[str, ...] | None = None) -> dict[str, tuple[str, np.ndarray]]:
    """Tensors (all, or `only` these) as the gguf package reads and dequantizes them:
    name -> (type, float32 [rows, cols])."""
    from gguf import GGUFReader
    from gguf.quants import dequantize as gguf_dequantize

    return {t.name: (t.tensor_type.name, gguf_dequantize(t.data, t.tensor_type).reshape(
        [int(d) for d in reversed(t.shape)]).astype(np.float32)) for t in GGUFReader(str(path)).tensors
        if only is None or t.name in only}


def gguf_weight(model: Model, layer: int, path: str, dense: np.ndarray) -> np.ndarray:
    """Our `[in, out]` kernel as llama.cpp's converter writes it: `[out, in]`, q/k rows permuted."""
    w = np.asarray(dense, np.float32).T
    c = model.config
    return llama_cpp_permute(w, c.n_heads) if path == "attn.q" else llama_cpp_permute(w, c.kv_heads) \
        if path == "attn.k" else w


def transformers_gguf_logits(path, ids) -> np.ndarray:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path),
                                                 dtype=torch.float32).eval()
    with torch.no_grad():
        return model(torch.tensor(ids)).logits.numpy()


@pytest.mark.parametrize("gguf_type", ["f32", "f16", "bf16", "q8_0"])
def test_gguf_dense_export_read_by_gguf_transformers_and_us(gguf_type, tmp_path):
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize as gguf_dequantize, quantize as gguf_quantize

    qtype = GGMLQuantizationType[gguf_type.upper()]
    model = random_model("random:tiny", 0)
    path = str(tmp_path / "tiny.gguf")
    model.save(path, format="gguf", gguf_type=gguf_type)
    tensors = gguf_tensors(path)
    for i in range(model.config.n_layers):
        assert tensors[f"blk.{i}.attn_norm.weight"][0] == "F32"
        for p, g in GGUF_NAMES.items():
            kind, w = tensors[f"blk.{i}.{g}.weight"]
            want = gguf_weight(model, i, p, get_module(model.module.layers[i], p).kernel[...])
            # the reference: the gguf package's own conversion (llama.cpp's quantizer) of llama.cpp's layout
            want = gguf_dequantize(gguf_quantize(want, qtype), qtype).astype(np.float32)
            assert kind == gguf_type.upper()
            np.testing.assert_array_equal(w, want)
    back = pj.load(path)
    ours = np.asarray(back.logits(IDS))
    assert back.tokenizer.encode("Hello, GGUF! 123") == model.tokenizer.encode("Hello, GGUF! 123")
    gap = np.abs(transformers_gguf_logits(path, IDS) - ours).max()
    assert gap < 1e-3, gap
    if gguf_type == "f32":
        np.testing.assert_array_equal(ours, np.asarray(model.logits(IDS)))


def _f16_scales(model, bits: int = 7) -> None:
    """Round every packed linear's scales to float16 numbers of `bits` significant bits, so `scale`
    and `scale * zero` (zero < 16) are float16 numbers: Q4_1 then holds the weights exactly."""
    for i, layer in enumerate(model.layers):
        for p in LAYER_LINEARS:
            lin = get_module(layer, p)
            s = np.asarray(lin.scales[...], np.float16).view(np.uint16) & np.uint16((0xFFFF << (11 - bits)) & 0xFFFF)
            lin.scales[...] = jnp.asarray(s.view(np.float16).astype(np.float32))


@pytest.mark.parametrize("bits,sym,gguf_type", [(4, False, "q4_1"), (4, True, "q4_1"), (8, True, "q8_0")])
def test_gguf_blocks_hold_packed_weights_exactly(bits, sym, gguf_type, tmp_path, capsys):
    m = random_model("random:tiny", 1)
    quantize_rtn(m.module, QuantSpec(bits, 32, sym=sym))
    _f16_scales(m.module)
    model = Model(m.module, m.tokenizer, "random:tiny")
    path = str(tmp_path / "q.gguf")
    model.save(path, format="gguf")  # the default type for these weights
    assert "note:" not in capsys.readouterr().out  # exact: nothing rounded
    tensors = gguf_tensors(path)
    for i in range(model.config.n_layers):
        for p, g in GGUF_NAMES.items():
            kind, w = tensors[f"blk.{i}.{g}.weight"]
            assert kind == gguf_type.upper()
            exact = gguf_weight(model, i, p, dequantize(quantized_linears(model.module)[f"layers.{i}.{p}"]))
            np.testing.assert_array_equal(w, exact)
    assert tensors["token_embd.weight"][0] == "F32"
    ours = np.asarray(model.logits(IDS))
    back = np.asarray(pj.load(path).logits(IDS))
    np.testing.assert_allclose(back, ours, atol=1e-5, rtol=0)
    gap = np.abs(transformers_gguf_logits(path, IDS) - ours).max()
    assert gap < 1e-3, gap


def test_gguf_q4_1_of_smollm2_runs_in_transformers(smollm2_head, tmp_path, capsys):
    """SmolLM2, RTN 4-bit g32 (float32 scales, so Q4_1's float16 d/m round: the bound is printed)."""
    m = smollm2_head()
    quantize_rtn(m.module, QuantSpec(4, 32))
    model = Model(m.module, m.tokenizer, "smollm2-135m")
    path = str(tmp_path / "smollm2-q4_1.gguf")
    model.save(path, format="gguf", gguf_type="q4_1")
    note = capsys.readouterr().out
    step = float(note.split("at most ")[1].split(" of a")[0])
    assert 0 < step < 30 * 2 ** -11, note
    tensors = gguf_tensors(path, only=("blk.3.ffn_down.weight",))
    qw = quantized_linears(model.module)["layers.3.mlp.down"]
    kind, w = tensors["blk.3.ffn_down.weight"]
    exact = gguf_weight(model, 3, "mlp.down", dequantize(qw))
    scale = np.repeat(np.asarray(qw.scales).T, 32, axis=1)
    assert kind == "Q4_1" and np.max(np.abs(w - exact) / scale) <= step * (1 + 1e-6)
    ids = np.array([model.tokenizer.encode("The quick brown fox jumps over the lazy dog, and then it runs")])
    back = pj.load(path)
    text = "In 1905, 3 papers: <|im_start|>user"
    assert back.tokenizer.encode(text) == model.tokenizer.encode(text)
    assert back.tokenizer.chat_template == model.tokenizer.chat_template
    ours = np.asarray(back.logits(ids))
    gap = np.abs(transformers_gguf_logits(path, ids) - ours).max()
    assert gap < 1e-3, gap
    print(f"gguf q4_1 smollm2: transformers vs ours (same file) {gap:.2e}, ours vs the in-memory model "
          f"{np.abs(ours - np.asarray(model.logits(ids))).max():.2e}, weights moved <= {step:.2e} step")


@pytest.mark.parametrize("bits,groupsize,sym,gguf_type,match", [
    (4, 64, False, "q4_1", r"4-bit groupsize 64 asymmetric cannot be written as GGUF q4_1.*nearest supported: q4_1"),
    (8, 32, False, "q8_0", r"8-bit groupsize 32 asymmetric cannot be written as GGUF q8_0.*8-bit sym=True"),
    (2, 32, False, "q4_1", r"2-bit groupsize 32 asymmetric cannot be written as GGUF q4_1"),
    (None, None, None, "q4_1", r"q4_1 holds 4-bit quantized weights, not dense ones.*wbits=4, groupsize=32"),
    (4, 32, False, "q5_0", r"gguf_type='q5_0' is not supported; expected one of"),
])
def test_gguf_refuses_what_its_blocks_cannot_hold(bits, groupsize, sym, gguf_type, match, tmp_path):
    m = random_model("random:tiny", 0)
    if bits:
        quantize_rtn(m.module, QuantSpec(bits, groupsize, sym=sym))
    with pytest.raises(ValueError, match=match):
        Model(m.module, m.tokenizer).save(str(tmp_path / "x.gguf"), format="gguf", gguf_type=gguf_type)
    assert not os.listdir(tmp_path)  # nothing half-written


def test_convert_script_exports_gguf_and_gptq(tmp_path, capsys):
    """`scripts/convert.py --to gguf|gptq` (through pj.load and Model.save); --to hf still streams."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("convert_script", os.path.join(
        os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "scripts", "convert.py"))
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    m = random_model("random:tiny", 2)
    m.save(str(tmp_path / "dense"))
    with pytest.raises(SystemExit, match="a dense model; GPTQ export needs a quantized one"):
        script.main(["--src", str(tmp_path / "dense"), "--to", "gptq", "--out", str(tmp_path / "g")])
    script.main(["--src", str(tmp_path / "dense"), "--to", "gguf", "--gguf-type", "bf16", "--out", str(tmp_path / "d.gguf")])
    script.main(["--src", str(tmp_path / "dense"), "--to", "hf", "--out", str(tmp_path / "hf")])
    assert gguf_tensors(tmp_path / "d.gguf", only=("blk.0.attn_q.weight",))["blk.0.attn_q.weight"][0] == "BF16"
    np.testing.assert_array_equal(np.asarray(pj.load(str(tmp_path / "hf")).logits(IDS)), np.asarray(m.logits(IDS)))
    quantize_rtn(m.module, QuantSpec(4, 32))
    q = Model(m.module, m.tokenizer, "random:tiny", quant={"recipe": {"wbits": 4, "groupsize": 32, "nearest": True}})
    q.save(str(tmp_path / "q"))
    script.main(["--src", str(tmp_path / "q"), "--to", "gptq", "--out", str(tmp_path / "gptq")])
    np.testing.assert_array_equal(np.asarray(pj.load(str(tmp_path / "gptq")).logits(IDS)), np.asarray(q.logits(IDS)))
    assert "wrote" in capsys.readouterr().out
