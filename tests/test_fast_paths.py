"""The speed options keep the course's maths: same batches' content, same updates, same losses."""

from __future__ import annotations

import pytest
import torch

import instruction_finetuning as ift
import previous_chapters as pc

pytestmark = pytest.mark.usefixtures("one_thread")

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


# --- length-grouped batching -------------------------------------------------------------


def test_length_grouped_batches_cover_each_entry_at_most_once_per_epoch():
    lengths = [(7 * i) % 31 for i in range(45)]
    sampler = ift.LengthGroupedBatchSampler(
        lengths, 4, window_batches=3, generator=torch.Generator().manual_seed(0)
    )
    epochs = [list(sampler) for _ in range(2)]
    for batches in epochs:
        assert len(batches) == len(sampler) == 11  # 45 // 4: the last partial batch is dropped
        flat = [i for batch in batches for i in batch]
        assert all(len(batch) == 4 for batch in batches)
        assert len(set(flat)) == len(flat) == 44
    assert epochs[0] != epochs[1]  # a new shuffle every epoch


def test_length_grouped_batches_are_sorted_within_windows():
    lengths = list(range(40))
    sampler = ift.LengthGroupedBatchSampler(
        lengths, 4, window_batches=10, generator=torch.Generator().manual_seed(1)
    )
    batches = list(sampler)
    # one window holds all 40 entries: sorted, so batch k holds lengths 4k..4k+3
    assert sorted(sorted(lengths[i] for i in b) for b in batches) == [
        list(range(k, k + 4)) for k in range(0, 40, 4)
    ]
    assert [min(b) for b in batches] != sorted(min(b) for b in batches)  # batch order shuffled


def test_length_grouped_batches_are_reproducible():
    def run(seed):
        generator = torch.Generator().manual_seed(seed)
        return list(ift.LengthGroupedBatchSampler(list(range(30)), 3, generator=generator))

    assert run(5) == run(5) and run(5) != run(6)


def test_length_grouped_sampler_rejects_bad_sizes():
    with pytest.raises(ValueError, match="batch_size"):
        ift.LengthGroupedBatchSampler([1, 2], 0)


def test_group_by_length_loader_pads_less_with_the_same_collate():
    data, tok = varied_entries(64), CharTokenizer()

    def loaders(**kw):
        return ift.create_dataloaders(data, data, data, tok, batch_size=8, **kw)

    plain, val, _ = loaders()
    grouped, grouped_val, _ = loaders(group_by_length=True)
    assert len(grouped) == len(plain) == 8
    n_padded = [sum(x.numel() for x, _ in loader) for loader in (plain, grouped)]
    n_real = [sum(int((y != -100).sum()) for _, y in loader) for loader in (plain, grouped)]
    assert n_real[0] == n_real[1]  # 64 entries, no partial batch: every entry once
    assert n_padded[1] - n_real[1] < 0.5 * (n_padded[0] - n_real[0])  # padding halved at least
    # each batch is the course's collate of the entries the sampler groups (same seed)
    indices = list(loaders(group_by_length=True)[0].batch_sampler)
    fresh = loaders(group_by_length=True)[0]
    dataset = fresh.dataset
    for (inputs, targets), batch in zip(fresh, indices, strict=True):
        expected = ift.custom_collate_fn([dataset[i] for i in batch])
        assert torch.equal(inputs, expected[0]) and torch.equal(targets, expected[1])
    # validation is untouched: same order and padding as the default loaders
    assert [x.tolist() for x, _ in grouped_val] == [x.tolist() for x, _ in val]


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


def test_group_by_length_flag_reaches_the_run_config():
    parser = ift.build_arg_parser()
    assert ift.config_from_args(parser.parse_args(["--smoke", "--group-by-length"])).group_by_length
    assert not ift.config_from_args(parser.parse_args(["--smoke"])).group_by_length
