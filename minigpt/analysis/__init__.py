"""Looking inside a model, each module on top of the one before:

- importance: the loss increase when each attention head is masked (Michel et al. 2019);
- prune: greedy head pruning and the smaller checkpoint it writes;
- heads: their command line, `python -m minigpt heads`;
- pictures: attention heatmaps and the head-importance grid;
- curves: training curves and the experiments' line plots; plot: their command line,
  `python -m minigpt plot`.
"""
