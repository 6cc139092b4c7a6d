"""Benchmarks that print figures: ``python -m aimonk.benchmark {speed,quality} ...``.

- ``speed``: the original training/inference loop against the project's, in one process.
- ``quality``: training recipes against baselines on the same cross-validation folds.
"""
