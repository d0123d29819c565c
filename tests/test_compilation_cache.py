"""The persistent compilation cache: on by default in the pyllama-jax cache folder, off on request,
never over a user's own JAX setting, and a program read back from it computes what a fresh compile
computes (the CPU kernels' custom calls included)."""
from __future__ import annotations

import json
import os
import subprocess
import sys

PROBE = """
import json, sys
import pyllama_jax, jax
counts = {"hits": 0, "misses": 0}
def count(name, **_):
    for key in counts:
        if name == "/jax/compilation_cache/cache_" + key:
            counts[key] += 1
jax.monitoring.register_event_listener(count)
out = {"dir": jax.config.jax_compilation_cache_dir}
if sys.argv[1] == "generate":
    # Random weights of a tiny model: what is cached (the programs, the kernels' custom calls) does not depend
    # on real weights, and its bf16 decode goes through the CPU kernel as SmolLM2's does (asserted below).
    import jax.numpy as jnp
    from pyllama_jax.kernels import cpu
    m = pyllama_jax.load("random:tiny", dtype="bfloat16", param_dtype="bfloat16")
    x = jnp.zeros((1, 1, m.config.dim), jnp.bfloat16)
    out["kernel"] = cpu.applies(x, jnp.bfloat16)
    out["tokens"] = m.generate("The capital of France is", max_new_tokens=6, temperature=0.0).tokens[0]
out.update(counts)
print(json.dumps(out))
"""


def probe(tmp_path, what: str = "config", **env: str) -> dict:
    base = {k: v for k, v in os.environ.items() if k not in ("JAX_COMPILATION_CACHE_DIR", "PYLLAMA_COMPILATION_CACHE")}
    base.update(PYLLAMA_CACHE_DIR=str(tmp_path / "cache"), JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")
    done = subprocess.run([sys.executable, "-c", PROBE, what], env={**base, **env}, capture_output=True, text=True,
                          timeout=900, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_on_by_default_off_on_request_and_never_over_the_users_choice(tmp_path):
    assert probe(tmp_path)["dir"] == str(tmp_path / "cache" / "xla")
    assert probe(tmp_path, PYLLAMA_COMPILATION_CACHE="0")["dir"] is None
    assert probe(tmp_path, JAX_COMPILATION_CACHE_DIR=str(tmp_path / "mine"))["dir"] == str(tmp_path / "mine")


def test_a_cached_program_generates_what_a_compiled_one_does(tmp_path):
    cold = probe(tmp_path, "generate")
    warm = probe(tmp_path, "generate")
    uncached = probe(tmp_path, "generate", PYLLAMA_COMPILATION_CACHE="0")
    assert cold["misses"] > 0 and cold["hits"] == 0
    assert warm["hits"] >= cold["misses"] and warm["misses"] == 0
    assert uncached["hits"] == uncached["misses"] == 0
    assert cold["kernel"] and warm["kernel"] and uncached["kernel"]  # decode's matmuls are the kernel's custom call
    assert warm["tokens"] == cold["tokens"] == uncached["tokens"]
