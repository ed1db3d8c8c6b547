"""Chapter 7 end to end: the steps of a run, shared by the command line and the notebook.

    check_settings -> prepare_data (7.2) -> prepare_tokenizer, prepare_loaders (7.3-7.4)
    -> prepare_model (7.5) -> train, save_training (7.6) -> write_responses (7.7)
    -> evaluate (7.8) -> write_summary

``run`` calls them in this order; ``main/main.ipynb`` calls the same functions in the same
order, with explanations and figures in between, so both give the same numbers.

    python main/instruction_finetuning.py            # the chapter (downloads data and GPT-2 355M)
    python main/instruction_finetuning.py --smoke    # offline: tiny random GPT, bundled sample data
"""

from __future__ import annotations

import sys
from pathlib import Path

# `python main/instruction_finetuning.py` from a fresh clone: find the modules in the
# repository root (previous_chapters.py, gpt_download.py); an installed copy comes first.
_ROOT = Path(__file__).resolve().parents[1]
if (_ROOT / "previous_chapters.py").is_file() and str(_ROOT) not in sys.path:
    sys.path.append(str(_ROOT))

import argparse
import math
import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any

import torch

import gpt_download
from finetuning import (
    TrainingResult,
    build_model,
    finetune,
    generate_responses,
    plot_training,
)
from gpt2_tokenizer import get_tokenizer
from instruction_data import (
    DATA_URL,
    PROMPT_STYLES,
    SAMPLE_DATA_PATH,
    SMOKE_HINT,
    ChapterError,
    ConfigError,
    DatasetError,
    create_dataloaders,
    load_instruction_data,
    split_data,
)
from ollama_evaluate import JUDGE_APIS, judge_endpoint, score_responses
from outputs import save_figure, save_json, save_model
from previous_chapters import MODEL_CONFIGS, gpt2_config, resolve_model_name

# The smoke run's model: GPT-2's vocabulary and layout, tiny sizes, random weights.
SMOKE_MODEL_OVERRIDES = {"emb_dim": 64, "n_layers": 2, "n_heads": 4, "context_length": 256}


@dataclass
class RunConfig:
    """Every choice of a chapter run. The defaults are the chapter's."""

    # model
    model_size: str | None = "gpt2-medium (355M)"  # None: GPT-2 small's shape + model_overrides
    pretrained: bool = True  # False: random initialisation (the smoke run)
    model_overrides: dict = field(default_factory=dict)  # e.g. a tiny emb_dim / n_layers
    models_dir: str = "gpt2"
    # data
    data: str = DATA_URL  # a local JSON file or an http(s) URL
    data_cache: str | None = None  # where a downloaded file is kept (default: its name, here)
    train_frac: float = 0.85
    test_frac: float = 0.10
    split_seed: int | None = None  # None: split in file order, as the course does
    prompt_style: str = "alpaca"
    mask_prompt: bool = False
    group_by_length: bool = False  # batch entries of similar length together (less padding)
    # training
    batch_size: int = 8
    num_workers: int = 0
    allowed_max_length: int = 1024
    epochs: int = 2
    lr: float = 5e-5
    weight_decay: float = 0.1
    eval_freq: int = 5
    eval_iter: int = 5
    seed: int = 123
    device: str | None = None  # None: cuda when available, else cpu
    # responses
    max_new_tokens: int = 256
    gen_batch_size: int = 8
    # judge
    use_judge: bool = True
    judge_url: str | None = None  # None: $OLLAMA_HOST or http://localhost:11434
    judge_model: str = "llama3"
    judge_api: str = "ollama"  # or "openai" (any OpenAI-compatible chat endpoint)
    # outputs
    output_dir: str = "outputs"
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


def make_config(*, smoke: bool = False, **settings: Any) -> RunConfig:
    """The smoke preset or the chapter's defaults, with every setting that is not None on top.

    The command line (each flag given) and the notebook (each parameter not None) build
    their configuration here, so the same settings make the same run.
    """
    given = {name: value for name, value in settings.items() if value is not None}
    unknown = set(given) - {f.name for f in fields(RunConfig)}
    if unknown:
        raise ConfigError(f"unknown setting(s) {sorted(unknown)}")
    if smoke and "model_size" in given:
        raise ConfigError(
            "the smoke run uses its own tiny random GPT, so it cannot take a model size; "
            "drop --model-size (MODEL_SIZE = None in the notebook) or drop --smoke"
        )
    return replace(RunConfig.smoke_preset() if smoke else RunConfig(), **given)


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
            f"responses:   up to {cfg.max_new_tokens} new tokens",
            f"judge:       {judge}",
            f"outputs:     {cfg.output_dir}/",
        ]
    )


# --------------------------------------------------------------------------------------
# The steps of a run
# --------------------------------------------------------------------------------------


def model_config(cfg: RunConfig) -> dict:
    """The GPT config the run builds (a pretrained model takes its shapes from the checkpoint)."""
    try:
        return gpt2_config(cfg.model_size or "gpt2-small (124M)", **cfg.model_overrides)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None


def allowed_max_length(cfg: RunConfig) -> int:
    """How many tokens of an entry the loaders keep: the setting, at most the model's context."""
    return min(cfg.allowed_max_length, model_config(cfg)["context_length"])


def check_settings(cfg: RunConfig) -> torch.device:
    """Check every setting before any work is done; returns the device to run on."""
    if cfg.model_size is None and cfg.pretrained:
        raise ConfigError("a pretrained run needs a model size, e.g. 'gpt2-medium (355M)'")
    model_config(cfg)
    if cfg.prompt_style not in PROMPT_STYLES:
        raise ConfigError(
            f"unknown prompt style {cfg.prompt_style!r}; choose one of: {', '.join(PROMPT_STYLES)}"
        )
    numbers = {
        "epochs": (cfg.epochs, cfg.epochs >= 1),
        "batch size": (cfg.batch_size, cfg.batch_size >= 1),
        "learning rate": (cfg.lr, math.isfinite(cfg.lr) and cfg.lr > 0),
        "weight decay": (
            cfg.weight_decay,
            math.isfinite(cfg.weight_decay) and cfg.weight_decay >= 0,
        ),
        "max new tokens": (cfg.max_new_tokens, cfg.max_new_tokens >= 1),
    }
    for name, (value, ok) in numbers.items():
        if not ok:
            raise ConfigError(
                f"{name} {value} is out of range (epochs, batch size and max new "
                "tokens must be >= 1, the learning rate > 0, weight decay >= 0)"
            )
    judge_endpoint(cfg.judge_url, cfg.judge_api)
    try:
        device = torch.device(cfg.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    except RuntimeError:
        raise ConfigError(f"unknown device {cfg.device!r}; use cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {cfg.device!r} asked for, but PyTorch sees no CUDA GPU")
    return device


@dataclass
class Splits:
    """The loaded entries and their train / test / validation parts (7.2)."""

    data: list[dict]
    train: list[dict]
    test: list[dict]
    val: list[dict]


def prepare_data(cfg: RunConfig) -> Splits:
    """7.2: load the entries (downloaded once) and split them 85/10/5 in file order."""
    data = load_instruction_data(cfg.data, cache_path=cfg.data_cache)
    train, test, val = split_data(data, cfg.train_frac, cfg.test_frac, seed=cfg.split_seed)
    print(f"Training set length: {len(train)}")
    print(f"Validation set length: {len(val)}")
    print(f"Test set length: {len(test)}")
    if not val or not test:
        raise DatasetError(
            f"{cfg.data}: {len(data)} entries leave {len(val)} for validation and "
            f"{len(test)} for testing; the chapter needs at least one of each"
        )
    return Splits(data, train, test, val)


def prepare_tokenizer(cfg: RunConfig) -> Any:
    """GPT-2's tokenizer (tiktoken's gpt2 encoding; the smoke run never tries the network)."""
    return get_tokenizer(offline=True if cfg.smoke else None, models_dir=cfg.models_dir)


def prepare_loaders(cfg: RunConfig, splits: Splits, tokenizer: Any, device: torch.device):
    """7.3-7.4: the (train, val, test) loaders; texts are cut to the model's context."""
    train_loader, val_loader, test_loader = create_dataloaders(
        splits.train,
        splits.val,
        splits.test,
        tokenizer,
        batch_size=cfg.batch_size,
        num_workers=cfg.num_workers,
        device=device,
        allowed_max_length=allowed_max_length(cfg),
        style=cfg.prompt_style,
        mask_prompt=cfg.mask_prompt,
        seed=cfg.seed,
        group_by_length=cfg.group_by_length,
    )
    if len(train_loader) == 0:
        raise DatasetError(
            f"{cfg.data}: {len(splits.train)} training entries make no full batch of "
            f"{cfg.batch_size}; use more data or a smaller --batch-size"
        )
    return train_loader, val_loader, test_loader


def prepare_model(cfg: RunConfig, device: torch.device) -> tuple[torch.nn.Module, dict]:
    """7.5: GPT-2 with OpenAI's weights, or (smoke) a tiny random GPT; and its config."""
    size = cfg.model_size if cfg.pretrained else model_config(cfg)
    overrides = cfg.model_overrides if cfg.pretrained else None
    return build_model(
        size,
        pretrained=cfg.pretrained,
        models_dir=cfg.models_dir,
        overrides=overrides,
        device=device,
        seed=cfg.seed,
    )


def train(
    cfg: RunConfig, model, train_loader, val_loader, tokenizer, device, *, progress: bool = True
) -> TrainingResult:
    """7.6: fine-tune with the chapter's settings."""
    return finetune(
        model,
        train_loader,
        val_loader,
        tokenizer,
        num_epochs=cfg.epochs,
        lr=cfg.lr,
        weight_decay=cfg.weight_decay,
        eval_freq=cfg.eval_freq,
        eval_iter=cfg.eval_iter,
        device=device,
        seed=cfg.seed,
        progress=progress,
    )


def save_training(cfg: RunConfig, model, result: TrainingResult) -> tuple[dict[str, Path], Any]:
    """7.6: save the loss plot and the model; returns their paths and the plot's figure."""
    out = Path(cfg.output_dir)
    fig = plot_training(result)
    paths = {"loss_plot": save_figure(fig, out / "loss-plot.png")}
    paths["model"] = save_model(model, out / cfg.model_file_name())
    print(f"Model saved as {paths['model']}")
    return paths, fig


def write_responses(
    cfg: RunConfig, model, test_data: list[dict], tokenizer, *, progress: bool = True
) -> tuple[list[dict], Path]:
    """7.7: answer every test instruction and save the entries with their responses."""
    responses = generate_responses(
        model,
        test_data,
        tokenizer,
        context_size=model.context_length,
        style=cfg.prompt_style,
        max_new_tokens=cfg.max_new_tokens,
        batch_size=cfg.gen_batch_size,
        progress=progress,
    )
    path = save_json(responses, Path(cfg.output_dir) / "instruction-data-with-response.json")
    print(f"Responses saved as {path}")
    return responses, path


def evaluate(cfg: RunConfig, responses: list[dict], *, progress: bool = True) -> dict:
    """7.8: the judge's scores when a judge is reachable; local reference metrics always."""
    return score_responses(
        responses,
        use_judge=cfg.use_judge,
        judge_url=cfg.judge_url,
        judge_model=cfg.judge_model,
        judge_api=cfg.judge_api,
        progress=progress,
    )


def write_summary(
    cfg: RunConfig,
    device: torch.device,
    splits: Splits,
    model_cfg: dict,
    result: TrainingResult,
    outputs: dict[str, Path],
    scores: dict,
) -> dict:
    """The run's settings and numbers, saved as run-summary.json (and returned)."""
    summary = {
        "config": asdict(cfg),
        "device": str(device),
        "data": {
            "source": cfg.data,
            "n_entries": len(splits.data),
            "n_train": len(splits.train),
            "n_val": len(splits.val),
            "n_test": len(splits.test),
        },
        "model": {
            "size": cfg.model_size if cfg.pretrained else None,
            "pretrained": cfg.pretrained,
            "config": model_cfg,
        },
        "initial_losses": {"train": result.initial_train_loss, "val": result.initial_val_loss},
        "final_losses": {"train": result.final_train_loss, "val": result.final_val_loss},
        "loss_history": {
            "train": result.train_losses,
            "val": result.val_losses,
            "tokens_seen": result.tokens_seen,
        },
        "training_minutes": result.minutes,
        "outputs": {name: str(path) for name, path in outputs.items()},
        **scores,
    }
    path = save_json(summary, Path(cfg.output_dir) / "run-summary.json")
    print(f"Run summary saved as {path}")
    return summary


def run(cfg: RunConfig, *, progress: bool = True) -> dict:
    """Every step of the chapter in order; returns the run summary."""
    import matplotlib.pyplot as plt

    device = check_settings(cfg)
    splits = prepare_data(cfg)
    tokenizer = prepare_tokenizer(cfg)
    train_loader, val_loader, _ = prepare_loaders(cfg, splits, tokenizer, device)
    model, model_cfg = prepare_model(cfg, device)
    result = train(cfg, model, train_loader, val_loader, tokenizer, device, progress=progress)
    outputs, fig = save_training(cfg, model, result)
    plt.close(fig)
    responses, outputs["responses"] = write_responses(
        cfg, model, splits.test, tokenizer, progress=progress
    )
    scores = evaluate(cfg, responses, progress=progress)
    return write_summary(cfg, device, splits, model_cfg, result, outputs, scores)


# --------------------------------------------------------------------------------------
# The command line
# --------------------------------------------------------------------------------------


def build_arg_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="instruction_finetuning.py",
        description="Chapter 7: instruction fine-tune GPT-2, answer the test set, score it.",
    )
    p.add_argument(
        "--smoke",
        action="store_true",
        help="offline preset: a tiny random GPT on the bundled 40-entry sample data "
        "(about 10 s on 2 CPU cores)",
    )
    p.add_argument(
        "--model-size", help=f"one of {', '.join(MODEL_CONFIGS)}, or e.g. 355M (default: medium)"
    )
    p.add_argument("--epochs", type=int, help="default: 2")
    p.add_argument("--batch-size", type=int, help="default: 8")
    p.add_argument("--lr", type=float, help="AdamW learning rate (default: 5e-5)")
    p.add_argument("--weight-decay", type=float, help="default: 0.1")
    p.add_argument("--data", help="instruction data: a JSON file or an http(s) URL")
    p.add_argument(
        "--data-cache", help="where a downloaded --data file is kept (default: its name)"
    )
    p.add_argument("--output-dir", help="where outputs go (default: outputs)")
    p.add_argument("--models-dir", help="where GPT-2 weights are kept (default: gpt2)")
    p.add_argument("--judge-url", help="judge host or endpoint (default: $OLLAMA_HOST)")
    p.add_argument("--judge-model", help="judge model (default: llama3)")
    p.add_argument("--judge-api", choices=JUDGE_APIS, help="default: ollama")
    p.add_argument("--no-judge", action="store_true", help="skip the judge: local metrics only")
    p.add_argument("--prompt-style", choices=list(PROMPT_STYLES), help="default: alpaca")
    p.add_argument(
        "--mask-prompt", action="store_true", help="leave the instruction and input out of the loss"
    )
    p.add_argument(
        "--group-by-length",
        action="store_true",
        help="batch training entries of similar length together (less padding, faster)",
    )
    p.add_argument("--max-new-tokens", type=int, help="response length limit (default: 256)")
    p.add_argument("--seed", type=int, help="default: 123")
    p.add_argument("--device", help="cpu, cuda or cuda:N (default: cuda when available)")
    return p


# RunConfig fields set by the flag of the same name
_FLAG_FIELDS = (
    "model_size",
    "epochs",
    "batch_size",
    "lr",
    "weight_decay",
    "data",
    "data_cache",
    "output_dir",
    "models_dir",
    "judge_url",
    "judge_model",
    "judge_api",
    "prompt_style",
    "max_new_tokens",
    "seed",
    "device",
)


def config_from_args(args: argparse.Namespace) -> RunConfig:
    """The run configuration of parsed command-line flags (see ``make_config``)."""
    settings = {name: getattr(args, name) for name in _FLAG_FIELDS}
    settings["use_judge"] = False if args.no_judge else None
    settings["mask_prompt"] = True if args.mask_prompt else None
    settings["group_by_length"] = True if args.group_by_length else None
    return make_config(smoke=args.smoke, **settings)


def main(argv: Sequence[str] | None = None) -> int:
    """Command line entry point; returns the exit status."""
    import matplotlib

    matplotlib.use("Agg")
    args = build_arg_parser().parse_args(argv)
    try:
        run(config_from_args(args))
    except ChapterError as exc:  # expected failures: one clear message, no traceback
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except (gpt_download.DownloadError, gpt_download.CheckpointError) as exc:
        hint = "" if SMOKE_HINT in str(exc) else f"\n{SMOKE_HINT}"
        print(f"error: {exc}{hint}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
