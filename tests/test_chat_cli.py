"""`scripts/chat.py` driven through a pseudo-terminal: streamed replies, history, Ctrl-C, /reset."""
from __future__ import annotations

import os
import sys
import tempfile

import pexpect
import pytest

from pyllama_jax.serve.process import REPO
from tests.signals import default_sigint

MAX_TOKENS = 160
STATS = r"\[(\d+) tokens, [\d.]+ tokens/s, (stop|length|interrupted)\]"
# pexpect forks a pty before exec'ing the script; JAX's threads in this process are not involved.
pytestmark = pytest.mark.filterwarnings("ignore:os.fork:RuntimeWarning")
XLA_CACHE = os.path.join(tempfile.gettempdir(), "pyllama-jax-test-xla-cache")  # shared by the serve tests


@pytest.fixture(scope="module")
def chat():
    child = pexpect.spawn(sys.executable, [os.path.join(REPO, "scripts", "chat.py"),
                                           f"--config={os.path.join(REPO, 'configs', 'smollm2_135m.py')}",
                                           f"--config.sampling.max_new_tokens={MAX_TOKENS}",
                                           "--config.serve.context=256"],
                          cwd=REPO, env={**os.environ, "JAX_COMPILATION_CACHE_DIR": XLA_CACHE, "TERM": "dumb"}, encoding="utf-8",
                          timeout=600, dimensions=(50, 200), preexec_fn=default_sigint)
    child.expect(">>> ")
    yield child
    child.close(force=True)


def test_conversation_keeps_history(chat, smollm2):
    """Each reply is what the core generator says to the whole conversation so far."""
    history, replies = [], []
    for question in ("What is the capital of France?", "And what is the capital of Germany?"):
        chat.sendline(question)
        chat.expect(STATS)
        printed = chat.before.replace("\r\n", "\n").split(question, 1)[1].strip("\n")
        reason = chat.match.group(2)
        chat.expect(">>> ")
        history.append({"role": "user", "content": question})
        ref = smollm2.generate(smollm2.tokenizer.apply_chat_template(history), max_new_tokens=MAX_TOKENS)
        assert (printed, reason) == (ref.texts[0].strip("\n"), ref.finish_reasons[0])
        history.append({"role": "assistant", "content": ref.texts[0]})
        replies.append(printed)
    assert "Paris" in replies[0] and "Berlin" in replies[1]


def test_ctrl_c_stops_a_streaming_reply_then_reset(chat):
    """Ctrl-C while a reply streams ends that reply and keeps the chat. On a busy machine this test's
    own process may see the first words late, after the reply has run to its token limit: then the
    attempt shows nothing about Ctrl-C, and another is made (three at most)."""
    for _ in range(3):
        chat.sendline("/reset")
        chat.expect(r"\[new conversation\]")
        chat.expect(">>> ")
        chat.sendline("Write a long story about a dragon who learns to paint.")
        chat.expect(r"dragon who learns to paint\.\r\n")
        chat.expect(r"\w+ \w+ \w+")  # the reply is streaming: words are on the screen
        chat.sendintr()
        chat.expect(STATS)
        tokens, reason = int(chat.match.group(1)), chat.match.group(2)
        if reason != "length":
            break
    assert reason == "interrupted" and 0 < tokens < MAX_TOKENS
    chat.expect(">>> ")
    chat.sendline("/quit")
    chat.expect(pexpect.EOF)
