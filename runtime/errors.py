"""The project's errors, at the bottom of every layer: each module raises these, none of them
needs another module to do so.

``ChapterError`` is an expected failure whose message says what to do; the commands print it as
one ``error:`` line and exit with 2. The others say which kind it is. (Download errors live with
the downloads, in ``runtime.downloads``; ``tf_checkpoint.CheckpointError`` with the reader.)
"""

from __future__ import annotations

from typing import Any


class ChapterError(Exception):
    """An expected failure (bad data, a bad setting, no judge...) with a message saying what to do."""


class DatasetError(ChapterError, ValueError):
    """The instruction data is not a JSON list of {instruction, input, output} strings."""


class ConfigError(ChapterError, ValueError):
    """A setting that cannot work: an unknown model size, prompt style, device or judge API."""


class RunLockedError(ConfigError):
    """Another process is writing the run folder."""


class LoRAError(ChapterError, ValueError):
    """A LoRA setting that cannot work, or an adapter that does not fit the model."""


class ModelFileError(ChapterError):
    """A model file that is missing, unreadable, not a GPTModel state dict, or the wrong size."""


class OutputError(ChapterError, OSError):
    """A file could not be written: no space left, a read-only folder, no permission."""


class FileCheckError(ChapterError):
    """A file the project wrote is damaged (its checksum differs) or cannot be read."""


class JudgeUnavailableError(ChapterError, ConnectionError):
    """The LLM judge cannot be reached, does not have the model, or stopped answering.

    ``result``: set by ``ollama_evaluate.judge_responses`` to the ``JudgeResult`` of what was
    scored before (in this or an earlier session); None when raised elsewhere.
    ``server_down``: True when starting the server is what to do (no connection, no reply
    in time); False when the server answered and the message says what to do.
    """

    result: Any = None
    server_down: bool = True


class JudgeReplyError(JudgeUnavailableError):
    """The judge answered, but not with a usable reply (an HTTP error, an empty or null
    reply, not JSON, too large, not the API's shape): a failed attempt, never a result."""

    server_down = False


class TrainingInterrupted(ChapterError):
    """Training stopped on Ctrl-C or SIGTERM after saving a checkpoint."""


class NonFiniteLossError(ChapterError):
    """The training loss became NaN or infinite."""


class ExportError(ChapterError):
    """An export that cannot be done: an existing output, a non-GPT-2 vocabulary, a bad option."""
