"""Job-config sections are made from their dataclasses: every field with its one default, overrides
that reach the objects they configure, and a misspelt field named in one clear error."""
from __future__ import annotations

import dataclasses
import os

import numpy as np
import optax
import pytest
from absl import flags
from ml_collections import config_flags

import pyllama_jax as pj
from pyllama_jax.config import SECTIONS, base_config
from pyllama_jax.generate import Generator, SamplingConfig
from pyllama_jax.model.config import preset
from pyllama_jax.model.llama import init_model
from pyllama_jax.sections import config_section, from_section
from pyllama_jax.train.trainer import OptimConfig, optimizer, schedule

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _defaults(cls: type) -> dict:
    return {f.name: f.default for f in dataclasses.fields(cls)}


@pytest.mark.parametrize("name", sorted(SECTIONS))
def test_every_field_is_in_its_section_with_its_default(name):
    section = base_config()[name]
    expected = {k: v for cls in SECTIONS[name] for k, v in _defaults(cls).items()}
    assert section.to_dict() == expected
    for cls in SECTIONS[name]:
        assert from_section(cls, section) == cls()


def test_quant_section_holds_every_recipe_field():
    quant = base_config().quant
    assert {k: quant[k] for k in _defaults(pj.QuantRecipe)} == {**_defaults(pj.QuantRecipe), "wbits": 0}


def _parse(*overrides: str):
    """A packaged config file with command-line overrides, parsed by ml_collections' config_flags."""
    argv = ["prog", f"--config={os.path.join(ROOT, 'configs', 'alpaca_lora.py')}", *overrides]
    values = flags.FlagValues()
    config_flags.DEFINE_config_file("config", flag_values=values, sys_argv=argv)
    values(argv)
    return values.config


class _AllEos:
    """Every id ends a sequence: a generation stops at its first token unless EOS is ignored."""

    eos_ids = frozenset(range(512))
    bos_id, eos_id, add_bos = None, 0, False

    def decode(self, ids) -> str:
        return "x" * len(ids)


def test_ignore_eos_from_the_command_line_reaches_the_generator():
    gen = Generator(init_model(preset("tiny", max_seq_len=64), seed=2), _AllEos())
    for flag, tokens, reason in (("False", 0, "stop"), ("True", 6, "length")):
        c = _parse(f"--config.sampling.ignore_eos={flag}", "--config.sampling.max_new_tokens=6")
        g = gen.generate([[5, 6, 7]], from_section(SamplingConfig, c.sampling))
        assert (len(g.tokens[0]), g.finish_reasons[0]) == (tokens, reason)


def test_adam_betas_from_the_command_line_reach_the_optimizer():
    """Two AdamW steps with the configured betas against Adam written out in numpy (one step would
    not tell: bias correction makes the first update independent of the betas)."""
    c = _parse("--config.train.b1=0.5", "--config.train.b2=0.75", "--config.train.warmup_steps=0",
               "--config.train.clip_norm=0.0")
    optim = from_section(OptimConfig, c.train)
    assert (optim.b1, optim.b2) == (0.5, 0.75)
    tx, lr = optimizer(optim), schedule(optim)
    p = np.array([1.0, -2.0, 3.0], np.float32)
    grads = [np.array([0.5, 1.0, -1.5], np.float32), np.array([-2.0, 0.25, 1.0], np.float32)]
    state, params = tx.init(p), p
    m = v = np.zeros(3)
    ref = p.astype(np.float64)
    for t, g in enumerate(grads, 1):
        updates, state = tx.update(g, state, params)
        params = optax.apply_updates(params, updates)
        m, v = 0.5 * m + 0.5 * g, 0.75 * v + 0.25 * g.astype(np.float64) ** 2
        ref = ref - float(lr(t - 1)) * (m / (1 - 0.5 ** t)) / (np.sqrt(v / (1 - 0.75 ** t)) + 1e-8)
    np.testing.assert_allclose(params, ref, rtol=1e-5)


def test_a_misspelt_field_is_one_clear_error():
    c = base_config()
    with pytest.raises(AttributeError, match='"max_new_token" does not exist.*Did you mean "max_new_tokens"'):
        c.sampling.max_new_token = 5
    with pytest.raises(AttributeError, match='Did you mean "ignore_eos"'):
        _parse("--config.sampling.ignroe_eos=True")
    with pytest.raises(KeyError, match="'b3' is not a field of OptimConfig; expected one of"):
        config_section(OptimConfig, b3=0.9)
    with pytest.raises(KeyError, match="the config section for SamplingConfig has no field 'ignore_eos'"):
        from_section(SamplingConfig, {k: v for k, v in _defaults(SamplingConfig).items() if k != "ignore_eos"})
