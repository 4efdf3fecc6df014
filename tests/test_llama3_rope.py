"""Llama 3.1/3.2's RoPE scaling (rope_type "llama3") against transformers, on tiny random
LlamaForCausalLM models, at positions past the original context, with and without the KV cache."""

import json

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("safetensors")

from minigpt import GPT, GPTConfig  # noqa: E402
from minigpt.config import ConfigError  # noqa: E402
from minigpt.positions import RotaryEmbedding  # noqa: E402
from minigpt.hf.pretrained import PretrainedError  # noqa: E402

TOL = dict(atol=2e-5, rtol=1e-4)
# Past position ~64 transformers' float32 angles (pos * inv_freq in float32) drift by ~1e-5 rad
# from ours (float64); the logits then differ by up to ~5e-5 (scale ~5). A wrong scaling or
# none differs by more than 1e-1 (asserted below).
TOL_LONG = dict(atol=2e-4, rtol=1e-3)
# head_dim 16, theta 500: wavelengths 6.3, 13.6, 29.7, 64, ... positions, so with an original
# context of 32 and high_freq_factor 4 the frequencies fall in all three bands (kept below 8,
# interpolated between 8 and 32, divided by factor above 32).
SCALING = {"rope_type": "llama3", "factor": 4.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
           "original_max_position_embeddings": 32}


def _llama(tmp_path, scaling=SCALING, seed=0):
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(vocab_size=67, hidden_size=48, intermediate_size=64,
                                   num_hidden_layers=2, num_attention_heads=3,
                                   num_key_value_heads=1, head_dim=16,
                                   max_position_embeddings=160, rope_theta=500.0,
                                   rope_scaling=dict(scaling), bos_token_id=None,
                                   eos_token_id=None)
    hf = transformers.LlamaForCausalLM(cfg).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in hf.named_parameters():
            p.add_(torch.randn(p.shape, generator=g) * (0.1 if "norm" in name else 0.3))
    hf.save_pretrained(tmp_path / "llama3")
    return hf, tmp_path / "llama3"


def test_inv_freq_matches_transformers():
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    cfg = transformers.LlamaConfig(hidden_size=48, num_attention_heads=3, head_dim=16,
                                   rope_theta=500.0, rope_scaling=dict(SCALING),
                                   max_position_embeddings=160)
    theirs, _ = ROPE_INIT_FUNCTIONS["llama3"](cfg, "cpu")
    ours = RotaryEmbedding.inv_freq(16, 500.0, SCALING, torch.float64)
    plain = RotaryEmbedding.inv_freq(16, 500.0, None, torch.float64)
    torch.testing.assert_close(ours.float(), theirs.float(), rtol=1e-6, atol=0)
    assert (ours == plain).any() and (ours < plain).sum() >= 3  # kept, interpolated, divided


def test_llama3_logits_past_the_original_context(tmp_path):
    hf, path = _llama(tmp_path)
    model = GPT.from_pretrained(str(path)).eval()
    assert model.config.rope_scaling == SCALING
    ids = torch.randint(0, 67, (2, 150), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = hf(ids).logits
        logits, _ = model(ids)
    torch.testing.assert_close(logits, expected, **TOL_LONG)
    # the scaling matters at these positions: plain RoPE gives other logits
    plain = GPTConfig(**{**model.config.to_dict(), "rope_scaling": None})
    unscaled = GPT(plain).eval()
    unscaled.load_state_dict(model.state_dict())
    with torch.no_grad():
        assert (unscaled(ids)[0] - expected)[:, 40:].abs().max() > 1e-1


def test_llama3_through_the_kv_cache(tmp_path):
    hf, path = _llama(tmp_path, seed=2)
    model = GPT.from_pretrained(str(path)).eval()
    prompt = torch.randint(0, 67, (1, 40), generator=torch.Generator().manual_seed(3))
    ours = model.generate(prompt, 40, temperature=0)  # positions up to 80 > 32
    theirs = hf.generate(prompt, max_new_tokens=40, min_new_tokens=40, do_sample=False)
    assert ours.tolist() == theirs.tolist()
    uncached = model.generate(prompt, 40, temperature=0, use_cache=False)
    assert uncached.tolist() == ours.tolist()


def test_llama3_survives_export_and_checkpoints(tmp_path):
    from minigpt.hf.export import export_hf
    from minigpt.hf.pretrained import pretrained_state

    hf, path = _llama(tmp_path)
    state = pretrained_state(str(path), tokenizer=False)
    again = GPTConfig.from_dict(json.loads(json.dumps(state["model_config"])))
    assert again.rope_scaling == SCALING
    out = tmp_path / "exported"
    export_hf(state, out)
    back = transformers.LlamaForCausalLM.from_pretrained(out).eval()
    ids = torch.arange(100)[None] % 67
    with torch.no_grad():
        torch.testing.assert_close(back(ids).logits, hf(ids).logits, **TOL_LONG)


@pytest.mark.parametrize("params, named", [
    ({"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32},
     "rope_type 'yarn'"),
    ({"rope_type": "linear", "factor": 2.0}, "rope_type 'linear'"),
    ({"rope_type": "llama3", "factor": 4.0}, "low_freq_factor"),
])
def test_other_scalings_are_refused_by_name(tmp_path, params, named):
    hf, path = _llama(tmp_path)
    cfg = json.loads((path / "config.json").read_text())
    cfg["rope_parameters"] = {"rope_theta": 500.0, **params}
    (path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(PretrainedError) as info:
        GPT.from_pretrained(str(path))
    assert named in str(info.value) and "\n" not in str(info.value)


def test_config_checks_rope_scaling():
    with pytest.raises(ConfigError, match="rope_scaling"):
        GPTConfig(rope_scaling={"rope_type": "yarn", "factor": 2.0})
    with pytest.raises(ConfigError, match="rope_scaling"):
        GPTConfig(rope_scaling={**SCALING, "low_freq_factor": 8.0})
