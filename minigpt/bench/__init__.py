"""Benchmarks: attention forward/backward against SDPA and the naive reference, per machine
(``profile``: ``python -m minigpt profile``), and generation speed with and without the KV cache
(``generate``: ``python -m minigpt bench-generate``). Speed is measured here, never in tests."""
