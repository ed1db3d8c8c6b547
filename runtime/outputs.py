"""Writing results so that a crash or Ctrl-C never leaves a half-written file in place, and
reading them back only once they are checked.

Every output goes to a temporary file in the same folder first and is then renamed over the
target, which the operating system does in one step. JSON is written strictly: a NaN or
infinite number becomes ``null``, so any JSON parser reads the file.

A file that the project reads back later (a checkpoint, a model, an adapter, a run's
settings, its responses and scores) gets a checksum beside it: ``NAME.sha256``, in the format
of ``sha256sum`` (so ``sha256sum -c NAME.sha256`` checks it too). ``verify_file`` and
``read_json`` refuse a file whose bytes changed since it was written, with one line that
names it and says what to do. While a file is being replaced, its checksum file lists the
new and the old checksum, so that a crash between the two renames leaves a file that checks.
A file without a checksum file (copied elsewhere, or made by hand) is read unchecked.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import math
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from runtime.errors import FileCheckError, OutputError  # noqa: F401 (re-exported)

CHECKSUM_SUFFIX = ".sha256"
_NO_SPACE = (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC))
_LOW_SPACE = 64 * 2**20  # bytes free below which a failed write is put down to a full disk


def _umask() -> int:
    """The process's umask (reading it means setting it; it is put straight back)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _write_failed(path: Path, exc: BaseException) -> OutputError | None:
    """The one-line error for a write of ``path`` that failed with ``exc`` (None: not a
    disk problem, so the error stays as it is)."""
    try:
        free = shutil.disk_usage(path.parent if path.parent.exists() else ".").free
    except OSError:
        free = None
    code, text = getattr(exc, "errno", None), str(exc).lower()
    # (torch.save and safetensors report a full disk as their own errors, without errno)
    io_error = isinstance(exc, RuntimeError) or "i/o error" in text or "iostream" in text
    said = "no space left" in text or "os error 28" in text
    if code in _NO_SPACE or said or (io_error and free is not None and free < _LOW_SPACE):
        left = "" if free is None else f" ({free / 2**20:.1f} MiB free)"
        return OutputError(
            f"could not write {path}: no space left on the device{left}; free some space "
            "or choose another folder (the files already saved are kept)"
        )
    if code in (errno.EROFS, errno.EACCES, errno.EPERM):
        reason = "a read-only file system" if code == errno.EROFS else "permission denied"
        return OutputError(f"could not write {path}: {reason}; choose a folder you can write in")
    if isinstance(exc, OSError) and code is not None:
        return OutputError(f"could not write {path}: {exc.strerror or exc}")
    return None


def checksum_path(path: str | os.PathLike) -> Path:
    """Where the checksum of ``path`` is kept: ``NAME.sha256`` beside it."""
    path = Path(path)
    return path.with_name(path.name + CHECKSUM_SUFFIX)


def sha256_of(path: str | os.PathLike) -> str:
    """The SHA-256 of a file's bytes, in hex."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(2**20):
            digest.update(chunk)
    return digest.hexdigest()


def recorded_checksums(path: str | os.PathLike) -> list[str] | None:
    """The checksums recorded for ``path`` (None: it has no checksum file)."""
    record = checksum_path(path)
    if not record.exists():
        return None
    try:
        lines = record.read_text(encoding="ascii").splitlines()
    except (OSError, ValueError) as exc:
        raise FileCheckError(
            f"{record} is unreadable ({exc}); delete it to use {Path(path).name} unchecked"
        ) from None
    digests = [line.split()[0].lower() for line in lines if line.strip()]
    if not digests or not all(re.fullmatch(r"[0-9a-f]{64}", d) for d in digests):
        raise FileCheckError(
            f"{record} is no checksum file (sha256sum format); delete it to use "
            f"{Path(path).name} unchecked"
        )
    return digests


def _record(path: Path, digests: list[str]) -> None:
    text = "".join(f"{d}  {path.name}\n" for d in digests)
    write_atomically(checksum_path(path), lambda tmp: tmp.write_text(text, encoding="ascii"))


def _install(tmp: Path, path: Path, checksum: bool | None) -> None:
    """Rename ``tmp`` to ``path``, keeping its checksum file (if wanted) in step."""
    if checksum is None:
        checksum = checksum_path(path).exists()
    if not checksum:
        os.replace(tmp, path)
        checksum_path(path).unlink(missing_ok=True)
        return
    digest = sha256_of(tmp)  # (read back: this also checks what reached the disk)
    try:
        old = (recorded_checksums(path) or [])[:1] if path.exists() else []
    except FileCheckError:
        old = []
    _record(path, [digest, *old])  # a crash before the rename leaves the old file, listed
    os.replace(tmp, path)
    _record(path, [digest])


@contextlib.contextmanager
def _temporary_file(folder: Path, target: Path) -> Iterator[Path]:
    """A new empty file in ``folder`` (made if missing), named after ``target`` as
    ``remove_stale_temp_files`` knows it, for the block to fill and rename to ``target``.
    If the block fails, the file is deleted and a disk problem becomes ``OutputError``."""
    tmp = None
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(dir=folder, prefix=f".{target.name}.", suffix=".tmp")
        os.close(fd)
        tmp = Path(name)
        yield tmp
    except BaseException as exc:
        error = _write_failed(target, exc) if isinstance(exc, Exception) else None
        if tmp is not None:
            tmp.unlink(missing_ok=True)
        if error is not None:
            raise error from exc
        raise


def write_atomically(
    path: str | os.PathLike, write: Callable[[Path], Any], *, checksum: bool | None = None
) -> Path:
    """Call ``write(tmp)`` to fill a temporary file, then rename it to ``path``.

    ``checksum``: True records the file's SHA-256 beside it (``checksum_path``), False
    removes such a record, None (the default) keeps one up to date if the file has one. A
    full disk or a folder that cannot be written raises ``OutputError`` with one line.
    """
    path = Path(path)
    with _temporary_file(path.parent, path) as tmp:
        write(tmp)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes the file private; ours are ordinary
        _install(tmp, path, checksum)
    return path


def verify_file(path: str | os.PathLike, advice: str) -> None:
    """Refuse ``path`` if its bytes differ from the checksum recorded when it was written
    (``FileCheckError``: the file, what is wrong, and ``advice``, what to do)."""
    path = Path(path)
    digests = recorded_checksums(path)
    if digests is None:
        return
    try:
        digest = sha256_of(path)
    except OSError as exc:
        raise FileCheckError(f"{path} cannot be read ({exc.strerror or exc}); {advice}") from None
    if digest not in digests:
        raise FileCheckError(
            f"{path} is damaged: its SHA-256 differs from the one recorded in "
            f"{checksum_path(path).name} when it was saved; {advice}"
        )


def load_failure(exc: BaseException) -> str:
    """A short reason for a failed ``torch.load``: PyTorch's own message for a file that is
    no PyTorch file (or holds content that is not safe to load) is a paragraph that
    suggests ``weights_only=False``, which must not be followed for a damaged file."""
    text = str(exc)
    if "WeightsUnpickler error:" in text:
        detail = text.split("WeightsUnpickler error:", 1)[1].strip().splitlines()[0].strip()
        return f"no PyTorch data, or data that is not safe to load: {detail}"[:200]
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return f"{type(exc).__name__}: {lines[0][:200]}" if lines else type(exc).__name__


def read_json(path: str | os.PathLike, advice: str) -> Any:
    """The JSON value in ``path``, after ``verify_file``; a file that is no JSON (or nested
    too deeply to read) raises ``FileCheckError`` naming it, with ``advice``."""
    path = Path(path)
    verify_file(path, advice)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else exc
        if isinstance(exc, RecursionError):
            reason = "nested too deeply"
        raise FileCheckError(f"{path} is not readable JSON ({reason}); {advice}") from None


def keep_previous(path: str | os.PathLike, previous: str | os.PathLike) -> Path | None:
    """Make ``previous`` a copy of ``path`` (a hard link where possible), with its checksum
    record; None when there is no ``path`` to keep."""
    path, previous = Path(path), Path(previous)
    if not path.is_file():
        return None

    def link(tmp: Path) -> None:
        tmp.unlink()
        try:
            os.link(path, tmp)
        except OSError:  # no hard links on this file system
            shutil.copyfile(path, tmp)

    digests = recorded_checksums(path)
    if digests is not None:  # (during the rename the earlier previous file checks too)
        try:
            earlier = recorded_checksums(previous) or [] if previous.is_file() else []
        except FileCheckError:
            earlier = []
        _record(previous, [*digests, *earlier])
    with _temporary_file(path.parent, previous) as tmp:
        link(tmp)
        os.replace(tmp, previous)
    if digests is None:
        checksum_path(previous).unlink(missing_ok=True)
    else:
        _record(previous, digests)
    return previous


_TEMP_NAME = re.compile(r"^\.(?P<name>.+)\.[^.]+\.(?P<kind>tmp|old)$")


def remove_stale_temp_files(folder: str | os.PathLike) -> list[Path]:
    """Delete the hidden temporary files and folders (``.NAME.XXXX.tmp``) that a process
    killed while saving left in ``folder``; returns them. A folder that was moved aside to
    be replaced (``.NAME.XXXX.old``) is put back when nothing replaced it, else deleted.
    Call it only while no other process writes there (under the run's lock)."""
    removed = []
    for item in sorted(Path(folder).iterdir()) if Path(folder).is_dir() else []:
        match = _TEMP_NAME.match(item.name)
        if match is None:
            continue
        target = item.with_name(match["name"])
        if match["kind"] == "old" and not (target.exists() or target.is_symlink()):
            os.replace(item, target)  # (the earlier version: nothing saved is lost)
        elif item.is_dir() and not item.is_symlink():
            shutil.rmtree(item, ignore_errors=True)
        else:
            item.unlink(missing_ok=True)
        removed.append(item)
    return removed


def write_folder_atomically(
    path: str | os.PathLike, fill: Callable[[Path], Any], *, overwrite: bool = False
) -> Path:
    """Call ``fill(tmp)`` to fill a temporary folder, then rename it to ``path``.

    The folder appears complete or not at all. An existing ``path`` raises FileExistsError,
    unless ``overwrite``: then it is moved aside, replaced, and deleted.
    """
    path = Path(path)
    if (path.exists() or path.is_symlink()) and not overwrite:
        raise FileExistsError(f"{path} already exists")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp"))
    except OSError as exc:
        raise (_write_failed(path, exc) or exc) from exc
    old = tmp.with_name(tmp.name.removesuffix(".tmp") + ".old")
    try:
        fill(tmp)
        os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes the folder private; ours are ordinary
        for file in tmp.rglob("*"):  # (and so are the files, whatever wrote them)
            if file.is_file():
                os.chmod(file, 0o666 & ~_umask())
        if path.exists() or path.is_symlink():
            os.replace(path, old)
        os.replace(tmp, path)
    except BaseException as exc:
        error = _write_failed(path, exc) if isinstance(exc, Exception) else None
        shutil.rmtree(tmp, ignore_errors=True)
        if (old.exists() or old.is_symlink()) and not path.exists():
            os.replace(old, path)  # put the earlier folder back
        if error is not None:
            raise error from exc
        raise
    if old.is_dir() and not old.is_symlink():
        shutil.rmtree(old)
    elif old.exists() or old.is_symlink():
        old.unlink()
    return path


def finite_or_none(value: Any) -> Any:
    """``value`` with every NaN or infinite float (at any depth) replaced by None."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: finite_or_none(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite_or_none(v) for v in value]
    return value


def save_json(data: Any, path: str | os.PathLike, *, checksum: bool | None = None) -> Path:
    """Write ``data`` as strict JSON with indent=4 (the course's format), atomically
    (``checksum``: see ``write_atomically``)."""
    text = json.dumps(finite_or_none(data), indent=4, allow_nan=False, ensure_ascii=False)
    return write_atomically(
        path, lambda tmp: tmp.write_text(text + "\n", encoding="utf-8"), checksum=checksum
    )


def save_figure(fig, path: str | os.PathLike) -> Path:
    """Save a matplotlib figure (format from the file name), atomically."""
    fmt = Path(path).suffix.lstrip(".") or "png"
    return write_atomically(path, lambda tmp: fig.savefig(tmp, format=fmt))


def save_model(model, path: str | os.PathLike) -> Path:
    """Save the model's state dict, atomically; ``torch.load(path, weights_only=True)`` reads it."""
    import torch

    return write_atomically(path, lambda tmp: torch.save(model.state_dict(), tmp), checksum=True)
