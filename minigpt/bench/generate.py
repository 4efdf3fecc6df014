"""Generation speed against Hugging Face transformers: ``python -m minigpt bench-generate``.

Greedy decoding of --new tokens after a --prompt-token prompt, batch 1, by a minigpt GPT and by a
``transformers`` GPT2LMHeadModel of the same shape (GPT-2 small by default: 12 layers, 12 heads,
768 wide, 50257-token vocabulary, 1024 positions), both with random weights, in one process, on
the same prompt and the same torch thread count. The two are timed in turn, --repeats times
(after one short warm-up each), so that load on a shared machine hits both alike; the figures are
medians of whole ``generate`` calls, prefill included:

    python -m minigpt bench-generate                      # 256-token prompt, 256 new tokens
    python -m minigpt bench-generate --threads 1 --repeats 5
    python -m minigpt bench-generate --hf-attn sdpa minigpt   # HF's model also on our kernel

Both models generate exactly --new tokens (transformers with min_new_tokens = max_new_tokens,
so no end-of-text token stops it early). The models differ where minigpt differs from GPT-2
(rotary positions instead of learned ones, no biases), so their tokens differ; what is compared
is speed at equal shapes. With ``--hf-attn minigpt`` the transformers model runs its attention on
minigpt's kernels through minigpt.hf (its tokens then equal the sdpa run's, which is checked).

Needs ``transformers`` (``pip install minigpt-kernels[hf]``) only when run.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from typing import List, Optional

import torch

from minigpt.checkpoint import atomic_write_text
from minigpt.config import ConfigError
from minigpt.model import GPT, GPTConfig
from minigpt.runtime import ArgumentParser, PathError, check_file_target, cli_main


def _time_generate(fn) -> float:
    """Seconds fn() takes (time.perf_counter)."""
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


# GPTConfig's fields -> the flags that set them, to name the flag in a one-line error.
_FLAGS = {"n_layer": "--layers", "n_head": "--heads", "n_embd": "--embd",
          "vocab_size": "--vocab", "block_size": "--block", "attn_backend": "--backend"}


def build_parser() -> argparse.ArgumentParser:
    """The command line of ``python -m minigpt bench-generate``."""
    p = ArgumentParser(prog="python -m minigpt bench-generate",
                       description="Greedy generation speed: minigpt against transformers' "
                                   "GPT2LMHeadModel, side by side.")
    p.add_argument("--prompt", type=int, default=256, help="prompt tokens")
    p.add_argument("--new", type=int, default=256, help="tokens to generate")
    p.add_argument("--layers", type=int, default=12, help="transformer blocks (n_layer)")
    p.add_argument("--heads", type=int, default=12, help="attention heads (n_head)")
    p.add_argument("--embd", type=int, default=768, help="embedding width (n_embd)")
    p.add_argument("--vocab", type=int, default=50257, help="vocabulary size")
    p.add_argument("--block", type=int, default=1024, help="block_size / n_positions")
    p.add_argument("--threads", type=int, default=None,
                   help="torch.set_num_threads for both; None = torch's default")
    p.add_argument("--repeats", type=int, default=3, help="timed generate calls per model")
    p.add_argument("--backend", default=None,
                   help="minigpt attention backend; None = the best available")
    p.add_argument("--hf-attn", nargs="+", default=["sdpa"],
                   help="transformers attn_implementation(s) to time; 'minigpt' registers ours")
    p.add_argument("--seed", type=int, default=0, help="seeds the weights and the prompt")
    p.add_argument("--json", help="write the results as JSON to this file")
    return p


def _config(p: argparse.ArgumentParser, args) -> GPTConfig:
    """minigpt's config for the flags, after refusing bad sizes with a one-line error that names
    the flag (p.error: exit code 2)."""
    if args.json:
        try:
            check_file_target(args.json, "--json")
        except PathError as e:
            p.error(f"argument {e}")
    for name in ("prompt", "new", "repeats", "threads"):
        value = getattr(args, name)
        if value is not None and value < 1:
            p.error(f"argument --{name}: must be >= 1, got {value}")
    try:
        cfg = GPTConfig(n_layer=args.layers, n_head=args.heads, n_embd=args.embd,
                        vocab_size=args.vocab, block_size=args.block, attn_backend=args.backend)
    except ConfigError as e:
        p.error(f"argument {_FLAGS.get(e.name, e.name)}: {e.requirement}, got {e.value!r}")
    if args.prompt + args.new > args.block:
        p.error(f"argument --block: must hold --prompt + --new = {args.prompt + args.new} "
                f"tokens, got {args.block}")
    return cfg


def _report(times: dict, args, base: str) -> List[dict]:
    """Prints the table of tokens/s, ms/token, seconds per run and the speed-up against the
    transformers model `base`; returns its rows."""
    results = []
    for name, ts in times.items():
        t = statistics.median(ts)
        # Ratio per repeat (each pair timed back to back), then the median of the ratios.
        ratio = statistics.median(b / a for a, b in zip(ts, times[base]))
        results.append(dict(model=name, seconds=t, tokens_per_s=args.new / t,
                            ms_per_token=1e3 * t / args.new, speedup_vs_hf=ratio,
                            runs_s=ts))
    width = max(len(r["model"]) for r in results)
    print(f"{'model':<{width}}  {'tokens/s':>9}  {'ms/token':>9}  {'s per run':>9}  "
          f"{'vs ' + base:>{len(base) + 3}}")
    for r in results:
        print(f"{r['model']:<{width}}  {r['tokens_per_s']:>9.2f}  {r['ms_per_token']:>9.2f}  "
              f"{r['seconds']:>9.2f}  {r['speedup_vs_hf']:>{len(base) + 2}.2f}x")
    return results


@cli_main
def main(argv: Optional[List[str]] = None) -> int:
    """Time both models; 0 on success, 2 for bad arguments or without transformers."""
    p = build_parser()
    args = p.parse_args(argv)
    cfg = _config(p, args)
    try:
        import transformers
        from transformers import GPT2Config, GPT2LMHeadModel
    except ImportError:
        print("minigpt.bench.generate needs transformers: pip install 'minigpt-kernels[hf]' "
              "(or pip install transformers)", file=sys.stderr)
        return 2
    transformers.logging.set_verbosity_error()
    if args.threads:
        torch.set_num_threads(args.threads)
    if "minigpt" in args.hf_attn:
        from minigpt.hf import plugin as hf

        hf.register("minigpt")

    torch.manual_seed(args.seed)
    ours = GPT(cfg).eval()
    hf_cfg = GPT2Config(n_layer=args.layers, n_head=args.heads, n_embd=args.embd,
                        vocab_size=args.vocab, n_positions=args.block)
    hf_models = {name: GPT2LMHeadModel(hf_cfg).eval() for name in args.hf_attn[:1]}
    for name in args.hf_attn[1:]:  # the same weights under each attention implementation
        hf_models[name] = hf_models[args.hf_attn[0]]
    prompt = torch.randint(args.vocab, (1, args.prompt),
                           generator=torch.Generator().manual_seed(args.seed))
    mask = torch.ones_like(prompt)

    def run_ours(n):
        return ours.generate(prompt, n, temperature=0.0)

    def run_hf(name, n):
        model = hf_models[name]
        model.set_attn_implementation(name)
        with torch.no_grad():
            return model.generate(prompt, attention_mask=mask, do_sample=False, num_beams=1,
                                  max_new_tokens=n, min_new_tokens=n,
                                  pad_token_id=hf_cfg.eos_token_id)

    runs = {"minigpt": lambda n: run_ours(n)}
    for name in args.hf_attn:
        runs[f"transformers[{name}]"] = (lambda name: lambda n: run_hf(name, n))(name)
    print(f"greedy generation, batch 1, {args.prompt}-token prompt + {args.new} new tokens; "
          f"{args.layers} layers, {args.heads} heads, {args.embd} wide, vocab {args.vocab}; "
          f"torch {torch.__version__}, transformers {transformers.__version__}, "
          f"{torch.get_num_threads()} threads; median of {args.repeats} alternating runs",
          flush=True)
    tokens = {}
    for name, fn in runs.items():  # warm-up, and the generated tokens for the checks below
        fn(4)
    times = {name: [] for name in runs}
    for _ in range(args.repeats):
        for name, fn in runs.items():
            out = []
            times[name].append(_time_generate(lambda: out.append(fn(args.new))))
            tokens[name] = out[0]
    for name, out in tokens.items():
        if out.shape != (1, args.prompt + args.new):
            raise RuntimeError(f"{name} generated {out.shape[1] - args.prompt} tokens, not "
                               f"{args.new}")
    if "minigpt" in args.hf_attn and len(args.hf_attn) > 1:
        first = f"transformers[{args.hf_attn[0]}]"
        same = torch.equal(tokens[first], tokens["transformers[minigpt]"])
        print(f"transformers[minigpt] tokens {'equal' if same else 'DIFFER from'} {first}'s")
    results = _report(times, args, f"transformers[{args.hf_attn[0]}]")
    if args.json:
        atomic_write_text(args.json, json.dumps(
            dict(prompt=args.prompt, new=args.new, threads=torch.get_num_threads(),
                 torch=torch.__version__, transformers=transformers.__version__,
                 results=results), indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
