"""LoRKD: SAT decomposed into low-rank region experts (training, evaluation, inference).

The Python API (:mod:`lorkd.api`), imported on first use so that ``import lorkd`` stays cheap:
``lorkd.segment`` (images in, images in their own grid out), ``lorkd.load`` (a Predictor: load once,
segment many), ``lorkd.evaluate`` and ``lorkd.export``.
"""

from typing import Any

_API = {
    "segment": "lorkd.api",
    "load": "lorkd.api",
    "export": "lorkd.api",
    "evaluate": "lorkd.evaluation.pipeline",
    "Predictor": "lorkd.inference.predictor",
    "Prediction": "lorkd.inference.predictor",
}

__all__ = sorted(_API)


def __getattr__(name: str) -> Any:
    if name in _API:
        import importlib

        return getattr(importlib.import_module(_API[name]), name)
    raise AttributeError(f"module 'lorkd' has no attribute {name!r}")
