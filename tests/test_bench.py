"""Smoke tests of the benchmark's own checks (benchmarks/), on tiny models.

Tests that compare against transformers skip one by one when it is not installed.
"""

from __future__ import annotations

import importlib.util

import pytest
import torch

import previous_chapters as pc
from benchmarks import contenders, measure, report, workload
from course.instruction_data import SAMPLE_DATA_PATH, load_instruction_data, split_data
from runtime.engine import generate_batch
from runtime.gpt2_tokenizer import get_tokenizer

pytestmark = pytest.mark.usefixtures("one_thread")
needs_transformers = pytest.mark.skipif(
    importlib.util.find_spec("transformers") is None,
    reason="compares against transformers, which is not installed",
)

CPU = torch.device("cpu")
# context 256: the sample data's prompts fit, so nothing is cropped
CFG = pc.gpt2_config("124M", context_length=256, emb_dim=32, n_heads=4, n_layers=2)
TINY = workload.Sizes(
    train_rounds=2,
    epoch_entries=8,
    epoch_rounds=1,
    gen_prompts=3,
    gen_tokens=4,
    gen_rounds=1,
    memory_steps=1,
    warmup=1,
)


@pytest.fixture(scope="module")
def models():
    return contenders.build_models(CFG, CPU)


@pytest.fixture(scope="module")
def sample_data() -> workload.Data:
    """The bundled sample data, in the benchmark's Data (the real dataset may be absent)."""
    train, test, val = split_data(load_instruction_data(SAMPLE_DATA_PATH))
    return workload.Data(str(SAMPLE_DATA_PATH), train, val, test, get_tokenizer(offline=True))


def random_batch(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded rows like the chapter's collate: targets -100 after each row's end."""
    g = torch.Generator().manual_seed(seed)
    inputs = torch.randint(0, CFG["vocab_size"], (3, 12), generator=g)
    targets = torch.randint(0, CFG["vocab_size"], (3, 12), generator=g)
    for row, n in enumerate((12, 7, 4)):
        targets[row, n:] = -100
    return inputs, targets


@needs_transformers
def test_transformers_model_gets_our_weights(models):
    ours, hf = models
    inputs, _ = random_batch()
    with torch.no_grad():
        torch.testing.assert_close(ours(inputs), hf(inputs).logits, rtol=1e-4, atol=1e-5)


@needs_transformers
def test_same_loss_check_passes_for_shared_weights_and_fails_otherwise(models):
    ours, hf = models
    batch = random_batch()
    a, b = contenders.check_same_loss(ours, hf, batch, CPU)
    assert a == pytest.approx(b, rel=1e-5)
    torch.manual_seed(1)
    other = pc.GPTModel(CFG)  # different random weights
    with pytest.raises(AssertionError, match="losses differ"):
        contenders.check_same_loss(other, hf, batch, CPU)


@needs_transformers
def test_greedy_generation_matches_transformers_token_for_token(models):
    ours, hf = models
    prompts = [[5, 17, 3, 99, 42], [7], [250, 11, 11]]
    mine = generate_batch(ours, prompts, 6, CFG["context_length"], eos_id=None)
    theirs = contenders.hf_generate(hf, prompts, 6, cache=None)
    assert measure.compare_outputs(mine, theirs) == {
        "prompts": 3,
        "identical": 3,
        "first_divergence": {},
    }


@needs_transformers
def test_generation_measurement_checks_tokens_against_transformers_and_naive_loop(
    models, sample_data
):
    ours, hf = models
    result = measure.bench_generation(ours, hf, sample_data, TINY, CPU)
    assert result["vs_hf"] == {"prompts": 3, "identical": 3, "first_divergence": {}}
    assert result["vs_naive"] == {"prompts": 1, "identical": 1, "first_divergence": {}}
    assert result["hf"]["cache"] in ("dynamic", "static")
    assert all(result[name]["tokens_per_s"] > 0 for name in ("ours", "hf", "naive"))


def test_naive_loop_gives_the_same_tokens_as_generate_batch(sample_data):
    torch.manual_seed(workload.SEED)
    ours = pc.GPTModel(CFG).eval()
    prompts = sample_data.prompts(2)
    naive = contenders.naive_generate(ours, prompts, 5, CPU)
    assert naive == generate_batch(ours, prompts, 5, CFG["context_length"], eos_id=None)


def test_compare_outputs_reports_first_divergence():
    report = measure.compare_outputs([[1, 2, 3], [4, 5, 6]], [[1, 2, 3], [4, 9, 6]])
    assert report == {"prompts": 2, "identical": 1, "first_divergence": {1: 1}}


def test_train_step_flops_counts_real_tokens_only():
    _, targets = random_batch()
    d, layers, vocab = CFG["emb_dim"], CFG["n_layers"], CFG["vocab_size"]
    tokens = 12 + 7 + 4
    expected = (
        6 * 12 * layers * d * d * tokens
        + 6 * d * vocab * tokens
        + 6 * layers * d * (12 * 13 + 7 * 8 + 4 * 5)
    )
    assert workload.train_step_flops(CFG, (None, targets)) == expected
    assert workload.n_tokens((None, targets)) == tokens


def test_alternate_takes_turns_and_drops_warmup():
    calls = []

    def contender(name):
        def prepare(r):
            return lambda: calls.append((name, r))

        return prepare

    times = measure.alternate(
        {"a": contender("a"), "b": contender("b")}, rounds=3, warmup=1, device=CPU
    )
    assert [name for name, _ in calls] == ["a", "b", "b", "a", "a", "b", "b", "a"]
    assert {k: len(v) for k, v in times.items()} == {"a": 3, "b": 3}


@pytest.mark.parametrize("kind", ["ours", pytest.param("hf", marks=needs_transformers)])
def test_train_steps_of_both_contenders_lower_the_loss(kind):
    torch.manual_seed(workload.SEED)  # fresh models: training changes them
    model = pc.GPTModel(CFG) if kind == "ours" else contenders.hf_model(CFG)
    batch = random_batch(1)
    model.train()
    step = contenders.make_train_step(model, kind, CPU)
    first = step(batch)
    for _ in range(2):
        last = step(batch)
    assert last < first


def test_both_epochs_train_the_same_model_on_the_same_entries(sample_data):
    torch.manual_seed(workload.SEED)
    initial = pc.GPTModel(CFG).state_dict()
    result = measure.bench_epoch(initial, CFG, sample_data, TINY, CPU)
    assert (result["entries"], result["steps"]) == (8, 1)
    assert set(result["seconds"]) == {"course", "ours"}
    for losses in result["final_losses"].values():
        assert set(losses) == {"train", "val"}
        assert all(torch.isfinite(torch.tensor(v)) for v in losses.values())


def test_lora_measurement_trains_both_from_the_same_weights_on_the_same_batches(sample_data):
    torch.manual_seed(workload.SEED)
    initial = pc.GPTModel(CFG).state_dict()
    batches = workload.training_batches(sample_data, 3, CPU)
    result = measure.bench_lora(initial, CFG, batches, TINY, CPU)
    trainable = result["trainable_parameters"]
    assert trainable["full"] == sum(t.numel() for t in initial.values())
    assert 0 < trainable["lora"] < trainable["full"]
    assert set(result["seconds_per_step"]) == {"full", "lora"}
    assert all(s > 0 for s in result["seconds_per_step"].values())
    with torch.no_grad():
        model = pc.GPTModel(CFG)
        model.load_state_dict(initial)
        expected = contenders.packed_loss_batch(*batches[0], model, CPU).item()
    assert result["first_batch_loss"] == expected


def test_lora_memory_worker_trains_a_frozen_model_with_adapters():
    result = measure.memory_worker("lora", CFG, CPU, 1)
    assert result["peak"] >= result["baseline"] > 0


def test_lora_rows_compare_against_full_fine_tuning():
    r = {
        "lora": {
            "seconds_per_step": {"full": 3.0, "lora": 2.0},
            "trainable_parameters": {"full": 1000, "lora": 10},
        },
        "memory": {
            "measure": "peak RSS, VmHWM",
            "ours": {"training": 4 * 2**20},
            "lora": {"training": 3 * 2**20},
        },
    }
    speed, memory = report.lora_rows(r)
    assert speed[1:4] == ["2.00", "3.00 (full fine-tuning)", "1.50x faster"]
    assert speed[-1] == "yes" and "10 of 1,000 parameters" in speed[0]
    assert memory[1:4] == ["3", "4 (full)", "0.75x"] and memory[-1] == "yes"


# --- decoding at batch 1: bandwidth share, prompt lookup, bf16 --------------------------------


def test_bytes_per_token_counts_weights_once_and_the_growing_cache():
    from benchmarks import decoding

    model = pc.GPTModel(CFG)
    weights = sum(p.numel() for p in model.parameters()) * 4
    tables = (CFG["vocab_size"] - 1 + CFG["context_length"] - 1) * CFG["emb_dim"] * 4
    per_cached_token = 2 * CFG["n_layers"] * CFG["emb_dim"] * 4  # keys and values, fp32
    got = decoding.bytes_per_token(model, prompt_len=10, new_tokens=5)
    assert got == weights - tables + per_cached_token * (10 + 2)
    half = decoding.bytes_per_token(model.to(torch.bfloat16), 10, 5)
    assert half == got / 2


def test_front_end_shares_divide_each_round_by_that_rounds_bandwidth(monkeypatch):
    from benchmarks import decoding

    model = pc.GPTModel(CFG).eval()
    # rounds: the three front ends, the read and the copy; the bandwidth halves in round 2
    seconds = {"generate": [1.0, 1.0], "stream_tokens": [2.0, 1.0], "generate_batch": [1.0, 4.0],
               "read": [1.0, 2.0], "copy": [2.0, 4.0]}  # fmt: skip
    monkeypatch.setattr(decoding, "alternate", lambda runs, rounds, warmup, device: seconds)
    r = decoding.front_end_shares(model, [1, 2, 3], 4, 2, CPU)
    size = int(r["bytes_per_token"]) // 4 * 4  # (the kernels' tensor: whole float32 values)
    bandwidth = [size / 1.0, size / 2.0]
    assert r["bandwidth"] == pytest.approx(sum(bandwidth) / 2)
    for name, times in seconds.items():
        if name in r["share"]:
            shares = [
                r["bytes_per_token"] * 4 / t / bw for t, bw in zip(times, bandwidth, strict=True)
            ]
            assert r["share"][name] == pytest.approx(sum(shares) / 2)
            assert r["tokens_per_s"][name] == pytest.approx(4 / (sum(times) / 2))


def test_front_end_shares_time_real_decoding():
    from benchmarks import decoding

    model = pc.GPTModel(CFG).eval()
    r = decoding.front_end_shares(model, [1, 2, 3], 3, 1, CPU)
    assert set(r["share"]) == {"generate", "stream_tokens", "generate_batch"}
    assert 1e8 < r["bandwidth"] < 1e13  # bytes/s: between 0.1 GB/s and 10 TB/s
    assert all(rate > 0 for rate in r["tokens_per_s"].values())


@needs_transformers
def test_decoding_section_measures_every_front_end_and_its_rows(models, sample_data, monkeypatch):
    from benchmarks import decoding

    ours, hf = models
    sizes = workload.Sizes(**{**TINY.__dict__, "decode_tokens": 6, "agreement_prompts": 2})
    r = decoding.bench_decoding(ours, hf, sample_data, sizes, CPU, "fp32")
    assert set(r["share"]) == {"generate", "stream_tokens", "generate_batch"}
    assert all(share > 0 for share in r["share"].values())
    assert all(row["identical"] for row in r["lookup"].values())
    assert r["bf16"] == {"refused": "--precision fp32"}
    rows = decoding.rows({"decoding": r})
    assert len(rows) == 3 + 2 + 1 and all(len(row) == 6 for row in rows)


@needs_transformers
def test_hf_copy_is_a_fresh_model_with_the_same_weights(models):
    _, hf = models
    hf.generate_marker = object()  # (an attribute a deepcopy would carry along)
    copy16 = contenders.hf_copy(hf, torch.bfloat16)
    del hf.generate_marker
    assert not hasattr(copy16, "generate_marker")
    assert copy16.dtype == torch.bfloat16 and copy16.training == hf.training
    for (name, a), (_, b) in zip(hf.state_dict().items(), copy16.state_dict().items(), strict=True):
        assert torch.equal(a.to(torch.bfloat16), b), name
        assert a.data_ptr() != b.data_ptr(), name
