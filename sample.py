"""Sample text from a trained minigpt checkpoint.

    python sample.py                                  # from out/ckpt.pt
    python sample.py --prompt "ROMEO:" --num-samples 3 --max-new-tokens 300 --top-k 40
    python sample.py --prompt-file prompt.txt --temperature 0.8 --top-p 0.9 --stream

Exit codes: 0 done, 2 bad input (arguments, checkpoint, prompt).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from minigpt.checkpoint import CheckpointError, load_checkpoint
from minigpt.model import GPT, GPTConfig
from minigpt.sampling import TextStream, check_sampling_args
from minigpt.tokenizer import from_state
from minigpt.training import pick_device


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Sample text from a minigpt checkpoint.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--checkpoint", default="out/ckpt.pt",
                   help="checkpoint file, or a directory holding ckpt.pt")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--prompt", default="\n", help="text to continue")
    src.add_argument("--prompt-file", type=Path, help="read the prompt from this UTF-8 file")
    p.add_argument("--num-samples", type=int, default=1)
    p.add_argument("--max-new-tokens", type=int, default=500)
    p.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--seed", type=int, default=1337)
    p.add_argument("--device", default="auto")
    p.add_argument("--stream", action="store_true", help="print tokens as they are generated")
    p.add_argument("--no-cache", dest="use_cache", action="store_false",
                   help="recompute the whole context each step instead of using the KV cache")
    return p


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.num_samples < 1:
        parser.error(f"argument --num-samples: must be >= 1, got {args.num_samples}")
    if args.max_new_tokens < 0:
        parser.error(f"argument --max-new-tokens: must be >= 0, got {args.max_new_tokens}")
    try:
        check_sampling_args(args.temperature, args.top_k, args.top_p)
    except ValueError as e:
        parser.error(f"argument --{str(e).split()[0].replace('_', '-')}: {e}")

    path = Path(args.checkpoint)
    if path.is_dir():
        path = path / "ckpt.pt"
    try:
        state = load_checkpoint(path)
        tokenizer = from_state(state["tokenizer"])
        prompt = (args.prompt_file.read_text(encoding="utf-8") if args.prompt_file
                  else args.prompt)
        ids = tokenizer.encode(prompt)
    except (CheckpointError, OSError, UnicodeDecodeError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if not ids:
        parser.error("argument --prompt: the prompt must encode to at least one token")

    device = pick_device(args.device)
    model = GPT(GPTConfig.from_dict(state["model_config"]))
    model.load_state_dict(state["model"])
    model.to(device).eval()
    generator = torch.Generator(device=device).manual_seed(args.seed)
    x = torch.tensor([ids], dtype=torch.long, device=device)

    for i in range(args.num_samples):
        if args.stream:
            stream = TextStream(tokenizer)
            sys.stdout.write(prompt)

            def emit(step, nxt):
                sys.stdout.write(stream.push(nxt[0].tolist()))
                sys.stdout.flush()

            model.generate(x, args.max_new_tokens, args.temperature, args.top_k, args.top_p,
                           generator=generator, use_cache=args.use_cache, callback=emit)
            sys.stdout.write(stream.flush() + "\n")
        else:
            y = model.generate(x, args.max_new_tokens, args.temperature, args.top_k, args.top_p,
                               generator=generator, use_cache=args.use_cache)
            sys.stdout.write(tokenizer.decode(y[0].tolist()) + "\n")
        if i < args.num_samples - 1:
            sys.stdout.write("---------------\n")
        sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
