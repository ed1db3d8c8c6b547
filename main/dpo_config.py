"""The settings of a DPO run, their checks, the SFT model file it starts from, its folder.

``DPOConfig`` holds every choice of a DPO run (the defaults are the course's: beta 0.1, AdamW
with lr 5e-6 and weight decay 0.01, one epoch, batch 8); ``make_dpo_config`` builds it for the
command line and the notebook alike; ``check_dpo_settings`` refuses a setting that cannot work
before any work starts. ``start_dpo_run`` gives each run a folder of its own,
``OUTPUT_DIR/<date>-<time>-dpo/``, and points ``OUTPUT_DIR/latest-dpo`` at it (``latest``
stays the chapter's run, which ``--resume`` and the DPO run itself look for); the DPO
command's own ``--resume`` continues the run ``latest-dpo`` points to, or a given one.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch

from dpo import REDUCTIONS
from instruction_data import ConfigError, check_prompt_style
from model_file import find_model_file, model_in_folder
from ollama_evaluate import judge_endpoint
from outputs import save_json
from preference_data import PREFERENCE_FILE, SAMPLE_PREFERENCE_PATH
from run_config import (
    COMMON_RANGES,
    check_device,
    check_ranges,
    check_writable_folder,
    given_settings,
    latest_run,
    new_run_folder,
)

DPO_CONFIG_FILE = "dpo-config.json"


@dataclass
class DPOConfig:
    """Every choice of a DPO run. The defaults are the course's (beta 0.1, lr 5e-6, 1 epoch)."""

    model: str | None = None  # the SFT model file or its run folder (None: outputs/latest's)
    preferences: str | None = None  # the preference file (None: PREFERENCE_FILE)
    make_preferences: bool = False  # first let the judge write (or finish) the preference file
    data: str | None = None  # what the judge rewrites (None: the SFT run's data)
    data_cache: str | None = None
    prompt_style: str | None = None  # None: the SFT run's
    train_frac: float | None = None  # None: the SFT run's split (0.85 / 0.10, file order)
    test_frac: float | None = None
    split_seed: int | None = None
    beta: float = 0.1
    lr: float = 5e-6
    weight_decay: float = 0.01
    epochs: int = 1
    batch_size: int = 8
    eval_freq: int = 5
    eval_iter: int = 5
    checkpoint_every: int = 100  # steps between checkpoints (0: only at the end of each epoch)
    reduction: str = "sum"  # answer log-probability: "sum" of its tokens' (DPO paper), or "mean"
    allowed_max_length: int = 1024
    seed: int = 123
    device: str | None = None  # None: cuda when available, else cpu
    max_new_tokens: int = 256
    gen_batch_size: int = 8
    use_judge: bool = True
    judge_url: str | None = None
    judge_model: str = "llama3"
    judge_api: str = "ollama"
    judge_timeout: float = 120.0
    judge_max_failures: int = 3
    models_dir: str = "gpt2"  # where GPT-2's tokenizer files may be found offline
    output_dir: str = "outputs"
    run_name: str | None = None  # set when the run starts
    smoke: bool = False

    @classmethod
    def smoke_preset(cls, **changes: Any) -> DPOConfig:
        """Offline and quick: a tiny random GPT (unless ``model`` is given) on the bundled
        40 sample pairs, with a learning rate that moves such a model."""
        preset = dict(
            preferences=str(SAMPLE_PREFERENCE_PATH),
            lr=1e-4,
            epochs=2,
            batch_size=4,
            eval_freq=1,
            eval_iter=2,
            max_new_tokens=16,
            smoke=True,
        )
        return cls(**{**preset, **changes})

    @property
    def run_dir(self) -> Path:
        if self.run_name is None:
            raise ConfigError("the DPO run has no folder yet: call start_dpo_run(cfg) first")
        return Path(self.output_dir) / self.run_name


def make_dpo_config(
    *, smoke: bool = False, resume: bool | str | None = None, **settings: Any
) -> DPOConfig:
    """The course's defaults (or the smoke preset) with every setting that is not None on top;
    the command line and the notebook both build their configuration here. ``resume`` (True
    for the latest DPO run, or a run folder) continues an earlier run with its settings."""
    given = given_settings(settings, DPOConfig, "DPO setting")
    if resume not in (None, False):
        return _resume_dpo_config(resume, given)
    return replace(DPOConfig.smoke_preset() if smoke else DPOConfig(), **given)


def _resume_dpo_config(resume: bool | str, given: dict) -> DPOConfig:
    """The configuration of the DPO run to continue; settings given now must not differ."""
    output_dir = Path(given.get("output_dir", DPOConfig.output_dir))
    run = latest_run(output_dir, link="latest-dpo") if resume is True else Path(resume)
    if run is None:
        raise ConfigError(f"nothing to resume: {output_dir}/ holds no earlier DPO run")
    path = run / DPO_CONFIG_FILE
    try:
        cfg = DPOConfig(**json.loads(path.read_text(encoding="utf-8")))
    except (OSError, ValueError, TypeError) as exc:
        raise ConfigError(
            f"cannot resume from {run}: {path} is missing or unreadable ({exc}); "
            "pass the folder of an earlier DPO run"
        ) from None
    cfg = replace(cfg, output_dir=str(run.parent), run_name=run.name)
    differ = [
        f"{name}={getattr(cfg, name)!r}"
        for name, value in given.items()
        if name not in ("output_dir", "device") and getattr(cfg, name) != value
    ]
    if differ:
        raise ConfigError(
            f"a resumed DPO run keeps the settings it started with ({', '.join(differ)}); "
            "drop the other settings, or start a new run without --resume"
        )
    return replace(cfg, device=given.get("device", cfg.device))


# (setting, test, what it must be): the chapter run's rules, and DPO's own
_RANGES = [
    *COMMON_RANGES,
    ("beta", lambda v: math.isfinite(v) and v > 0, "a number above 0, such as 0.1"),
    ("lr", lambda v: math.isfinite(v) and v > 0, "a number above 0, such as 5e-6"),
    ("reduction", lambda v: v in REDUCTIONS, f"one of {', '.join(REDUCTIONS)}"),
    ("checkpoint_every", lambda v: v >= 0, "at least 0 (0: only at the end of each epoch)"),
]


def check_dpo_settings(cfg: DPOConfig) -> torch.device:
    """Check every setting and path before any work; returns the device. Writes nothing."""
    check_ranges(cfg, _RANGES)
    if cfg.prompt_style is not None:
        check_prompt_style(cfg.prompt_style)
    if cfg.model is not None and not Path(cfg.model).exists():
        raise ConfigError(f"--model {cfg.model}: no such file or folder; pass an *-sft.pth file")
    sft_model_path(cfg)  # a chapter model to start from is there (or the smoke run makes one)
    preferences = Path(cfg.preferences or PREFERENCE_FILE)
    if preferences.is_dir():
        raise ConfigError(f"--preferences {preferences} is a folder; pass a JSON file")
    if not cfg.make_preferences and not preferences.is_file():
        raise ConfigError(
            f"--preferences {preferences}: no such file. Add --make-preferences to let the "
            f"judge ({cfg.judge_model}) write it, or pass a JSON file of "
            "{instruction, input, output, chosen, rejected} entries"
        )
    if cfg.make_preferences or cfg.use_judge:  # the judge writes the pairs or scores
        judge_endpoint(cfg.judge_url, cfg.judge_api)
    if cfg.make_preferences and cfg.data and not cfg.data.startswith(("http://", "https://")):
        if not Path(cfg.data).is_file():
            raise ConfigError(f"--data {cfg.data}: no such file; pass a JSON file or a URL")
    device = check_device(cfg.device)
    check_writable_folder(Path(cfg.output_dir), "output folder")
    return device


def sft_model_path(cfg: DPOConfig) -> Path | None:
    """The SFT model file: ``cfg.model`` (a run folder gives its ``*-sft.pth``), else the
    latest chapter run's in the output folder; None for a smoke run without a model."""
    if cfg.model is None:
        return None if cfg.smoke else find_model_file(cfg.output_dir).resolve()
    path = Path(cfg.model)
    return model_in_folder(path.resolve()) if path.is_dir() else path


def start_dpo_run(cfg: DPOConfig) -> Path:
    """A new folder ``<output_dir>/<date>-<time>-dpo[-smoke]/`` with the run's settings, or
    the folder of the run being resumed."""
    if cfg.run_name is not None:
        print(f"Continuing the DPO run in {cfg.run_dir}")
        return cfg.run_dir
    folder = new_run_folder(cfg.output_dir, "dpo-smoke" if cfg.smoke else "dpo", link="latest-dpo")
    cfg.run_name = folder.name
    save_json(asdict(cfg), folder / DPO_CONFIG_FILE)
    print(f"This DPO run's outputs go to {folder}")
    return folder
