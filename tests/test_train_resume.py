"""Checkpoints: a fine-tuning process killed with SIGKILL and restarted ends bitwise equal to an
uninterrupted run; a checkpoint folder from another configuration is refused clearly."""
from __future__ import annotations

import csv
import importlib.util
import json
import os
import re
import signal
import subprocess
import sys

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from pyllama_jax.train.checkpoint import CheckpointMismatch
from pyllama_jax.train.run import finetune

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS, SAVE_EVERY = 60, 5
RECORDS = [{"instruction": f"Repeat {w}.", "input": "", "output": f"{w} {w}"}
           for w in ("red", "green", "blue", "cyan", "pink", "gold", "grey", "teal", "lime", "navy")]


def _overrides(data: str, workdir: str) -> dict[str, object]:
    return {"model": "random:tiny", "data.path": data, "data.template": "chat", "data.seq_len": 64,
            "data.eval_size": 2, "train.workdir": workdir, "train.steps": STEPS, "train.batch_size": 4,
            "train.warmup_steps": 5, "train.lr": 1e-2, "train.lora_dropout": 0.1, "train.save_every": SAVE_EVERY,
            "train.keep": 2, "train.eval_every": 20, "train.sample_every": 0, "train.samples": 0}


def _command(overrides: dict[str, object]) -> list[str]:
    return [sys.executable, os.path.join(REPO, "scripts", "finetune.py"),
            f"--config={os.path.join(REPO, 'configs', 'alpaca_lora.py')}"] + [
        f"--config.{k}={v}" for k, v in overrides.items()]


def _run(overrides: dict[str, object], kill_after_line: str | None = None) -> tuple[int, str]:
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.Popen(_command(overrides), cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    lines = []
    try:
        for line in proc.stdout:
            lines.append(line)
            if kill_after_line is not None and line.rstrip().endswith(kill_after_line):
                proc.send_signal(signal.SIGKILL)  # a real, unannounced kill mid-run
                break
        return proc.wait(timeout=300), "".join(lines)
    finally:
        if proc.poll() is None:
            proc.kill()


def _final_state(workdir: str) -> list[np.ndarray]:
    with ocp.StandardCheckpointer() as ckpt:
        state = ckpt.restore(os.path.join(workdir, "checkpoints", str(STEPS), "state"))
    return [np.asarray(x) for x in jax.tree.leaves(state)]


def _losses(workdir: str) -> list[tuple[str, str, str]]:
    with open(os.path.join(workdir, "metrics.csv"), newline="") as f:
        return [(r["step"], r["loss"], r["eval_loss"]) for r in csv.DictReader(f)]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("data") / "tiny.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in RECORDS) + "\n")
    return str(path)


def test_killed_run_resumes_to_the_same_parameters(data, tmp_path):
    straight, killed = str(tmp_path / "straight"), str(tmp_path / "killed")
    rc, out = _run(_overrides(data, straight))
    assert rc == 0, out[-3000:]

    rc, out = _run(_overrides(data, killed), kill_after_line="checkpoint saved: step 10")
    assert rc == -signal.SIGKILL, out[-3000:]
    saved = sorted(int(s) for s in os.listdir(os.path.join(killed, "checkpoints")) if s.isdigit())
    assert saved and saved[-1] < STEPS  # it really stopped part-way
    rc, out = _run(_overrides(data, killed))
    assert rc == 0, out[-3000:]
    resumed_at = [int(m) for m in re.findall(r"resumed from .* at step (\d+)", out)]
    assert resumed_at and 10 <= resumed_at[0] < STEPS

    for a, b in zip(_final_state(straight), _final_state(killed), strict=True):
        np.testing.assert_array_equal(a, b)  # bitwise: parameters and optimizer state
    assert _losses(killed) == _losses(straight)  # same data order, dropout and schedule at every step
    assert len(_losses(straight)) == STEPS + 1  # rows past the checkpoint were dropped on resume
    assert sorted(int(s) for s in os.listdir(os.path.join(straight, "checkpoints"))) == [STEPS - SAVE_EVERY, STEPS]
    assert os.path.isfile(os.path.join(straight, "loss.png"))


def test_checkpoint_folder_from_another_config_is_refused(data, tmp_path):
    spec = importlib.util.spec_from_file_location("alpaca_lora", os.path.join(REPO, "configs", "alpaca_lora.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)

    def config(**changes):
        c = module.get_config()
        for k, v in {**_overrides(data, str(tmp_path / "run")), "train.steps": SAVE_EVERY, **changes}.items():
            section, _, field = k.rpartition(".")
            setattr(c[section] if section else c, field, v)
        return c

    finetune(config())
    with pytest.raises(CheckpointMismatch) as e:
        finetune(config(**{"train.lora_rank": 16, "data.seq_len": 48}))
    msg = str(e.value)
    assert str(tmp_path / "run" / "checkpoints") in msg
    assert "train.lora_rank: 8 there, 16 here" in msg and "data.seq_len: 64 there, 48 here" in msg
    finetune(config(**{"train.eval_every": 1}))  # logging-only changes resume fine
