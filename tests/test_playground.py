"""The playground page (server/static, docs/playground.md) in a real browser: headless Chromium from
Debian's packages driven by selenium through the system chromedriver (nothing is downloaded).

Against the tiny model (configs/tiny.yaml, with an API key) and an in-process server whose fake
model writes an HTML tag: a chat turn streams, drafts appear and settle, a race shows two speeds
and a ratio (its screenshot goes to tests/artifacts/, not committed), a wrong key shows the 401,
Stop cancels on the server, model output stays text, and server errors with Retry-After show.
"""

from __future__ import annotations

import os
import re
import shutil
import threading
from collections.abc import Iterator
from html.parser import HTMLParser
from pathlib import Path

import httpx
import pytest
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys

from bench.live_server import HOST, LiveServer, free_port
from bench.polling import wait_until
from sampler.types import SamplingParams, StepEvent
from server.state import ServerState

ROOT = Path(__file__).resolve().parents[1]
ARTIFACTS = ROOT / "tests" / "artifacts"
API_KEY = "playground-test-key"
XSS = "<img src=x onerror=window.__xss=1>"
# Every wait in a test is bounded; the tiny model answers 128 tokens in a few seconds on 2 cores.
WAIT_S = 60.0


def _browser_binaries() -> tuple[str, str]:
    chromium = shutil.which("chromium") or "/usr/bin/chromium"
    driver = shutil.which("chromedriver") or "/usr/bin/chromedriver"
    if not (os.path.exists(chromium) and os.path.exists(driver)):
        pytest.fail(
            "the browser tests need Debian's chromium and chromium-driver: apt-get install chromium chromium-driver"
        )
    return chromium, driver


@pytest.fixture(scope="module")
def browser() -> Iterator[webdriver.Chrome]:
    chromium, driver = _browser_binaries()
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1200,900"):
        options.add_argument(arg)
    chrome = webdriver.Chrome(service=Service(driver), options=options)
    chrome.set_script_timeout(30)
    try:
        yield chrome
    finally:
        chrome.quit()


@pytest.fixture(scope="module")
def server() -> Iterator[LiveServer]:
    # Config keys from configs/tiny.yaml and the key below, not from the developer's DGSERVE_*.
    env = {k: v for k, v in os.environ.items() if not k.startswith("DGSERVE_") or k == "DGSERVE_CACHE"}
    with LiveServer.dgserve("configs/tiny.yaml", base_env={**env, "DGSERVE_API_KEY": API_KEY}) as live:
        yield live.wait_ready(timeout=120)


# ---- page helpers ----


def _wait(condition, what: str, timeout: float = WAIT_S) -> None:
    assert wait_until(condition, timeout, interval=0.1), f"timed out waiting for {what}"


def _text(browser, selector: str) -> str:
    found = browser.find_elements(By.CSS_SELECTOR, selector)
    return found[-1].text if found else ""


def _open(browser, base_url: str, key: str | None) -> None:
    browser.get(base_url + "/")
    browser.execute_script("localStorage.clear()")
    browser.get(base_url + "/")
    if key is not None:
        field = browser.find_element(By.ID, "api-key")
        field.send_keys(key)
        field.send_keys(Keys.TAB)  # `change` fires: the key is stored and the models reloaded
    _wait(lambda: _text(browser, "#status").startswith(("Ready", "Cannot")), "the page to list the model")


def _set(browser, element_id: str, value: str) -> None:
    field = browser.find_element(By.ID, element_id)
    field.clear()
    field.send_keys(value)


def _choose(browser, mode: str, sampler: str | None = None) -> None:
    browser.find_element(By.CSS_SELECTOR, f"input[name=mode][value={mode}]").click()
    if sampler is not None:
        browser.find_element(By.CSS_SELECTOR, f"#sampler option[value={sampler}]").click()


def _send(browser, prompt: str) -> None:
    field = browser.find_element(By.ID, "prompt")
    field.send_keys(prompt)
    field.send_keys(Keys.ENTER)


def _done(browser) -> bool:
    return browser.find_element(By.ID, "send").is_enabled() and _text(browser, "#status") != "Generating…"


def _aborted_requests(server: LiveServer) -> float:
    exposition = httpx.get(server.base_url + "/metrics", timeout=5).text
    found = re.search(r'^dgserve_request_success_total\{[^}]*finished_reason="abort"[^}]*\} (\S+)$', exposition, re.M)
    return float(found.group(1)) if found else 0.0


def _figures(answer) -> dict[str, str]:
    names = [e.text for e in answer.find_elements(By.CSS_SELECTOR, "dt")]
    values = [e.text for e in answer.find_elements(By.CSS_SELECTOR, "dd")]
    return dict(zip(names, values, strict=True))


# ---- without a browser: what the server sends ----


class _Scripts(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.scripts: list[tuple[dict[str, str | None], str]] = []
        self.handlers: list[str] = []
        self._in_script = False

    def handle_starttag(self, tag, attrs):
        self.handlers += [name for name, _ in attrs if name.startswith("on")]
        if tag == "script":
            self.scripts.append((dict(attrs), ""))
            self._in_script = True

    def handle_endtag(self, tag):
        self._in_script = self._in_script and tag != "script"

    def handle_data(self, data):
        if self._in_script:
            attrs, body = self.scripts[-1]
            self.scripts[-1] = (attrs, body + data)


def test_page_is_served_with_a_csp_and_no_inline_script(server):
    page = httpx.get(server.base_url + "/", timeout=10)
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    csp = page.headers["content-security-policy"]
    assert "script-src 'self'" in csp and "unsafe-inline" not in csp and "unsafe-eval" not in csp
    assert "default-src 'none'" in csp and "connect-src 'self'" in csp
    parsed = _Scripts()
    parsed.feed(page.text)
    assert parsed.scripts and all(attrs.get("src") and not body.strip() for attrs, body in parsed.scripts)
    assert parsed.handlers == []
    # Nothing from another origin: every URL the page names is a path on this server.
    assert not re.search(r"""(src|href)=["']?(https?:)?//""", page.text)
    assert httpx.get(server.base_url + "/playground", timeout=10).text == page.text
    missing = httpx.get(server.base_url + "/playground/static/../../config.py", timeout=10)
    assert missing.status_code == 404 and missing.json()["error"]["message"]


def test_playground_off_is_a_json_404(tiny_loaded):
    from fastapi.testclient import TestClient

    from server.app import create_app
    from server.config import ServerConfig

    app = create_app(ServerConfig(model="tiny-gemma3", device="cpu", playground=False), tiny_loaded)
    with TestClient(app) as client:
        # `/` answers a JSON index of the API instead (tests/test_first_minutes.py, issue 11).
        for path in ("/playground", "/playground/info", "/playground/static/playground.js"):
            response = client.get(path)
            assert response.status_code == 404, path
            assert "error" in response.json()


# ---- in the browser, against the tiny model ----


def test_chat_turn_streams_text_with_telemetry(browser, server):
    _open(browser, server.base_url, API_KEY)
    assert browser.find_element(By.ID, "model").get_attribute("value") == "tiny-gemma3"
    samplers = [o.get_attribute("value") for o in browser.find_elements(By.CSS_SELECTOR, "#sampler option")]
    assert samplers == ["ar", "parallel"]
    _choose(browser, "chat", "ar")
    _set(browser, "max-tokens", "24")
    _send(browser, "Hello there")
    _wait(lambda: _done(browser), "the answer to finish")
    assert _text(browser, "#status") == "Done."
    answer = browser.find_elements(By.CSS_SELECTOR, "#transcript .answer")[-1]
    # Streamed: the text arrived in many pieces, not one body.
    assert len(answer.find_elements(By.CSS_SELECTOR, ".committed span")) > 3
    assert answer.find_element(By.CSS_SELECTOR, ".committed").text.strip()
    figures = _figures(answer)
    assert figures["tokens"] == "24" and figures["forwards"] == "24" and figures["sampler"] == "ar"
    assert float(figures["tokens/s"]) > 0 and figures["tokens per forward"] == "1.00"
    # The conversation continues: a second turn sends the first one along.
    _send(browser, "And again")
    _wait(lambda: _done(browser), "the second answer")
    assert [e.text for e in browser.find_elements(By.CSS_SELECTOR, "#transcript .turn .body")] == [
        "Hello there",
        "And again",
    ]


def test_drafts_appear_then_settle(browser, server):
    _open(browser, server.base_url, API_KEY)
    _choose(browser, "completion", "parallel")
    _set(browser, "max-tokens", "48")
    # Record every draft the page shows while it streams (too fast to poll from here).
    browser.execute_script(
        """
        window.__drafts = [];
        new MutationObserver(() => {
          const d = document.querySelector('#transcript .answer:last-of-type .draft');
          const s = document.querySelector('#transcript .answer:last-of-type .draft-step');
          if (d && d.textContent) window.__drafts.push([d.textContent, s.textContent]);
        }).observe(document.getElementById('transcript'), {subtree: true, childList: true, characterData: true});
        """
    )
    _send(browser, "def fibonacci(n):")
    _wait(lambda: _done(browser), "the completion")
    drafts = browser.execute_script("return window.__drafts")
    assert len(drafts) >= 3, drafts
    assert all(re.fullmatch(r"draft of the block, refinement step \d+", step) for _, step in drafts)
    answer = browser.find_elements(By.CSS_SELECTOR, "#transcript .answer")[-1]
    # Settled: no draft left, the text committed, and parallel refinement's forwards counted.
    assert answer.find_element(By.CSS_SELECTOR, ".draft").get_attribute("textContent") == ""
    assert answer.find_element(By.CSS_SELECTOR, ".committed").get_attribute("textContent")
    figures = _figures(answer)
    assert figures["sampler"] == "parallel" and float(figures["tokens per forward"]) > 1.0
    assert "empty" not in answer.find_element(By.CSS_SELECTOR, "canvas.spark").get_attribute("class")


def test_race_shows_two_speeds_and_a_ratio(browser, server):
    _open(browser, server.base_url, API_KEY)
    _choose(browser, "race")
    _set(browser, "max-tokens", "96")
    _set(browser, "seed", "7")
    _send(browser, "def fibonacci(n):")
    _wait(lambda: "×" in _text(browser, "#race-ratio"), "the race's ratio")
    lanes = [browser.find_element(By.ID, lane) for lane in ("lane-a", "lane-b")]
    figures = [_figures(lane) for lane in lanes]
    assert [f["sampler"] for f in figures] == ["ar", "parallel"]
    speeds = [float(f["tokens/s"]) for f in figures]
    assert all(s > 0 for s in speeds)
    ratio = re.search(r"([\d.]+)× the speed of ar \(([\d.]+) vs ([\d.]+) tokens/s", _text(browser, "#race-ratio"))
    assert ratio, _text(browser, "#race-ratio")
    assert (float(ratio.group(2)), float(ratio.group(3))) == (speeds[1], speeds[0])
    assert float(ratio.group(1)) == pytest.approx(speeds[1] / speeds[0], abs=0.01)
    # Greedy: both samplers write the same text (parallel refinement's exact mode).
    texts = [lane.find_element(By.CSS_SELECTOR, ".committed").get_attribute("textContent") for lane in lanes]
    assert texts[0] and texts[0] == texts[1]
    ARTIFACTS.mkdir(exist_ok=True)
    assert browser.save_screenshot(str(ARTIFACTS / "race-tiny.png"))


def test_wrong_api_key_shows_the_401(browser, server):
    _open(browser, server.base_url, "not-the-key")
    error = browser.find_element(By.ID, "error")
    _wait(error.is_displayed, "the error box")
    assert "HTTP 401" in error.text and "invalid_api_key" in error.text and "API key field" in error.text
    _send(browser, "Hello")
    _wait(lambda: _text(browser, "#status") == "Failed.", "the refused request")
    assert "HTTP 401" in error.text and _done(browser)


def test_stop_cancels_on_the_server(browser, server):
    _open(browser, server.base_url, API_KEY)
    _choose(browser, "completion", "ar")
    _set(browser, "max-tokens", "3000")
    _send(browser, "Once upon a time")
    _wait(lambda: len(_text(browser, "#transcript .answer .committed")) > 20, "text to stream")
    assert server.metric("dgserve_requests_running") == 1
    aborted = _aborted_requests(server)
    browser.find_element(By.ID, "stop").click()
    _wait(lambda: server.metric("dgserve_requests_running") == 0, "the server to cancel")
    # Cancelled, not run to its 3000 tokens: the server counts it as aborted.
    assert _aborted_requests(server) == aborted + 1
    _wait(lambda: _done(browser), "the page to stop")
    assert "Stopped" in _text(browser, "#status")
    assert browser.find_element(By.ID, "error").is_displayed() is False


def test_keyboard_labels_and_phone_width(browser, server):
    _open(browser, server.base_url, API_KEY)
    # Every control has a label a screen reader reads.
    unlabelled = browser.execute_script(
        "return [...document.querySelectorAll('input, select, textarea')]"
        ".filter(e => !e.labels || e.labels.length === 0).map(e => e.id || e.name)"
    )
    assert unlabelled == []
    # Shift+Enter is a new line, not a send.
    field = browser.find_element(By.ID, "prompt")
    field.send_keys("line one", Keys.SHIFT, Keys.ENTER, Keys.SHIFT, "line two")
    assert field.get_attribute("value") == "line one\nline two"
    assert _text(browser, "#status").startswith("Ready")
    browser.set_window_size(390, 844)
    try:
        width = browser.execute_script("return document.documentElement.scrollWidth")
        assert width <= browser.execute_script("return window.innerWidth")
        lanes = [browser.find_element(By.ID, lane) for lane in ("lane-a", "lane-b")]
        _choose(browser, "race")
        assert lanes[0].location["y"] < lanes[1].location["y"], "phone width stacks the race lanes"
    finally:
        browser.set_window_size(1200, 900)


# ---- a fake model that writes HTML, served in-process ----


class _HTMLWriter:
    """A sampler that writes the ids of `XSS` to every sequence, two tokens a step, then stops.

    Everything after it is the real server: engine, detokenizer, formatter and SSE.
    """

    name = "ar"

    def __init__(self, token_ids: list[int]) -> None:
        self.token_ids = token_ids
        self._done: dict[str, int] = {}

    @property
    def num_active(self) -> int:
        return len(self._done)

    def add(self, seq_id: str, prompt_ids: list[int], params: SamplingParams) -> None:
        self._done[seq_id] = 0

    def cancel(self, seq_id: str) -> None:
        self._done.pop(seq_id, None)

    def step(self) -> dict[str, StepEvent]:
        events = {}
        for seq_id, done in list(self._done.items()):
            ids = self.token_ids[done : done + 2]
            self._done[seq_id] = done + len(ids)
            finished = self._done[seq_id] >= len(self.token_ids)
            events[seq_id] = StepEvent(ids, "stop" if finished else None, forward_passes=1)
            if finished:
                del self._done[seq_id]
        return events


@pytest.fixture(scope="module")
def xss_server(tiny_loaded) -> Iterator[tuple[str, ServerState]]:
    import uvicorn

    from server.app import create_app
    from server.config import ServerConfig

    token_ids = tiny_loaded.tokenizer.encode(XSS, add_special_tokens=False)
    assert tiny_loaded.tokenizer.decode(token_ids) == XSS
    config = ServerConfig(model="tiny-gemma3", device="cpu", sampler="ar")
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr("server.startup.build_sampler", lambda *_: _HTMLWriter(token_ids))
        app = create_app(config, tiny_loaded)
        port = free_port()
        uv = uvicorn.Server(uvicorn.Config(app, host=HOST, port=port, log_level="warning"))
        thread = threading.Thread(target=uv.run, daemon=True)
        thread.start()
        base = f"http://{HOST}:{port}"
        try:
            _wait(lambda: _ready(base), "the in-process server")
            yield base, app.state.dg
        finally:
            uv.should_exit = True
            thread.join(timeout=10)


def _ready(base: str) -> bool:
    try:
        return httpx.get(base + "/ready", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def test_model_output_is_text_never_html(browser, xss_server):
    base, _ = xss_server
    _open(browser, base, None)
    _choose(browser, "completion", "ar")
    _send(browser, "Say something:")
    _wait(lambda: _done(browser), "the fake model's answer")
    answer = browser.find_elements(By.CSS_SELECTOR, "#transcript .answer")[-1]
    assert answer.find_element(By.CSS_SELECTOR, ".committed").get_attribute("textContent") == XSS
    assert answer.find_elements(By.CSS_SELECTOR, "img") == []
    assert browser.execute_script("return window.__xss") is None


def test_server_errors_show_status_and_retry_after(browser, xss_server):
    base, state = xss_server
    _open(browser, base, None)
    _choose(browser, "chat")
    state.draining = True  # the server refuses new work with 503 and Retry-After, as on SIGTERM
    try:
        _send(browser, "Hello")
        error = browser.find_element(By.ID, "error")
        _wait(error.is_displayed, "the 503")
    finally:
        state.draining = False
    assert "HTTP 503" in error.text and "Retry after 5 s" in error.text
    _set(browser, "temperature", "5")  # outside 0..2: the server's 400 names the parameter
    _send(browser, "Hello")
    _wait(lambda: "HTTP 400" in error.text, "the 400")
    assert "temperature" in error.text


# ---- the command line a new user meets first ----


def test_cli_version_and_help_list_subcommands_and_defaults(dgserve_cli):
    from server import __version__

    version = dgserve_cli("--version", timeout=60)
    assert version.returncode == 0 and version.stdout.strip() == f"dgserve {__version__}"
    shown = dgserve_cli("--help", timeout=60)
    assert shown.returncode == 0
    for subcommand in ("bench", "bench-load", "bench-steps"):
        assert re.search(rf"^  {subcommand} ", shown.stdout, re.M), subcommand
    assert "(default: 127.0.0.1)" in shown.stdout and "(default: 8000)" in shown.stdout
