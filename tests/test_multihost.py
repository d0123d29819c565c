"""Two local processes form one job through `jax.distributed` and match a single process.

Each worker (`python tests/test_multihost.py WORKER OUT [PORT PID DEVICES DATA]`) builds the same
seeded tiny model through the streamed, sharded loader and writes its logits and greedy tokens;
in a two-process job only process 0 writes. Every subprocess runs under a timeout.
"""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import time

import ml_collections
import numpy as np
import pytest

from pyllama_jax.sharding import multihost

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TIMEOUT = 300


def _env(devices: int) -> dict[str, str]:
    return dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices} "
                "--xla_backend_optimization_level=0", JAX_PLATFORMS="cpu",
                PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _distributed(**fields) -> ml_collections.ConfigDict:
    from pyllama_jax.config import base_config

    d = base_config().distributed
    d.update(fields)
    return d


def _run(procs: list[subprocess.Popen]) -> None:
    """Wait for all workers (killing all on a timeout); fail with the output of any that failed."""
    deadline = time.monotonic() + TIMEOUT
    outputs = []
    try:
        for p in procs:
            outputs.append(p.communicate(timeout=max(1.0, deadline - time.monotonic())))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    for p, (out, err) in zip(procs, outputs):
        assert p.returncode == 0, f"worker failed ({p.returncode}):\n{out[-2000:]}\n{err[-5000:]}"


def _worker(args: list[str], devices: int) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, os.path.abspath(__file__), *args], cwd=REPO, env=_env(devices),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@pytest.fixture(scope="module")
def single_process(tmp_path_factory) -> dict[str, np.ndarray]:
    out = str(tmp_path_factory.mktemp("single") / "single.npz")
    _run([_worker(["single", out], devices=1)])
    return dict(np.load(out))


@pytest.mark.parametrize("devices,data", [(2, 1), (4, 2)])
def test_two_processes_match_one(single_process, tmp_path, devices, data):
    """2 processes x `devices` CPU devices, mesh (data, 1, rest): tensor parallel within and
    (with data=1) across the processes."""
    out, port = str(tmp_path / "job.npz"), str(_free_port())
    _run([_worker(["job", out, port, str(pid), str(devices), str(data)], devices) for pid in (0, 1)])
    job = dict(np.load(out))
    assert int(job["process_count"]) == 2 and int(job["device_count"]) == 2 * devices
    tensor = 2 * devices // data
    assert tuple(job["local_q_shard"]) == (64, 64 // tensor)  # process 0 holds only its part
    err = np.abs(job["logits"] - single_process["logits"]).max() / np.abs(single_process["logits"]).max()
    assert err < 1e-5, err
    assert job["tokens"].tolist() == single_process["tokens"].tolist()


def test_unreachable_coordinator_fails_clearly_within_the_timeout():
    port = _free_port()  # nothing listens there
    code = ("from pyllama_jax.sharding import multihost; import ml_collections as m;"
            f"multihost.initialize(m.ConfigDict(dict(coordinator_address='127.0.0.1:{port}', num_processes=2,"
            "process_id=1, auto_detect=False, timeout_s=3)))")
    start = time.monotonic()
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=_env(1), capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 1
    assert f"ConnectionError: the coordinator at 127.0.0.1:{port} (distributed.coordinator_address) did not " \
           "answer within 3 s" in proc.stderr
    assert time.monotonic() - start < 60


def test_resolve_from_config_and_environment(monkeypatch):
    for name in multihost.ENV.values():
        monkeypatch.delenv(name, raising=False)
    assert multihost.resolve(_distributed()) is None  # nothing configured: one process
    assert multihost.resolve(_distributed(coordinator_address="h:1", num_processes=1, process_id=0)) is None
    got = multihost.resolve(_distributed(coordinator_address="10.0.0.1:1234", num_processes=4, process_id=3))
    assert got == multihost.Cluster("10.0.0.1:1234", 4, 3)
    monkeypatch.setenv("JAX_COORDINATOR_ADDRESS", "head:999")
    monkeypatch.setenv("JAX_NUM_PROCESSES", "2")
    monkeypatch.setenv("JAX_PROCESS_ID", "1")
    assert multihost.resolve(_distributed()) == multihost.Cluster("head:999", 2, 1)
    assert multihost.resolve(_distributed(process_id=0)) == multihost.Cluster("head:999", 2, 0)  # config wins
    monkeypatch.delenv("JAX_PROCESS_ID")
    with pytest.raises(ValueError, match=r"needs distributed.process_id \(or \$JAX_PROCESS_ID\)"):
        multihost.resolve(_distributed())
    with pytest.raises(ValueError, match=r"process_id=5 must lie in \[0, num_processes=2\)"):
        multihost.resolve(_distributed(process_id=5))
    with pytest.raises(ValueError, match="coordinator_address='head': expected 'host:port'"):
        multihost.resolve(_distributed(coordinator_address="head", process_id=0))


# ---- the worker ---------------------------------------------------------------------------------

def _work(out: str, mesh_sizes: tuple[int, int, int] | None) -> None:
    import jax

    from pyllama_jax.api import Model
    from pyllama_jax.generate import Generator, SamplingConfig
    from pyllama_jax.model.config import preset
    from pyllama_jax.model.llama import init_model
    from pyllama_jax.model.params import build_model, named_tensors
    from pyllama_jax.sharding import mesh as pm
    from pyllama_jax.model import place
    from pyllama_jax.tokenizer import Tokenizer

    config = preset("tiny", n_heads=8, n_kv_heads=8)
    model = init_model(config, seed=5)  # same seed, same weights in every process
    mesh = None if mesh_sizes is None else pm.make_mesh(*mesh_sizes)
    if mesh is not None:
        model = build_model(config, named_tensors(model), "random tiny", place.placer(config, mesh))
    ids = np.random.default_rng(1).integers(0, config.vocab_size, (4, 20))
    logits = np.asarray(Model(model, None, mesh=mesh).logits(ids))
    gen = Generator(model, Tokenizer(None, "ids", None, None, False), mesh)
    prompts = [list(ids[i, : 4 + 3 * i]) for i in range(4)]
    tokens = [[] for _ in prompts]
    for step in gen.stream(prompts, SamplingConfig(max_new_tokens=10)):
        for row, tok in zip(tokens, step):
            row.append(tok)
    if multihost.is_main():
        q = model.layers[0].attn.q.kernel[...]
        tmp = out + ".tmp.npz"
        np.savez(tmp, logits=logits, tokens=np.array(tokens), process_count=jax.process_count(),
                 device_count=jax.device_count(), local_q_shard=np.array(q.addressable_shards[0].data.shape))
        os.replace(tmp, out)


if __name__ == "__main__":
    role, out_path = sys.argv[1], sys.argv[2]
    if role == "single":
        _work(out_path, None)
    else:
        port, pid, n_dev, data = sys.argv[3:7]
        multihost.initialize(_distributed(coordinator_address=f"127.0.0.1:{port}", num_processes=2,
                                          process_id=int(pid), timeout_s=60))
        _work(out_path, (int(data), 1, -1))
