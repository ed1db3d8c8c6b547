"""A fine-tuned model file: read it, check it, and find the settings it was trained with.

Section 7.7 saves the fine-tuned model as a ``GPTModel`` state dict (``gpt2-medium355M-sft.pth``,
written by ``outputs.save_model``). Everything that uses the model afterwards (the exports, the
terminal chat, the chat page) loads it here:

* the model's config is read from the tensors' shapes (vocabulary, context, width, layers,
  qkv bias); the number of attention heads, which no shape shows, comes from the run's
  ``run-config.json`` beside the file, or from the GPT-2 size of that width (all four GPT-2
  sizes use 64-dimensional heads);
* the prompt style (``alpaca`` or ``phi3``) comes from that ``run-config.json`` too, unless given;
* a file that is not a ``GPTModel`` state dict, or whose shapes do not match the size it is
  said to be, is refused with one line naming the file and the first tensor that is wrong;
  so is one whose bytes differ from the checksum its run saved beside it (``NAME.sha256``).

LoRA: a run with LoRA adapters saves its ``*-sft.pth`` already merged (``lora.save_merged_model``),
so it loads like any other. The adapter file itself (``*-lora-adapter.pth``), or the state dict
of a model that still has its adapters, is refused with that advice.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from course.instruction_data import PromptStyle, get_prompt_style
from previous_chapters import MODEL_CONFIGS, GPTModel, gpt2_config
from runtime.errors import ModelFileError  # noqa: F401 (re-exported)
from runtime.outputs import load_failure, read_json, verify_file
from runtime.run_config import RUN_CONFIG_FILE
from runtime.run_folders import latest_run, run_folders

MODEL_FILE_GLOB = "*-sft.pth"
MAKE_ONE = (
    "fine-tune one with `python main/instruction_finetuning.py` "
    "(or `--smoke` for a tiny one in seconds)"
)


@dataclass
class LoadedModel:
    """A fine-tuned model in eval mode, its config, its prompt style and where it came from."""

    model: GPTModel
    config: dict
    prompt_style: PromptStyle
    path: Path

    @property
    def name(self) -> str:
        """The file's name without ``.pth``, e.g. ``gpt2-medium355M-sft``."""
        return self.path.stem


def find_model_file(output_dir: str | os.PathLike = "outputs") -> Path:
    """The fine-tuned model of the latest run in ``output_dir`` (``outputs/latest/*-sft.pth``).

    When the latest run has none (it failed, or has not finished), the newest run that has
    one is taken instead. Either way a line on stderr says which run's model it is.
    """
    out = Path(output_dir)
    latest = latest_run(out)
    if latest is None or not latest.is_dir():
        return model_in_folder(out / "latest")  # (its error says what to do)
    try:
        found = model_in_folder(latest)
    except ModelFileError as exc:
        for run in run_folders(out):
            if run.resolve() != latest.resolve() and len(list(run.glob(MODEL_FILE_GLOB))) == 1:
                found = model_in_folder(run)
                print(
                    f"The latest run, {latest.name}, holds no model file; using the newest "
                    f"run that does: {found}",
                    file=sys.stderr,
                )
                return found
        raise exc from None
    print(f"Using the latest run's model: {found}", file=sys.stderr)
    return found


def model_in_folder(folder: str | os.PathLike) -> Path:
    """The one ``*-sft.pth`` in a run folder; none, or several, is an error that says what to do."""
    folder = Path(folder)
    found = sorted(folder.glob(MODEL_FILE_GLOB)) if folder.is_dir() else []
    if not found:
        raise ModelFileError(
            f"no model file found: {folder}/ holds no {MODEL_FILE_GLOB}; pass --model FILE, or "
            + MAKE_ONE
        )
    if len(found) > 1:
        raise ModelFileError(
            f"{folder}/ holds {len(found)} {MODEL_FILE_GLOB} files: pass the model file itself "
            "with --model"
        )
    return found[0]


def read_run_config(model_path: str | os.PathLike) -> dict | None:
    """The ``run-config.json`` saved beside the model file by its run, or None."""
    path = Path(model_path).parent / RUN_CONFIG_FILE
    if not path.exists():
        return None
    saved = read_json(path, "fix or delete it")
    if not isinstance(saved, dict):
        raise ModelFileError(f"{path} does not hold a run's settings (a JSON object); delete it")
    return saved


def read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The tensors of a ``.pth`` state dict file, read safely (``weights_only=True``)."""
    path = Path(path)
    if not path.is_file():
        raise ModelFileError(
            f"no model file at {path}; pass the .pth file a run saved, or {MAKE_ONE}"
        )
    verify_file(path, "fine-tune it again (`--resume` of its run, after deleting the file)")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # pickle errors, truncated zip files, unsafe content...
        reason = load_failure(exc)
        raise ModelFileError(
            f"{path} is not a PyTorch state dict file ({reason}); pass the *-sft.pth file a run saved"
        ) from None
    if isinstance(state, dict) and "model" in state and isinstance(state["model"], dict):
        raise ModelFileError(
            f"{path} is a training checkpoint, not a model file; pass the *-sft.pth file that the "
            "run saves when training ends (or finish the run with --resume)"
        )
    if isinstance(state, dict) and "lora" in str(state.get("format", "")):
        raise ModelFileError(
            f"{path} is a LoRA adapter file, not a model; pass the *-sft.pth file beside it, "
            "which holds the model with the adapters merged in"
        )
    if not isinstance(state, dict) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()
    ):
        raise ModelFileError(
            f"{path} does not hold a state dict (names -> tensors); pass the *-sft.pth file a run saved"
        )
    adapters = sorted(k for k in state if "lora" in k.lower())
    if adapters:
        raise ModelFileError(
            f"{path} holds a model with LoRA adapters ({adapters[0]}, ...): save it merged with "
            "lora.save_merged_model(model, path) (a LoRA run saves its *-sft.pth merged already)"
        )
    return state


def _count_layers(state: dict[str, torch.Tensor]) -> int:
    n = 0
    while f"trf_blocks.{n}.norm1.weight" in state:
        n += 1
    return n


def _run_model_config(run_config: dict, path: Path) -> dict:
    """The model config a run's settings describe (as ``run_config.model_config`` builds it)."""
    try:
        return gpt2_config(
            run_config.get("model_size") or "gpt2-small (124M)",
            **(run_config.get("model_overrides") or {}),
        )
    except (ValueError, TypeError) as exc:
        raise ModelFileError(f"{path.parent / RUN_CONFIG_FILE}: {exc}") from None


def _heads_for_width(emb_dim: int, run_config: dict | None, path: Path) -> int:
    """The number of attention heads: from the run's settings, else from GPT-2's size table."""
    if run_config is not None:
        return _run_model_config(run_config, path)["n_heads"]
    for shape in MODEL_CONFIGS.values():
        if shape["emb_dim"] == emb_dim:
            return shape["n_heads"]
    raise ModelFileError(
        f"{path}: a model {emb_dim} wide is no GPT-2 size, so its number of attention heads is "
        f"unknown; keep the run's {RUN_CONFIG_FILE} beside the file or pass --n-heads"
    )


def config_from_state_dict(
    state: dict[str, torch.Tensor],
    path: str | os.PathLike = "model file",
    *,
    n_heads: int | None = None,
    run_config: dict | None = None,
) -> dict[str, Any]:
    """The ``GPTModel`` config of a state dict, read from its shapes (see the module doc)."""
    path = Path(path)
    needed = ("tok_emb.weight", "pos_emb.weight", "out_head.weight", "trf_blocks.0.norm1.weight")
    missing = [k for k in needed if k not in state]
    if missing:
        raise ModelFileError(
            f"{path} is not a GPTModel state dict: it has no {missing[0]} "
            f"(its first tensors: {', '.join(list(state)[:3]) or 'none'})"
        )
    vocab_size, emb_dim = state["tok_emb.weight"].shape
    cfg = {
        "vocab_size": int(vocab_size),
        "context_length": int(state["pos_emb.weight"].shape[0]),
        "emb_dim": int(emb_dim),
        "n_heads": n_heads or _heads_for_width(int(emb_dim), run_config, path),
        "n_layers": _count_layers(state),
        "drop_rate": 0.0,
        "qkv_bias": "trf_blocks.0.att.qkv.bias" in state,
    }
    if cfg["emb_dim"] % cfg["n_heads"]:
        raise ModelFileError(
            f"{path}: emb_dim {cfg['emb_dim']} is not divisible by n_heads {cfg['n_heads']}"
        )
    return cfg


def check_shapes(state: dict[str, torch.Tensor], cfg: dict, path: str | os.PathLike) -> None:
    """Refuse a state dict whose tensors are not exactly those of ``GPTModel(cfg)``."""
    with torch.device("meta"):  # shapes only: nothing is allocated
        expected = {k: tuple(v.shape) for k, v in GPTModel(cfg).state_dict().items()}
    for name, shape in expected.items():
        if name not in state:
            raise ModelFileError(f"{path} is not a GPTModel state dict: it lacks {name}")
        if tuple(state[name].shape) != shape:
            raise ModelFileError(
                f"{path}: layer {name} has shape {tuple(state[name].shape)}, but a model of "
                f"emb_dim {cfg['emb_dim']}, {cfg['n_layers']} layers and vocabulary "
                f"{cfg['vocab_size']} needs {shape}; the file holds another size"
            )
    extra = [k for k in state if k not in expected]
    if extra:
        raise ModelFileError(f"{path} is not a plain GPTModel state dict: unexpected {extra[0]}")


def _check_size(cfg: dict, expected: dict, path: Path, said_by: str) -> None:
    """Refuse a model whose shapes differ from the size ``said_by`` names."""
    keys = ("vocab_size", "context_length", "emb_dim", "n_layers")
    wrong = [k for k in keys if expected[k] != cfg[k]]
    if wrong:
        found = ", ".join(f"{k} {cfg[k]}" for k in wrong)
        wanted = ", ".join(f"{k} {expected[k]}" for k in wrong)
        raise ModelFileError(
            f"size mismatch: {path} holds a model with {found}, but {said_by} says {wanted}"
        )


def resolve_prompt_style(given: str | None, run_config: dict | None) -> PromptStyle:
    """The prompt style: the one given, else the run's, else the course's Alpaca style."""
    return get_prompt_style(given or (run_config or {}).get("prompt_style") or "alpaca")


def load_model_file(
    path: str | os.PathLike,
    *,
    model_size: str | None = None,
    prompt_style: str | None = None,
    n_heads: int | None = None,
    device: str | torch.device = "cpu",
) -> LoadedModel:
    """Read, check and load a fine-tuned model file into a ``GPTModel`` in eval mode.

    ``model_size`` (e.g. "355M"), when given, must match the file; so must the run's
    ``run-config.json`` when it sits beside the file. ``prompt_style``/``n_heads`` override
    what the run's settings say. Raises ``ModelFileError`` with one line saying what is wrong
    (``ConfigError`` for a prompt style that does not exist).
    """
    path = Path(path)
    state = read_state_dict(path)
    run_config = read_run_config(path)
    style = resolve_prompt_style(prompt_style, run_config)
    cfg = config_from_state_dict(state, path, n_heads=n_heads, run_config=run_config)
    if model_size is not None:
        try:
            expected = gpt2_config(model_size)
        except ValueError as exc:
            raise ModelFileError(str(exc)) from None
        _check_size(cfg, expected, path, f"--model-size {model_size}")
    if run_config is not None:
        expected = _run_model_config(run_config, path)
        _check_size(cfg, expected, path, f"the run's {RUN_CONFIG_FILE} beside it")
    check_shapes(state, cfg, path)
    with torch.device("meta"):  # no random initialisation, no second copy of the weights
        model = GPTModel(cfg)
    model.load_state_dict(state, assign=True)
    return LoadedModel(model.to(device).eval(), cfg, style, path)


__all__ = [
    "LoadedModel",
    "ModelFileError",
    "check_shapes",
    "config_from_state_dict",
    "find_model_file",
    "load_model_file",
    "read_run_config",
    "read_state_dict",
    "resolve_prompt_style",
]
