"""Quantize a whole model: RTN directly, GPTQ layer by layer on calibration activations.

GPTQ's driver, true-sequential: block 0's inputs are captured for every calibration sample; in
each block the groups `[k, v, q] -> [o] -> [up, gate] -> [down]` are quantized in turn, each from
the Hessian of its inputs as produced by the already-quantized parts of the block, and the
quantized block's outputs feed the next block. Each group's inputs are tapped from the block's own
forward (`Block.__call__`), jitted so that the part of the block after the tapped linear is not
computed. Only the current block and the activations are put on the device. With `resume_dir`,
every finished block's packed weights are saved with the next block's inputs, and a rerun continues
at the first unfinished block.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm import tqdm

from pyllama_jax.model.llama import Block, Llama
from pyllama_jax.quant.gptq import GPTQConfig, HessianAccumulator, gptq_quantize
from pyllama_jax.model.qlinear import LAYER_LINEARS, get_module, replace_linear, set_linear
from pyllama_jax.quant.rtn import QuantSpec, rtn_quantize

log = logging.getLogger(__name__)


class _Tap:
    """Stands in for a linear layer inside a traced block and records its input."""

    def __init__(self, inner: Callable, record: list):
        self.inner, self.record = inner, record

    def __call__(self, x: jax.Array) -> jax.Array:
        self.record.append(x)
        return self.inner(x)


def _tapped_forward(layer: Block, x: jax.Array, paths: tuple[str, ...]) -> tuple[list[jax.Array], jax.Array]:
    """The inputs reaching `layer.<path>` for each of `paths` while the block runs its own forward
    (`Block.__call__`, causal) on `x`, and the block's output. Under jit, what no returned value
    needs (the rest of the block after a tapped linear) is dead code and is not computed."""
    seen: dict[str, list] = {path: [] for path in paths}
    for path in paths:
        set_linear(layer, path, _Tap(get_module(layer, path), seen[path]))
    out, _ = layer(x, jnp.broadcast_to(jnp.arange(x.shape[1]), x.shape[:2]))
    return [seen[path][0] for path in paths], out


def _jit_block(fn):
    """`fn(layer, x)` jitted with the block's graphdef static, so blocks with the same quantized/dense
    structure share one compiled program."""
    run = jax.jit(lambda graphdef, state, x: fn(nnx.merge(graphdef, state), x), static_argnums=0)
    return lambda layer, x: run(*nnx.split(layer), x)


SEQUENTIAL = (("attn.k", "attn.v", "attn.q"), ("attn.o",), ("mlp.up", "mlp.gate"), ("mlp.down",))

# The input of each group of `SEQUENTIAL` (its linears share one input; the last of each group runs
# first in the block), and the block's output.
_group_inputs = [_jit_block(lambda layer, x, path=paths[-1]: _tapped_forward(layer, x, (path,))[0][0])
                 for paths in SEQUENTIAL]
_block_out = _jit_block(lambda layer, x: layer(x, jnp.broadcast_to(jnp.arange(x.shape[1]), x.shape[:2]))[0])
_all_inputs = _jit_block(lambda layer, x: _tapped_forward(layer, x, tuple(p[-1] for p in SEQUENTIAL)))


def linear_inputs(layer: Block, x: jax.Array) -> tuple[dict[str, jax.Array], jax.Array]:
    """The input `[b, t, in]` of each linear of `layer` for block inputs `x`, and the block's output."""
    groups, out = _all_inputs(layer, x)
    return {path: a for paths, a in zip(SEQUENTIAL, groups) for path in paths}, out


@dataclasses.dataclass(frozen=True)
class CalibrationConfig:
    """How GPTQ sees its calibration data."""

    batch_size: int = 8  # calibration samples per forward call
    resume_dir: str | None = None  # save each finished block here and resume from it


def quantize_rtn(model: Llama, spec: QuantSpec) -> Llama:
    """Replace every block linear of `model` (in place) by its round-to-nearest `QuantLinear`."""
    for i, layer in enumerate(tqdm(model.layers, desc=f"RTN {spec.bits}-bit", unit="block")):
        for path in LAYER_LINEARS:
            lin = get_module(layer, path)
            replace_linear(layer, path, rtn_quantize(lin.kernel[...], spec, f"layers.{i}.{path}"))
    return model


def _settings(spec: QuantSpec, gptq: GPTQConfig, calib: np.ndarray) -> dict:
    return {"spec": dataclasses.asdict(spec), "gptq": dataclasses.asdict(gptq),
            "calibration_shape": list(calib.shape), "calibration_checksum": int(np.asarray(calib, np.int64).sum())}


def _resume_point(model: Llama, settings: dict, folder: str) -> tuple[int, np.ndarray | None]:
    """Load the blocks finished in `folder` into `model`; return (next block, its inputs)."""
    from pyllama_jax.convert.save import load_quant_weights

    os.makedirs(folder, exist_ok=True)
    meta = os.path.join(folder, "settings.json")
    if os.path.exists(meta):
        with open(meta) as f:
            saved = json.load(f)
        if saved != settings:
            raise ValueError(f"{meta}: this folder holds a run with other settings ({saved}); "
                             "use another resume_dir or delete it")
    else:
        _write_json(meta, settings)
    done, x = 0, None
    while os.path.exists(os.path.join(folder, f"block{done:03d}.safetensors")):
        done += 1
    while done and not os.path.exists(os.path.join(folder, f"inputs{done:03d}.npy")):
        done -= 1  # only the inputs of the first unfinished block are kept
    for i in range(done):
        for path, qw in load_quant_weights(os.path.join(folder, f"block{i:03d}.safetensors")).items():
            replace_linear(model.layers[i], path, qw)
    if done:
        x = np.load(os.path.join(folder, f"inputs{done:03d}.npy"))
        log.info("resuming GPTQ at block %d from %s", done, folder)
    return done, x


def _write_json(path: str, obj: dict) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1)
    os.replace(tmp, path)


def _save_block(folder: str, i: int, layer: Block, x_next: np.ndarray) -> None:
    """Save block `i` and the next block's inputs, then drop block `i`'s inputs (no longer needed)."""
    from pyllama_jax.convert.save import save_quant_weights

    tmp = os.path.join(folder, f"inputs{i + 1:03d}.tmp.npy")
    np.save(tmp, x_next)
    os.replace(tmp, os.path.join(folder, f"inputs{i + 1:03d}.npy"))
    save_quant_weights(os.path.join(folder, f"block{i:03d}.safetensors"),
                       {p: get_module(layer, p).weight for p in LAYER_LINEARS})
    stale = os.path.join(folder, f"inputs{i:03d}.npy")
    if os.path.exists(stale):
        os.remove(stale)


def quantize_gptq(model: Llama, calib: np.ndarray, spec: QuantSpec, gptq: GPTQConfig = GPTQConfig(),
                  config: CalibrationConfig = CalibrationConfig()) -> Llama:
    """GPTQ-quantize every block linear of `model` (in place) on calibration ids `calib[n, seqlen]`."""
    calib = np.asarray(calib, np.int32)
    n = len(calib)
    bs = config.batch_size
    start, x = 0, None
    if config.resume_dir:
        start, x = _resume_point(model, _settings(spec, gptq, calib), config.resume_dir)
    if x is None:
        embed = model.embed[...]
        x = np.concatenate([np.asarray(jnp.take(embed, jnp.asarray(calib[i:i + bs]), axis=0)
                                       .astype(model.config.compute_dtype)) for i in range(0, n, bs)])
    batches = [slice(i, i + bs) for i in range(0, n, bs)]

    def run(stage, layer, x):
        """`stage` over all samples, batch by batch; outputs gathered on the host."""
        return np.concatenate([np.asarray(stage(layer, jnp.asarray(x[b]))) for b in batches])

    def quantize_group(layer, i, paths, acts):
        acc = HessianAccumulator(acts.shape[-1])
        for b in batches:
            acc.add(jnp.asarray(acts[b]))
        h = acc.hessian()
        for path in paths:
            lin = get_module(layer, path)
            qw, loss = gptq_quantize(lin.kernel[...], h, spec, gptq, f"layers.{i}.{path}")
            replace_linear(layer, path, qw)
            log.info("layers.%d.%s: GPTQ loss %.4g", i, path, loss)

    for i in tqdm(range(start, model.config.n_layers), desc=f"GPTQ {spec.bits}-bit", unit="block",
                  initial=start, total=model.config.n_layers):
        layer = model.layers[i]
        _, state = nnx.split(layer)
        nnx.update(layer, jax.device_put(state))
        for paths, group_input in zip(SEQUENTIAL, _group_inputs):
            quantize_group(layer, i, paths, run(group_input, layer, x))
        x = run(_block_out, layer, x)
        if config.resume_dir:
            _save_block(config.resume_dir, i, layer, x)
    return model
