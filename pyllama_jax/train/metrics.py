"""Training metrics: one CSV row per step (and TensorBoard where installed), and a loss plot."""
from __future__ import annotations

import csv
import os
from typing import Any

import numpy as np

SMOOTH = 10  # steps averaged in the plot's smoothed training loss
COLUMNS = ("step", "epoch", "loss", "eval_loss", "lr", "grad_norm", "tokens", "tokens_per_s", "seconds")


class MetricsLog:
    """Append rows to `<workdir>/metrics.csv`; on resume from `start_step`, rows after it are dropped."""

    def __init__(self, workdir: str, start_step: int):
        self.path = os.path.join(workdir, "metrics.csv")
        kept = [r for r in read_metrics(self.path) if int(r["step"]) <= start_step] if start_step else []
        tmp = self.path + ".tmp"
        with open(tmp, "w", newline="") as f:
            writer = csv.DictWriter(f, COLUMNS)
            writer.writeheader()
            writer.writerows(kept)
        os.replace(tmp, self.path)
        self._file = open(self.path, "a", newline="")
        self._writer = csv.DictWriter(self._file, COLUMNS)
        self._tb = _tensorboard(os.path.join(workdir, "tensorboard"))

    def write(self, row: dict[str, Any]) -> None:
        self._writer.writerow({k: row.get(k, "") for k in COLUMNS})
        self._file.flush()
        if self._tb is not None:
            for k, v in row.items():
                if k != "step" and v != "" and v is not None:
                    self._tb.add_scalar(f"train/{k}", float(v), int(row["step"]))

    def close(self) -> None:
        self._file.close()
        if self._tb is not None:
            self._tb.close()


def _tensorboard(logdir: str):
    try:
        from tensorboardX import SummaryWriter
    except ImportError:
        return None
    return SummaryWriter(logdir)


def read_metrics(path: str) -> list[dict[str, str]]:
    if not os.path.isfile(path):
        return []
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def plot_losses(csv_path: str, png_path: str, title: str = "") -> None:
    """Training loss (and held-out loss where measured) against step, saved as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_metrics(csv_path)
    fig, ax = plt.subplots(figsize=(7, 4))
    train = [(int(r["step"]), float(r["loss"])) for r in rows if r["loss"]]
    held = [(int(r["step"]), float(r["eval_loss"])) for r in rows if r["eval_loss"]]
    if train:
        steps, losses = map(np.asarray, zip(*train))
        ax.plot(steps, losses, label="train loss (per step)", lw=0.8, alpha=0.35)
        w = min(SMOOTH, len(losses))
        ax.plot(steps[w - 1:], np.convolve(losses, np.ones(w) / w, "valid"), label=f"train loss ({w}-step mean)")
    if held:
        ax.plot(*zip(*held), "o-", label="held-out loss")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    tmp = png_path + ".tmp.png"
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, png_path)
