"""`pyllama-serve` in a child process on a free loopback port (tests, benchmarks)."""
from __future__ import annotations

import os
import queue
import re
import signal
import subprocess
import sys
import threading
from typing import Sequence

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # of a source checkout
_READY = re.compile(r"^serving (\S+) at (http://\S+) ")


class ServerProcess:
    """Starts the server and waits until it listens; `stop()` (or leaving `with`) ends it."""

    def __init__(self, overrides: Sequence[str] = (), config: str = "smollm2_135m.py",
                 timeout: float = 600, env: dict[str, str] | None = None):
        """`config`: a config file or a packaged config's name; `overrides`: `--config.a.b=v` flags;
        `env`: extra environment variables for the server."""
        cmd = [sys.executable, "-m", "pyllama_jax.cli.serve", f"--config={config}", "--config.serve.host=127.0.0.1",
               "--config.serve.port=0", *overrides]
        self.log: list[str] = []
        self.proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                     env={**os.environ, **(env or {})})
        lines: queue.Queue[str | None] = queue.Queue()
        threading.Thread(target=self._drain, args=(lines,), daemon=True).start()
        try:
            while True:
                line = lines.get(timeout=timeout)
                if line is None:
                    raise RuntimeError(f"the server exited with {self.proc.wait()}:\n" + "".join(self.log[-30:]))
                ready = _READY.match(line)
                if ready:
                    self.model, self.url = ready.groups()
                    break
        except queue.Empty:
            self.stop()
            raise TimeoutError(f"the server did not start in {timeout} s:\n" + "".join(self.log[-30:])) from None

    def _drain(self, lines: queue.Queue) -> None:
        for line in self.proc.stdout:
            self.log.append(line)
            lines.put(line)
        lines.put(None)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def stop(self, timeout: float = 30) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def __enter__(self) -> "ServerProcess":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
