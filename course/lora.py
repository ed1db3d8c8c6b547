"""Exercise 7.4: parameter-efficient fine-tuning with LoRA, as appendix E of the book builds it.

    replace_linear_with_lora (every nn.Linear -> LinearWithLoRA) -> apply_lora (freeze the
    base, add the adapters, print the counts) -> train as usual -> merge_lora / save_lora_adapter

LoRA (low-rank adaptation) leaves a pretrained weight W [out, in] frozen and learns a small
update instead: a layer computes ``x W^T + b + (alpha / rank) * x A B`` with A [in, rank] and
B [rank, out]. B starts at zero, so the wrapped model starts out exactly as the base model.
At rank 16, gpt2-medium trains 7.9 million parameters instead of 406 million.

Two things differ from the book's appendix E:

- **The scale is alpha / rank**, as the course's later code and LoRA libraries have it; the
  book's printed appendix multiplies by alpha alone, so at the course's rank 16 and alpha 16
  its update is 16 times ours. ``alpha = 16 * rank`` (256 at rank 16) gives the book's scale,
  which the course's exercise-7.4 run (score 50.23, made with torch 2.3) most likely used.
- **Our attention has one fused ``qkv`` layer** where the course has three (W_query, W_key,
  W_value). One adapter on the fused layer would have rank * (in + 3 * out) parameters, fewer
  than the course's three, so ``QKVWithLoRA`` gives each third of the fused output its own
  ``LoRALayer``: exactly the course's three adapters, and the course's parameter counts.

A is initialised as the book does: ``kaiming_uniform_(A, a=sqrt(5))``, the call nn.Linear
makes for its weight. PyTorch takes the fan-in of a 2-D tensor from its second dimension,
here the rank, so A ~ U(-1/sqrt(rank), 1/sqrt(rank)); an nn.Linear(in, rank) would draw from
U(-1/sqrt(in), 1/sqrt(in)). We keep the book's values, so that its runs can be reproduced.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from pathlib import Path

import torch
import torch.nn as nn

from runtime.errors import LoRAError  # noqa: F401 (re-exported)
from runtime.outputs import load_failure, verify_file, write_atomically

ADAPTER_FORMAT = "lora-adapter-v1"


def check_lora_settings(rank: object, alpha: object) -> None:
    """Refuse a rank that is not a whole number >= 1 or an alpha that is not a number > 0."""
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise LoRAError(f"LoRA rank {rank!r} is out of range: it must be a whole number >= 1")
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)):
        raise LoRAError(f"LoRA alpha {alpha!r} must be a number above 0, such as 16")
    if not (math.isfinite(alpha) and alpha > 0):
        raise LoRAError(f"LoRA alpha {alpha!r} is out of range: it must be a number above 0")


# --------------------------------------------------------------------------------------
# The layers
# --------------------------------------------------------------------------------------


class LoRALayer(nn.Module):
    """The low-rank update (alpha / rank) * x A B, with A [in_dim, rank] and B [rank, out_dim]."""

    def __init__(
        self,
        in_dim: int,
        out_dim: int,
        rank: int,
        alpha: float,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        check_lora_settings(rank, alpha)
        self.rank, self.alpha = rank, alpha
        self.A = nn.Parameter(torch.empty(in_dim, rank, device=device, dtype=dtype))
        nn.init.kaiming_uniform_(self.A, a=math.sqrt(5))  # the book's call (see the docstring)
        self.B = nn.Parameter(torch.zeros(rank, out_dim, device=device, dtype=dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # (alpha / rank) * x A B, scaled while it has `rank` columns: for the output head that
        # saves a pass over a [tokens, 50257] tensor, forward and backward
        return ((x @ self.A) * (self.alpha / self.rank)) @ self.B

    def delta_weight(self) -> torch.Tensor:
        """The update as a weight in nn.Linear's layout [out_dim, in_dim]."""
        return (self.alpha / self.rank) * (self.A @ self.B).T


def _adapter(linear: nn.Linear, out_dim: int, rank: int, alpha: float) -> LoRALayer:
    """A LoRALayer for (part of) ``linear``, on its device and in its dtype."""
    w = linear.weight
    return LoRALayer(linear.in_features, out_dim, rank, alpha, device=w.device, dtype=w.dtype)


class WrapsLinear(nn.Module):
    """A layer around a linear layer ``self.linear``: its ``weight`` and ``bias`` are the base
    layer's, for code that asks a linear layer for its shape, device or dtype (the engine asks
    out_head); computing with them would leave the update out."""

    @property
    def weight(self) -> torch.Tensor:
        return self.linear.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.linear.bias


class LinearWithLoRA(WrapsLinear):
    """A linear layer plus a LoRA update: linear(x) + lora(x)."""

    def __init__(self, linear: nn.Linear, rank: int, alpha: float) -> None:
        super().__init__()
        self.linear = linear
        self.lora = _adapter(linear, linear.out_features, rank, alpha)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x) + self.lora(x)

    def delta_weight(self) -> torch.Tensor:
        return self.lora.delta_weight()


class QKVWithLoRA(WrapsLinear):
    """The fused query/key/value layer with the course's three adapters, one per third of its
    output: [q | k | v] + [lora_query(x) | lora_key(x) | lora_value(x)]."""

    def __init__(self, linear: nn.Linear, rank: int, alpha: float) -> None:
        super().__init__()
        if linear.out_features % 3:
            raise LoRAError(f"a fused qkv layer needs 3 equal parts, got {linear.out_features}")
        part = linear.out_features // 3
        self.linear = linear
        self.lora_query = _adapter(linear, part, rank, alpha)
        self.lora_key = _adapter(linear, part, rank, alpha)
        self.lora_value = _adapter(linear, part, rank, alpha)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        update = torch.cat([self.lora_query(x), self.lora_key(x), self.lora_value(x)], dim=-1)
        return self.linear(x) + update

    def delta_weight(self) -> torch.Tensor:
        parts = (self.lora_query, self.lora_key, self.lora_value)
        return torch.cat([lora.delta_weight() for lora in parts], dim=0)


WRAPPERS = (LinearWithLoRA, QKVWithLoRA)


def replace_linear_with_lora(model: nn.Module, rank: int, alpha: float) -> None:
    """Wrap every ``nn.Linear`` of ``model`` (the output head too) in place, as the course does.

    A layer named ``qkv`` (our fused attention projection) gets one adapter per third.
    The new A and B are trainable; freezing the rest is ``apply_lora``'s job, as in the course.
    """
    check_lora_settings(rank, alpha)
    for name, child in model.named_children():
        if isinstance(child, nn.Linear):
            wrapper = QKVWithLoRA if name == "qkv" else LinearWithLoRA
            setattr(model, name, wrapper(child, rank, alpha))
        elif not isinstance(child, WRAPPERS):
            replace_linear_with_lora(child, rank, alpha)


def lora_layers(model: nn.Module) -> dict[str, nn.Module]:
    """The wrapped layers of ``model`` by name, e.g. ``{"trf_blocks.0.att.qkv": ...}``."""
    return {name: m for name, m in model.named_modules() if isinstance(m, WRAPPERS)}


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts."""
    params = list(model.parameters())
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)


def apply_lora(
    model: nn.Module, rank: int = 16, alpha: float = 16.0, *, quiet: bool = False
) -> tuple[int, int]:
    """Freeze ``model`` and add LoRA adapters to its linear layers; prints and returns
    ``(trainable, total)`` parameter counts afterwards."""
    check_lora_settings(rank, alpha)
    if lora_layers(model):
        raise LoRAError("the model has LoRA layers already; apply_lora adds them only once")
    base = count_parameters(model)[1]
    for param in model.parameters():
        param.requires_grad = False
    replace_linear_with_lora(model, rank, alpha)
    trainable, total = count_parameters(model)
    if not quiet:
        print(
            f"LoRA rank {rank}, alpha {alpha:g}: {trainable:,} trainable parameters of "
            f"{total:,} ({trainable / total:.2%}); the base model's {base:,} are frozen"
        )
    return trainable, total


# --------------------------------------------------------------------------------------
# Saving: merged into a plain GPTModel, or the adapter alone
# --------------------------------------------------------------------------------------


def _parts(key: str) -> tuple[str, str, str]:
    """A state-dict key inside a wrapped layer, split: "trf_blocks.0.att.qkv.lora_key.A" ->
    ("trf_blocks.0.att.qkv", "lora_key", "A"); ("out_head", "linear", "weight")."""
    owner, _, leaf = key.rpartition(".")
    layer, _, part = owner.rpartition(".")
    return layer, part, leaf


@torch.no_grad()
def merge_lora(model: nn.Module) -> dict[str, torch.Tensor]:
    """The state dict of a plain ``GPTModel`` whose weights include the LoRA updates.

    Each wrapped layer's weight becomes W + delta (its bias stays), and the adapters go:
    ``GPTModel(cfg).load_state_dict(merge_lora(model))`` gives a model with the same logits,
    which everything downstream (responses, judge, export) uses as it is.
    """
    wrapped = lora_layers(model)
    merged = {}
    for key, value in model.state_dict().items():
        layer, part, leaf = _parts(key)
        if layer not in wrapped:
            merged[key] = value
        elif part == "linear":  # the base layer's weight or bias; the adapters' A and B go
            delta = wrapped[layer].delta_weight() if leaf == "weight" else 0
            merged[f"{layer}.{leaf}"] = value + delta
    return merged


def save_merged_model(model: nn.Module, path: str | os.PathLike) -> Path:
    """Save ``merge_lora(model)`` atomically; ``torch.load(path, weights_only=True)`` reads it."""
    state = merge_lora(model)
    return write_atomically(path, lambda tmp: torch.save(state, tmp), checksum=True)


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapters' tensors only (every A and B), by their names in ``model``."""
    wrapped, adapters = lora_layers(model), {}
    for key, value in model.state_dict().items():
        layer, part, _ = _parts(key)
        if layer in wrapped and part != "linear":
            adapters[key] = value
    return adapters


def _lora_settings_of(model: nn.Module) -> tuple[int, float]:
    """The rank and alpha of a model's adapters (the first layer's; all share them)."""
    layer = next(iter(lora_layers(model).values()))
    lora = layer.lora if isinstance(layer, LinearWithLoRA) else layer.lora_query
    return lora.rank, lora.alpha


def save_lora_adapter(model: nn.Module, path: str | os.PathLike) -> Path:
    """Save the adapters alone (a small file), with their rank and alpha, atomically."""
    if not lora_layers(model):
        raise LoRAError("the model has no LoRA layers to save; call apply_lora first")
    rank, alpha = _lora_settings_of(model)
    adapter = {
        "format": ADAPTER_FORMAT,
        "rank": rank,
        "alpha": float(alpha),
        "tensors": {k: v.detach().cpu() for k, v in lora_state_dict(model).items()},
    }
    return write_atomically(path, lambda tmp: torch.save(adapter, tmp), checksum=True)


def read_lora_adapter(path: str | os.PathLike) -> dict:
    """An adapter file's contents, checked to be one."""
    verify_file(path, "train the adapter again, or use the merged *-sft.pth file beside it")
    try:
        adapter = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # pickle errors, a truncated zip, unsafe content, ...
        raise LoRAError(
            f"{path} is not a readable LoRA adapter file ({load_failure(exc)})"
        ) from None
    if not isinstance(adapter, Mapping) or adapter.get("format") != ADAPTER_FORMAT:
        raise LoRAError(
            f"{path} is not a LoRA adapter file (expected format {ADAPTER_FORMAT!r}); "
            "pass the *-lora-adapter.pth file a LoRA run saved"
        )
    rank, alpha, tensors = adapter.get("rank"), adapter.get("alpha"), adapter.get("tensors")
    well_formed = (
        type(rank) is int
        and rank >= 1
        and isinstance(alpha, (int, float))
        and math.isfinite(alpha)
        and alpha > 0
        and isinstance(tensors, Mapping)
        and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in tensors.items())
    )
    if not well_formed:
        raise LoRAError(
            f"{path} is a damaged LoRA adapter file (its rank, alpha or tensors are not what "
            "a LoRA run saves); train the adapter again"
        )
    return dict(adapter)


def load_lora_adapter(model: nn.Module, path: str | os.PathLike) -> nn.Module:
    """Load a saved adapter onto ``model`` and return it.

    A plain base model is first given LoRA layers with the file's rank and alpha (and
    frozen); a model that has them must have the same rank and alpha. Every layer of the
    adapter must exist in the model with the same shape: a mismatch names the layer.
    """
    adapter = read_lora_adapter(path)
    rank, alpha = adapter["rank"], adapter["alpha"]
    if not lora_layers(model):
        apply_lora(model, rank, alpha, quiet=True)
    elif (has := _lora_settings_of(model)) != (rank, alpha):
        raise LoRAError(
            f"{path}: the adapter has rank {rank}, alpha {alpha:g}; the model's LoRA layers "
            f"have rank {has[0]}, alpha {has[1]:g}"
        )
    expected = lora_state_dict(model)
    _check_adapter_fits(expected, adapter["tensors"], path)
    with torch.no_grad():
        for key, value in expected.items():
            value.copy_(adapter["tensors"][key])
    return model


def _check_adapter_fits(expected: dict, given: dict, path: str | os.PathLike) -> None:
    """Every tensor of the model's adapters is in the file with its shape, and nothing else."""

    def layer(key: str) -> str:  # "trf_blocks.0.att.qkv.lora_key.A" -> "trf_blocks.0.att.qkv"
        return _parts(key)[0]

    hint = "the adapter belongs to another model size; load it onto the base model it was made for"
    for key, value in expected.items():
        if key not in given:
            raise LoRAError(f"{path}: no adapter for layer {layer(key)} ({key} missing); {hint}")
        if tuple(given[key].shape) != tuple(value.shape):
            raise LoRAError(
                f"{path}: layer {layer(key)}: {key} is {list(given[key].shape)} in the file but "
                f"{list(value.shape)} in this model; {hint}"
            )
    extra = [key for key in given if key not in expected]  # in the file's (layer) order
    if extra:
        raise LoRAError(f"{path}: this model has no layer {layer(extra[0])} ({extra[0]}); {hint}")


def adapter_file_name(model_file_name: str) -> str:
    """``gpt2-medium355M-sft.pth`` -> ``gpt2-medium355M-sft-lora-adapter.pth``."""
    stem = model_file_name.removesuffix(".pth")
    return f"{stem}-lora-adapter.pth"
