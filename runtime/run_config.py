"""The settings of a run, their checks, and the run's own folder.

``RunConfig`` holds every choice of a run (its defaults are the chapter's); ``make_config``
builds it for the command line and the notebook alike; ``check_settings`` refuses a setting
that cannot work before any download or training starts. ``start_run`` gives every run a
folder of its own, ``OUTPUT_DIR/<date>-<time>-<model>[-<variant>]/`` (``run_tag``), and points
``OUTPUT_DIR/latest`` at it, so that no run overwrites or mixes with another;
``make_config(resume=...)`` continues an earlier run in its folder, with the settings it
started with (``read_saved_config`` checks the file and each setting's type). One process at a
time writes a run folder (``runtime.run_folders`` makes, finds and locks the folders).
"""

from __future__ import annotations

import json
import os
import re
import tempfile
import types
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Union, get_args, get_origin, get_type_hints
from urllib.parse import urlsplit

import torch

from course.instruction_data import (
    DATA_URL,
    SAMPLE_DATA_PATH,
    ConfigError,
    check_prompt_style,
)
from previous_chapters import gpt2_config, resolve_model_name
from runtime.judge_host import judge_endpoint, redact_url, redact_urls
from runtime.outputs import read_json, remove_stale_temp_files, save_json
from runtime.run_folders import latest_run, lock_run, new_run_folder
from runtime.run_settings import PRECISIONS, ResponseSettings, ranges, setting

# The smoke run's model: GPT-2's vocabulary and layout, tiny sizes, random weights.
SMOKE_MODEL_OVERRIDES = {"emb_dim": 64, "n_layers": 2, "n_heads": 4, "context_length": 256}
# A chapter run's folder holds these files (and its model, ``RunConfig.model_file_name``)
RUN_CONFIG_FILE = "run-config.json"
RESPONSES_FILE = "instruction-data-with-response.json"  # 7.7: the test set, answered
CHECKPOINT_FILE = "checkpoint.pt"  # 7.6: training so far (with checkpoint.prev.pt before it)
TRAINING_RESULT_FILE = "training-result.json"  # 7.6: the losses, once training ended


@dataclass
class RunConfig(ResponseSettings):
    """Every choice of a chapter run. The defaults are the chapter's. The responses' and the
    judge's settings (``max_new_tokens``, ``use_judge``, ``judge_url`` ...) are inherited."""

    # Each setting's default, range and help text are defined once, in run_settings.SETTINGS.
    # model
    model_size: str | None = setting("model_size")  # None: GPT-2 small's shape + overrides
    pretrained: bool = True  # False: random initialisation (the smoke run)
    model_overrides: dict = field(default_factory=dict)  # e.g. a tiny emb_dim / n_layers
    models_dir: str = setting("models_dir")
    # data
    data: str = setting("data")
    data_cache: str | None = setting("data_cache")
    train_frac: float = 0.85
    test_frac: float = 0.10
    split_seed: int | None = None  # None: split in file order, as the course does
    prompt_style: str = setting("prompt_style")
    mask_prompt: bool = setting("mask_prompt")
    group_by_length: bool = setting("group_by_length")
    # training
    batch_size: int = setting("batch_size")
    num_workers: int = 0
    allowed_max_length: int = setting("allowed_max_length")
    epochs: int = setting("epochs")
    lr: float = setting("lr")
    weight_decay: float = setting("weight_decay")
    eval_freq: int = setting("eval_freq")
    eval_iter: int = setting("eval_iter")
    seed: int = setting("seed")
    device: str | None = setting("device")
    checkpoint_every: int = setting("checkpoint_every")
    grad_accum: int = setting("grad_accum")
    precision: str = setting("precision")
    # LoRA (exercise 7.4): train low-rank adapters on the frozen model (None: full fine-tuning)
    lora_rank: int | None = setting("lora_rank")
    lora_alpha: float = setting("lora_alpha")
    # outputs
    output_dir: str = setting("output_dir")  # each run gets a folder of its own in here
    run_name: str | None = None  # that folder's name, set when the run starts
    smoke: bool = False

    @classmethod
    def smoke_preset(cls, **changes: Any) -> RunConfig:
        """A run that works offline: a tiny random GPT on the bundled 40-entry sample data."""
        preset = dict(
            model_size=None,
            pretrained=False,
            model_overrides=dict(SMOKE_MODEL_OVERRIDES),
            data=str(SAMPLE_DATA_PATH),
            lr=1e-3,
            eval_freq=2,
            eval_iter=1,
            max_new_tokens=16,
            smoke=True,
        )
        return cls(**{**preset, **changes})

    def model_file_name(self) -> str:
        """``gpt2-medium355M-sft.pth`` as in the course; ``gpt-random-init-sft.pth`` if random."""
        if not self.pretrained or self.model_size is None:
            return "gpt-random-init-sft.pth"
        return re.sub(r"[ ()]", "", resolve_model_name(self.model_size)) + "-sft.pth"

    @property
    def run_dir(self) -> Path:
        """This run's folder (``start_run`` names it)."""
        if self.run_name is None:
            raise ConfigError("the run has no folder yet: call start_run(cfg) first")
        return Path(self.output_dir) / self.run_name


def given_settings(settings: dict[str, Any], config_class: type, what: str = "setting") -> dict:
    """The settings that are not None; a name ``config_class`` has no field for is an error."""
    given = {name: value for name, value in settings.items() if value is not None}
    unknown = set(given) - {f.name for f in fields(config_class)}
    if unknown:
        raise ConfigError(f"unknown {what}(s) {sorted(unknown)}")
    return given


def make_config(
    *, smoke: bool = False, resume: bool | str | None = None, **settings: Any
) -> RunConfig:
    """The smoke preset or the chapter's defaults, with every setting that is not None on top.

    The command line (each flag given) and the notebook (each parameter not None) build
    their configuration here, so the same settings make the same run. ``resume`` (True for
    the latest run in the output folder, or a run folder) continues an earlier run with the
    settings it started with; other settings may only repeat them (``device`` may change).
    """
    given = given_settings(settings, RunConfig)
    if resume not in (None, False):
        return _resume_config(resume, {**given, **({"smoke": True} if smoke else {})})
    if smoke and "model_size" in given:
        raise ConfigError(
            "the smoke run uses its own tiny random GPT, so it cannot take a model size; "
            "drop --model-size (MODEL_SIZE = None in the notebook) or drop --smoke"
        )
    if "lora_alpha" in given and given.get("lora_rank") is None:
        raise ConfigError(
            "lora_alpha applies only to LoRA runs: add --lora-rank (LORA_RANK in the notebook), "
            "e.g. 16, or drop --lora-alpha"
        )
    return replace(RunConfig.smoke_preset() if smoke else RunConfig(), **given)


def _method(cfg: RunConfig) -> str:
    if cfg.lora_rank is None:
        return "full fine-tuning (every weight trains)"
    return f"LoRA rank {cfg.lora_rank}, alpha {cfg.lora_alpha:g} (the pretrained weights frozen)"


def describe(cfg: RunConfig) -> str:
    """The settings that shape a run, one short line each."""
    model = "tiny random GPT (smoke)" if cfg.model_size is None else cfg.model_size
    judge = f"{cfg.judge_model} via {cfg.judge_api}" if cfg.use_judge else "none (local metrics)"
    data = Path(cfg.data).name if not cfg.data.startswith("http") else cfg.data
    return "\n".join(
        [
            f"model:       {model}{'' if cfg.pretrained else ', random weights'}",
            f"data:        {data} ({cfg.prompt_style} prompts, mask_prompt={cfg.mask_prompt})",
            f"training:    {cfg.epochs} epochs, batch {cfg.batch_size}, AdamW lr {cfg.lr:g}, "
            f"weight decay {cfg.weight_decay:g}, seed {cfg.seed}",
            f"method:      {_method(cfg)}",
            f"responses:   up to {cfg.max_new_tokens} new tokens",
            f"judge:       {judge}",
            f"outputs:     {cfg.output_dir}/ (a new folder for each run)",
        ]
    )


def model_config(cfg: RunConfig) -> dict:
    """The GPT config the run builds (a pretrained model takes its shapes from the checkpoint)."""
    try:
        return gpt2_config(cfg.model_size or "gpt2-small (124M)", **cfg.model_overrides)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None


def allowed_max_length(cfg: RunConfig) -> int:
    """How many tokens of an entry the loaders keep: the setting, at most the model's context."""
    return min(cfg.allowed_max_length, model_config(cfg)["context_length"])


# --------------------------------------------------------------------------------------
# Checks before any work
# --------------------------------------------------------------------------------------


def check_ranges(cfg: Any, rules: list[tuple[str, Callable[[Any], bool], str]]) -> None:
    """Refuse the first setting of ``cfg`` outside its range: ``rules`` holds (setting,
    test, what it must be; see ``run_settings.ranges``), and the error names the setting, its
    value and the rule."""
    for name, ok, rule in rules:
        if not ok(getattr(cfg, name)):
            raise ConfigError(f"{name} = {getattr(cfg, name)} is out of range: it must be {rule}")


def check_writable_folder(path: Path, what: str) -> None:
    """Check that ``path`` is (or can be made) a folder we can write in; creates nothing."""
    existing = path
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise ConfigError(f"{what} {path}: {existing} is a file, not a folder; choose another path")
    try:
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as exc:
        raise ConfigError(
            f"{what} {path} cannot be written ({exc.strerror or exc}); choose another path"
        ) from None


def check_device(name: str | None) -> torch.device:
    """The device called ``name`` (None: cuda when available, else cpu), if this machine has it."""
    try:
        device = torch.device(name or ("cuda" if torch.cuda.is_available() else "cpu"))
    except RuntimeError:
        raise ConfigError(f"unknown device {name!r}; use cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {name!r} asked for, but PyTorch sees no CUDA GPU")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise ConfigError(f"device {name!r}: this machine has {torch.cuda.device_count()} GPU(s)")
    if device.type not in ("cpu", "cuda", "mps"):
        raise ConfigError(f"device {name!r} is not supported; use cpu or cuda")
    return device


def cpu_has_fast_bf16() -> bool:
    """Whether this CPU computes bf16 matrix products in hardware (AVX512-BF16 or AMX-BF16).

    Without them PyTorch emulates bf16 through fp32, slower than fp32 itself.
    """
    capabilities = getattr(torch.cpu, "get_capabilities", dict)()
    return bool(capabilities.get("avx512_bf16") or capabilities.get("amx_bf16"))


def check_precision(precision: str, device: torch.device) -> None:
    """Refuse a precision the device cannot run well: bf16 needs a CUDA GPU with bf16 (Ampere
    or newer) or a CPU with bf16 instructions."""
    if precision not in PRECISIONS:
        raise ConfigError(
            f"unknown precision {precision!r}; choose one of: {', '.join(PRECISIONS)}"
        )
    if precision == "fp32":
        return
    if device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise ConfigError("this GPU has no bf16 support (it needs Ampere or newer); use fp32")
    if device.type == "cpu" and not cpu_has_fast_bf16():
        raise ConfigError(
            "bf16 on this CPU would be emulated and slower than fp32 (it lacks AVX512-BF16 and "
            "AMX-BF16); use --precision fp32, or bf16 on a CUDA GPU"
        )
    if device.type not in ("cpu", "cuda"):
        raise ConfigError(f"bf16 autocast is supported on cpu and cuda, not {device.type}")


def check_settings(cfg: RunConfig) -> torch.device:
    """Check every setting and path before any work is done; returns the device to run on.

    Each problem is a ``ConfigError`` of one line that says what is wrong and what to do.
    Nothing is written.
    """
    check_ranges(cfg, ranges(RunConfig))
    if cfg.model_size is None and cfg.pretrained:
        raise ConfigError("a pretrained run needs a model size, e.g. 'gpt2-medium (355M)'")
    model_config(cfg)
    check_prompt_style(cfg.prompt_style)
    if not cfg.data.startswith(("http://", "https://")) and not Path(cfg.data).is_file():
        raise ConfigError(f"data {cfg.data}: no such file; pass a JSON file or an http(s) URL")
    if cfg.data_cache is not None and Path(cfg.data_cache).is_dir():
        raise ConfigError(f"data cache {cfg.data_cache} is a folder; pass a file path")
    if Path(cfg.models_dir).exists() and not Path(cfg.models_dir).is_dir():
        raise ConfigError(f"models folder {cfg.models_dir} is a file; choose another path")
    if cfg.use_judge:
        judge_endpoint(cfg.judge_url, cfg.judge_api)
    device = check_device(cfg.device)
    check_precision(cfg.precision, device)
    check_writable_folder(Path(cfg.output_dir), "output folder")
    return device


# --------------------------------------------------------------------------------------
# The run's folder (made and locked by runtime.run_folders) and its settings
# --------------------------------------------------------------------------------------


def run_tag(cfg: RunConfig) -> str:
    """What a run folder's name says after its date: the model (``smoke`` for the tiny one),
    then what differs from the chapter: ``lora16``, ``phi3``, ``mask``, the data's name."""
    parts = ["smoke" if cfg.smoke else cfg.model_file_name().removesuffix("-sft.pth")]
    if cfg.lora_rank is not None:
        parts.append(f"lora{cfg.lora_rank}")
    if cfg.prompt_style != "alpaca":
        parts.append(cfg.prompt_style)
    if cfg.mask_prompt:
        parts.append("mask")
    usual = SAMPLE_DATA_PATH.name if cfg.smoke else DATA_URL
    if cfg.data != usual and Path(cfg.data).name != usual:
        stem = Path(urlsplit(cfg.data).path).stem
        parts.append(re.sub(r"[^A-Za-z0-9_.]+", "-", stem).strip("-.")[:24] or "data")
    return "-".join(parts)


def _check_run_files(run_dir: Path) -> None:
    """Refuse a run folder where a file the run writes is something else (e.g. a folder)."""
    for name in (RUN_CONFIG_FILE, RESPONSES_FILE, CHECKPOINT_FILE, TRAINING_RESULT_FILE):
        path = run_dir / name
        if path.exists() and not path.is_file():
            raise ConfigError(f"{path} is not a file; move it out of the run folder and resume")


def start_run(cfg: RunConfig) -> Path:
    """The run's folder: a new one (named and recorded in ``cfg.run_name``), or the folder of
    the run being resumed. It holds the run's settings as ``run-config.json``. The process
    becomes the folder's only writer (``lock_run``); on a resume, the temporary files that
    an earlier session left when it was killed while saving are deleted."""
    if cfg.run_name is not None:
        lock_run(cfg.run_dir)
        _check_run_files(cfg.run_dir)
        for stale in remove_stale_temp_files(cfg.run_dir):
            print(f"Removed {stale.name}, left by an earlier session killed while saving")
        print(f"Continuing the run in {cfg.run_dir}")
        return cfg.run_dir
    cfg.run_name = new_run_folder(cfg.output_dir, run_tag(cfg)).name
    # (no URL secrets in the file)
    save_json(redact_urls(asdict(cfg)), cfg.run_dir / RUN_CONFIG_FILE, checksum=True)
    print(f"This run's outputs go to {cfg.run_dir.resolve()}")  # absolute: whatever the cwd
    return cfg.run_dir


def _matches(value: Any, hint: Any) -> bool:
    """Whether a JSON value fits a field's type hint (``int``, ``float | None``, ``dict``...)."""
    if isinstance(hint, types.UnionType) or get_origin(hint) is Union:
        return any(_matches(value, arg) for arg in get_args(hint))
    if hint is type(None):
        return value is None
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint in (int, bool, str):
        return type(value) is hint
    origin = get_origin(hint) or hint
    return not isinstance(origin, type) or isinstance(value, origin)


def read_saved_config(path: Path, config_class: type, advice: str) -> Any:
    """The ``config_class`` saved as JSON at ``path`` (checksum checked, each field's type
    too); anything wrong is a ``ConfigError`` that names the file, the field and ``advice``."""
    saved = read_json(path, advice)
    if not isinstance(saved, dict):
        raise ConfigError(f"{path} does not hold a run's settings (a JSON object); {advice}")
    hints = get_type_hints(config_class)
    unknown = sorted(set(saved) - set(hints))
    if unknown:
        raise ConfigError(f"{path}: unknown setting {unknown[0]!r}; {advice}")
    for name, value in saved.items():
        if not _matches(value, hints[name]):
            hint = hints[name]
            wanted = hint.__name__ if isinstance(hint, type) else str(hint).replace("typing.", "")
            raise ConfigError(
                f"{path}: {name} must be {wanted} but is {json.dumps(value)[:40]}; {advice}"
            )
    return config_class(**saved)


def _resume_config(resume: bool | str | os.PathLike, given: dict) -> RunConfig:
    """The configuration of the run to continue, checked against the settings given now."""
    output_dir = given.get("output_dir", RunConfig.output_dir)
    run = latest_run(output_dir) if resume is True or resume == "latest" else Path(resume)
    if run is None:
        raise ConfigError(f"nothing to resume: {output_dir}/ holds no earlier run")
    if resume is True or resume == "latest":
        print(f"--resume: the latest run in {output_dir}/ is {run.name}")
    path = run / RUN_CONFIG_FILE
    advice = "pass the folder of an earlier run (its run-config.json is as the run wrote it)"
    if not path.is_file():
        raise ConfigError(f"cannot resume from {run}: {path} is missing or unreadable; {advice}")
    cfg = read_saved_config(path, RunConfig, advice)
    cfg = replace(cfg, output_dir=str(run.parent), run_name=run.name)
    secrets = {  # a URL's credentials given again (run-config.json holds the URL without them)
        name: value
        for name, value in given.items()
        if isinstance(value, str) and value != getattr(cfg, name) == redact_url(value)
    }
    cfg = replace(cfg, **secrets)
    differ = {
        name: getattr(cfg, name)
        for name, value in given.items()
        if name not in ("output_dir", "device") and getattr(cfg, name) != value
    }
    if differ:
        used = ", ".join(f"{name}={value!r}" for name, value in differ.items())
        raise ConfigError(
            f"a resumed run keeps the settings it started with ({used}); drop the other "
            "settings, or start a new run without --resume"
        )
    return replace(cfg, device=given.get("device", cfg.device))
