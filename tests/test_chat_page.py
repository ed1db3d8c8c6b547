"""The chat page (``main/chat_page.py``) in a real browser, offline.

The page runs in this process on a loopback port with a tiny model; Debian's Chromium, driven
by Playwright (which downloads no browser of its own here), opens it, changes a setting, types
an instruction and waits for the model's answer. Nothing may leave the machine: the browser's
every request is recorded, and so is every attempt of this process (the page's server) to
reach a host other than loopback. A screenshot is saved as the test's artifact.

Playwright comes with the README's test command (requirements-dev.txt): without it the browser
test fails, saying so. Chromium is a system program that pip cannot install: without it the
browser test skips with the command that installs it, and fails under CI (``.ci/run`` installs
Chromium and sets ``TESTS_REQUIRE_SYSTEM_PROGRAMS=1``).
"""

from __future__ import annotations

import ipaddress
import re
import socket
import time
from pathlib import Path
from urllib.parse import urlsplit

import pytest

import chat_page
from chat import chat_tokenizer, stream_reply
from helpers import closed_port, tiny_model_file
from runtime.model_file import load_model_file

CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
INSTALL_PLAYWRIGHT = (
    "Playwright for Python is not installed: pip install -r requirements-dev.txt (do not run "
    "`playwright install`: the test drives Debian's chromium)"
)
REQUIRE_PROGRAMS_ENV = "TESTS_REQUIRE_SYSTEM_PROGRAMS"  # .ci/run sets it to 1
INSTALL_CHROMIUM = "sudo apt-get install -y chromium (Debian's; .ci/run installs it)"
INSTRUCTION = "Give three tips for staying healthy."

# Gradio 6.31's queue uses pandas options that pandas 3 deprecates: its warning, not ours
pytestmark = [
    pytest.mark.filterwarnings("ignore:'future.no_silent_downcasting' is deprecated"),
    pytest.mark.filterwarnings("ignore:The copy keyword is deprecated"),
]


@pytest.fixture
def chromium(system_program) -> Path:
    return system_program("chromium", INSTALL_CHROMIUM)


@pytest.fixture
def sync_playwright():
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.fail(INSTALL_PLAYWRIGHT, pytrace=False)
    return sync_playwright


def _is_loopback(host: str | None) -> bool:
    if host in (None, "localhost"):
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


@pytest.fixture
def network_attempts(monkeypatch):
    """Every host other than loopback this process tries to look up or connect to.

    (conftest's guard refuses them; code that swallows the refusal, as usage analytics
    would, is caught here.)"""
    attempts: list[str] = []
    guarded_lookup, guarded_connect = socket.getaddrinfo, socket.socket.connect

    def lookup(host, *args, **kwargs):
        if not _is_loopback(host if isinstance(host, str) else None):
            attempts.append(f"lookup {host}")
        return guarded_lookup(host, *args, **kwargs)

    def connect(self, address):
        if isinstance(address, tuple) and not _is_loopback(str(address[0])):
            attempts.append(f"connect {address}")
        return guarded_connect(self, address)

    monkeypatch.setattr(socket, "getaddrinfo", lookup)
    monkeypatch.setattr(socket.socket, "connect", connect)
    return attempts


def words(text: str) -> str:
    """Letters and digits only: what the page shows, whatever Markdown made of the rest."""
    return re.sub(r"\W", "", text)


def wait_for_answer(bot, expected: str, seconds: float = 120.0) -> str:
    """The bot message's text once it shows ``expected`` (or whatever it shows after ``seconds``)."""
    deadline, shown = time.monotonic() + seconds, ""
    while time.monotonic() < deadline:
        if bot.count():
            shown = bot.first.inner_text()
            if words(shown) == words(expected):
                break
        time.sleep(0.2)
    return shown


def set_number(page, label: str, value: int, seconds: float = 30.0) -> None:
    """Type ``value`` into a slider's number box until its range slider shows it too.

    The accordion mounts its sliders as it opens, and a slider that is still starting up
    can put its first value back over what was typed; the page would then answer with the
    old setting. Typing again until the slider holds the value (and leaving the box, which
    Gradio takes as "done") makes the setting stick before the message is sent."""
    box = page.get_by_label(f"number input for {label}")
    slider = page.get_by_label(f"range slider for {label}")
    deadline = time.monotonic() + seconds
    while True:
        box.fill(str(value))
        box.press("Tab")
        page.wait_for_timeout(300)
        if slider.input_value() == box.input_value() == str(value):
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"the page's {label!r} setting would not take {value}")


@pytest.mark.slow
def test_the_chat_page_answers_in_a_real_browser(
    chromium, sync_playwright, network_attempts, tmp_path, capsys
):
    loaded = load_model_file(tiny_model_file(tmp_path / "run"))
    tokenizer = chat_tokenizer()
    expected = "".join(stream_reply(loaded, tokenizer, INSTRUCTION, max_new_tokens=12))
    app = chat_page.build_page(loaded, tokenizer, max_new_tokens=40)
    url = chat_page.launch(app, port=closed_port(), block=False)
    requested: list[str] = []
    try:
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch_persistent_context(
                str(tmp_path / "chromium-profile"),  # a fresh profile
                executable_path=str(chromium),
                headless=True,
                args=CHROMIUM_ARGS,
            )
            browser.on("request", lambda request: requested.append(request.url))
            page = browser.new_page()
            page.goto(url)
            page.get_by_text("Generation settings").click()
            set_number(page, "Max new tokens", 12)  # 40 -> 12
            page.get_by_role("textbox").first.fill(INSTRUCTION)
            page.keyboard.press("Enter")
            shown = wait_for_answer(page.locator('[data-testid="bot"]'), expected)
            screenshot = tmp_path / "chat-page.png"
            page.screenshot(path=screenshot, full_page=True)
            browser.close()
    finally:
        app.close()
    with capsys.disabled():
        print(f"\nchat page screenshot: {screenshot}")
    assert words(shown) == words(expected) != "", f"the page shows {shown!r}"
    assert any(u.startswith(url) for u in requested)  # the page came from our server
    local = ("data:", "blob:")
    left = [u for u in requested if not (u.startswith(local) or _is_loopback(urlsplit(u).hostname))]
    assert left == [], f"the page asked the internet for {left}"
    assert network_attempts == []


@pytest.mark.parametrize("required", [False, True], ids=["skips", "ci-fails"])
def test_without_chromium_the_browser_test_skips_or_under_ci_fails(
    required, system_program, tmp_path, monkeypatch
):
    """A machine with only Python: the browser test skips with the install command in one
    line; under CI (``.ci/run`` sets the variable) the same absence is a failure."""
    monkeypatch.setenv("PATH", str(tmp_path))  # a PATH without chromium
    monkeypatch.setenv(REQUIRE_PROGRAMS_ENV, "1" if required else "0")
    outcome = pytest.fail.Exception if required else pytest.skip.Exception
    with pytest.raises(outcome) as raised:
        system_program("chromium", INSTALL_CHROMIUM)
    message = str(raised.value.msg)
    assert message.startswith("chromium is not installed: sudo apt-get install -y chromium")
    assert "\n" not in message
    assert (REQUIRE_PROGRAMS_ENV in message) == required


def test_the_page_streams_the_answer_as_it_grows(tmp_path):
    """The page's chat function yields the answer after every piece of text, with the
    settings of its sliders (temperature, top-k, max new tokens)."""
    loaded = load_model_file(tiny_model_file(tmp_path))
    tokenizer = chat_tokenizer()
    app = chat_page.build_page(loaded, tokenizer)
    pieces = list(stream_reply(loaded, tokenizer, INSTRUCTION, max_new_tokens=8))
    shown = list(app.fn(INSTRUCTION, [], 0.0, 0, 8))  # greedy, all tokens, 8 new tokens
    assert shown == ["".join(pieces[: i + 1]) for i in range(len(pieces))]
    assert len(shown) > 1
    sampled = list(app.fn(INSTRUCTION, [], 1.0, 5, 8))  # top-5 sampling: other tokens
    assert sampled[-1] != shown[-1]


def test_the_page_says_when_there_is_no_model_file(tmp_path, capsys):
    assert chat_page.main(["--model", str(tmp_path / "missing-sft.pth")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: no model file at ") and "instruction_finetuning.py" in err


def test_the_page_refuses_bad_settings_before_loading(tmp_path, capsys):
    assert chat_page.main(["--model", str(tmp_path / "x.pth"), "--top-k", "0"]) == 2
    assert "--top-k 0: give at least 1" in capsys.readouterr().err
