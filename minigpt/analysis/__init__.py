"""Looking inside a model, each module on top of the one before:

- maps: attention_maps (every head's attention probabilities for a batch) and gated_heads (heads
  switched off by a mask), which GPT.attention_maps and GPT.gated_heads call;
- importance: the loss increase when each attention head is masked (Michel et al. 2019);
- prune: greedy head pruning and the smaller checkpoint it writes;
- heads: their command line, `python -m minigpt heads`;
- pictures: attention heatmaps and the head-importance grid;
- curves: training curves and the experiments' line plots, and their command line,
  `python -m minigpt plot`.
"""
