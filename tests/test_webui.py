"""The chat page in a real headless browser (Debian's chromium driven by playwright).

The engine is held by a StepGate and released one step at a time, so the test sees the reply
stream in token by token instead of hoping to catch it mid-flight. `scripts/install_browser.sh`
installs chromium and playwright; the test skips only when chromium itself is absent.
"""

import json
from pathlib import Path

import pytest

from seekling.serve import create_app
from seekling.serve.testing import ServerThread, StepGate, save_scripted_model
from seekling.tokenizer import load_default_tokenizer

CHROMIUM = Path("/usr/bin/chromium")
pytestmark = pytest.mark.skipif(not CHROMIUM.exists(),
                                reason="/usr/bin/chromium is not installed; run scripts/install_browser.sh")
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync"]
REASONING, ANSWER = "The user said hi.", " Hello there!"
SHOWN = ANSWER.lstrip()  # the page hides the whitespace an answer starts with


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    tok = load_default_tokenizer()
    script = [tok.think_id, *tok.encode(REASONING), tok.end_think_id, *tok.encode(ANSWER), tok.eot_id]
    model_dir = save_scripted_model(tmp_path_factory.mktemp("webui") / "chat-model", script,
                                    after=tok.role_ids["assistant"])
    with ServerThread(create_app(model_dir)) as s:
        yield s


@pytest.fixture(scope="module")
def page(server):
    from playwright.sync_api import sync_playwright  # installed by scripts/install_browser.sh

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=ARGS)
        try:
            page = browser.new_page()
            page.set_default_timeout(30_000)  # a hang becomes a failure; no speed is asserted
            page.goto(server.url + "/")
            page.wait_for_function("document.getElementById('model').textContent.includes('chat-model')")
            yield page
        finally:
            browser.close()


def bubble_text(page) -> tuple[str, str]:
    return tuple(page.evaluate("""() => {
        const b = [...document.querySelectorAll('.msg.assistant')].pop();
        return [b.querySelector('.reasoning').textContent, b.querySelector('.content').textContent];
    }"""))


def test_streamed_reply_with_thinking_box(page, server):
    sent = []
    page.on("request", lambda r: sent.append(json.loads(r.post_data)) if r.url.endswith("/chat/completions") else None)
    with StepGate(server.app.state.backend) as gate:
        page.fill("#input", "hi")
        page.click("#send")
        page.wait_for_selector(".msg.assistant details.thinking")
        snapshots = [bubble_text(page)]
        while not page.evaluate("() => !!document.querySelector('.msg.assistant[data-done]')"):
            gate.allow(1)
            page.wait_for_timeout(40)  # let the browser render what the step streamed
            snapshots.append(bubble_text(page))
    reasoning, content = bubble_text(page)
    assert (reasoning, content) == (REASONING, SHOWN), page.inner_text("#messages")
    # the reply appeared piece by piece: several distinct partial states of each field
    assert len({r for r, _ in snapshots}) > 3 and len({c for _, c in snapshots}) > 2, snapshots
    assert all(SHOWN.startswith(c) for _, c in snapshots) and all(REASONING.startswith(r) for r, _ in snapshots)
    assert page.locator(".msg.assistant details.thinking summary").inner_text().startswith("Thinking")
    assert page.locator(".msg.user").inner_text() == "hi"
    assert sent[0]["stream"] is True and sent[0]["messages"] == [{"role": "user", "content": "hi"}]

    # the second turn sends the answer back, without its reasoning
    page.fill("#input", "and again")
    page.press("#input", "Enter")
    page.wait_for_function("() => document.querySelectorAll('.msg.assistant[data-done]').length === 2")
    assert sent[1]["messages"] == [{"role": "user", "content": "hi"}, {"role": "assistant", "content": ANSWER},
                                   {"role": "user", "content": "and again"}]
    assert bubble_text(page) == (REASONING, SHOWN)


def test_reset_and_error_display(page):
    page.click("#reset")
    assert page.locator("#messages > *").count() == 0
    page.fill("#max_tokens", "0")  # the server answers 400; the page shows its message
    page.fill("#input", "hello")
    page.click("#send")
    page.wait_for_selector(".msg.error")
    assert "max_tokens" in page.locator(".msg.error").inner_text()
    page.fill("#max_tokens", "64")
    page.fill("#input", "hello")
    page.click("#send")
    page.wait_for_function("() => document.querySelectorAll('.msg.assistant[data-done]').length === 2")
    assert bubble_text(page) == (REASONING, SHOWN)
