"""A real fine-tuning run: SmolLM2-135M-Instruct + LoRA on Stanford Alpaca's 175 seed tasks, on CPU.

Trains with `configs/alpaca_lora.py` (plus the overrides below), then writes to
`experiments/results/alpaca_lora/`: `metrics.csv` (per-step loss, held-out loss, lr, tokens/s),
`loss.png`, `generations.md` (greedy answers to held-out instructions before and after) and
`summary.md`. Checkpoints stay in `--workdir`; re-running resumes there.

    nohup python experiments/alpaca_lora_run.py --steps 200 --batch_size 2 > run.log 2>&1 &
"""
from __future__ import annotations

import argparse
import importlib.util
import os
import shutil
import statistics

import pyllama_jax as pj
from pyllama_jax.data import alpaca
from pyllama_jax.train.metrics import plot_losses, read_metrics
from pyllama_jax.train.run import finetune, load_model

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(REPO, "experiments", "results", "alpaca_lora")


def load_config(path: str):
    spec = importlib.util.spec_from_file_location("job_config", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


def answers(model: pj.Model, prompts: list[str], max_new_tokens: int) -> list[str]:
    return [t.strip() for t in model.generate(prompts, max_new_tokens=max_new_tokens).texts]


def generations_md(examples: list[alpaca.Example], before: list[str], after: list[str], steps: int) -> str:
    out = [f"# Held-out Alpaca seed tasks: greedy answers before and after {steps} LoRA steps\n",
           "SmolLM2-135M-Instruct, Alpaca prompt template, up to the token limit shown in summary.md.\n"]
    for i, (e, b, a) in enumerate(zip(examples, before, after), 1):
        out.append(f"\n## {i}. {e.instruction}\n")
        if e.input:
            out.append(f"\n**Input:** {e.input}\n")
        out.append(f"\n**Before:** {b}\n\n**After:** {a}\n\n**Reference:** {e.output}\n")
    return "".join(out)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=os.path.join(REPO, "configs", "alpaca_lora.py"))
    p.add_argument("--model", default="", help="override the config's model (e.g. random:tiny for a smoke test)")
    p.add_argument("--workdir", default="/tmp/pyllama_alpaca_lora")
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--batch_size", type=int, default=2)
    p.add_argument("--eval_every", type=int, default=25)
    p.add_argument("--generations", type=int, default=6, help="held-out instructions to answer before/after")
    p.add_argument("--new_tokens", type=int, default=96)
    p.add_argument("--results", default=RESULTS, help="where the results go")
    args = p.parse_args()

    c = load_config(args.config)
    c.model = args.model or c.model
    t = c.train
    t.workdir, t.steps, t.batch_size = args.workdir, args.steps, args.batch_size
    t.eval_every, t.save_every, t.sample_every, t.samples = args.eval_every, 25, 0, 0
    held_out = alpaca.split(alpaca.load_examples(c.data.path), c.data.eval_size, t.seed)[1]
    shown = held_out[:args.generations]
    base = load_model(c, None)
    prompts = [alpaca.prompt_text(e, base.tokenizer, c.data.template) for e in shown]
    before = answers(base, prompts, args.new_tokens)
    del base
    trained = finetune(c)
    after = answers(trained, prompts, args.new_tokens)

    os.makedirs(args.results, exist_ok=True)
    shutil.copyfile(os.path.join(args.workdir, "metrics.csv"), os.path.join(args.results, "metrics.csv"))
    plot_losses(os.path.join(args.results, "metrics.csv"), os.path.join(args.results, "loss.png"),
                f"SmolLM2-135M-Instruct + LoRA r={t.lora_rank}, Alpaca seed tasks")
    with open(os.path.join(args.results, "generations.md"), "w", encoding="utf-8") as f:
        f.write(generations_md(shown, before, after, args.steps))
    rows = read_metrics(os.path.join(args.workdir, "metrics.csv"))
    held = [(int(r["step"]), float(r["eval_loss"])) for r in rows if r["eval_loss"]]
    train = [float(r["loss"]) for r in rows if r["loss"]]
    tps = [float(r["tokens_per_s"]) for r in rows[2:] if r["tokens_per_s"]]  # rows[1] includes compilation
    seconds = sum(float(r["seconds"]) for r in rows if r["seconds"])
    with open(os.path.join(args.results, "summary.md"), "w", encoding="utf-8") as f:
        f.write(f"# SmolLM2-135M LoRA on Alpaca seed tasks (CPU)\n\n"
                f"- data: {c.data.path.split('shared/')[-1]}, {len(held_out)} examples held out (split by seed "
                f"{t.seed}), template {c.data.template!r}, rows of {c.data.seq_len} tokens, packed={c.data.pack} "
                f"(the run log counts examples truncated or dropped for length)\n"
                f"- LoRA r={t.lora_rank}, alpha={t.lora_alpha}, dropout={t.lora_dropout} on {', '.join(t.lora_targets)}; "
                f"AdamW lr {t.lr} (warmup {t.warmup_steps}, cosine to {t.end_lr_ratio}x), clip {t.clip_norm}, "
                f"{t.steps} steps of {t.batch_size} rows, float32 on a shared 2-core CPU\n"
                f"- held-out loss: {held[0][1]:.4f} at step {held[0][0]} -> {min(l for _, l in held):.4f} (best) -> "
                f"{held[-1][1]:.4f} at step {held[-1][0]}\n"
                f"- training loss (batches of {t.batch_size} rows, noisy): mean of the first 10 steps "
                f"{statistics.mean(train[:10]):.4f}, of the last 10 steps {statistics.mean(train[-10:]):.4f}\n"
                f"- training throughput: median {statistics.median(tps):.0f} tokens/s (non-padding tokens; "
                f"{seconds / 60:.0f} min in training steps, compilation included)\n"
                f"- generations: {args.generations} held-out instructions, greedy, {args.new_tokens} new tokens "
                f"at most (generations.md)\n")
    print(open(os.path.join(args.results, "summary.md")).read())


if __name__ == "__main__":
    main()
