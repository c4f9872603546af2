"""Evaluate one manifest case with a :class:`~lorkd.inference.predictor.Predictor`.

Inference is the Predictor's own; this module only decides in which grid prediction and ground
truth meet:

* ``original``: the Predictor's masks in the input grid against the manifest masks, spacing from
  the image header (affine column lengths);
* ``preprocessed``: the Predictor's probabilities in its preprocessed grid (SAT's reoriented 1x1x3 mm
  grid, before inversion), thresholded, against the manifest masks moved into that grid by the data
  pipeline's nearest-neighbour resampling (as in training), spacing from that grid.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator

import numpy as np

from lorkd.data.geometry import Grid
from lorkd.data.manifest import Case
from lorkd.data.transforms import load_masks, to_preprocessed_grid
from lorkd.evaluation.records import CaseRecord, input_digest
from lorkd.evaluation.rows import case_rows, voxel_spacing
from lorkd.evaluation.settings import MetricSettings
from lorkd.inference.predictor import Predictor
from lorkd.io import printable
from lorkd.regions import RegionMap

log = logging.getLogger(__name__)

Pairs = tuple[Iterator[tuple[np.ndarray, np.ndarray]], tuple[float, float, float]]


def masks_original(predictor: Predictor, case: Case) -> Pairs:
    """(prediction, reference) per label in the input grid, lazily, and the header's voxel spacing."""
    result = predictor.predict(
        case.image, case.labels, case.modality, region=case.region, orientation=case.orientation
    )
    ref = load_masks(case, Grid(result.image.shape, result.image.affine), predictor.preprocess.nan_policy)
    pairs = ((np.asarray(result.masks[label].dataobj) > 0, ref[j] > 0) for j, label in enumerate(case.labels))
    return pairs, voxel_spacing(result.image.affine)


def masks_preprocessed(predictor: Predictor, case: Case) -> Pairs:
    """(prediction, reference) per label in the preprocessed grid, lazily, and that grid's spacing."""
    _, image, info = predictor.preprocess_input(case.image, case.modality, orientation=case.orientation)
    probabilities = predictor.predict_preprocessed(image, case.labels, case.modality, case.region, info)
    grid = Grid(info.original_shape, np.asarray(info.original_affine))
    original = load_masks(case, grid, predictor.preprocess.nan_policy)
    ref = to_preprocessed_grid(original, info, mode="nearest")
    pairs = ((probabilities[j] > predictor.threshold, ref[j] > 0.5) for j in range(len(case.labels)))
    return pairs, voxel_spacing(info.affine)


def evaluate_case(
    predictor: Predictor, case: Case, settings: MetricSettings, region_map: RegionMap | None
) -> list[dict]:
    """Metric rows of every label of ``case`` (raises on unreadable files, unknown labels, ...)."""
    masks = masks_preprocessed if settings.space == "preprocessed" else masks_original
    pairs, spacing = masks(predictor, case)
    return case_rows(
        case.dataset, case.id, case.modality, case.labels, pairs, spacing, settings, region_map, case.region
    )


def evaluate_record(
    predictor: Predictor,
    case: Case,
    settings: MetricSettings,
    region_map: RegionMap | None,
    fingerprint: str,
) -> CaseRecord:
    """:func:`evaluate_case` as a record; a failing case becomes a record holding its error."""
    start = time.perf_counter()
    inputs = input_digest(case)  # before reading: a file replaced meanwhile is seen as changed next time
    try:
        rows = evaluate_case(predictor, case, settings, region_map)
    except Exception as exc:  # a bad case (unreadable, NaN, unknown label, ...) must not stop the others
        log.warning(
            "%s/%s (%s, line %d) failed: %s",
            printable(case.dataset), printable(case.id), printable(case.source), case.line, printable(exc),
        )  # fmt: skip
        log.debug("traceback of %s/%s", case.dataset, case.id, exc_info=True)
        error = f"{type(exc).__name__}: {exc}"
        return CaseRecord(
            case.dataset, case.id, error=error, seconds=time.perf_counter() - start,
            fingerprint=fingerprint, inputs=inputs,
        )  # fmt: skip
    return CaseRecord(
        case.dataset, case.id, rows, seconds=time.perf_counter() - start, fingerprint=fingerprint, inputs=inputs
    )
