"""The training loop: steps with a progress bar, checkpoints, held-out loss, sample generations.

The batch of step `s` and its dropout keys are functions of `(seed, s)`, so a run resumed from
its last checkpoint continues exactly as if it had never stopped.
"""
from __future__ import annotations

import dataclasses
import os
import time
from typing import Any, Sequence

import numpy as np
from flax import nnx
from tqdm import tqdm

from pyllama_jax.data.alpaca import Batches, Dataset, Example, eval_batches, prompt_text
from pyllama_jax.generate import Generator, SamplingConfig
from pyllama_jax.tokenizer import Tokenizer
from pyllama_jax.train.checkpoint import Checkpointer
from pyllama_jax.train.metrics import MetricsLog, plot_losses
from pyllama_jax.train.trainer import Trainer


def resumable(default: Any) -> Any:
    """A dataclass field that may change when a run resumes: it does not change what is trained."""
    return dataclasses.field(default=default, metadata={"resumable": True})


@dataclasses.dataclass(frozen=True)
class LoopConfig:
    """How long to train and what to record along the way."""

    workdir: str = resumable("runs/finetune")  # checkpoints, metrics.csv, loss.png, samples.md
    steps: int = 300  # optimizer steps
    batch_size: int = 8  # rows per optimizer step
    seed: int = 0  # data order, held-out split, adapter init and dropout
    save_every: int = resumable(50)  # steps between checkpoints
    keep: int = resumable(3)  # checkpoints kept
    eval_every: int = resumable(50)  # steps between held-out losses (0 = start and end only)
    sample_every: int = resumable(100)  # steps between sample generations (0 = start and end only)
    samples: int = resumable(2)  # held-out examples to generate for
    sample_tokens: int = resumable(64)  # new tokens per sample generation


class Samples:
    """Greedy generations for a few held-out prompts, appended to `<workdir>/samples.md`."""

    def __init__(self, trainer: Trainer, tokenizer: Tokenizer, examples: Sequence[Example], template: str,
                 max_new_tokens: int, path: str):
        self.trainer, self.path = trainer, path
        model = trainer.model()
        limit = model.config.max_seq_len - max_new_tokens  # prompts that fit the context
        fits = [(e, p) for e in examples for p in [prompt_text(e, tokenizer, template)]
                if len(tokenizer.encode(p)) <= limit]
        self.examples, self.prompts = [e for e, _ in fits], [p for _, p in fits]
        self.sampling = SamplingConfig(max_new_tokens=max_new_tokens)
        self.generator = Generator(model, tokenizer, trainer.mesh) if self.examples else None

    def generate(self) -> list[str]:
        if self.generator is None:
            return []
        self.generator.state = nnx.state(self.trainer.model())  # same structure: no recompilation
        return self.generator.generate(self.prompts, self.sampling).texts

    def record(self, step: int, held_out_loss: float | None) -> list[str]:
        texts = self.generate()
        if texts:
            loss = "" if held_out_loss is None else f", held-out loss {held_out_loss:.4f}"
            lines = [f"\n## step {step}{loss}\n"]
            for e, text in zip(self.examples, texts):
                lines.append(f"\n**Instruction:** {e.instruction}\n" + (f"\n**Input:** {e.input}\n" if e.input else "")
                             + f"\n**Generated:** {text.strip()}\n\n**Reference:** {e.output}\n")
            with open(self.path, "a", encoding="utf-8") as f:
                f.write("".join(lines))
        return texts


def _due(step: int, every: int, last: int) -> bool:
    return step == last or (every > 0 and step % every == 0)


def fit(trainer: Trainer, data: Dataset, tokenizer: Tokenizer | None, c: LoopConfig, run_config: dict,
        template: str) -> None:
    """Train to `c.steps`, resuming from `c.workdir`'s last checkpoint (`run_config` must match it);
    samples are prompted with the data's `template`."""
    os.makedirs(c.workdir, exist_ok=True)
    ckpt = Checkpointer(os.path.join(c.workdir, "checkpoints"), c.save_every, c.keep, run_config)
    start = 0
    restored = ckpt.restore(trainer.params, trainer.opt_state)
    if restored is not None:
        start, trainer.params, trainer.opt_state = restored
        print(f"resumed from {ckpt.directory} at step {start}", flush=True)
    batches = Batches(data.train, c.batch_size, c.seed)
    held_out = eval_batches(data.held_out, c.batch_size) if len(data.held_out) else []
    log = MetricsLog(c.workdir, start)
    samples = Samples(trainer, tokenizer, data.held_out_examples[:c.samples], template, c.sample_tokens,
                      os.path.join(c.workdir, "samples.md")) if tokenizer is not None else None
    if start == 0:
        loss0 = trainer.eval_loss(held_out) if held_out else None
        log.write({"step": 0, "epoch": 0, "eval_loss": loss0})
        if samples is not None:
            samples.record(0, loss0)
    bar = tqdm(range(start, c.steps), initial=start, total=c.steps, desc="fine-tune", dynamic_ncols=True)
    for s in bar:
        batch = batches.batch(s)
        t0 = time.perf_counter()
        m = trainer.step(batch, s)
        loss = float(m["loss"])
        seconds = time.perf_counter() - t0
        tokens = int(np.count_nonzero(batch["segment_ids"]))
        step = s + 1
        row = {"step": step, "epoch": f"{batches.epoch_of(step):.3f}", "loss": f"{loss:.6f}",
               "lr": f"{float(m['lr']):.3e}", "grad_norm": f"{float(m['grad_norm']):.4f}", "tokens": tokens,
               "tokens_per_s": f"{tokens / seconds:.1f}", "seconds": f"{seconds:.4f}"}
        held_loss = trainer.eval_loss(held_out) if held_out and _due(step, c.eval_every, c.steps) else None
        if held_loss is not None:
            row["eval_loss"] = f"{held_loss:.6f}"
        if samples is not None and _due(step, c.sample_every, c.steps):
            samples.record(step, held_loss)
        log.write(row)
        if ckpt.save(step, trainer.params, trainer.opt_state, force=step == c.steps):
            print(f"checkpoint saved: step {step}", flush=True)
        bar.set_postfix(loss=f"{loss:.4f}", tok_s=f"{tokens / seconds:.0f}", lr=f"{float(m['lr']):.2e}")
    bar.close()
    log.close()
    ckpt.close()
    plot_losses(log.path, os.path.join(c.workdir, "loss.png"), os.path.basename(os.path.normpath(c.workdir)))
