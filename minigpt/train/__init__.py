"""Training: the loop (``loop``), optimizers and schedule (``optim``), the corpus and batches
(``data``), the run directory and its lock (``rundir``) and run records (``loggers``).

The command line is ``python train.py`` (or ``minigpt-train``, ``python -m minigpt train``); it
lives in ``minigpt.cli.train``. Read ``loop.py`` first: ``train()`` is the whole loop.
"""
