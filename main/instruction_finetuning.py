"""Chapter 7 end to end: the steps of a run, shared by the command line and the notebook.

    check_settings -> prepare_data (7.2) -> prepare_tokenizer, prepare_loaders (7.3-7.4)
    -> prepare_model (7.5) -> start_run, train, save_training (7.6) -> write_responses (7.7)
    -> evaluate (7.8) -> write_summary

``run`` calls them in this order; ``main/main.ipynb`` calls the same functions in the same
order, with explanations and figures in between, so both give the same numbers. Every run
writes into a folder of its own (see ``run_config``). Each step finds what an interrupted
earlier session of the same run left there and continues from it, so ``--resume`` picks up a
run wherever it stopped: in training (from the last checkpoint), after training, while
generating, or while the judge was scoring.

    python main/instruction_finetuning.py            # the chapter (downloads data and GPT-2 355M)
    python main/instruction_finetuning.py --smoke    # offline: tiny random GPT, bundled sample data
    python main/instruction_finetuning.py --resume   # continue the latest run
    python main/instruction_finetuning.py --exercise lora   # exercise 7.4 (also phi3_prompt,
                                         # mask_instructions, alpaca_52k: 7.1-7.3)
"""

from __future__ import annotations

import sys
from pathlib import Path

from runtime import interrupts

interrupts.guard_startup(__name__)  # before the slow imports: Ctrl-C there is one line too

import argparse
from collections.abc import Sequence
from dataclasses import asdict
from typing import Any

import torch

import gpt_download
from course.exercises import VARIANTS, variant_settings
from course.finetuning import (
    TrainingResult,
    build_model,
    finetune,
    generate_test_responses,
    plot_training,
)
from course.instruction_data import (
    DATA_URL,
    SAMPLE_DATA_PATH,
    SMOKE_HINT,
    ChapterError,
    ConfigError,
)
from course.lora import (
    adapter_file_name,
    apply_lora,
    load_lora_adapter,
    save_lora_adapter,
    save_merged_model,
)
from ollama_evaluate import judge_settings, score_responses
from runtime.distributed import (
    SINGLE_PROCESS,
    Ranks,
    broadcast,
    main_process_first,
    process_group,
    quiet_unless_main,
    rank_device,
    ranks_from_env,
)
from runtime.interrupts import INTERRUPTED
from runtime.interrupts import describe as describe_stop
from runtime.judge_host import redact_urls
from runtime.model_file import read_state_dict
from runtime.outputs import (
    OutputError,
    checksum_path,
    read_json,
    save_figure,
    save_json,
    save_model,
)
from runtime.run_config import (
    CHECKPOINT_FILE,
    RESPONSES_FILE,
    SMOKE_MODEL_OVERRIDES,
    TRAINING_RESULT_FILE,
    RunConfig,
    allowed_max_length,
    check_settings,
    describe,
    make_config,
    model_config,
    start_run,
)
from runtime.run_data import Splits, prepare_data, prepare_loaders, prepare_tokenizer
from runtime.run_folders import latest_run, release_run
from runtime.run_settings import add_flags, flag_settings
from runtime.trainer import NonFiniteLossError, TrainingInterrupted

__all__ = [  # the settings and the data steps, re-exported for the notebook and the command line
    "Splits",
    "prepare_data",
    "prepare_loaders",
    "prepare_tokenizer",
    "DATA_URL",
    "SAMPLE_DATA_PATH",
    "SMOKE_MODEL_OVERRIDES",
    "ConfigError",
    "RunConfig",
    "allowed_max_length",
    "check_settings",
    "describe",
    "latest_run",
    "make_config",
    "model_config",
    "start_run",
]


# --------------------------------------------------------------------------------------
# The steps of a run
# --------------------------------------------------------------------------------------


def prepare_model(cfg: RunConfig, device: torch.device) -> tuple[torch.nn.Module, dict]:
    """7.5: GPT-2 with OpenAI's weights, or (smoke) a tiny random GPT; and its config.

    With ``cfg.lora_rank`` (exercise 7.4) the weights are frozen and LoRA adapters added.
    """
    size = cfg.model_size if cfg.pretrained else model_config(cfg)
    overrides = cfg.model_overrides if cfg.pretrained else None
    model, model_cfg = build_model(
        size,
        pretrained=cfg.pretrained,
        models_dir=cfg.models_dir,
        overrides=overrides,
        device=device,
        seed=cfg.seed,
    )
    if cfg.lora_rank is not None:
        torch.manual_seed(cfg.seed)  # the adapters' random A matrices
        apply_lora(model, cfg.lora_rank, cfg.lora_alpha)
    return model, model_cfg


def train(
    cfg: RunConfig,
    model,
    train_loader,
    val_loader,
    tokenizer,
    device,
    *,
    progress: bool = True,
    ranks: Ranks = SINGLE_PROCESS,
) -> TrainingResult | None:
    """7.6: fine-tune with the chapter's settings, with checkpoints in the run's folder.

    When an earlier session of this run finished training, its model is loaded instead
    (under torchrun: by rank 0; the other ranks return None); when it was interrupted,
    training continues from its last checkpoint.
    """
    run_dir = cfg.run_dir
    done, model_path = run_dir / TRAINING_RESULT_FILE, run_dir / cfg.model_file_name()
    if broadcast(done.is_file() and model_path.is_file(), ranks):
        if not ranks.is_main:
            return None
        if cfg.lora_rank is None:
            model.load_state_dict(read_state_dict(model_path))
        else:  # the model file holds merged weights; the adapter fits the LoRA model
            load_lora_adapter(model, run_dir / adapter_file_name(cfg.model_file_name()))
        model.eval()
        print(f"Training finished in an earlier session of this run; loaded {model_path}")
        saved = read_json(done, f"delete it and {model_path.name} to train again with --resume")
        return TrainingResult(**saved)
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
        checkpoint_path=run_dir / CHECKPOINT_FILE,
        checkpoint_every=cfg.checkpoint_every,
        resume=True,
        grad_accum=cfg.grad_accum,
        ranks=ranks,
        precision=cfg.precision,
    )


def save_training(cfg: RunConfig, model, result: TrainingResult) -> tuple[dict[str, Path], Any]:
    """7.6: save the loss plot and the model; returns their paths and the plot's figure.

    A LoRA run saves its model merged (a plain ``GPTModel`` state dict, under the usual
    name, so that everything downstream works unchanged) and its adapter alone next to it.
    The training checkpoint (model and optimizer) is deleted once the model and the losses
    are saved: the run does not need it any more.
    """
    run_dir = cfg.run_dir
    fig = plot_training(result)
    paths = {"loss_plot": save_figure(fig, run_dir / "loss-plot.png")}
    if cfg.lora_rank is None:
        paths["model"] = save_model(model, run_dir / cfg.model_file_name())
    else:
        paths["model"] = save_merged_model(model, run_dir / cfg.model_file_name())
        adapter = run_dir / adapter_file_name(cfg.model_file_name())
        paths["lora_adapter"] = save_lora_adapter(model, adapter)
        print(f"LoRA adapter saved as {adapter}")
    save_json(asdict(result), run_dir / TRAINING_RESULT_FILE, checksum=True)
    for name in (CHECKPOINT_FILE, CHECKPOINT_FILE.replace(".pt", ".prev.pt")):
        (run_dir / name).unlink(missing_ok=True)
        checksum_path(run_dir / name).unlink(missing_ok=True)
    print(f"Model saved as {paths['model']}")
    return paths, fig


def write_responses(
    cfg: RunConfig, model, test_data: list[dict], tokenizer, *, progress: bool = True
) -> tuple[list[dict], Path]:
    """7.7: answer every test instruction and save the entries with their responses.

    A responses file that an earlier session of this run completed is reused.
    """
    path = cfg.run_dir / RESPONSES_FILE
    if path.is_file():
        saved = read_json(path, "delete it to generate the responses again with --resume")
        if (
            isinstance(saved, list)
            and len(saved) == len(test_data)
            and all(isinstance(e, dict) and "model_response" in e for e in saved)
        ):
            print(f"Responses of an earlier session of this run: {path}")
            return saved, path
    responses = generate_test_responses(
        cfg, model, test_data, tokenizer, progress=progress, precision=cfg.precision
    )
    save_json(responses, path, checksum=True)
    print(f"Responses saved as {path}")
    return responses, path


def evaluate(cfg: RunConfig, responses: list[dict], *, progress: bool = True) -> dict:
    """7.8: the judge's scores when a judge is reachable; local reference metrics always.

    Each score is saved into the responses file as it arrives; entries an earlier session
    scored are not asked again.
    """
    return score_responses(
        responses, **judge_settings(cfg), save_path=cfg.run_dir / RESPONSES_FILE, progress=progress
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
        "config": redact_urls(asdict(cfg)),  # (no URL secrets)
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
    path = save_json(summary, cfg.run_dir / "run-summary.json")
    print(f"Run summary saved as {path}")
    return summary


def run(cfg: RunConfig, *, progress: bool = True) -> dict | None:
    """Every step of the chapter in order, in the run's own folder; returns the summary.

    Under torchrun every process trains its share (see ``distributed``); then rank 0 alone
    saves, answers the test set and asks the judge, and the other ranks return None.
    """
    import matplotlib.pyplot as plt

    ranks = ranks_from_env()
    device = rank_device(check_settings(cfg), ranks)
    with process_group(ranks, device):
        with main_process_first(ranks):  # (a download: once per machine)
            splits = prepare_data(cfg)
            tokenizer = prepare_tokenizer(cfg)
        train_loader, val_loader, _ = prepare_loaders(cfg, splits, tokenizer, device, ranks)
        with main_process_first(ranks):
            model, model_cfg = prepare_model(cfg, device)
        if ranks.is_main:
            start_run(cfg)  # the first step that writes into the run's folder
        cfg.run_name = broadcast(cfg.run_name, ranks)
        result = train(
            cfg, model, train_loader, val_loader, tokenizer, device, progress=progress, ranks=ranks
        )
    if not ranks.is_main:
        return None
    outputs, fig = save_training(cfg, model, result)
    plt.close(fig)
    responses, outputs["responses"] = write_responses(
        cfg, model, splits.test, tokenizer, progress=progress
    )
    scores = evaluate(cfg, responses, progress=progress)
    summary = write_summary(cfg, device, splits, model_cfg, result, outputs, scores)
    release_run(cfg.run_dir)  # (the run is complete: another process may read or resume it)
    return summary


# --------------------------------------------------------------------------------------
# The command line
# --------------------------------------------------------------------------------------


def build_arg_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="instruction_finetuning.py",
        description="Chapter 7: instruction fine-tune GPT-2, answer the test set, score it. "
        "Each run writes into a new folder in --output-dir; --resume continues one.",
    )
    p.add_argument(
        "--smoke",
        action="store_true",
        help="offline preset: a tiny random GPT on the bundled 40-entry sample data "
        "(about 10 s on 2 CPU cores)",
    )
    p.add_argument(
        "--resume",
        nargs="?",
        const="latest",
        metavar="RUN_DIR",
        help="continue an interrupted run: the latest in --output-dir, or the folder given",
    )
    add_flags(p, RunConfig)  # every setting's flag, as run_settings.SETTINGS defines it
    p.add_argument(
        "--exercise",
        choices=list(VARIANTS),
        help="run a variant of the chapter's exercises with its settings (flags given override "
        "them): phi3_prompt 7.1, mask_instructions 7.2, alpaca_52k 7.3, lora 7.4",
    )
    p.add_argument(
        "--verbose", action="store_true", help="on a failed download, also print every error"
    )
    return p


def config_from_args(args: argparse.Namespace) -> RunConfig:
    """The run configuration of parsed command-line flags (see ``make_config``)."""
    settings = flag_settings(args, RunConfig)
    if args.exercise:  # the variant's settings, under the flags given
        output_dir = args.output_dir or RunConfig.output_dir
        variant = variant_settings(args.exercise, smoke=args.smoke, output_dir=output_dir)
        settings = {**variant, **{k: v for k, v in settings.items() if v is not None}}
    return make_config(smoke=args.smoke, resume=args.resume, **settings)


def main(argv: Sequence[str] | None = None) -> int:
    """Command line entry point; returns the exit status.

    Expected failures (a setting, the data, a download, a non-finite loss) print one
    ``error:`` line and exit with 2; an interrupt exits with 130 and says how to resume.
    """
    import matplotlib

    matplotlib.use("Agg")
    args = build_arg_parser().parse_args(argv)
    cfg, ranks = None, SINGLE_PROCESS
    try:
        ranks = ranks_from_env()  # (first: under torchrun each error line says its rank)
        cfg = config_from_args(args)
        with quiet_unless_main(ranks):
            run(cfg)
    except TrainingInterrupted as exc:
        if ranks.is_main:  # (all ranks stopped together; rank 0 speaks for them)
            print(f"error: {exc}. Resume with: {_resume_command(cfg, ranks)}", file=sys.stderr)
        return 130
    except NonFiniteLossError as exc:
        if ranks.is_main:
            print(f"error: {exc}", file=sys.stderr)
        return 2
    except (ChapterError, OSError) as exc:  # expected failures: one clear line, no traceback
        resume = f"; then resume with: {_resume_command(cfg, ranks)}"
        hint = resume if isinstance(exc, OutputError) and cfg and cfg.run_name else ""
        print(
            f"{'' if ranks.is_main else f'[rank {ranks.rank}] '}error: {exc}{hint}", file=sys.stderr
        )
        return 2
    except (gpt_download.DownloadError, gpt_download.CheckpointError) as exc:
        offline = SMOKE_HINT in str(exc) or isinstance(exc, gpt_download.DiskError)
        hint = "" if offline else f" {SMOKE_HINT}"  # (on the line that says what to do)
        details = getattr(exc, "details", "") if args.verbose else ""
        print(f"error: {exc}{hint}" + (f"\n{details}" if details else ""), file=sys.stderr)
        return 2
    except KeyboardInterrupt as exc:  # outside training: what was saved stays; resume finishes
        print(
            f"\n{describe_stop(exc)}. Resume with: {_resume_command(cfg, ranks)}", file=sys.stderr
        )
        return INTERRUPTED
    return 0


def _resume_command(cfg: RunConfig | None, ranks: Ranks) -> str:
    if cfg is None or cfg.run_name is None:
        return "the same command again (nothing was started)"
    if ranks.distributed:
        return f"the same torchrun command with --resume {cfg.run_dir} (and as many processes)"
    return f"python main/instruction_finetuning.py --resume {cfg.run_dir}"


if __name__ == "__main__":
    sys.exit(interrupts.run_command(main))
