"""Quantize a whole model: RTN directly, GPTQ layer by layer on calibration activations.

GPTQ's driver, true-sequential: block 0's inputs are captured for every calibration sample; in
each block the groups `[k, v, q] -> [o] -> [up, gate] -> [down]` are quantized in turn, each from
the Hessian of its inputs as produced by the already-quantized parts of the block, and the
quantized block's outputs feed the next block. A block's stages are computed piecewise
(`x + attn(norm(x))`, then `h + mlp(norm(h))`), so each block runs about once per sample. Only the
current block and the activations are put on the device. With `resume_dir`, every finished block's
packed weights are saved with the next block's inputs, and a rerun continues at the first unfinished
block.
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

from pyllama_jax.model.llama import Block, Llama, causal_mask, rope_frequencies
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


def _tapped(layer: Block, path: str, run: Callable[[Block], object]) -> jax.Array:
    """The input reaching `layer.<path>` while `run(layer)` executes (the rest is dead code)."""
    seen: list = []
    set_linear(layer, path, _Tap(get_module(layer, path), seen))
    run(layer)
    return seen[0]


# The stages of one block; each is jitted with the block's graphdef static, so blocks with the
# same quantized/dense structure share one compiled program.
def _stage_attn_in(layer: Block, x):
    return layer.attn_norm(x)


def _stage_o_in(layer: Block, x):
    pos = jnp.broadcast_to(jnp.arange(x.shape[1]), x.shape[:2])
    freqs, mask = rope_frequencies(layer.config), causal_mask(pos)
    return _tapped(layer, "attn.o", lambda b: b.attn(b.attn_norm(x), pos, freqs, mask, None))


def _stage_mlp_in(layer: Block, x, ctx):
    h = x + layer.attn.o(ctx)
    return h, layer.mlp_norm(h)


def _stage_down_in(layer: Block, h):
    return _tapped(layer, "mlp.down", lambda b: b.mlp(b.mlp_norm(h)))


def _stage_out(layer: Block, h):
    return h + layer.mlp(layer.mlp_norm(h))


def _jit_stage(fn):
    run = jax.jit(lambda graphdef, state, *args: fn(nnx.merge(graphdef, state), *args), static_argnums=0)
    return lambda layer, *args: run(*nnx.split(layer), *args)


_attn_in, _o_in, _mlp_in, _down_in, _out = map(
    _jit_stage, (_stage_attn_in, _stage_o_in, _stage_mlp_in, _stage_down_in, _stage_out))


SEQUENTIAL = (("attn.k", "attn.v", "attn.q"), ("attn.o",), ("mlp.up", "mlp.gate"), ("mlp.down",))


def linear_inputs(layer: Block, x: jax.Array) -> tuple[dict[str, jax.Array], jax.Array]:
    """The input `[b, t, in]` of each linear of `layer` for block inputs `x`, and the block's output."""
    attn_in = _attn_in(layer, x)
    ctx = _o_in(layer, x)
    h, mlp_in = _mlp_in(layer, x, ctx)
    groups = (attn_in, ctx, mlp_in, _down_in(layer, h))
    return {path: a for paths, a in zip(SEQUENTIAL, groups) for path in paths}, _out(layer, h)


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

    def run(stage, layer, *arrays):
        """`stage` over all samples, batch by batch; outputs gathered on the host."""
        outs = [stage(layer, *(jnp.asarray(a[b]) for a in arrays)) for b in batches]
        if isinstance(outs[0], tuple):
            return tuple(np.concatenate([np.asarray(o[k]) for o in outs]) for k in range(len(outs[0])))
        return np.concatenate([np.asarray(o) for o in outs])

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
        quantize_group(layer, i, SEQUENTIAL[0], run(_attn_in, layer, x))
        ctx = run(_o_in, layer, x)
        quantize_group(layer, i, SEQUENTIAL[1], ctx)
        h, mlp_in = run(_mlp_in, layer, x, ctx)
        del ctx
        quantize_group(layer, i, SEQUENTIAL[2], mlp_in)
        del mlp_in
        quantize_group(layer, i, SEQUENTIAL[3], run(_down_in, layer, h))
        x = run(_out, layer, h)
        if config.resume_dir:
            _save_block(config.resume_dir, i, layer, x)
    return model
