"""Smoke tests of the benchmark's own checks (benchmarks/bench.py), on tiny models."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

import previous_chapters as pc

pytest.importorskip("transformers", reason="the benchmark compares against transformers")
pytestmark = pytest.mark.usefixtures("one_thread")

BENCH_PATH = Path(__file__).resolve().parents[1] / "benchmarks" / "bench.py"
CFG = pc.gpt2_config("124M", context_length=48, emb_dim=32, n_heads=4, n_layers=2)


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench", BENCH_PATH)
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench"] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def models(bench):
    return bench.build_models(CFG, torch.device("cpu"))


def random_batch(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded rows like the chapter's collate: targets -100 after each row's end."""
    g = torch.Generator().manual_seed(seed)
    inputs = torch.randint(0, CFG["vocab_size"], (3, 12), generator=g)
    targets = torch.randint(0, CFG["vocab_size"], (3, 12), generator=g)
    for row, n in enumerate((12, 7, 4)):
        targets[row, n:] = -100
    return inputs, targets


def test_transformers_model_gets_our_weights(models):
    ours, hf = models
    inputs, _ = random_batch()
    with torch.no_grad():
        torch.testing.assert_close(ours(inputs), hf(inputs).logits, rtol=1e-4, atol=1e-5)


def test_same_loss_check_passes_for_shared_weights_and_fails_otherwise(bench, models):
    ours, hf = models
    batch = random_batch()
    a, b = bench.check_same_loss(ours, hf, batch, torch.device("cpu"))
    assert a == pytest.approx(b, rel=1e-5)
    other = pc.GPTModel(CFG)  # different random weights
    with pytest.raises(AssertionError, match="losses differ"):
        bench.check_same_loss(other, hf, batch, torch.device("cpu"))


def test_greedy_generation_matches_transformers_token_for_token(bench, models):
    ours, hf = models
    prompts = [[5, 17, 3, 99, 42], [7], [250, 11, 11]]
    mine = pc.generate_batch(ours, prompts, 6, CFG["context_length"], eos_id=None)
    theirs = bench.hf_generate(hf, prompts, 6, cache=None)
    assert bench.compare_outputs(mine, theirs) == {
        "prompts": 3,
        "identical": 3,
        "first_divergence": {},
    }


def test_compare_outputs_reports_first_divergence(bench):
    report = bench.compare_outputs([[1, 2, 3], [4, 5, 6]], [[1, 2, 3], [4, 9, 6]])
    assert report == {"prompts": 2, "identical": 1, "first_divergence": {1: 1}}


def test_train_step_flops_counts_real_tokens_only(bench):
    _, targets = random_batch()
    d, layers, vocab = CFG["emb_dim"], CFG["n_layers"], CFG["vocab_size"]
    tokens = 12 + 7 + 4
    expected = (
        6 * 12 * layers * d * d * tokens
        + 6 * d * vocab * tokens
        + 6 * layers * d * (12 * 13 + 7 * 8 + 4 * 5)
    )
    assert bench.train_step_flops(CFG, (None, targets)) == expected


def test_alternate_takes_turns_and_drops_warmup(bench):
    calls = []

    def contender(name):
        def prepare(r):
            return lambda: calls.append((name, r))

        return prepare

    times = bench.alternate(
        {"a": contender("a"), "b": contender("b")}, rounds=3, warmup=1, device=torch.device("cpu")
    )
    assert [name for name, _ in calls] == ["a", "b", "b", "a", "a", "b", "b", "a"]
    assert {k: len(v) for k, v in times.items()} == {"a": 3, "b": 3}


def test_train_steps_of_both_contenders_lower_the_loss(bench):
    ours, hf = bench.build_models(CFG, torch.device("cpu"))  # fresh: training changes them
    batch = random_batch(1)
    for model, kind in ((ours, "ours"), (hf, "hf")):
        model.train()
        step = bench.make_train_step(model, kind, torch.device("cpu"))
        first = step(batch)
        for _ in range(2):
            last = step(batch)
        model.eval()
        assert last < first, kind
