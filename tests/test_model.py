"""GPTModel: parity with Hugging Face's GPT-2, the course's cache, configs, weight loading."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import gpt_download as gd
import previous_chapters as pc
from helpers import TINY_CHECKPOINT, hf_to_course_params, needs_transformers, tiny_config
from runtime import gemv

pytestmark = pytest.mark.usefixtures("one_thread")

VOCAB, CTX, EMB, HEADS, LAYERS = 257, 64, 32, 2, 2
HF_CFG = tiny_config(
    vocab_size=VOCAB, context_length=CTX, emb_dim=EMB, n_heads=HEADS, n_layers=LAYERS
)


# --- parity with transformers' GPT2LMHeadModel --------------------------------------------


@pytest.fixture(scope="module")
def hf_model():
    import transformers

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
def ours(hf_model) -> pc.GPTModel:
    model = pc.GPTModel(HF_CFG).eval()
    pc.load_weights_into_gpt(model, hf_to_course_params(hf_model))
    return model


@needs_transformers
def test_logits_match_transformers(hf_model, ours):
    idx = torch.randint(0, VOCAB, (3, CTX), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = hf_model(idx).logits
        got = ours(idx)
    assert got.shape == (3, CTX, VOCAB)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


@needs_transformers
@pytest.mark.parametrize("use_cache", [True, False])
def test_greedy_generation_matches_transformers(hf_model, ours, use_cache):
    prompt = torch.randint(0, VOCAB, (1, 7), generator=torch.Generator().manual_seed(2))
    new = 40
    got = pc.generate(ours, prompt, new, CTX, use_cache=use_cache)
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
    assert got.shape == (1, 7 + new)
    assert torch.equal(got, hf)


@needs_transformers
def test_forward_keywords_match_transformers(hf_model, ours):
    """The forward's fast paths (explicit positions, only some positions through the head)
    are GPT-2's forward too."""
    idx = torch.randint(0, VOCAB, (2, 20), generator=torch.Generator().manual_seed(5))
    keep = torch.rand(2, 20, generator=torch.Generator().manual_seed(6)) < 0.5
    with torch.no_grad():
        expected = hf_model(idx).logits
        got = ours(idx, positions=torch.arange(20), head_mask=keep)
        last = ours(idx, last_only=True)
    torch.testing.assert_close(got, expected[keep], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(last, expected[:, -1:], atol=1e-4, rtol=1e-4)


# --- the course's key/value cache ---------------------------------------------------------


@pytest.fixture(scope="module")
def model() -> pc.GPTModel:
    torch.manual_seed(0)
    return pc.GPTModel(tiny_config(context_length=CTX)).eval()


def test_cached_forward_in_chunks_equals_full_forward(model):
    idx = torch.randint(0, 97, (2, 12), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        full = model(idx)
        model.reset_kv_cache()
        parts = [model(idx[:, a:b], use_cache=True) for a, b in ((0, 5), (5, 8), (8, 9), (9, 12))]
        assert model.current_pos == 12
        keys = model.kv_cache.keys  # [layers, b, heads, room, head_dim], grown as needed
        assert keys.shape[:3] == (2, 2, 4) and keys.shape[3] >= 12 and keys.shape[4] == 8
        model.reset_kv_cache()
    torch.testing.assert_close(torch.cat(parts, dim=1), full, atol=1e-5, rtol=1e-5)


def test_the_growing_cache_never_holds_more_than_the_context(model):
    """``use_cache=True``'s cache doubles as the text grows, but stops at context_length
    (no position lies past it), so one token at a time fills it to exactly that size."""
    with torch.no_grad():
        model.reset_kv_cache()
        model(torch.zeros((1, 5), dtype=torch.long), use_cache=True)
        sizes = []
        while model.current_pos < CTX:
            model(torch.zeros((1, 1), dtype=torch.long), use_cache=True)
            sizes.append(model.kv_cache.keys.shape[3])
        model.reset_kv_cache()
    assert sizes == sorted(sizes) and sizes[-1] == CTX and len(set(sizes)) > 1


def test_reset_kv_cache_starts_over(model):
    idx = torch.randint(0, 97, (1, 6), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        model(idx[:, :3], use_cache=True)
        model.reset_kv_cache()
        assert model.current_pos == 0 and model.kv_cache is None
        again = model(idx, use_cache=True)  # positions from 0 again
        model.reset_kv_cache()
        torch.testing.assert_close(again, model(idx), atol=1e-5, rtol=1e-5)


def test_forward_without_cache_leaves_the_cache_alone(model):
    with torch.no_grad():
        model(torch.tensor([[1, 2, 3]]))
    assert model.current_pos == 0 and model.kv_cache is None


def test_too_long_input_is_refused_clearly(model):
    with pytest.raises(ValueError, match="65 tokens exceed context_length 64"):
        model(torch.zeros(1, CTX + 1, dtype=torch.long))
    with torch.no_grad():
        model(torch.zeros(1, CTX - 3, dtype=torch.long), use_cache=True)
        with pytest.raises(ValueError, match="66 tokens exceed context_length 64"):
            model(torch.zeros(1, 5, dtype=torch.long), use_cache=True)
    model.reset_kv_cache()


def test_split_heads_are_the_fused_projection_in_query_key_value_order(model):
    att = model.trf_blocks[0].att
    x = torch.randn(2, 5, EMB, generator=torch.Generator().manual_seed(6))
    q, k, v = att.split_heads(x)
    assert q.shape == k.shape == v.shape == (2, att.num_heads, 5, att.head_dim)
    with torch.no_grad():
        w_query, w_key, w_value = att.qkv.weight.split(EMB)
        b_query, b_key, b_value = att.qkv.bias.split(EMB)
        for got, w, b in ((q, w_query, b_query), (k, w_key, b_key), (v, w_value, b_value)):
            expected = (x @ w.T + b).view(2, 5, att.num_heads, att.head_dim).transpose(1, 2)
            torch.testing.assert_close(got, expected)


def test_attention_refuses_indivisible_heads():
    with pytest.raises(ValueError, match="emb_dim 30 must be divisible by n_heads 4"):
        pc.MultiHeadAttention(30, 30, 0.0, num_heads=4)


def test_module_names_follow_the_course(model):
    names = dict(model.named_modules())
    for name in (
        "tok_emb",
        "pos_emb",
        "drop_emb",
        "trf_blocks.0.att.qkv",
        "trf_blocks.0.att.out_proj",
        "trf_blocks.0.ff.layers.0",
        "trf_blocks.0.norm1",
        "trf_blocks.0.norm2",
        "trf_blocks.0.drop_shortcut",
        "final_norm",
        "out_head",
    ):
        assert name in names, name
    assert model.out_head.bias is None
    assert model.final_norm.eps == 1e-5


# --- configurations -----------------------------------------------------------------------


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


@pytest.mark.parametrize(
    ("given", "name"),
    [
        ("gpt2-medium (355M)", "gpt2-medium (355M)"),
        ("gpt2-medium", "gpt2-medium (355M)"),
        ("355M", "gpt2-medium (355M)"),
        ("  GPT2-Small ", "gpt2-small (124M)"),
        ("1558m", "gpt2-xl (1558M)"),
    ],
)
def test_resolve_model_name(given, name):
    assert pc.resolve_model_name(given) == name


@pytest.mark.parametrize("given", ["gpt2-huge", "125M", "", "gpt2"])
def test_resolve_model_name_lists_the_sizes(given):
    with pytest.raises(ValueError, match="unknown GPT-2 model .* gpt2-small \\(124M\\)"):
        pc.resolve_model_name(given)


def test_gpt2_config_names_and_overrides():
    assert pc.gpt2_config("gpt2-medium (355M)") == pc.gpt2_config("355M")
    assert pc.gpt2_config("355M") == {
        **pc.GPT_CONFIG_124M,
        **pc.MODEL_CONFIGS["gpt2-medium (355M)"],
    }
    cfg = pc.gpt2_config("124M", context_length=256, drop_rate=0.1)
    assert cfg == {**pc.GPT_CONFIG_124M, "context_length": 256, "drop_rate": 0.1}
    assert tuple(cfg) == pc.CONFIG_KEYS
    with pytest.raises(ValueError, match="unknown GPT-2 model"):
        pc.gpt2_config("gpt2-huge")
    with pytest.raises(ValueError, match="emb_dims"):
        pc.gpt2_config("124M", emb_dims=10)
    with pytest.raises(ValueError, match="n_heads"):
        pc.GPTModel({k: v for k, v in HF_CFG.items() if k != "n_heads"})


def test_gpt2_small_config_is_the_course_one():
    assert pc.GPT_CONFIG_124M == {
        "vocab_size": 50257,
        "context_length": 1024,
        "emb_dim": 768,
        "n_heads": 12,
        "n_layers": 12,
        "drop_rate": 0.0,
        "qkv_bias": True,
    }


# --- loading OpenAI's weights ---------------------------------------------------------------

HPARAMS = json.loads((TINY_CHECKPOINT / "hparams.json").read_text())
CKPT_CFG = pc.gpt2_config_from_hparams(HPARAMS)


@pytest.fixture(scope="module")
def params() -> dict:
    """The tiny TensorFlow checkpoint's weights, in the course's params layout."""
    return gd.load_gpt2_params_from_tf_ckpt(TINY_CHECKPOINT / "model.ckpt", HPARAMS)


def _state(model: torch.nn.Module) -> dict:
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_load_weights_maps_every_tensor(params):
    model = pc.GPTModel(CKPT_CFG)
    pc.load_weights_into_gpt(model, params)
    block, p = model.trf_blocks[1], params["blocks"][1]

    def same(param, array):
        torch.testing.assert_close(param.detach(), torch.from_numpy(array), rtol=0, atol=0)

    same(model.tok_emb.weight, params["wte"])
    same(model.pos_emb.weight, params["wpe"])
    same(model.out_head.weight, params["wte"])  # the head is tied to the token embedding
    same(block.att.qkv.weight, p["attn"]["c_attn"]["w"].T)
    same(block.att.qkv.bias, p["attn"]["c_attn"]["b"])
    same(block.att.out_proj.weight, p["attn"]["c_proj"]["w"].T)
    same(block.ff.layers[0].weight, p["mlp"]["c_fc"]["w"].T)
    same(block.ff.layers[2].bias, p["mlp"]["c_proj"]["b"])
    same(block.norm1.weight, p["ln_1"]["g"])
    same(block.norm2.bias, p["ln_2"]["b"])
    same(model.final_norm.weight, params["g"])
    same(model.final_norm.bias, params["b"])


def test_load_weights_rejects_bad_shape_and_changes_nothing(params):
    model = pc.GPTModel(CKPT_CFG)
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
    model = pc.GPTModel(CKPT_CFG)
    with pytest.raises(ValueError, match="lack 'g'"):
        pc.load_weights_into_gpt(model, {k: v for k, v in params.items() if k != "g"})
    no_ln = {**params, "blocks": [dict(b) for b in params["blocks"]]}
    del no_ln["blocks"][0]["ln_2"]
    with pytest.raises(ValueError, match=r"blocks\[0\]\.ln_2\.g"):
        pc.load_weights_into_gpt(model, no_ln)
    deeper = pc.GPTModel({**CKPT_CFG, "n_layers": 3})
    with pytest.raises(ValueError, match="2 blocks but the model has n_layers=3"):
        pc.load_weights_into_gpt(deeper, params)
    no_bias = pc.GPTModel({**CKPT_CFG, "qkv_bias": False})
    with pytest.raises(ValueError, match="qkv_bias=True"):
        pc.load_weights_into_gpt(no_bias, params)


def test_cudnn_attention_is_off():
    """cuDNN's attention builds a plan per new sequence length (ours change every step; on an
    H200 bf16 ran 7x slower than fp32); importing the model module turns it off."""
    assert not torch.backends.cuda.cudnn_sdp_enabled()
    assert (
        torch.backends.cuda.flash_sdp_enabled() and torch.backends.cuda.mem_efficient_sdp_enabled()
    )


@pytest.fixture
def two_threads():
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(threads)


def test_few_row_products_are_shared_among_threads(two_threads, monkeypatch):
    """``gemv.Linear``: a product of one or a few rows (batch-1 decoding, prompt lookup) goes
    through ``threaded_gemv`` and equals ``F.linear`` up to float rounding; everything else is
    ``nn.Linear`` exactly."""
    calls = []
    real = gemv.threaded_gemv
    monkeypatch.setattr(gemv, "threaded_gemv", lambda *a: calls.append(a) or real(*a))
    torch.manual_seed(0)
    layer = gemv.Linear(96, 1001)  # (an odd number of outputs: one row is left over)
    x = torch.randn(1, 1, 96)
    with torch.no_grad():
        got = layer(x)
        assert len(calls) == 1 and got.shape == (1, 1, 1001)
        torch.testing.assert_close(got, F.linear(x, layer.weight, layer.bias), rtol=1e-5, atol=1e-6)
        few = torch.randn(2, 3, 96)  # (prompt lookup's drafted tokens)
        expected = F.linear(few, layer.weight, layer.bias)
        torch.testing.assert_close(layer(few), expected, rtol=1e-5, atol=1e-6)
        assert len(calls) == 2
        rows = torch.randn(1, gemv.FEW_ROWS + 1, 96)
        assert torch.equal(layer(rows), F.linear(rows, layer.weight, layer.bias))
        half = copy.deepcopy(layer).to(torch.bfloat16)
        assert torch.equal(half(x.bfloat16()), F.linear(x.bfloat16(), half.weight, half.bias))
        torch.set_num_threads(1)
        assert torch.equal(layer(x), F.linear(x, layer.weight, layer.bias))
    torch.set_num_threads(2)
    assert torch.equal(layer(x), F.linear(x, layer.weight, layer.bias))  # (with gradients)
    assert len(calls) == 2


def test_greedy_tokens_are_the_same_with_the_threaded_products(two_threads):
    """Batch-1 decoding with the cache (one-row products, shared among threads) gives the
    tokens of the course's uncached loop (whole windows, plain products)."""
    torch.manual_seed(3)
    model = pc.GPTModel(tiny_config(vocab_size=2000, emb_dim=128, n_heads=4, n_layers=2)).eval()
    prompt = torch.randint(0, 2000, (1, 9), generator=torch.Generator().manual_seed(4))
    cached = pc.generate(model, prompt, 40, 64)
    assert torch.equal(cached, pc.generate(model, prompt, 40, 64, use_cache=False))


def test_prompt_lookup_gives_plain_greedy_tokens_with_the_threaded_products(two_threads):
    """Prompt lookup checks its drafted tokens a few rows at a time (threaded products too);
    its tokens are plain greedy decoding's, on prompts whose spans repeat (drafts are found)."""
    from runtime.engine import generate_batch

    torch.manual_seed(5)
    model = pc.GPTModel(
        tiny_config(vocab_size=2000, context_length=128, emb_dim=128, n_heads=4, n_layers=2)
    ).eval()
    span = torch.randint(0, 2000, (12,), generator=torch.Generator().manual_seed(6)).tolist()
    prompts = [span * 3, span[:5] + span]
    common = dict(batch_size=1, pad_token_id=0)
    plain = generate_batch(model, prompts, 30, 128, **common)
    assert generate_batch(model, prompts, 30, 128, draft_tokens=4, **common) == plain
