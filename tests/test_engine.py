"""The fast engine equals the course: same losses and gradients, same generations, same
updates, the same batches' content; and a ``torch.compile``'d model takes the same paths."""

from __future__ import annotations

import math

import pytest
import torch

import previous_chapters as pc
from course import instruction_data as data
from helpers import IGN, CharTokenizer, random_prompts, tiny_model, varied_entries
from runtime import engine

pytestmark = pytest.mark.usefixtures("one_thread")

VOCAB = 97


def batch(pattern: str, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Random inputs [4, 10] and targets with ``pattern``'s ignored (-100) positions."""
    g = torch.Generator().manual_seed(seed)
    inputs = torch.randint(0, VOCAB, (4, 10), generator=g)
    targets = torch.randint(0, VOCAB, (4, 10), generator=g)
    if pattern == "ragged":  # rows end at different places: packed without the padding
        targets[0, 6:] = IGN  # padding after the response
        targets[1, :4] = IGN  # a masked instruction
        targets[2, 9] = IGN
        targets[3, 2:] = IGN
    elif pattern == "same-end":  # every row ends at 7: cropped
        targets[:, 7:] = IGN
        targets[0, :3] = IGN
    elif pattern == "row-without-targets":
        targets[1] = IGN
        targets[2, 5:] = IGN
    elif pattern == "holes":  # ignored positions inside a row, as with prompt masking
        targets[0, 2:5] = IGN
        targets[1, ::2] = IGN
        targets[3, 8:] = IGN
    elif pattern == "one-target":
        targets[:] = IGN
        targets[2, 0] = 5
    elif pattern == "collated":  # what custom_collate_fn makes of rows of 3, 10, 6, 1 tokens
        rows = [inputs[i, :n].tolist() for i, n in enumerate((3, 10, 6, 1))]
        inputs, targets = data.custom_collate_fn(rows, pad_token_id=VOCAB - 1)
    return inputs, targets


PATTERNS = [
    "ragged",
    "same-end",
    "row-without-targets",
    "holes",
    "one-target",
    "none-ignored",
    "collated",
]


def loss_and_grads(loss_fn, model, inputs, targets):
    model.zero_grad()
    loss = loss_fn(inputs, targets, model, "cpu")
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    return loss.detach(), grads


@pytest.mark.parametrize("pattern", PATTERNS)
@pytest.mark.parametrize("training", [False, True])
def test_packed_loss_equals_the_course_loss_and_gradients(pattern, training):
    model = tiny_model().train(training)
    inputs, targets = batch(pattern)
    ref, ref_grads = loss_and_grads(pc.calc_loss_batch, model, inputs, targets)
    got, grads = loss_and_grads(engine.packed_loss_batch, model, inputs, targets)
    torch.testing.assert_close(got, ref, atol=1e-6, rtol=1e-6)
    for name, grad in ref_grads.items():
        torch.testing.assert_close(grads[name], grad, atol=1e-6, rtol=1e-5, msg=name)


def test_packed_loss_all_targets_ignored_is_nan_like_the_course():
    model = tiny_model()
    inputs, _ = batch("none-ignored")
    targets = torch.full_like(inputs, IGN)
    assert math.isnan(pc.calc_loss_batch(inputs, targets, model, "cpu").item())
    assert math.isnan(engine.packed_loss_batch(inputs, targets, model, "cpu").item())


def test_packed_loss_moves_the_batch_to_the_device():
    model = tiny_model()
    inputs, targets = batch("ragged")
    loss = engine.packed_loss_batch(inputs, targets, model, torch.device("cpu"))
    assert loss.device.type == "cpu" and loss.shape == ()


# --- the forward's keyword arguments: packed rows, padding, a cache -----------------------


def test_head_mask_and_last_only_are_the_full_logits_there():
    model = tiny_model().eval()
    idx = torch.randint(0, VOCAB, (2, 9), generator=torch.Generator().manual_seed(1))
    keep = torch.rand(2, 9, generator=torch.Generator().manual_seed(2)) < 0.4
    with torch.no_grad():
        full = model(idx)
        torch.testing.assert_close(model(idx, head_mask=keep), full[keep], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(model(idx, last_only=True), full[:, -1:], atol=1e-5, rtol=1e-5)


def test_packed_sequences_equal_separate_forwards():
    model = tiny_model().eval()
    lengths = [5, 9, 2]
    rows = [torch.tensor(p) for p in random_prompts(lengths, VOCAB, seed=2)]
    with torch.no_grad():
        packed = model(torch.cat(rows)[None], seq_lengths=lengths)
        separate = torch.cat([model(row[None]) for row in rows], dim=1)
    torch.testing.assert_close(packed, separate, atol=1e-5, rtol=1e-5)


def test_left_padding_with_positions_and_mask_equals_unpadded():
    """``next_token_logits`` with ``pad`` gives a left-padded row what the row gives alone,
    through the cache and, once the text outgrows the context, through the sliding window."""
    model = tiny_model().eval()
    row = torch.randint(1, VOCAB, (1, 6), generator=torch.Generator().manual_seed(4))
    padded = torch.cat([torch.zeros(1, 3, dtype=torch.long), row], dim=1)
    pad = torch.tensor([3])
    with torch.no_grad():
        expected = model(row)[:, -1]
        cache = pc.KVCache(model, 1, 9)
        got = pc.next_token_logits(model, padded, cache, 9, pad)
        assert torch.isfinite(got).all() and cache.length == 9
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
        for context_size in (4, 7):  # a window inside the row, and one with padding in it
            alone = model(row[:, -context_size:])[:, -1]
            got = pc.next_token_logits(model, padded, None, context_size, pad)
            torch.testing.assert_close(got, alone, atol=1e-5, rtol=1e-5)


def test_cache_in_chunks_equals_the_full_forward():
    model = tiny_model().eval()
    idx = torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(3))
    cache = pc.KVCache(model, batch_size=2, capacity=7)
    assert cache.keys.shape == (2, 2, 4, 7, 8)  # [layers, batch, heads, capacity, head_dim]
    with torch.no_grad():
        parts = [model(idx[:, a:b], cache=cache) for a, b in ((0, 5), (5, 6), (6, 7))]
        torch.testing.assert_close(torch.cat(parts, 1), model(idx[:, :7]), atol=1e-5, rtol=1e-5)
        assert cache.length == 7 and cache.keys.shape[3] == 7  # preallocated: it never grew
        cache.keep_rows(torch.tensor([1]))
        more = model(idx[1:, 7:12], cache=cache)  # past the capacity: the cache grows
        torch.testing.assert_close(more, model(idx[1:])[:, 7:], atol=1e-5, rtol=1e-5)


# --- length-grouped batches ------------------------------------------------------------------


def test_length_grouped_batches_cover_each_entry_at_most_once_per_epoch():
    lengths = [(7 * i) % 31 for i in range(45)]
    sampler = engine.LengthGroupedBatchSampler(
        lengths, 4, window_batches=3, generator=torch.Generator().manual_seed(0)
    )
    epochs = [list(sampler) for _ in range(2)]
    for batches in epochs:
        assert len(batches) == len(sampler) == 11  # 45 // 4: the last partial batch is dropped
        flat = [i for b in batches for i in b]
        assert all(len(b) == 4 for b in batches)
        assert len(set(flat)) == len(flat) == 44
    assert epochs[0] != epochs[1]  # a new shuffle every epoch


def test_length_grouped_batches_are_sorted_within_windows():
    lengths = list(range(40))
    sampler = engine.LengthGroupedBatchSampler(
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
        return list(engine.LengthGroupedBatchSampler(list(range(30)), 3, generator=generator))

    assert run(5) == run(5) and run(5) != run(6)


def test_length_grouped_sampler_rejects_bad_sizes():
    with pytest.raises(ValueError, match="batch_size"):
        engine.LengthGroupedBatchSampler([1, 2], 0)
    with pytest.raises(ValueError, match="window_batches"):
        engine.LengthGroupedBatchSampler([1, 2], 1, window_batches=0)


def test_group_by_length_loader_pads_less_with_the_same_collate():
    entries, tok = varied_entries(64), CharTokenizer()

    def loaders(**kw):
        return data.create_dataloaders(entries, entries, entries, tok, batch_size=8, **kw)

    plain, val, _ = loaders()
    grouped, grouped_val, _ = loaders(group_by_length=True)
    assert len(grouped) == len(plain) == 8
    n_padded = [sum(x.numel() for x, _ in loader) for loader in (plain, grouped)]
    n_real = [sum(int((y != IGN).sum()) for _, y in loader) for loader in (plain, grouped)]
    assert n_real[0] == n_real[1]  # 64 entries, no partial batch: every entry once
    assert n_padded[1] - n_real[1] < 0.5 * (n_padded[0] - n_real[0])  # padding halved at least
    # each batch is the course's collate of the entries the sampler groups (same seed)
    indices = list(loaders(group_by_length=True)[0].batch_sampler)
    fresh = loaders(group_by_length=True)[0]
    for (inputs, targets), rows in zip(fresh, indices, strict=True):
        expected = data.custom_collate_fn([fresh.dataset[i] for i in rows])
        assert torch.equal(inputs, expected[0]) and torch.equal(targets, expected[1])
    # validation is untouched: same order and padding as the default loaders
    assert [x.tolist() for x, _ in grouped_val] == [x.tolist() for x, _ in val]


# --- fused AdamW -----------------------------------------------------------------------------


def train_steps(model, optimizer, steps=3):
    g = torch.Generator().manual_seed(3)
    for _ in range(steps):
        inputs = torch.randint(0, VOCAB, (2, 12), generator=g)
        targets = torch.randint(0, VOCAB, (2, 12), generator=g)
        targets[1, 7:] = IGN
        optimizer.zero_grad()
        pc.calc_loss_batch(inputs, targets, model, "cpu").backward()
        optimizer.step()


def test_make_optimizer_is_adamw_with_the_same_updates():
    reference = tiny_model()
    model = tiny_model()
    initial = {k: v.clone() for k, v in reference.state_dict().items()}
    plain = torch.optim.AdamW(reference.parameters(), lr=1e-2, weight_decay=0.1)
    fast = engine.make_optimizer(model, lr=1e-2, weight_decay=0.1)
    assert isinstance(fast, torch.optim.AdamW) and fast.defaults["fused"]
    assert fast.defaults["weight_decay"] == 0.1 and fast.defaults["lr"] == 1e-2
    train_steps(reference, plain)
    train_steps(model, fast)
    d = reference.cfg["emb_dim"]
    for (name, a), b in zip(reference.named_parameters(), model.parameters(), strict=True):
        assert not torch.equal(a, initial[name])  # the steps moved every weight
        if name.endswith("qkv.bias"):
            # The key bias has a zero gradient in exact maths (softmax ignores a constant
            # added to every score); Adam scales its rounding noise up to lr-sized steps.
            a, b = torch.cat((a[:d], a[2 * d :])), torch.cat((b[:d], b[2 * d :]))
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6, msg=name)


def test_make_optimizer_skips_frozen_parameters():
    model = tiny_model()
    model.tok_emb.weight.requires_grad_(False)
    optimizer = engine.make_optimizer(model)
    params = [p for group in optimizer.param_groups for p in group["params"]]
    assert all(p is not model.tok_emb.weight for p in params)
    assert len(params) == len(list(model.parameters())) - 1


# --- the course's training loop with the packed loss -----------------------------------------


def test_train_model_simple_with_the_packed_loss_gives_the_course_history(capsys):
    """Same weights, same batches, same optimizer: the loss history of the course's loss and
    of the packed loss agree to float rounding, step after step."""
    tok = CharTokenizer()
    cfg = {"vocab_size": 128, "context_length": 32}
    loaders = []
    for seed in (0, 1):
        rows = random_prompts([9, 14, 5, 11, 7, 3, 12, 8], 128, seed=seed)
        batches = [data.custom_collate_fn(rows[i : i + 4], pad_token_id=0) for i in range(0, 8, 4)]
        loaders.append(batches)
    train_loader, val_loader = loaders

    def train(loss_fn):
        model = tiny_model(seed=5, **cfg)
        optimizer = torch.optim.AdamW(model.parameters(), lr=5e-3, weight_decay=0.1)
        history = pc.train_model_simple(
            model,
            train_loader,
            val_loader,
            optimizer,
            "cpu",
            num_epochs=3,
            eval_freq=1,
            eval_iter=2,
            start_context="abc",
            tokenizer=tok,
            loss_fn=loss_fn,
            progress=False,
        )
        return history, model

    (course, course_model) = train(pc.calc_loss_batch)
    (packed, packed_model) = train(engine.packed_loss_batch)
    train_c, val_c, seen_c = course
    train_p, val_p, seen_p = packed
    assert len(train_c) == 6 and seen_p == seen_c
    assert train_c[-1] < train_c[0]  # it learned something, so the comparison means something
    torch.testing.assert_close(torch.tensor(train_p), torch.tensor(train_c), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(torch.tensor(val_p), torch.tensor(val_c), rtol=1e-5, atol=1e-5)
    d = course_model.cfg["emb_dim"]
    for (name, a), b in zip(
        course_model.named_parameters(), packed_model.parameters(), strict=True
    ):
        if name.endswith("qkv.bias"):  # the key bias: rounding noise only (see above)
            a, b = torch.cat((a[:d], a[2 * d :])), torch.cat((b[:d], b[2 * d :]))
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5, msg=name)
    capsys.readouterr()


# --- a torch.compile'd model takes the engine's paths -----------------------------------------


@pytest.fixture(scope="module")
def compiled_pair():
    model = tiny_model(sharpen=0.3).eval()
    return model, torch.compile(model, backend="eager")  # no C compiler needed


def test_compiled_model_packed_loss_equals_the_plain_model(compiled_pair):
    model, compiled = compiled_pair
    assert not isinstance(compiled, pc.GPTModel)  # a wrapper: the engine must not check types
    for pattern in ("ragged", "same-end", "row-without-targets"):
        inputs, targets = batch(pattern, seed=7)
        plain = engine.packed_loss_batch(inputs, targets, model, "cpu")
        got = engine.packed_loss_batch(inputs, targets, compiled, "cpu")
        course = pc.calc_loss_batch(inputs, targets, model, "cpu")
        torch.testing.assert_close(got, plain, atol=0, rtol=0)
        torch.testing.assert_close(got, course, atol=1e-6, rtol=1e-6)


def test_compiled_model_generate_batch_equals_the_plain_model(compiled_pair):
    model, compiled = compiled_pair
    prompts = random_prompts([3, 12, 7], VOCAB, seed=9)
    kw = dict(eos_id=None, pad_token_id=0)
    expected = engine.generate_batch(model, prompts, 10, 16, **kw)
    assert engine.generate_batch(compiled, prompts, 10, 16, **kw) == expected
    assert expected == [
        pc.generate(model, torch.tensor([p]), 10, 16, use_cache=False)[0, len(p) :].tolist()
        for p in prompts
    ]


def test_in_precision_bf16_is_a_copy_and_fp32_the_model_itself():
    model = tiny_model().eval()
    assert engine.in_precision(model, "fp32") is model
    half = engine.in_precision(model, "bf16")
    assert {p.dtype for p in half.parameters()} == {torch.bfloat16}
    assert {p.dtype for p in model.parameters()} == {torch.float32}  # the original stays
    prompts = random_prompts([4, 7], VOCAB, seed=3)
    out = engine.generate_batch(half, prompts, 5, 16, pad_token_id=0)  # bf16 cache and all
    assert [len(row) for row in out] == [5, 5]
