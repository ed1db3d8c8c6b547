"""Download OpenAI's GPT-2 checkpoints, check every file, and load them without TensorFlow.

``download_and_load_gpt2("124M", "gpt2")`` fetches the release files into
``gpt2/124M/`` and returns ``(settings, params)`` in the course's layout; the
checkpoint is read by ``tf_checkpoint.py`` (re-exported here: ``list_variables``,
``load_variable``, ``load_gpt2_params_from_tf_ckpt``). The release's
``model.ckpt.meta`` file (the TensorFlow graph) is not needed and not downloaded.

Each file is fetched by ``downloads.download_file`` (resumable, retried, bounded in time,
with a backup mirror; re-exported here with its errors) and lands in place only when it
passes ``check_gpt2_file``: JSON parses, the index is an index, the shard has the size the
index expects, the BPE files have their SHA-256. A folder that already holds the files is
used offline.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import re
from pathlib import Path

from runtime.downloads import (
    DOWNLOAD_TIMEOUT,
    DiskError,
    DownloadError,
    FileCheckError,
    download_file,
)
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
FILENAMES = (
    "checkpoint",
    "encoder.json",
    "hparams.json",
    "model.ckpt.index",
    "vocab.bpe",
    "model.ckpt.data-00000-of-00001",
)


# ---------------------------------------------------------------------------
# Checking what was downloaded
# ---------------------------------------------------------------------------

# The SHA-256 digests tiktoken checks for GPT-2's BPE files (tiktoken_ext/openai_public.py)
GPT2_BPE_SHA256 = {
    "vocab.bpe": "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5",
    "encoder.json": "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783",
}
HPARAMS_KEYS = ("n_vocab", "n_ctx", "n_embd", "n_head", "n_layer")


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
