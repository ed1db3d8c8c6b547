"""Generation: the course's ``generate`` (with and without its cache) and the engine's
``generate_batch``, which must give every prompt what ``generate`` gives it alone."""

from __future__ import annotations

import pytest
import torch

import previous_chapters as pc
from helpers import random_prompts, tiny_model
from runtime import engine

pytestmark = pytest.mark.usefixtures("one_thread")

VOCAB, CTX = 97, 48


@pytest.fixture(scope="module")
def model() -> pc.GPTModel:
    # sharper distributions than the 0.02 init, so greedy choices are clear-cut
    return tiny_model(vocab_size=VOCAB, context_length=CTX, sharpen=0.3).eval()


def prompts_of(lengths, seed=0) -> list[list[int]]:
    return random_prompts(lengths, VOCAB, seed)


def alone(model, prompt, max_new, context_size, **kw) -> list[int]:
    """The new tokens the course's generate (no cache: the course's own loop) gives one prompt."""
    out = pc.generate(model, torch.tensor([prompt]), max_new, context_size, use_cache=False, **kw)
    return out[0, len(prompt) :].tolist()


# --- the course's generate: the cache changes nothing --------------------------------------


def test_cache_equals_course_loop(model):
    idx = torch.tensor(prompts_of([9, 9, 9], seed=1))
    cached = pc.generate(model, idx, 25, CTX, use_cache=True)
    naive = pc.generate(model, idx, 25, CTX, use_cache=False)
    assert cached.shape == (3, 9 + 25)
    assert torch.equal(cached[:, :9], idx)
    assert torch.equal(cached, naive)


@pytest.mark.parametrize("prompt_len", [20, 30, 40])
def test_context_overflow_with_cache_equals_course_loop(model, prompt_len):
    # The window (context_size=30) fills up during generation, or is already full.
    idx = torch.tensor(prompts_of([prompt_len, prompt_len], seed=prompt_len))
    cached = pc.generate(model, idx, 35, context_size=30)
    naive = pc.generate(model, idx, 35, context_size=30, use_cache=False)
    assert cached.shape == (2, prompt_len + 35)
    assert torch.equal(cached, naive)


def test_generate_leaves_the_models_own_cache_alone(model):
    pc.generate(model, torch.tensor(prompts_of([5])), 4, CTX, use_cache=True)
    assert model.current_pos == 0 and model.kv_cache is None  # generate keeps its own cache


def test_generate_stops_before_eos_like_the_course(model):
    prompt = prompts_of([6], seed=2)[0]
    free = alone(model, prompt, 20, CTX)
    eos = free[5]
    cut = free.index(eos)
    for use_cache in (True, False):
        out = pc.generate(model, torch.tensor([prompt]), 20, CTX, eos_id=eos, use_cache=use_cache)
        assert out[0, len(prompt) :].tolist() == free[:cut]


def test_generate_rows_pad_with_eos_until_all_finish(model):
    idx = torch.tensor(prompts_of([5, 5], seed=3))
    free = pc.generate(model, idx, 20, CTX)[:, 5:]
    eos = int(free[0, 3])  # row 0 stops at its first `eos`; row 1 wherever it meets it
    out = pc.generate(model, idx, 20, CTX, eos_id=eos)
    naive = pc.generate(model, idx, 20, CTX, eos_id=eos, use_cache=False)
    assert torch.equal(out, naive)
    first = free[0].tolist().index(eos)
    new = out[:, 5:]
    assert new[0, :first].tolist() == free[0, :first].tolist()
    assert (new[0, first:] == eos).all()


def test_top_k_1_sampling_equals_greedy(model):
    idx = torch.tensor([prompts_of([5], seed=8)[0]])
    g = torch.Generator().manual_seed(0)
    sampled = pc.generate(model, idx, 15, CTX, temperature=0.7, top_k=1, generator=g)
    assert torch.equal(sampled, pc.generate(model, idx, 15, CTX))


def test_top_k_sampling_only_picks_among_the_k_best(model):
    prompt = torch.tensor([prompts_of([6], seed=9)[0]])
    k = 3

    def sample(seed):
        g = torch.Generator().manual_seed(seed)
        return pc.generate(model, prompt, 30, CTX, temperature=2.0, top_k=k, generator=g)

    out = sample(1)
    with torch.no_grad():
        logits = model(out)[0]  # teacher forcing: the logits each new token was drawn from
    for pos in range(prompt.shape[1], out.shape[1]):
        allowed = torch.topk(logits[pos - 1], k).indices.tolist()
        assert int(out[0, pos]) in allowed
    # with a seeded generator sampling is reproducible, and it is not just greedy
    assert torch.equal(out, sample(1))
    assert not torch.equal(out, pc.generate(model, prompt, 30, CTX))


def test_sample_next_token_follows_the_course():
    logits = torch.tensor([[1.0, 3.0, 2.0, -1.0], [0.0, 0.0, 5.0, 4.0]])
    assert pc.sample_next_token(logits).tolist() == [[1], [2]]  # greedy: argmax
    g = torch.Generator().manual_seed(0)
    draws = torch.cat([pc.sample_next_token(logits, 1.0, 2, g) for _ in range(200)], dim=1)
    assert set(draws[0].tolist()) == {1, 2} and set(draws[1].tolist()) == {2, 3}  # top 2 only


def test_generate_validates_its_arguments(model):
    idx = torch.tensor([[1, 2]])
    with pytest.raises(ValueError, match="max_new_tokens >= 0"):
        pc.generate(model, idx, -1, CTX)
    with pytest.raises(ValueError, match="top_k"):
        pc.generate(model, idx, 3, CTX, temperature=1.0, top_k=0)
    assert torch.equal(pc.generate(model, idx, 0, CTX), idx)


def test_generation_keeps_the_mode_and_tracks_no_gradients(model):
    model.train()
    try:
        out = pc.generate(model, torch.tensor([[1, 2, 3]]), 2, CTX)
        assert model.training
        assert not out.requires_grad
    finally:
        model.eval()


def test_cache_needs_a_gpt_model():
    class Plain(torch.nn.Module):  # any module mapping ids to logits, without the course's cache
        def __init__(self):
            super().__init__()
            self.emb = torch.nn.Embedding(VOCAB, VOCAB)

        def forward(self, idx):
            return self.emb(idx)

    plain, idx = Plain(), torch.tensor([[1, 2, 3]])
    with pytest.raises(TypeError, match="pass use_cache=False for a Plain"):
        pc.generate(plain, idx, 4, CTX, use_cache=True)
    out = pc.generate(plain, idx, 4, CTX, use_cache=False)
    expected = idx
    for _ in range(4):  # the course's loop, by hand
        expected = torch.cat([expected, plain(expected)[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(out, expected)


# --- the engine's generate_batch equals generate, one prompt at a time ----------------------


def test_generate_batch_equals_one_prompt_at_a_time(model):
    prompts = prompts_of([3, 17, 8, 1, 12], seed=4)
    expected = [alone(model, p, 20, CTX) for p in prompts]
    assert engine.generate_batch(model, prompts, 20, CTX, pad_token_id=0) == expected
    # split into batches (sorted by length inside), results still in input order
    for batch_size in (1, 2, 4):
        got = engine.generate_batch(model, prompts, 20, CTX, pad_token_id=0, batch_size=batch_size)
        assert got == expected, batch_size


def test_generate_batch_left_padding_changes_nothing(model):
    # a short prompt next to a long one is left-padded by 19 tokens: masked, positions shifted
    short, long = prompts_of([2, 21], seed=11)
    assert engine.generate_batch(model, [short, long], 15, CTX, pad_token_id=5) == [
        alone(model, short, 15, CTX),
        alone(model, long, 15, CTX),
    ]


@pytest.mark.parametrize(
    ("lengths", "context_size", "max_new"),
    [
        ([5, 26, 29], 30, 25),  # the window fills up during generation
        ([5, 26, 40], 30, 25),  # and a prompt longer than the context is cropped
        ([31, 45, 60], 30, 6),  # every prompt is longer than the context
    ],
)
def test_generate_batch_context_overflow(model, lengths, context_size, max_new):
    prompts = prompts_of(lengths, seed=sum(lengths))
    expected = [alone(model, p, max_new, context_size) for p in prompts]
    got = engine.generate_batch(model, prompts, max_new, context_size, pad_token_id=0)
    assert got == expected


def test_generate_batch_each_row_stops_at_its_own_eos(model):
    prompts = prompts_of([4, 9, 6, 13, 2, 7], seed=6)
    free = [alone(model, p, 16, CTX) for p in prompts]

    def stops(eos):
        return [row.index(eos) if eos in row else None for row in free]

    # an EOS token at which rows stop at different steps while some row never meets it
    candidates = sorted({t for row in free for t in row})
    eos = max(candidates, key=lambda t: (None in stops(t), len({s for s in stops(t)})))
    positions = stops(eos)
    assert None in positions and len({s for s in positions if s is not None}) >= 2

    expected = [alone(model, p, 16, CTX, eos_id=eos) for p in prompts]
    for row, cut, got in zip(free, positions, expected, strict=True):
        assert got == (row if cut is None else row[:cut])
    for batch_size in (None, 4, 1):  # finished rows leave the batch at different times
        got = engine.generate_batch(
            model, prompts, 16, CTX, eos_id=eos, pad_token_id=0, batch_size=batch_size
        )
        assert got == expected, batch_size


def test_generate_batch_with_eos_and_context_overflow(model):
    prompts = prompts_of([10, 28, 35], seed=12)
    free = [alone(model, p, 20, 30) for p in prompts]
    eos = free[1][12]
    assert len(prompts[1]) + free[1].index(eos) > 30  # row 1 stops after the window slid
    expected = [alone(model, p, 20, 30, eos_id=eos) for p in prompts]
    assert engine.generate_batch(model, prompts, 20, 30, eos_id=eos, pad_token_id=0) == expected


def test_generate_batch_when_every_row_hits_eos(model):
    prompts = prompts_of([3, 8], seed=7)
    free = [alone(model, p, 12, CTX) for p in prompts]
    eos = free[0][2]
    got = engine.generate_batch(model, prompts, 12, CTX, eos_id=eos, pad_token_id=0)
    assert got == [alone(model, p, 12, CTX, eos_id=eos) for p in prompts]
    assert got[0] == free[0][: free[0].index(eos)]


def test_generate_batch_top_k_1_sampling_equals_greedy(model):
    prompts = prompts_of([5, 11], seed=8)
    greedy = engine.generate_batch(model, prompts, 15, CTX, pad_token_id=0)
    g = torch.Generator().manual_seed(0)
    sampled = engine.generate_batch(
        model, prompts, 15, CTX, temperature=1.5, top_k=1, pad_token_id=0, generator=g
    )
    assert sampled == greedy


def test_generate_batch_validates_its_input(model):
    with pytest.raises(ValueError, match="pad_token_id 50256 is outside"):
        engine.generate_batch(model, [[1, 2]], 3, CTX)
    with pytest.raises(ValueError, match="prompt 1 is empty"):
        engine.generate_batch(model, [[1], []], 3, CTX, pad_token_id=0)
    with pytest.raises(ValueError, match="top_k"):
        engine.generate_batch(model, [[1]], 3, CTX, pad_token_id=0, temperature=1.0, top_k=0)
    with pytest.raises(ValueError, match="batch_size"):
        engine.generate_batch(model, [[1]], 3, CTX, pad_token_id=0, batch_size=0)
    assert engine.generate_batch(model, [[1, 2]], 0, CTX, pad_token_id=0) == [[]]
    assert engine.generate_batch(model, [], 3, CTX, pad_token_id=0) == []


def test_generate_batch_progress_bar(model, capsys, monkeypatch):
    from runtime import progress_bars

    monkeypatch.setattr(progress_bars, "on_terminal", lambda stream=None: True)  # (as in a shell)
    prompts = prompts_of([4, 6], seed=10)
    out = engine.generate_batch(model, prompts, 3, CTX, pad_token_id=0, batch_size=1, progress=True)
    assert out == [alone(model, p, 3, CTX) for p in prompts]
    err = capsys.readouterr().err
    assert "generating" in err and "2/2" in err


# --- exact speculative decoding by prompt lookup --------------------------------------------


def test_lookup_draft_follows_the_latest_longest_earlier_ngram():
    text = [5, 6, 7, 1, 5, 6, 9, 2, 5, 6]
    assert engine.lookup_draft(text, 2) == [9, 2]  # "5 6" last seen before at 4: then 9 2
    assert engine.lookup_draft(text + [9], 3) == [2, 5, 6]  # "5 6 9" at 4
    assert engine.lookup_draft([1, 2, 3], 4) == []  # 3 never came before
    assert engine.lookup_draft(text, 0) == []


@pytest.mark.parametrize("oracle", ["right", "wrong", "mixed", "lookup"])
def test_prompt_lookup_gives_exactly_the_greedy_tokens(model, monkeypatch, oracle):
    """Drafts that greedy would pick, drafts it never picks, half of each, and the real
    prompt lookup: the tokens are plain greedy's every time; only the forwards change."""
    prompt = prompts_of([7], seed=11)[0]
    plain = list(engine.stream_tokens(model, prompt, 30, CTX))
    assert plain == alone(model, prompt, 30, CTX)
    real_lookup = engine.lookup_draft

    def drafts(history, k, max_ngram=3):
        ahead = plain[len(history) - len(prompt) :][:k]
        if oracle == "right":
            return ahead
        if oracle == "wrong":
            return [(t + 1) % VOCAB for t in ahead]
        if oracle == "mixed":
            return ahead[:1] + [(t + 1) % VOCAB for t in ahead[1:]]
        return real_lookup(history, k, max_ngram)

    monkeypatch.setattr(engine, "lookup_draft", drafts)
    stats: dict[str, int] = {}
    got = list(engine.stream_tokens(model, prompt, 30, CTX, draft_tokens=4, stats=stats))
    assert got == plain
    assert stats["tokens"] == 30
    if oracle == "right":  # every draft kept: 4 + 1 tokens per forward (the last one short)
        assert stats["forwards"] == 6
    elif oracle == "wrong":  # every draft rejected: one token per forward, as without drafts
        assert stats["forwards"] == 30 and stats["drafted"] > 0
    elif oracle == "mixed":
        assert stats["forwards"] == 15


def test_prompt_lookup_with_eos_and_a_full_context(model):
    """Stops before eos like plain decoding, and drafts nothing past the context."""
    prompt = [3, 4, 5, 3, 4, 5, 3, 4] * 2  # copying prompts make the lookup draft
    plain = list(engine.stream_tokens(model, prompt, 40, 24))
    assert list(engine.stream_tokens(model, prompt, 40, 24, draft_tokens=3)) == plain
    eos = plain[4]
    cut = plain[: plain.index(eos)]
    got = engine.stream_tokens(model, prompt, 40, 24, eos_id=eos, draft_tokens=3)
    assert list(got) == cut
    two = [prompt, prompt[:5]]
    batch = engine.generate_batch(model, two, 20, CTX, pad_token_id=0, draft_tokens=3)
    assert batch == engine.generate_batch(model, two, 20, CTX, pad_token_id=0)


def test_prompt_lookup_refuses_sampling(model):
    with pytest.raises(ValueError, match="greedy"):
        list(engine.stream_tokens(model, [1, 2], 5, CTX, temperature=1.0, draft_tokens=2))
