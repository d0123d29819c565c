"""The web chat page in headless Chromium (Debian's /usr/bin/chromium, driven by Playwright):
streamed tokens appear, the conversation builds up, and Stop ends a generation and frees its slot.
A screenshot is saved to artifacts/web_chat.png."""
from __future__ import annotations

import json
import os
import tempfile
import time
import urllib.request

import pytest

from pyllama_jax.serve.process import REPO, ServerProcess

CHROMIUM = "/usr/bin/chromium"
FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
         "--disable-component-update", "--disable-sync"]
XLA_CACHE = os.path.join(tempfile.gettempdir(), "pyllama-jax-test-xla-cache")  # shared by the serve tests
SHOT = os.path.join(REPO, "artifacts", "web_chat.png")


@pytest.fixture(scope="module")
def server():
    with ServerProcess(["--config.serve.slots=1", "--config.serve.context=256"],
                       env={"JAX_COMPILATION_CACHE_DIR": XLA_CACHE}) as s:
        yield s


@pytest.fixture()
def page(server, tmp_path):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch_persistent_context(str(tmp_path / "profile"), executable_path=CHROMIUM,
                                                       headless=True, args=FLAGS, viewport={"width": 1000, "height": 700})
        page = browser.new_page()
        page.goto(server.url + "/")
        yield page
        browser.close()


def health(server) -> dict:
    with urllib.request.urlopen(server.url + "/health", timeout=30) as r:
        return json.load(r)


def send(page, text: str, temperature: float, max_tokens: int) -> None:
    page.fill("#temperature", str(temperature))
    page.fill("#max-tokens", str(max_tokens))
    page.fill("#input", text)
    page.click("#send")


def test_streams_keeps_history_and_stops(server, page):
    page.wait_for_function("document.getElementById('model').textContent.startsWith('smollm2-135m')", timeout=60000)
    # Count every change to the conversation, to see the reply arrive token by token.
    page.evaluate("window.updates = 0; new MutationObserver(() => window.updates++).observe("
                  "document.getElementById('messages'), {subtree: true, childList: true, characterData: true})")
    bodies = []
    page.on("request", lambda r: bodies.append(r.post_data_json) if r.url.endswith("/v1/chat/completions") else None)
    send(page, "What is the capital of France?", 0, 48)
    page.wait_for_selector(".msg.assistant:not(.streaming)", timeout=120000)
    first = page.inner_text(".msg.assistant")
    assert "Paris" in first
    assert page.evaluate("window.updates") > 5
    assert page.inner_text("#status").endswith("(stop)")

    send(page, "Write a long story about a dragon who learns to paint.", 0.7, 140)  # ~110 prompt tokens + 140 fit the context
    bubble = page.locator(".msg.assistant").nth(1)
    page.wait_for_function("document.querySelectorAll('.msg.assistant')[1].textContent.length > 40", timeout=120000)
    assert page.is_enabled("#stop") and not page.is_enabled("#send")
    page.click("#stop")
    page.wait_for_selector(".msg.assistant.streaming", state="detached", timeout=10000)
    assert page.inner_text("#status") == "stopped"
    stopped_at = bubble.inner_text()
    start = time.monotonic()
    while health(server)["active"] and time.monotonic() - start < 10:
        time.sleep(0.1)
    assert health(server)["active"] == 0, "the stopped generation still holds its slot"
    assert bubble.inner_text() == stopped_at and len(stopped_at) > 40
    assert page.locator(".msg.user").count() == 2 and page.locator(".msg.assistant").count() == 2
    assert [m["role"] for m in bodies[1]["messages"]] == ["user", "assistant", "user"]  # the history went along
    assert bodies[1]["messages"][1]["content"] == first and bodies[1]["stream"] and bodies[1]["max_tokens"] == 140
    assert page.is_enabled("#send") and not page.is_enabled("#stop")
    os.makedirs(os.path.dirname(SHOT), exist_ok=True)
    page.screenshot(path=SHOT)
    assert os.path.getsize(SHOT) > 10000
