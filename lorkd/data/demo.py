"""Deterministic multi-region demo data set: synthetic phantoms plus the real scans PyPI ships.

* Synthetic phantoms, defined in world (RAS, mm) coordinates and sampled on each case's own grid:
  abdomen CT (liver, spleen, left kidney, right kidney, aorta), thorax CT (left lung, right lung,
  heart, pulmonary artery), brain T1 MRI (lateral ventricle, grey matter, white matter). Organ
  centres, sizes, intensities and a smooth deformation vary per case; grids cycle through
  isotropic and anisotropic spacings in RAS and LPS orientation.
* Real scans when their packages are installed: LiTS case 117 CT crop (liver, liver tumor) from
  ``liver-ct-segmentation-package`` and the MNI152 2009a T1 template with grey/white matter from
  ``nilearn``; test split only.

Same seed, same bytes: every random draw comes from ``numpy.random.default_rng([seed, ...])`` and
nibabel writes gzip with a fixed timestamp.
"""

from __future__ import annotations

import importlib.util
import json
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
from scipy.ndimage import gaussian_filter

from lorkd.data.image_reader import read_voxels

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")
DEFAULT_COUNTS = (8, 2, 4)
# (spacing mm, orientation) cycled over the cases of a phantom: isotropic/anisotropic, RAS/LPS
GEOMETRIES: tuple[tuple[tuple[float, float, float], str], ...] = (
    ((1.0, 1.0, 3.0), "RAS"),
    ((0.8, 0.8, 2.5), "LPS"),
    ((1.2, 1.2, 2.0), "RAS"),
    ((0.8, 0.8, 2.5), "RAS"),
    ((1.0, 1.0, 3.0), "LPS"),
)

Coords = tuple[np.ndarray, np.ndarray, np.ndarray]
Phantom = Callable[[np.random.Generator, Coords], tuple[np.ndarray, np.ndarray]]


@dataclass(frozen=True)
class PhantomSpec:
    key: str
    dataset: str
    modality: str
    labels: tuple[str, ...]
    extent_mm: tuple[float, float, float]
    make: Phantom


# ----------------------------------------------------------------------------- geometry helpers


def case_grid(
    extent_mm: Sequence[float], spacing: Sequence[float], orientation: str
) -> tuple[np.ndarray, tuple]:
    """Affine (RAS or LPS, centred on the world origin) and shape covering ``extent_mm``."""
    shape = tuple(int(np.ceil(e / s)) for e, s in zip(extent_mm, spacing))
    signs = {"RAS": (1, 1, 1), "LPS": (-1, -1, 1)}[orientation]
    affine = np.eye(4)
    for a in range(3):
        affine[a, a] = signs[a] * spacing[a]
        affine[a, 3] = -signs[a] * spacing[a] * (shape[a] - 1) / 2.0
    return affine, shape


def world_coords(affine: np.ndarray, shape: Sequence[int]) -> Coords:
    """Voxel-centre world coordinates of an axis-aligned grid, as broadcastable float32 arrays."""
    axes = []
    for a in range(3):
        v = (affine[a, a] * np.arange(shape[a]) + affine[a, 3]).astype(np.float32)
        axes.append(v.reshape([-1 if i == a else 1 for i in range(3)]))
    return axes[0], axes[1], axes[2]


def deform(rng: np.random.Generator, c: Coords, amplitude: float, wavelength: float = 60.0) -> Coords:
    """Smooth random displacement (a sum of 2 sinusoids per axis) applied to the coordinates."""
    out = []
    for axis in range(3):
        d = np.zeros(np.broadcast_shapes(*(a.shape for a in c)), dtype=np.float32)
        for _ in range(2):
            k = rng.normal(size=3)
            k *= 2 * np.pi / wavelength / np.linalg.norm(k)
            d += np.float32(amplitude / 2) * np.sin(
                k[0] * c[0] + k[1] * c[1] + k[2] * c[2] + rng.uniform(0, 2 * np.pi)
            )
        out.append(c[axis] + d)
    return out[0], out[1], out[2]


def ellipsoid(c: Coords, center: Sequence[float], radii: Sequence[float]) -> np.ndarray:
    return sum(((c[a] - center[a]) / radii[a]) ** 2 for a in range(3)) <= 1.0


def cylinder_z(c: Coords, center_xy: Sequence[float], radius: float) -> np.ndarray:
    """Infinite cylinder along z (broadcast over the full grid)."""
    inside = (c[0] - center_xy[0]) ** 2 + (c[1] - center_xy[1]) ** 2 <= radius**2
    return np.broadcast_to(inside, np.broadcast_shapes(*(a.shape for a in c)))


def tube(c: Coords, p0: Sequence[float], p1: Sequence[float], radius: float) -> np.ndarray:
    """Points within ``radius`` of the segment p0-p1."""
    p0a, d = np.asarray(p0, np.float32), np.asarray(p1, np.float32) - np.asarray(p0, np.float32)
    t = sum((c[a] - p0a[a]) * d[a] for a in range(3)) / float(d @ d)
    t = np.clip(t, 0.0, 1.0)
    return sum((c[a] - (p0a[a] + t * d[a])) ** 2 for a in range(3)) <= radius**2


def _jitter(rng: np.random.Generator, point: Sequence[float], mm: float) -> list[float]:
    return [float(p + rng.uniform(-mm, mm)) for p in point]


def _scale(
    rng: np.random.Generator, radii: Sequence[float], low: float = 0.85, high: float = 1.15
) -> list[float]:
    s = rng.uniform(low, high)
    return [float(r * s) for r in radii]


def _paint(image: np.ndarray, labels: np.ndarray, region: np.ndarray, value: float, label_id: int) -> None:
    image[region] = value
    labels[region] = label_id


def _body(
    rng: np.random.Generator, c: Coords, image: np.ndarray, labels: np.ndarray, interior: float
) -> None:
    """Elliptic trunk: 5 mm of fat, a 7 mm muscle wall (40 HU), then ``interior`` HU inside."""
    rx, ry = 48 * rng.uniform(0.95, 1.05), 41 * rng.uniform(0.97, 1.03)
    full = np.ones_like(c[2], dtype=bool)
    for inset, hu in ((0.0, -100.0), (5.0, 40.0), (12.0, interior)):
        inside = ((c[0] / (rx - inset)) ** 2 + (c[1] / (ry - inset)) ** 2 <= 1.0) & full
        _paint(image, labels, inside, hu, 0)


def _spine(c: Coords, image: np.ndarray, labels: np.ndarray, y: float) -> None:
    _paint(image, labels, cylinder_z(c, (0.0, y), 9.0), 650.0, 0)


# ----------------------------------------------------------------------------- phantoms


def _kidney(
    rng: np.random.Generator, w: Coords, image: np.ndarray, labels: np.ndarray, side: float, hu: float, label_id: int
) -> None:
    """Bean-shaped kidney on the ``side`` (-1 or +1) of x: its hilum (renal sinus fat) faces the spine,
    so one kidney alone shows which side it is on, as in real anatomy."""
    center = _jitter(rng, (25 * side, -24, -16), 3)
    radii = _scale(rng, (8, 10, 17))
    _paint(image, labels, ellipsoid(w, center, radii), hu, label_id)
    sinus = (center[0] - side * 0.75 * radii[0], center[1], center[2])
    _paint(image, labels, ellipsoid(w, sinus, (0.55 * radii[0], 0.45 * radii[1], 0.4 * radii[2])), -70.0, 0)


def _lung(rng: np.random.Generator, w: Coords, side: float) -> np.ndarray:
    """Lung on the ``side`` (-1 or +1) of x: convex towards the ribs, flat against the mediastinum (the
    side is visible in the lung's own shape), 17 x 25 x 55 mm semi-axes before scaling."""
    center = _jitter(rng, (23 * side, 0, 8), 2)
    radii = _scale(rng, (17, 25, 55), 0.9, 1.05)
    mediastinal_face = side * (w[0] - center[0]) >= -0.55 * radii[0]
    return ellipsoid(w, center, radii) & mediastinal_face




def abdomen_ct(rng: np.random.Generator, c: Coords) -> tuple[np.ndarray, np.ndarray]:
    """HU image and label map (1 liver, 2 spleen, 3 left kidney, 4 right kidney, 5 aorta)."""
    shape = np.broadcast_shapes(*(a.shape for a in c))
    image = np.full(shape, -1000.0, dtype=np.float32)
    labels = np.zeros(shape, dtype=np.uint8)
    _body(rng, c, image, labels, interior=-70.0)  # abdominal cavity: fat and bowel
    w = deform(rng, c, amplitude=4.0)
    _paint(image, labels, ellipsoid(w, (-12, 18, -20), (8, 6, 10)), -1000.0, 0)  # bowel gas
    liver = ellipsoid(w, _jitter(rng, (20, 4, 18), 4), _scale(rng, (22, 24, 32)))
    _paint(image, labels, liver, 60 + rng.uniform(-8, 8), 1)
    _paint(image, labels, ellipsoid(w, _jitter(rng, (-27, -14, 24), 3), _scale(rng, (9, 12, 18))), 48.0, 2)
    kidney_hu = 150 + rng.uniform(-20, 20)
    for label_id, side in ((3, -1.0), (4, 1.0)):
        _kidney(rng, w, image, labels, side, kidney_hu, label_id)
    _paint(image, labels, cylinder_z(w, _jitter(rng, (-5, -13), 2), 6.5 * rng.uniform(0.85, 1.15)), 200.0, 5)
    _spine(c, image, labels, -29.0)
    return image, labels


def thorax_ct(rng: np.random.Generator, c: Coords) -> tuple[np.ndarray, np.ndarray]:
    """HU image and label map (1 left lung, 2 right lung, 3 heart, 4 pulmonary artery)."""
    shape = np.broadcast_shapes(*(a.shape for a in c))
    image = np.full(shape, -1000.0, dtype=np.float32)
    labels = np.zeros(shape, dtype=np.uint8)
    _body(rng, c, image, labels, interior=40.0)  # mediastinum
    w = deform(rng, c, amplitude=4.0)
    for label_id, side in ((1, -1.0), (2, 1.0)):
        _paint(image, labels, _lung(rng, w, side), -800.0, label_id)
    heart = ellipsoid(w, _jitter(rng, (-6, 10, -12), 3), _scale(rng, (19, 15, 24)))
    _paint(image, labels, heart, 130 + rng.uniform(-15, 15), 3)
    top = _jitter(rng, (-4, 4, 28), 2)
    pa = tube(w, (-4, 12, 6), top, 6.0) | tube(w, top, (18, 0, 30), 4.0) | tube(w, top, (-20, 0, 30), 4.0)
    _paint(image, labels, pa, 190.0, 4)
    trachea = cylinder_z(w, (0.0, -14.0), 7.0) & (w[2] > 22)
    _paint(image, labels, trachea, -1000.0, 0)
    _spine(c, image, labels, -31.0)
    return image, labels


def brain_mri(rng: np.random.Generator, c: Coords) -> tuple[np.ndarray, np.ndarray]:
    """T1-like image (arbitrary units) and label map (1 lateral ventricle, 2 grey matter, 3 white matter)."""
    shape = np.broadcast_shapes(*(a.shape for a in c))
    image = np.zeros(shape, dtype=np.float32)
    labels = np.zeros(shape, dtype=np.uint8)
    w = deform(rng, c, amplitude=4.0)
    head = _scale(rng, (47, 48, 56), 0.95, 1.03)
    _paint(image, labels, ellipsoid(w, (0, 0, 0), head), 85.0, 0)  # scalp
    _paint(image, labels, ellipsoid(w, (0, 0, 0), [r - 4 for r in head]), 12.0, 0)  # skull
    _paint(image, labels, ellipsoid(w, (0, 0, 0), [r - 7 for r in head]), 25.0, 0)  # CSF
    brain = [r - 9 for r in head]
    _paint(image, labels, ellipsoid(w, (0, 0, 0), brain), 70.0, 2)
    phase = rng.uniform(0, 2 * np.pi, size=3)
    folds = (
        0.12 * np.sin(0.35 * w[0] + phase[0]) * np.sin(0.3 * w[1] + phase[1]) * np.sin(0.33 * w[2] + phase[2])
    )
    wm = sum((w[a] / brain[a]) ** 2 for a in range(3)) + folds <= 0.55 * rng.uniform(0.9, 1.1)
    _paint(image, labels, wm, 110.0, 3)
    radii = _scale(rng, (4, 14, 7))
    ventricles = ellipsoid(w, _jitter(rng, (-7, 2, 6), 1.5), radii) | ellipsoid(
        w, _jitter(rng, (7, 2, 6), 1.5), radii
    )
    _paint(image, labels, ventricles, 25.0, 1)
    k = rng.normal(size=3) * 2 * np.pi / 150.0
    image *= np.float32(rng.uniform(0.7, 1.3)) * (1 + 0.08 * np.sin(k[0] * c[0] + k[1] * c[1] + k[2] * c[2]))
    return image, labels


PHANTOMS: tuple[PhantomSpec, ...] = (
    PhantomSpec(
        "abdomen_ct",
        "DemoAbdomenCT",
        "ct",
        ("liver", "spleen", "left kidney", "right kidney", "aorta"),
        (112.0, 96.0, 126.0),
        abdomen_ct,
    ),
    PhantomSpec(
        "thorax_ct",
        "DemoThoraxCT",
        "ct",
        ("left lung", "right lung", "heart", "pulmonary artery"),
        (112.0, 96.0, 126.0),
        thorax_ct,
    ),
    PhantomSpec(
        "brain_mri",
        "DemoBrainMRI",
        "mri",
        ("lateral ventricle", "grey matter", "white matter"),
        (112.0, 116.0, 132.0),
        brain_mri,
    ),
)


# ----------------------------------------------------------------------------- writing


def _save(path: Path, data: np.ndarray, affine: np.ndarray) -> None:
    img = nib.Nifti1Image(data, affine)
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(img, str(path))


def _record(
    out: Path, case_id: str, image: np.ndarray, label_map: np.ndarray, affine: np.ndarray, **fields
) -> dict:
    _save(out / "images" / f"{case_id}.nii.gz", image, affine)
    _save(out / "labels" / f"{case_id}.nii.gz", label_map, affine)
    return {"id": case_id, "image": f"images/{case_id}.nii.gz", "mask": f"labels/{case_id}.nii.gz", **fields}


def make_phantom_case(spec: PhantomSpec, seed: int, index: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(image int16, label map uint8, affine) of case ``index`` of a phantom."""
    rng = np.random.default_rng([seed, PHANTOMS.index(spec), index])
    spacing, orientation = GEOMETRIES[index % len(GEOMETRIES)]
    affine, shape = case_grid(spec.extent_mm, spacing, orientation)
    image, labels = spec.make(rng, world_coords(affine, shape))
    image = gaussian_filter(image, sigma=0.6)
    if spec.modality == "ct":
        image += rng.normal(0.0, 12.0, size=image.shape).astype(np.float32)
    else:
        image += (image > 0) * rng.normal(0.0, 3.0, size=image.shape).astype(np.float32)
        image = np.maximum(image, 0)
    return np.rint(image).astype(np.int16), labels, affine


def read_mrc(path: str | Path) -> np.ndarray:
    """MRC volume (modes 0, 1, 2, 6) as stored: numpy axes (z, y, x), x fastest."""
    with open(path, "rb") as f:
        header = f.read(1024)
        nx, ny, nz, mode = (int(v) for v in np.frombuffer(header[:16], "<i4"))
        extended = int(np.frombuffer(header[92:96], "<i4")[0])
        dtypes = {0: np.int8, 1: np.int16, 2: np.float32, 6: np.uint16}
        if mode not in dtypes:
            raise ValueError(f"{path}: unsupported MRC mode {mode}")
        f.seek(1024 + extended)
        data = np.frombuffer(f.read(), dtype=dtypes[mode], count=nx * ny * nz)
    return data.reshape(nz, ny, nx)


def _package_dir(name: str) -> Path | None:
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def lits_arrays() -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    """LiTS case 117 CT crop (liver-ct-segmentation-package) as RAS arrays: (HU image int16, label map
    uint8 with 1 liver and 2 tumour, identity affine: 1 mm assumed); None when the package is missing."""
    root = _package_dir("liver_ct_segmentation_package")
    if root is None or not (root / "data" / "img_117.mrc").is_file():
        return None
    image, labels = (read_mrc(root / "data" / f"{n}_117.mrc") for n in ("img", "lab"))

    def to_ras(a: np.ndarray) -> np.ndarray:
        # stored (z, y, x); x runs to the patient's right, y to posterior, z to inferior (read off
        # the anatomy: liver on the x-high side against the body wall, kidneys y-high, liver dome
        # z-low), so (x, -y, -z) is RAS
        return np.ascontiguousarray(np.transpose(a, (2, 1, 0))[:, ::-1, ::-1])

    return np.rint(to_ras(image)).astype(np.int16), to_ras(labels).astype(np.uint8), np.eye(4)


def lits_case(out: Path) -> dict | None:
    """LiTS case 117 CT crop as a RAS, 1 mm, identity-affine NIfTI (see :func:`lits_arrays`)."""
    arrays = lits_arrays()
    if arrays is None:
        return None
    return _record(
        out, "lits_117", *arrays, label=["liver", "liver tumor"], modality="ct", dataset="LiTS"
    )


def mni_arrays() -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    """MNI152 2009a T1 (nilearn) averaged to 2 mm over its whole field: (T1 float32, label map uint8
    with 1 grey and 2 white matter where the averaged probability is > 0.5, exact MNI affine); None
    when nilearn is missing."""
    root = _package_dir("nilearn")
    if root is None:
        return None
    files = {
        k: root / "datasets" / "data" / f"mni_icbm152_{k}_tal_nlin_sym_09a_converted.nii.gz"
        for k in ("t1", "gm", "wm")
    }
    if not all(p.is_file() for p in files.values()):
        return None
    imgs = {k: read_voxels(p) for k, p in files.items()}
    affine = imgs["t1"][1]

    def pool(a: np.ndarray) -> np.ndarray:
        a = np.asarray(a, dtype=np.float32)[tuple(slice(0, s - s % 2) for s in a.shape)]
        return a.reshape(a.shape[0] // 2, 2, a.shape[1] // 2, 2, a.shape[2] // 2, 2).mean(axis=(1, 3, 5))

    t1, gm, wm = (pool(imgs[k][0]) for k in ("t1", "gm", "wm"))
    affine2 = affine @ np.diag([2.0, 2.0, 2.0, 1.0])
    affine2[:3, 3] = (affine @ np.array([0.5, 0.5, 0.5, 1.0]))[:3]
    labels = np.zeros(t1.shape, dtype=np.uint8)
    labels[gm > 127.5] = 1
    labels[wm > 127.5] = 2
    return t1, labels, affine2


def mni_case(out: Path) -> dict | None:
    """The 2 mm MNI152 T1 of :func:`mni_arrays` cropped to 112 mm around the ventricles."""
    arrays = mni_arrays()
    if arrays is None:
        return None
    t1, labels, affine2 = arrays
    center = np.linalg.solve(affine2, np.array([0.0, -18.0, 12.0, 1.0]))[:3]
    lo = [max(int(round(c)) - 28, 0) for c in center]
    box = tuple(slice(s, s + 56) for s in lo)
    crop_affine = affine2.copy()
    crop_affine[:3, 3] = (affine2 @ np.array([*lo, 1.0]))[:3]
    return _record(
        out,
        "mni152_t1",
        np.rint(t1[box]).astype(np.int16),
        labels[box],
        crop_affine,
        label=["grey matter", "white matter"],
        modality="mri",
        dataset="MNI152",
    )


README = """# LoRKD demo data (generated by `scripts/make_demo_data.py --seed {seed}`)

Manifests: `train.jsonl`, `val.jsonl`, `test.jsonl` (SAT-DS style, paths relative to this folder).
Each `labels/<id>.nii.gz` is a label map whose id j+1 is the line's `label[j]`; images are in
`images/`. Counts (train/val/test): {counts}.

## Synthetic phantoms (deterministic for a given seed)

| dataset | modality | labels (id 1..n) | region |
|---|---|---|---|
| DemoAbdomenCT | ct | liver, spleen, left kidney, right kidney, aorta | abdomen |
| DemoThoraxCT | ct | left lung, right lung, heart, pulmonary artery | thorax |
| DemoBrainMRI | mri (T1-like) | lateral ventricle, grey matter, white matter | brain |

Shapes are defined in world RAS millimetres (x from the patient's left to right, y posterior to
anterior, z inferior to superior) and sampled on each case's own grid, so every file's affine is
exact. Case i uses grid i mod 5 of: 1x1x3 mm RAS, 0.8x0.8x2.5 mm LPS, 1.2x1.2x2 mm RAS,
0.8x0.8x2.5 mm RAS, 1x1x3 mm LPS. CT intensities are HU (air -1000, fat -100, muscle wall 40, abdominal cavity -70,
liver ~60, spleen 48, kidneys ~150, contrast aorta 200, lung -800, heart ~130, pulmonary artery 190,
bone 650) with Gaussian blur (0.6 voxel) and noise (12 HU); MRI intensities are arbitrary positive
units (WM 110, GM 70, CSF 25, scalp 85) with a random global scale, a smooth bias field and noise,
background exactly 0. Centres, sizes, intensities and a smooth deformation vary per case.

## Real scans (test split only; present when their packages were installed)

{real}
"""

REAL_TEXT = {
    "LiTS": (
        "* `lits_117` (dataset LiTS, ct; labels liver, liver tumor): LiTS case 117 as cropped to "
        "128^3 by `liver-ct-segmentation-package` (MIT code; LiTS images are usually CC BY-NC-SA: do "
        "not redistribute). The MRC files carry no geometry: **assumed 1 mm isotropic**. The MRC "
        "array is stored (z, y, x); it is transposed to (x, y, z) and the y and z axes are flipped so "
        "that the array is RAS (x to the patient's right, y anterior, z superior), read off the "
        "anatomy (liver against the right body wall, kidneys posterior, liver dome superior), and "
        "written with an **identity affine**. HU values as stored (rounded to int16); label 1 "
        "liver, 2 tumour (LiTS convention). The 49-dataset SAT teachers never saw the CT prompt "
        "'liver tumor' (the demo region map adds it to abdomen/abnormal)."
    ),
    "MNI152": (
        "* `mni152_t1` (dataset MNI152, mri; labels grey matter, white matter): the MNI152 2009a "
        "symmetric T1 template shipped with `nilearn` (1 mm, RAS), averaged to 2 mm and cropped to "
        "a 112 mm cube around (0, -18, 12) mm; the affine is exact (MNI mm). Labels: the nilearn grey "
        "and white matter probability maps averaged the same way, a voxel labelled where its "
        "probability is > 0.5 (1 grey, 2 white matter). One population-average brain: expect weak "
        "output from SAT teachers on MNI-space MRI (SAT issue #15)."
    ),
}


def build_demo(
    out: str | Path, seed: int = 0, real: bool = True, counts: Sequence[int] = DEFAULT_COUNTS
) -> dict[str, list[dict]]:
    """Write the demo set into ``out`` (images/, labels/, {train,val,test}.jsonl, README.md)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if len(counts) != 3 or min(counts) < 0:
        raise ValueError(f"counts must be 3 non-negative ints (train, val, test), got {counts!r}")
    manifests: dict[str, list[dict]] = {s: [] for s in SPLITS}
    for spec in PHANTOMS:
        index = 0
        for split, count in zip(SPLITS, counts):
            for _ in range(count):
                image, labels, affine = make_phantom_case(spec, seed, index)
                case_id = f"{spec.key}_{index:03d}"
                fields = {"label": list(spec.labels), "modality": spec.modality, "dataset": spec.dataset}
                manifests[split].append(_record(out, case_id, image, labels, affine, **fields))
                index += 1
    found = []
    if real:
        for make in (lits_case, mni_case):
            row = make(out)
            if row is None:
                log.warning("%s: package not installed; real scan skipped", make.__name__)
                continue
            manifests["test"].append(row)
            found.append(row["dataset"])
    for split, rows in manifests.items():
        (out / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    real_text = "\n".join(REAL_TEXT[d] for d in found) or "None (built with --no-real or packages missing)."
    count_text = " / ".join(str(len(manifests[s])) for s in SPLITS)
    (out / "README.md").write_text(README.format(seed=seed, counts=count_text, real=real_text))
    return manifests
