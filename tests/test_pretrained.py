"""Pretrained models: Hugging Face GPT-2 and Llama into minigpt and back, offline.

Tiny random GPT2LMHeadModel and LlamaForCausalLM models (odd sizes, GQA, tied and untied heads)
are built with transformers inside the tests and saved with save_pretrained to a temporary
directory; minigpt loads them and must give the same logits (float32 tolerance) and the same
greedy tokens, export them back so that transformers gives the same logits again, refuse
configurations it cannot compute by name, fine-tune them through train(), and sample, draw and
ablate them from the command lines.
"""

import json
import subprocess
import sys

import pytest
import torch

transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")
pytest.importorskip("safetensors")

from conftest import tiktoken_available  # noqa: E402
from minigpt import GPT, GPTConfig  # noqa: E402
from minigpt.hf.export import export_hf, load_safetensors  # noqa: E402
from minigpt.hf.convert import halves_to_pairs, pairs_to_halves  # noqa: E402
from minigpt.hf.pretrained import PretrainedError, load_tokenizer, pretrained_state  # noqa: E402
from minigpt.generation import TextStream  # noqa: E402
from minigpt.tokenizer import HFTokenizer  # noqa: E402

TOL = dict(atol=2e-5, rtol=1e-4)  # float32: a few ulps of the logits' size, summed over layers

GPT2_CONFIGS = {
    # odd widths: 3 heads of 12, an MLP of 50, a 97-token vocabulary
    "tied": dict(vocab_size=97, n_positions=40, n_embd=36, n_layer=3, n_head=3, n_inner=50,
                 layer_norm_epsilon=1e-4),
    "untied-gelu": dict(vocab_size=97, n_positions=40, n_embd=40, n_layer=2, n_head=5,
                        activation_function="gelu", tie_word_embeddings=False),
}
LLAMA_CONFIGS = {
    # GQA: 6 query heads share 2 key/value heads; untied head (Llama's default)
    "gqa-untied": dict(vocab_size=101, hidden_size=48, intermediate_size=70,
                       num_hidden_layers=2, num_attention_heads=6, num_key_value_heads=2,
                       max_position_embeddings=64, rope_theta=500.0, rms_norm_eps=1e-5),
    # MQA with a head_dim of its own (16, not 48 / 4), tied head, biases everywhere
    "mqa-tied-bias": dict(vocab_size=101, hidden_size=48, intermediate_size=40,
                          num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=1,
                          head_dim=16, tie_word_embeddings=True, attention_bias=True,
                          mlp_bias=True, max_position_embeddings=64),
}


def _perturb(model, std=0.3, seed=0):
    """Random weights large enough that attention is far from uniform (so that a wrong RoPE
    pairing or a transposed matrix shows), norms' gains around 1."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.add_(torch.randn(p.shape, generator=g) * (0.1 if "norm" in name or "ln" in name
                                                        else std))
    return model.eval()


def hf_model(kind, name, tmp_path, seed=0):
    """A tiny transformers model saved to tmp_path/kind-name; returns (model, directory)."""
    torch.manual_seed(seed)
    if kind == "gpt2":
        cfg = transformers.GPT2Config(**GPT2_CONFIGS[name], bos_token_id=None,
                                      eos_token_id=None)
        model = transformers.GPT2LMHeadModel(cfg)
    else:
        cfg = transformers.LlamaConfig(**LLAMA_CONFIGS[name], bos_token_id=None,
                                       eos_token_id=None)
        model = transformers.LlamaForCausalLM(cfg)
    _perturb(model, seed=seed)
    path = tmp_path / f"{kind}-{name}"
    model.save_pretrained(path)
    return model, path


ALL = [("gpt2", n) for n in GPT2_CONFIGS] + [("llama", n) for n in LLAMA_CONFIGS]


@pytest.mark.parametrize("kind, name", ALL)
def test_logits_match_transformers(kind, name, tmp_path):
    hf, path = hf_model(kind, name, tmp_path)
    model = GPT.from_pretrained(str(path)).eval()
    cfg = model.config
    assert cfg.tie_embeddings == hf.config.tie_word_embeddings
    assert (model.lm_head.weight is model.transformer.wte.weight) == cfg.tie_embeddings
    assert model.num_params() == hf.num_parameters()
    ids = torch.randint(0, cfg.vocab_size, (3, 37), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = hf(ids).logits
        logits, _ = model(ids)
    torch.testing.assert_close(logits, expected, **TOL)
    assert expected.std() > 0.5  # not a near-constant output that anything would match


@pytest.mark.parametrize("kind, name", [("gpt2", "tied"), ("llama", "gqa-untied")])
def test_greedy_generation_matches_transformers(kind, name, tmp_path):
    hf, path = hf_model(kind, name, tmp_path)
    model = GPT.from_pretrained(str(path)).eval()
    prompt = torch.randint(0, model.config.vocab_size, (1, 5),
                           generator=torch.Generator().manual_seed(2))
    ours = model.generate(prompt, 24, temperature=0.0)
    theirs = hf.generate(prompt, max_new_tokens=24, do_sample=False,
                         attention_mask=torch.ones_like(prompt))
    assert ours.tolist() == theirs.tolist()


@pytest.mark.parametrize("kind, name", ALL)
def test_export_then_transformers_gives_the_same_logits(kind, name, tmp_path):
    hf, path = hf_model(kind, name, tmp_path)
    state = pretrained_state(str(path), tokenizer=False)
    info = export_hf(state, tmp_path / "exported")
    assert info["architecture"] == kind
    again = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "exported").eval()
    assert type(again) is type(hf)
    ids = torch.randint(0, hf.config.vocab_size, (2, 29))
    with torch.no_grad():
        torch.testing.assert_close(again(ids).logits, hf(ids).logits, **TOL)


@pytest.mark.parametrize("options, arch", [
    # a GPT-2-shaped minigpt model without biases: exported with zero biases
    (dict(pos_embedding="learned", activation="gelu_tanh", bias=False), "gpt2"),
    (dict(pos_embedding="rope", norm="rmsnorm", mlp="glu", activation="silu", n_kv_head=2,
          intermediate_size=44, tie_embeddings=False, rope_theta=321.0), "llama"),
])
def test_minigpt_models_export_to_transformers(options, arch, tmp_path):
    torch.manual_seed(0)
    model = _perturb(GPT(GPTConfig(vocab_size=70, block_size=32, n_layer=2, n_head=4,
                                   n_embd=32, **options)), std=0.2)
    state = {"model": model.state_dict(), "model_config": model.config.to_dict(),
             "tokenizer": {"kind": "char", "chars": "abc"}}
    info = export_hf(state, tmp_path / "out")
    assert info["architecture"] == arch and info["tokenizer"] is None
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    ids = torch.randint(0, 70, (2, 32))
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, model(ids)[0], **TOL)


def test_export_refuses_a_model_transformers_has_no_architecture_for(tmp_path, capsys):
    from minigpt.checkpoint import save_checkpoint
    from minigpt.hf.export import main

    model = GPT(GPTConfig(vocab_size=10, block_size=8, n_layer=1, n_head=2, n_embd=16))
    save_checkpoint({"model": model.state_dict(), "model_config": model.config.to_dict(),
                     "tokenizer": {"kind": "char", "chars": "abcdefghij"}}, tmp_path / "c.pt")
    assert main(["--checkpoint", str(tmp_path / "c.pt"), "--format", "hf",
                 str(tmp_path / "hf")]) == 2
    err = capsys.readouterr().err
    assert "pos_embedding='rope'" in err and "norm='layernorm'" in err and "safetensors" in err
    assert not (tmp_path / "hf").exists()
    # Any model goes to safetensors + JSON, and comes back the same.
    assert main(["--checkpoint", str(tmp_path / "c.pt"), "--format", "safetensors",
                 str(tmp_path / "m.safetensors")]) == 0
    meta = json.loads((tmp_path / "m.json").read_text())
    assert meta["model_config"]["n_embd"] == 16 and meta["tokenizer"]["kind"] == "char"
    back = GPT.from_checkpoint(load_safetensors(tmp_path / "m.safetensors")).eval()
    ids = torch.randint(0, 10, (1, 8))
    assert torch.equal(back(ids)[0], model.eval()(ids)[0])
    assert back.lm_head.weight is back.transformer.wte.weight


def _edit_config(path, **changes):
    cfg = json.loads((path / "config.json").read_text())
    for key, value in changes.items():
        if value is _DROP:
            cfg.pop(key, None)
        else:
            cfg[key] = value
    (path / "config.json").write_text(json.dumps(cfg))


_DROP = object()


@pytest.mark.parametrize("kind, changes, named", [
    ("llama", dict(rope_parameters={"rope_type": "llama3", "rope_theta": 5e5, "factor": 8.0}),
     "rope_type 'llama3'"),
    ("llama", dict(rope_parameters=_DROP, rope_theta=1e4,
                   rope_scaling={"type": "linear", "factor": 2.0}), "rope_scaling"),
    ("llama", dict(sliding_window=16), "sliding_window"),
    ("llama", dict(hidden_act="quick_gelu"), "hidden_act='quick_gelu'"),
    ("llama", dict(architectures=["MistralForCausalLM"], model_type="mistral"),
     "MistralForCausalLM"),
    ("gpt2", dict(scale_attn_by_inverse_layer_idx=True), "scale_attn_by_inverse_layer_idx"),
    ("gpt2", dict(add_cross_attention=True), "add_cross_attention"),
])
def test_unsupported_configs_are_refused_by_name(kind, changes, named, tmp_path):
    name = "tied" if kind == "gpt2" else "gqa-untied"
    _, path = hf_model(kind, name, tmp_path)
    _edit_config(path, **changes)
    with pytest.raises(PretrainedError) as info:
        GPT.from_pretrained(str(path))
    assert named in str(info.value) and "\n" not in str(info.value)


def test_weights_the_config_does_not_explain_are_refused(tmp_path):
    from safetensors.torch import load_file, save_file

    _, path = hf_model("llama", "gqa-untied", tmp_path)
    weights = load_file(path / "model.safetensors")
    weights["model.layers.0.self_attn.q_norm.weight"] = torch.ones(8)
    save_file(weights, path / "model.safetensors")
    with pytest.raises(PretrainedError, match="q_norm"):
        GPT.from_pretrained(str(path))


def test_sharded_safetensors_and_pytorch_bin_files(tmp_path):
    hf, path = hf_model("llama", "gqa-untied", tmp_path)
    hf.save_pretrained(tmp_path / "sharded", max_shard_size="20KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").is_file()
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "config.json").write_text((path / "config.json").read_text())
    torch.save(hf.state_dict(), bin_dir / "pytorch_model.bin")
    ids = torch.randint(0, 101, (1, 20))
    with torch.no_grad():
        expected = hf(ids).logits
        for directory in (tmp_path / "sharded", bin_dir):
            torch.testing.assert_close(GPT.from_pretrained(str(directory)).eval()(ids)[0],
                                       expected, **TOL)


def test_block_size_cuts_gpt2_positions(tmp_path):
    hf, path = hf_model("gpt2", "tied", tmp_path)
    model = GPT.from_pretrained(str(path), block_size=16).eval()
    assert model.config.block_size == 16 and model.transformer.wpe.weight.shape[0] == 16
    ids = torch.randint(0, 97, (2, 16))
    with torch.no_grad():
        torch.testing.assert_close(model(ids)[0], hf(ids).logits, **TOL)
    with pytest.raises(PretrainedError, match=r"block_size 41: must be in \[1, 40\]"):
        GPT.from_pretrained(str(path), block_size=41)


def test_missing_model_errors_are_one_line_and_say_what_to_download(tmp_path, monkeypatch):
    with pytest.raises(PretrainedError, match="no such directory"):
        pretrained_state(str(tmp_path / "nope"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # no network, and an empty cache
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    with pytest.raises(PretrainedError) as info:
        pretrained_state("someone/tiny-llama")
    msg = str(info.value)
    assert "\n" not in msg and "someone/tiny-llama" in msg and "hf download" in msg
    assert "--local-dir" in msg


def test_rotate_half_and_our_pairs_are_the_same_rotation():
    """RoPE with Hugging Face's rotate_half (pairs i, i + D/2) on q equals ours (pairs 2i,
    2i+1) on the permuted q, permuted back: so permuting the projection rows is exact."""
    from minigpt.positions import RotaryEmbedding

    H, D, T = 3, 8, 5
    x = torch.randn(1, T, H, D, dtype=torch.float64)
    pos = torch.arange(T)
    inv_freq = 1.0 / (10000.0 ** (torch.arange(0, D, 2, dtype=torch.float64) / D))
    angles = torch.cat([pos[:, None] * inv_freq] * 2, dim=-1)  # (T, D): HF's emb
    rotate_half = torch.cat([-x[..., D // 2:], x[..., :D // 2]], dim=-1)
    theirs = x * angles.cos()[None, :, None] + rotate_half * angles.sin()[None, :, None]
    # Per head: our rows = halves_to_pairs(their rows).
    ours_in = halves_to_pairs(x[0].permute(1, 2, 0).reshape(H * D, T), H, D)  # (H*D, T)
    ours_in = ours_in.reshape(H, D, T).permute(2, 0, 1)[None]  # (1, T, H, D)
    ours = RotaryEmbedding(D, 10000.0)(ours_in, pos)
    back = pairs_to_halves(ours[0].permute(1, 2, 0).reshape(H * D, T), H, D)
    torch.testing.assert_close(back.reshape(H, D, T).permute(2, 0, 1)[None], theirs)
    w = torch.randn(H * D, 7)
    assert torch.equal(pairs_to_halves(halves_to_pairs(w, H, D), H, D), w)


# ---------------------------------------------------------------------------------------------
# Tokenizers, fine-tuning and the command lines


def _byte_level_tokenizer(text, vocab_size=300):
    """A small byte-level BPE trained on text, starting every encoding with <s> (as Llama's)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([text], trainer)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A",
                                                       special_tokens=[("<s>", 0)])
    return tok


def _sentencepiece_style_tokenizer():
    """Llama-2-style: "▁" for spaces, <0xNN> byte-fallback tokens, no byte-level alphabet."""
    from tokenizers import Tokenizer, decoders, models, normalizers

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    vocab.update({f"<0x{b:02X}>": 3 + b for b in range(256)})
    for piece in ["▁", "a", "b", "c", "▁a", "ab"]:
        vocab[piece] = len(vocab)
    tok = Tokenizer(models.BPE(vocab, [("▁", "a"), ("a", "b")], unk_token="<unk>",
                               byte_fallback=True))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"),
                                           normalizers.Replace(" ", "▁")])
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(),
                                     decoders.Fuse(), decoders.Strip(" ", 1, 0)])
    from tokenizers import AddedToken

    tok.add_special_tokens([AddedToken("<s>", special=True), AddedToken("</s>", special=True)])
    return tok


@pytest.mark.parametrize("style", ["byte-level", "sentencepiece"])
def test_hf_tokenizer_streams_multibyte_characters_whole(style, text_file):
    text = "ab ca é😀 b"
    tok = (_byte_level_tokenizer(text_file.read_text() + text) if style == "byte-level"
           else _sentencepiece_style_tokenizer())
    ours = HFTokenizer(tok.to_str())
    ids = ours.encode(text)
    assert ours.decode(ids) == text
    stream = TextStream(ours)
    pieces = [stream.push([i]) for i in ids] + [stream.flush()]
    assert "".join(pieces).strip() == text and "\ufffd" not in "".join(pieces)
    assert from_state_round_trip(ours).encode(text) == ids


def from_state_round_trip(tok):
    from minigpt.tokenizer import from_state

    return from_state(tok.state_dict())


@pytest.fixture
def tiny_llama_dir(tmp_path, text_file):
    """A tiny Llama with its own tokenizer.json, as a Hugging Face directory."""
    tok = _byte_level_tokenizer(text_file.read_text())
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=tok.get_vocab_size(), hidden_size=32,
                                   intermediate_size=48, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2,
                                   max_position_embeddings=64, bos_token_id=0,
                                   eos_token_id=1)
    path = tmp_path / "tiny-llama"
    transformers.LlamaForCausalLM(cfg).save_pretrained(path)
    tok.save(str(path / "tokenizer.json"))
    return path


def test_llama_tokenizer_comes_from_tokenizer_json(tiny_llama_dir):
    tok = load_tokenizer(str(tiny_llama_dir))
    assert tok.name == "hf" and tok.encode("abc")[0] == 0  # <s> first, as Llama's do
    (tiny_llama_dir / "tokenizer.json").unlink()
    with pytest.raises(PretrainedError, match="no tokenizer.json"):
        load_tokenizer(str(tiny_llama_dir))


def test_finetune_through_train(tiny_llama_dir, text_file, tmp_path):
    from minigpt.checkpoint import load_checkpoint
    from minigpt.tokenizer import from_state
    from minigpt.train.loop import TrainConfig, train

    common = dict(init_from=str(tiny_llama_dir), data=str(text_file), block_size=32,
                  batch_size=4, eval_interval=4, eval_iters=2, warmup_iters=0,
                  progress=False, attn_backend="sdpa")
    # A learning rate of ~0 leaves the pretrained weights: the checkpoint is that model.
    frozen = train(TrainConfig(out_dir=str(tmp_path / "frozen"), max_iters=1,
                               learning_rate=1e-12, min_lr=0.0, **common), log=lambda m: None)
    state = load_checkpoint(frozen.checkpoint)
    assert state["tokenizer"]["kind"] == "hf" and state["train_config"]["tokenizer"] == "hf"
    assert state["model_config"]["block_size"] == 32 and state["model_config"]["mlp"] == "glu"
    hf = transformers.LlamaForCausalLM.from_pretrained(tiny_llama_dir).eval()
    ids = torch.tensor([from_state(state["tokenizer"]).encode("to be or not")])
    with torch.no_grad():
        torch.testing.assert_close(GPT.from_checkpoint(state).eval()(ids)[0],
                                   hf(ids).logits, **TOL)
    # A real learning rate fits the corpus.
    run = train(TrainConfig(out_dir=str(tmp_path / "tuned"), max_iters=12, learning_rate=3e-3,
                            **common), log=lambda m: None)
    evals = [r for r in run.history if r.get("event") == "eval"]
    assert evals[-1]["val_loss"] < evals[0]["val_loss"] - 0.1


def test_train_cli_with_init_from(tiny_llama_dir, text_file, tmp_path, capsys):
    from minigpt.cli.train import main, resolve_config

    cfg, _ = resolve_config(["--init-from", str(tiny_llama_dir), "--data", str(text_file)])
    assert cfg.learning_rate == 3e-5 and cfg.model.block_size == 128  # the finetune preset
    with pytest.raises(SystemExit) as info:
        resolve_config(["--init-from", str(tiny_llama_dir), "--n-layer", "3"])
    assert info.value.code == 2
    assert "--n-layer: the model comes from --init-from" in capsys.readouterr().err
    out = tmp_path / "run"
    assert main(["--init-from", str(tiny_llama_dir), "--data", str(text_file), "--block-size",
                 "64", "--max-iters", "2", "--eval-interval", "2", "--eval-iters", "1",
                 "--batch-size", "2", "--out-dir", str(out), "--no-progress"]) == 0
    assert main(["--init-from", str(tiny_llama_dir), "--data", str(text_file), "--block-size",
                 "65", "--out-dir", str(tmp_path / "too-long"), "--no-progress"]) == 2
    assert "block_size 65: must be in [1, 64]" in capsys.readouterr().err
    # --resume continues it without reading the pretrained directory again.
    for f in tiny_llama_dir.iterdir():
        f.unlink()
    assert main(["--resume", "--out-dir", str(out), "--max-iters", "3", "--no-progress"]) == 0


def test_sample_and_heads_on_a_pretrained_directory(tiny_llama_dir, text_file, tmp_path,
                                                    capsys):
    from minigpt.analysis.heads import main as heads_main
    from minigpt.cli.sample import main as sample_main

    png = tmp_path / "attn.png"
    assert sample_main(["--init-from", str(tiny_llama_dir), "--prompt", "to be", "--seed", "1",
                        "--max-new-tokens", "12", "--attention-map", str(png)]) == 0
    out = capsys.readouterr()
    assert out.out.startswith("to be") and png.stat().st_size > 0
    assert sample_main(["--init-from", str(tiny_llama_dir), "--prompt", "to be", "--stream",
                        "--max-new-tokens", "5", "--temperature", "0"]) == 0
    assert capsys.readouterr().out.startswith("to be")
    heads_png = tmp_path / "heads.png"
    assert heads_main(["--init-from", str(tiny_llama_dir), "--data", str(text_file),
                       "--batches", "1", "--batch-size", "2", "--block-size", "16",
                       "--out", str(heads_png)]) == 0
    assert "layer 1" in capsys.readouterr().out and heads_png.stat().st_size > 0


@pytest.mark.skipif(not tiktoken_available(), reason="tiktoken's gpt2 encoding is not cached")
def test_gpt2_uses_tiktoken_and_exports_a_matching_tokenizer_json(tmp_path):
    torch.manual_seed(0)
    hf = transformers.GPT2LMHeadModel(transformers.GPT2Config(
        vocab_size=50257, n_positions=32, n_embd=16, n_layer=1, n_head=2))
    hf.save_pretrained(tmp_path / "gpt2")
    tok = load_tokenizer(str(tmp_path / "gpt2"))
    assert tok.name == "gpt2"
    r = subprocess.run([sys.executable, "sample.py", "--init-from", str(tmp_path / "gpt2"),
                        "--prompt", "ROMEO:", "--max-new-tokens", "5", "--temperature", "0"],
                       cwd=str(__import__("conftest").ROOT), capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0 and r.stdout.startswith("ROMEO:"), r.stderr
    info = export_hf(pretrained_state(str(tmp_path / "gpt2")), tmp_path / "out")
    assert info["tokenizer"]
    auto = transformers.AutoTokenizer.from_pretrained(tmp_path / "out")
    text = "ROMEO:\nBut soft, what light through yonder window breaks? é 日本"
    assert auto(text).input_ids == tok.encode(text)
    # The exported directory (GPT-2's BPE as tokenizer.json) comes back as tiktoken's gpt2.
    assert load_tokenizer(str(tmp_path / "out")).name == "gpt2"


def test_import_minigpt_does_not_import_the_hf_packages():
    code = ("import sys, minigpt, minigpt.hf.pretrained, minigpt.hf.export, minigpt.train.loop; "
            "print(sorted(m for m in ('transformers', 'tokenizers', 'safetensors', "
            "'huggingface_hub') if m in sys.modules))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0 and r.stdout.strip() == "[]", r.stdout + r.stderr
