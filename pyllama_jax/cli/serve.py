"""`pyllama-serve`: serve the configured model: OpenAI-compatible API with continuous batching, and a web chat at /.

    python scripts/serve.py --config=configs/smollm2_135m.py --config.serve.port=8000
    python scripts/serve.py --config=configs/7b.py --config.mesh.tensor=-1   # sharded over all devices
    curl http://127.0.0.1:8000/v1/chat/completions -H 'Content-Type: application/json' \\
        -d '{"model": "smollm2-135m", "messages": [{"role": "user", "content": "Hi"}]}'
"""
from __future__ import annotations

import asyncio
import os
import sys

import ml_collections

import pyllama_jax as pj
from pyllama_jax.cli import job
from pyllama_jax.sections import from_section
from pyllama_jax.serve.engine import Engine, EngineConfig
from pyllama_jax.serve.openai_api import ServerConfig, bind, create_app, is_loopback, serve
from pyllama_jax.sharding import mesh as pmesh


def run_server(c: ml_collections.ConfigDict) -> None:
    """Load the configured model and serve it until interrupted."""
    s = from_section(ServerConfig, c.serve)
    api_key = s.api_key or os.environ.get("PYLLAMA_API_KEY", "")
    if not api_key and not is_loopback(s.host):
        sys.exit(f"error: serve.host={s.host!r} is reachable from other machines; set serve.api_key or "
                 "$PYLLAMA_API_KEY (without a key the server is for local use only: host 127.0.0.1)")
    try:  # claim the port before the (slow) model load
        sock = bind(s.host, s.port)
    except OSError as e:
        sys.exit(f"error: cannot listen on {s.host}:{s.port}: {e.strerror or e}")
    mesh = pmesh.from_config(c.mesh)  # None: one device
    try:
        model = pj.load_from_config(c, mesh)
    except FileNotFoundError as e:
        sys.exit(f"error: {e}")
    if model.tokenizer is None:
        sys.exit(f"error: {model.source} has no tokenizer, so it cannot be served")
    engine = Engine(model.module, model.tokenizer, from_section(EngineConfig, c.serve), mesh=mesh)
    print(f"loaded {model.describe()}; compiling for {engine.slots} slots of {engine.context} tokens", flush=True)
    engine.warmup()
    engine.start()
    name = s.model_name or os.path.splitext(os.path.basename(c.model.rstrip("/")))[0]
    ready = lambda url: print(f"serving {name} at {url} (web chat at {url}/, API at {url}/v1)", flush=True)
    try:
        asyncio.run(serve(create_app(engine, name, api_key), sock, ready))
    except KeyboardInterrupt:
        pass
    finally:
        engine.close()


def main() -> None:
    job.run(run_server, "smollm2_135m.py")


if __name__ == "__main__":
    main()
