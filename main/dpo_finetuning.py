"""DPO after chapter 7 end to end: the steps of a run, shared by the command line and the notebook.

    check_dpo_settings -> load_sft (the chapter's model file) -> prepare_preferences (load, or
    make with the judge) -> split_preferences -> prepare_preference_loaders -> start_dpo_run
    -> train_dpo -> save_dpo -> write_both_responses -> score_both -> write_dpo_summary

``run_dpo`` calls them in this order; ``main/dpo.ipynb`` calls the same functions. Each run
writes into a folder of its own, ``outputs/<date>-<time>-dpo/`` (``outputs/latest-dpo``
points to the newest): the DPO model, the training history and its plot, and the test-set
responses of the SFT model and of the DPO model side by side, each scored by the judge.

    python main/dpo_finetuning.py --model outputs/RUN/gpt2-medium355M-sft.pth \
        --preferences instruction-data-with-preference.json
    python main/dpo_finetuning.py --make-preferences ...  # the judge writes the pairs first
    python main/dpo_finetuning.py --smoke                 # offline: tiny random GPT, sample pairs
"""

from __future__ import annotations

import sys
from pathlib import Path

from runtime import interrupts

interrupts.guard_startup(__name__)  # before the slow imports: Ctrl-C there is one line too

import argparse
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from typing import Any

import torch

from course.dpo import (
    DPOHistory,
    plot_dpo_tracking,
    policy_and_reference,
    train_model_dpo_simple,
)
from course.finetuning import build_model
from course.instruction_data import (
    DATA_URL,
    ChapterError,
    DatasetError,
    format_input,
    load_instruction_data,
    report_long_entries,
    split_data,
)
from gpt_download import DownloadError
from instruction_finetuning import generate_test_responses
from ollama_evaluate import JudgeSettings, judge_settings, score_responses
from preference_data import (
    PREFERENCE_FILE,
    create_preference_loaders,
    generate_preference_data,
    load_preference_data,
    usable_pairs,
)
from runtime.dpo_config import (  # noqa: F401 (re-exported for the notebook)
    DPOConfig,
    check_dpo_settings,
    make_dpo_config,
    sft_model_path,
    start_dpo_run,
)
from runtime.engine import make_optimizer
from runtime.errors import FileCheckError
from runtime.gpt2_tokenizer import get_tokenizer
from runtime.judge_host import redact_urls
from runtime.model_file import LoadedModel, load_model_file, read_run_config, read_state_dict
from runtime.outputs import checksum_path, read_json, save_figure, save_json, save_model
from runtime.run_config import RESPONSES_FILE, RunConfig, model_config
from runtime.run_settings import add_flags, flag_settings
from runtime.trainer import TrainingInterrupted

CHECKPOINT_FILE = "checkpoint.pt"  # DPO training's, in the run's folder until the model is saved
TRAINING_FILE = "dpo-training-result.json"
SFT_RESPONSES_FILE = "sft-responses.json"  # the test entries answered by the SFT model
DPO_RESPONSES_FILE = "dpo-responses.json"  # ... and by the DPO model


# --------------------------------------------------------------------------------------
# The steps of a run
# --------------------------------------------------------------------------------------


def load_sft(cfg: DPOConfig, device: torch.device) -> tuple[LoadedModel | None, DPOConfig]:
    """The chapter's fine-tuned model (None for a smoke run without ``--model``), and the
    configuration with what the SFT run's ``run-config.json`` knows filled in: the prompt
    style, the data the pairs come from, and the split (so the test set stays the same)."""
    path = sft_model_path(cfg)
    sft = None if path is None else load_model_file(path, prompt_style=cfg.prompt_style)
    run = (read_run_config(path) if path is not None else None) or {}
    if sft is not None:
        sft.model.to(device)
        print(f"SFT model: {path} ({sft.config['n_layers']} layers, {sft.prompt_style.name})")
    filled = {
        "model": None if path is None else str(path),
        "prompt_style": sft.prompt_style.name if sft is not None else cfg.prompt_style,
        "data": cfg.data or run.get("data") or DATA_URL,
        "data_cache": cfg.data_cache or run.get("data_cache"),
        "train_frac": cfg.train_frac if cfg.train_frac is not None else run.get("train_frac", 0.85),
        "test_frac": cfg.test_frac if cfg.test_frac is not None else run.get("test_frac", 0.10),
        "split_seed": cfg.split_seed if cfg.split_seed is not None else run.get("split_seed"),
        "preferences": cfg.preferences or PREFERENCE_FILE,
    }
    filled["prompt_style"] = filled["prompt_style"] or "alpaca"
    return sft, replace(cfg, **filled)


def smoke_model(cfg: DPOConfig, device: torch.device) -> torch.nn.Module:
    """The smoke run's SFT model: the chapter's smoke GPT (tiny, random weights, seeded)."""
    model, _ = build_model(
        model_config(RunConfig.smoke_preset()), pretrained=False, device=device, seed=cfg.seed
    )
    return model


def prepare_tokenizer(cfg: DPOConfig) -> Any:
    """GPT-2's tokenizer (the smoke run never tries the network)."""
    return get_tokenizer(offline=True if cfg.smoke else None, models_dir=cfg.models_dir)


def prepare_preferences(cfg: DPOConfig, *, progress: bool = True) -> list[dict]:
    """The preference file's entries; with ``make_preferences`` the judge first writes the
    pairs for the instruction data (or finishes an interrupted file)."""
    if cfg.make_preferences:
        entries = load_instruction_data(cfg.data, cache_path=cfg.data_cache)
        print(f"Asking {cfg.judge_model} to rewrite {len(entries)} answers into {cfg.preferences}")
        judge = JudgeSettings.of(cfg, prefix="judge_")
        return generate_preference_data(
            entries, cfg.preferences, judge, seed=cfg.seed, progress=progress
        )
    return load_preference_data(cfg.preferences)


@dataclass
class PreferenceSplits:
    """Training and validation pairs, and the test entries (they need no pair)."""

    train: list[dict]
    val: list[dict]
    test: list[dict]


def split_preferences(cfg: DPOConfig, entries: list[dict]) -> PreferenceSplits:
    """Split as the SFT run split its data (85/10/5 in file order unless it did otherwise),
    so the DPO model is tested on the SFT model's test entries. Entries the judge made no
    pair for stay in the split but leave training and validation."""
    train, test, val = split_data(entries, cfg.train_frac, cfg.test_frac, seed=cfg.split_seed)
    train, val = usable_pairs(train), usable_pairs(val)
    print(f"Training pairs: {len(train)}, validation pairs: {len(val)}, test entries: {len(test)}")
    if len(train) < cfg.batch_size or not val or not test:
        raise DatasetError(
            f"{cfg.preferences}: {len(entries)} entries give {len(train)} training pairs, "
            f"{len(val)} validation pairs and {len(test)} test entries; DPO needs at least one "
            f"batch ({cfg.batch_size}) of training pairs and one of each other"
        )
    return PreferenceSplits(train, val, test)


def prepare_preference_loaders(
    cfg: DPOConfig, splits: PreferenceSplits, tokenizer: Any, context_length: int, device
):
    """The (train, val) loaders of pairs, each pair cut to the model's context."""
    limit = min(cfg.allowed_max_length, context_length)
    train_loader, val_loader = create_preference_loaders(
        splits.train,
        splits.val,
        tokenizer,
        batch_size=cfg.batch_size,
        style=cfg.prompt_style,
        allowed_max_length=limit,
        device=device,
        seed=cfg.seed,
    )
    for name, loader in (("training", train_loader), ("validation", val_loader)):
        pairs = loader.dataset.encoded_texts
        lengths = [max(len(pair["chosen"]), len(pair["rejected"])) for pair in pairs]
        report_long_entries(name, lengths, limit, kind="pairs")
    return train_loader, val_loader


@dataclass
class DPOResult:
    """What training reports: the tracking history and the training time."""

    tracking: DPOHistory
    minutes: float


def _first_and_last(values: list[float]) -> tuple[float | None, float | None]:
    return (values[0], values[-1]) if values else (None, None)


def _trained_earlier(cfg: DPOConfig, policy) -> DPOResult | None:
    """The result of an earlier session of this run that finished training (its model is
    loaded into ``policy``), or None."""
    done, model_path = cfg.run_dir / TRAINING_FILE, cfg.run_dir / dpo_model_name(cfg)
    if not (done.is_file() and model_path.is_file()):
        return None
    advice = f"delete it and {model_path.name} to train again with --resume"
    saved = read_json(done, advice)  # (both checked against their checksums first)
    policy.load_state_dict(read_state_dict(model_path))
    policy.eval()
    print(f"DPO training finished in an earlier session of this run; loaded {model_path}")
    return DPOResult(DPOHistory(**saved["tracking"]), saved["minutes"])


def train_dpo(
    cfg: DPOConfig, policy, reference, train_loader, val_loader, tokenizer, *, progress=True
) -> DPOResult:
    """DPO with the course's settings: AdamW (fused) on the policy's parameters only, with
    checkpoints in the run's folder; an interrupted earlier session of the run continues
    from its last checkpoint (a finished one is loaded instead)."""
    earlier = _trained_earlier(cfg, policy)
    if earlier is not None:
        return earlier
    torch.manual_seed(cfg.seed)
    train_loader.generator.manual_seed(cfg.seed)
    optimizer = make_optimizer(policy, lr=cfg.lr, weight_decay=cfg.weight_decay)
    started = time.monotonic()
    tracking = train_model_dpo_simple(
        policy,
        reference,
        train_loader,
        val_loader,
        optimizer,
        num_epochs=cfg.epochs,
        beta=cfg.beta,
        eval_freq=cfg.eval_freq,
        eval_iter=cfg.eval_iter,
        start_context=format_input(val_loader.dataset.data[0], cfg.prompt_style),
        tokenizer=tokenizer,
        reduction=cfg.reduction,
        progress=progress,
        checkpoint_path=cfg.run_dir / CHECKPOINT_FILE,
        checkpoint_every=cfg.checkpoint_every,
        resume=True,
    )
    minutes = (time.monotonic() - started) / 60  # (this session's)
    print(f"DPO training completed in {minutes:.2f} minutes.")
    policy.eval()
    return DPOResult(tracking, minutes)


def dpo_model_name(cfg: DPOConfig) -> str:
    """``gpt2-medium355M-dpo.pth`` for ``gpt2-medium355M-sft.pth``."""
    if cfg.model is None:
        return "gpt-random-init-dpo.pth"
    return Path(cfg.model).stem.removesuffix("-sft") + "-dpo.pth"


def save_dpo(cfg: DPOConfig, policy, result: DPOResult) -> tuple[dict[str, Path], Any]:
    """Save the DPO model, its training history and the plot of it; returns paths and figure."""
    fig = plot_dpo_tracking(result.tracking, title=f"DPO, beta {cfg.beta:g}, lr {cfg.lr:g}")
    paths = {
        "plot": save_figure(fig, cfg.run_dir / "dpo-plot.png"),
        "model": save_model(policy, cfg.run_dir / dpo_model_name(cfg)),
        "training": save_json(asdict(result), cfg.run_dir / TRAINING_FILE, checksum=True),
    }
    for name in (CHECKPOINT_FILE, CHECKPOINT_FILE.replace(".pt", ".prev.pt")):  # (the model
        (cfg.run_dir / name).unlink(missing_ok=True)  # file holds what they held)
        checksum_path(cfg.run_dir / name).unlink(missing_ok=True)
    print(f"DPO model saved as {paths['model']}")
    return paths, fig


def _answers(saved: Any, test: list[dict]) -> bool:
    """Whether ``saved`` (read from a responses file) answers exactly these test entries."""
    keys = ("instruction", "input", "output")
    same = isinstance(saved, list) and len(saved) == len(test)
    return same and all(
        isinstance(s, dict)
        and isinstance(s.get("model_response"), str)
        and all(s.get(k) == t[k] for k in keys)
        for s, t in zip(saved, test, strict=True)
    )


def _saved_responses(cfg: DPOConfig, name: str, file: str, test: list[dict]) -> tuple | None:
    """(responses, where from) saved earlier for these test entries: by an earlier session
    of this run (checked: a damaged file is refused), else for the SFT model by the chapter
    run (if it allowed the same response length; a damaged file is not reused); or None."""
    own = cfg.run_dir / file
    if own.is_file():
        saved = read_json(own, "delete it to generate the responses again with --resume")
        if _answers(saved, test):
            return saved, "an earlier session of this run"
    if name != "sft" or cfg.model is None:
        return None
    if (read_run_config(cfg.model) or {}).get("max_new_tokens") != cfg.max_new_tokens:
        return None
    path = Path(cfg.model).parent / RESPONSES_FILE
    if not path.is_file():
        return None
    try:
        saved = read_json(path, "generating the SFT model's responses again instead")
    except FileCheckError as exc:
        print(f"SFT responses not reused: {exc}")
        return None
    return (saved, str(path.parent)) if _answers(saved, test) else None


def write_both_responses(
    cfg: DPOConfig, reference, policy, test: list[dict], tokenizer, *, progress: bool = True
) -> dict[str, tuple[list[dict], Path]]:
    """The test entries answered by the SFT model and by the DPO model, saved side by side.

    Responses saved by an earlier session of this run, or the chapter run's own for the SFT
    model, are reused (with any judge scores they carry, so the judge is not asked again).
    """
    out = {}
    for name, model, file in (
        ("sft", reference, SFT_RESPONSES_FILE),
        ("dpo", policy, DPO_RESPONSES_FILE),
    ):
        saved = _saved_responses(cfg, name, file, test)
        if saved is not None:
            print(f"{name.upper()} responses: reused those of {saved[1]}")
            responses = saved[0]
        else:
            print(f"Generating the {name.upper()} model's responses to {len(test)} test entries")
            responses = generate_test_responses(cfg, model, test, tokenizer, progress=progress)
        out[name] = (responses, save_json(responses, cfg.run_dir / file, checksum=True))
    return out


def score_both(cfg: DPOConfig, responses: dict, *, progress: bool = True) -> dict[str, dict]:
    """The judge's scores (and the local metrics) of both models' responses, each saved into
    its responses file as they arrive. Also each model's mean response length in words."""
    scores = {}
    for name, (entries, path) in responses.items():
        print(f"--- {name.upper()} model ---")
        scores[name] = score_responses(
            entries, **judge_settings(cfg), save_path=path, progress=progress
        )
        words = [len(entry["model_response"].split()) for entry in entries]
        scores[name]["mean_response_words"] = sum(words) / max(len(words), 1)
    print(comparison_table(scores))
    return scores


def comparison_table(scores: dict[str, dict]) -> str:
    """The SFT and DPO models' numbers side by side, as text."""

    def judge_mean(s: dict) -> str:
        mean = (s["judge"] or {}).get("mean_score")
        return "n/a" if mean is None else f"{mean:.2f}"

    rows = [
        ("judge mean score", judge_mean),
        ("ROUGE-L F1", lambda s: f"{s['local_metrics']['rouge_l_f1']:.3f}"),
        ("exact match", lambda s: f"{s['local_metrics']['exact_match']:.3f}"),
        ("mean response words", lambda s: f"{s['mean_response_words']:.1f}"),
    ]
    lines = [f"{'':22}{'SFT':>10}{'DPO':>10}"]
    lines += [
        f"{label:22}{cell(scores['sft']):>10}{cell(scores['dpo']):>10}" for label, cell in rows
    ]
    return "\n".join(lines)


def write_dpo_summary(
    cfg: DPOConfig,
    device: torch.device,
    model_cfg: dict,
    splits: PreferenceSplits,
    result: DPOResult,
    outputs: dict[str, Path],
    scores: dict[str, dict],
) -> dict:
    """The run's settings and numbers, saved as dpo-summary.json (and returned)."""
    h = result.tracking
    summary = {
        "config": redact_urls(asdict(cfg)),  # (no URL secrets)
        "device": str(device),
        "model": {"sft_model": cfg.model, "config": model_cfg},
        "data": {
            "n_train_pairs": len(splits.train),
            "n_val_pairs": len(splits.val),
            "n_test": len(splits.test),
        },
        "first_and_last": {
            "train_loss": _first_and_last(h.train_losses),
            "val_loss": _first_and_last(h.val_losses),
            "train_reward_margin": _first_and_last(h.train_reward_margins),
            "val_reward_margin": _first_and_last(h.val_reward_margins),
            "train_accuracy": _first_and_last(h.train_accuracies),
            "val_accuracy": _first_and_last(h.val_accuracies),
        },
        "tracking": asdict(h),
        "training_minutes": result.minutes,
        "outputs": {name: str(path) for name, path in outputs.items()},
        "scores": scores,
    }
    path = save_json(summary, cfg.run_dir / "dpo-summary.json")
    print(f"DPO summary saved as {path}")
    return summary


def run_dpo(given: DPOConfig, *, progress: bool = True) -> dict:
    """Every step in order, in the run's own folder (named in ``given.run_name`` too, once it
    is made); returns the summary."""
    import matplotlib.pyplot as plt

    device = check_dpo_settings(given)
    sft, cfg = load_sft(given, device)
    entries = prepare_preferences(cfg, progress=progress)
    splits = split_preferences(cfg, entries)
    tokenizer = prepare_tokenizer(cfg)
    model = sft.model if sft is not None else smoke_model(cfg, device)
    loaders = prepare_preference_loaders(cfg, splits, tokenizer, model.context_length, device)
    start_dpo_run(cfg)  # the first step that writes into the run's folder
    given.run_name = cfg.run_name  # (for the command's resume hint)
    policy, reference = policy_and_reference(model)
    result = train_dpo(cfg, policy, reference, *loaders, tokenizer, progress=progress)
    outputs, fig = save_dpo(cfg, policy, result)
    plt.close(fig)
    responses = write_both_responses(
        cfg, reference, policy, splits.test, tokenizer, progress=progress
    )
    outputs |= {f"{name}_responses": path for name, (_, path) in responses.items()}
    scores = score_both(cfg, responses, progress=progress)
    return write_dpo_summary(cfg, device, model.cfg, splits, result, outputs, scores)


# --------------------------------------------------------------------------------------
# The command line
# --------------------------------------------------------------------------------------


def build_arg_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="dpo_finetuning.py",
        description="Preference-tune the chapter's fine-tuned model with DPO, answer the test "
        "set with both models and score them side by side. Each run writes into a new folder "
        "in --output-dir.",
    )
    p.add_argument("--smoke", action="store_true", help="offline: tiny random GPT, 40 sample pairs")
    p.add_argument(
        "--resume",
        nargs="?",
        const=True,
        metavar="RUN",
        help="continue the latest DPO run in --output-dir (or the run folder RUN) where it "
        "stopped, with its settings",
    )
    add_flags(p, DPOConfig)  # its settings' flags (run_settings.add_flags)
    return p


def config_from_args(args: argparse.Namespace) -> DPOConfig:
    """The DPO configuration of parsed command-line flags (see ``make_dpo_config``)."""
    settings = flag_settings(args, DPOConfig)
    return make_dpo_config(smoke=args.smoke, resume=args.resume, **settings)


def main(argv: Sequence[str] | None = None) -> int:
    """Command line entry point: 0 when done; one ``error:`` line and 2 on an expected
    failure; 130 on Ctrl-C, saying how to resume (what was saved stays; training stops after
    its current step and saves a checkpoint)."""
    import matplotlib

    matplotlib.use("Agg")
    args = build_arg_parser().parse_args(argv)
    cfg = None
    try:
        cfg = config_from_args(args)
        run_dpo(cfg)
    except TrainingInterrupted as exc:
        print(f"error: {exc}. Resume with: {_resume_command(cfg)}", file=sys.stderr)
        return 130
    except (ChapterError, DownloadError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # outside training: whatever was saved stays
        print(f"\ninterrupted. Resume with: {_resume_command(cfg)}", file=sys.stderr)
        return 130
    return 0


def _resume_command(cfg: DPOConfig | None) -> str:
    if cfg is None or cfg.run_name is None:
        return "the same command again (nothing was started; a preference file continues)"
    return f"python main/dpo_finetuning.py --resume {cfg.run_dir}"


if __name__ == "__main__":
    sys.exit(interrupts.run_command(main))
