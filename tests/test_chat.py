"""Generation for instruct models: stop tokens in GPT.generate, --stop strings (streamed and
not), chat templates rendered in jinja2's sandbox, sample.py --chat / --system."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from minigpt import GPT, GPTConfig
from minigpt.cli.sample import StopText
from minigpt.tokenizer import CharTokenizer

ROOT = Path(__file__).resolve().parent.parent


def _model(seed=0):
    torch.manual_seed(seed)
    return GPT(GPTConfig(vocab_size=40, block_size=32, n_layer=2, n_head=2, n_embd=32)).eval()


def test_generate_stops_at_a_stop_token_and_keeps_it():
    model = _model()
    prompt = torch.tensor([[1, 2, 3]])
    full = model.generate(prompt, 12, temperature=0)[0, 3:].tolist()
    stop = full[4]
    first = full.index(stop)  # the stop token's first appearance
    out = model.generate(prompt, 12, temperature=0, stop_tokens=[stop])[0, 3:].tolist()
    assert out == full[:first + 1]
    # a token never generated changes nothing
    absent = next(t for t in range(40) if t not in full)
    assert model.generate(prompt, 12, temperature=0, stop_tokens=[absent]).shape[1] == 15


def test_generate_batch_rows_that_ended_repeat_their_stop_token():
    model = _model(1)
    prompt = torch.tensor([[1, 2, 3], [7, 8, 9]])
    full = model.generate(prompt, 10, temperature=0)[:, 3:]
    stop = full[0, 1].item()
    out = model.generate(prompt, 10, temperature=0, stop_tokens=[stop])[:, 3:]
    first = full[0].tolist().index(stop)
    row0 = out[0].tolist()
    assert row0[:first + 1] == full[0, :first + 1].tolist()
    assert set(row0[first:]) == {stop}
    rest = full[1].tolist()
    ends = rest.index(stop) + 1 if stop in rest else len(rest)
    assert out[1].tolist()[:ends] == rest[:ends]
    assert out.shape[1] == max(first + 1, ends)


def test_generate_callback_can_stop_and_stop_tokens_are_checked():
    model = _model()
    prompt = torch.tensor([[1, 2]])
    out = model.generate(prompt, 10, temperature=0, callback=lambda step, nxt: step == 3)
    assert out.shape == (1, 2 + 4)
    with pytest.raises(ValueError, match="stop_tokens"):
        model.generate(prompt, 3, stop_tokens=[40])


def test_stop_text_cuts_and_never_streams_a_stop_prefix(capsys):
    tok = CharTokenizer("abcXYZ. ")
    out = StopText(tok, ["XY", "."], [], live=True)
    stopped = [out.push(i, torch.tensor([[tok.stoi[c]]])) for i, c in enumerate("ab XcXY.c")]
    assert stopped == [False] * 5 + [False, True, True, True]
    assert out.finish() == "ab Xc"
    assert capsys.readouterr().out == "ab Xc"
    quiet = StopText(tok, [], [], live=False)
    for c in "abc":
        quiet.push(0, torch.tensor([[tok.stoi[c]]]))
    assert quiet.finish() == "abc" and capsys.readouterr().out == ""


jinja2 = pytest.importorskip("jinja2")

from minigpt.hf.chat import ChatTemplateError, chat_messages, render_chat  # noqa: E402

SMOL = ("{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
        "{{ '<|im_start|>system\\nYou are helpful<|im_end|>\\n' }}{% endif %}"
        "{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}"
        "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")


def test_render_chat_as_transformers_does():
    from transformers.utils.chat_template_utils import render_jinja_template

    for system in (None, "Be brief."):
        messages = chat_messages("Hi there", system)
        ours = render_chat(SMOL, messages, eos_token="<|im_end|>")
        theirs = render_jinja_template(conversations=[messages], chat_template=SMOL,
                                       add_generation_prompt=True)[0][0]
        assert ours == theirs
    assert ours == ("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi there"
                    "<|im_end|>\n<|im_start|>assistant\n")


@pytest.mark.parametrize("template, named", [
    ("{{ ''.__class__.__mro__ }}", "does not render"),
    ("{% set _ = messages.append(1) %}", "does not render"),
    ("{{ raise_exception('roles must alternate') }}", "roles must alternate"),
    ("{% for %}", "does not render"),
])
def test_render_chat_is_sandboxed_and_errors_are_one_line(template, named):
    with pytest.raises(ChatTemplateError) as info:
        render_chat(template, chat_messages("x"))
    assert named in str(info.value) and "\n" not in str(info.value)


def _sample(*args):
    return subprocess.run([sys.executable, "sample.py", "--device", "cpu", "--temperature", "0",
                           *args], cwd=ROOT, capture_output=True, text=True, timeout=180)


def test_sample_chat_stop_and_stream_on_a_tiny_gguf(tmp_path):
    pytest.importorskip("gguf")
    pytest.importorskip("transformers")
    sys.path.insert(0, str(ROOT / "tests"))
    from test_gguf import write_tiny_gguf

    path = tmp_path / "tiny.gguf"
    write_tiny_gguf(path)
    base = ["--init-from", str(path), "--max-new-tokens", "12"]
    plain = _sample(*base, "--chat", "--system", "Be brief.", "--prompt", "hello", "--ignore-eos")
    assert plain.returncode == 0, plain.stderr
    reply = plain.stdout[:-1]
    assert "<|im_start|>" not in reply and "hello" not in reply[:5]
    streamed = _sample(*base, "--chat", "--system", "Be brief.", "--prompt", "hello",
                       "--ignore-eos", "--stream")
    assert streamed.stdout == plain.stdout
    # a --stop string taken from the reply cuts it there, streamed or not
    stop = reply.strip()[2:4]
    assert stop
    cut = reply[:reply.find(stop)]
    for extra in ([], ["--stream"]):
        out = _sample(*base, "--chat", "--system", "Be brief.", "--prompt", "hello",
                      "--ignore-eos", "--stop", stop, *extra)
        assert out.returncode == 0 and out.stdout == cut + "\n", (out.stdout, cut)
    bad = _sample(*base, "--system", "x", "--prompt", "hello")
    assert bad.returncode == 2 and "--system: needs --chat" in bad.stderr


def test_sample_chat_without_a_template_is_refused(tmp_path):
    from minigpt.checkpoint import save_checkpoint

    model = _model()
    ckpt = tmp_path / "ckpt.pt"
    save_checkpoint({"model": model.state_dict(), "model_config": model.config.to_dict(),
                     "tokenizer": CharTokenizer("abcdefghijklmnopqrstuvwxyz .,!?ABCDE")
                     .state_dict()}, ckpt)
    out = _sample("--checkpoint", str(ckpt), "--chat", "--prompt", "hi")
    assert out.returncode == 2 and "has no chat template" in out.stderr
    assert out.stderr.count("\n") == 1


def test_coreference_experiment_on_a_tiny_model(tmp_path):
    """At "it", a causal model has not read the deciding word: both sentences of a pair give it
    the same attention, so every head scores exactly 1/2 there."""
    from minigpt.experiments.coreference import PAIRS, binomial_tail, coreference, markdown, sentences

    assert len(PAIRS) >= 30 and len(sentences()) == 2 * len(PAIRS)
    text = "".join(s["text"] for s in sentences()) + ' In this sentence, "it" refers to the'
    tok = CharTokenizer(text)
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=tok.vocab_size, block_size=160, n_layer=2, n_head=3,
                          n_embd=24)).eval()
    results = coreference(model, tok)
    assert results["n"] == 2 * len(PAIRS) and results["heads"] == 6
    assert torch.tensor(results["share_it"]).eq(0.5).all()
    assert 0.0 <= results["answer_accuracy"] <= 1.0 and len(results["best"]) == 6
    assert abs(binomial_tail(0, 10) - 1.0) < 1e-12 and abs(binomial_tail(10, 10) - 2 ** -10) < 1e-15
    assert "| layer | head |" in markdown(results, "tiny")
