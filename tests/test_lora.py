"""LoRA (exercise 7.4): the layers, the course's parameter counts, merging, the adapter file,
the engine's fast paths on a LoRA model, and LoRA runs through the pipeline."""

from __future__ import annotations

import json
import math
import re
from dataclasses import replace

import pytest
import torch

import instruction_finetuning as ift
import previous_chapters as pc
from course import finetuning, lora
from helpers import tiny_config, tiny_model, varied_entries
from runtime import engine

pytestmark = pytest.mark.usefixtures("one_thread")


def lora_model(seed: int = 0, rank: int = 4, alpha: float = 8.0, **overrides) -> pc.GPTModel:
    """A tiny GPT with LoRA layers whose B is not zero, so that the adapters change the logits."""
    model = tiny_model(seed, **overrides)
    lora.apply_lora(model, rank, alpha, quiet=True)
    torch.manual_seed(seed + 1)
    with torch.no_grad():
        for value in lora.lora_state_dict(model).values():
            value.normal_(0.0, 0.2)
    return model.eval()


def batch(seed: int = 0, vocab: int = 97) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded rows like the collate function's: targets -100 after each row's end."""
    g = torch.Generator().manual_seed(seed)
    inputs = torch.randint(0, vocab, (3, 10), generator=g)
    targets = torch.randint(0, vocab, (3, 10), generator=g)
    for row, n in enumerate((10, 6, 3)):
        targets[row, n:] = -100
    return inputs, targets


# --- the layers ------------------------------------------------------------------------------


def test_lora_layer_starts_at_zero_and_computes_the_scaled_low_rank_product():
    torch.manual_seed(0)
    layer = lora.LoRALayer(12, 5, rank=4, alpha=2.0)
    assert layer.A.shape == (12, 4) and layer.B.shape == (4, 5)
    assert torch.count_nonzero(layer.B) == 0
    # the book's kaiming_uniform_(A, a=sqrt(5)) on [in, rank]: U(-1/sqrt(rank), 1/sqrt(rank))
    assert layer.A.abs().max() <= 1 / math.sqrt(4) and layer.A.std() > 0.1
    x = torch.randn(2, 3, 12)
    assert torch.count_nonzero(layer(x)) == 0
    with torch.no_grad():
        layer.B.normal_()
    expected = 0.5 * torch.einsum("bti,ir,ro->bto", x, layer.A, layer.B)  # alpha / rank = 0.5
    torch.testing.assert_close(layer(x), expected)
    torch.testing.assert_close(x @ layer.delta_weight().T, expected)


def test_a_new_lora_model_gives_the_base_models_logits():
    base = tiny_model(3).eval()
    wrapped = tiny_model(3)
    lora.apply_lora(wrapped, 4, 16, quiet=True)
    idx = torch.randint(0, 97, (2, 9))
    torch.testing.assert_close(wrapped.eval()(idx), base(idx), rtol=0, atol=0)


@pytest.mark.parametrize(
    ("rank", "alpha", "message"),
    [
        (0, 16, "rank 0 is out of range"),
        (-2, 16, "rank -2 is out of range"),
        (2.5, 16, "rank 2.5 is out of range"),
        (True, 16, "rank True is out of range"),
        (8, 0, "alpha 0 is out of range"),
        (8, -1.0, "alpha -1.0 is out of range"),
        (8, float("nan"), "alpha nan is out of range"),
        (8, "16", "alpha '16' must be a number"),
    ],
)
def test_bad_rank_or_alpha_is_refused_clearly(rank, alpha, message):
    for make in (
        lambda: lora.LoRALayer(4, 4, rank, alpha),
        lambda: lora.apply_lora(tiny_model(), rank, alpha, quiet=True),
        lambda: lora.replace_linear_with_lora(tiny_model(), rank, alpha),
    ):
        with pytest.raises(lora.LoRAError, match=re.escape(message)):
            make()


def test_every_linear_layer_is_wrapped_the_fused_qkv_in_three_parts():
    model = lora_model()
    names = set(lora.lora_layers(model))
    linear_names = {n for n, m in tiny_model().named_modules() if isinstance(m, torch.nn.Linear)}
    assert names == linear_names and "out_head" in names
    qkv = model.trf_blocks[0].att.qkv
    assert isinstance(qkv, lora.QKVWithLoRA)
    assert [p.shape for p in (qkv.lora_query.A, qkv.lora_key.B)] == [(32, 4), (4, 32)]
    bases = [w.linear for w in lora.lora_layers(model).values()]
    plain = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    assert len(plain) == len(bases) and all(any(m is b for b in bases) for m in plain)
    with pytest.raises(lora.LoRAError, match="only once"):
        lora.apply_lora(model, 4, 8)


def test_gpt2_medium_rank_16_has_the_courses_parameter_counts(capsys):
    """7,898,384 trainable of 406,286,336, as the course reports (counted on the meta device)."""
    with torch.device("meta"):
        model = pc.GPTModel(pc.gpt2_config("gpt2-medium (355M)"))
    assert lora.count_parameters(model) == (406_286_336, 406_286_336)
    trainable, total = lora.apply_lora(model, rank=16, alpha=16)
    assert trainable == 7_898_384 and total == 406_286_336 + 7_898_384
    assert "7,898,384 trainable parameters" in capsys.readouterr().out
    # one adapter on the fused qkv layer would have 16 * (1024 + 3072) parameters, the
    # course's three 3 * 16 * (1024 + 1024): 32,768 more per block
    qkv = sum(p.numel() for p in model.trf_blocks[0].att.qkv.parameters() if p.requires_grad)
    assert qkv == 3 * 16 * (1024 + 1024) == 16 * (1024 + 3072) + 32_768


# --- merging and the adapter file ------------------------------------------------------------


def test_merged_state_dict_is_a_plain_gpt_model_with_the_same_logits():
    model = lora_model(1)
    merged = lora.merge_lora(model)
    plain = pc.GPTModel(tiny_config())
    assert list(merged) == list(plain.state_dict())
    plain.load_state_dict(merged)  # strict
    idx = torch.randint(0, 97, (3, 12))
    with torch.no_grad():
        torch.testing.assert_close(plain.eval()(idx), model(idx), rtol=1e-5, atol=1e-5)
        assert not torch.allclose(tiny_model(1).eval()(idx), model(idx))  # the adapters matter


def test_adapter_file_is_small_and_loads_onto_a_fresh_base_model(tmp_path):
    model = lora_model(2, vocab_size=2000)  # a vocabulary large enough for a realistic ratio
    adapter = lora.save_lora_adapter(model, tmp_path / "m-sft-lora-adapter.pth")
    full = ift.save_model(model, tmp_path / "full.pth")
    assert adapter.stat().st_size < full.stat().st_size / 5
    fresh = tiny_model(2, vocab_size=2000)  # the same base weights, no adapters yet
    lora.load_lora_adapter(fresh, adapter)
    idx = torch.randint(0, 2000, (2, 7))
    with torch.no_grad():
        torch.testing.assert_close(fresh.eval()(idx), model(idx), rtol=0, atol=0)
    assert lora.count_parameters(fresh)[0] == lora.count_parameters(model)[0]


def test_adapter_that_does_not_fit_names_the_layer(tmp_path):
    path = lora.save_lora_adapter(lora_model(emb_dim=32), tmp_path / "a.pth")
    with pytest.raises(lora.LoRAError, match=r"layer trf_blocks\.0\.att\.qkv: .*A is \[32, 4\]"):
        lora.load_lora_adapter(tiny_model(emb_dim=16), path)
    with pytest.raises(lora.LoRAError, match=r"this model has no layer trf_blocks\.1\.att\.qkv"):
        lora.load_lora_adapter(tiny_model(n_layers=1), path)
    with pytest.raises(lora.LoRAError, match=r"no adapter for layer trf_blocks\.2\.att\.qkv"):
        lora.load_lora_adapter(tiny_model(n_layers=3), path)
    with pytest.raises(lora.LoRAError, match="the adapter has rank 4, alpha 8; the model's"):
        lora.load_lora_adapter(lora_model(rank=2), path)


def test_a_file_that_is_not_an_adapter_is_refused(tmp_path):
    model_file = ift.save_model(tiny_model(), tmp_path / "model.pth")
    with pytest.raises(lora.LoRAError, match="is not a LoRA adapter file"):
        lora.load_lora_adapter(tiny_model(), model_file)
    (tmp_path / "junk.pth").write_bytes(b"not a torch file")
    with pytest.raises(lora.LoRAError, match="is not a readable LoRA adapter file"):
        lora.load_lora_adapter(tiny_model(), tmp_path / "junk.pth")
    with pytest.raises(lora.LoRAError, match="no LoRA layers to save"):
        lora.save_lora_adapter(tiny_model(), tmp_path / "none.pth")


def test_adapter_file_name_follows_the_model_file():
    assert (
        lora.adapter_file_name("gpt2-medium355M-sft.pth") == "gpt2-medium355M-sft-lora-adapter.pth"
    )


# --- the engine and training on a LoRA model -------------------------------------------------


def test_packed_loss_and_gradients_match_the_course_loss_and_reach_only_the_adapters():
    inputs, targets = batch()
    grads = {}
    for name, loss_fn in (("course", pc.calc_loss_batch), ("packed", engine.packed_loss_batch)):
        model = lora_model(4)
        loss = loss_fn(inputs, targets, model, "cpu")
        loss.backward()
        grads[name] = (loss.item(), {n: p.grad for n, p in model.named_parameters()})
    assert grads["packed"][0] == pytest.approx(grads["course"][0], rel=1e-5)
    for name, grad in grads["packed"][1].items():
        reference = grads["course"][1][name]
        if name.endswith((".A", ".B")):
            torch.testing.assert_close(grad, reference, rtol=1e-4, atol=1e-6)
        else:
            assert grad is None and reference is None, f"the frozen {name} got a gradient"
    merged = pc.GPTModel(tiny_config())
    merged.load_state_dict(lora.merge_lora(lora_model(4)))
    with torch.no_grad():
        plain = engine.packed_loss_batch(inputs, targets, merged.eval(), "cpu").item()
    assert plain == pytest.approx(grads["course"][0], rel=1e-5)


def test_generate_batch_on_a_lora_model_matches_generate_and_the_merged_model():
    model = lora_model(5, sharpen=0.3)  # logits far apart: no greedy choice hinges on rounding
    merged = pc.GPTModel(tiny_config())
    merged.load_state_dict(lora.merge_lora(model))
    prompts = [[5, 17, 3, 9], [7], [60, 11, 11]]
    ours = engine.generate_batch(model, prompts, 6, 48, pad_token_id=0)
    assert ours == engine.generate_batch(merged.eval(), prompts, 6, 48, pad_token_id=0)
    for prompt, new in zip(prompts, ours, strict=True):
        course = pc.generate(model, torch.tensor([prompt]), 6, 48)[0, len(prompt) :].tolist()
        assert course == new


def test_the_optimizer_holds_only_the_adapters_and_training_leaves_the_base_alone():
    model = lora_model(6)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    optimizer = engine.make_optimizer(model, lr=1e-2)
    held = [p for group in optimizer.param_groups for p in group["params"]]
    assert sum(p.numel() for p in held) == lora.count_parameters(model)[0]
    model.train()
    for _ in range(3):
        optimizer.zero_grad()
        engine.packed_loss_batch(*batch(), model, "cpu").backward()
        optimizer.step()
    adapters = set(lora.lora_state_dict(model))
    for key, value in model.state_dict().items():
        changed = not torch.equal(value, before[key])
        assert changed == (key in adapters), key


# --- through the pipeline --------------------------------------------------------------------


def test_cli_lora_flags(tmp_path):
    def parse(*argv):
        return ift.config_from_args(ift.build_arg_parser().parse_args(list(argv)))

    assert (parse().lora_rank, parse().lora_alpha) == (None, 16.0)
    assert parse("--lora-rank").lora_rank == 16  # the course's rank
    cfg = parse("--lora-rank", "8", "--lora-alpha", "32")
    assert (cfg.lora_rank, cfg.lora_alpha) == (8, 32.0)
    assert "LoRA rank 8, alpha 32" in ift.describe(cfg)
    assert "full fine-tuning" in ift.describe(parse())


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--lora-rank", "0"], "lora_rank = 0 is out of range"),
        (["--lora-rank", "4", "--lora-alpha", "0"], "lora_alpha = 0.0 is out of range"),
        (["--lora-rank", "4", "--lora-alpha", "nan"], "lora_alpha = nan is out of range"),
        (["--lora-alpha", "32"], "lora_alpha applies only to LoRA runs"),
    ],
)
def test_cli_bad_lora_settings_exit_2_before_any_work(tmp_path, capsys, argv, message):
    out = tmp_path / "out"
    assert ift.main(["--smoke", "--no-judge", "--output-dir", str(out), *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and err.count("\n") == 1
    assert not out.exists()


def test_check_settings_refuses_a_rank_that_is_not_a_whole_number(tmp_path):
    cfg = ift.RunConfig.smoke_preset(output_dir=str(tmp_path), lora_rank=2.0)
    with pytest.raises(ift.ConfigError, match="lora_rank = 2.0 is out of range"):
        ift.check_settings(cfg)


def small_run_config(tmp_path, **changes) -> ift.RunConfig:
    tmp_path.mkdir(parents=True, exist_ok=True)
    path = tmp_path / "data.json"
    path.write_text(json.dumps(varied_entries(24)))
    settings = dict(
        data=str(path),
        output_dir=str(tmp_path / "out"),
        model_overrides={"emb_dim": 32, "n_layers": 1, "n_heads": 2, "context_length": 192},
        epochs=1,
        batch_size=4,
        max_new_tokens=4,
        use_judge=False,
        lora_rank=4,
        lora_alpha=8.0,
    )
    return ift.RunConfig.smoke_preset(**{**settings, **changes})


@pytest.mark.slow
def test_lora_run_saves_the_merged_model_and_the_adapter_and_resumes(tmp_path, capsys):
    cfg = small_run_config(tmp_path)
    summary = ift.run(cfg, progress=False)
    printed = capsys.readouterr().out
    assert "LoRA rank 4, alpha 8:" in printed and "trainable parameters" in printed
    assert summary["config"]["lora_rank"] == 4
    run_dir = cfg.run_dir
    model_file = run_dir / cfg.model_file_name()
    adapter_file = run_dir / lora.adapter_file_name(cfg.model_file_name())
    assert summary["outputs"]["model"] == str(model_file)
    assert summary["outputs"]["lora_adapter"] == str(adapter_file)
    assert adapter_file.stat().st_size < model_file.stat().st_size / 5

    # the model file is a plain GPTModel whose answers are the run's responses
    plain, _ = ift.build_model(ift.model_config(cfg), pretrained=False)
    plain.load_state_dict(torch.load(model_file, weights_only=True))
    responses = json.loads((run_dir / ift.RESPONSES_FILE).read_text())
    tokenizer = ift.prepare_tokenizer(cfg)
    again = finetuning.generate_responses(
        plain, responses, tokenizer, context_size=192, max_new_tokens=4, progress=False
    )
    assert [e["model_response"] for e in again] == [e["model_response"] for e in responses]

    # the adapter on the base model gives the merged model's logits
    base, _ = ift.prepare_model(replace(cfg, lora_rank=None), "cpu")
    lora.load_lora_adapter(base, adapter_file)
    idx = torch.randint(0, 50257, (2, 8))
    with torch.no_grad():
        torch.testing.assert_close(base.eval()(idx), plain.eval()(idx), rtol=1e-5, atol=1e-5)

    # resumed after training, the run loads the adapter onto its LoRA model
    (run_dir / ift.RESPONSES_FILE).unlink()
    resumed = ift.run(ift.make_config(resume=str(run_dir)), progress=False)
    assert "Training finished in an earlier session" in capsys.readouterr().out
    assert resumed["final_losses"] == summary["final_losses"]
    assert json.loads((run_dir / ift.RESPONSES_FILE).read_text()) == responses


@pytest.mark.slow
def test_an_interrupted_lora_run_resumes_from_its_checkpoint_to_the_same_result(tmp_path, capsys):
    """A checkpoint holds the LoRA model's state dict; resuming continues it exactly."""
    full = ift.run(small_run_config(tmp_path / "a", epochs=2), progress=False)

    cfg = small_run_config(tmp_path / "b", epochs=2)
    ift.check_settings(cfg)
    splits = ift.prepare_data(cfg)
    tokenizer = ift.prepare_tokenizer(cfg)
    train_loader, val_loader, _ = ift.prepare_loaders(cfg, splits, tokenizer, "cpu")
    model, _ = ift.prepare_model(cfg, "cpu")
    ift.start_run(cfg)
    ift.train(
        replace(cfg, epochs=1), model, train_loader, val_loader, tokenizer, "cpu", progress=False
    )
    assert (cfg.run_dir / ift.CHECKPOINT_FILE).is_file()
    capsys.readouterr()
    resumed = ift.run(ift.make_config(resume=str(cfg.run_dir)), progress=False)
    assert "checkpoint.pt: epoch 2, step" in capsys.readouterr().out  # not trained anew
    assert resumed["loss_history"] == full["loss_history"]
    assert resumed["final_losses"] == full["final_losses"]
