"""Native quantized checkpoints and AutoGPTQ import/export, including hand-packed checkpoints."""
import json
import os

import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import save_file

from pyllama_jax.model.config import preset
from pyllama_jax.model.llama import init_model
from pyllama_jax.model import packing
from pyllama_jax.quant.calibrate import quantize_rtn
import pyllama_jax as pj
from pyllama_jax.convert.save import export_autogptq, save_quantized
from pyllama_jax.model.qlinear import LAYER_LINEARS, get_module, quantized_linears
from pyllama_jax.quant.rtn import QuantSpec
from tests.test_packing import _gptq_for_llama_pack

CONFIG = preset("tiny", vocab_size=64, dim=64, hidden_dim=96)  # every linear dimension a multiple of 32
IDS = jnp.asarray(np.random.default_rng(0).integers(0, 64, size=(2, 12)))
HF = {"attn.q": "self_attn.q_proj", "attn.k": "self_attn.k_proj", "attn.v": "self_attn.v_proj",
      "attn.o": "self_attn.o_proj", "mlp.gate": "mlp.gate_proj", "mlp.up": "mlp.up_proj", "mlp.down": "mlp.down_proj"}


def _quantized(bits=4, groupsize=32):
    return quantize_rtn(init_model(CONFIG, seed=1), QuantSpec(bits=bits, groupsize=groupsize))


def _load(folder):
    """`pj.load` of a quantized folder: the module and its recipe."""
    m = pj.load(str(folder))
    return m.module, m.quant["recipe"]


def test_native_round_trip_and_size(tmp_path):
    model = _quantized()
    size = save_quantized(model, str(tmp_path), {"recipe": {"wbits": 4, "groupsize": 32}})
    assert size == sum(os.path.getsize(tmp_path / f) for f in os.listdir(tmp_path))
    loaded, quant = _load(tmp_path)
    assert quant == {"wbits": 4, "groupsize": 32}
    np.testing.assert_array_equal(np.asarray(loaded(IDS)[0]), np.asarray(model(IDS)[0]))


def test_truncated_native_checkpoint(tmp_path):
    save_quantized(_quantized(), str(tmp_path), {"recipe": {"wbits": 4}})
    path = tmp_path / "model.safetensors"
    path.write_bytes(path.read_bytes()[: os.path.getsize(path) // 2])
    with pytest.raises(ValueError, match="model.safetensors: truncated file: tensor '.+' ends at byte"):
        pj.load(str(tmp_path))


def _hf_config(tmp_path):
    c = CONFIG
    (tmp_path / "config.json").write_text(json.dumps({
        "vocab_size": c.vocab_size, "hidden_size": c.dim, "num_hidden_layers": c.n_layers,
        "num_attention_heads": c.n_heads, "num_key_value_heads": c.kv_heads, "intermediate_size": c.hidden_dim,
        "rms_norm_eps": c.norm_eps, "rope_theta": c.rope_theta, "max_position_embeddings": c.max_seq_len,
        "tie_word_embeddings": False, "model_type": "llama"}))


def test_load_hand_packed_autogptq_checkpoint(tmp_path):
    """A checkpoint packed with GPTQ-for-LLaMa's own loops (zeros stored minus one) loads exactly."""
    bits, gs = 3, 32
    rng = np.random.default_rng(5)
    dense = init_model(CONFIG, seed=4)
    tensors, want = {}, {}
    for i in range(CONFIG.n_layers):
        for path in LAYER_LINEARS:
            n_in, n_out = get_module(dense, f"layers.{i}.{path}").kernel[...].shape
            codes = rng.integers(0, 2 ** bits, size=(n_in, n_out))
            zeros = rng.integers(1, 2 ** bits, size=(n_in // gs, n_out))
            scales = rng.uniform(0.01, 0.03, size=(n_in // gs, n_out)).astype(np.float16)
            g_idx = np.arange(n_in) // gs
            name = f"model.layers.{i}.{HF[path]}"
            tensors[f"{name}.qweight"] = _gptq_for_llama_pack(codes, bits)
            tensors[f"{name}.qzeros"] = _gptq_for_llama_pack((zeros - 1).T, bits).T.copy()
            tensors[f"{name}.scales"] = scales
            tensors[f"{name}.g_idx"] = g_idx.astype(np.int32)
            want[f"layers.{i}.{path}"] = scales.astype(np.float32)[g_idx] * (codes - zeros[g_idx])
            get_module(dense, f"layers.{i}.{path}").kernel[...] = jnp.asarray(want[f"layers.{i}.{path}"])
    tensors["model.embed_tokens.weight"] = np.asarray(dense.embed[...])
    tensors["model.norm.weight"] = np.asarray(dense.norm.scale[...])
    tensors["lm_head.weight"] = np.ascontiguousarray(np.asarray(dense.lm_head.kernel[...]).T)
    for i in range(CONFIG.n_layers):
        tensors[f"model.layers.{i}.input_layernorm.weight"] = np.asarray(dense.layers[i].attn_norm.scale[...])
        tensors[f"model.layers.{i}.post_attention_layernorm.weight"] = np.asarray(dense.layers[i].mlp_norm.scale[...])
    save_file(tensors, str(tmp_path / "model.safetensors"))
    _hf_config(tmp_path)
    (tmp_path / "quantize_config.json").write_text(json.dumps({"bits": bits, "group_size": gs, "desc_act": False,
                                                                "sym": False}))
    model, quant = _load(tmp_path)
    assert quant["wbits"] == 3 and quant["groupsize"] == 32
    for name, qw in quantized_linears(model).items():
        np.testing.assert_array_equal(np.asarray(packing.dequantize(qw)), want[name])
    np.testing.assert_allclose(np.asarray(model(IDS)[0]), np.asarray(dense(IDS)[0]), rtol=1e-5, atol=1e-5)


def test_export_then_import_autogptq(tmp_path):
    model = _quantized(bits=4, groupsize=32)
    export_autogptq(model, str(tmp_path / "gptq"), {"wbits": 4, "groupsize": 32})
    qc = json.loads((tmp_path / "gptq" / "quantize_config.json").read_text())
    assert (qc["bits"], qc["group_size"], qc["checkpoint_format"]) == (4, 32, "gptq")
    assert json.loads((tmp_path / "gptq" / "config.json").read_text())["quantization_config"] == qc
    loaded, _ = _load(tmp_path / "gptq")
    # scales keep the model's dtype (float32 here), so the round trip is exact
    np.testing.assert_array_equal(np.asarray(loaded(IDS)[0]), np.asarray(model(IDS)[0]))
    for name, qw in quantized_linears(loaded).items():
        np.testing.assert_array_equal(np.asarray(qw.qweight), np.asarray(quantized_linears(model)[name].qweight))


@pytest.mark.parametrize("change,match", [
    ({"checkpoint_format": "gptq_v3"}, "checkpoint_format='gptq_v3' is not supported"),
    ({"quant_method": "awq"}, "quant_method='awq'"),
    ({"bits": 5}, "bits=5 is not supported"),
])
def test_unsupported_autogptq_format(tmp_path, change, match):
    tmp_path = tmp_path / "gptq"
    export_autogptq(_quantized(), str(tmp_path), {"wbits": 4, "groupsize": 32})
    qc = json.loads((tmp_path / "quantize_config.json").read_text())
    (tmp_path / "quantize_config.json").write_text(json.dumps({**qc, **change}))
    with pytest.raises(ValueError, match=match):
        pj.load(str(tmp_path))


def test_autogptq_wrong_packed_shape(tmp_path):
    tmp_path = tmp_path / "gptq"
    export_autogptq(_quantized(), str(tmp_path), {"wbits": 4, "groupsize": 32})
    qc = json.loads((tmp_path / "quantize_config.json").read_text())
    (tmp_path / "quantize_config.json").write_text(json.dumps({**qc, "bits": 3}))
    with pytest.raises(ValueError, match=r"tensor 'layers.0.mlp.down.qweight' has shape \(12, 64\), expected \(9, 64\)"):
        pj.load(str(tmp_path))
