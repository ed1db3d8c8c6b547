"""Every setting of a run, defined once: its default, its range and its help text.

A config class (``run_config.RunConfig``, ``dpo_config.DPOConfig``) declares each of its
settings as ``name: type = setting("name")``; the definition (a ``Setting`` in ``SETTINGS``,
or the config's own table) then gives the field its default, and the rest comes from it:

* ``add_flags`` adds the command-line flags (``--name``, each None unless given);
* ``ranges`` gives ``check_ranges`` its rules, so every check names the same setting;
* ``notebook_settings`` reads a notebook's parameters (``NUM_EPOCHS`` ...) and
  ``parameter_line`` writes the line that declares one, with the default in its comment.

A config may change a shared setting's default (DPO trains with lr 5e-6) or help text; the
rest of the definition stays the shared one. The settings both configs declare alike (the
responses' and the judge's) are declared once, in ``ResponseSettings``, which both inherit.
"""

from __future__ import annotations

import argparse
import math
import re
from collections.abc import Callable, Iterator, Mapping
from dataclasses import MISSING, Field, dataclass, field, fields, is_dataclass, replace
from typing import Any

from course.instruction_data import DATA_URL, PROMPT_STYLES
from previous_chapters import MODEL_CONFIGS
from runtime.judge_host import JUDGE_APIS
from runtime.judge_scores import RUBRICS

PRECISIONS = ("fp32", "bf16")


@dataclass(frozen=True)
class Setting:
    """One setting: its default, help text, range and command-line flag.

    ``check`` and ``rule`` are the range (``rule`` may name the ``{default}``); ``flag``
    holds the argparse keywords of ``--name`` (None: no flag; ``"name"`` in it renames the
    flag); ``param`` is its name in the notebooks (None: the name in capitals); ``shown``
    is how help texts state the default (None: the default itself; "": not at all).
    """

    default: Any = None
    help: str = ""
    check: Callable[[Any], bool] | None = None
    rule: str = ""
    flag: Mapping[str, Any] | None = None
    param: str | None = None
    shown: str | None = None


def at_least(n: int) -> Callable[[Any], bool]:
    """The range test "at least ``n``"."""
    return lambda v: v >= n


def above_zero(v: Any) -> bool:
    """The range test "a finite number above 0"."""
    return math.isfinite(v) and v > 0


INT, FLOAT, TEXT = {"type": int}, {"type": float}, {}
SWITCH = {"action": "store_const", "const": True}  # the flag alone sets True

# The settings of a chapter run, which a DPO run shares (--help lists a config's flags in the
# order of its fields, its own before the inherited ones: see ``definitions``).
SETTINGS: dict[str, Setting] = {
    "model_size": Setting(
        "gpt2-medium (355M)",
        f"one of {', '.join(MODEL_CONFIGS)}, or e.g. 355M",
        flag=TEXT,
    ),
    "epochs": Setting(2, "training epochs", at_least(1), "at least 1", INT, "NUM_EPOCHS"),
    "batch_size": Setting(8, "per process and micro-batch", at_least(1), "at least 1", INT),
    "grad_accum": Setting(
        1,
        "accumulate K micro-batches per step: the update of a K times larger batch",
        at_least(1),
        "at least 1 (1: no gradient accumulation)",
        {"type": int, "metavar": "K"},
    ),
    "precision": Setting(
        "fp32",
        "fp32 or bf16 (autocast; on CUDA GPUs, and on CPUs with fast bf16)",
        flag={"choices": PRECISIONS},
    ),
    "lr": Setting(
        5e-5,
        "AdamW learning rate",
        above_zero,
        "a number above 0, such as {default}",
        FLOAT,
        "LEARNING_RATE",
        shown="{default}",
    ),
    "weight_decay": Setting(
        0.1,
        "AdamW weight decay",
        lambda v: math.isfinite(v) and v >= 0,
        "a number of at least 0",
        FLOAT,
    ),
    "eval_freq": Setting(5, "steps between loss evaluations", at_least(1), "at least 1"),
    "eval_iter": Setting(5, "batches per loss evaluation", at_least(1), "at least 1"),
    "checkpoint_every": Setting(
        100,
        "steps between training checkpoints (0: only after each epoch)",
        at_least(0),
        "at least 0 (0: only at the end of each epoch)",
        INT,
    ),
    "data": Setting(
        DATA_URL,
        "instruction data: a JSON or JSON Lines file, or an http(s) URL",
        flag=TEXT,
        shown="the course's dataset",
    ),
    "data_cache": Setting(None, "where a downloaded --data file is kept", flag=TEXT),
    "output_dir": Setting("outputs", "where run folders go", flag=TEXT),
    "models_dir": Setting("gpt2", "where GPT-2 weights are kept", flag=TEXT),
    "judge_url": Setting(
        None, "judge host or endpoint", flag=TEXT, shown="$OLLAMA_HOST or http://localhost:11434"
    ),
    "judge_model": Setting("llama3", "judge model", flag=TEXT),
    "judge_api": Setting(
        "ollama",
        "ollama, or openai for any OpenAI-compatible chat server",
        flag={"choices": JUDGE_APIS},
    ),
    "judge_timeout": Setting(
        120.0,
        "seconds per judge reply",
        above_zero,
        "a number of seconds above 0",
        FLOAT,
        shown="120",
    ),
    "judge_max_failures": Setting(
        3, "failed judge requests in a row before giving up", at_least(1), "at least 1", INT
    ),
    "judge_rubric": Setting(
        "0-100",
        "the judge's scale: 0-100 (the book's) or a 1-5 rubric with written criteria",
        lambda v: isinstance(v, str) and v in RUBRICS,
        " or ".join(repr(name) for name in RUBRICS),
        {"choices": list(RUBRICS)},
    ),
    "use_judge": Setting(
        True,
        "False skips the LLM judge (local metrics only)",
        flag={
            "name": "no-judge",
            "help": "skip the judge: local metrics only",
            "action": "store_const",
            "const": False,
        },
    ),
    "prompt_style": Setting(
        "alpaca", "phi3 is exercise 7.1's", flag={"choices": list(PROMPT_STYLES)}
    ),
    "mask_prompt": Setting(False, "leave the instruction and input out of the loss", flag=SWITCH),
    "group_by_length": Setting(
        False,
        "batch training entries of similar length together (less padding, faster)",
        flag=SWITCH,
    ),
    "allowed_max_length": Setting(
        1024,
        "cut entries to this many tokens",
        at_least(2),
        "at least 2",
        INT,
        shown="1024, the model's context",
    ),
    "lora_rank": Setting(
        None,
        "LoRA (exercise 7.4): freeze the model, train rank-RANK adapters (flag alone: 16)",
        lambda v: v is None or (type(v) is int and v >= 1),
        "a whole number >= 1, e.g. 16",
        {"type": int, "nargs": "?", "const": 16, "metavar": "RANK"},
        shown="off: full fine-tuning",
    ),
    "lora_alpha": Setting(
        16.0,
        "LoRA scale: updates are scaled by alpha/rank",
        above_zero,
        "a number above 0, such as 16",
        FLOAT,
        shown="16",
    ),
    "max_new_tokens": Setting(256, "response length limit", at_least(1), "at least 1", INT),
    "gen_batch_size": Setting(8, "prompts answered at once", at_least(1), "at least 1"),
    "seed": Setting(123, "random seed", flag=INT),
    "device": Setting(
        None, "cpu, cuda or cuda:N", flag=TEXT, shown="cuda when available, else cpu"
    ),
}


def setting(name: str, table: Mapping[str, Setting] = SETTINGS, **changes: Any) -> Field:
    """The dataclass field of the setting ``table[name]`` (``changes``: this config's own
    default, help, ... instead of the shared ones)."""
    definition = replace(table[name], **changes)
    return field(default=definition.default, metadata={"setting": definition})


@dataclass
class ResponseSettings:
    """The settings of the test set's responses and of their judge, which a chapter run and
    a DPO run share (``RunConfig`` and ``DPOConfig`` inherit them)."""

    # responses
    max_new_tokens: int = setting("max_new_tokens")
    gen_batch_size: int = setting("gen_batch_size")
    # judge
    use_judge: bool = setting("use_judge")
    judge_url: str | None = setting("judge_url")
    judge_model: str = setting("judge_model")
    judge_api: str = setting("judge_api")
    judge_timeout: float = setting("judge_timeout")
    judge_max_failures: int = setting("judge_max_failures")
    judge_rubric: str = setting("judge_rubric")


def definitions(config_class: type) -> Iterator[tuple[str, Setting]]:
    """(field name, definition) of each of ``config_class``'s settings, in field order, but
    its own fields before those it inherits (``ResponseSettings``'): --help lists a run's
    model and training flags first, whatever its config shares."""
    inherited = {
        f.name for base in config_class.__mro__[1:] if is_dataclass(base) for f in fields(base)
    }
    ordered = sorted(fields(config_class), key=lambda f: f.name in inherited)  # (stable)
    for f in ordered:
        if "setting" in f.metadata:
            yield f.name, f.metadata["setting"]


def _written(value: Any) -> str:
    """A default as the help texts write it: 5e-5, not 5e-05."""
    if isinstance(value, float):
        return re.sub(r"e([+-])0(\d)", r"e\1\2", f"{value:g}")
    return str(value)


def _default_text(definition: Setting) -> str:
    if definition.shown is not None:
        return definition.shown.format(default=_written(definition.default))
    unstated = definition.default is None or isinstance(definition.default, bool)
    return "" if unstated else str(definition.default)


def flag_help(definition: Setting) -> str:
    """The flag's help: its text, and the default unless it has none to state."""
    shown = _default_text(definition)
    return f"{definition.help} (default: {shown})" if shown else definition.help


def add_flags(parser: argparse.ArgumentParser, config_class: type) -> None:
    """A flag for each setting of ``config_class`` that has one; each is None unless given
    (the config's defaults fill in the rest, see ``make_config``)."""
    for name, definition in definitions(config_class):
        if definition.flag is None:
            continue
        keywords = {"help": flag_help(definition), **definition.flag}
        flag = "--" + keywords.pop("name", name.replace("_", "-"))
        parser.add_argument(flag, dest=name, **keywords)


def flag_settings(args: argparse.Namespace, config_class: type) -> dict[str, Any]:
    """The settings that ``add_flags``' flags hold in parsed ``args`` (None: not given)."""
    return {
        name: getattr(args, name) for name, d in definitions(config_class) if d.flag is not None
    }


def ranges(config_class: type) -> list[tuple[str, Callable[[Any], bool], str]]:
    """(setting, test, what it must be) for each setting of ``config_class`` with a range."""
    return [
        (name, d.check, d.rule.format(default=_written(d.default)))
        for name, d in definitions(config_class)
        if d.check is not None
    ]


def param_name(name: str, definition: Setting) -> str:
    """The setting's parameter in the notebooks: ``NUM_EPOCHS`` for ``epochs``."""
    return definition.param or name.upper()


def notebook_settings(namespace: Mapping[str, Any], config_class: type) -> dict[str, Any]:
    """The settings a notebook's parameters give (``NUM_EPOCHS`` for ``epochs`` ...): each
    of ``config_class``'s settings whose parameter is defined in ``namespace``."""
    return {
        name: namespace[param_name(name, d)]
        for name, d in definitions(config_class)
        if param_name(name, d) in namespace
    }


def parameter_line(config_class: type, name: str, smoke_default: Any = MISSING) -> str:
    """The line of a notebook's parameters cell that declares setting ``name``: None, and a
    comment with the default (and the smoke run's, ``smoke_default``, where it differs)."""
    definition = dict(definitions(config_class))[name]
    shown = _default_text(definition) if definition.shown else repr(definition.default)
    number = isinstance(smoke_default, int | float) and not isinstance(smoke_default, bool)
    if smoke_default is not MISSING and smoke_default != definition.default:
        shown += f" (smoke: {_written(smoke_default)})" if number else " (smoke: its own)"
    return f"{param_name(name, definition)} = None  # None: {shown}; {definition.help}"
