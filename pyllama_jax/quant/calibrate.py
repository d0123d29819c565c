"""Quantize a whole model: RTN directly, or block by block on calibration activations.

The calibrated driver, true-sequential: block 0's inputs are captured for every calibration sample;
in each block an optional pre-pass (AWQ's scale search and folding, on the float block) runs first,
then the groups `[k, v, q] -> [o] -> [up, gate] -> [down]` are quantized in turn by a `Rounding`
(GPTQ, RTN or SignRound), each from the Hessian of its inputs as produced by the already-quantized
parts of the block (taps.py), and the quantized block's outputs feed the next block. Only the
current block and the activations are put on the device. With `resume_dir`, every finished block is
saved with the next block's inputs, and a rerun continues at the first unfinished block (resume.py).
"""
from __future__ import annotations

import dataclasses
import logging
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm import tqdm

from pyllama_jax.model.llama import Llama
from pyllama_jax.model.packing import QuantWeight
from pyllama_jax.model.qlinear import LAYER_LINEARS, get_module, replace_linear
from pyllama_jax.quant.awq import AWQConfig
from pyllama_jax.quant.awq_block import awq_prepass
from pyllama_jax.quant.gptq import GPTQConfig, HessianAccumulator, gptq_quantize
from pyllama_jax.quant.resume import resume_point, save_block
from pyllama_jax.quant.rtn import QuantSpec, rtn_quantize
from pyllama_jax.quant.signround import SignRoundConfig, signround_quantize
# linear_inputs: experiments/layer_error.py and benchmarks/gptq_speed.py import it from here
from pyllama_jax.quant.taps import SEQUENTIAL, block_out, group_inputs, linear_inputs  # noqa: F401

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class CalibrationConfig:
    """How the calibrated driver sees its calibration data."""

    batch_size: int = 8  # calibration samples per forward call
    resume_dir: str | None = None  # save each finished block here and resume from it


@dataclasses.dataclass(frozen=True)
class Rounding:
    """How the calibrated driver rounds each linear: `quantize(kernel, h, name)`, `h` the Hessian of
    its inputs (None when `uses_inputs` is False), and the settings a resume folder must match."""

    name: str
    quantize: Callable[[jax.Array, jax.Array | None, str], QuantWeight]
    settings: dict
    uses_inputs: bool = True


def gptq_rounding(spec: QuantSpec, gptq: GPTQConfig = GPTQConfig()) -> Rounding:
    def solve(kernel: jax.Array, h: jax.Array, name: str) -> QuantWeight:
        qw, loss = gptq_quantize(kernel, h, spec, gptq, name)
        log.info("%s: GPTQ loss %.4g", name, loss)
        return qw

    return Rounding("GPTQ", solve, {"gptq": dataclasses.asdict(gptq)})


def rtn_rounding(spec: QuantSpec) -> Rounding:
    return Rounding("RTN", lambda kernel, h, name: rtn_quantize(kernel, spec, name), {"rtn": True}, uses_inputs=False)


def signround_rounding(spec: QuantSpec, config: SignRoundConfig) -> Rounding:
    return Rounding("SignRound", lambda kernel, h, name: signround_quantize(h, kernel, spec, config, name),
                    {"signround": dataclasses.asdict(config)})


def quantize_rtn(model: Llama, spec: QuantSpec) -> Llama:
    """Replace every block linear of `model` (in place) by its round-to-nearest `QuantLinear`."""
    for i, layer in enumerate(tqdm(model.layers, desc=f"RTN {spec.bits}-bit", unit="block")):
        for path in LAYER_LINEARS:
            lin = get_module(layer, path)
            replace_linear(layer, path, rtn_quantize(lin.kernel[...], spec, f"layers.{i}.{path}"))
    return model


def _settings(spec: QuantSpec, rounding: Rounding, awq: AWQConfig | None, calib: np.ndarray) -> dict:
    return {"spec": dataclasses.asdict(spec), **rounding.settings,
            **({"awq": dataclasses.asdict(awq)} if awq is not None else {}),
            "calibration_shape": list(calib.shape), "calibration_checksum": int(np.asarray(calib, np.int64).sum())}


def run_batched(stage: Callable, layer, x: np.ndarray, batch_size: int) -> np.ndarray:
    """`stage(layer, x)` over all samples of `x`, `batch_size` at a time; outputs gathered on the host."""
    return np.concatenate([np.asarray(stage(layer, jnp.asarray(x[i:i + batch_size])))
                           for i in range(0, len(x), batch_size)])


def inputs_hessian(acts: np.ndarray, batch_size: int) -> jax.Array:
    """GPTQ's Hessian of a linear's inputs `acts[n, t, in]`, accumulated `batch_size` samples at a time."""
    acc = HessianAccumulator(acts.shape[-1])
    for i in range(0, len(acts), batch_size):
        acc.add(jnp.asarray(acts[i:i + batch_size]))
    return acc.hessian()


def quantize_calibrated(model: Llama, calib: np.ndarray, spec: QuantSpec, rounding: Rounding,
                        config: CalibrationConfig = CalibrationConfig(), awq: AWQConfig | None = None) -> Llama:
    """Quantize every block linear of `model` (in place) by `rounding` on calibration ids `calib[n, seqlen]`,
    each block first rescaled by AWQ's pre-pass when `awq` is given."""
    calib = np.asarray(calib, np.int32)
    n = len(calib)
    bs = config.batch_size
    start, x = 0, None
    if config.resume_dir:
        start, x = resume_point(model, _settings(spec, rounding, awq, calib), config.resume_dir)
    if x is None:
        embed = model.embed[...]
        x = np.concatenate([np.asarray(jnp.take(embed, jnp.asarray(calib[i:i + bs]), axis=0)
                                       .astype(model.config.compute_dtype)) for i in range(0, n, bs)])
    batches = [slice(i, i + bs) for i in range(0, n, bs)]

    how = ("AWQ + " if awq is not None else "") + rounding.name
    for i in tqdm(range(start, model.config.n_layers), desc=f"{how} {spec.bits}-bit", unit="block",
                  initial=start, total=model.config.n_layers):
        layer = model.layers[i]
        _, state = nnx.split(layer)
        nnx.update(layer, jax.device_put(state))
        if awq is not None:
            for group, (_, alpha) in awq_prepass(layer, x, batches, spec, awq, f"layers.{i}").items():
                log.info("layers.%d %s: AWQ alpha %.2f", i, group, alpha)
        for paths, group_input in zip(SEQUENTIAL, group_inputs):
            h = inputs_hessian(run_batched(group_input, layer, x, bs), bs) if rounding.uses_inputs else None
            for path in paths:
                replace_linear(layer, path, rounding.quantize(get_module(layer, path).kernel[...], h,
                                                              f"layers.{i}.{path}"))
        x = run_batched(block_out, layer, x, bs)
        if config.resume_dir:
            save_block(config.resume_dir, i, layer, x)
    return model


def quantize_gptq(model: Llama, calib: np.ndarray, spec: QuantSpec, gptq: GPTQConfig = GPTQConfig(),
                  config: CalibrationConfig = CalibrationConfig()) -> Llama:
    """GPTQ-quantize every block linear of `model` (in place) on calibration ids `calib[n, seqlen]`."""
    return quantize_calibrated(model, calib, spec, gptq_rounding(spec, gptq), config)
