"""The command-line programs, run on the embedded SmolLM2 as a user would: the console entry points
of setup.py and the `scripts/*.py` that call them from a checkout."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest

from pyllama_jax.cli import convert

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_convert_refuses_meta_shards_that_split_heads(tmp_path):
    """SmolLM2 has 9 heads and 3 kv heads: Meta's model-parallel code can load 1 or 3 shards, not 2."""
    with pytest.raises(SystemExit, match=r"n_heads=9 is not a multiple of 2.*valid shard counts: 1, 3$"):
        convert.main(["--src", "smollm2-135m", "--to", "meta", "--out", str(tmp_path / "m"), "--shards", "2"])


def test_entry_point_runs_a_packaged_config_by_name(tmp_path):
    """`pyllama-run` from a folder with no configs/: `--config=<name>` is the packaged config, and a
    misspelt field of it stops with the field named and the right one suggested."""
    command = [shutil.which("pyllama-run"), "--config=smollm2_135m.py", "--config.prompts=('Hi',)"]
    done = subprocess.run([*command, "--config.sampling.max_new_tokens=2"], cwd=tmp_path, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert ">>> Hi\n" in done.stdout and "generated 2 tok" in done.stdout
    done = subprocess.run([*command, "--config.sampling.max_new_token=2"], cwd=tmp_path, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode != 0 and 'Did you mean "max_new_tokens"' in done.stderr
    assert not (tmp_path / "m").exists()


def _run(script: str, *args: str, timeout: int = 600) -> str:
    """`python scripts/<script>.py ARGS` from the repository root; its stdout (stderr on failure)."""
    done = subprocess.run([sys.executable, os.path.join("scripts", f"{script}.py"), *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def test_profile_inference_loads_the_configured_quantization(tmp_path):
    """A 4-bit round-to-nearest config is profiled on the 4-bit model, not on the dense one."""
    out = _run("profile_inference", "--config=configs/smollm2_135m.py", "--config.quant.wbits=4",
               "--config.quant.nearest=True", "--config.quant.groupsize=64", "--config.sampling.max_new_tokens=3",
               f"--out={tmp_path}")
    assert "4-bit g64 (210 quantized linears)" in out  # SmolLM2: 30 blocks of 7 linears
    assert (tmp_path / "profile.json").exists()
