"""SAT's preprocessing (orientation, spacing, foreground crop, intensity) and its exact inverse.

The target grid is MONAI's ``Orientation`` + ``Spacing`` grid and every array (image, masks,
predictions) is moved between the original grid and that grid by one resampling
(:mod:`lorkd.data.grid`, MONAI's ``SpatialResample`` reproduced bit for bit without importing MONAI);
forward and inverse therefore share one geometry.
:class:`InversionInfo` keeps what the inverse needs, so predictions are written in the input's
own grid (shape and affine) rather than SAT's identity-affine resampled grid.

Documented edge cases:

* all-background volume (e.g. a CT with HU <= 0 everywhere): cropping to the voxels > 0 would give
  an empty box, so the full volume is kept and a warning is logged;
* constant volume: the z-score has std 0, the result is all zeros (never NaN);
* NaN/Inf voxels: :class:`~lorkd.data.image_reader.CaseError` naming the file (``nan_policy="error"``, the
  default) or replaced by 0 (``nan_policy="zero"``);
* 4-D input with a singleton channel is squeezed; any other non-3-D input is a ``CaseError``.
* an image beyond the size guards of :mod:`lorkd.data.limits` (voxels as stored, voxels at the target
  spacing, image voxels per resampled voxel) is a ``SizeError`` naming the file, from its header before
  any voxel is read.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np

from lorkd.data.geometry import Grid, read_mask
from lorkd.data.grid import reach, resample, resample_slabs, target_grid
from lorkd.data.image_reader import (
    NAN_POLICIES,
    CaseError,
    Volume,
    check_finite,
    header_grid,
    read_volume,
    reordered,
    squeeze_to_3d,
)
from lorkd.data.limits import (
    LIMITS,
    MAX_DOWNSAMPLING,
    MAX_INPUT_VOXELS,
    MAX_RESAMPLED_VOXELS,
    check_input,
    check_resampled,
)
from lorkd.data.manifest import Case, axcodes
from lorkd.io import printable
from lorkd.regions import canonical_modality

log = logging.getLogger(__name__)

INTERPOLATIONS = ("bilinear", "nearest")
Affine = tuple[tuple[float, ...], ...]


def _pair(value: Any, name: str) -> tuple[float, float]:
    pair = tuple(float(v) for v in value)
    if len(pair) != 2 or not pair[0] < pair[1]:
        raise ValueError(f"preprocess.{name} must be (low, high) with low < high, got {value!r}")
    return pair  # type: ignore[return-value]


@dataclass
class PreprocessConfig:
    """SAT's recipe; every field is a key of the ``preprocess:`` block of ``configs/data/*.yaml``.

    ``orientation`` None keeps the image's own axis order; ``spacing`` None keeps its voxel size.
    A manifest line's ``orientation`` overrides ``orientation``. ``crop_margin_mm`` keeps that much of
    the scan around the foreground box, as far as the scan reaches (0: SAT's tight crop, whose faces
    touch the body). ``max_input_voxels``, ``max_resampled_voxels`` and ``max_downsampling`` are the size
    guards of :mod:`lorkd.data.limits`; they change no result, so :meth:`to_dict` (cache keys,
    checkpoints) leaves them out.
    """

    orientation: str | None = "RAS"
    spacing: tuple[float, float, float] | None = (1.0, 1.0, 3.0)
    crop_foreground: bool = True
    crop_margin_mm: float = 0.0
    ct_window: tuple[float, float] = (-500.0, 1000.0)
    percentiles: tuple[float, float] = (0.5, 99.5)
    interpolation: str = "bilinear"
    nan_policy: str = "error"
    max_input_voxels: int = MAX_INPUT_VOXELS
    max_resampled_voxels: int = MAX_RESAMPLED_VOXELS
    max_downsampling: float = MAX_DOWNSAMPLING

    def __post_init__(self) -> None:
        if self.orientation is not None:
            self.orientation = axcodes(str(self.orientation), "preprocess.orientation")
        if self.spacing is not None:
            spacing = tuple(float(s) for s in self.spacing)
            if len(spacing) != 3 or min(spacing) <= 0:
                raise ValueError(
                    f"preprocess.spacing must be 3 positive numbers or null, got {self.spacing!r}"
                )
            self.spacing = spacing  # type: ignore[assignment]
        self.ct_window = _pair(self.ct_window, "ct_window")
        self.percentiles = _pair(self.percentiles, "percentiles")
        if not (0.0 <= self.percentiles[0] and self.percentiles[1] <= 100.0):
            raise ValueError(f"preprocess.percentiles must lie in [0, 100], got {self.percentiles!r}")
        if self.interpolation not in INTERPOLATIONS:
            raise ValueError(
                f"preprocess.interpolation must be one of {INTERPOLATIONS}, got {self.interpolation!r}"
            )
        if self.nan_policy not in NAN_POLICIES:
            raise ValueError(f"preprocess.nan_policy must be one of {NAN_POLICIES}, got {self.nan_policy!r}")
        self.crop_foreground = bool(self.crop_foreground)
        self.crop_margin_mm = float(self.crop_margin_mm)
        if self.crop_margin_mm < 0:
            raise ValueError(f"preprocess.crop_margin_mm must be >= 0, got {self.crop_margin_mm!r}")
        self.max_input_voxels, self.max_resampled_voxels = int(self.max_input_voxels), int(self.max_resampled_voxels)
        self.max_downsampling = float(self.max_downsampling)
        if min(self.max_input_voxels, self.max_resampled_voxels) < 1 or self.max_downsampling <= 0:
            raise ValueError(
                f"preprocess.{LIMITS} must be > 0, got {self.max_input_voxels}, {self.max_resampled_voxels}, "
                f"{self.max_downsampling}"
            )

    @classmethod
    def coerce(cls, value: PreprocessConfig | Mapping[str, Any] | None) -> PreprocessConfig:
        """Accept a config object, a plain/OmegaConf mapping (from Hydra) or None (defaults)."""
        if value is None:
            return cls()
        if isinstance(value, cls):
            return value
        if isinstance(value, Mapping):
            return dataclass_from_mapping(cls, value, "preprocess")
        raise TypeError(f"preprocess must be a PreprocessConfig or a mapping, got {type(value).__name__}")

    def to_dict(self) -> dict[str, Any]:
        """The recipe (size guards left out)."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items() if k not in LIMITS}


def dataclass_from_mapping(cls: type, value: Mapping[str, Any], what: str) -> Any:
    """``cls(**value)`` with an error naming unknown keys (config blocks such as ``data.preprocess``)."""
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(value) - known)
    if unknown:
        raise ValueError(f"unknown {what} key(s) {unknown}; expected some of {sorted(known)}")
    return cls(**{k: value[k] for k in value})


def _affine_tuple(affine: np.ndarray) -> Affine:
    return tuple(tuple(float(x) for x in row) for row in np.asarray(affine, dtype=np.float64))


@dataclass(frozen=True)
class InversionInfo:
    """Geometry linking the original grid and the preprocessed (reoriented, resampled, cropped) grid."""

    original_shape: tuple[int, int, int]
    original_affine: Affine
    orientation: str | None
    spacing: tuple[float, float, float] | None
    resampled_shape: tuple[int, int, int]
    resampled_affine: Affine
    crop_start: tuple[int, int, int]
    crop_end: tuple[int, int, int]
    foreground_empty: bool = False
    background: float = 0.0  # normalised intensity of the clip's lower bound (air, empty field of view)

    @property
    def shape(self) -> tuple[int, int, int]:
        """Spatial shape of the preprocessed array."""
        return tuple(e - s for s, e in zip(self.crop_start, self.crop_end))  # type: ignore[return-value]

    @property
    def affine(self) -> np.ndarray:
        """Voxel-to-world affine of the preprocessed (cropped) array."""
        shift = np.eye(4)
        shift[:3, 3] = self.crop_start
        return np.asarray(self.resampled_affine) @ shift

    @property
    def crop_slices(self) -> tuple[slice, slice, slice]:
        return tuple(slice(s, e) for s, e in zip(self.crop_start, self.crop_end))  # type: ignore[return-value]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> InversionInfo:
        def ints(key: str) -> tuple[int, ...]:
            return tuple(int(v) for v in data[key])

        spacing = data.get("spacing")
        return cls(
            original_shape=ints("original_shape"),  # type: ignore[arg-type]
            original_affine=_affine_tuple(np.asarray(data["original_affine"])),
            orientation=data.get("orientation"),
            spacing=tuple(float(s) for s in spacing) if spacing is not None else None,  # type: ignore[arg-type]
            resampled_shape=ints("resampled_shape"),  # type: ignore[arg-type]
            resampled_affine=_affine_tuple(np.asarray(data["resampled_affine"])),
            crop_start=ints("crop_start"),  # type: ignore[arg-type]
            crop_end=ints("crop_end"),  # type: ignore[arg-type]
            foreground_empty=bool(data.get("foreground_empty", False)),
            background=float(data.get("background", 0.0)),
        )


@dataclass
class PreprocessedCase:
    """A case in the preprocessed grid: image (1,X,Y,Z) float32, masks (N,X,Y,Z) uint8 by label."""

    image: np.ndarray
    masks: np.ndarray
    labels: list[str]
    info: InversionInfo
    modality: str
    case_id: str = ""
    dataset: str = ""


def foreground_box(
    volume: np.ndarray, margin: Sequence[int] | None = None, above: float = 0.0
) -> tuple[tuple[int, ...], tuple[int, ...]] | None:
    """Bounding box (start, exclusive end) of the voxels > ``above`` grown by ``margin`` voxels per axis
    (clipped to the volume), or None when there are none."""
    fg = volume > above
    margin = [0] * volume.ndim if margin is None else [int(m) for m in margin]
    start, end = [], []
    for axis in range(volume.ndim):
        hits = np.flatnonzero(fg.any(axis=tuple(a for a in range(volume.ndim) if a != axis)))
        if hits.size == 0:
            return None
        start.append(max(int(hits[0]) - margin[axis], 0))
        end.append(min(int(hits[-1]) + 1 + margin[axis], volume.shape[axis]))
    return tuple(start), tuple(end)


def margin_voxels(margin_mm: float, affine: np.ndarray) -> tuple[int, int, int]:
    """``margin_mm`` in voxels of each axis of a grid (rounded up)."""
    sizes = np.linalg.norm(np.asarray(affine, dtype=np.float64)[:3, :3], axis=0)
    return tuple(int(np.ceil(margin_mm / s - 1e-6)) for s in sizes)  # type: ignore[return-value]


def normalize_intensity(volume: np.ndarray, modality: str, cfg: PreprocessConfig) -> tuple[np.ndarray, float]:
    """CT: clip to ``ct_window``; others: clip to ``percentiles``; then z-score (a constant gives zeros).

    Returns the normalised volume and the normalised value of the clip's lower bound: the scan's
    background (air, a zero-filled field of view), bit for bit as its clipped voxels. 0 there is the
    scan's mean intensity, i.e. tissue-like.
    """
    if canonical_modality(modality) == "ct":
        low, high = cfg.ct_window
    else:
        low, high = (float(p) for p in np.percentile(volume, cfg.percentiles))
    clipped = np.clip(volume, low, high)
    mean = float(clipped.mean(dtype=np.float64))
    std = float(clipped.std(dtype=np.float64))
    if std <= 1e-5 * max(1.0, abs(mean)):  # constant up to float rounding of the resampling
        return np.zeros_like(clipped, dtype=np.float32), 0.0
    background = ((np.full(1, low, dtype=clipped.dtype) - mean) / std).astype(np.float32)
    return ((clipped - mean) / std).astype(np.float32), float(background[0])


def _as_volume(
    image: str | Path | nib.spatialimages.SpatialImage | np.ndarray,
    affine: Any,
    nan_policy: str,
    name: str | None = None,
) -> Volume:
    if isinstance(image, (str, Path)):
        return read_volume(image, nan_policy)
    if isinstance(image, np.ndarray):
        if affine is None:
            raise ValueError("preprocess_image: a numpy image needs its affine")
        name = name or "<array>"
        data = squeeze_to_3d(image, name)
        affine = np.asarray(affine, dtype=np.float64)
    elif isinstance(image, nib.spatialimages.SpatialImage):
        name = name or image.get_filename() or "<nibabel image>"
        data = squeeze_to_3d(np.asarray(image.dataobj), name)
        affine = np.asarray(image.affine if affine is None else affine, dtype=np.float64)
    else:
        raise TypeError(f"preprocess_image: unsupported image type {type(image).__name__}")
    if affine.shape != (4, 4):
        raise CaseError(f"{name}: affine must be 4x4, got shape {affine.shape}")
    data = reordered(data, "C", np.float32)
    return Volume(check_finite(data, name, nan_policy), affine, name)


def _foreground_reach(
    vol: Volume, dst_affine: np.ndarray, dst_shape: Sequence[int], margin: Sequence[int]
) -> tuple[slice, slice, slice] | None:
    """The box of the resampled grid that reads the volume's voxels > 0, grown by ``margin``: the
    foreground crop lies inside (None: no such voxel, or a rotated grid)."""
    found = foreground_box(vol.data)
    if found is None:
        return None
    return reach(vol.data.shape, vol.affine, dst_affine, dst_shape, [slice(a, b) for a, b in zip(*found)], margin)


def _codes(orientation: str | None, cfg: PreprocessConfig) -> str | None:
    """The axis codes of the target grid: a case's ``orientation`` (e.g. a manifest line's), else the config's."""
    return axcodes(orientation, "orientation") if orientation else cfg.orientation


def sized_grid(
    name: str, shape: tuple[int, ...], affine: np.ndarray, cfg: PreprocessConfig, codes: str | None
) -> tuple[np.ndarray, tuple[int, int, int]]:
    """The target grid (:func:`~lorkd.data.grid.target_grid`) of an image, after the size guards of
    :mod:`lorkd.data.limits`; :class:`~lorkd.data.limits.SizeError` naming ``name`` beyond them."""
    check_input(name, shape, cfg.max_input_voxels)
    dst_affine, dst_shape = target_grid(shape, affine, codes, cfg.spacing)
    check_resampled(name, shape, affine, dst_shape, dst_affine, cfg.max_resampled_voxels, cfg.max_downsampling)
    return dst_affine, dst_shape


def check_image_size(path: str | Path, cfg: PreprocessConfig, orientation: str | None = None) -> None:
    """The size guards from an image file's header, before any voxel is read (a DICOM folder: checked
    once read, by :func:`preprocess_image`)."""
    if Path(path).is_dir():
        return
    shape, affine = header_grid(path)
    check_input(str(path), shape, cfg.max_input_voxels)
    if len(shape) == 3:  # other shapes fail when read, naming the file
        sized_grid(str(path), shape, affine, cfg, _codes(orientation, cfg))


def preprocess_image(
    image: str | Path | nib.spatialimages.SpatialImage | np.ndarray,
    modality: str,
    cfg: PreprocessConfig | Mapping[str, Any] | None = None,
    affine: np.ndarray | None = None,
    orientation: str | None = None,
    name: str | None = None,
) -> tuple[np.ndarray, InversionInfo]:
    """Reorient, resample, crop to the voxels > 0 (raw intensity) and normalise one image.

    Returns the (1,X,Y,Z) float32 array and the :class:`InversionInfo` to map results back.
    ``name`` (e.g. the file an array was read from) names the image in warnings and errors.
    """
    cfg = PreprocessConfig.coerce(cfg)
    if isinstance(image, (str, Path)):
        check_image_size(image, cfg, orientation)
    vol = _as_volume(image, affine, cfg.nan_policy, name)
    codes = _codes(orientation, cfg)
    dst_affine, dst_shape = sized_grid(vol.name, vol.data.shape, vol.affine, cfg, codes)
    margin = margin_voxels(cfg.crop_margin_mm, dst_affine)
    # a resampled voxel is > 0 only where it reads a source voxel > 0: the crop lies in their reach
    region = _foreground_reach(vol, dst_affine, dst_shape, margin) if cfg.crop_foreground else None
    resampled = resample(vol.data[None], vol.affine, dst_affine, dst_shape, cfg.interpolation, within=region)[0]

    start, end, empty = (0, 0, 0), dst_shape, False
    if cfg.crop_foreground:
        box = foreground_box(resampled, margin)  # clipped to the region: as to the grid (margin included)
        if box is None and region is not None:  # source voxels > 0 that no resampled voxel reads
            resampled = resample(vol.data[None], vol.affine, dst_affine, dst_shape, cfg.interpolation)[0]
        if box is None:
            empty = True
            log.warning(
                "%s: no voxel > 0 (all-background %s image); keeping the full volume instead of an empty crop",
                printable(vol.name),
                canonical_modality(modality),
            )
        else:
            offset = (0, 0, 0) if region is None else tuple(r.start for r in region)
            start, end = (tuple(o + b for o, b in zip(offset, bound)) for bound in box)
            resampled = resampled[tuple(slice(s, e) for s, e in zip(*box))]
    normalised, background = normalize_intensity(resampled, modality, cfg)
    info = InversionInfo(
        original_shape=tuple(int(s) for s in vol.data.shape),  # type: ignore[arg-type]
        original_affine=_affine_tuple(vol.affine),
        orientation=codes,
        spacing=cfg.spacing,
        resampled_shape=dst_shape,
        resampled_affine=_affine_tuple(dst_affine),
        crop_start=tuple(start),  # type: ignore[arg-type]
        crop_end=tuple(end),  # type: ignore[arg-type]
        foreground_empty=empty,
        background=background,
    )
    return normalised[None], info


def to_preprocessed_grid(array: np.ndarray, info: InversionInfo, mode: str = "nearest") -> np.ndarray:
    """Map a (C, *original_shape) array (e.g. masks) onto the preprocessed grid, (C, *info.shape)."""
    array = np.asarray(array)
    if array.ndim != 4 or tuple(array.shape[1:]) != tuple(info.original_shape):
        raise ValueError(f"expected (C, {', '.join(map(str, info.original_shape))}), got {array.shape}")
    out = resample(
        array, np.asarray(info.original_affine), np.asarray(info.resampled_affine), info.resampled_shape, mode
    )
    return out[(slice(None), *info.crop_slices)]


def invert_to_original(array: np.ndarray, info: InversionInfo, mode: str = "bilinear") -> np.ndarray:
    """Map a (C, *info.shape) array back onto the original image grid, (C, *original_shape).

    Undoes the crop (outside it: 0), the spacing and the orientation in one resampling. ``bilinear``
    (for probabilities) returns float32; ``nearest`` (for masks) keeps the input dtype.
    """
    array = np.asarray(array)
    if mode not in INTERPOLATIONS:
        raise ValueError(f"mode must be one of {INTERPOLATIONS}, got {mode!r}")
    out = resample(
        _uncropped(array, info), np.asarray(info.resampled_affine), np.asarray(info.original_affine),
        info.original_shape, mode, support=info.crop_slices,
    )  # fmt: skip
    return out.astype(array.dtype) if mode == "nearest" else out


def _before_crop(array: np.ndarray, info: InversionInfo) -> bool:
    """Whether a (C, X, Y, Z) array lies on the resampled grid before the crop, (C, *info.resampled_shape)."""
    return array.ndim == 4 and tuple(array.shape[1:]) == tuple(info.resampled_shape)


def _uncropped(array: np.ndarray, info: InversionInfo) -> np.ndarray:
    """A (C, *info.shape) array put back into the resampled grid before the crop (0 outside it), float32;
    an array already there ((C, *info.resampled_shape), 0 outside the crop) as it is."""
    if _before_crop(array, info):
        return array
    if array.ndim != 4 or tuple(array.shape[1:]) != tuple(info.shape):
        raise ValueError(
            f"expected (C, {', '.join(map(str, info.shape))}) in the preprocessed grid, got {array.shape}"
        )
    full = np.zeros((array.shape[0], *info.resampled_shape), dtype=np.float32)
    full[(slice(None), *info.crop_slices)] = array
    return full


ABOVE_MARGIN = 1e-4  # voxels this close below the threshold count as above it (interpolation rounding)
# relative cost of sampling one output voxel: a part for its coordinates and weights, one more per channel
# (grid_sample on a CT: 0.41, 0.56, 0.95, 1.71 s for 1, 2, 4, 8 channels)
_VOXEL_COST, _CHANNEL_COST = 1.25, 1.0

Box = tuple[slice, slice, slice]


@dataclass(frozen=True)
class AboveGroup:
    """Labels mapped back together: their indices and the box of the resampled grid outside which none
    of them comes near the threshold (None: no voxel of these labels does)."""

    indices: tuple[int, ...]
    support: Box | None


def group_above(
    probabilities: np.ndarray, info: InversionInfo, threshold: float, max_labels: int
) -> list[AboveGroup]:
    """Group (L, X, Y, Z) probability maps of the preprocessed grid for :func:`invert_group`: a label joins
    the group before it (at most ``max_labels``) when sampling their common box costs less than sampling
    the two boxes apart (the channels of one sampling share each voxel's coordinates and weights)."""
    groups: list[AboveGroup] = []
    for index, probability in enumerate(np.asarray(probabilities)):
        support = _above_support(probability, info, threshold)
        last = groups[-1] if groups else None
        if (
            support is not None
            and last is not None
            and last.support is not None
            and len(last.indices) < max_labels
        ):
            union = tuple(
                slice(min(a.start, b.start), max(a.stop, b.stop)) for a, b in zip(last.support, support)
            )
            apart = _sampling_cost(last.support, len(last.indices)) + _sampling_cost(support, 1)
            if _sampling_cost(union, len(last.indices) + 1) <= apart:  # type: ignore[arg-type]
                groups[-1] = AboveGroup((*last.indices, index), union)  # type: ignore[arg-type]
                continue
        groups.append(AboveGroup((index,), support))
    return groups


def _above_support(probability: np.ndarray, info: InversionInfo, threshold: float) -> Box | None:
    """The box of the resampled grid outside which one (X, Y, Z) map stays below ``threshold - ABOVE_MARGIN``."""
    crop = info.crop_slices
    if threshold - ABOVE_MARGIN <= 0:  # the zeros outside the crop count too
        return crop
    found = foreground_box(probability, above=threshold - ABOVE_MARGIN)
    if found is None:
        return None
    return tuple(slice(c.start + lo, c.start + hi) for c, lo, hi in zip(crop, *found))  # type: ignore[return-value]


def _sampling_cost(box: Box, channels: int) -> float:
    return float(np.prod([s.stop - s.start for s in box])) * (_VOXEL_COST + channels * _CHANNEL_COST)


def invert_group(
    probabilities: np.ndarray, info: InversionInfo, support: Box | None
) -> Iterator[tuple[Box, np.ndarray]]:
    """(L, X, Y, Z) probability maps of the preprocessed grid back onto the original grid (bilinear), only
    where they can exceed the threshold of :func:`group_above`'s ``support``, slab by slab: (a slab's box
    of the original grid, its (L, X', Y', Z') values, equal to :func:`invert_to_original`'s there). Every
    voxel outside the slabs interpolates values at most ``threshold - ABOVE_MARGIN``; no slab for a None
    ``support``. Maps on the grid before the crop (0 outside it) are sampled as they are."""
    if support is None:
        return iter(())
    return resample_slabs(
        _uncropped(np.asarray(probabilities), info), np.asarray(info.resampled_affine),
        np.asarray(info.original_affine), info.original_shape, "bilinear", support=support,
    )  # fmt: skip


def invert_above(
    probabilities: np.ndarray, info: InversionInfo, threshold: float, max_labels: int
) -> Iterator[tuple[tuple[int, ...], Box, np.ndarray]]:
    """(L, X, Y, Z) probability maps of the preprocessed grid back onto the original grid only where they
    can pass ``threshold``, labels grouped by :func:`group_above` (at most ``max_labels`` sampled together):
    (the group's label indices, a slab's box, their (n, X', Y', Z') values there) per slab of each group.
    A label that never comes near the threshold has no slab. Maps on the grid before the crop
    ((L, *info.resampled_shape), 0 outside the crop) are mapped back without a copy."""
    probabilities = np.asarray(probabilities)
    cropped = probabilities[(slice(None), *info.crop_slices)] if _before_crop(probabilities, info) else probabilities
    for above in group_above(cropped, info, threshold, max_labels):
        labels = slice(above.indices[0], above.indices[-1] + 1)  # a group's labels follow each other
        for box, values in invert_group(probabilities[labels], info, above.support):
            yield above.indices, box, values


def read_label_map(
    path: Path, image_path: Path, image: Grid, n_labels: int, nan_policy: str = "error"
) -> np.ndarray:
    """Integer ids (int32) of a label map on its image's grid (:func:`lorkd.data.geometry.read_mask`);
    ids > ``n_labels`` are ignored."""
    ids = read_mask(path, image_path, image, nan_policy)
    ids = ids.astype(np.int32) if np.issubdtype(ids.dtype, np.integer) else np.rint(ids).astype(np.int32)
    if ids.min(initial=0) < 0:
        raise CaseError(f"{path}: label map has negative ids")
    if int(ids.max(initial=0)) > n_labels:
        log.warning(
            "%s: label map has ids up to %d but only %d labels are listed; higher ids are ignored",
            printable(path),
            int(ids.max()),
            n_labels,
        )
    return ids


def load_masks(case: Case, image: Grid, nan_policy: str = "error") -> np.ndarray:
    """Ground truth of a case on its image's grid as (N_labels, *image.shape) uint8, aligned to
    ``case.labels``; each mask file is checked against that grid and reoriented or resampled onto it
    (:mod:`lorkd.data.geometry`). A label map's id j+1 is ``labels[j]``; a label absent from the mask
    gives an all-zero channel.
    """
    masks = np.zeros((len(case.labels), *image.shape), dtype=np.uint8)
    if case.mask is not None:
        ids = read_label_map(case.mask, case.image, image, len(case.labels), nan_policy)
        for j in range(len(case.labels)):
            masks[j] = ids == j + 1
    for label, path in (case.masks or {}).items():
        masks[case.labels.index(label)] = read_mask(path, case.image, image, nan_policy) > 0.5
    return masks


def _preprocessed_masks(case: Case, info: InversionInfo, nan_policy: str) -> np.ndarray:
    """(N, *info.shape) uint8 masks in the preprocessed grid; one resampling per source file (nearest)."""
    image = Grid(info.original_shape, np.asarray(info.original_affine))
    masks = np.zeros((len(case.labels), *info.shape), dtype=np.uint8)
    if case.mask is not None:
        ids = read_label_map(case.mask, case.image, image, len(case.labels), nan_policy)
        grid_ids = np.rint(to_preprocessed_grid(ids[None].astype(np.float32), info, "nearest")[0])
        for j in range(len(case.labels)):
            masks[j] = grid_ids == j + 1
    for label, path in (case.masks or {}).items():
        binary = (read_mask(path, case.image, image, nan_policy) > 0.5).astype(np.float32)
        masks[case.labels.index(label)] = to_preprocessed_grid(binary[None], info, "nearest")[0] > 0.5
    return masks


def preprocess_case(case: Case, cfg: PreprocessConfig | Mapping[str, Any] | None = None) -> PreprocessedCase:
    """Preprocess a case's image and masks (nearest) into the same grid.

    Each mask must lie on its image (:mod:`lorkd.data.geometry`: the same grid, another orientation of
    it, or another voxel size over the same space); anything else is a :class:`CaseError` naming both files.
    """
    cfg = PreprocessConfig.coerce(cfg)
    image, info = preprocess_image(case.image, case.modality, cfg, orientation=case.orientation)
    return PreprocessedCase(
        image=image,
        masks=_preprocessed_masks(case, info, cfg.nan_policy),
        labels=list(case.labels),
        info=info,
        modality=case.modality,
        case_id=case.id,
        dataset=case.dataset,
    )
