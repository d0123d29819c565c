"""Children that get Ctrl-C the way a shell's children do, whatever the test process inherited."""
from __future__ import annotations

import signal

SIGINT_BIT = 1 << (signal.SIGINT - 1)


def default_sigint() -> None:
    """`preexec_fn`: SIGINT at its default action and unblocked in the child. A process started with
    SIGINT ignored keeps ignoring it (Python then installs no KeyboardInterrupt handler), and an
    ignored or blocked signal is inherited: a test runner's worker, or a library an earlier test
    loaded, may have set either."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})


def sigint_state(pid: int) -> str:
    """Whether process `pid` ignores or blocks SIGINT, from /proc (for failure messages)."""
    with open(f"/proc/{pid}/status") as f:
        masks = {k: int(v, 16) for k, v in (line.split(":\t") for line in f if line.startswith(("SigIgn", "SigBlk")))}
    return ", ".join(f"{k} {'has' if m & SIGINT_BIT else 'lacks'} SIGINT" for k, m in masks.items())
