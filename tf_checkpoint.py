"""Read TensorFlow checkpoints (OpenAI's GPT-2 release) without TensorFlow.

A TensorFlow V2 checkpoint is a *tensor bundle*:

* ``model.ckpt.index`` is an SSTable (LevelDB's table format) mapping each
  tensor name to a ``BundleEntryProto`` protobuf record: dtype, shape, shard,
  byte offset, byte size and a masked CRC32C of the tensor's bytes. The empty
  key holds the ``BundleHeaderProto`` (number of shards, byte order).
* ``model.ckpt.data-00000-of-00001`` holds the raw little-endian tensor bytes.

Both are parsed here with a few dozen lines of Python and numpy, and every
tensor's checksum is verified before its data is returned. The release's
``model.ckpt.meta`` file (the TensorFlow graph) is not needed for that.
``gpt_download.py`` downloads the files and re-exports the public names.
"""

from __future__ import annotations

import difflib
import os
import re
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np


def _redownload(path: Path) -> str:
    return f"Delete {path} and run again to download it anew."


class CheckpointError(RuntimeError):
    """A checkpoint file is missing, truncated, corrupt or of an unsupported kind."""


# ---------------------------------------------------------------------------
# CRC32C (Castagnoli), as TensorFlow and LevelDB use it
# ---------------------------------------------------------------------------


def crc32c(data: bytes, crc: int = 0) -> int:
    """CRC32C of ``data``, continuing a running ``crc`` (0 to start)."""
    # C speed (GB/s): verifying the 1.4 GB shard of GPT-2 medium takes a second. Imported
    # here, so that code which reads no checkpoint runs without it (a bare GPU machine).
    import google_crc32c

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


def _read_block(table: bytes, handle: bytes) -> list[tuple[bytes, bytes]]:
    """Read one block given its encoded handle (offset, size); return its entries.

    A block is its entries, then uint32 restart offsets and their count, then a
    5-byte trailer: the compression type and the masked CRC32C of block + type.
    Keys are prefix-compressed: each entry stores how many bytes it shares with
    the previous key, then the rest of the key and the value.
    Raises ``ValueError`` saying what is wrong.
    """
    offset, pos = _read_varint(handle, 0)
    size, _ = _read_varint(handle, pos)
    block = table[offset : offset + size]
    trailer = table[offset + size : offset + size + 5]
    if len(block) != size or len(trailer) != 5:
        raise ValueError("it is truncated (a block lies past its end)")
    stored_crc = struct.unpack("<I", trailer[1:])[0]
    if mask_crc(crc32c(block + trailer[:1])) != stored_crc:
        raise ValueError(f"corrupt block at byte {offset} (its CRC32C does not match)")
    if trailer[0] != 0:
        raise ValueError(
            f"it uses block compression type {trailer[0]}; only uncompressed tables "
            "(what TensorFlow writes for checkpoints) are supported"
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
    """All key/value pairs of a (small, uncompressed) LevelDB-format table file.

    Raises ``ValueError`` saying what is wrong when the file is not such a table.
    """
    table = Path(path).read_bytes()
    footer = table[-_FOOTER_LEN:]
    if len(table) < _FOOTER_LEN or struct.unpack("<Q", footer[-8:])[0] != _TABLE_MAGIC:
        raise ValueError("it is too short or lacks the table's magic number")
    _, pos = _read_varint(footer, 0)  # skip the metaindex handle ...
    _, pos = _read_varint(footer, pos)
    index_start = pos  # ... the index block handle follows it
    _, pos = _read_varint(footer, pos)
    _, pos = _read_varint(footer, pos)
    index = _read_block(table, footer[index_start:pos])
    # Each index entry points at one data block of key/value pairs.
    return {key: value for _, handle in index for key, value in _read_block(table, handle)}


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


def read_index(index_path: str | os.PathLike) -> tuple[dict[int, list], dict[str, TensorEntry]]:
    """The header fields and the tensor entries (by name) of a tensor bundle's index file.

    Raises ``ValueError`` saying what is wrong when the file is not such an index.
    """
    try:
        table = read_sstable(index_path)
        header = _parse_message(table.pop(b"", b""))  # BundleHeaderProto
        entries = {key.decode(): _parse_entry(key.decode(), value) for key, value in table.items()}
    except (IndexError, struct.error) as exc:
        raise ValueError(f"a record is malformed ({exc})") from None
    return header, entries


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
            header, self.entries = read_index(self.index_path)
        except ValueError as exc:
            raise CheckpointError(
                f"{self.index_path} is not a usable checkpoint index: {exc}. "
                + _redownload(self.index_path)
            ) from exc
        self.num_shards = _last(header, 1, 1)
        self.big_endian = _last(header, 2) == 1

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


# the line of a ``checkpoint`` file that names the checkpoint's prefix
CHECKPOINT_PATH_PATTERN = re.compile(r'model_checkpoint_path:\s*"([^"]+)"')


def latest_checkpoint(model_dir: str | os.PathLike) -> str:
    """The checkpoint prefix named in ``model_dir/checkpoint`` (like TF's)."""
    state_file = Path(model_dir) / "checkpoint"
    match = CHECKPOINT_PATH_PATTERN.search(state_file.read_text())
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
