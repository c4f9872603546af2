"""``preview.png``: three orthogonal slices of the image with the predicted labels overlaid.

Drawn with matplotlib's Agg canvas directly (no pyplot: no global figure state, safe in workers).
Slices go through the centre of the predicted foreground (the volume's centre when it is empty),
in the closest RAS orientation, patient's right on the left (radiological convention).
"""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np

from lorkd.inference.predictor import Prediction

_MAX_LEGEND = 20


def _centre(segmentation: np.ndarray) -> tuple[int, int, int]:
    """Mean index of the labelled voxels per axis (the volume's centre when none), from per-axis counts
    (no list of coordinates: a CT's foreground has millions of voxels)."""
    foreground = segmentation > 0
    total = int(np.count_nonzero(foreground))
    if total == 0:
        return tuple(s // 2 for s in segmentation.shape)  # type: ignore[return-value]
    centre = []
    for axis in range(3):
        counts = foreground.sum(axis=tuple(a for a in range(3) if a != axis), dtype=np.int64)
        centre.append(int(round(float(counts @ np.arange(len(counts))) / total)))
    return tuple(centre)  # type: ignore[return-value]


def _display_range(data: np.ndarray, samples: int = 2**20) -> tuple[float, float]:
    """1st and 99th intensity percentiles over about ``samples`` evenly strided voxels."""
    if data.size == 0:
        return 0.0, 1.0
    sample = data.reshape(-1)[:: max(1, data.size // samples)].astype(np.float32)
    low, high = np.percentile(sample, (1, 99))
    return float(low), float(high)


def save_preview(prediction: Prediction, path: str | Path, dpi: int = 100) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.colors import ListedColormap
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch

    image = nib.as_closest_canonical(prediction.image)
    labels = nib.as_closest_canonical(prediction.segmentation)
    data = np.asanyarray(image.dataobj)  # the stored dtype: planes become float32 below
    seg = np.asanyarray(labels.dataobj)
    zx, zy, zz = (float(z) for z in image.header.get_zooms()[:3])
    low, high = _display_range(data)
    n = len(prediction.label_ids)
    colours = [tuple(c) for c in _palette(n)]
    cmap = ListedColormap(colours) if colours else None
    x, y, z = _centre(seg)
    planes = [
        ("axial", (slice(None), slice(None), z), zy / zx),
        ("coronal", (slice(None), y, slice(None)), zz / zx),
        ("sagittal", (x, slice(None), slice(None)), zz / zy),
    ]
    views = [(title, data[at].astype(np.float32), seg[at].astype(np.int64), aspect) for title, at, aspect in planes]
    figure = Figure(figsize=(12, 4.6), dpi=dpi)
    FigureCanvasAgg(figure)
    axes = figure.subplots(1, 3)
    for ax, (title, plane, overlay, aspect) in zip(axes, views):
        ax.imshow(plane.T, cmap="gray", origin="lower", vmin=low, vmax=max(high, low + 1e-6), aspect=aspect)
        if cmap is not None and overlay.any():
            masked = np.ma.masked_equal(overlay.T, 0)
            ax.imshow(masked - 1, cmap=cmap, vmin=-0.5, vmax=n - 0.5, alpha=0.45, origin="lower",
                      aspect=aspect, interpolation="nearest")  # fmt: skip
        if title != "sagittal":
            ax.invert_xaxis()
        ax.set_title(title)
        ax.axis("off")
    handles = [Patch(color=colours[i - 1], label=lab) for i, lab in sorted(prediction.label_ids.items())]
    if handles:
        figure.legend(
            handles=handles[:_MAX_LEGEND], loc="lower center", ncol=min(len(handles), 6), frameon=False
        )
    figure.tight_layout(rect=(0, 0.1 if handles else 0, 1, 1))
    figure.savefig(str(path), format="png")


def _palette(n: int) -> np.ndarray:
    """n distinct RGBA colours (tab20, then evenly spaced hues)."""
    from matplotlib import colormaps

    if n <= 20:
        return colormaps["tab20"](np.arange(n))
    return colormaps["hsv"](np.linspace(0, 1, n, endpoint=False))
