"""LoRA and QLoRA: only adapters train, merging is exact, gradients reach adapters through a
packed quantized base that stays packed."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from pyllama_jax.data import alpaca
from pyllama_jax.model.llama import Linear
from pyllama_jax.quant.calibrate import quantize_rtn
from pyllama_jax.model.packing import dequantize
from pyllama_jax.model.qlinear import QuantLinear, QuantParam
from pyllama_jax.quant.rtn import QuantSpec
from pyllama_jax.train import lora
from tests.models import random_model
from pyllama_jax.train.trainer import OptimConfig, Trainer

TARGETS = ("attn.q", "attn.v", "mlp.down")
EXAMPLES = [alpaca.Example("Add.", "2 3", "5"), alpaca.Example("Greet.", "", "hello"),
            alpaca.Example("Colour?", "", "blue sky"), alpaca.Example("Opposite.", "up", "down")]


def _batch(model):
    seqs, _ = alpaca.tokenize(EXAMPLES, model.tokenizer, "chat", 48)
    return alpaca.layout(seqs, 48, pack=False).take(np.arange(4))


def _flat(state) -> dict[str, np.ndarray]:
    return {".".join(map(str, p)): np.asarray(v.get_value()) for p, v in nnx.to_flat_state(state)}


def _train(model, batch, steps: int = 4) -> Trainer:
    trainer = Trainer(model, OptimConfig(steps=steps, lr=1e-2, warmup_steps=0), lora=True)
    for s in range(steps):
        trainer.step(batch, s)
    return trainer


def test_lora_trains_only_adapters_and_merges_exactly():
    m = random_model("tiny")
    tokens = jnp.asarray(_batch(m)["tokens"])
    base_logits = m.module(tokens)[0]
    lora.apply_lora(m.module, TARGETS, rank=4, alpha=8.0, dropout=0.1)
    np.testing.assert_array_equal(m.module(tokens)[0], base_logits)  # B = 0: the adapters start as no-ops
    before = _flat(nnx.state(m.module, nnx.Param))
    trainer = _train(m.module, _batch(m))
    after = _flat(nnx.state(trainer.model(), nnx.Param))
    adapters = [k for k in after if k.endswith((".a", ".b"))]
    assert len(adapters) == 2 * len(TARGETS) * 2 and after.keys() == before.keys()  # a, b per target per layer
    assert all(not np.array_equal(before[k], after[k]) for k in adapters if k.endswith(".b"))
    frozen = [k for k in after if k not in adapters]
    assert len(frozen) == 2 * 9 + 3  # per layer 7 linears + 2 norms; embed, norm, lm_head
    assert all(np.array_equal(before[k], after[k]) for k in frozen)  # bitwise untouched

    trained = trainer.model()
    logits = trained(tokens)[0]
    assert float(jnp.abs(logits - base_logits).max()) > 1e-2  # the adapters do something
    merged = lora.merge_lora(trained)
    assert not nnx.state(merged, lora.LoRAParam) and isinstance(merged.layers[1].attn.q, Linear)
    np.testing.assert_allclose(merged(tokens)[0], logits, atol=2e-5)
    # Independently: the merged kernel is W + (alpha / r) A @ B in numpy.
    k = "layers.1.attn.q"
    np.testing.assert_allclose(np.asarray(merged.layers[1].attn.q.kernel[...]),
                               before[f"{k}.base.kernel"] + 2.0 * after[f"{k}.a"] @ after[f"{k}.b"], atol=1e-6)


def test_dropout_acts_only_in_training_view():
    m = random_model("tiny")
    lora.apply_lora(m.module, ("attn.q",), rank=4, alpha=8.0, dropout=0.5)
    lin = m.module.layers[0].attn.q
    lin.b[...] = jnp.ones_like(lin.b[...])
    x = jax.random.normal(jax.random.key(0), (2, 5, 64))
    np.testing.assert_array_equal(lin(x), lin(x))  # inference: deterministic
    train = nnx.view(lin, deterministic=False)
    assert not np.allclose(train(x), lin(x)) and not np.allclose(train(x), train(x))


def test_bad_lora_settings_are_clear():
    m = random_model("tiny").module
    with pytest.raises(ValueError, match="train.lora_targets=.*expected a non-empty subset"):
        lora.apply_lora(m, ("attn.qq",), 4, 8.0)
    with pytest.raises(ValueError, match="train.lora_rank=0"):
        lora.apply_lora(m, ("attn.q",), 0, 8.0)
    lora.apply_lora(m, ("attn.q",), 4, 8.0)
    with pytest.raises(ValueError, match="layers.0.attn.q already has a LoRA adapter"):
        lora.apply_lora(m, ("attn.q",), 4, 8.0)


def test_qlora_gradients_reach_adapters_through_a_packed_base():
    m = random_model("tiny")
    quantize_rtn(m.module, QuantSpec(4, 32))
    packed = _flat(nnx.state(m.module, QuantParam))
    lora.apply_lora(m.module, TARGETS, rank=4, alpha=8.0)
    batch = _batch(m)
    trainer = Trainer(m.module, OptimConfig(steps=4, lr=1e-2, warmup_steps=0), lora=True)
    first = trainer.step(batch, 0)
    assert float(first["grad_norm"]) > 0  # nonzero gradients on the adapters (B's, at step 0)
    for s in range(1, 4):
        last = trainer.step(batch, s)
    assert float(last["loss"]) < float(first["loss"])
    trained = trainer.model()
    q = trained.layers[0].attn.q
    assert isinstance(q.base, QuantLinear) and q.base.qweight[...].dtype == jnp.int32
    after = _flat(nnx.state(trained, QuantParam))
    assert after.keys() == {k.replace(".q.", ".q.base.").replace(".v.", ".v.base.").replace(".down.", ".down.base.")
                            for k in packed}
    assert all(np.array_equal(packed[k.replace(".base.", ".")], v) for k, v in after.items())  # still packed, unchanged
    # Base + adapters on the packed weight == the dense dequantized weight + A @ B after merging.
    tokens = jnp.asarray(batch["tokens"])
    logits = trained(tokens)[0]
    w = np.asarray(dequantize(q.base.weight))
    merged = lora.merge_lora(trained)
    np.testing.assert_allclose(np.asarray(merged.layers[0].attn.q.kernel[...]),
                               w + 2.0 * np.asarray(q.a[...]) @ np.asarray(q.b[...]), atol=1e-6)
    assert not any(isinstance(mod, QuantLinear) for _, mod in nnx.iter_graph(merged))
    np.testing.assert_allclose(merged(tokens)[0], logits, atol=2e-5)


@pytest.mark.parametrize("fmt", ["native", "hf"])  # meta.save is the same exporter interface
def test_export_merges_adapters_and_reloads_with_the_same_logits(fmt, tmp_path):
    import pyllama_jax as pj
    from pyllama_jax.train.run import export

    m = random_model("tiny")
    quantize_rtn(m.module, QuantSpec(4, 32))  # QLoRA: adapters on a packed base
    lora.apply_lora(m.module, TARGETS, rank=4, alpha=8.0)
    for _, var in nnx.to_flat_state(nnx.state(m.module, lora.LoRAParam)):
        var[...] = 0.05 * jax.random.normal(jax.random.key(var[...].size), var[...].shape)
    tokens = jnp.asarray(_batch(m)["tokens"])
    logits = m.module(tokens)[0]
    out = export(m, fmt, str(tmp_path / fmt))
    reloaded = pj.load(out)
    assert reloaded.config.n_layers == 2 and reloaded.tokenizer.encode("hi") == m.tokenizer.encode("hi")
    np.testing.assert_allclose(reloaded.logits(tokens), logits, atol=2e-5)
