"""Writing results so that a crash or Ctrl-C never leaves a half-written file in place.

Every output goes to a temporary file in the same folder first and is then renamed over the
target, which the operating system does in one step. JSON is written strictly: a NaN or
infinite number becomes ``null``, so any JSON parser reads the file.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any


def _umask() -> int:
    """The process's umask (reading it means setting it; it is put straight back)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def write_atomically(path: str | os.PathLike, write: Callable[[Path], Any]) -> Path:
    """Call ``write(tmp)`` to fill a temporary file, then rename it to ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(Path(tmp))
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes the file private; ours are ordinary
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


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
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp"))
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
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if (old.exists() or old.is_symlink()) and not path.exists():
            os.replace(old, path)  # put the earlier folder back
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


def save_json(data: Any, path: str | os.PathLike) -> Path:
    """Write ``data`` as strict JSON with indent=4 (the course's format), atomically."""
    text = json.dumps(finite_or_none(data), indent=4, allow_nan=False, ensure_ascii=False)
    return write_atomically(path, lambda tmp: tmp.write_text(text + "\n", encoding="utf-8"))


def save_figure(fig, path: str | os.PathLike) -> Path:
    """Save a matplotlib figure (format from the file name), atomically."""
    fmt = Path(path).suffix.lstrip(".") or "png"
    return write_atomically(path, lambda tmp: fig.savefig(tmp, format=fmt))


def save_model(model, path: str | os.PathLike) -> Path:
    """Save the model's state dict, atomically; ``torch.load(path, weights_only=True)`` reads it."""
    import torch

    return write_atomically(path, lambda tmp: torch.save(model.state_dict(), tmp))
