"""``preview.png``: three orthogonal slices of the image with the predicted labels overlaid.

Drawn with Pillow: matplotlib's import and figure layout took about 1 s of every prediction. Slices go
through the centre of the predicted foreground (the volume's centre when it is empty), in the closest RAS
orientation, patient's right on the left in the axial and coronal views (radiological convention), each
at its voxels' physical aspect; a legend below names up to ``_MAX_LEGEND`` labels.
"""

from __future__ import annotations

import colorsys
from pathlib import Path

import nibabel as nib
import numpy as np

from lorkd.inference.predictor import Prediction

_MAX_LEGEND = 20
_ALPHA = 0.45  # opacity of the label colours
_PANEL = 380  # pixels: the longer side of each view
_MARGIN, _TITLE, _ROW, _COLUMNS = 12, 26, 22, 6  # pixels; legend entries per row
# the 20 colours of the "tab20" palette (Tableau), then evenly spaced hues
_TAB20 = (
    (31, 119, 180), (174, 199, 232), (255, 127, 14), (255, 187, 120), (44, 160, 44),
    (152, 223, 138), (214, 39, 40), (255, 152, 150), (148, 103, 189), (197, 176, 213),
    (140, 86, 75), (196, 156, 148), (227, 119, 194), (247, 182, 210), (127, 127, 127),
    (199, 199, 199), (188, 189, 34), (219, 219, 141), (23, 190, 207), (158, 218, 229),
)  # fmt: skip


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


def _palette(n: int) -> np.ndarray:
    """n distinct RGB colours (uint8): tab20, then evenly spaced hues."""
    if n <= len(_TAB20):
        return np.array(_TAB20[:n], dtype=np.uint8).reshape(n, 3)
    hues = [colorsys.hsv_to_rgb(h, 1.0, 1.0) for h in np.linspace(0, 1, n, endpoint=False)]
    return np.round(np.array(hues) * 255).astype(np.uint8)


def views(
    data: np.ndarray, segmentation: np.ndarray, zooms: tuple[float, float, float]
) -> list[tuple[str, np.ndarray, np.ndarray, tuple[float, float]]]:
    """(title, image plane, label plane, (width, height) in mm) of the axial, coronal and sagittal views
    of RAS-oriented arrays, as displayed: rows top to bottom, columns left to right (superior and anterior
    up; the patient's right on the left, except in the sagittal view, which has anterior on the right)."""
    x, y, z = _centre(segmentation)
    zx, zy, zz = zooms
    planes = [
        ("axial", (slice(None), slice(None), z), (zx, zy), True),
        ("coronal", (slice(None), y, slice(None)), (zx, zz), True),
        ("sagittal", (x, slice(None), slice(None)), (zy, zz), False),
    ]
    out = []
    for title, at, (width, height), mirror in planes:
        flip = (slice(None, None, -1), slice(None, None, -1) if mirror else slice(None))
        image, labels = data[at].T[flip], segmentation[at].T[flip]  # rows: the second axis, top = high
        out.append(
            (title, image.astype(np.float32), labels, (image.shape[1] * width, image.shape[0] * height))
        )
    return out


def _font(size: int):
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)  # scalable (Pillow >= 10.1 with FreeType)
    except (TypeError, OSError, ImportError):
        return ImageFont.load_default()


def _text(draw, at: tuple[float, float], text: str, font, centred: bool) -> None:
    """``text`` centred on ``at``, or starting at it (vertically centred): any Pillow font (no anchors)."""
    left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
    x = at[0] - (right - left) / 2 if centred else at[0]
    draw.text((x - left, at[1] - (bottom - top) / 2 - top), text, fill="black", font=font)


def _fitted(draw, text: str, font, width: float) -> str:
    """``text`` shortened (ending in "...") to at most ``width`` pixels."""
    if draw.textlength(text, font=font) <= width:
        return text
    while len(text) > 1 and draw.textlength(text + "...", font=font) > width:
        text = text[:-1]
    return text + "..."


def save_preview(prediction: Prediction, path: str | Path) -> None:
    from PIL import Image, ImageDraw

    image = nib.as_closest_canonical(prediction.image)
    labels = nib.as_closest_canonical(prediction.segmentation)
    data = np.asanyarray(image.dataobj)  # the stored dtype: planes become float32 in ``views``
    seg = np.asanyarray(labels.dataobj)
    low, high = _display_range(data)
    high = max(high, low + 1e-6)
    names = [lab for _, lab in sorted(prediction.label_ids.items())]
    colours = _palette(len(names)).astype(np.float32)
    legend_rows = -(-min(len(names), _MAX_LEGEND) // _COLUMNS)
    width = 3 * _PANEL + 4 * _MARGIN
    canvas = Image.new("RGB", (width, _TITLE + _PANEL + _MARGIN + legend_rows * _ROW + _MARGIN), "white")
    draw = ImageDraw.Draw(canvas)
    font = _font(16)
    zooms = tuple(float(z) for z in image.header.get_zooms()[:3])
    for i, (title, plane, overlay, (width_mm, height_mm)) in enumerate(views(data, seg, zooms)):  # type: ignore[arg-type]
        grey = np.clip((plane - low) / (high - low), 0.0, 1.0)[..., None] * np.full(3, 255.0, np.float32)
        labelled = (overlay > 0) & (overlay <= len(names))
        ids = overlay[labelled].astype(np.int64) - 1
        grey[labelled] = (1 - _ALPHA) * grey[labelled] + _ALPHA * colours[ids]
        scale = _PANEL / max(width_mm, height_mm, 1e-6)
        size = (max(1, round(width_mm * scale)), max(1, round(height_mm * scale)))
        view = Image.fromarray(np.round(grey).astype(np.uint8)).resize(size, Image.Resampling.BILINEAR)
        left = _MARGIN + i * (_PANEL + _MARGIN)
        canvas.paste(view, (left + (_PANEL - size[0]) // 2, _TITLE + (_PANEL - size[1]) // 2))
        _text(draw, (left + _PANEL / 2, _TITLE / 2), title, font, centred=True)
    column = (width - 2 * _MARGIN) // _COLUMNS
    for i, name in enumerate(names[:_MAX_LEGEND]):
        left, top = _MARGIN + (i % _COLUMNS) * column, _TITLE + _PANEL + _MARGIN + (i // _COLUMNS) * _ROW
        draw.rectangle((left, top + 3, left + 14, top + 17), fill=tuple(int(c) for c in colours[i]))
        _text(draw, (left + 20, top + 10), _fitted(draw, name, font, column - 24), font, centred=False)
    canvas.save(str(path), format="PNG")
