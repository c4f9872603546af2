"""Load once, predict many: text-prompted segmentation of whole scans, returned in their own grid.

    predictor = Predictor.from_checkpoint("lorkd.ckpt")
    result = predictor.predict("ct.nii.gz", ["liver", "spleen"], "ct")
    result.masks["liver"]      # nibabel uint8 mask, same shape and affine as ct.nii.gz
    result.segmentation        # multilabel map, id j+1 = labels[j] (result.label_ids)

Pipeline: the checkpoint's preprocessing (orientation, spacing, foreground crop, intensity) → labels
grouped by region expert (:mod:`lorkd.inference.routing`) → per group, sliding-window inference with
that expert (:mod:`lorkd.inference.sliding_window`, MONAI's arithmetic) → sigmoid → back to the input's
grid (crop, spacing and orientation undone; for masks alone, only where a label can pass the threshold,
slab by slab) → threshold.

Against masks outside the body (SAT's behaviour: ``background_padding=False, edge_padding=0,
body_mask=False``): windows past the image see its background (``InversionInfo.background``; 0 is
the normalised scan's mean intensity, tissue-like); ``edge_padding`` voxels of it can be added on every
face, so that no face of the foreground crop lies on a window's border, where the network sees its
convolutions' zero padding; and probabilities outside the body (:func:`lorkd.data.body.body_mask`,
grown by ``body_margin_mm``) are set to 0. In the multilabel map each voxel takes the
most probable label among those above the threshold (an exact tie goes to the earlier label).
"""

from __future__ import annotations

import dataclasses
import difflib
import logging
import math
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import torch

from lorkd.checkpoints import schema
from lorkd.checkpoints.loading import LoadedModel, load_model
from lorkd.data.body import body_mask
from lorkd.data.image_reader import CaseError, check_finite, open_nifti, read_volume, reordered, squeeze_to_3d
from lorkd.data.limits import LIMITS
from lorkd.data.transforms import (
    InversionInfo,
    PreprocessConfig,
    check_image_size,
    invert_above,
    invert_to_original,
    margin_voxels,
    preprocess_image,
)
from lorkd.inference.calibration import HINT as CALIBRATION_HINT
from lorkd.inference.calibration import calibration_identity, pick_windows, read_calibration, windows_per_case
from lorkd.inference.routing import PromptGroup, check_fallback, plan_groups
from lorkd.inference.sliding_window import (
    WindowModel,
    count_windows,
    default_sw_batch_size,
    sliding_window_probabilities,
)
from lorkd.io import printable
from lorkd.label_catalogue import HINT as LABELS_HINT
from lorkd.models.sat import window_size
from lorkd.prompts import PromptBank
from lorkd.regions import UnknownLabelError, canonical_modality, normalize_label, normalize_labels

log = logging.getLogger(__name__)

STITCH_DEVICES = ("auto", "cpu", "device")
# options that change no result (masks do not depend on them): left out of resume keys
NEUTRAL_OPTIONS = frozenset({"sw_batch_size", "max_queries", "stitch_device", "threads", "cache_dir", *LIMITS})
# the network's runtime: "auto" is OpenVINO on the CPU where it is installed (0.56-0.62x torch eager's time,
# scripts/benchmarks/cpu_runtimes.py), else torch; "onnx" runs an export's model.onnx files
RUNTIMES = ("auto", "torch", "onnx", "openvino")
_STITCH_FREE_FRACTION = 0.25  # "auto" stitches on the GPU while the output takes < this share of free memory
# labels mapped back to the input grid together: with kept probabilities, both grids' buffers take about
# _INVERT_BYTES (2 CT labels); for masks alone, mapped back slab by slab, their copy in the preprocessed grid
# takes about _INVERT_CROP_BYTES (8 CT labels)
_INVERT_BYTES = 2**29
_INVERT_CROP_BYTES = 2**28
ImageInput = str | Path | nib.spatialimages.SpatialImage | np.ndarray
WindowProgress = Callable[[int, int], None]  # (windows done, windows in this case)


@dataclass
class Prediction:
    """Results of one image, every image in the input's grid (shape and affine).

    ``routes`` says which network segmented each label: an expert's region name, ``"base"``,
    ``"teacher"`` or ``"model"`` (a model without experts).
    """

    masks: dict[str, nib.Nifti1Image]
    segmentation: nib.Nifti1Image
    label_ids: dict[int, str]
    routes: dict[str, str]
    image: nib.Nifti1Image
    modality: str
    probabilities: dict[str, nib.Nifti1Image] | None = None
    seconds: float = 0.0

    @property
    def labels(self) -> list[str]:
        return [self.label_ids[i] for i in sorted(self.label_ids)]


def scanner_header() -> nib.Nifti1Header:
    """The header fields ``dcm2niix`` writes for a DICOM series: scanner coordinates (qform and sform
    code 1) in mm (and seconds); the images made from a DICOM input carry them."""
    header = nib.Nifti1Header()
    header["qform_code"] = header["sform_code"] = 1
    header.set_xyzt_units("mm", "sec")
    return header


def _like(data: np.ndarray, affine: np.ndarray, header: Any = None) -> nib.Nifti1Image:
    """A NIfTI image of ``data`` with ``affine`` (and a NIfTI source header's sform/qform codes and units)."""
    out = nib.Nifti1Image(data, affine)
    if isinstance(header, nib.Nifti1Header):
        out.set_sform(affine, code=int(header["sform_code"]), update_affine=False)
        out.set_qform(affine, code=int(header["qform_code"]), update_affine=False)
        out.header.set_xyzt_units(*header.get_xyzt_units())
    return out


def read_input(
    image: ImageInput, affine: np.ndarray | None = None, nan_policy: str = "error"
) -> nib.Nifti1Image:
    """The input as a float32 3-D NIfTI image in its own grid; :class:`CaseError` names the file on failure."""
    if isinstance(image, (str, Path)):
        volume = read_volume(image, nan_policy)
        header = scanner_header() if Path(image).is_dir() else open_nifti(image).header  # a folder: a DICOM series
        return _like(volume.data, volume.affine, header)
    if isinstance(image, nib.spatialimages.SpatialImage):
        name = image_name(image)
        data = squeeze_to_3d(np.asarray(image.dataobj), name)
        header = image.header if affine is None else None
        affine = image.affine if affine is None else affine
    elif isinstance(image, np.ndarray):
        if affine is None:
            raise ValueError("a numpy image needs its affine: predict(array, ..., affine=...)")
        name, header = "<array>", None
        data = squeeze_to_3d(image, name)
    else:
        raise TypeError(
            f"unsupported image type {type(image).__name__}; give a path, a nibabel image or an array"
        )
    affine = np.asarray(affine, dtype=np.float64)
    if affine.shape != (4, 4):
        raise CaseError(f"{name}: affine must be 4x4, got shape {affine.shape}")
    data = check_finite(reordered(data, "C", np.float32), name, nan_policy)
    return _like(data, affine, header)


def image_name(image: ImageInput) -> str:
    """How warnings and errors name an input: its path, a nibabel image's file, else ``<array>``."""
    if isinstance(image, (str, Path)):
        return str(image)
    if isinstance(image, nib.spatialimages.SpatialImage):
        return image.get_filename() or "<nibabel image>"
    return "<array>"


def _constant(array: np.ndarray) -> bool:
    return array.size == 0 or float(array.min()) == float(array.max())


def _set_where(target: np.ndarray, where: np.ndarray, value: int) -> None:
    """``target[where] = value`` for an unsigned integer array, by wrapping arithmetic: a masked copy
    (``np.copyto(where=)``, ``np.where``) branches per voxel, 15x slower on a noisy mask."""
    step = np.subtract(target, target.dtype.type(value))
    step *= where
    target -= step


class _Assembler:
    """Builds masks, the multilabel map and (optionally) probabilities, a label (or a box of it) at a time."""

    def __init__(
        self, reference: nib.Nifti1Image, labels: list[str], threshold: float, keep_probabilities: bool
    ):
        shape = reference.shape
        self.reference = reference
        self.labels = labels
        self.threshold = threshold
        self.best = np.zeros(shape, dtype=np.float32)
        self.segmentation = np.zeros(shape, dtype=np.uint8 if len(labels) < 256 else np.uint16)
        self.highest = 0  # the highest label id added so far
        self.tie_check: dict[str, bool] = {}  # per label: was a label with a higher id added before it?
        self.masks: dict[str, nib.Nifti1Image] = {}
        self.probabilities: dict[str, nib.Nifti1Image] | None = {} if keep_probabilities else None

    def _image(self, data: np.ndarray) -> nib.Nifti1Image:
        return _like(data, self.reference.affine, self.reference.header)

    def add(self, index: int, probability: np.ndarray, box: tuple[slice, slice, slice] | None = None) -> None:
        """Add a label's probabilities on the reference grid: the whole of it, or only ``box`` of it
        (outside which the label is below the threshold; without kept probabilities). Boxes of one label
        may come in several calls (e.g. slab by slab) as long as they do not overlap."""
        label, ident = self.labels[index], index + 1
        if box is not None and self.probabilities is not None:
            raise ValueError("kept probabilities need the whole grid, not a box")
        region = (slice(None),) * 3 if box is None else box
        segmentation, best = self.segmentation[region], self.best[region]
        inside = probability > self.threshold
        better = probability > best
        # a later label came first: a tie goes to the earlier label (decided at a label's first box: the
        # labels added at its later boxes before it are the same ones)
        if self.tie_check.setdefault(label, ident < self.highest):
            better |= (probability == best) & (segmentation > ident)
        self.highest = max(self.highest, ident)
        better &= inside
        _set_where(segmentation, better, ident)
        # the best becomes the probability where it is better (p >= best there), stays elsewhere: fmax of
        # best and 0 (or NaN, never better) is best
        np.fmax(best, np.multiply(probability, better, dtype=np.float32), out=best)
        if box is None:
            self.masks[label] = self._image(inside.view(np.uint8))
        else:
            np.asarray(self.mask(label).dataobj)[box] = inside
        if self.probabilities is not None:
            self.probabilities[label] = self._image(probability.astype(np.float32, copy=False))

    def mask(self, label: str) -> nib.Nifti1Image:
        """The label's mask (uint8), empty until a box of it is added."""
        if label not in self.masks:
            self.masks[label] = self._image(np.zeros(self.segmentation.shape, dtype=np.uint8))
        return self.masks[label]


class Predictor:
    """Segment images with a loaded model (see the module docstring).

    Args:
        model: what :func:`~lorkd.checkpoints.loading.load_model` returns.
        teacher: the teacher of a LoRKD model, needed only for ``fallback="teacher"``.
        device: where the network runs (default: CUDA when available, else CPU).
        window: sliding-window size in voxels of the preprocessed grid (default: the training patch
            size recorded in the checkpoint, else SAT's 288×288×96), rounded up to the network's size divisor.
        overlap: window overlap (0.5, gaussian blending).
        sw_batch_size: windows per forward (default: :func:`default_sw_batch_size`, 1 for large CPU
            windows, else 2); at least 2 for small CPU windows, where one window takes a slow conv path.
        max_queries: prompts decoded per pass (bounds the logits' memory; results do not depend on it); ONNX
            and OpenVINO experts decode a group's prompts in one pass (a pass per chunk would encode again).
        threshold: probability above which a voxel belongs to a label.
        fallback: who segments labels without an expert: None (error), ``"base"`` or ``"teacher"``.
        amp: autocast on CUDA (default: on for CUDA; never on the CPU).
        nan_policy: NaN/Inf voxels of an input: ``"error"`` or ``"zero"`` (default: the checkpoint's).
        max_input_voxels, max_resampled_voxels, max_downsampling: the size guards of
            :mod:`lorkd.data.limits` (None: their defaults).
        stitch_device: where windows are blended: ``"cpu"``, ``"device"`` or ``"auto"`` (the device
            while the blended output takes under a quarter of its free memory, else the CPU).
        background_padding: pad windows past the image with its background value (False: with 0, as SAT).
        edge_padding: voxels of padding added to each face of the preprocessed image (0: SAT's behaviour).
        body_mask: set probabilities outside the body to 0 (the voxels above the image's background,
            holes filled per axial slice, grown by ``body_margin_mm``); False: SAT's behaviour.
        body_margin_mm: how far outside the body a mask may reach.
        runtime: what runs the networks: ``"torch"``, ``"openvino"`` (CPU; converted once and cached, see
            :mod:`lorkd.inference.openvino_runtime`), ``"auto"`` (OpenVINO on the CPU where it is installed,
            else torch; torch on GPUs) or ``"onnx"`` (an export's ONNX experts, :meth:`from_checkpoint`).
        precision: the CPU runtime's arithmetic: ``"f32"``, ``"bf16"`` (OpenVINO, CPUs with native bf16
            only) or ``"int8"`` (OpenVINO, quantised by NNCF on ``calibration``); masks may change, see the
            README. GPUs use ``amp``.
        threads: CPU threads of the OpenVINO network (None: torch's, ``torch.get_num_threads()``).
        cache_dir: where converted networks are kept (None: ``$LORKD_CACHE_DIR`` or ``~/.cache/lorkd``).
        calibration: ``precision="int8"`` only, and required there: a manifest of a few cases like those to
            predict (:mod:`lorkd.inference.calibration`).
    """

    def __init__(
        self,
        model: LoadedModel,
        teacher: LoadedModel | None = None,
        device: torch.device | str | None = None,
        window: Sequence[int] | None = None,
        overlap: float = 0.5,
        sw_batch_size: int | None = None,
        max_queries: int = 16,
        threshold: float = 0.5,
        fallback: str | None = None,
        amp: bool | None = None,
        stitch_device: str = "auto",
        nan_policy: str | None = None,
        max_input_voxels: int | None = None,
        max_resampled_voxels: int | None = None,
        max_downsampling: float | None = None,
        background_padding: bool = True,
        edge_padding: int = 0,
        body_mask: bool = True,
        body_margin_mm: float = 5.0,
        runtime: str = "torch",
        precision: str = "f32",
        threads: int | None = None,
        cache_dir: str | Path | None = None,
        calibration: str | Path | None = None,
    ) -> None:
        self.model = model
        self.fallback = check_fallback(fallback)
        self._warned: set[str] = set()
        if fallback == "teacher" and model.experts and teacher is None:
            raise ValueError(
                f"fallback='teacher' needs the teacher of {model.source} (Predictor(..., teacher=...))"
            )
        self.teacher = teacher if model.experts else None
        if not 0.0 <= float(threshold) < 1.0:
            raise ValueError(f"threshold must be in [0, 1), got {threshold}")
        if not 0.0 <= float(overlap) < 1.0:
            raise ValueError(f"overlap must be in [0, 1), got {overlap}")
        if stitch_device not in STITCH_DEVICES:
            raise ValueError(f"stitch_device must be one of {STITCH_DEVICES}, got {stitch_device!r}")
        if int(max_queries) < 1:
            raise ValueError(f"max_queries must be >= 1, got {max_queries}")
        if sw_batch_size is not None and int(sw_batch_size) < 1:
            raise ValueError(f"sw_batch_size must be >= 1 (or None: chosen per device and window), got {sw_batch_size}")
        if float(body_margin_mm) < 0:
            raise ValueError(f"body_margin_mm must be >= 0, got {body_margin_mm}")
        if int(edge_padding) < 0:
            raise ValueError(f"edge_padding must be >= 0, got {edge_padding}")
        if runtime not in RUNTIMES:
            raise ValueError(f"runtime must be one of {RUNTIMES}, got {runtime!r}")
        if precision != "f32" and runtime not in ("auto", "openvino"):
            raise ValueError(f"precision={precision!r} runs with runtime=openvino (or auto), not {runtime!r}")
        if threads is not None and int(threads) < 1:
            raise ValueError(f"threads must be >= 1 (or None: torch's), got {threads}")
        self.runtime = runtime
        self.precision = precision
        self.threads = None if threads is None else int(threads)
        self.cache_dir = cache_dir
        if (calibration is not None) != (precision == "int8"):
            raise ValueError(
                f"precision=int8 needs calibration cases: {CALIBRATION_HINT}" if calibration is None
                else f"calibration is used by precision=int8 only, not {precision!r}"
            )  # fmt: skip
        self.calibration = None if calibration is None else read_calibration(calibration)
        self._compiled: dict[tuple[int, int | None], tuple[torch.nn.Module, int | None]] = {}
        self.edge_padding = int(edge_padding)
        self.background_padding = bool(background_padding)
        self.threshold = float(threshold)
        self.body_mask = bool(body_mask)
        self.body_margin_mm = float(body_margin_mm)
        self.overlap = float(overlap)
        self.max_queries = int(max_queries)
        self.stitch_device = stitch_device
        self.preprocess = PreprocessConfig.coerce(model.data.get("preprocess"))
        given = {"nan_policy": nan_policy, "max_input_voxels": max_input_voxels,
                 "max_resampled_voxels": max_resampled_voxels, "max_downsampling": max_downsampling}  # fmt: skip
        self.preprocess = dataclasses.replace(self.preprocess, **{k: v for k, v in given.items() if v is not None})
        divisor = model.size_divisor
        if self.teacher is not None:
            divisor = math.lcm(divisor, self.teacher.size_divisor)
        fixed = getattr(model, "fixed_window", None)  # ONNX experts run the window they were exported for
        if fixed is not None and window is not None and window_size(window, divisor) != fixed:
            log.warning("ONNX experts of %s run windows of %s, not the %s asked for", model.source, fixed, window)
        if window is None:
            window = schema.patch_size(model.data)
        self.window = fixed or window_size(window, divisor)
        self._sw_batch_size = None if sw_batch_size is None else int(sw_batch_size)
        self._amp = amp
        self.device = torch.device("cpu")
        self.to(device or ("cuda" if torch.cuda.is_available() else "cpu"))

    @classmethod
    def from_checkpoint(
        cls,
        path: str | Path,
        network: str = "experts",
        text_checkpoint: str | Path | None = None,
        language_model_path: str | None = None,
        net_overrides: dict[str, Any] | None = None,
        runtime: str = "torch",
        **options: Any,
    ) -> Predictor:
        """Load a LoRKD, SATModule or official SAT checkpoint (see :func:`load_model`) once.

        ``runtime="onnx"``: an export's experts run with onnxruntime (their exported window); ``"openvino"``
        and ``"auto"``: see :class:`Predictor`. A LoRKD student's experts are built without peft
        (:mod:`lorkd.experts.plain`: the same outputs). ``options`` are :class:`Predictor`'s arguments
        (device, window, fallback, ...).
        """
        loaded = load_model(
            path, network, text_checkpoint, language_model_path, net_overrides,
            runtime="onnx" if runtime == "onnx" else "torch", plain_experts=True,
        )  # fmt: skip
        teacher = None
        if options.get("fallback") == "teacher" and loaded.experts:
            teacher = load_model(path, "teacher")
        return cls(loaded, teacher=teacher, runtime=runtime, **options)

    @classmethod
    def load(cls, path: str | Path, network: str = "experts", attempts: int = 3, **options: Any) -> Predictor:
        """:meth:`from_checkpoint`, again while a fallback teacher was read from another version of the file
        (rewritten between the two reads), up to ``attempts`` loads: ``model.identity`` is that of the bytes
        loaded (:func:`lorkd.api.load`; predict and eval start up through it)."""
        for _ in range(attempts):
            predictor = cls.from_checkpoint(path, network, **options)
            if predictor.teacher is None or predictor.teacher.identity == predictor.model.identity:
                return predictor
        raise OSError(f"{path} changed while it was read, {attempts} times: run again once it is written")

    # ---- devices ----------------------------------------------------------------------------------
    def to(self, device: torch.device | str) -> Predictor:
        """Move the networks (not the text side: queries are computed once on the CPU) to ``device``."""
        self.device = torch.device(device)
        for loaded in (self.model, self.teacher):
            if loaded is not None:
                loaded.to(self.device)
        self.amp = self.device.type == "cuda" and (self._amp is None or bool(self._amp))
        self.cpu_runtime = self._cpu_runtime()
        default = default_sw_batch_size(self.device, self.window)
        self.sw_batch_size = self._sw_batch_size or default
        if self.sw_batch_size < default:
            log.warning(
                "sw_batch_size=%d is slow for %s windows on the CPU (batch-1 3-D convs); using %d",
                self.sw_batch_size, "x".join(map(str, self.window)), default,
            )  # fmt: skip
            self.sw_batch_size = default
        return self

    def _cpu_runtime(self) -> str | None:
        """"openvino" where OpenVINO runs the networks on this device, else None (torch, or onnx experts)."""
        from lorkd.inference import openvino_runtime

        if self.runtime in ("torch", "onnx") or (self.runtime == "auto" and self.device.type != "cpu"):
            return None
        if self.device.type != "cpu":
            raise ValueError(f"runtime=openvino runs on the CPU, not {self.device} (use runtime=auto or torch)")
        if self.runtime == "openvino" and not openvino_runtime.available():
            raise ImportError(f"runtime=openvino needs the openvino extra: {openvino_runtime.INSTALL}")
        if self.runtime == "auto" and not openvino_runtime.available():
            if self.precision != "f32":
                raise ValueError(f"precision={self.precision} needs OpenVINO: {openvino_runtime.INSTALL}")
            log.info("OpenVINO is not installed: the networks run in torch (%s: faster on the CPU)", openvino_runtime.INSTALL)
            return None
        openvino_runtime.check_precision(self.precision)
        return "openvino"

    def _stitch_on(self, channels: int, shape: Sequence[int]) -> torch.device:
        if self.device.type == "cpu" or self.stitch_device == "cpu":
            return torch.device("cpu")
        if self.stitch_device == "device":
            return self.device
        padded = [max(int(s), w) for s, w in zip(shape, self.window)]
        needed = 4 * (channels + 2) * math.prod(padded)  # output, weights and the image, float32
        free, _ = torch.cuda.mem_get_info(self.device)
        return self.device if needed < _STITCH_FREE_FRACTION * free else torch.device("cpu")

    # ---- prompts ----------------------------------------------------------------------------------
    def labels(self, modality: str | None = None) -> dict[str, Any]:
        """The model's label catalogue: labels per modality, their region and expert, parameter counts
        (see :func:`lorkd.label_catalogue.catalogue`; ``lorkd-labels`` prints it)."""
        from lorkd.label_catalogue import catalogue

        return catalogue(self.model, modality)

    def plan(self, labels: Sequence[str], modality: str, region: str | None = None) -> list[PromptGroup]:
        """Which network segments which labels (raises for unknown labels unless ``fallback`` is set)."""
        return plan_groups(
            labels,
            modality,
            self.model.experts,
            self.model.region_map,
            region,
            self.fallback,
            self.model.source,
            self._warn_once,
        )

    def _warn_once(self, message: str) -> None:
        """Log a routing warning the first time this predictor meets it (not once per case)."""
        if message not in self._warned:
            self._warned.add(message)
            log.warning("%s", message)

    def check(
        self, labels: Sequence[str] | str, modality: str, region: str | None = None
    ) -> list[PromptGroup]:
        """Plan ``labels``, make sure each has a query and load the networks they need (an export's experts
        are sha256-checked now: a replaced file stops a run before its first case), without running any network."""
        labels = normalize_labels(labels)
        modality = canonical_modality(modality)
        groups = self.plan(labels, modality, region)
        self._group_queries(labels, modality, groups)
        for group in groups:
            self._network(group)
        return groups

    def _bank(self, group: PromptGroup) -> PromptBank:
        return (
            self.teacher.prompts
            if group.route == "teacher" and self.teacher is not None
            else self.model.prompts
        )

    def _queries(self, bank: PromptBank, labels: Sequence[str], modality: str) -> torch.Tensor:
        try:
            with torch.inference_mode():
                return bank.queries(list(labels), modality).to(self.device)
        except KeyError as exc:
            missing = sorted({lab for lab in labels if normalize_label(lab) not in bank.embeddings})
            known = sorted(bank.embeddings)
            close = sorted(
                {c for lab in missing for c in difflib.get_close_matches(lab, known, n=3, cutoff=0.5)}
            )
            hint = f"; closest known prompts: {', '.join(close)}" if close else ""
            raise UnknownLabelError(
                f"prompt(s) {missing} are not in the prompt bank of {self.model.source} and no language model "
                f"is available to encode them{hint}; {LABELS_HINT}"
            ) from exc

    # ---- inference --------------------------------------------------------------------------------
    def _network(self, group: PromptGroup) -> tuple[torch.nn.Module, int | None]:
        """The network of a prompt group and the expert index to route it with (None: the network is
        already the expert's, or an ONNX/OpenVINO model of it)."""
        loaded = self.teacher if group.route == "teacher" and self.teacher is not None else self.model
        net, expert = loaded.for_expert(None if loaded is self.teacher else group.expert)
        if self.cpu_runtime != "openvino" or getattr(net, "probabilities", None) is not None:
            return net, expert
        key = (id(net), expert)
        if key not in self._compiled:
            self._compiled[key] = self._openvino(loaded, net, expert, group.route)
        return self._compiled[key]

    def _openvino(
        self, loaded: LoadedModel, net: torch.nn.Module, expert: int | None, route: str
    ) -> tuple[torch.nn.Module, int | None]:
        """``net`` through ``expert`` compiled by OpenVINO (converted once, cached on disk); with
        ``runtime="auto"``, the torch network and ``expert`` (one warning) when the conversion fails."""
        from lorkd.inference.openvino_runtime import Calibration, openvino_expert

        identity = {**loaded.identity, "source": loaded.source, "fingerprint": loaded.fingerprint, "network": loaded.network}
        calibration = None
        if self.calibration is not None:
            settings = {"overlap": self.overlap, "edge_padding": self.edge_padding, "background": self.background_padding}
            calibration = Calibration(
                {**calibration_identity(self.calibration), **settings}, lambda: self._calibration_samples(route)
            )
        try:
            compiled = openvino_expert(
                net, expert, self.window, identity if loaded.identity else {}, route,
                self.threads or torch.get_num_threads(), self.precision, self.cache_dir, calibration,
            )  # fmt: skip
            return compiled, None
        except Exception as exc:
            if self.runtime != "auto":
                raise
            log.warning("OpenVINO could not convert the %s network of %s (%s): it runs in torch", route,
                        printable(loaded.source), str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__)  # fmt: skip
            return net, expert

    def _calibration_samples(self, route: str) -> list[tuple[np.ndarray, np.ndarray]]:
        """(window, queries) inputs of the network of ``route`` for int8 calibration: windows of the calibration
        cases with labels it segments (preprocessed and padded as for prediction) and those labels' queries."""
        assert self.calibration is not None
        planned = [(case, [g for g in self.plan(case.labels, case.modality, case.region) if g.route == route])
                   for case in self.calibration]  # fmt: skip
        planned = [(case, groups) for case, groups in planned if groups]
        samples = []
        for case, groups in planned:
            labels = [case.labels[i] for g in groups for i in g.indices]
            queries = self._queries(self._bank(groups[0]), labels, case.modality).float().cpu().numpy()
            _, image, info = self.preprocess_input(case.image, case.modality, orientation=case.orientation)
            background = info.background if self.background_padding else 0.0
            if self.edge_padding:
                image = np.pad(image, ((0, 0), *((self.edge_padding,) * 2,) * 3), constant_values=background)
            for window in pick_windows(image, self.window, self.overlap, windows_per_case(len(planned)), background):
                samples.append((window, queries))
        return samples

    def _group_probabilities(
        self,
        image: np.ndarray,
        group: PromptGroup,
        queries: torch.Tensor,
        progress: Callable[[int], None] | None,
        background: float,
        out: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """(n_group, X, Y, Z) float32 probabilities on the CPU for a preprocessed (1, X, Y, Z) image
        (padded with ``background``: ``edge_padding`` voxels per face, more where smaller than the window),
        or in ``out``, a zero CPU tensor of that shape."""
        pad = self.edge_padding
        if pad:
            image = np.pad(image, ((0, 0), *((pad, pad),) * 3), constant_values=background)
        stitch = self._stitch_on(len(group.indices), image.shape[1:])
        tensor = torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32))[None].to(stitch)
        net, expert = self._network(group)
        model = WindowModel(net, queries, expert, self.max_queries, self.amp, progress)
        with torch.inference_mode():
            probs = sliding_window_probabilities(
                tensor, model, self.window, self.overlap, self.sw_batch_size, self.device, stitch,
                cval=background, out=None if pad else out,
            )  # fmt: skip
            if pad:
                probs = probs[:, pad:-pad, pad:-pad, pad:-pad]
            if out is not None:
                return probs if probs is out else out.copy_(probs)
        return probs.contiguous().cpu()

    def body(self, image: np.ndarray, info: InversionInfo | None = None) -> np.ndarray:
        """Where masks of a preprocessed (1, X, Y, Z) image may lie: its body grown by ``body_margin_mm``
        (X, Y, Z) bool; ``info`` as in :meth:`predict_preprocessed`."""
        background, affine = self._grid(image, info)
        if affine is None:
            raise ValueError(
                "this checkpoint keeps each image's own spacing: give the image's InversionInfo (info=...)"
            )
        return body_mask(image[0], background, margin_voxels(self.body_margin_mm, affine))

    def _grid(self, image: np.ndarray, info: InversionInfo | None) -> tuple[float, np.ndarray | None]:
        """Background value and affine of a preprocessed image: ``info``'s, else the image's minimum and
        the checkpoint's spacing (None when it keeps each image's own)."""
        if info is not None:
            return info.background, info.affine
        spacing = self.preprocess.spacing
        return float(image.min()), None if spacing is None else np.diag([*spacing, 1.0])

    def _group_queries(
        self, labels: list[str], modality: str, groups: list[PromptGroup]
    ) -> list[torch.Tensor]:
        return [self._queries(self._bank(g), [labels[i] for i in g.indices], modality) for g in groups]

    def _run_groups(
        self,
        image: np.ndarray,
        groups: list[PromptGroup],
        queries: list[torch.Tensor],
        progress: WindowProgress | None,
        info: InversionInfo | None = None,
        uncropped: bool = False,
    ) -> Iterator[tuple[PromptGroup, torch.Tensor]]:
        """Yield (group, its probabilities (n_group, X, Y, Z)) for a preprocessed image (see :meth:`_grid`);
        with ``uncropped``, on ``info``'s grid before the crop ((n_group, *info.resampled_shape), 0 outside
        the crop), blended there in place: mapping them back takes no copy."""
        tick = None
        if progress is not None:
            padded = [s + 2 * self.edge_padding for s in image.shape[1:]]
            total = count_windows(padded, self.window, self.overlap) * len(groups)
            done = [0]

            def tick(n: int) -> None:
                done[0] += n
                progress(done[0], total)

        blank = _constant(image)  # no contrast: no network output could mean anything
        background = self._grid(image, info)[0] if self.background_padding else 0.0
        body = None  # computed once the first group's windows have run: the first window waits for nothing
        for group, q in zip(groups, queries):
            full, crop = None, None
            if uncropped:
                assert info is not None, "probabilities go into the grid before the crop of an InversionInfo"
                # numpy's zeros: the pages outside the crop are never touched, so they take no memory
                full = torch.from_numpy(np.zeros((len(group.indices), *info.resampled_shape), np.float32))
                crop = full[(slice(None), *info.crop_slices)]
            if blank:
                yield group, full if full is not None else torch.zeros((len(group.indices), *image.shape[1:]))
                continue
            probs = self._group_probabilities(image, group, q, tick, background, out=crop)
            if self.body_mask:
                if body is None:
                    body = torch.from_numpy(self.body(image, info))
                with torch.inference_mode():
                    probs.mul_(body)
            yield group, full if full is not None else probs

    def predict_preprocessed(
        self,
        image: np.ndarray,
        labels: Sequence[str],
        modality: str,
        region: str | None = None,
        info: InversionInfo | None = None,
    ) -> np.ndarray:
        """Probabilities (N, X, Y, Z) float32 for an image already in the preprocessed grid (1, X, Y, Z).

        ``info`` (from :meth:`preprocess_input`) gives its background value and grid; without it, the
        image's minimum and the checkpoint's spacing.
        """
        labels = normalize_labels(labels)
        modality = canonical_modality(modality)
        groups = self.plan(labels, modality, region)
        queries = self._group_queries(labels, modality, groups)
        out = np.zeros((len(labels), *image.shape[1:]), dtype=np.float32)
        for group, probs in self._run_groups(image, groups, queries, None, info):
            out[group.indices] = probs.numpy()
        return out

    def preprocess_input(
        self,
        image: ImageInput,
        modality: str,
        affine: np.ndarray | None = None,
        orientation: str | None = None,
    ) -> tuple[nib.Nifti1Image, np.ndarray, InversionInfo]:
        """The input image, its preprocessed array (1, X, Y, Z) and the geometry to map results back."""
        if isinstance(image, (str, Path)):
            check_image_size(image, self.preprocess, orientation)  # before any voxel is read
        reference = read_input(image, affine, self.preprocess.nan_policy)
        name = image_name(image)
        array, info = preprocess_image(
            np.asarray(reference.dataobj),
            modality,
            self.preprocess,
            affine=reference.affine,
            orientation=orientation,
            name=name,
        )
        if _constant(array):
            log.warning(
                "%s: constant image after preprocessing (no contrast, e.g. all zero): nothing to segment, "
                "every mask is empty",
                printable(name),
            )
        return reference, array, info

    def predict(
        self,
        image: ImageInput,
        labels: Sequence[str] | str,
        modality: str,
        region: str | None = None,
        affine: np.ndarray | None = None,
        orientation: str | None = None,
        return_probabilities: bool = False,
        progress: WindowProgress | None = None,
    ) -> Prediction:
        """Segment ``labels`` in one image (a path, a nibabel image, or an array with its ``affine``).

        ``region`` forces one expert for every label; ``orientation`` overrides the checkpoint's axis
        codes (e.g. "ASR" for sagittal spine MRI); ``progress(done, total)`` is called after each window batch.
        """
        start = time.perf_counter()
        labels = normalize_labels(labels)
        modality = canonical_modality(modality)
        groups = self.plan(labels, modality, region)
        queries = self._group_queries(labels, modality, groups)
        reference, array, info = self.preprocess_input(image, modality, affine, orientation)
        outputs = _Assembler(reference, labels, self.threshold, return_probabilities)
        routes: dict[str, str] = {}
        chunk = max(1, _INVERT_BYTES // (4 * (math.prod(reference.shape) + math.prod(info.resampled_shape))))
        crop_chunk = max(1, _INVERT_CROP_BYTES // (4 * math.prod(info.shape)))
        for group, probs in self._run_groups(array, groups, queries, progress, info, not return_probabilities):
            routes.update((labels[index], group.route) for index in group.indices)
            if not return_probabilities:  # masks only: map back just where a label can pass the threshold
                for positions, box, values in invert_above(probs.numpy(), info, self.threshold, crop_chunk):
                    for position, probability in zip(positions, values):
                        outputs.add(group.indices[position], probability, box)
                del probs
                continue
            for first in range(0, len(group.indices), chunk):
                original = invert_to_original(probs[first : first + chunk].numpy(), info, mode="bilinear")
                for index, probability in zip(group.indices[first : first + chunk], original):
                    outputs.add(index, probability)
            del probs
        return Prediction(
            masks={lab: outputs.mask(lab) for lab in labels},
            segmentation=outputs._image(outputs.segmentation),
            label_ids={i + 1: lab for i, lab in enumerate(labels)},
            routes={lab: routes[lab] for lab in labels},
            image=reference,
            modality=modality,
            probabilities=(
                {lab: outputs.probabilities[lab] for lab in labels}
                if outputs.probabilities is not None
                else None
            ),
            seconds=time.perf_counter() - start,
        )
