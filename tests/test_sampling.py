"""Next-token sampling and streaming UTF-8 decoding."""

import pytest
import torch

from minigpt.generation import TextStream, sample_next
from minigpt.tokenizer import CharTokenizer, GPT2Tokenizer

from conftest import tiktoken_available


def _logits():
    # Probabilities 0.5, 0.25, 0.125, 0.0625, 0.0625 for tokens 0..4.
    return torch.log(torch.tensor([[0.5, 0.25, 0.125, 0.0625, 0.0625]]))


def _draw(n=4000, **kw):
    g = torch.Generator().manual_seed(0)
    return torch.cat([sample_next(_logits(), generator=g, **kw) for _ in range(n)]).flatten()


def test_greedy():
    assert sample_next(_logits(), temperature=0.0).item() == 0


def test_top_k_keeps_only_k_tokens():
    draws = _draw(top_k=2)
    assert set(draws.tolist()) == {0, 1}
    assert 0.6 < (draws == 0).float().mean().item() < 0.73  # 0.5 / 0.75 renormalised


def test_top_p_keeps_the_nucleus():
    # top_p=0.7: 0.5 alone is not enough, 0.5 + 0.25 is: tokens {0, 1}.
    assert set(_draw(top_p=0.7).tolist()) == {0, 1}
    # top_p=0.5: the first token reaches it exactly.
    assert set(_draw(n=200, top_p=0.5).tolist()) == {0}
    assert set(_draw(top_p=1.0).tolist()) == {0, 1, 2, 3, 4}


def test_temperature_sharpens():
    cold = (_draw(temperature=0.3) == 0).float().mean().item()
    warm = (_draw(temperature=1.0) == 0).float().mean().item()
    assert cold > 0.85 and 0.45 < warm < 0.55


def test_batch_rows_independent_and_seeded():
    logits = torch.randn(3, 100)
    a = sample_next(logits, generator=torch.Generator().manual_seed(1))
    b = sample_next(logits, generator=torch.Generator().manual_seed(1))
    assert a.shape == (3, 1) and a.dtype == torch.int64 and torch.equal(a, b)


@pytest.mark.parametrize("kw, pattern", [
    (dict(temperature=-0.1), "temperature"),
    (dict(top_k=0), "top_k"),
    (dict(top_p=0.0), "top_p"),
    (dict(top_p=1.5), "top_p"),
])
def test_bad_arguments(kw, pattern):
    with pytest.raises(ValueError, match=pattern):
        sample_next(_logits(), **kw)


def test_stream_char_tokenizer():
    tok = CharTokenizer("héllo wörld")
    stream = TextStream(tok)
    text = "".join(stream.push([i]) for i in tok.encode("wörld héllo")) + stream.flush()
    assert text == "wörld héllo"


@pytest.mark.skipif(not tiktoken_available(), reason="GPT-2 encoding not available offline")
def test_stream_gpt2_character_split_across_tokens():
    tok = GPT2Tokenizer()
    text = "Fair 🌹 and 日本語 too"
    ids = tok.encode(text)
    # At least one token must end mid-character, or this test would not test anything.
    assert any(_is_partial(tok.decode_bytes([i])) for i in ids)
    stream = TextStream(tok)
    pieces = [stream.push([i]) for i in ids]
    assert "\ufffd" not in "".join(pieces)
    assert "".join(pieces) + stream.flush() == text


def _is_partial(b: bytes) -> bool:
    try:
        b.decode("utf-8")
        return False
    except UnicodeDecodeError:
        return True
