"""Shared test fixtures.

Every test runs behind a network guard: a connection to anything but a loopback
address fails at once with ``OSError``. Code that would reach the internet in a
real run (tiktoken's download, the GPT-2 mirror, the dataset URL) therefore
takes its offline path in the tests, and a test that forgets to point a client at
its own loopback server fails loudly instead of quietly using the network.
"""

from __future__ import annotations

import ipaddress
import os
import shutil
import socket
from collections.abc import Callable
from pathlib import Path

import pytest

from helpers import FakeJudge

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DIR = REPO_ROOT.parent / "shared"

# .ci/run sets this: there, a test whose system program is missing fails instead of skipping
REQUIRE_PROGRAMS_ENV = "TESTS_REQUIRE_SYSTEM_PROGRAMS"

_LOCAL_NAMES = {"localhost", "localhost.localdomain", "ip6-localhost"}


def _is_loopback(host: object) -> bool:
    if host is None:
        return True
    if isinstance(host, bytes):
        host = host.decode()
    host = str(host)
    if host in _LOCAL_NAMES:
        return True
    try:
        return ipaddress.ip_address(host.split("%")[0]).is_loopback
    except ValueError:
        return False


class NetworkBlocked(OSError):
    """Raised by the guard when a test tries to leave the machine."""


@pytest.fixture(autouse=True)
def _block_non_loopback_network(monkeypatch: pytest.MonkeyPatch) -> None:
    real_getaddrinfo = socket.getaddrinfo
    real_connect = socket.socket.connect
    real_connect_ex = socket.socket.connect_ex

    def guarded_getaddrinfo(host, *args, **kwargs):
        if not _is_loopback(host):
            raise NetworkBlocked(f"test network guard: lookup of {host!r} refused")
        return real_getaddrinfo(host, *args, **kwargs)

    def _check(address) -> None:
        if isinstance(address, tuple) and not _is_loopback(address[0]):
            raise NetworkBlocked(f"test network guard: connection to {address!r} refused")

    def guarded_connect(self, address):
        _check(address)
        return real_connect(self, address)

    def guarded_connect_ex(self, address):
        _check(address)
        return real_connect_ex(self, address)

    monkeypatch.setattr(socket, "getaddrinfo", guarded_getaddrinfo)
    monkeypatch.setattr(socket.socket, "connect", guarded_connect)
    monkeypatch.setattr(socket.socket, "connect_ex", guarded_connect_ex)


@pytest.fixture
def shared_dir() -> Path:
    """The ../shared folder beside the checkout; skips the test when it is absent.

    It holds the real 1,100-entry instruction dataset and part of the real GPT-2 124M
    checkpoint, which are too large (or not ours) to commit.
    """
    if not SHARED_DIR.is_dir():
        pytest.skip(
            f"../shared is absent ({SHARED_DIR}): this test reads the real 1,100-entry "
            "dataset or the real GPT-2 124M checkpoint files, kept beside the project's "
            "checkout on its development machines"
        )
    return SHARED_DIR


@pytest.fixture(scope="module")
def one_thread():
    """Run a module's tiny-tensor tests on one thread.

    Tiny tensors gain nothing from threads, and on a busy 2-core machine thread hand-offs
    make them crawl. Use with ``pytestmark = pytest.mark.usefixtures("one_thread")``.
    """
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def download_sleeps(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    """The retry back-off sleeps that downloads.download_file asks for: recorded, not slept.

    What makes a failing download fast is how often it retries and how long it waits; a
    test asserts those instead of timing itself.
    """
    from runtime import downloads

    asked: list[float] = []
    monkeypatch.setattr(downloads.time, "sleep", asked.append)
    return asked


@pytest.fixture
def request_timeouts(monkeypatch: pytest.MonkeyPatch) -> list:
    """The ``timeout`` of every GET sent through a ``requests.Session`` (the requests go on)."""
    import requests

    timeouts: list = []
    real_get = requests.Session.get

    def recording_get(self, url, **kwargs):
        timeouts.append(kwargs.get("timeout"))
        return real_get(self, url, **kwargs)

    monkeypatch.setattr(requests.Session, "get", recording_get)
    return timeouts


@pytest.fixture
def judge_server():
    """``judge_server(reply, **kw)`` starts a ``FakeJudge`` (Ollama's and OpenAI's chat APIs on
    loopback) that answers with ``reply``; every one started is closed after the test."""
    servers = []

    def start(reply, **kw) -> FakeJudge:
        servers.append(FakeJudge(reply, **kw))
        return servers[-1]

    yield start
    for server in servers:
        server.close()


def require_program(name: str, install: str) -> Path:
    """The system program ``name`` (found on ``PATH``), which pip does not install.

    Without it the calling test skips with one line that gives ``install``, the command that
    installs it, so that the README's test command passes on a machine with only Python. Where
    ``$TESTS_REQUIRE_SYSTEM_PROGRAMS`` is ``1`` (CI, through ``.ci/run``) the test fails instead.
    """
    found = shutil.which(name)
    if found:
        return Path(found)
    reason = f"{name} is not installed: {install}"
    if os.environ.get(REQUIRE_PROGRAMS_ENV) == "1":
        pytest.fail(f"{reason} ({REQUIRE_PROGRAMS_ENV}=1: no skips allowed)", pytrace=False)
    pytest.skip(reason)


@pytest.fixture
def system_program() -> Callable[[str, str], Path]:
    """``system_program(name, install)``: see ``require_program``."""
    return require_program
