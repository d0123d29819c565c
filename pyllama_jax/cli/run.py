"""`pyllama-run`, the main job: load the configured model and generate for the configured prompts.

    pyllama-run --config=smollm2_135m.py --config.sampling.max_new_tokens=32
    python scripts/run.py --config=configs/13b_4bit.py --config.mesh.tensor=2   # sharded

Multi-process: run the same command on every host with --config.distributed.* (or JAX_* env vars);
only process 0 prints.
"""
from __future__ import annotations

import sys

import ml_collections

import pyllama_jax as pj
from pyllama_jax.cli import job
from pyllama_jax.sharding import mesh as pmesh
from pyllama_jax.sharding import multihost


def generate(c: ml_collections.ConfigDict) -> None:
    """Load `c.model` and stream a generation for each of `c.prompts`."""
    multihost.initialize(c.distributed)
    mesh = pmesh.from_config(c.mesh)
    say = multihost.main_only(print)  # process 0 speaks for the job
    try:
        model = pj.load_from_config(c, mesh)
    except FileNotFoundError as e:
        sys.exit(f"error: {e}\nGet LLaMA weights with pyllama-download, or point --config.model at them.")
    if mesh is not None:
        say(f"mesh {pmesh.describe(mesh)}")
    say(f"loaded {model.describe()}; {model.config.n_layers} layers, dim {model.config.dim}, "
        f"{model.config.num_params() / 1e6:.0f}M parameters")
    sampling = c.sampling.to_dict()
    for prompt in c.prompts:
        say(f"\n>>> {prompt}")
        result = model.generate(prompt, chat=c.chat, on_text=lambda _, text: say(text, end="", flush=True),
                                **sampling)
        say(f"\n[{result.report()}]")


def main() -> None:
    job.run(generate, "smollm2_135m.py")


if __name__ == "__main__":
    main()
