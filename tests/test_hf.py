"""minigpt.hf: our attention as a transformers attention implementation. Tiny random Hugging
Face models (odd sizes, GQA) built here give the same logits and greedy tokens with it as with
"sdpa", padded batches and encoders included; what it cannot compute is refused by name. Skipped without
transformers (an optional dependency: pip install 'minigpt-kernels[hf]')."""

import importlib
import importlib.util
import subprocess
import sys

import pytest
import torch

from minigpt.attention import _ext

HAVE_HF = importlib.util.find_spec("transformers") is not None
needs_hf = pytest.mark.skipif(not HAVE_HF, reason="transformers is not installed")
EXT = _ext.unavailable_reason() is None


def test_import_minigpt_does_not_import_transformers():
    code = ("import sys, minigpt, minigpt.hf, minigpt.bench.generate, minigpt.bench.profile\n"
            "bad = sorted(m for m in ('transformers', 'tokenizers', 'safetensors') "
            "if m in sys.modules)\n"
            "assert not bad, bad\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]


if HAVE_HF:
    import transformers
    from transformers import (AutoModelForCausalLM, BertConfig, BertModel, GPT2Config,
                              GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, MistralConfig,
                              MistralForCausalLM)

    import minigpt.hf.plugin as mhf

    transformers.logging.set_verbosity_error()


@pytest.fixture(scope="module")
def name():
    return mhf.register()


@pytest.fixture
def calls(monkeypatch):
    """Counts minigpt.attention calls made by minigpt.hf, by causal flag."""
    real, seen = mhf.attention, []

    def counting(q, k, v, *, causal=True, scale=None, backend=None):
        seen.append(causal)
        return real(q, k, v, causal=causal, scale=scale, backend=backend)

    monkeypatch.setattr(mhf, "attention", counting)
    return seen


def tiny_llama(seed=0, **kw):
    torch.manual_seed(seed)
    kw = {"num_key_value_heads": 2, **kw}
    cfg = LlamaConfig(vocab_size=101, hidden_size=96, intermediate_size=136, num_hidden_layers=2,
                      num_attention_heads=6, max_position_embeddings=128, **kw)
    return LlamaForCausalLM(cfg).eval()


def tiny_gpt2(seed=0, **kw):
    torch.manual_seed(seed)
    cfg = GPT2Config(vocab_size=101, n_embd=96, n_layer=2, n_head=6, n_positions=128, **kw)
    return GPT2LMHeadModel(cfg).eval()


def ids(B=2, T=23, seed=1):
    return torch.randint(101, (B, T), generator=torch.Generator().manual_seed(seed))


def logits(model, impl, x, **kw):
    model.set_attn_implementation(impl)
    with torch.no_grad():
        return model(x, **kw).logits


def greedy(model, impl, x, n=20, **kw):
    model.set_attn_implementation(impl)
    with torch.no_grad():
        return model.generate(x, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                              pad_token_id=0, **kw)


MODELS = {
    "llama-gqa": lambda: tiny_llama(),
    "llama-mqa-untied": lambda: tiny_llama(num_key_value_heads=1, tie_word_embeddings=False),
    "gpt2": lambda: tiny_gpt2(),
    "gpt2-layer-scaled": lambda: tiny_gpt2(scale_attn_by_inverse_layer_idx=True),
}


@needs_hf
@pytest.mark.parametrize("model", MODELS)
def test_logits_and_greedy_tokens_match_sdpa(name, calls, model):
    m = MODELS[model]()
    x = ids()
    torch.testing.assert_close(logits(m, name, x), logits(m, "sdpa", x), atol=1e-5, rtol=1e-5)
    assert calls and all(calls)  # our attention ran, one causal call per layer
    assert torch.equal(greedy(m, name, x[:1]), greedy(m, "sdpa", x[:1]))


@needs_hf
@pytest.mark.skipif(not EXT, reason=f"minigpt._C unavailable: {_ext.unavailable_reason()}")
def test_ext_backend_runs_the_compiled_kernels(monkeypatch):
    """register(backend="ext") runs the compiled op (and fails instead of falling back)."""
    ext_name = mhf.register("minigpt-ext", backend="ext")
    seen = []
    real = torch.ops.minigpt.attention_forward
    monkeypatch.setattr(torch.ops.minigpt, "attention_forward",
                        lambda *a: (seen.append(a[0].shape), real(*a))[1], raising=False)
    m = tiny_llama()
    x = ids()
    torch.testing.assert_close(logits(m, ext_name, x), logits(m, "sdpa", x), atol=1e-5,
                               rtol=1e-5)
    assert len(seen) == 2 and seen[0] == (2, 6, 23, 16)  # (B, Hq, T, D), no repeat of kv heads


@needs_hf
def test_from_pretrained_with_our_implementation(name, tmp_path):
    m = tiny_llama(seed=3)
    m.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation=name).eval()
    assert loaded.config._attn_implementation == name
    x = ids(seed=4)
    torch.testing.assert_close(logits(loaded, name, x), logits(m, "sdpa", x), atol=1e-5,
                               rtol=1e-5)


@needs_hf
@pytest.mark.parametrize("model", ["llama-gqa", "gpt2"])
def test_padded_batches_match_sdpa(name, calls, model):
    """Left padding (generation's) and right padding (training's): equal logits at every real
    token, equal greedy tokens for a left-padded batch."""
    m = MODELS[model]()
    x = ids(B=3)
    left = torch.ones_like(x)
    left[0, :5] = 0
    left[2, :1] = 0
    ours, ref = logits(m, name, x, attention_mask=left), logits(m, "sdpa", x, attention_mask=left)
    real = left.bool()
    torch.testing.assert_close(ours[real], ref[real], atol=1e-5, rtol=1e-5)
    assert not ours[~real].isnan().any()
    right = torch.ones_like(x)
    right[1, -4:] = 0
    torch.testing.assert_close(logits(m, name, x, attention_mask=right)[right.bool()],
                               logits(m, "sdpa", x, attention_mask=right)[right.bool()],
                               atol=1e-5, rtol=1e-5)
    calls.clear()
    a = greedy(m, name, x, n=12, attention_mask=left)
    assert torch.equal(a, greedy(m, "sdpa", x, n=12, attention_mask=left))
    assert False in calls  # decode steps of padded rows ran as non-causal calls on their keys


@needs_hf
def test_static_cache_generation_matches_sdpa(name):
    """A static cache passes keys past the current position, hidden by the mask."""
    m = tiny_llama(seed=5)
    x = ids(B=1, seed=6)
    assert torch.equal(greedy(m, name, x, n=10, cache_implementation="static"),
                       greedy(m, "sdpa", x, n=10, cache_implementation="static"))


@needs_hf
def test_gradients_match_sdpa(name):
    """Fine-tuning a Hugging Face model on our kernels: the same gradients as with sdpa."""
    x = ids()
    grads = {}
    for impl in (name, "sdpa"):
        m = tiny_llama(seed=7).train()
        m.set_attn_implementation(impl)
        m(x, labels=x).loss.backward()
        grads[impl] = [p.grad.clone() for p in m.parameters()]
    for a, b in zip(grads[name], grads["sdpa"]):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


@needs_hf
def test_encoder_and_bidirectional_decoder_match_sdpa(name, calls):
    """Non-causal attention: a BERT encoder (with and without padding) and a Llama configured
    with is_causal=False, whose masks transformers builds bidirectional."""
    torch.manual_seed(0)
    bert = BertModel(BertConfig(vocab_size=101, hidden_size=96, num_hidden_layers=2,
                                num_attention_heads=6, intermediate_size=136)).eval()
    x = ids()
    padded = torch.ones_like(x)
    padded[1, -5:] = 0
    for mask in (None, padded):
        outs = []
        for impl in (name, "sdpa"):
            bert.set_attn_implementation(impl)
            with torch.no_grad():
                outs.append(bert(x, attention_mask=mask).last_hidden_state)
        real = torch.ones_like(x, dtype=torch.bool) if mask is None else mask.bool()
        torch.testing.assert_close(outs[0][real], outs[1][real], atol=1e-5, rtol=1e-5)
    assert calls and not any(calls)  # non-causal calls only
    llama = tiny_llama()
    llama.config.is_causal = False
    torch.testing.assert_close(logits(llama, name, x), logits(llama, "sdpa", x), atol=1e-5,
                               rtol=1e-5)


@needs_hf
def test_non_causal_module_without_mask_sees_every_key():
    q, k, v = torch.randn(1, 6, 5, 16), torch.randn(1, 2, 7, 16), torch.randn(1, 2, 7, 16)
    module = torch.nn.Module()
    module.is_causal = False  # cross-attention, say: 5 queries against 7 encoder states
    out, weights = mhf.attention_forward(module, q, k, v, None, scaling=0.25)
    ref = torch.nn.functional.scaled_dot_product_attention(q, k, v, scale=0.25, enable_gqa=True)
    assert weights is None and out.shape == (1, 5, 6, 16)
    torch.testing.assert_close(out, ref.transpose(1, 2), atol=1e-6, rtol=1e-5)


# ---------------------------------------------------------------------------------------------
# Refusals: never silently wrong.

@needs_hf
def test_refuses_a_binding_sliding_window(name):
    cfg = MistralConfig(vocab_size=101, hidden_size=96, intermediate_size=136,
                        num_hidden_layers=1, num_attention_heads=6, num_key_value_heads=2,
                        sliding_window=8)
    torch.manual_seed(0)
    m = MistralForCausalLM(cfg).eval()
    with pytest.raises(ValueError, match="sliding-window attention"):
        logits(m, name, ids())
    short = ids(T=8)  # a window no shorter than the keys changes nothing: runs
    torch.testing.assert_close(logits(m, name, short), logits(m, "sdpa", short), atol=1e-5,
                               rtol=1e-5)


@needs_hf
def test_refuses_attention_dropout_in_training(name):
    m = tiny_llama(attention_dropout=0.1).train()
    m.set_attn_implementation(name)
    with pytest.raises(ValueError, match=r"attention dropout \(dropout=0.1\)"):
        m(ids())


@needs_hf
@pytest.mark.parametrize("kwargs, pattern", [
    ({"softcap": 30.0}, "softcapping"),
    ({"s_aux": torch.zeros(6)}, "attention sinks"),
    ({"position_bias": torch.zeros(1, 6, 4, 4)}, "position bias"),
    ({"output_attentions": True}, "output_attentions"),
    ({"sliding_window": 3}, "sliding-window"),
])
def test_attention_forward_refuses_features(kwargs, pattern):
    q, k, v = torch.randn(1, 6, 4, 16), torch.randn(1, 2, 4, 16), torch.randn(1, 2, 4, 16)
    with pytest.raises(ValueError, match=pattern):
        mhf.attention_forward(torch.nn.Module(), q, k, v, None, scaling=0.25, **kwargs)


def _causal(Tq, Tk):
    return torch.arange(Tk)[None, :] <= torch.arange(Tq)[:, None] + (Tk - Tq)


@needs_hf
def test_mask_plan_of_padding_patterns():
    full = _causal(6, 6)[None, None]
    assert mhf.mask_plan(full, 1) == [[(0, 6, 0, 6, True)]]
    left = full & (torch.arange(6) >= 2)  # two pad tokens in front: their queries see nothing
    assert mhf.mask_plan(left, 1) == [[(2, 6, 2, 6, True)]]
    right = full & (torch.arange(6) < 4)  # padding queries at the end see every real key
    assert mhf.mask_plan(right, 1) == [[(0, 4, 0, 4, True), (4, 6, 0, 4, False)]]
    static = torch.cat([_causal(2, 5)[None, None], torch.zeros(1, 1, 2, 3, dtype=torch.bool)],
                       -1)  # a static cache's unused slots after the 5 real keys
    assert mhf.mask_plan(static, 2) == [[(0, 2, 0, 5, True)]] * 2  # batch-1 mask broadcast
    decode = torch.ones(1, 1, 1, 7, dtype=torch.bool)
    decode[..., :3] = False
    assert mhf.mask_plan(decode, 1) == [[(0, 1, 3, 7, False)]]
    additive = torch.zeros(1, 1, 6, 6).masked_fill(~full, torch.finfo(torch.float32).min)
    assert mhf.mask_plan(additive, 1) == mhf.mask_plan(full, 1)


@needs_hf
@pytest.mark.parametrize("make, pattern", [
    (lambda m: m & (torch.arange(6)[None, :] > torch.arange(6)[:, None] - 3),
     "start at different keys"),
    (lambda m: m & (torch.arange(6) != 2), "gaps"),
    (lambda m: torch.cat([m, ~m], 1), "differ between heads"),
    (lambda m: torch.zeros(m.shape).masked_fill(~m, float("-inf")) + 0.5,
     "additive attention bias"),
])
def test_mask_plan_refuses_other_patterns(make, pattern):
    with pytest.raises(ValueError, match=pattern):
        mhf.mask_plan(make(_causal(6, 6)[None, None]), 1)


@needs_hf
def test_mask_function_skips_only_plain_causal(name):
    from transformers.masking_utils import causal_mask_function, sliding_window_causal_mask_function

    assert mhf.causal_mask(2, 5, 5, mask_function=causal_mask_function) is None
    assert mhf.causal_mask(1, 1, 9, q_offset=8, mask_function=causal_mask_function) is None
    padded = torch.ones(2, 9, dtype=torch.bool)
    padded[0, 0] = False
    mask = mhf.causal_mask(2, 1, 9, q_offset=8, mask_function=causal_mask_function,
                           attention_mask=padded)
    assert mask.shape == (2, 1, 1, 9) and mask[0, 0, 0].tolist() == [False] + [True] * 8
    prefill_static = mhf.causal_mask(1, 4, 9, mask_function=causal_mask_function)  # top-left
    expected = torch.cat([_causal(4, 4), torch.zeros(4, 5, dtype=torch.bool)], 1)
    assert torch.equal(prefill_static[0, 0], expected)
    window = mhf.causal_mask(1, 6, 6, mask_function=sliding_window_causal_mask_function(3))
    assert window is not None


@needs_hf
def test_register_rejects_unknown_backend():
    with pytest.raises(ValueError, match="backend must be one of"):
        mhf.register("minigpt-bad", backend="flash")
