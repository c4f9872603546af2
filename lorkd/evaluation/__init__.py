"""Evaluation: per (case, label) metrics and SAT-style report aggregation (numpy/scipy only).

Submodules are imported explicitly (``from lorkd.evaluation.metrics import dice``)."""
