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

from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch

from course.dpo import REDUCTIONS
from course.instruction_data import ConfigError, check_prompt_style
from preference_data import PREFERENCE_FILE, SAMPLE_PREFERENCE_PATH
from runtime.judge_host import judge_endpoint, redact_urls
from runtime.model_file import find_model_file, model_in_folder
from runtime.outputs import save_json
from runtime.run_config import (
    check_device,
    check_ranges,
    check_writable_folder,
    given_settings,
    read_saved_config,
)
from runtime.run_folders import latest_run, new_run_folder
from runtime.run_settings import (
    FLOAT,
    SWITCH,
    TEXT,
    ResponseSettings,
    Setting,
    above_zero,
    ranges,
    setting,
)

DPO_CONFIG_FILE = "dpo-config.json"
THE_SFT_RUNS = "the SFT run's"

# DPO's own settings; the others are the chapter's (run_settings.SETTINGS), some with DPO defaults.
DPO_SETTINGS: dict[str, Setting] = {
    "model": Setting(
        None,
        "the SFT model (*-sft.pth) or its run folder",
        flag=TEXT,
        shown="the latest run's in --output-dir",
    ),
    "preferences": Setting(None, "preference file", flag=TEXT, shown=PREFERENCE_FILE),
    "make_preferences": Setting(
        False, "let the judge write (or finish) the preference file first", flag=SWITCH
    ),
    "beta": Setting(0.1, "DPO's beta", above_zero, "a number above 0, such as {default}", FLOAT),
    "reduction": Setting(
        "sum",
        "an answer's log-probability: sum of its tokens' (DPO paper) or mean (course)",
        lambda v: v in REDUCTIONS,
        f"one of {', '.join(REDUCTIONS)}",
        {"choices": REDUCTIONS},
    ),
}


def _dpo(name: str) -> Any:
    return setting(name, DPO_SETTINGS)


@dataclass
class DPOConfig(ResponseSettings):
    """Every choice of a DPO run. The defaults are the course's (beta 0.1, lr 5e-6, 1 epoch);
    the responses' and the judge's settings are inherited, the chapter run's own."""

    model: str | None = _dpo("model")  # None: outputs/latest's
    preferences: str | None = _dpo("preferences")  # None: PREFERENCE_FILE
    make_preferences: bool = _dpo("make_preferences")
    data: str | None = setting(
        "data", default=None, help="instruction data the judge rewrites", shown=THE_SFT_RUNS
    )
    data_cache: str | None = setting("data_cache")
    prompt_style: str | None = setting("prompt_style", default=None, shown=THE_SFT_RUNS)
    train_frac: float | None = None  # None: the SFT run's split (0.85 / 0.10, file order)
    test_frac: float | None = None
    split_seed: int | None = None
    beta: float = _dpo("beta")
    lr: float = setting("lr", default=5e-6)
    weight_decay: float = setting("weight_decay", default=0.01)
    epochs: int = setting("epochs", default=1)
    batch_size: int = setting("batch_size", help="entries per batch")
    eval_freq: int = setting("eval_freq")
    eval_iter: int = setting("eval_iter")
    checkpoint_every: int = setting("checkpoint_every")
    reduction: str = _dpo("reduction")
    allowed_max_length: int = setting("allowed_max_length", flag=None)
    seed: int = setting("seed")
    device: str | None = setting("device")
    models_dir: str = setting("models_dir", help="where GPT-2's tokenizer files are kept")
    output_dir: str = setting("output_dir")
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
    if not path.is_file():
        raise ConfigError(
            f"cannot resume from {run}: {path} is missing; pass the folder of an earlier DPO run"
        )
    # (its checksum, then each setting's type, checked as a chapter run's run-config.json)
    cfg = read_saved_config(path, DPOConfig, "start a new DPO run without --resume")
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


def check_dpo_settings(cfg: DPOConfig) -> torch.device:
    """Check every setting and path before any work; returns the device. Writes nothing."""
    check_ranges(cfg, ranges(DPOConfig))
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
    settings = redact_urls(asdict(cfg))  # (no URL secrets)
    save_json(settings, folder / DPO_CONFIG_FILE, checksum=True)
    print(f"This DPO run's outputs go to {folder.resolve()}")  # absolute: whatever the cwd
    return folder
