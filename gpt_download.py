"""Download OpenAI's GPT-2 checkpoints, check every file, and load them without TensorFlow.

``download_and_load_gpt2("124M", "gpt2")`` fetches the release files into
``gpt2/124M/`` and returns ``(settings, params)`` in the course's layout; the
checkpoint is read by ``tf_checkpoint.py`` (re-exported here: ``list_variables``,
``load_variable``, ``load_gpt2_params_from_tf_ckpt``). The release's
``model.ckpt.meta`` file (the TensorFlow graph) is not needed and not downloaded.

Downloads are resumable (HTTP Range), retried with backoff, fall back to a backup
mirror, and land in place only when complete and checked for their kind
(``check_gpt2_file``: JSON parses, the index is an index, the shard has the size the
index expects, the BPE files have their SHA-256); ``file.part`` is then renamed
atomically, so a folder that already holds the files is used offline. A server that
goes silent fails after ``DOWNLOAD_TIMEOUT``; one that trickles fails at the attempt's
deadline. Local disk problems are ``DiskError``s, never retried as network failures.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
import re
import sys
import time
from collections.abc import Callable
from pathlib import Path

import requests
import urllib3

from progress_bars import progress_bar
from tf_checkpoint import (
    CHECKPOINT_PATH_PATTERN,
    CheckpointError,
    CheckpointReader,
    latest_checkpoint,
    list_variables,
    load_gpt2_params_from_tf_ckpt,
    load_variable,
    read_index,
)

# the public names; the checkpoint reader's are importable from here, as in the course
__all__ = [
    "ALLOWED_SIZES",
    "BACKUP_BASE_URL",
    "DOWNLOAD_TIMEOUT",
    "FILENAMES",
    "GPT2_BPE_SHA256",
    "HPARAMS_KEYS",
    "OPENAI_BASE_URL",
    "CheckpointError",
    "CheckpointReader",
    "DiskError",
    "DownloadError",
    "FileCheckError",
    "check_gpt2_file",
    "check_sha256",
    "download_and_load_gpt2",
    "download_file",
    "latest_checkpoint",
    "list_variables",
    "load_gpt2_params_from_tf_ckpt",
    "load_variable",
]

OPENAI_BASE_URL = "https://openaipublic.blob.core.windows.net/gpt-2/models"
BACKUP_BASE_URL = "https://f001.backblazeb2.com/file/LLMs-from-scratch/gpt2"
ALLOWED_SIZES = ("124M", "355M", "774M", "1558M")
DOWNLOAD_TIMEOUT = (5.0, 30.0)  # seconds to connect, seconds of silence while receiving
FILENAMES = (
    "checkpoint",
    "encoder.json",
    "hparams.json",
    "model.ckpt.index",
    "vocab.bpe",
    "model.ckpt.data-00000-of-00001",
)


class DownloadError(RuntimeError):
    """A file could not be downloaded from any of its URLs."""


# ---------------------------------------------------------------------------
# Checking what was downloaded
# ---------------------------------------------------------------------------

# The SHA-256 digests tiktoken checks for GPT-2's BPE files (tiktoken_ext/openai_public.py)
GPT2_BPE_SHA256 = {
    "vocab.bpe": "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5",
    "encoder.json": "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783",
}
HPARAMS_KEYS = ("n_vocab", "n_ctx", "n_embd", "n_head", "n_layer")


class FileCheckError(ValueError):
    """A downloaded file is not what it claims to be (raised by a download's ``check``)."""


def check_sha256(path: str | os.PathLike, expected: str, what: str) -> None:
    """Raise ``FileCheckError`` unless the file's SHA-256 is ``expected`` (``what`` names it)."""
    actual = hashlib.sha256(Path(path).read_bytes()).hexdigest()
    if actual != expected:
        raise FileCheckError(f"it is not {what}: SHA-256 {actual}, expected {expected}")


def _check_hparams(path: Path) -> None:
    try:
        settings = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as exc:  # not UTF-8, or not JSON
        raise FileCheckError(f"it is not JSON ({exc})") from None
    if not isinstance(settings, dict):
        raise FileCheckError(f"it holds a JSON {type(settings).__name__}, not an object")
    bad = [k for k in HPARAMS_KEYS if type(settings.get(k)) is not int or settings[k] <= 0]
    if bad:
        raise FileCheckError(f"it lacks positive integers for {', '.join(bad)}")


def _check_checkpoint_state(path: Path) -> None:
    text = path.read_text(encoding="utf-8", errors="replace")
    if CHECKPOINT_PATH_PATTERN.search(text) is None:
        raise FileCheckError("it names no model_checkpoint_path")


def _check_index(path: Path) -> None:
    try:
        read_index(path)
    except ValueError as exc:
        raise FileCheckError(f"it is not a TensorFlow checkpoint index: {exc}") from None


def _check_shard(path: Path, index_path: Path, shard_id: int) -> None:
    """A data shard must have the size that its index (downloaded before it) expects."""
    try:
        _, entries = read_index(index_path)
    except (OSError, ValueError):
        return  # no usable index beside it: nothing to compare with
    ends = [e.offset + e.size for e in entries.values() if e.shard_id == shard_id]
    expected, size = max(ends, default=0), path.stat().st_size
    if size != expected:
        raise FileCheckError(f"it has {size:,} bytes, but {index_path.name} expects {expected:,}")


def check_gpt2_file(path: str | os.PathLike, name: str) -> None:
    """Raise ``FileCheckError`` unless ``path`` holds what GPT-2's release file ``name`` should.

    hparams.json parses and gives the model's sizes; ``checkpoint`` names the checkpoint;
    encoder.json and vocab.bpe have tiktoken's SHA-256; the index parses; a data shard has
    the size that the index beside it expects (each tensor's CRC32C is checked when read).
    """
    path = Path(path)
    shard = re.fullmatch(r"(.+)\.data-(\d+)-of-\d+", name)
    if name in GPT2_BPE_SHA256:
        check_sha256(path, GPT2_BPE_SHA256[name], f"GPT-2's {name}")
    elif name == "hparams.json":
        _check_hparams(path)
    elif name == "checkpoint":
        _check_checkpoint_state(path)
    elif name.endswith(".index"):
        _check_index(path)
    elif shard is not None:
        _check_shard(path, path.parent / f"{shard[1]}.index", int(shard[2]))


# ---------------------------------------------------------------------------
# Downloading
# ---------------------------------------------------------------------------


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


def _deadline(deadline: float | None, size: int | None) -> float:
    """Seconds one attempt may take: ``deadline``, else 10 minutes plus 10 s per MB to
    receive (a 100 kB/s average), or an hour when the server announces no size."""
    if deadline is not None:
        return deadline
    return 3600.0 if size is None else 600.0 + size / 100_000


def _receive(response, part: Path, mode: str, have: int, total, deadline, progress) -> None:
    """Write the response's body to ``part``; give up when the deadline passes."""
    seconds = _deadline(deadline, None if total is None else total - have)
    give_up_at = time.monotonic() + seconds
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
            bar.update(len(chunk))
            if time.monotonic() > give_up_at:
                raise _TooSlow(
                    f"still receiving after its {seconds:g} s deadline "
                    f"({bar.n:,} of {total if total is not None else '?'} bytes)"
                )
    finally:
        bar.close()
        with _on_disk("write", part):
            file.close()


def _fetch(session: requests.Session, url: str, part: Path, timeout, deadline, progress) -> None:
    """One attempt: append the rest of ``url`` to ``part`` (or start it over)."""
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
        _receive(response, part, mode, have, total, deadline, progress)
    with _on_disk("read", part):
        size = part.stat().st_size
    if total is not None and size != total:
        raise _IncompleteDownload(f"received {size} of {total} bytes")


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


def _attempts(session, url, part, check, retries, backoff, timeout, deadline, progress):
    """Up to ``retries`` attempts at ``url``: None when ``part`` is complete and passes
    ``check``, else a line saying what went wrong. A file that fails its check or a missed
    deadline is not retried: the same server would most likely do the same again."""
    for attempt in range(1, retries + 1):
        try:
            _fetch(session, url, part, timeout, deadline, progress)
            reason = _failed_check(check, part)
        except _TooSlow as exc:
            return f"{attempt} attempt(s), last: {exc}"
        except (
            requests.RequestException,
            urllib3.exceptions.HTTPError,
            _IncompleteDownload,
        ) as exc:
            if attempt == retries or _is_permanent(exc):
                return f"{attempt} attempt(s), last: {type(exc).__name__}: {exc}"
            time.sleep(backoff * 2 ** (attempt - 1))
        else:
            if reason is None:
                return None
            _remove(part)
            return f"{attempt} attempt(s), last: the file it sent fails its check: {reason}"


def download_file(
    url: str,
    destination: str | os.PathLike,
    backup_url: str | None = None,
    *,
    retries: int = 3,
    backoff: float = 1.0,
    timeout: float | tuple[float, float] = DOWNLOAD_TIMEOUT,
    deadline: float | None = None,
    progress: bool = True,
    hint: str = "",
    check: Callable[[Path], None] | None = None,
) -> Path:
    """Download ``url`` to ``destination`` unless it is already there; return its path.

    Data goes to ``destination.part`` first; it is renamed into place only when the byte
    count matches the server's and ``check(path)`` (if given) passes, i.e. raises no
    ``FileCheckError``. An interrupted ``.part`` is resumed with an HTTP Range request.
    ``timeout`` is (seconds to connect, seconds without a byte); ``deadline`` bounds each
    attempt in seconds (default: 10 minutes plus 10 s per MB). Each URL gets ``retries``
    attempts, waiting ``backoff * 2**k`` seconds between them; then ``backup_url`` is tried.
    An existing ``destination`` is returned without any network access if it passes
    ``check``; otherwise it is deleted and downloaded again.
    Raises ``DownloadError`` naming the file, each URL and what went wrong (plus ``hint``),
    or ``DiskError`` at once for a local problem (no space, no permission, wrong kind of path).
    """
    if retries < 1:
        raise ValueError(f"retries must be at least 1, got {retries}")
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
            args = (check, retries, backoff, timeout, deadline, progress)
            failure = _attempts(session, source, part, *args)
            if failure is None:
                with _on_disk(f"move {part.name} to", destination):
                    os.replace(part, destination)  # atomic: never a half file in place
                return destination
            failures.append(f"  {source}\n    {failure}")
    resume = f" The partial download {part} is kept and resumes." if part.exists() else ""
    raise DownloadError(
        f"could not download {destination.name} to {destination}. Tried:\n"
        + "\n".join(failures)
        + f"\nCheck your internet connection (or the server) and run again.{resume}"
        + (f" {hint}" if hint else "")
    )


def download_and_load_gpt2(
    model_size: str,
    models_dir: str | os.PathLike,
    base_url: str | None = None,
    *,
    backup_base_url: str | None = BACKUP_BASE_URL,
    **download_kw,
) -> tuple[dict, dict]:
    """Download GPT-2 ``model_size`` into ``models_dir/model_size`` and load it.

    Files come from ``base_url``, else the ``GPT2_BASE_URL`` environment variable,
    else OpenAI's public bucket, laid out as ``{base}/{model_size}/{file}``;
    ``backup_base_url`` (the course's mirror; None disables it) is tried for any
    file the first source cannot deliver. Every file, downloaded or already present, must
    pass ``check_gpt2_file``; files present and passing are not fetched again.
    ``download_kw`` goes to ``download_file`` (retries, backoff, timeout, deadline,
    progress). Returns ``(settings, params)``: hparams.json and the weights in the
    course's layout (see ``load_gpt2_params_from_tf_ckpt``).
    """
    if model_size not in ALLOWED_SIZES:
        raise ValueError(
            f"unknown GPT-2 model size {model_size!r}; choose one of {', '.join(ALLOWED_SIZES)}"
        )
    base = (base_url or os.environ.get("GPT2_BASE_URL") or OPENAI_BASE_URL).rstrip("/")
    model_dir = Path(models_dir) / model_size
    for filename in FILENAMES:  # the index comes before the data shard it checks
        backup = backup_base_url and f"{backup_base_url.rstrip('/')}/{model_size}/{filename}"
        destination = model_dir / filename
        hint = (
            "Or set the GPT2_BASE_URL environment variable to a mirror laid out as "
            f"{{base}}/{{model size}}/{{file}}, or place the file at {destination} by hand."
        )
        check = functools.partial(check_gpt2_file, name=filename)
        download_file(
            f"{base}/{model_size}/{filename}",
            destination,
            backup,
            hint=hint,
            check=check,
            **download_kw,
        )

    settings = json.loads((model_dir / "hparams.json").read_text(encoding="utf-8"))
    params = load_gpt2_params_from_tf_ckpt(latest_checkpoint(model_dir), settings)
    return settings, params
