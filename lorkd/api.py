"""The Python API: one typed function per job, images in and images out; the Hydra apps parse their
configs and call these. ``import lorkd`` is cheap: ``lorkd.segment``, ``lorkd.load``, ``lorkd.evaluate``
and ``lorkd.export`` import their modules on first use.

    import lorkd
    result = lorkd.segment("ct.nii.gz", ["liver", "spleen"], modality="ct", model="lorkd.ckpt")
    result.masks["liver"]          # nibabel uint8 mask in ct.nii.gz's grid (shape and affine)
    result.segmentation            # multilabel map, id j+1 = labels[j] (result.label_ids)

    predictor = lorkd.load("lorkd.ckpt", device="cuda")        # load once, segment many
    for path in paths:
        lorkd.segment(path, ["liver"], modality="ct", model=predictor)
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import nibabel as nib
    import numpy as np
    import torch

    from lorkd.inference.predictor import Prediction, Predictor

# the Predictor of the last lorkd.segment(..., model=PATH): (cache key, predictor); one, to bound memory
_last: list[tuple[tuple, Predictor]] = []


def load(
    model: str | Path,
    network: str = "experts",
    *,
    device: str | torch.device | None = None,
    text_checkpoint: str | Path | None = None,
    language_model_path: str | None = None,
    net_overrides: dict[str, Any] | None = None,
    attempts: int = 3,
    **options: Any,
) -> Predictor:
    """Load ``model`` once into a :class:`~lorkd.inference.predictor.Predictor` (predict many images with it).

    Args:
        model: our LoRKD or SAT checkpoint, an official SAT or official LoRKD file, or an export folder.
        network: ``"experts"`` (the LoRKD student with its region experts) or ``"teacher"``.
        device: where the network runs (None: CUDA when available, else the CPU).
        text_checkpoint, language_model_path, net_overrides: for official SAT files (their paired text
            encoder, local language model folder and architecture arguments not stored in them).
        attempts: loads of a fallback teacher read from another version of the file (rewritten between
            the two reads) before giving up: ``predictor.model.identity`` is that of the bytes loaded.
        options: :class:`~lorkd.inference.predictor.Predictor`'s options (``window``, ``threshold``,
            ``fallback``, ``runtime``, ...).
    """
    from lorkd.inference.predictor import Predictor

    return Predictor.load(
        model, network, device=device, text_checkpoint=text_checkpoint, language_model_path=language_model_path,
        net_overrides=net_overrides, attempts=attempts, **options,
    )  # fmt: skip


def _cache_key(model: str | Path, network: str, device: Any, options: dict[str, Any]) -> tuple:
    """What makes two loads the same: the file (path and identity: a rewritten file is loaded again),
    the network, the device and the options."""
    from lorkd.io import file_identity

    path = Path(model).resolve()
    identity = file_identity(path / "index.json" if (path / "index.json").is_file() else path)
    return (str(path), tuple(sorted(identity.items())), network, str(device), repr(sorted(options.items())))


def cached(model: str | Path, network: str = "experts", device: str | torch.device | None = None, **options: Any) -> Predictor:
    """:func:`load`, reusing the Predictor of the previous call with the same file (unchanged), network,
    device and options; one Predictor is kept (the previous one is released)."""
    key = _cache_key(model, network, device, options)
    if _last and _last[0][0] == key:
        return _last[0][1]
    _last.clear()  # release the previous model before loading the next
    predictor = load(model, network, device=device, **options)
    _last.append((key, predictor))
    return predictor


def segment(
    image: str | Path | nib.spatialimages.SpatialImage | np.ndarray,
    labels: Sequence[str] | str,
    *,
    model: str | Path | Predictor,
    modality: str = "ct",
    network: str = "experts",
    device: str | torch.device | None = None,
    region: str | None = None,
    orientation: str | None = None,
    affine: np.ndarray | None = None,
    probabilities: bool = False,
    **options: Any,
) -> Prediction:
    """Segment ``labels`` in one image; every image returned is in the input's grid (shape and affine).

    Args:
        image: a NIfTI file (or anything nibabel reads), a DICOM series folder, a nibabel image in memory,
            or a numpy array with its ``affine``.
        labels: what to segment, e.g. ``["liver", "spleen"]`` (``lorkd-labels`` lists a model's labels).
        model: a checkpoint, official file or export folder (loaded once and kept for the next call with
            the same arguments), or a :class:`~lorkd.inference.predictor.Predictor` (:func:`load`).
        modality: ``ct``, ``mri``, ``us``, ``pet`` (or MRI sequence names such as T1, T2).
        network: ``"experts"`` or ``"teacher"`` (a path ``model`` only).
        device: where the network runs (None: CUDA when available, else the CPU; a Predictor is moved).
        region: force one expert for every label (e.g. ``"abdomen"``).
        orientation: axis codes overriding the checkpoint's (e.g. ``"ASR"`` for sagittal spine MRI).
        affine: the voxel-to-world affine of a numpy ``image``.
        probabilities: also return each label's probabilities (float32 images) in ``.probabilities``.
        options: :func:`load`'s options (a path ``model`` only): ``threshold``, ``window``, ``fallback``, ...

    Returns:
        a :class:`~lorkd.inference.predictor.Prediction`: ``masks`` (label -> uint8 nibabel image),
        ``segmentation`` (multilabel map, id -> label in ``label_ids``), ``routes`` (label -> expert).
    """
    from lorkd.inference.predictor import Predictor

    if isinstance(model, Predictor):
        if options or network != "experts":
            raise ValueError(
                f"network and options ({sorted(options)}) belong to loading: pass them to lorkd.load(), not with a Predictor"
            )
        predictor = model if device is None or model.device == _device(device) else model.to(device)
    else:
        predictor = cached(model, network, device, **options)
    return predictor.predict(
        image, labels, modality, region=region, affine=affine, orientation=orientation, return_probabilities=probabilities
    )


def _device(device: str | torch.device) -> torch.device:
    import torch

    return torch.device(device)


def export(
    model: str | Path,
    output_dir: str | Path,
    *,
    regions: Sequence[str] | None = None,
    overwrite: bool = False,
    onnx: bool = False,
    text_checkpoint: str | Path | None = None,
    language_model_path: str | None = None,
    student_preset: str | None = None,
    teacher_checkpoint: str | Path | None = None,
    net_overrides: dict[str, Any] | None = None,
) -> Path:
    """Export a trained LoRKD checkpoint (or an official ``lorkd-imbalance-*.pth``) as one merged standalone
    model per region plus peft adapters in ``output_dir``; returns ``output_dir`` (``lorkd-export`` calls it).

    Args:
        regions: experts to export (None: all).
        overwrite: replace an earlier export at ``output_dir`` (else an existing one is an error).
        onnx: also ``<region>/model.onnx`` (the ``onnx`` extra; predict with ``runtime="onnx"``).
        text_checkpoint, language_model_path: an official file's paired text encoder and local BioLORD folder
            (required for them); ``student_preset`` (nano | pro) checks its architecture,
            ``teacher_checkpoint`` records the SAT file it was distilled from, ``net_overrides`` gives
            architecture arguments not stored in it.
    """
    from lorkd.checkpoints.export import export_experts

    official = {
        "text_checkpoint": text_checkpoint, "language_model_path": language_model_path,
        "student_preset": student_preset, "teacher_checkpoint": teacher_checkpoint, "net_overrides": net_overrides,
    }  # fmt: skip
    given = {k: v for k, v in official.items() if v is not None}
    return export_experts(model, output_dir, regions=regions, overwrite=overwrite, onnx=onnx, **given)
