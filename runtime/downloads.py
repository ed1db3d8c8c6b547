"""Downloading one file robustly: resumable, retried, checked, bounded in time, and clear
about what went wrong.

``download_file(url, destination)`` writes to ``destination.part`` and resumes it with an
HTTP Range request; each URL gets a few attempts with backoff, then a backup URL; the file
lands in place (renamed atomically) only when complete and passing its ``check``. A server
that goes silent fails after ``DOWNLOAD_TIMEOUT``; one that trickles below ``MIN_RATE`` for
``SLOW_SECONDS`` gives up, keeping the partial file (``download_limits``: the settings and
the environment variables that set them); within ``NOTICE_SECONDS`` the terminal says what
a waiting transfer waits on. A failure is a ``DownloadError`` of two lines (what failed,
what to do; ``details`` holds every error); local disk problems are ``DiskError``s, never
retried as network failures. ``gpt_download`` uses it for GPT-2's files.
"""

from __future__ import annotations

import contextlib
import os
import re
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import requests
import urllib3

from runtime.progress_bars import progress_bar

DOWNLOAD_TIMEOUT = (5.0, 30.0)  # seconds to connect, seconds of silence while receiving
MIN_RATE = 1000.0  # bytes per second: a transfer slower than this ...
SLOW_SECONDS = 60.0  # ... for this long gives up (its partial file is kept and resumes)
NOTICE_SECONDS = 3.0  # after this long without progress, say on the terminal what is waited on
# settings from the environment (each a number of seconds, or bytes per second)
SILENCE_ENV, DEADLINE_ENV, MIN_RATE_ENV = (
    "DOWNLOAD_SILENCE_SECONDS",
    "DOWNLOAD_DEADLINE_SECONDS",
    "DOWNLOAD_MIN_RATE",
)


class DownloadError(RuntimeError):
    """A file could not be downloaded from any of its URLs.

    ``details``: every error behind it, in full (what ``--verbose`` prints)."""

    details: str = ""


class FileCheckError(ValueError):
    """A downloaded file is not what it claims to be (raised by a download's ``check``)."""


class DiskError(DownloadError):
    """A local file problem (no space, no permission, a folder where a file should be).

    Retrying or another server will not help, so nothing is retried.
    """

    @classmethod
    def from_os_error(cls, action: str, path: Path, exc: OSError) -> DiskError:
        return cls(
            f"could not {action} {path}: {exc.strerror or exc}. This is a problem with the "
            "local disk, not the network: free some space, or choose a folder you can write to."
        )


@contextlib.contextmanager
def _on_disk(action: str, path: Path):
    """Report an ``OSError`` of the local file operation inside as a ``DiskError``."""
    try:
        yield
    except OSError as exc:
        raise DiskError.from_os_error(action, path, exc) from exc


def _remove(path: Path) -> None:
    with _on_disk("delete", path):
        path.unlink(missing_ok=True)


def _check_paths(destination: Path, part: Path) -> None:
    """Before any request: refuse a folder where a file goes, or a file where a folder goes."""
    for path in (destination, part):
        if path.is_dir():
            raise DiskError(
                f"{path} is a folder, but the download needs to write a file there: move the "
                "folder away or choose another destination."
            )
    folder = next((p for p in destination.parents if p.exists()), None)
    if folder is not None and not folder.is_dir():
        raise DiskError(
            f"{folder} is a file, but {destination} needs it to be a folder: move the file "
            "away or choose another destination."
        )


class _IncompleteDownload(Exception):
    """The server ended the transfer early or sent something unusable."""


class _TooSlow(Exception):
    """The attempt ran past its deadline: the server sends, but far too slowly."""


def _content_range(response: requests.Response) -> tuple[int, int | None]:
    """(first byte, total size or None) from a 206 response's Content-Range."""
    match = re.fullmatch(r"bytes (\d+)-\d+/(\d+|\*)", response.headers.get("Content-Range", ""))
    if match is None:
        raise _IncompleteDownload("206 response without a usable Content-Range header")
    return int(match[1]), None if match[2] == "*" else int(match[2])


def _env_number(name: str, default: float | None) -> float | None:
    """The positive number in environment variable ``name``, else ``default``."""
    value = os.environ.get(name, "").strip()
    if not value:
        return default
    try:
        number = float(value)
    except ValueError:
        number = -1.0
    if not number >= 0:
        raise ValueError(f"{name}={value!r}: give a number of at least 0")
    return number or None


def download_limits(
    timeout=None, deadline=None, min_rate=None
) -> tuple[tuple, float | None, float]:
    """(connect, silence) seconds, the per-attempt deadline (None: none) and the slowest
    rate accepted: the values given, else $DOWNLOAD_SILENCE_SECONDS, $DOWNLOAD_DEADLINE_SECONDS
    and $DOWNLOAD_MIN_RATE (0: no floor), else the defaults."""
    if timeout is None:
        silence = _env_number(SILENCE_ENV, DOWNLOAD_TIMEOUT[1]) or DOWNLOAD_TIMEOUT[1]
        timeout = (
            (DOWNLOAD_TIMEOUT[0], silence) if silence != DOWNLOAD_TIMEOUT[1] else DOWNLOAD_TIMEOUT
        )
    if deadline is None:
        deadline = _env_number(DEADLINE_ENV, None)
    if min_rate is None:
        min_rate = _env_number(MIN_RATE_ENV, MIN_RATE) or 0.0
    return timeout, deadline, min_rate


class _Watch:
    """Says on the terminal, within ``NOTICE_SECONDS``, what a transfer is waiting on (no
    answer, no data, or data slower than ``min_rate``); a background thread, stopped by
    ``close()``."""

    def __init__(self, url: str, silence: float, min_rate: float):
        self.host, self.name = url.split("/")[2], url.rsplit("/", 1)[-1]
        self.silence, self.min_rate, self.notice = silence, min_rate, NOTICE_SECONDS
        self.received, self.new, self.total, self.answered = 0, 0, None, False
        self.last, self.said, self.said_slow = time.monotonic(), False, False
        self.done = threading.Event()
        threading.Thread(target=self._run, daemon=True).start()

    def got(self, n: int) -> None:
        self.received, self.new = self.received + n, self.new + n
        self.last, self.said = time.monotonic(), False

    def _say(self, text: str) -> None:
        print(f"{self.name}: {text}", file=sys.stderr, flush=True)

    def _run(self) -> None:
        mark_time, mark_bytes = time.monotonic(), 0
        while not self.done.wait(min(1.0, self.notice / 3)):
            now = time.monotonic()
            if now - self.last >= self.notice and not self.said:
                self.said = True
                what = f"{self.received:,} of {self.total or '?'} bytes received"
                self._say(
                    f"waiting on {self.host} for {now - self.last:.0f} s "
                    f"({what if self.answered else 'no answer yet'}); "
                    f"giving up after {self.silence:g} s of silence"
                )
            elif now - mark_time >= self.notice:
                rate = (self.new - mark_bytes) / (now - mark_time)
                if self.answered and rate < self.min_rate and not self.said_slow:
                    self.said_slow = True
                    self._say(
                        f"{self.host} sends slowly ({rate:,.0f} bytes/s; {self.received:,} of "
                        f"{self.total or '?'} bytes); giving up below {self.min_rate:,.0f} "
                        f"bytes/s for {SLOW_SECONDS:g} s"
                    )
                mark_time, mark_bytes = now, self.new

    def close(self) -> None:
        self.done.set()


def _receive(response, part: Path, mode: str, have: int, total, limits, watch) -> None:
    """Write the response's body to ``part``; give up past the deadline, or when the rate
    stays below the floor for ``SLOW_SECONDS`` (the partial file is kept)."""
    deadline, min_rate, progress = limits
    started = window = time.monotonic()
    received = window_bytes = 0
    # read1 (urllib3 >= 2.3) returns what has arrived, so a trickle cannot outlast the deadline
    read = getattr(response.raw, "read1", response.raw.read)
    bar = progress_bar(
        total=total, initial=have, unit="B", unit_scale=True, desc=part.stem, enabled=progress
    )
    with _on_disk("write", part):
        file = open(part, mode)
    try:
        # small chunks: a dropped connection loses at most one unwritten chunk
        while chunk := read(1 << 16, decode_content=True):
            with _on_disk("write", part):
                file.write(chunk)
            received, window_bytes = received + len(chunk), window_bytes + len(chunk)
            bar.update(len(chunk))
            watch.got(len(chunk))
            now, counts = time.monotonic(), f"{have + received:,} of {total or '?'} bytes"
            if deadline is not None and now - started > deadline:
                raise _TooSlow(f"still receiving after its {deadline:g} s deadline ({counts})")
            if now - window >= SLOW_SECONDS:
                if window_bytes < min_rate * (now - window):
                    rate = window_bytes / (now - window)
                    raise _TooSlow(
                        f"slower than {min_rate:,.0f} bytes/s for {now - window:.2g} s "
                        f"({rate:,.0f} bytes/s; {counts})"
                    )
                window, window_bytes = now, 0
    finally:
        bar.close()
        with _on_disk("write", part):
            file.close()


def _fetch(session: requests.Session, url: str, part: Path, timeout, limits) -> None:
    """One attempt: append the rest of ``url`` to ``part`` (or start it over)."""
    watch = _Watch(url, timeout[1] if isinstance(timeout, tuple) else timeout, limits[1])
    try:
        _fetch_watched(session, url, part, timeout, limits, watch)
    finally:
        watch.close()


def _fetch_watched(session, url: str, part: Path, timeout, limits, watch: _Watch) -> None:
    with _on_disk("read", part):
        have = part.stat().st_size if part.exists() else 0
    headers = {"Accept-Encoding": "identity"}  # byte counts must match the file's
    if have:
        headers["Range"] = f"bytes={have}-"
    with session.get(url, headers=headers, stream=True, timeout=timeout) as response:
        if response.status_code == 416:  # our partial file does not fit this file
            _remove(part)
            raise _IncompleteDownload("server refused to resume; starting over")
        response.raise_for_status()
        if response.status_code == 206:
            start, total = _content_range(response)
            if start != have:
                _remove(part)
                raise _IncompleteDownload(f"server resumed at byte {start}, not {have}")
            mode = "ab"
        else:  # a whole file: a fresh start, or a server that ignores Range
            have, mode = 0, "wb"
            length = response.headers.get("Content-Length")
            total = int(length) if length is not None else None
        watch.answered, watch.received, watch.total = True, have, total
        _receive(response, part, mode, have, total, limits, watch)
    with _on_disk("read", part):
        size = part.stat().st_size
    if total is not None and size != total:
        raise _IncompleteDownload(f"received {size:,} of {total:,} bytes")


def _is_permanent(exc: Exception) -> bool:
    """A client error such as 404: retrying the same URL will not help."""
    status = getattr(getattr(exc, "response", None), "status_code", None)
    return status is not None and 400 <= status < 500 and status not in (408, 429)


def _failed_check(check: Callable[[Path], None] | None, path: Path) -> str | None:
    """Why ``path`` fails ``check``; None when it passes (or there is no check)."""
    if check is None:
        return None
    try:
        with _on_disk("read", path):
            check(path)
    except FileCheckError as exc:
        return str(exc)
    return None


def _root_cause(exc: BaseException) -> BaseException:
    """The innermost error behind ``exc`` (requests wraps urllib3's, which wraps the socket's)."""
    seen = set()
    while id(exc) not in seen:
        seen.add(id(exc))
        inner = getattr(exc, "reason", None) or exc.__cause__ or exc.__context__
        if inner is None and exc.args and isinstance(exc.args[0], BaseException):
            inner = exc.args[0]
        if not isinstance(inner, BaseException):
            break
        exc = inner
    return exc


def short_cause(exc: BaseException, timeout) -> str:
    """What went wrong, in a few words (the full chain is for ``--verbose``)."""
    connect, silence = timeout if isinstance(timeout, tuple) else (timeout, timeout)
    if isinstance(exc, requests.ConnectTimeout):
        return f"timed out: no connection within {connect:g} s"
    if isinstance(exc, (requests.ReadTimeout, urllib3.exceptions.ReadTimeoutError)):
        return f"timed out: the server sent nothing for {silence:g} s"
    response = getattr(exc, "response", None)
    if response is not None and getattr(response, "status_code", None):
        return f"HTTP {response.status_code} {response.reason or ''}".strip()
    if isinstance(exc, (_IncompleteDownload, _TooSlow, FileCheckError)):
        return str(exc)
    root = _root_cause(exc)
    text = getattr(root, "strerror", None) or str(root) or type(root).__name__
    return text.split(": ", 1)[-1] if "Errno" in text else text


def _attempts(session, url, part, check, retries, backoff, timeout, limits):
    """Up to ``retries`` attempts at ``url``: None when ``part`` is complete and passes
    ``check``, else (what went wrong in a few words, the full error for --verbose). A file
    that fails its check or a too-slow transfer is not retried: the same server would most
    likely do the same again."""
    for attempt in range(1, retries + 1):
        try:
            _fetch(session, url, part, timeout, limits)
            reason = _failed_check(check, part)
        except _TooSlow as exc:
            return f"after {attempt} attempt(s): {exc}", repr(exc)
        except (
            requests.RequestException,
            urllib3.exceptions.HTTPError,
            _IncompleteDownload,
        ) as exc:
            if attempt == retries or _is_permanent(exc):
                return f"after {attempt} attempt(s): {short_cause(exc, timeout)}", _chain(exc)
            time.sleep(backoff * 2 ** (attempt - 1))
        else:
            if reason is None:
                return None
            _remove(part)
            text = f"the file it sent fails its check: {reason}"
            return f"after {attempt} attempt(s): {text}", text


def _chain(exc: BaseException) -> str:
    """Every error in ``exc``'s chain, one per line (what ``--verbose`` shows)."""
    lines, seen = [], set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        lines.append(f"{type(exc).__module__}.{type(exc).__name__}: {exc}")
        inner = getattr(exc, "reason", None) or exc.__cause__ or exc.__context__
        exc = inner if isinstance(inner, BaseException) else None
    return "\n".join(lines)


def download_file(
    url: str,
    destination: str | os.PathLike,
    backup_url: str | None = None,
    *,
    retries: int = 3,
    backoff: float = 1.0,
    timeout: float | tuple[float, float] | None = None,
    deadline: float | None = None,
    min_rate: float | None = None,
    progress: bool = True,
    hint: str = "",
    check: Callable[[Path], None] | None = None,
) -> Path:
    """Download ``url`` to ``destination`` unless it is already there; return its path.

    Data goes to ``destination.part`` first; it is renamed into place only when the byte
    count matches the server's and ``check(path)`` (if given) passes, i.e. raises no
    ``FileCheckError``. An interrupted ``.part`` is resumed with an HTTP Range request.
    ``timeout`` is (seconds to connect, seconds without a byte); ``deadline`` bounds each
    attempt in seconds (default: none); a transfer slower than ``min_rate`` bytes/s for
    ``SLOW_SECONDS`` gives up (see ``download_limits`` for the defaults and the environment
    variables that set them). Within ``NOTICE_SECONDS`` of silence the terminal says what is
    waited on. Each URL gets ``retries`` attempts, waiting ``backoff * 2**k`` seconds between
    them; then ``backup_url`` is tried. An existing ``destination`` is returned without any
    network access if it passes ``check``; otherwise it is deleted and downloaded again.
    Raises ``DownloadError``: one line for what failed (each URL, after how many attempts, the
    short cause) and one for what to do (plus ``hint``), the full errors in ``details``; or
    ``DiskError`` at once for a local problem (no space, no permission, wrong kind of path).
    """
    if retries < 1:
        raise ValueError(f"retries must be at least 1, got {retries}")
    timeout, deadline, min_rate = download_limits(timeout, deadline, min_rate)
    destination = Path(destination)
    part = destination.with_name(destination.name + ".part")
    _check_paths(destination, part)
    if destination.exists():
        reason = _failed_check(check, destination)
        if reason is None:
            return destination
        print(f"{destination} fails its check ({reason}); downloading it again.", file=sys.stderr)
        _remove(destination)
    with _on_disk("create the folder", destination.parent):
        destination.parent.mkdir(parents=True, exist_ok=True)
    failures = []
    with requests.Session() as session:
        for source in [u for u in (url, backup_url) if u]:
            args = (check, retries, backoff, timeout, (deadline, min_rate, progress))
            failure = _attempts(session, source, part, *args)
            if failure is None:
                with _on_disk(f"move {part.name} to", destination):
                    os.replace(part, destination)  # atomic: never a half file in place
                return destination
            failures.append((source, *failure))
    raise _download_error(url, part, failures, hint)


def _download_error(url: str, part: Path, failures: list, hint: str) -> DownloadError:
    """What failed (each URL, after how many attempts, why) and what to do, in two lines."""
    name = url.rstrip("/").rsplit("/", 1)[-1]
    tried = "; nor from ".join(f"{source} {failure}" for source, failure, _ in failures)
    resume = f" The partial download {part} is kept and resumes." if part.exists() else ""
    error = DownloadError(
        f"could not download {name} from {tried}\n"
        f"Check your internet connection (or the server) and run again.{resume}"
        + (f" {hint}" if hint else "")
    )
    error.details = "\n".join(f"{source}:\n{details}" for source, _, details in failures)
    return error
