"""Does a pretrained model's attention resolve "it"? The explainers' coreference claim, tested.

    python -m minigpt experiments coreference --init-from model.gguf --out runs/coreference

Winograd-style pairs (Levesque et al. 2012, "The Winograd Schema Challenge"), written for this
experiment: two sentences that differ in one word after "it", which decides whether "it" is the
first candidate or the second ("The trophy doesn't fit into the suitcase because it is too
big / small."). For every head, in every sentence: does the query attend more to the right
candidate's tokens than to the wrong one's? The share of sentences where it does is compared
with chance (1/2) by an exact one-sided binomial test; with n_layer x n_head heads tested, a
head is named significant below 0.05 / (number of heads) (Bonferroni).

Two queries are measured. At "it" itself, a causal model has not yet read the word that decides
the pair: both sentences of a pair give that token the same attention, so every head scores
exactly 1/2 there -- the explainers' picture ("it" attends to "animal") cannot show resolution
in a decoder-only model. At the sentence's last word (the one that decides it), the model has
read everything. The model's own answer is read from its next-token probabilities after
'<sentence> In this sentence, "it" refers to the', comparing the first token of each candidate.
It writes results.md, results.json and a heatmap (the best head on the first pair, with token
labels) to --out.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path
from typing import List, Sequence, Tuple

import torch

from minigpt.experiments.common import pretrained_arguments, write_results

# (sentence with {} for the deciding word, candidate A, candidate B, word -> A, word -> B)
PAIRS: List[Tuple[str, str, str, str, str]] = [
    ("The trophy doesn't fit into the suitcase because it is too {}.", "trophy", "suitcase",
     "big", "small"),
    ("The animal didn't cross the street because it was too {}.", "animal", "street", "tired",
     "wide"),
    ("The ball broke the window because it was made of {}.", "ball", "window", "steel", "glass"),
    ("The table won't fit through the door because it is too {}.", "table", "door", "wide",
     "narrow"),
    ("The book fell off the shelf because it was too {}.", "book", "shelf", "heavy", "slanted"),
    ("The cat couldn't eat from the bowl because it was too {}.", "cat", "bowl", "sick", "deep"),
    ("The car didn't fit in the garage because it was too {}.", "car", "garage", "long", "short"),
    ("The dog couldn't jump over the fence because it was too {}.", "dog", "fence", "small",
     "tall"),
    ("The boat couldn't pass under the bridge because it was too {}.", "boat", "bridge", "tall",
     "low"),
    ("The bottle didn't fit in the bag because it was too {}.", "bottle", "bag", "large", "full"),
    ("The sofa did not fit in the elevator because it was too {}.", "sofa", "elevator", "big",
     "small"),
    ("The bird escaped from the cage because it was too {}.", "bird", "cage", "clever",
     "flimsy"),
    ("The horse couldn't cross the river because it was too {}.", "horse", "river", "tired",
     "deep"),
    ("The truck couldn't drive through the tunnel because it was too {}.", "truck", "tunnel",
     "high", "low"),
    ("The cake didn't fit in the box because it was too {}.", "cake", "box", "big", "small"),
    ("The fish could not swim in the tank because it was too {}.", "fish", "tank", "big",
     "small"),
    ("The laptop didn't fit into the backpack because it was too {}.", "laptop", "backpack",
     "wide", "narrow"),
    ("The piano couldn't be carried up the stairs because it was too {}.", "piano", "stairs",
     "heavy", "steep"),
    ("The ship couldn't enter the harbor because it was too {}.", "ship", "harbor", "large",
     "shallow"),
    ("The coat didn't fit in the closet because it was too {}.", "coat", "closet", "bulky",
     "full"),
    ("The rock didn't fit in the bucket because it was too {}.", "rock", "bucket", "large",
     "small"),
    ("The ladder didn't reach the top of the wall because it was too {}.", "ladder", "wall",
     "short", "tall"),
    ("The plane couldn't land on the runway because it was too {}.", "plane", "runway", "heavy",
     "short"),
    ("The mouse couldn't squeeze through the hole because it was too {}.", "mouse", "hole", "fat",
     "narrow"),
    ("The painting didn't fit in the frame because it was too {}.", "painting", "frame", "large",
     "small"),
    ("The bus couldn't cross the bridge because it was too {}.", "bus", "bridge", "heavy",
     "weak"),
    ("The pizza didn't fit in the oven because it was too {}.", "pizza", "oven", "big", "small"),
    ("The rope didn't reach the pole because it was too {}.", "rope", "pole", "short", "far"),
    ("The phone didn't fit in the pocket because it was too {}.", "phone", "pocket", "big",
     "small"),
    ("The chair didn't fit in the car because it was too {}.", "chair", "car", "big", "small"),
    ("The fox couldn't climb the fence because it was too {}.", "fox", "fence", "tired", "high"),
    ("The statue didn't fit on the pedestal because it was too {}.", "statue", "pedestal",
     "wide", "narrow"),
]


def sentences() -> List[dict]:
    """Both variants of every pair: {"text", "right", "wrong", "pair", "word"}."""
    out = []
    for i, (template, a, b, word_a, word_b) in enumerate(PAIRS):
        out.append({"text": template.format(word_a), "right": a, "wrong": b, "pair": i,
                    "word": word_a})
        out.append({"text": template.format(word_b), "right": b, "wrong": a, "pair": i,
                    "word": word_b})
    return out


def _encode(tokenizer, text: str) -> List[int]:
    return tokenizer.encode(text)


def _span(tokenizer, text: str, word: str, after: int = 0) -> Tuple[int, int]:
    """Token positions [start, end) of the first whole occurrence of word at or after character
    `after`: the tokens of text up to the word's start, and up to its end (byte-level BPE
    attaches the leading space to the word, so the prefix stops before that space)."""
    start = text.index(f" {word}", after) if f" {word}" in text[after:] else text.index(word)
    end = start + 1 + len(word) if text[start] == " " else start + len(word)
    return len(_encode(tokenizer, text[:start])), len(_encode(tokenizer, text[:end]))


def binomial_tail(k: int, n: int) -> float:
    """P(X >= k) for X ~ Binomial(n, 1/2)."""
    return sum(math.comb(n, j) for j in range(k, n + 1)) / 2.0 ** n


@torch.no_grad()
def coreference(model, tokenizer) -> dict:
    """Per-head shares (see the module docstring) and the model's own answers.

    Returns:
        {"n": sentences, "heads": n_layer * n_head, "share_end" and "share_it": (n_layer,
        n_head) lists of the share of sentences where the head attends more to the right
        candidate, "best": the 10 best heads at the last word [{layer, head, share, p}],
        "answer_accuracy": share of sentences where the model's answer is the right one,
        "sentences": per-sentence details}.
    """
    model.eval()
    cfg = model.config
    rows, wins_end, wins_it = sentences(), None, None
    for row in rows:
        text = row["text"]
        ids = _encode(tokenizer, text)
        it = _span(tokenizer, text, "it")
        right, wrong = _span(tokenizer, text, row["right"]), _span(tokenizer, text, row["wrong"])
        end = len(_encode(tokenizer, text[:-1])) - 1  # the deciding word's last token
        maps = model.attention_maps(torch.tensor(ids)).nan_to_num(0.0)  # (L, H, T, T)

        def more(q):
            r = maps[:, :, q, right[0]:right[1]].sum(-1)
            w = maps[:, :, q, wrong[0]:wrong[1]].sum(-1)
            return (r > w).int()

        w_end, w_it = more(end), more(it[1] - 1)
        wins_end = w_end if wins_end is None else wins_end + w_end
        wins_it = w_it if wins_it is None else wins_it + w_it
        query = _encode(tokenizer, f'{text} In this sentence, "it" refers to the')
        logp = torch.log_softmax(model(torch.tensor([query]))[0][0, -1].float(), -1)
        first = {c: _encode(tokenizer, f"{text} In this sentence, \"it\" refers to the {c}")
                 [len(query)] for c in (row["right"], row["wrong"])}
        row["answer_right"] = bool(logp[first[row["right"]]] > logp[first[row["wrong"]]])
        row["tokens"] = len(ids)
    n = len(rows)
    share_end, share_it = wins_end.float() / n, wins_it.float() / n
    order = share_end.flatten().argsort(descending=True)[:10]
    best = [{"layer": int(i) // cfg.n_head, "head": int(i) % cfg.n_head,
             "share": round(float(share_end.flatten()[i]), 3),
             "p": binomial_tail(int(wins_end.flatten()[i]), n)} for i in order]
    return {"n": n, "heads": int(share_end.numel()), "share_end": share_end.tolist(),
            "share_it": share_it.tolist(), "best": best,
            "answer_accuracy": sum(r["answer_right"] for r in rows) / n, "sentences": rows}


def markdown(results: dict, source: str) -> str:
    n, heads = results["n"], results["heads"]
    alpha = 0.05 / heads
    it = torch.tensor(results["share_it"])
    end = torch.tensor(results["share_end"])
    lines = [f"Coreference in {source}: {n} sentences ({n // 2} Winograd-style pairs), "
             f"{heads} heads; chance 0.5; Bonferroni threshold p < {alpha:.1e}.", "",
             f"- at \"it\": every head's share is in [{it.min():.3f}, {it.max():.3f}] "
             f"(a causal model has not read the deciding word yet)",
             f"- at the deciding word: mean share over heads {end.mean():.3f}; "
             f"{int((end > 0.5).sum())} heads above 0.5, "
             f"{sum(b['p'] < alpha for b in results['best'])} of the best 10 significant",
             f"- the model's own answer ('\"it\" refers to the ...'): "
             f"{results['answer_accuracy']:.3f} right", "",
             "| layer | head | share (right > wrong) | p (one-sided binomial) |",
             "| --- | --- | --- | --- |"]
    lines += [f"| {b['layer']} | {b['head']} | {b['share']:.3f} | {b['p']:.1e} |"
              for b in results["best"]]
    return "\n".join(lines) + "\n"


HELP = 'does a pretrained model\'s attention resolve "it"?'


def add_arguments(p: argparse.ArgumentParser, quick: bool = False) -> None:
    """The flags of ``experiments coreference`` (it has no --quick; quick is ignored)."""
    pretrained_arguments(p)
    p.add_argument("--out", default="runs/coreference",
                   help="results.md, results.json and coreference.png go here")


def run(p: argparse.ArgumentParser, args) -> int:
    """Load the model, score every head, write the results and the heatmap."""
    from minigpt.analysis.pictures import draw_attention
    from minigpt.hf.pretrained import PretrainedError, pretrained_state
    from minigpt.model import GPT
    from minigpt.tokenizer import from_state

    try:
        state = pretrained_state(args.init_from)
    except (PretrainedError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    model, tokenizer = GPT.from_checkpoint(state).eval(), from_state(state["tokenizer"])
    results = coreference(model, tokenizer)
    table = markdown(results, Path(args.init_from).name)
    write_results(args.out, results, table)
    best = results["best"][0]
    first = sentences()[2]  # the animal and the street, "tired": it -> animal
    info = draw_attention(model, tokenizer, _encode(tokenizer, first["text"]),
                          Path(args.out) / "coreference.png", layer=best["layer"],
                          heads=[best["head"]], title_prefix="coreference: ")
    print(table + f"heatmap: {info['path']}")
    return 0


def main(argv: Sequence[str] = None) -> int:
    """``python -m minigpt experiments coreference [flags]``."""
    from minigpt.experiments import main as experiments_main

    return experiments_main(["coreference", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
