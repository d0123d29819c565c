"""Load test of the OpenAI-compatible server: concurrent streaming chat clients on loopback.

Starts `scripts/serve.py` (SmolLM2 by default) on a free 127.0.0.1 port, then for each concurrency
level runs a fixed number of streaming chat requests of exactly `max_tokens` tokens (`ignore_eos`),
and reports errors, incomplete responses, time to first token (p50/p99), aggregate tokens/s, and
the server's resident memory before and after, as a markdown table. Bounded in count and time.

    python benchmarks/serve_load.py --slots 16 --concurrency 1,8,16 --requests_per_client 2
"""
from __future__ import annotations

import argparse
import asyncio
import dataclasses
import time

import openai
import psutil

from pyllama_jax.serve.process import ServerProcess

QUESTIONS = ["What is the capital of France?", "Write a haiku about the sea.", "Explain photosynthesis briefly.",
             "Name three prime numbers.", "Why is the sky blue?", "Give me a tip for learning to code."]


@dataclasses.dataclass
class Outcome:
    """One streamed request as the client saw it."""

    ttft: float = float("nan")  # seconds to the first content
    seconds: float = float("nan")
    tokens: int = 0  # completion tokens (the usage chunk)
    finish_reason: str | None = None
    text: str = ""
    error: str | None = None


async def _one(client: openai.AsyncOpenAI, model: str, question: str, max_tokens: int,
               temperature: float) -> Outcome:
    out, start = Outcome(), time.perf_counter()
    try:
        stream = await client.chat.completions.create(
            model=model, messages=[{"role": "user", "content": question}], max_tokens=max_tokens,
            temperature=temperature, seed=0, stream=True, stream_options={"include_usage": True},
            extra_body={"ignore_eos": True})
        async for chunk in stream:
            if chunk.usage is not None:
                out.tokens = chunk.usage.completion_tokens
            for choice in chunk.choices:
                if choice.delta.content:
                    if not out.text:
                        out.ttft = time.perf_counter() - start
                    out.text += choice.delta.content
                out.finish_reason = choice.finish_reason or out.finish_reason
    except Exception as e:  # counted, not raised: the report says how many failed and why
        out.error = f"{type(e).__name__}: {e}"
    out.seconds = time.perf_counter() - start
    return out


async def run_clients(url: str, model: str, api_key: str, clients: int, requests_per_client: int,
                      max_tokens: int, temperature: float = 0.0, timeout: float = 300) -> tuple[list[Outcome], float]:
    """`clients` concurrent clients, each sending `requests_per_client` requests one after another."""
    client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key=api_key or "none", max_retries=0, timeout=timeout)

    async def user(u: int) -> list[Outcome]:
        return [await _one(client, model, QUESTIONS[(u + r) % len(QUESTIONS)], max_tokens,
                           temperature)
                for r in range(requests_per_client)]

    start = time.perf_counter()
    try:
        per_user = await asyncio.wait_for(asyncio.gather(*(user(u) for u in range(clients))), timeout)
    finally:
        await client.close()
    return [o for outs in per_user for o in outs], time.perf_counter() - start


def _percentile(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, round(q * (len(values) - 1)))] if values else float("nan")


def summarize(outcomes: list[Outcome], wall: float, max_tokens: int) -> dict[str, float]:
    """Errors, incomplete responses, time-to-first-token percentiles and aggregate tokens/s."""
    ok = [o for o in outcomes if o.error is None]
    complete = [o for o in ok if o.tokens == max_tokens and o.finish_reason == "length" and o.text]
    ttft = [o.ttft for o in ok]
    return {"requests": len(outcomes), "errors": len(outcomes) - len(ok), "incomplete": len(ok) - len(complete),
            "ttft_p50": _percentile(ttft, 0.5), "ttft_p99": _percentile(ttft, 0.99),
            "tokens_per_s": sum(o.tokens for o in ok) / wall, "wall": wall}


def rss_mb(pid: int) -> float:
    return psutil.Process(pid).memory_info().rss / 2**20


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="configs/smollm2_135m.py")
    ap.add_argument("--slots", type=int, default=16)
    ap.add_argument("--context", type=int, default=512)
    ap.add_argument("--concurrency", default="1,8,16", help="comma-separated client counts")
    ap.add_argument("--requests_per_client", type=int, default=2)
    ap.add_argument("--max_tokens", type=int, default=32)
    ap.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    ap.add_argument("--rounds", type=int, default=1, help="repeat the concurrency sweep (memory trend)")
    args = ap.parse_args()
    levels = [int(c) for c in args.concurrency.split(",")]
    overrides = [f"--config.serve.slots={args.slots}", f"--config.serve.context={args.context}",
                 f"--config.serve.max_queue={max(levels)}"]
    rows = []
    with ServerProcess(overrides, config=args.config) as server:
        asyncio.run(run_clients(server.url, server.model, "", min(levels[-1], args.slots), 1, 4))  # compile
        start_rss = rss_mb(server.pid)
        for r in range(args.rounds):
            for clients in levels:
                before = rss_mb(server.pid)
                outcomes, wall = asyncio.run(run_clients(server.url, server.model, "", clients,
                                                         args.requests_per_client, args.max_tokens,
                                                         args.temperature))
                s = summarize(outcomes, wall, args.max_tokens)
                rows.append((r, clients, s, before, rss_mb(server.pid)))
                errors = [o.error for o in outcomes if o.error]
                print(f"round {r} clients {clients}: {s}" + (f" first error: {errors[0]}" if errors else ""), flush=True)
        end_rss = rss_mb(server.pid)
    single = {r: s["tokens_per_s"] for r, c, s, *_ in rows if c == 1}
    print(f"\nServer: {args.config}, {args.slots} slots, context {args.context}; streaming chat, "
          f"{args.max_tokens} tokens per request (ignore_eos), temperature {args.temperature}.\n")
    print("| round | clients | requests | errors | incomplete | TTFT p50 (s) | TTFT p99 (s) | tokens/s | "
          "vs 1 client | server RSS before -> after (MiB) |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r, clients, s, before, after in rows:
        ratio = f"{s['tokens_per_s'] / single[r]:.2f}x" if r in single else "-"
        print(f"| {r} | {clients} | {s['requests']} | {s['errors']} | {s['incomplete']} | {s['ttft_p50']:.2f} | "
              f"{s['ttft_p99']:.2f} | {s['tokens_per_s']:.1f} | {ratio} | {before:.0f} -> {after:.0f} |")
    total = sum(s["requests"] for _, _, s, _, _ in rows)
    print(f"\nServer RSS after warm-up {start_rss:.0f} MiB, after {total} requests {end_rss:.0f} MiB "
          f"({(end_rss - start_rss) * 1024 / max(total, 1):+.1f} KiB per request).")


if __name__ == "__main__":
    main()
