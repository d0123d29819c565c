"""Resume bookkeeping of the calibrated driver: each finished block's packed weights and norm scales
(AWQ folds its scales into them) saved with the next block's inputs; a rerun with the same settings
continues at the first unfinished block."""
from __future__ import annotations

import json
import logging
import os

import jax.numpy as jnp
import numpy as np

from pyllama_jax.model.llama import Block, Llama
from pyllama_jax.model.qlinear import LAYER_LINEARS, get_module, replace_linear

log = logging.getLogger(__name__)
NORMS = ("attn_norm", "mlp_norm")


def resume_point(model: Llama, settings: dict, folder: str) -> tuple[int, np.ndarray | None]:
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
        layer = model.layers[i]
        for path, qw in load_quant_weights(os.path.join(folder, f"block{i:03d}.safetensors")).items():
            replace_linear(layer, path, qw)
        norms = os.path.join(folder, f"norms{i:03d}.npz")
        if os.path.exists(norms):  # folders written before the norms were saved hold unchanged ones
            saved_norms = np.load(norms)
            for name in NORMS:
                norm = getattr(layer, name).scale
                norm[...] = jnp.asarray(saved_norms[name], norm[...].dtype)
    if done:
        x = np.load(os.path.join(folder, f"inputs{done:03d}.npy"))
        log.info("resuming at block %d from %s", done, folder)
    return done, x


def _write_json(path: str, obj: dict) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1)
    os.replace(tmp, path)


def save_block(folder: str, i: int, layer: Block, x_next: np.ndarray) -> None:
    """Save block `i` and the next block's inputs, then drop block `i`'s inputs (no longer needed).
    The packed weights go last: their file marks the block finished."""
    from pyllama_jax.convert.save import save_quant_weights

    tmp = os.path.join(folder, f"inputs{i + 1:03d}.tmp.npy")
    np.save(tmp, x_next)
    os.replace(tmp, os.path.join(folder, f"inputs{i + 1:03d}.npy"))
    tmp = os.path.join(folder, f"norms{i:03d}.tmp.npz")
    np.savez(tmp, **{name: np.asarray(getattr(layer, name).scale[...], np.float32) for name in NORMS})
    os.replace(tmp, os.path.join(folder, f"norms{i:03d}.npz"))
    save_quant_weights(os.path.join(folder, f"block{i:03d}.safetensors"),
                       {p: get_module(layer, p).weight for p in LAYER_LINEARS})
    stale = os.path.join(folder, f"inputs{i:03d}.npy")
    if os.path.exists(stale):
        os.remove(stale)
