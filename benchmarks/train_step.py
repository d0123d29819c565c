"""SmolLM2-135M LoRA training-step speed: pyllama-jax (optax) against PyTorch (HF transformers), same process.

Both sides train rank-r adapters on the same linears of the same float32 model (HF's copy read
from the same GGUF file), on the same random batch, with AdamW and gradient clipping; the base
stays frozen. Each round times one step of each, alternating; medians over rounds and the ratio
ours/theirs are printed (ratios stay meaningful on a noisy shared CPU; absolute figures do not).

    python benchmarks/train_step.py --rounds 5 --batch 8 --seq_len 256
"""
from __future__ import annotations

import argparse
import math
import os
import statistics
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import torch

import pyllama_jax as pj
from pyllama_jax.convert.names import embedded_path
from pyllama_jax.train import lora
from pyllama_jax.train.trainer import OptimConfig, Trainer

HF_NAMES = {"attn.q": "q_proj", "attn.k": "k_proj", "attn.v": "v_proj", "attn.o": "o_proj",
            "mlp.gate": "gate_proj", "mlp.up": "up_proj", "mlp.down": "down_proj"}


class TorchLoRA(torch.nn.Module):
    """`base(x) + (alpha / r) * dropout(x) @ A @ B`, as `pyllama_jax.train.lora.LoRALinear`."""

    def __init__(self, base: torch.nn.Linear, rank: int, alpha: float, dropout: float):
        super().__init__()
        self.base, self.scale = base, alpha / rank
        self.a = torch.nn.Parameter(torch.empty(base.in_features, rank).uniform_(-1, 1) / math.sqrt(base.in_features))
        self.b = torch.nn.Parameter(torch.zeros(rank, base.out_features))
        self.dropout = torch.nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + self.scale * (self.dropout(x) @ self.a @ self.b)


def torch_lora_step(targets, rank: int, alpha: float, dropout: float, lr: float):
    """A closure running one PyTorch LoRA optimizer step on `(tokens, labels)`."""
    from transformers import AutoModelForCausalLM

    folder, name = os.path.split(embedded_path("smollm2-135m"))
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    model.requires_grad_(False)
    for layer in model.model.layers:
        for t in targets:
            parent = layer.self_attn if t.startswith("attn") else layer.mlp
            setattr(parent, HF_NAMES[t], TorchLoRA(getattr(parent, HF_NAMES[t]), rank, alpha, dropout))
    model.train()
    adapters = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(adapters, lr=lr, weight_decay=0.0)

    def step(tokens: torch.Tensor, labels: torch.Tensor) -> float:
        logits = model(tokens).logits
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=-1)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(adapters, 1.0)
        opt.step()
        return loss.item()

    return step


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq_len", type=int, default=256)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--targets", default="attn.q,attn.k,attn.v,attn.o")
    args = p.parse_args()
    targets = tuple(args.targets.split(","))

    ours = pj.load("smollm2-135m")
    lora.apply_lora(ours.module, targets, args.rank, 2.0 * args.rank, dropout=0.05)
    trainer = Trainer(ours.module, OptimConfig(steps=10 * args.rounds, lr=1e-4, warmup_steps=0), lora=True)
    theirs = torch_lora_step(targets, args.rank, 2.0 * args.rank, 0.05, 1e-4)

    rng = np.random.default_rng(0)
    tokens = rng.integers(100, ours.config.vocab_size, (args.batch, args.seq_len)).astype(np.int32)
    targets_ = np.concatenate([tokens[:, 1:], np.full((args.batch, 1), -1, np.int32)], axis=1)
    batch = {"tokens": tokens, "targets": targets_, "segment_ids": np.ones_like(tokens)}
    t_tokens, t_labels = torch.tensor(tokens, dtype=torch.long), torch.tensor(targets_, dtype=torch.long)
    n = tokens.size

    start = time.perf_counter()
    first = float(trainer.step(batch, 0)["loss"])
    print(f"pyllama-jax: first step (compile + run) {time.perf_counter() - start:.1f} s, loss {first:.3f}")
    print(f"transformers: first step loss {theirs(t_tokens, t_labels):.3f}")
    ours_tps, theirs_tps = [], []
    for r in range(args.rounds):
        start = time.perf_counter()
        float(trainer.step(batch, r + 1)["loss"])
        ours_tps.append(n / (time.perf_counter() - start))
        start = time.perf_counter()
        theirs(t_tokens, t_labels)
        theirs_tps.append(n / (time.perf_counter() - start))
        print(f"round {r}: ours {ours_tps[-1]:.0f} tok/s, transformers {theirs_tps[-1]:.0f} tok/s", flush=True)
    a, b = statistics.median(ours_tps), statistics.median(theirs_tps)
    print(f"\nSmolLM2-135M float32 LoRA r={args.rank} on {','.join(targets)}, batch {args.batch} x {args.seq_len}, "
          f"{os.cpu_count()} CPU threads, jax {__import__('jax').__version__}, torch {torch.__version__}, "
          f"medians of {args.rounds} alternating rounds")
    print(f"{'training tok/s':<16} pyllama-jax {a:.0f}   transformers {b:.0f}   ratio {a / b:.2f}")


if __name__ == "__main__":
    main()
