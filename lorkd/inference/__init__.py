"""Inference: load a model once, segment scans in their own geometry (``Predictor``), write results."""

from lorkd.checkpoints.loading import LoadedModel, load_model
from lorkd.inference.predictor import Prediction, Predictor, read_input
from lorkd.inference.writer import save_prediction

__all__ = ["LoadedModel", "Prediction", "Predictor", "load_model", "read_input", "save_prediction"]
