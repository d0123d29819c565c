"""The command-line scripts, run on the embedded SmolLM2 as a user would."""
from __future__ import annotations

import importlib.util
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _script(name: str):
    """scripts/<name>.py imported as a module."""
    spec = importlib.util.spec_from_file_location(f"{name}_script", os.path.join(ROOT, "scripts", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_convert_refuses_meta_shards_that_split_heads(tmp_path):
    """SmolLM2 has 9 heads and 3 kv heads: Meta's model-parallel code can load 1 or 3 shards, not 2."""
    with pytest.raises(SystemExit, match=r"n_heads=9 is not a multiple of 2.*valid shard counts: 1, 3$"):
        _script("convert").main(["--src", "smollm2-135m", "--to", "meta", "--out", str(tmp_path / "m"),
                                 "--shards", "2"])
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
