"""`pyllama-chat`: chat with the configured model in the terminal: replies stream as they are generated, and the
conversation so far goes back to the model with every message (oldest turns drop out when the
context is full).

    python scripts/chat.py --config=configs/smollm2_135m.py --config.sampling.temperature=0.7

Commands: /reset starts a new conversation, /system TEXT sets the system prompt, /quit (or Ctrl-D)
leaves. Ctrl-C stops a reply early; what was said so far stays in the conversation.
"""
from __future__ import annotations

import dataclasses
import sys
import time

import ml_collections

import pyllama_jax as pj
from pyllama_jax.cli import job
from pyllama_jax.generate import SamplingConfig
from pyllama_jax.sections import from_section
from pyllama_jax.serve.engine import Engine, EngineConfig


def fit(engine: Engine, messages: list[dict[str, str]], max_tokens: int) -> list[int]:
    """The prompt tokens of `messages`, dropping the oldest turns (not the system prompt) to fit."""
    system = [m for m in messages[:1] if m["role"] == "system"]
    turns = messages[len(system):]
    while True:
        ids = engine.tokenizer.encode(engine.tokenizer.apply_chat_template(system + turns))
        if len(ids) + max_tokens <= engine.context or len(turns) == 1:
            return ids
        turns = turns[2:]  # the oldest user/assistant pair


def reply(engine: Engine, ids: list[int], sampling: SamplingConfig) -> tuple[str, str]:
    """Stream one reply to the terminal; returns its text and why it ended."""
    text, start, tokens, reason = "", time.perf_counter(), 0, "interrupted"
    knobs = dataclasses.asdict(sampling)
    events = engine.stream(ids, knobs.pop("max_new_tokens"), **knobs)
    try:
        for event in events:
            print(event.text, end="", flush=True)
            text, tokens = text + event.text, event.completion_tokens
            reason = event.finish_reason or reason
    except KeyboardInterrupt:
        events.close()  # cancels the request
    seconds = time.perf_counter() - start
    print(f"\n[{tokens} tokens, {tokens / max(seconds, 1e-9):.1f} tokens/s, {reason}]", flush=True)
    return text, reason


def chat(c: ml_collections.ConfigDict) -> None:
    """Load the configured model and chat with it until /quit or end of input."""
    sampling = from_section(SamplingConfig, c.sampling)
    try:
        model = pj.load_from_config(c)
    except FileNotFoundError as e:
        sys.exit(f"error: {e}")
    if model.tokenizer is None:
        sys.exit(f"error: {model.source} has no tokenizer, so there is nothing to chat with")
    engine = Engine(model.module, model.tokenizer, from_section(EngineConfig, c.serve), slots=1)
    engine.warmup()
    engine.start()
    print(f"Chatting with {model.source} ({engine.context} tokens of context). /reset, /system TEXT, /quit.",
          flush=True)
    messages: list[dict[str, str]] = []
    try:
        while True:
            try:
                line = input(">>> ").strip()
            except KeyboardInterrupt:
                print()
                continue
            if not line:
                continue
            if line == "/quit":
                break
            if line == "/reset":
                messages = [m for m in messages[:1] if m["role"] == "system"]
                print("[new conversation]")
                continue
            if line.startswith("/system"):
                messages = [{"role": "system", "content": line[len("/system"):].strip()}] + [
                    m for m in messages if m["role"] != "system"]
                print("[system prompt set]")
                continue
            messages.append({"role": "user", "content": line})
            try:
                text, _ = reply(engine, fit(engine, messages, sampling.max_new_tokens), sampling)
            except ValueError as e:  # the message alone does not fit the context
                print(f"[{e}]")
                messages.pop()
                continue
            messages.append({"role": "assistant", "content": text})
    except EOFError:
        print()
    finally:
        engine.close()


def main() -> None:
    job.run(chat, "smollm2_135m.py")


if __name__ == "__main__":
    main()
