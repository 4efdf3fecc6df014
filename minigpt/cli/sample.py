"""Sample text from a trained minigpt checkpoint, or from a pretrained Hugging Face model.

    python sample.py                                  # from out/ckpt.pt
    python sample.py --init-from DIR --prompt "Hello"  # GPT-2 or a Llama-family model (or a
                                                      # hub name, when online)
    python sample.py --prompt "ROMEO:" --num-samples 3 --max-new-tokens 300 --top-k 40
    python sample.py --prompt-file prompt.txt --temperature 0.8 --top-p 0.9 --stream
    python sample.py --prompt "ROMEO:" --max-new-tokens 40 --attention-map attn.png

Instruct models (a pretrained model with a chat template; see minigpt.hf.chat):

    python sample.py --init-from model.gguf --chat --prompt "What is the capital of France?"
    python sample.py --init-from DIR --chat --system "Answer in French." --prompt "Hi" --stream

--chat renders --prompt (the user's message, after --system's) with the model's chat template
and prints the reply only. Generation ends at the model's end-of-turn/EOS tokens
(--ignore-eos continues past them) and at any --stop string, which is cut from the output.

--attention-map draws, after generating, one heatmap per head of one layer (--layer, default the
last; --head, default all) over the prompt and generated tokens: rows are queries, columns keys,
labels the decoded tokens. The probabilities are recomputed by the same model on the "naive"
softmax(QK^T/sqrt(d)) path (GPT.attention_maps), since the fused kernels never store them. The
map covers the last --max-tokens tokens (at most block_size), fed as their own context.

The same command line is `minigpt-sample` (installed) and `python -m minigpt sample`.
Exit codes: 0 done, 2 bad input (arguments, checkpoint, prompt, device), 130 Ctrl-C, 141 the
output pipe closed (``| head``); both end quietly.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from minigpt.checkpoint import CheckpointError, load_checkpoint
from minigpt.model import GPT
from minigpt.hf.pretrained import add_model_source_args, pretrained_state
from minigpt.generation import TextStream, check_sampling_args
from minigpt.tokenizer import from_state
from minigpt.runtime import ArgumentParser, DeviceError, cli_main, pick_device

MAX_SEED = 2 ** 63 - 1  # torch.Generator.manual_seed's range (int64 and beyond wraps)


def build_parser() -> argparse.ArgumentParser:
    """The command line of sample.py and ``python -m minigpt sample``."""
    p = ArgumentParser(prog="sample.py", description="Sample text from a minigpt checkpoint.")
    add_model_source_args(p)
    src = p.add_mutually_exclusive_group()
    src.add_argument("--prompt", default="\n",
                     help="text to continue (default: %(default)r, a newline)")
    src.add_argument("--prompt-file", type=Path, help="read the prompt from this UTF-8 file")
    p.add_argument("--num-samples", type=int, default=1, help="samples to draw, one after another")
    p.add_argument("--max-new-tokens", type=int, default=500, help="tokens to generate per sample")
    p.add_argument("--temperature", type=float, default=0.8,
                   help="divides the logits; 0 = greedy (always the most likely token)")
    p.add_argument("--top-k", type=int, default=None,
                   help="sample among the k most likely tokens; None = all")
    p.add_argument("--top-p", type=float, default=None,
                   help="sample among the most likely tokens whose probabilities sum to p "
                        "(nucleus sampling); None = all")
    p.add_argument("--seed", type=int, default=1337, help="seeds the sampling")
    p.add_argument("--device", default="auto",
                   help='"auto" (cuda, then mps, then cpu), "cpu", "cuda", "cuda:1", "mps"')
    p.add_argument("--stream", action="store_true", help="print tokens as they are generated")
    chat = p.add_argument_group("instruct models")
    chat.add_argument("--chat", action="store_true",
                      help="apply the model's chat template to --prompt (the user's message) "
                           "and print the reply only")
    chat.add_argument("--system", default=None,
                      help="with --chat: a system message before the user's")
    chat.add_argument("--stop", action="append", default=[], metavar="TEXT",
                      help="end generation where this text appears (cut from the output); may "
                           "be repeated")
    chat.add_argument("--ignore-eos", action="store_true",
                      help="do not stop at the model's end-of-turn / EOS tokens")
    p.add_argument("--cache", dest="use_cache", action=argparse.BooleanOptionalAction,
                   default=True, help="use the KV cache; --no-cache recomputes the whole "
                                      "context at each step")
    viz = p.add_argument_group("attention map")
    viz.add_argument("--attention-map", type=Path, metavar="PNG",
                     help="after generating, draw the attention heatmaps to this image (with "
                          "--num-samples N > 1, one file per sample: NAME-1.png ...)")
    viz.add_argument("--layer", type=int, default=-1,
                     help="layer to draw; negative counts from the end")
    viz.add_argument("--head", type=int, nargs="+", default=None,
                     help="heads to draw, e.g. --head 0 2; None = all heads")
    viz.add_argument("--max-tokens", type=int, default=None,
                     help="draw the last N tokens; None = 64 for char, 48 for gpt2 tokens")
    return p


@cli_main
def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not 0 <= args.seed <= MAX_SEED:
        parser.error(f"argument --seed: must be in [0, 2^63 - 1], got {args.seed}")
    if args.num_samples < 1:
        parser.error(f"argument --num-samples: must be >= 1, got {args.num_samples}")
    if args.max_new_tokens < 0:
        parser.error(f"argument --max-new-tokens: must be >= 0, got {args.max_new_tokens}")
    try:
        check_sampling_args(args.temperature, args.top_k, args.top_p)
    except ValueError as e:
        parser.error(f"argument --{str(e).split()[0].replace('_', '-')}: {e}")

    if args.system is not None and not args.chat:
        parser.error("argument --system: needs --chat")
    if any(not text for text in args.stop):
        parser.error("argument --stop: must be a non-empty text")
    try:
        state = (pretrained_state(args.init_from) if args.init_from is not None
                 else load_checkpoint(args.checkpoint))
        tokenizer = from_state(state["tokenizer"])
        prompt = (args.prompt_file.read_text(encoding="utf-8") if args.prompt_file
                  else args.prompt)
        settings = state.get("chat") or {}
        if args.chat:
            ids = chat_prompt_ids(settings, tokenizer, prompt, args.system,
                                  args.init_from or args.checkpoint)
        else:
            ids = tokenizer.encode(prompt)
    except (CheckpointError, OSError, UnicodeDecodeError, ValueError, ImportError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if not ids:
        parser.error("argument --prompt: the prompt must encode to at least one token")
    vocab = state["model_config"]["vocab_size"]
    stop_ids = [] if args.ignore_eos else [t for t in settings.get("stop_token_ids") or []
                                           if 0 <= t < vocab]

    model = GPT.from_checkpoint(state)
    if args.attention_map is not None:
        check_attention_args(parser, args, model.config)
    try:
        device = pick_device(args.device)
    except DeviceError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    model.to(device).eval()
    generator = torch.Generator(device=device).manual_seed(args.seed)
    x = torch.tensor([ids], dtype=torch.long, device=device)

    for i in range(args.num_samples):
        out = StopText(tokenizer, args.stop, stop_ids, live=args.stream)
        if args.stream and not args.chat:
            sys.stdout.write(prompt)
        y = model.generate(x, args.max_new_tokens, args.temperature, args.top_k, args.top_p,
                           generator=generator, use_cache=args.use_cache, callback=out.push,
                           stop_tokens=stop_ids)
        reply = out.finish()
        if not args.stream:
            if args.chat or args.stop:
                sys.stdout.write(("" if args.chat else prompt) + reply)
            else:
                new_ids = y[0, len(ids):].tolist()
                if new_ids and new_ids[-1] in stop_ids:
                    new_ids = new_ids[:-1]
                sys.stdout.write(tokenizer.decode(ids + new_ids))
        sys.stdout.write("\n")
        if args.attention_map is not None:
            sys.stdout.flush()  # the text first, then draw_map's note on stderr
            draw_map(args, model, tokenizer, y[0].tolist(), len(ids), i)
        if i < args.num_samples - 1:
            sys.stdout.write("---------------\n")
        sys.stdout.flush()
    return 0


def chat_prompt_ids(settings: dict, tokenizer, prompt: str, system, source) -> list:
    """Token ids of the chat template rendered for [system,] user=prompt, with the assistant's
    turn opened. The template writes any BOS itself, so the tokenizer adds none.

    Raises:
        ValueError: the model has no chat template, or it does not render (ChatTemplateError).
    """
    from minigpt.hf.chat import chat_messages, render_chat

    template = settings.get("chat_template")
    if not template:
        raise ValueError(f"--chat: {source} has no chat template (an instruct model's "
                         f"tokenizer_config.json or GGUF metadata gives one)")
    text = render_chat(template, chat_messages(prompt, system),
                       bos_token=settings.get("bos_token"), eos_token=settings.get("eos_token"))
    if hasattr(tokenizer, "tok"):  # Hugging Face tokenizers: no post-processor's BOS
        return tokenizer.tok.encode(text, add_special_tokens=False).ids
    return tokenizer.encode(text)


class StopText:
    """Generated text as it arrives, cut at the first --stop string.

    push(step, next_tokens) is GPT.generate's callback: it decodes the new token (stop tokens
    excluded), writes what is certain to stdout when live (holding back the last len(longest
    stop) - 1 characters, which could begin a stop string), and returns True once a stop string
    has appeared. finish() returns the whole text and writes the rest."""

    def __init__(self, tokenizer, stops, stop_ids, live: bool):
        self.decoder = TextStream(tokenizer)
        self.stops, self.stop_ids, self.live = list(stops), set(stop_ids), live
        self.hold = max((len(t) for t in self.stops), default=1) - 1
        self.text, self.shown, self.stopped = "", 0, False

    def _cut(self) -> None:
        found = [self.text.find(t) for t in self.stops]
        found = [i for i in found if i >= 0]
        if found:
            self.text, self.stopped = self.text[:min(found)], True

    def _show(self, upto: int) -> None:
        if self.live and upto > self.shown:
            sys.stdout.write(self.text[self.shown:upto])
            sys.stdout.flush()
            self.shown = upto

    def push(self, step, nxt) -> bool:
        if self.stopped:
            return True
        self.text += self.decoder.push([t for t in nxt[0].tolist() if t not in self.stop_ids])
        self._cut()
        self._show(len(self.text) if self.stopped else len(self.text) - self.hold)
        return self.stopped

    def finish(self) -> str:
        if not self.stopped:
            self.text += self.decoder.flush()
            self._cut()
        self._show(len(self.text))
        return self.text


def check_attention_args(parser, args, model_cfg) -> None:
    if not -model_cfg.n_layer <= args.layer < model_cfg.n_layer:
        parser.error(f"argument --layer: the model has {model_cfg.n_layer} layers "
                     f"(0..{model_cfg.n_layer - 1}, or negative from the end), got {args.layer}")
    n_head = model_cfg.heads(args.layer % model_cfg.n_layer)[0]  # per layer once pruned
    for h in args.head or []:
        if not 0 <= h < n_head:
            parser.error(f"argument --head: the model has {n_head} heads "
                         f"(0..{n_head - 1})"
                         + (f" in layer {args.layer}" if n_head != model_cfg.n_head else "")
                         + f", got {h}")
    if args.max_tokens is not None and args.max_tokens < 1:
        parser.error(f"argument --max-tokens: must be >= 1, got {args.max_tokens}")
    from minigpt.analysis.pictures import image_path_error

    problem = image_path_error(args.attention_map)
    if problem:
        parser.error(f"argument --attention-map: {problem}")


def draw_map(args, model, tokenizer, ids, n_prompt, i) -> None:
    """Write the attention heatmaps of sample i (stderr says where; stdout stays the text)."""
    from minigpt.analysis.pictures import draw_attention

    path = args.attention_map
    if args.num_samples > 1:
        path = path.with_name(f"{path.stem}-{i + 1}{path.suffix}")
    info = draw_attention(model, tokenizer, ids, path, layer=args.layer, heads=args.head,
                          max_tokens=args.max_tokens, n_prompt=n_prompt,
                          title_prefix=f"{args.init_from or args.checkpoint}: ")
    print(f"attention map: layer {info['layer']}, heads {info['heads']}, last {info['tokens']} "
          f"of {info['total']} tokens -> {info['path']}", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
