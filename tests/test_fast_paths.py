"""The speed options keep the course's maths: same batches' content, same updates, same losses."""

from __future__ import annotations

import torch

import instruction_finetuning as ift
import previous_chapters as pc

CFG = {
    "vocab_size": 300,
    "context_length": 32,
    "emb_dim": 16,
    "n_heads": 2,
    "n_layers": 2,
    "drop_rate": 0.0,
    "qkv_bias": True,
}


class CharTokenizer:
    """One token per character: entry lengths follow the text lengths exactly."""

    def encode(self, text: str) -> list[int]:
        return [min(ord(c), 255) for c in text]


def varied_entries(n: int) -> list[dict]:
    return [
        {"instruction": "i" * (i % 7), "input": "", "output": "o" * (3 * i % 23)} for i in range(n)
    ]


# --- fused AdamW ---------------------------------------------------------------------------


def train_steps(model, optimizer, steps=3):
    g = torch.Generator().manual_seed(3)
    for _ in range(steps):
        inputs = torch.randint(0, CFG["vocab_size"], (2, 12), generator=g)
        targets = torch.randint(0, CFG["vocab_size"], (2, 12), generator=g)
        targets[1, 7:] = -100
        optimizer.zero_grad()
        pc.calc_loss_batch(inputs, targets, model, "cpu").backward()
        optimizer.step()


def test_make_optimizer_is_adamw_with_the_same_updates():
    torch.manual_seed(0)
    reference = pc.GPTModel(CFG)
    model = pc.GPTModel(CFG)
    model.load_state_dict(reference.state_dict())
    initial = {k: v.clone() for k, v in reference.state_dict().items()}
    plain = torch.optim.AdamW(reference.parameters(), lr=1e-2, weight_decay=0.1)
    fast = ift.make_optimizer(model, lr=1e-2, weight_decay=0.1)
    assert isinstance(fast, torch.optim.AdamW) and fast.defaults["fused"]
    assert fast.defaults["weight_decay"] == 0.1 and fast.defaults["lr"] == 1e-2
    train_steps(reference, plain)
    train_steps(model, fast)
    d = CFG["emb_dim"]
    for (name, a), b in zip(reference.named_parameters(), model.parameters(), strict=True):
        assert not torch.equal(a, initial[name])  # the steps moved every weight
        if name.endswith("qkv.bias"):
            # The key bias has a zero gradient in exact maths (softmax ignores a constant
            # added to every score); Adam scales its rounding noise up to lr-sized steps.
            a, b = torch.cat((a[:d], a[2 * d :])), torch.cat((b[:d], b[2 * d :]))
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6, msg=name)
