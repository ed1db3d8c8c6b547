"""Download OpenAI's GPT-2 checkpoints and read them without TensorFlow.

``download_and_load_gpt2("124M", "gpt2")`` fetches the release files into
``gpt2/124M/`` and returns ``(settings, params)`` in the course's layout.

The TensorFlow checkpoint is a *tensor bundle*:

* ``model.ckpt.index`` is an SSTable (LevelDB's table format) mapping each
  tensor name to a ``BundleEntryProto`` protobuf record: dtype, shape, shard,
  byte offset, byte size and a masked CRC32C of the tensor's bytes. The empty
  key holds the ``BundleHeaderProto`` (number of shards, byte order).
* ``model.ckpt.data-00000-of-00001`` holds the raw little-endian tensor bytes.

Both are parsed here with a few dozen lines of Python and numpy, and every
tensor's checksum is verified before its data is returned. The release's
``model.ckpt.meta`` file (the TensorFlow graph) is not needed for that and is
not downloaded.

Downloads are resumable (HTTP Range), retried with backoff, fall back to a
backup mirror, and land in place only when complete (``file.part`` is renamed
atomically), so a folder that already holds the files is used offline.
"""

from __future__ import annotations

import difflib
import json
import os
import re
import struct
import time
from dataclasses import dataclass
from pathlib import Path

import google_crc32c  # C speed (GB/s): verifying the 1.4 GB shard of GPT-2 medium takes a second
import numpy as np
import requests
from tqdm import tqdm

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


def _redownload(path: Path) -> str:
    return f"Delete {path} and run again to download it anew."


class DownloadError(RuntimeError):
    """A file could not be downloaded from any of its URLs."""


class CheckpointError(RuntimeError):
    """A checkpoint file is missing, truncated, corrupt or of an unsupported kind."""


# ---------------------------------------------------------------------------
# CRC32C (Castagnoli), as TensorFlow and LevelDB use it
# ---------------------------------------------------------------------------


def crc32c(data: bytes, crc: int = 0) -> int:
    """CRC32C of ``data``, continuing a running ``crc`` (0 to start)."""
    return google_crc32c.extend(crc, bytes(data))


def mask_crc(crc: int) -> int:
    """TensorFlow's and LevelDB's stored form of a CRC: rotate right 15, add a constant."""
    return ((((crc >> 15) | (crc << 17)) & 0xFFFFFFFF) + 0xA282EAD8) & 0xFFFFFFFF


# ---------------------------------------------------------------------------
# Protobuf wire format (just what the bundle records need)
# ---------------------------------------------------------------------------


def _read_varint(buf: bytes, pos: int) -> tuple[int, int]:
    """Decode a base-128 varint at ``pos``; return (value, position after it)."""
    value = shift = 0
    while True:
        if pos >= len(buf) or shift >= 70:
            raise ValueError("malformed varint")
        byte = buf[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, pos
        shift += 7


def _parse_message(buf: bytes) -> dict[int, list]:
    """Split a protobuf message into {field number: [values]}.

    Varint and fixed-width fields give ints, length-delimited fields give bytes
    (a nested message is parsed by calling this again).
    """
    fields: dict[int, list] = {}
    pos = 0
    while pos < len(buf):
        key, pos = _read_varint(buf, pos)
        number, wire_type = key >> 3, key & 7
        if wire_type == 0:
            value, pos = _read_varint(buf, pos)
        elif wire_type == 1:
            value, pos = int.from_bytes(buf[pos : pos + 8], "little"), pos + 8
        elif wire_type == 2:
            length, pos = _read_varint(buf, pos)
            value, pos = bytes(buf[pos : pos + length]), pos + length
        elif wire_type == 5:
            value, pos = int.from_bytes(buf[pos : pos + 4], "little"), pos + 4
        else:
            raise ValueError(f"unsupported protobuf wire type {wire_type}")
        if pos > len(buf):
            raise ValueError("protobuf message is cut short")
        fields.setdefault(number, []).append(value)
    return fields


def _last(fields: dict[int, list], number: int, default=0):
    """A singular field's value (protobuf keeps the last one seen)."""
    return fields[number][-1] if number in fields else default


def _int64(value: int) -> int:
    """Reinterpret a decoded varint as a signed 64-bit integer."""
    return value - (1 << 64) if value >= 1 << 63 else value


# ---------------------------------------------------------------------------
# SSTable: the .index file
# ---------------------------------------------------------------------------

_TABLE_MAGIC = 0xDB4775248B80FB57
_FOOTER_LEN = 48  # two block handles padded to 40 bytes, then the 8-byte magic


def _read_block(table: bytes, handle: bytes, path: Path) -> list[tuple[bytes, bytes]]:
    """Read one block given its encoded handle (offset, size); return its entries.

    A block is its entries, then uint32 restart offsets and their count, then a
    5-byte trailer: the compression type and the masked CRC32C of block + type.
    Keys are prefix-compressed: each entry stores how many bytes it shares with
    the previous key, then the rest of the key and the value.
    """
    offset, pos = _read_varint(handle, 0)
    size, _ = _read_varint(handle, pos)
    block = table[offset : offset + size]
    trailer = table[offset + size : offset + size + 5]
    if len(block) != size or len(trailer) != 5:
        raise CheckpointError(
            f"{path} is truncated (a block lies past its end). {_redownload(path)}"
        )
    stored_crc = struct.unpack("<I", trailer[1:])[0]
    if mask_crc(crc32c(block + trailer[:1])) != stored_crc:
        raise CheckpointError(f"{path} is corrupt (block at byte {offset}). {_redownload(path)}")
    if trailer[0] != 0:
        raise CheckpointError(
            f"{path} uses block compression type {trailer[0]}; only uncompressed "
            "tables (what TensorFlow writes for checkpoints) are supported."
        )

    n_restarts = struct.unpack("<I", block[-4:])[0]
    end = len(block) - 4 * (n_restarts + 1)
    entries, key, pos = [], b"", 0
    while pos < end:
        shared, pos = _read_varint(block, pos)
        non_shared, pos = _read_varint(block, pos)
        value_len, pos = _read_varint(block, pos)
        key = key[:shared] + block[pos : pos + non_shared]
        pos += non_shared
        entries.append((key, block[pos : pos + value_len]))
        pos += value_len
    return entries


def read_sstable(path: str | os.PathLike) -> dict[bytes, bytes]:
    """All key/value pairs of a (small, uncompressed) LevelDB-format table file."""
    path = Path(path)
    table = path.read_bytes()
    footer = table[-_FOOTER_LEN:]
    if len(table) < _FOOTER_LEN or struct.unpack("<Q", footer[-8:])[0] != _TABLE_MAGIC:
        raise CheckpointError(
            f"{path} is not a TensorFlow checkpoint index (it is too short or lacks the "
            f"table's magic number). {_redownload(path)}"
        )
    _, pos = _read_varint(footer, 0)  # skip the metaindex handle ...
    _, pos = _read_varint(footer, pos)
    index_start = pos  # ... the index block handle follows it
    _, pos = _read_varint(footer, pos)
    _, pos = _read_varint(footer, pos)
    index = _read_block(table, footer[index_start:pos], path)
    # Each index entry points at one data block of key/value pairs.
    return {key: value for _, handle in index for key, value in _read_block(table, handle, path)}


# ---------------------------------------------------------------------------
# Tensor bundle: names, shapes and data
# ---------------------------------------------------------------------------

# TensorFlow's DataType enum -> numpy dtype (the plain numeric types)
_DTYPES = {
    1: np.float32,
    2: np.float64,
    3: np.int32,
    4: np.uint8,
    5: np.int16,
    6: np.int8,
    8: np.complex64,
    9: np.int64,
    10: np.bool_,
    17: np.uint16,
    18: np.complex128,
    19: np.float16,
    22: np.uint32,
    23: np.uint64,
}


@dataclass(frozen=True)
class TensorEntry:
    """Where one tensor lives: a decoded BundleEntryProto."""

    name: str
    dtype: int  # TensorFlow DataType enum value
    shape: tuple[int, ...]
    shard_id: int
    offset: int
    size: int
    masked_crc32c: int
    sliced: bool  # stored in slices (a partitioned variable)


def _parse_entry(name: str, record: bytes) -> TensorEntry:
    fields = _parse_message(record)
    shape = _parse_message(_last(fields, 2, b""))  # TensorShapeProto
    dims = tuple(_int64(_last(_parse_message(dim), 1)) for dim in shape.get(2, []))
    return TensorEntry(
        name=name,
        dtype=_last(fields, 1),
        shape=dims,
        shard_id=_last(fields, 3),
        offset=_last(fields, 4),
        size=_last(fields, 5),
        masked_crc32c=_last(fields, 6),
        sliced=7 in fields,
    )


class CheckpointReader:
    """Reads a TensorFlow V2 checkpoint (tensor bundle) given its prefix.

    ``CheckpointReader("gpt2/124M/model.ckpt")`` reads ``model.ckpt.index`` once;
    ``read(name)`` then fetches and verifies one tensor from its data shard.
    """

    _CHUNK = 64 << 20  # bytes read (and checksummed) at a time

    def __init__(self, ckpt_path: str | os.PathLike):
        self.prefix = str(ckpt_path)
        self.index_path = Path(self.prefix + ".index")
        if not self.index_path.is_file():
            raise CheckpointError(
                f"checkpoint index {self.index_path} not found: pass the checkpoint prefix "
                "(e.g. gpt2/124M/model.ckpt) of a complete download."
            )
        try:
            table = read_sstable(self.index_path)
            header = _parse_message(table.pop(b"", b""))  # BundleHeaderProto
            self.num_shards = _last(header, 1, 1)
            self.big_endian = _last(header, 2) == 1
            self.entries = {
                key.decode(): _parse_entry(key.decode(), value) for key, value in table.items()
            }
        except (ValueError, IndexError, struct.error) as exc:
            raise CheckpointError(
                f"{self.index_path} is corrupt ({exc}). {_redownload(self.index_path)}"
            ) from exc

    def shard_path(self, shard_id: int) -> Path:
        return Path(f"{self.prefix}.data-{shard_id:05d}-of-{self.num_shards:05d}")

    def variables(self) -> list[tuple[str, list[int]]]:
        return [(name, list(self.entries[name].shape)) for name in sorted(self.entries)]

    def entry(self, name: str) -> TensorEntry:
        if name not in self.entries:
            close = difflib.get_close_matches(name, list(self.entries), n=5, cutoff=0.6)
            hint = f"; close names: {', '.join(close)}" if close else ""
            raise KeyError(f"tensor {name!r} is not in checkpoint {self.prefix}{hint}")
        return self.entries[name]

    def read(self, name: str) -> np.ndarray:
        """The tensor's data, after checking its size and CRC32C."""
        entry = self.entry(name)
        if entry.sliced:
            raise CheckpointError(
                f"tensor {name!r} in {self.prefix} is stored in slices (a partitioned "
                "variable), which this reader does not support."
            )
        if entry.dtype not in _DTYPES:
            raise CheckpointError(
                f"tensor {name!r} in {self.prefix} has TensorFlow dtype {entry.dtype}; "
                "only plain numeric types are supported."
            )
        dtype = np.dtype(_DTYPES[entry.dtype]).newbyteorder(">" if self.big_endian else "<")
        expected = dtype.itemsize * int(np.prod(entry.shape, dtype=np.int64))
        path = self.shard_path(entry.shard_id)
        if entry.size != expected:
            raise CheckpointError(
                f"{self.index_path}: tensor {name!r} is listed with {entry.size} bytes but its "
                f"shape {list(entry.shape)} needs {expected}. {_redownload(self.index_path)}"
            )
        if not path.is_file():
            raise CheckpointError(
                f"checkpoint data file {path} (holding tensor {name!r}) is missing: "
                "download the model again."
            )
        if entry.offset + entry.size > path.stat().st_size:
            raise CheckpointError(
                f"{path} is truncated: tensor {name!r} needs bytes {entry.offset} to "
                f"{entry.offset + entry.size} but the file has only {path.stat().st_size} "
                f"bytes (an interrupted download?). {_redownload(path)}"
            )

        data = np.empty(entry.size, dtype=np.uint8)
        crc = 0
        with open(path, "rb") as f:
            f.seek(entry.offset)
            for start in range(0, entry.size, self._CHUNK):
                chunk = f.read(min(self._CHUNK, entry.size - start))
                crc = crc32c(chunk, crc)
                data[start : start + len(chunk)] = np.frombuffer(chunk, dtype=np.uint8)
        if mask_crc(crc) != entry.masked_crc32c:
            raise CheckpointError(
                f"{path} is corrupt: tensor {name!r} fails its CRC32C check (stored "
                f"{entry.masked_crc32c:#010x}, computed {mask_crc(crc):#010x}). {_redownload(path)}"
            )
        return data.view(dtype).reshape(entry.shape).astype(dtype.newbyteorder("="), copy=False)


def list_variables(ckpt_path: str | os.PathLike) -> list[tuple[str, list[int]]]:
    """(name, shape) of every tensor in the checkpoint, sorted by name (like TF's)."""
    return CheckpointReader(ckpt_path).variables()


def load_variable(ckpt_path: str | os.PathLike, name: str) -> np.ndarray:
    """One tensor of the checkpoint as a numpy array (like ``tf.train.load_variable``)."""
    return CheckpointReader(ckpt_path).read(name)


def latest_checkpoint(model_dir: str | os.PathLike) -> str:
    """The checkpoint prefix named in ``model_dir/checkpoint`` (like TF's)."""
    state_file = Path(model_dir) / "checkpoint"
    match = re.search(r'model_checkpoint_path:\s*"([^"]+)"', state_file.read_text())
    if match is None:
        raise CheckpointError(
            f"{state_file} names no model_checkpoint_path. {_redownload(state_file)}"
        )
    # The files sit together in model_dir, wherever the checkpoint was written.
    return str(Path(model_dir) / Path(match[1]).name)


# ---------------------------------------------------------------------------
# GPT-2 parameters in the course's layout
# ---------------------------------------------------------------------------


def load_gpt2_params_from_tf_ckpt(ckpt_path: str | os.PathLike, settings: dict) -> dict:
    """GPT-2's weights as the course's nested dict of numpy arrays.

    ``params["wte"]``, ``params["wpe"]``, ``params["g"]``/``["b"]`` (final layer
    norm) and ``params["blocks"][i]`` with ``attn.c_attn``, ``attn.c_proj``,
    ``mlp.c_fc``, ``mlp.c_proj`` (``w``/``b``) and ``ln_1``/``ln_2`` (``g``/``b``).
    Arrays are squeezed, so conv1d weights ``[1, in, out]`` become ``[in, out]``.
    """
    reader = CheckpointReader(ckpt_path)
    n_layer = settings["n_layer"]
    layers = {int(m[1]) for name in reader.entries if (m := re.match(r"model/h(\d+)/", name))}
    if layers != set(range(n_layer)):
        raise CheckpointError(
            f"checkpoint {reader.prefix} has {len(layers)} layers but hparams.json says "
            f"n_layer={n_layer}: the files belong to different models. Delete the folder "
            "and download it again."
        )

    def read(name: str) -> np.ndarray:
        return np.squeeze(reader.read(name))

    def weight_and_bias(prefix: str) -> dict:
        return {"w": read(f"{prefix}/w"), "b": read(f"{prefix}/b")}

    def layer_norm(prefix: str) -> dict:
        return {"g": read(f"{prefix}/g"), "b": read(f"{prefix}/b")}

    blocks = [
        {
            "attn": {
                "c_attn": weight_and_bias(f"model/h{i}/attn/c_attn"),
                "c_proj": weight_and_bias(f"model/h{i}/attn/c_proj"),
            },
            "mlp": {
                "c_fc": weight_and_bias(f"model/h{i}/mlp/c_fc"),
                "c_proj": weight_and_bias(f"model/h{i}/mlp/c_proj"),
            },
            "ln_1": layer_norm(f"model/h{i}/ln_1"),
            "ln_2": layer_norm(f"model/h{i}/ln_2"),
        }
        for i in range(n_layer)
    ]
    params = {"wte": read("model/wte"), "wpe": read("model/wpe"), "blocks": blocks}
    params |= layer_norm("model/ln_f")  # the final layer norm is params["g"], params["b"]

    expected = (settings["n_vocab"], settings["n_embd"]), (settings["n_ctx"], settings["n_embd"])
    if (params["wte"].shape, params["wpe"].shape) != expected:
        raise CheckpointError(
            f"checkpoint {reader.prefix} has wte {params['wte'].shape} and wpe "
            f"{params['wpe'].shape}, but hparams.json implies {expected[0]} and {expected[1]}."
        )
    return params


# ---------------------------------------------------------------------------
# Downloading
# ---------------------------------------------------------------------------


class _IncompleteDownload(Exception):
    """The server ended the transfer early or sent something unusable."""


def _content_range(response: requests.Response) -> tuple[int, int | None]:
    """(first byte, total size or None) from a 206 response's Content-Range."""
    match = re.fullmatch(r"bytes (\d+)-\d+/(\d+|\*)", response.headers.get("Content-Range", ""))
    if match is None:
        raise _IncompleteDownload("206 response without a usable Content-Range header")
    return int(match[1]), None if match[2] == "*" else int(match[2])


def _fetch(session: requests.Session, url: str, part: Path, timeout, progress: bool):
    """One attempt: append the rest of ``url`` to ``part`` (or start it over)."""
    have = part.stat().st_size if part.exists() else 0
    headers = {"Accept-Encoding": "identity"}  # byte counts must match the file's
    if have:
        headers["Range"] = f"bytes={have}-"
    with session.get(url, headers=headers, stream=True, timeout=timeout) as response:
        if response.status_code == 416:  # our partial file does not fit this file
            part.unlink()
            raise _IncompleteDownload("server refused to resume; starting over")
        response.raise_for_status()
        if response.status_code == 206:
            start, total = _content_range(response)
            if start != have:
                part.unlink()
                raise _IncompleteDownload(f"server resumed at byte {start}, not {have}")
            mode = "ab"
        else:  # a whole file: a fresh start, or a server that ignores Range
            have, mode = 0, "wb"
            length = response.headers.get("Content-Length")
            total = int(length) if length is not None else None
        bar = tqdm(
            total=total,
            initial=have,
            unit="B",
            unit_scale=True,
            desc=part.stem,
            disable=not progress,
        )
        with open(part, mode) as f, bar:
            # small chunks: a dropped connection loses at most one unwritten chunk
            for chunk in response.iter_content(chunk_size=1 << 16):
                f.write(chunk)
                bar.update(len(chunk))
    size = part.stat().st_size
    if total is not None and size != total:
        raise _IncompleteDownload(f"received {size} of {total} bytes")


def _is_permanent(exc: Exception) -> bool:
    """A client error such as 404: retrying the same URL will not help."""
    status = getattr(getattr(exc, "response", None), "status_code", None)
    return status is not None and 400 <= status < 500 and status not in (408, 429)


def download_file(
    url: str,
    destination: str | os.PathLike,
    backup_url: str | None = None,
    *,
    retries: int = 3,
    backoff: float = 1.0,
    timeout: float | tuple[float, float] = DOWNLOAD_TIMEOUT,
    progress: bool = True,
    hint: str = "",
) -> Path:
    """Download ``url`` to ``destination`` unless it is already there; return its path.

    Data goes to ``destination.part`` first and is renamed into place only when
    the byte count matches the server's; an interrupted ``.part`` is resumed with
    an HTTP Range request. Each URL gets ``retries`` attempts, waiting
    ``backoff * 2**k`` seconds between them; then ``backup_url`` is tried (it
    resumes the same ``.part``; the checkpoint's per-tensor CRC32C would catch a
    mirror serving different bytes). An existing ``destination`` is returned
    without any network access.
    Raises ``DownloadError`` naming the file, the URLs and what to do (plus ``hint``).
    """
    destination = Path(destination)
    if destination.exists():
        return destination
    destination.parent.mkdir(parents=True, exist_ok=True)
    part = destination.with_name(destination.name + ".part")
    failures = []
    with requests.Session() as session:
        for source in [u for u in (url, backup_url) if u]:
            for attempt in range(retries):
                try:
                    _fetch(session, source, part, timeout, progress)
                except (requests.RequestException, OSError, _IncompleteDownload) as exc:
                    error = f"{type(exc).__name__}: {exc}"
                    if attempt + 1 == retries or _is_permanent(exc):
                        failures.append(f"  {source}\n    {attempt + 1} attempt(s), last: {error}")
                        break
                    time.sleep(backoff * 2**attempt)
                else:
                    os.replace(part, destination)  # atomic: never a half file in place
                    return destination
    resume = f" The partial download {part} is kept and resumes." if part.exists() else ""
    raise DownloadError(
        f"could not download {destination.name} to {destination}. Tried:\n"
        + "\n".join(failures)
        + f"\nCheck your internet connection and run again.{resume}"
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
    file the first source cannot deliver. Files already present are not fetched
    again. ``download_kw`` goes to ``download_file`` (retries, backoff, timeout,
    progress). Returns ``(settings, params)``: hparams.json and the weights in
    the course's layout (see ``load_gpt2_params_from_tf_ckpt``).
    """
    if model_size not in ALLOWED_SIZES:
        raise ValueError(
            f"unknown GPT-2 model size {model_size!r}; choose one of {', '.join(ALLOWED_SIZES)}"
        )
    base = (base_url or os.environ.get("GPT2_BASE_URL") or OPENAI_BASE_URL).rstrip("/")
    model_dir = Path(models_dir) / model_size
    for filename in FILENAMES:
        backup = backup_base_url and f"{backup_base_url.rstrip('/')}/{model_size}/{filename}"
        destination = model_dir / filename
        hint = (
            "Or set the GPT2_BASE_URL environment variable to a mirror laid out as "
            f"{{base}}/{{model size}}/{{file}}, or place the file at {destination} by hand."
        )
        download_file(
            f"{base}/{model_size}/{filename}", destination, backup, hint=hint, **download_kw
        )

    hparams_path = model_dir / "hparams.json"
    try:
        settings = json.loads(hparams_path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise CheckpointError(
            f"{hparams_path} is not valid JSON ({exc}). {_redownload(hparams_path)}"
        ) from exc
    params = load_gpt2_params_from_tf_ckpt(latest_checkpoint(model_dir), settings)
    return settings, params
