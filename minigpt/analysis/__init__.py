"""Looking inside a model: attention maps and other pictures (``pictures``), head importance and
head pruning (``heads``), training curves from a run's metrics (``plot``)."""
