"""GPTModel: parity with Hugging Face's GPT-2, cache paths, configs, weight loading."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import previous_chapters as pc

transformers = pytest.importorskip("transformers", reason="parity tests need transformers")


pytestmark = pytest.mark.usefixtures("one_thread")


VOCAB, CTX, EMB, HEADS, LAYERS = 257, 64, 32, 2, 2
TINY_CFG = {
    "vocab_size": VOCAB,
    "context_length": CTX,
    "emb_dim": EMB,
    "n_heads": HEADS,
    "n_layers": LAYERS,
    "drop_rate": 0.0,
    "qkv_bias": True,
}


def hf_to_course_params(hf_model) -> dict:
    """A GPT2LMHeadModel's weights in the course's params layout (numpy, Conv1D = [in, out])."""
    sd = {k: v.detach().numpy().copy() for k, v in hf_model.state_dict().items()}
    n_layer = hf_model.config.n_layer

    def wb(prefix: str, w: str = "w", b: str = "b", suffix=("weight", "bias")) -> dict:
        return {w: sd[f"{prefix}.{suffix[0]}"], b: sd[f"{prefix}.{suffix[1]}"]}

    blocks = []
    for i in range(n_layer):
        h = f"transformer.h.{i}"
        blocks.append(
            {
                "attn": {"c_attn": wb(f"{h}.attn.c_attn"), "c_proj": wb(f"{h}.attn.c_proj")},
                "mlp": {"c_fc": wb(f"{h}.mlp.c_fc"), "c_proj": wb(f"{h}.mlp.c_proj")},
                "ln_1": wb(f"{h}.ln_1", "g"),
                "ln_2": wb(f"{h}.ln_2", "g"),
            }
        )
    return {
        "wte": sd["transformer.wte.weight"],
        "wpe": sd["transformer.wpe.weight"],
        "blocks": blocks,
        "g": sd["transformer.ln_f.weight"],
        "b": sd["transformer.ln_f.bias"],
    }


@pytest.fixture(scope="module")
def hf_model():
    torch.manual_seed(0)
    config = transformers.GPT2Config(
        vocab_size=VOCAB,
        n_positions=CTX,
        n_embd=EMB,
        n_head=HEADS,
        n_layer=LAYERS,
        initializer_range=0.2,  # larger than GPT-2's so greedy choices are clear-cut
        bos_token_id=0,
        eos_token_id=0,
        pad_token_id=0,
    )
    model = transformers.GPT2LMHeadModel(config).eval()
    # random LayerNorm parameters and biases too, so their mapping is tested
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "ln" in name or name.endswith("bias"):
                param.add_(0.1 * torch.randn_like(param))
    return model


@pytest.fixture(scope="module")
def params(hf_model) -> dict:
    return hf_to_course_params(hf_model)


@pytest.fixture(scope="module")
def ours(params) -> pc.GPTModel:
    model = pc.GPTModel(TINY_CFG).eval()
    pc.load_weights_into_gpt(model, params)
    return model


def test_logits_match_transformers(hf_model, ours):
    idx = torch.randint(0, VOCAB, (3, CTX), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = hf_model(idx).logits
        got = ours(idx)
    assert got.shape == (3, CTX, VOCAB)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_greedy_generation_matches_transformers(hf_model, ours):
    prompt = torch.randint(0, VOCAB, (1, 7), generator=torch.Generator().manual_seed(2))
    new = 40
    cached = pc.generate(ours, prompt, new, CTX)
    naive = pc.generate(ours, prompt, new, CTX, use_cache=False)
    with torch.inference_mode():
        hf = hf_model.generate(
            prompt,
            attention_mask=torch.ones_like(prompt),
            max_new_tokens=new,
            min_new_tokens=new,
            do_sample=False,
            eos_token_id=None,
            pad_token_id=0,
        )
    assert cached.shape == (1, 7 + new)
    assert torch.equal(cached, naive)
    assert torch.equal(cached, hf)


def test_cached_forward_in_chunks_equals_full_forward(ours):
    idx = torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(3))
    with torch.inference_mode():
        full = ours(idx)
        cache = ours.new_kv_cache(2, 12)
        parts = [ours(idx[:, a:b], kv_cache=cache) for a, b in ((0, 5), (5, 8), (8, 9), (9, 12))]
    assert cache.pos == 12
    torch.testing.assert_close(torch.cat(parts, dim=1), full, atol=1e-5, rtol=1e-5)


def test_left_padding_with_positions_and_mask_equals_unpadded(ours):
    row = torch.randint(1, VOCAB, (1, 6), generator=torch.Generator().manual_seed(4))
    padded = torch.cat([torch.zeros(1, 3, dtype=torch.long), row], dim=1)
    mask = torch.tensor([[0, 0, 0, 1, 1, 1, 1, 1, 1]], dtype=torch.bool)
    positions = torch.tensor([[0, 0, 0, 0, 1, 2, 3, 4, 5]])
    with torch.inference_mode():
        expected = ours(row)
        got = ours(padded, position_ids=positions, attention_mask=mask)
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got[:, 3:], expected, atol=1e-5, rtol=1e-5)


def test_too_long_input_is_refused_clearly(ours):
    with pytest.raises(ValueError, match="exceeds context_length 64"):
        ours(torch.zeros(1, CTX + 1, dtype=torch.long))
    cache = ours.new_kv_cache(1, 4)
    with pytest.raises(ValueError, match="KV cache full"):
        ours(torch.zeros(1, 5, dtype=torch.long), kv_cache=cache)


def test_module_names_follow_the_course(ours):
    names = dict(ours.named_modules())
    for name in (
        "tok_emb",
        "pos_emb",
        "drop_emb",
        "trf_blocks.0.att.qkv",
        "trf_blocks.0.att.out_proj",
        "trf_blocks.0.ff.layers.0",
        "trf_blocks.0.norm1",
        "trf_blocks.0.norm2",
        "final_norm",
        "out_head",
    ):
        assert name in names, name
    assert ours.out_head.bias is None
    assert ours.final_norm.eps == 1e-5


@pytest.mark.parametrize(
    ("name", "gpt2_params"),
    [  # GPT-2's published sizes (output head tied to the token embedding, so not counted)
        ("gpt2-small (124M)", 124_439_808),
        ("355M", 354_823_168),
        ("gpt2-large", 774_030_080),
        ("gpt2-xl (1558M)", 1_557_611_200),
    ],
)
def test_presets_have_gpt2_sizes(name, gpt2_params):
    cfg = pc.gpt2_config(name)
    with torch.device("meta"):
        model = pc.GPTModel(cfg)
    total = sum(p.numel() for p in model.parameters())
    assert total - model.out_head.weight.numel() == gpt2_params


def test_gpt2_config_names_and_overrides():
    assert (
        pc.gpt2_config("gpt2-medium (355M)")
        == pc.gpt2_config("355M")
        == pc.gpt2_config("GPT2-Medium")
    )
    cfg = pc.gpt2_config("124M", context_length=256, drop_rate=0.1)
    assert cfg == {**pc.GPT_CONFIG_124M, "context_length": 256, "drop_rate": 0.1}
    with pytest.raises(ValueError, match="unknown GPT-2 model"):
        pc.gpt2_config("gpt2-huge")
    with pytest.raises(ValueError, match="emb_dims"):
        pc.gpt2_config("124M", emb_dims=10)
    with pytest.raises(ValueError, match="n_heads"):
        pc.GPTModel({k: v for k, v in TINY_CFG.items() if k != "n_heads"})


def _state(model: torch.nn.Module) -> dict:
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_load_weights_rejects_bad_shape_and_changes_nothing(params):
    model = pc.GPTModel(TINY_CFG)
    before = _state(model)
    bad = {**params, "blocks": [dict(b) for b in params["blocks"]]}
    bad["blocks"][1] = {**bad["blocks"][1], "attn": {**bad["blocks"][1]["attn"]}}
    bad["blocks"][1]["attn"]["c_attn"] = {
        "w": np.zeros((3 * EMB, EMB), dtype=np.float32),  # transposed by mistake
        "b": params["blocks"][1]["attn"]["c_attn"]["b"],
    }
    with pytest.raises(
        ValueError, match=r"blocks\[1\]\.attn\.c_attn\.w: expected \(32, 96\), got \(96, 32\)"
    ):
        pc.load_weights_into_gpt(model, bad)
    after = _state(model)
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_load_weights_names_missing_keys_and_layer_mismatch(params):
    model = pc.GPTModel(TINY_CFG)
    with pytest.raises(ValueError, match="lack 'g'"):
        pc.load_weights_into_gpt(model, {k: v for k, v in params.items() if k != "g"})
    no_ln = {**params, "blocks": [dict(b) for b in params["blocks"]]}
    del no_ln["blocks"][0]["ln_2"]
    with pytest.raises(ValueError, match=r"blocks\[0\]\.ln_2\.g"):
        pc.load_weights_into_gpt(model, no_ln)
    deeper = pc.GPTModel({**TINY_CFG, "n_layers": 3})
    with pytest.raises(ValueError, match="2 blocks but the model has n_layers=3"):
        pc.load_weights_into_gpt(deeper, params)
    no_bias = pc.GPTModel({**TINY_CFG, "qkv_bias": False})
    with pytest.raises(ValueError, match="qkv_bias=True"):
        pc.load_weights_into_gpt(no_bias, params)


def test_load_weights_copies_head_from_wte(params, ours):
    torch.testing.assert_close(ours.out_head.weight, torch.from_numpy(params["wte"]))
    torch.testing.assert_close(
        ours.trf_blocks[0].att.qkv.weight,
        torch.from_numpy(params["blocks"][0]["attn"]["c_attn"]["w"]).T,
    )
