"""`pyllama-profile`'s measurement, table and plot, on a tiny random model."""
from __future__ import annotations

import numpy as np

from pyllama_jax.cli import profile_inference as profile
from pyllama_jax.generate import Generator, SamplingConfig
from pyllama_jax.model.config import preset
from pyllama_jax.model.llama import init_model
from tests.test_serve_engine import byte_tokenizer


def test_profile_run_table_and_plot(tmp_path):
    tokenizer = byte_tokenizer()
    generator = Generator(init_model(preset("tiny"), seed=2), tokenizer)
    sampling = SamplingConfig(max_new_tokens=24)
    first, p = (profile.run(generator, "hello there", sampling) for _ in range(2))
    steps = len(generator.generate(["hello there"], sampling).tokens[0])  # the same greedy generation
    assert len(p["token_s"]) == len(p["host_mb"]) - 2 == len(p["device_mb"]) - 2 >= steps - 1
    assert p["prompt_tokens"] == len("hello there") and 0 < p["prefill_s"] < first["seconds"]
    assert np.isclose(p["seconds"], p["prefill_s"] + sum(p["token_s"]), rtol=0.2)
    text = profile.table(first, p)
    assert "per-token latency mean / p50 / p90 / p99 / max" in text and "device memory" in text
    profile.plot(p, "tiny", str(tmp_path / "profile.png"))
    assert (tmp_path / "profile.png").stat().st_size > 10000
