"""AWQ and SignRound in the block-by-block driver: AWQ's pre-pass keeps the float model, picks the
scales `awq_quantize` picks on the same inputs, and survives a resume; both beat RTN end to end on a
small random model; the recipe's fields are validated and recorded."""
from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import numpy as np
import pytest

from pyllama_jax.model.config import preset
from pyllama_jax.model.llama import Llama, init_model
from pyllama_jax.model.qlinear import get_module
from pyllama_jax.quant.awq import AWQConfig, awq_quantize
from pyllama_jax.quant.awq_block import AWQ_GROUPS, awq_prepass
from pyllama_jax.quant.calibrate import CalibrationConfig, Rounding, quantize_calibrated, rtn_rounding
from pyllama_jax.quant.driver import quantize
from pyllama_jax.quant.recipe import QuantRecipe, recipe_record
from pyllama_jax.quant.rtn import QuantSpec
from pyllama_jax.quant.taps import block_out, linear_inputs

SPEC = QuantSpec(bits=4, groupsize=32)
CALIB = np.random.default_rng(5).integers(0, 256, size=(8, 64))
HELD_OUT = np.random.default_rng(6).integers(0, 256, size=(4, 64))
# quantized / RTN relative logit error at 4-bit g32 on seeds 0-5, measured: AWQ 0.49 - 1.22 (mean 0.74),
# SignRound (100 steps) 0.43 - 0.86 (mean 0.70); at 3-bit g32 the means are 0.69 and 0.69
MEAN_RATIO_BOUND = 0.85
AWQ_GPTQ_BOUND = 0.8  # AWQ+GPTQ / GPTQ, 4-bit g32, seeds 0-5: 0.55 - 0.67 (every model)


def outlier_model(seed: int, n_layers: int = 2) -> Llama:
    """`tiny` with random weights and norm scales `exp(N(0, 1))`, four channels of each x10: activations
    with outlier channels, as trained models have."""
    model = init_model(preset("tiny", n_layers=n_layers), seed=seed)
    rng = np.random.default_rng(seed)
    for layer in model.layers:
        for norm in (layer.attn_norm, layer.mlp_norm):
            s = np.exp(rng.normal(size=norm.scale[...].shape)).astype(np.float32)
            s[rng.choice(len(s), 4, replace=False)] *= 10
            norm.scale[...] = jnp.asarray(s)
    return model


def embedded(model: Llama, ids: np.ndarray) -> np.ndarray:
    return np.asarray(jnp.take(model.embed[...], jnp.asarray(ids), axis=0))


_FORWARDS: dict = {}  # one jitted forward per model structure (eager dispatch dominated these tests)


def logits(model: Llama, ids: np.ndarray) -> np.ndarray:
    import jax
    from flax import nnx

    graphdef, state = nnx.split(model)
    if graphdef not in _FORWARDS:
        _FORWARDS[graphdef] = jax.jit(lambda s, i: nnx.merge(graphdef, s)(i)[0])
    return np.asarray(_FORWARDS[graphdef](state, jnp.asarray(ids)))


def test_prepass_keeps_the_float_model():
    model = outlier_model(0)
    want = logits(model, HELD_OUT)
    x, batches = embedded(model, CALIB), [slice(0, 4), slice(4, 8)]
    for i, layer in enumerate(model.layers):
        found = awq_prepass(layer, x, batches, SPEC, AWQConfig())
        assert all(alpha > 0 for _, alpha in found.values()), (i, found)  # the scales do change the block
        x = np.concatenate([np.asarray(block_out(layer, jnp.asarray(x[b]))) for b in batches])
    got = logits(model, HELD_OUT)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())


def test_prepass_scales_are_awq_quantize_on_the_tapped_inputs():
    """Each group's scales equal `awq_quantize` given `x^T x` and `mean|x|` computed in numpy (float64)
    from block 0's float inputs."""
    model = outlier_model(1)
    layer, x = model.layers[0], embedded(model, CALIB)
    acts, _ = linear_inputs(layer, jnp.asarray(x))
    kernels = {p: np.asarray(get_module(layer, p).kernel[...]) for paths, _ in AWQ_GROUPS.values() for p in paths}
    found = awq_prepass(layer, x, [slice(0, 3), slice(3, 8)], SPEC, AWQConfig())
    for group, (paths, _) in AWQ_GROUPS.items():
        a = np.asarray(acts[paths[0]], np.float64).reshape(-1, kernels[paths[0]].shape[0])
        want = awq_quantize((a.T @ a).astype(np.float32), np.abs(a).mean(0).astype(np.float32),
                            [kernels[p] for p in paths], SPEC)
        s, alpha = found[group]
        assert alpha == want.alpha, group
        np.testing.assert_allclose(np.asarray(s), np.asarray(want.scales), rtol=1e-5, err_msg=group)


def test_awq_and_signround_beat_rtn_end_to_end():
    """Relative error of the logits on held-out ids against the float model's, on 6 models, as a ratio
    to RTN's: lower on average (one model's AWQ can do worse than RTN end to end: its scales are best
    for each group on the calibration inputs only)."""
    ratios = {"awq": [], "signround": []}
    base = QuantRecipe(wbits=4, groupsize=32, nearest=True)
    for seed in range(6):
        want = logits(outlier_model(seed), HELD_OUT)

        def err(recipe: QuantRecipe) -> float:
            got = logits(quantize(outlier_model(seed), recipe, calibration=CALIB, batch_size=4), HELD_OUT)
            return float(np.sum((got - want) ** 2) / np.sum(want ** 2))

        rtn = err(base)
        ratios["awq"].append(err(dataclasses.replace(base, awq=True)) / rtn)
        ratios["signround"].append(err(dataclasses.replace(base, signround_steps=100)) / rtn)
    assert max(np.mean(r) for r in ratios.values()) < MEAN_RATIO_BOUND, ratios


def test_awq_with_gptq_beats_gptq():
    """AWQ's pre-pass before GPTQ (the rescaled block's Hessians tapped from its own forward): the logits'
    relative error on held-out ids below plain GPTQ's on each of 3 models."""
    base = QuantRecipe(wbits=4, groupsize=32, nsamples=8, seqlen=64)
    ratios = []
    for seed in range(3):
        want = logits(outlier_model(seed), HELD_OUT)
        errors = [np.sum((logits(quantize(outlier_model(seed), recipe, calibration=CALIB, batch_size=4), HELD_OUT)
                          - want) ** 2) for recipe in (base, dataclasses.replace(base, awq=True))]
        ratios.append(float(errors[1] / errors[0]))
    assert max(ratios) < AWQ_GPTQ_BOUND, ratios


def test_resume_restores_awq_folded_blocks(tmp_path):
    """Killed in block 1 of 3: the rerun loads block 0 (packed weights and AWQ-folded norms) and ends as
    an uninterrupted run; a folder of another method is refused."""
    rtn, awq = rtn_rounding(SPEC), AWQConfig(clip=True)
    full = quantize_calibrated(outlier_model(2, 3), CALIB, SPEC, rtn, CalibrationConfig(4), awq)
    done = []

    def killed(kernel, h, name):
        if name.startswith("layers.1."):
            raise KeyboardInterrupt
        return rtn.quantize(kernel, h, name)

    with pytest.raises(KeyboardInterrupt):
        quantize_calibrated(outlier_model(2, 3), CALIB, SPEC, dataclasses.replace(rtn, quantize=killed),
                            CalibrationConfig(4, str(tmp_path)), awq)

    def counted(kernel, h, name):
        done.append(name)
        return rtn.quantize(kernel, h, name)

    resumed = quantize_calibrated(outlier_model(2, 3), CALIB, SPEC, dataclasses.replace(rtn, quantize=counted),
                                  CalibrationConfig(4, str(tmp_path)), awq)
    assert {name.split(".")[1] for name in done} == {"1", "2"}
    np.testing.assert_array_equal(logits(resumed, HELD_OUT), logits(full, HELD_OUT))
    with pytest.raises(ValueError, match="settings.json: this folder holds a run with other settings"):
        quantize_calibrated(outlier_model(2, 3), CALIB, SPEC, rtn, CalibrationConfig(4, str(tmp_path)), AWQConfig())


@pytest.mark.parametrize("fields,message", [
    (dict(signround_steps=200), "signround_steps=200 replaces the rounding: set nearest=True"),
    (dict(signround_steps=-1, nearest=True), "signround_steps=-1"),
    (dict(awq_clip=True, nearest=True), "awq_clip=True .* set awq=True"),
    (dict(signround_steps=50, nearest=True, mse=True), "mse=True with signround_steps=50"),
])
def test_bad_method_fields_name_the_field(fields, message):
    with pytest.raises(ValueError, match=message):
        QuantRecipe(**fields)


def test_records_keep_new_methods_only_when_on():
    """Records of recipes without the new methods are what they were; with them, their fields (and an
    RTN recipe's calibration, which AWQ and SignRound use) are kept."""
    assert recipe_record(QuantRecipe()) == {
        "wbits": 4, "groupsize": 128, "nearest": False, "sym": False, "mse": False, "act_order": False,
        "percdamp": 0.01, "blocksize": 128, "calibration": "c4", "nsamples": 128, "seqlen": 2048, "seed": 0}
    assert recipe_record(QuantRecipe(nearest=True)) == {
        "wbits": 4, "groupsize": 128, "nearest": True, "sym": False, "mse": False}
    assert recipe_record(QuantRecipe(nearest=True, awq=True, awq_clip=True)) == {
        "wbits": 4, "groupsize": 128, "nearest": True, "sym": False, "mse": False, "calibration": "c4",
        "nsamples": 128, "seqlen": 2048, "seed": 0, "awq": True, "awq_clip": True}
    assert recipe_record(QuantRecipe(awq=True))["awq"] is True
    assert recipe_record(QuantRecipe(nearest=True, signround_steps=200))["signround_steps"] == 200
    assert QuantRecipe(nearest=True, awq=True, awq_clip=True).describe() == "RTN+AWQ+clip 4-bit g128"
    assert QuantRecipe(nearest=True, signround_steps=200, groupsize=-1).describe() == "SignRound-200 4-bit per-row"


def test_checkpoint_with_awq_is_not_reused_without_it(tmp_path):
    from pyllama_jax.config import base_config
    from pyllama_jax.convert import native
    from pyllama_jax.jobs.quantize import load_or_quantize, quant_config
    from pyllama_jax.model.params import named_tensors
    from tests.models import random_model

    source = random_model("random:tiny", 0)
    native.save(str(tmp_path / "dense"), source.config, named_tensors(source.module), source.tokenizer)
    (tmp_path / "calib.txt").write_text("It is a truth universally acknowledged, " * 40)
    c = base_config()
    c.model = str(tmp_path / "dense")
    c.quant = quant_config(wbits=4, groupsize=32, nearest=True, awq=True, calibration=str(tmp_path / "calib.txt"),
                           nsamples=2, seqlen=32, save=str(tmp_path / "q"))
    made = load_or_quantize(c)
    assert made.quant["recipe"]["awq"] is True and "RTN+AWQ 4-bit g32, calibration" in made.describe()
    c.quant.awq = False
    with pytest.raises(ValueError, match="awq: checkpoint True, config False"):
        load_or_quantize(c)
    c.quant.save = str(tmp_path / "plain")
    load_or_quantize(c)  # an RTN checkpoint, not asked for AWQ: reused below only without it
    c.quant.awq = True
    with pytest.raises(ValueError, match="awq: checkpoint False, config True"):
        load_or_quantize(c)
