"""Cold start of the main job: seconds from launching `scripts/run.py` on the embedded model to its
first generated text, and to the end of the job, without and with the persistent compilation cache.

Settings, each a fresh process, alternated round by round:
- `cache off`: `PYLLAMA_COMPILATION_CACHE=0` (every XLA program compiled, as before the cache);
- `cache cold`: the cache on, in an empty folder (a user's very first run: compiles and writes it);
- `cache warm`: the cache on, in the folder the cold run of the same round filled (every later run).
The CPU kernels' library is built once before the first round and copied into each empty cache
folder, so no setting pays the C++ build.
Run it under `chrt -f 10` on a shared machine.

    chrt -f 10 python benchmarks/cold_start.py --rounds 5
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import shutil
import tempfile
import time

from pyllama_jax.cache import cache_dir

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SETTINGS = ("cache off", "cache cold", "cache warm")


def run_job(env: dict[str, str], args: argparse.Namespace) -> tuple[float, float]:
    """(seconds to the first generated character, seconds to exit) of one run.py process."""
    command = [sys.executable, "-u", os.path.join(REPO, "scripts", "run.py"), f"--config={args.config}",
               f"--config.sampling.max_new_tokens={args.new_tokens}", "--config.sampling.temperature=0.0"]
    start = time.perf_counter()
    proc = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    seen = b""
    while True:  # the job echoes '>>> <prompt>' on a line of its own; the generated text follows it
        char = proc.stdout.read(1)
        if not char:
            raise RuntimeError(f"{' '.join(command)} ended before generating (exit {proc.wait()})")
        prompt = seen.find(b">>> ")
        if prompt >= 0 and b"\n" in seen[prompt:]:
            first = time.perf_counter() - start
            break
        seen += char
    proc.stdout.read()
    if proc.wait():
        raise RuntimeError(f"{' '.join(command)} failed with exit {proc.returncode}")
    return first, time.perf_counter() - start


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--config", default="configs/smollm2_135m.py")
    p.add_argument("--new_tokens", type=int, default=16)
    args = p.parse_args()
    base = {k: v for k, v in os.environ.items() if k not in ("JAX_COMPILATION_CACHE_DIR", "PYLLAMA_COMPILATION_CACHE")}
    off = {**base, "PYLLAMA_COMPILATION_CACHE": "0"}
    run_job(off, args)  # builds the CPU kernels once, untimed
    times: dict[str, list[tuple[float, float]]] = {s: [] for s in SETTINGS}
    for r in range(args.rounds):
        with tempfile.TemporaryDirectory() as folder:
            shutil.copytree(cache_dir("kernels"), os.path.join(folder, "kernels"))
            cached = {**base, "PYLLAMA_CACHE_DIR": folder}
            envs = {"cache off": off, "cache cold": cached, "cache warm": cached}
            for setting in SETTINGS:
                times[setting].append(run_job(envs[setting], args))
                print(f"round {r + 1} {setting}: first text {times[setting][-1][0]:.1f} s, "
                      f"exit {times[setting][-1][1]:.1f} s", flush=True)
    print(f"\n{args.config}, {args.new_tokens} new tokens, {args.rounds} rounds (median, min-max), one fresh process each")
    print("| setting | first generated text, s | whole job, s |\n|---|---|---|")
    for setting, t in times.items():
        cells = [f"{statistics.median(x):.1f} ({min(x):.1f}-{max(x):.1f})" for x in zip(*t)]
        print(f"| {setting} | {cells[0]} | {cells[1]} |")


if __name__ == "__main__":
    main()
