"""generate / generate_batch: cache == course loop, batching == one prompt at a time, EOS."""

from __future__ import annotations

import pytest
import torch

import previous_chapters as pc

pytestmark = pytest.mark.usefixtures("one_thread")


VOCAB, CTX = 97, 48
CFG = {
    "vocab_size": VOCAB,
    "context_length": CTX,
    "emb_dim": 32,
    "n_heads": 4,
    "n_layers": 2,
    "drop_rate": 0.0,
    "qkv_bias": True,
}


@pytest.fixture(scope="module")
def model() -> pc.GPTModel:
    torch.manual_seed(0)
    model = pc.GPTModel(CFG).eval()
    with torch.no_grad():  # sharper distributions than the 0.02 init, so greedy choices are clear
        for param in model.parameters():
            if param.dim() > 1:
                param.normal_(0.0, 0.3)
    return model


def random_prompts(lengths, seed=0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, VOCAB, (n,), generator=g).tolist() for n in lengths]


def alone(model, prompt, max_new, context_size, **kw) -> list[int]:
    """What generate gives one prompt on its own (the reference for batching)."""
    out = pc.generate(model, torch.tensor([prompt]), max_new, context_size, **kw)
    return out[0, len(prompt) :].tolist()


def test_cache_equals_course_loop(model):
    idx = torch.tensor(random_prompts([9, 9, 9], seed=1))
    cached = pc.generate(model, idx, 25, CTX)
    naive = pc.generate(model, idx, 25, CTX, use_cache=False)
    assert cached.shape == (3, 9 + 25)
    assert torch.equal(cached[:, :9], idx)
    assert torch.equal(cached, naive)


@pytest.mark.parametrize("prompt_len", [20, 30, 40])
def test_context_overflow_with_cache_equals_course_loop(model, prompt_len):
    # The window (context_size=30) fills up during generation, or is already full.
    idx = torch.tensor(random_prompts([prompt_len, prompt_len], seed=prompt_len))
    cached = pc.generate(model, idx, 35, context_size=30)
    naive = pc.generate(model, idx, 35, context_size=30, use_cache=False)
    assert cached.shape == (2, prompt_len + 35)
    assert torch.equal(cached, naive)


def test_generate_stops_before_eos_like_the_course(model):
    prompt = random_prompts([6], seed=2)[0]
    free = alone(model, prompt, 20, CTX)
    eos = free[5]
    cut = free.index(eos)
    out = pc.generate(model, torch.tensor([prompt]), 20, CTX, eos_id=eos)
    assert out[0, len(prompt) :].tolist() == free[:cut]
    naive = pc.generate(model, torch.tensor([prompt]), 20, CTX, eos_id=eos, use_cache=False)
    assert torch.equal(out, naive)


def test_generate_batch_rows_pad_with_eos_until_all_finish(model):
    idx = torch.tensor(random_prompts([5, 5], seed=3))
    free = pc.generate(model, idx, 20, CTX)[:, 5:]
    eos = int(free[0, 3])  # row 0 stops at its first `eos`; row 1 wherever it meets it
    out = pc.generate(model, idx, 20, CTX, eos_id=eos)
    naive = pc.generate(model, idx, 20, CTX, eos_id=eos, use_cache=False)
    assert torch.equal(out, naive)
    first = free[0].tolist().index(eos)
    new = out[:, 5:]
    assert new[0, :first].tolist() == free[0, :first].tolist()
    assert (new[0, first:] == eos).all()


def test_generate_batch_equals_one_prompt_at_a_time(model):
    prompts = random_prompts([3, 17, 8, 1, 12], seed=4)
    expected = [alone(model, p, 20, CTX) for p in prompts]
    assert pc.generate_batch(model, prompts, 20, CTX, pad_token_id=0) == expected
    # split into batches (sorted by length inside), results still in input order
    assert pc.generate_batch(model, prompts, 20, CTX, pad_token_id=0, batch_size=2) == expected
    assert pc.generate_batch(model, prompts, 20, CTX, pad_token_id=0, use_cache=False) == expected


def test_generate_batch_context_overflow(model):
    prompts = random_prompts([5, 26, 40], seed=5)  # the longest is cropped to its last 30 tokens
    expected = [alone(model, p, 25, 30) for p in prompts]
    assert pc.generate_batch(model, prompts, 25, 30, pad_token_id=0) == expected


def test_generate_batch_each_row_stops_at_its_own_eos(model):
    prompts = random_prompts([4, 9, 6, 13, 2, 7], seed=6)
    free = [alone(model, p, 16, CTX) for p in prompts]

    def stops(eos):
        return [row.index(eos) if eos in row else None for row in free]

    # an EOS token at which rows stop at different steps while some row never meets it
    candidates = sorted({t for row in free for t in row})
    eos = max(candidates, key=lambda t: (None in stops(t), len(set(stops(t)))))
    positions = stops(eos)
    assert None in positions and len({s for s in positions if s is not None}) >= 2

    expected = [row if s is None else row[:s] for row, s in zip(free, positions, strict=True)]
    for batch_size in (None, 4, 1):  # finished rows leave the batch at different times
        got = pc.generate_batch(
            model, prompts, 16, CTX, eos_id=eos, pad_token_id=0, batch_size=batch_size
        )
        assert got == expected
    for p, row in zip(prompts, got, strict=True):
        assert row == alone(model, p, 16, CTX, eos_id=eos)


def test_generate_batch_when_every_row_hits_eos(model):
    prompts = random_prompts([3, 8], seed=7)
    free = [alone(model, p, 12, CTX) for p in prompts]
    eos = free[0][2]
    got = pc.generate_batch(model, prompts, 12, CTX, eos_id=eos, pad_token_id=0)
    assert got[0] == free[0][: free[0].index(eos)]
    assert got[1] == (free[1][: free[1].index(eos)] if eos in free[1] else free[1])


def test_top_k_1_sampling_equals_greedy(model):
    prompts = random_prompts([5, 11], seed=8)
    greedy = pc.generate_batch(model, prompts, 15, CTX, pad_token_id=0)
    g = torch.Generator().manual_seed(0)
    sampled = pc.generate_batch(
        model, prompts, 15, CTX, temperature=1.5, top_k=1, pad_token_id=0, generator=g
    )
    assert sampled == greedy
    idx = torch.tensor([prompts[0]])
    assert torch.equal(
        pc.generate(model, idx, 15, CTX, temperature=0.7, top_k=1), pc.generate(model, idx, 15, CTX)
    )


def test_top_k_sampling_only_picks_among_the_k_best(model):
    prompt = random_prompts([6], seed=9)[0]
    k = 3
    out = pc.generate(
        model,
        torch.tensor([prompt]),
        30,
        CTX,
        temperature=2.0,
        top_k=k,
        generator=torch.Generator().manual_seed(1),
    )
    with torch.no_grad():
        logits = model(out)[0]  # teacher forcing: the logits each new token was drawn from
    for pos in range(len(prompt), out.shape[1]):
        allowed = torch.topk(logits[pos - 1], k).indices.tolist()
        assert int(out[0, pos]) in allowed
    # with a seeded generator sampling is reproducible, and it is not just greedy
    again = pc.generate(
        model,
        torch.tensor([prompt]),
        30,
        CTX,
        temperature=2.0,
        top_k=k,
        generator=torch.Generator().manual_seed(1),
    )
    assert torch.equal(out, again)
    assert not torch.equal(out, pc.generate(model, torch.tensor([prompt]), 30, CTX))


def test_generate_batch_validates_its_input(model):
    with pytest.raises(ValueError, match="pad_token_id 50256 is outside"):
        pc.generate_batch(model, [[1, 2]], 3, CTX)
    with pytest.raises(ValueError, match="prompt 1 is empty"):
        pc.generate_batch(model, [[1], []], 3, CTX, pad_token_id=0)
    with pytest.raises(ValueError, match="top_k"):
        pc.generate_batch(model, [[1]], 3, CTX, pad_token_id=0, temperature=1.0, top_k=0)
    assert pc.generate_batch(model, [[1, 2]], 0, CTX, pad_token_id=0) == [[]]


def test_generation_runs_under_inference_mode_and_keeps_train_mode(model):
    model.train()
    try:
        out = pc.generate(model, torch.tensor([[1, 2, 3]]), 2, CTX)
        assert model.training
        assert out.is_inference()
    finally:
        model.eval()


def test_generate_batch_progress_bar(model, capsys):
    prompts = random_prompts([4, 6], seed=10)
    out = pc.generate_batch(model, prompts, 3, CTX, pad_token_id=0, batch_size=1, progress=True)
    assert out == [alone(model, p, 3, CTX) for p in prompts]
    err = capsys.readouterr().err
    assert "generating" in err and "2/2" in err
