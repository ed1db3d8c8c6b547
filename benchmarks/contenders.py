"""The contenders: our model with the fast engine, transformers' GPT-2, and the course's way.

* **ours**: ``previous_chapters.GPTModel`` driven by ``engine``: ``packed_loss_batch``,
  ``make_optimizer`` (fused AdamW), ``generate_batch``, length-grouped batches;
* **transformers**: ``GPT2LMHeadModel`` with exactly our weights, its own loss and ``generate()``;
* **course-style**: the same ``GPTModel`` driven by the course functions of
  ``previous_chapters``: ``calc_loss_batch``, plain ``torch.optim.AdamW``,
  ``evaluate_model`` and ``generate(use_cache=False)``;
* **LoRA**: ours with the weights frozen and rank-16 adapters (exercise 7.4, ``course/lora.py``),
  trained by the same step as ours.
"""

from __future__ import annotations

import contextlib
import io
from collections.abc import Callable

import torch

import previous_chapters as pc
from benchmarks.workload import (
    EVAL_FREQ,
    EVAL_ITER,
    LR,
    SAMPLE_TOKENS,
    SEED,
    WEIGHT_DECAY,
    Data,
)
from course.instruction_data import EOS_TOKEN_ID, format_input
from course.lora import apply_lora
from runtime.engine import make_optimizer, packed_loss_batch

# --------------------------------------------------------------------------------------
# The models: transformers' GPT-2 and ours with the same weights
# --------------------------------------------------------------------------------------


def hf_model(cfg: dict):
    """transformers' GPT-2 in its fastest CPU/GPU setting: SDPA attention, dropout 0."""
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(
        vocab_size=cfg["vocab_size"],
        n_positions=cfg["context_length"],
        n_embd=cfg["emb_dim"],
        n_layer=cfg["n_layers"],
        n_head=cfg["n_heads"],
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        attn_implementation="sdpa",
    )
    model = GPT2LMHeadModel(config)
    model.loss_type = "ForCausalLM"  # its default, named (else it warns that none is set)
    return model


def hf_copy(hf, dtype: torch.dtype):
    """A fresh transformers model with ``hf``'s weights in ``dtype``. Not a deepcopy: after a
    static-cache ``generate()`` a model holds a compiled call bound to itself (and its cache),
    which a deepcopy would share, running the original fp32 model on the copy's bf16 cache."""
    clone = type(hf)(hf.config).to(device=hf.device, dtype=dtype)
    clone.load_state_dict(hf.state_dict())
    clone.loss_type = hf.loss_type
    return clone.train(hf.training)


def course_params_from_hf(hf) -> dict:
    """transformers' GPT-2 weights in the course's params layout (Conv1D is [in, out] too)."""
    sd = {k: v.detach().cpu().numpy() for k, v in hf.transformer.state_dict().items()}

    def layer(prefix: str, w: str = "w", b: str = "b") -> dict:
        return {w: sd[f"{prefix}.weight"], b: sd[f"{prefix}.bias"]}

    blocks = [
        {
            "attn": {"c_attn": layer(f"h.{i}.attn.c_attn"), "c_proj": layer(f"h.{i}.attn.c_proj")},
            "mlp": {"c_fc": layer(f"h.{i}.mlp.c_fc"), "c_proj": layer(f"h.{i}.mlp.c_proj")},
            "ln_1": layer(f"h.{i}.ln_1", "g"),
            "ln_2": layer(f"h.{i}.ln_2", "g"),
        }
        for i in range(hf.config.n_layer)
    ]
    return {
        "wte": sd["wte.weight"],
        "wpe": sd["wpe.weight"],
        "blocks": blocks,
        **layer("ln_f", "g"),
    }


def build_models(cfg: dict, device: torch.device):
    """(ours, transformers') with the same random weights, in eval mode."""
    torch.manual_seed(SEED)
    hf = hf_model(cfg)
    ours = pc.GPTModel(cfg)
    pc.load_weights_into_gpt(ours, course_params_from_hf(hf))
    return ours.to(device).eval(), hf.to(device).eval()


# --------------------------------------------------------------------------------------
# Training steps
# --------------------------------------------------------------------------------------


def hf_loss(hf, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """transformers' own causal-LM loss on our (already shifted) targets, -100 ignored."""
    return hf(input_ids=inputs, labels=targets, shift_labels=targets).loss


def make_train_step(model, kind: str, device: torch.device) -> Callable[[tuple], float]:
    """One fine-tuning step (zero_grad, loss, backward, AdamW) of ours or transformers'.

    Both use fused AdamW: ours through ``engine.make_optimizer`` with
    ``engine.packed_loss_batch`` as the loss, transformers' because its Trainer defaults to
    ``adamw_torch_fused`` with torch >= 2.8.
    """
    if kind == "ours":
        optimizer = make_optimizer(model, lr=LR, weight_decay=WEIGHT_DECAY)
        loss_fn = lambda x, y: packed_loss_batch(x, y, model, device)  # noqa: E731
    else:
        optimizer = torch.optim.AdamW(
            model.parameters(), lr=LR, weight_decay=WEIGHT_DECAY, fused=True
        )
        loss_fn = lambda x, y: hf_loss(model, x, y)  # noqa: E731

    def step(batch: tuple) -> float:
        optimizer.zero_grad()
        loss = loss_fn(*batch)
        loss.backward()
        optimizer.step()
        return loss.item()

    return step


def check_same_loss(ours, hf, batch: tuple, device: torch.device) -> tuple[float, float]:
    """Both models give the same loss on ``batch`` (they share their weights)."""
    with torch.no_grad():
        a = packed_loss_batch(*batch, ours, device).item()
        b = hf_loss(hf, *batch).item()
    if abs(a - b) > 1e-5 * max(1.0, abs(b)):
        raise AssertionError(f"losses differ on the first batch: ours {a!r}, transformers {b!r}")
    return a, b


# --------------------------------------------------------------------------------------
# One epoch: the course-style loop and ours
# --------------------------------------------------------------------------------------


def course_style_epoch(model, train_loader, val_loader, data: Data, device) -> dict:
    """One epoch the way the course's train_model_simple runs it, from the course functions:
    default (for-loop) AdamW, ``calc_loss_batch`` (full-vocabulary logits and loss at all
    positions), ``evaluate_model`` on 5 + 5 batches every 5 steps, then a 50-token sample
    by ``generate(use_cache=False)``, which re-runs the whole context for every token."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=WEIGHT_DECAY)
    losses = {}
    model.train()
    for step, (inputs, targets) in enumerate(train_loader):
        optimizer.zero_grad()
        pc.calc_loss_batch(inputs, targets, model, device).backward()
        optimizer.step()
        if step % EVAL_FREQ == 0:
            train, val = pc.evaluate_model(model, train_loader, val_loader, device, EVAL_ITER)
            losses = {"train": train, "val": val}
    model.eval()
    context = pc.text_to_token_ids(format_input(data.val[0]), data.tokenizer).to(device)
    pc.generate(model, context, SAMPLE_TOKENS, model.context_length, use_cache=False)
    return losses


def our_epoch(model, train_loader, val_loader, data: Data, device) -> dict:
    """One epoch of the course's train_model_simple with the engine's options: fused AdamW
    (``make_optimizer``), ``packed_loss_batch`` for training and evaluation, the same
    evaluation schedule, and the 50-token sample with the model's KV cache."""
    optimizer = make_optimizer(model, lr=LR, weight_decay=WEIGHT_DECAY)
    with contextlib.redirect_stdout(io.StringIO()):  # its progress lines and sample text
        train_losses, val_losses, _ = pc.train_model_simple(
            model,
            train_loader,
            val_loader,
            optimizer,
            device,
            num_epochs=1,
            eval_freq=EVAL_FREQ,
            eval_iter=EVAL_ITER,
            start_context=format_input(data.val[0]),
            tokenizer=data.tokenizer,
            loss_fn=packed_loss_batch,
            progress=False,
        )
    return {"train": train_losses[-1], "val": val_losses[-1]}


def lora_copy(model, rank: int = 16, alpha: float = 16.0):
    """A copy of ``model`` with its weights frozen and LoRA adapters added (exercise 7.4)."""
    torch.manual_seed(SEED)
    clone = pc.GPTModel(model.cfg).to(model.out_head.weight.device)
    clone.load_state_dict(model.state_dict())
    apply_lora(clone, rank, alpha, quiet=True)
    return clone.train(model.training)


# --------------------------------------------------------------------------------------
# Generation (ours is engine.generate_batch, called directly)
# --------------------------------------------------------------------------------------


def hf_generate(hf, prompts: list[list[int]], max_new_tokens: int, cache: str | None) -> list:
    """transformers' batched greedy generate(): left padding, attention mask, KV cache, no EOS."""
    device = hf.device
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), EOS_TOKEN_ID, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, prompt in enumerate(prompts):
        ids[row, width - len(prompt) :] = torch.tensor(prompt)
        mask[row, width - len(prompt) :] = 1
    with torch.inference_mode():
        out = hf.generate(
            input_ids=ids.to(device),
            attention_mask=mask.to(device),
            do_sample=False,
            max_new_tokens=max_new_tokens,
            eos_token_id=None,  # no stopping: every prompt gets exactly max_new_tokens
            pad_token_id=EOS_TOKEN_ID,
            use_cache=True,
            cache_implementation=cache,
        )
    return out[:, width:].tolist()


def naive_generate(model, prompts: list[list[int]], max_new_tokens: int, device) -> list:
    """The course's loop, ``generate(use_cache=False)``, one prompt at a time; new tokens."""
    return [
        pc.generate(
            model, torch.tensor([p], device=device), max_new_tokens, model.context_length,
            use_cache=False,
        )[0, len(p) :].tolist()
        for p in prompts
    ]  # fmt: skip
