"""Training: the loop (``loop``), the run's state and its checkpoint, config.json and
metrics.jsonl (``state``), optimizers (``optim``), the corpus and batches (``data``), the run
directory and its lock (``rundir``) and TensorBoard / W&B logging (``loggers``).

The command line is ``python train.py`` (or ``minigpt-train``, ``python -m minigpt train``); it
lives in ``minigpt.cli.train``. Read ``loop.py`` first: ``train()`` is the whole loop.
"""
