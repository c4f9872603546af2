"""SAT's training augmentations: configurable MONAI dictionary transforms on ``image``/``masks`` (per sample,
in the loader's workers), or the same transforms with the same random draws applied to a whole batch of
tensors after it reached the training device (:func:`draw_augment` in the worker, :func:`apply_augment`
on the device).

The batched path reproduces MONAI's draws exactly (:func:`draw_augment` replays the random streams that
``Compose.set_random_state(seed)`` gives each transform) and applies: zoom with MONAI's own ``Zoom``
(area for the image, nearest for the packed mask bits), the Gaussian sharpen as a batched separable
filter with MONAI's ``gaussian_1d`` kernels (MONAI's ``GaussianSharpen`` takes one sigma per call and
ran 3.4 s against 0.27 s for this filter on one 288x288x96 patch at one CPU thread), and noise, scaling,
contrast and flips as batched tensor operations of MONAI's formulas. Only the noise field differs: the
same N(0, std) law drawn by torch on the device (from a per-sample seed) instead of numpy in the worker.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields
from typing import Any

import numpy as np
import torch

from lorkd.data.transforms import dataclass_from_mapping

ON_DEVICE = (True, False, "auto")
MONAI_MAX_SEED = 2**32  # monai.utils.MAX_SEED: Compose.set_random_state draws each transform's seed below it
SHARPEN_SIGMA1 = (0.5, 1.0)  # RandGaussianSharpend's defaults (SAT keeps them)
SHARPEN_SIGMA2_LOW = 0.5
SHARPEN_ALPHA = (10.0, 30.0)
SHARPEN_TRUNCATED = 4.0  # GaussianFilter's default


@dataclass
class AugmentConfig:
    """Probabilities and ranges of SAT's augmentations (defaults = SAT / LoRKD); a 0 probability drops one.

    Zoom resamples image (area) and masks (nearest) together and keeps the patch size (zero padding
    when zooming out); the intensity augmentations touch the image only. ``flip_axes`` (not SAT's; none
    by default) mirrors image and masks along each listed spatial axis (0 = x, 1 = y, 2 = z of the
    patch's RAS grid) with ``flip_prob``, each axis on its own: use it only along axes that no label's
    name depends on (not x when labels say left/right).

    ``on_device``: False augments each sample in the loader's workers; True ships the random draws with
    the sample and augments the whole batch after it reached the training device; "auto" does so on a
    GPU and on the CPU too (measured faster there: ``scripts/benchmarks/loader.py``).
    """

    enabled: bool = True
    zoom_prob: float = 0.2
    zoom_range: tuple[float, float] = (0.7, 1.4)
    noise_prob: float = 0.1
    noise_std: float = 0.1
    sharpen_prob: float = 0.2
    scale_intensity_prob: float = 0.15
    scale_intensity_factor: float = 0.25
    contrast_inverted_prob: float = 0.1
    contrast_prob: float = 0.3
    contrast_gamma: tuple[float, float] = (0.7, 1.5)
    flip_prob: float = 0.5
    flip_axes: tuple[int, ...] = ()
    on_device: bool | str = "auto"

    def __post_init__(self) -> None:
        if self.on_device not in ON_DEVICE:
            raise ValueError(f"augment.on_device must be true, false or auto, got {self.on_device!r}")
        self.zoom_range = tuple(float(v) for v in self.zoom_range)  # type: ignore[assignment]
        self.contrast_gamma = tuple(float(v) for v in self.contrast_gamma)  # type: ignore[assignment]
        self.flip_axes = tuple(int(a) for a in self.flip_axes)
        if any(a not in (0, 1, 2) for a in self.flip_axes) or len(set(self.flip_axes)) != len(self.flip_axes):
            raise ValueError(f"augment.flip_axes must list distinct axes among 0, 1, 2, got {list(self.flip_axes)}")
        for f in fields(self):
            if f.name.endswith("_prob") and not 0.0 <= float(getattr(self, f.name)) <= 1.0:
                raise ValueError(f"augment.{f.name} must be in [0, 1], got {getattr(self, f.name)!r}")
        for name in ("zoom_range", "contrast_gamma"):
            low, high = getattr(self, name)
            if not 0 < low <= high:
                raise ValueError(
                    f"augment.{name} must be (low, high) with 0 < low <= high, got {(low, high)}"
                )

    @classmethod
    def coerce(cls, value: AugmentConfig | Mapping[str, Any] | bool | None) -> AugmentConfig:
        """``True``/None: SAT's defaults; ``False``: none; a mapping: overrides of the defaults."""
        if value is None or value is True:
            return cls()
        if value is False:
            return cls(enabled=False)
        if isinstance(value, cls):
            return value
        if isinstance(value, Mapping):
            return dataclass_from_mapping(cls, value, "augment")
        raise TypeError(f"augment must be a bool, a mapping or an AugmentConfig, got {type(value).__name__}")


def augment_steps(cfg: AugmentConfig) -> list[tuple[str, float]]:
    """(step, probability) in the order MONAI's ``Compose`` applies them; a 0 probability drops a step."""
    steps = [
        ("zoom", cfg.zoom_prob),
        ("noise", cfg.noise_prob),
        ("sharpen", cfg.sharpen_prob),
        ("scale", cfg.scale_intensity_prob),
        ("contrast_inverted", cfg.contrast_inverted_prob),
        ("contrast", cfg.contrast_prob),
        *((f"flip{a}", cfg.flip_prob) for a in cfg.flip_axes),
    ]
    return [(name, float(prob)) for name, prob in steps if prob > 0] if cfg.enabled else []


def build_augmentation(cfg: AugmentConfig) -> Any | None:
    """A MONAI ``Compose`` over {"image": (1,X,Y,Z), "masks": (n,X,Y,Z)}, or None when disabled."""
    from monai.transforms import (
        Compose,
        RandAdjustContrastd,
        RandFlipd,
        RandGaussianNoised,
        RandGaussianSharpend,
        RandScaleIntensityd,
        RandZoomd,
    )

    def make(name: str, prob: float) -> Any:
        if name == "zoom":
            return RandZoomd(
                keys=["image", "masks"], prob=prob, min_zoom=cfg.zoom_range[0], max_zoom=cfg.zoom_range[1],
                mode=["area", "nearest"], padding_mode="constant", keep_size=True,
            )  # fmt: skip
        if name == "noise":
            return RandGaussianNoised(keys=["image"], prob=prob, mean=0.0, std=cfg.noise_std)
        if name == "sharpen":
            return RandGaussianSharpend(keys=["image"], prob=prob)
        if name == "scale":
            return RandScaleIntensityd(keys=["image"], factors=cfg.scale_intensity_factor, prob=prob)
        if name.startswith("contrast"):
            inverted = name == "contrast_inverted"
            return RandAdjustContrastd(keys=["image"], prob=prob, gamma=cfg.contrast_gamma, invert_image=inverted)
        return RandFlipd(keys=["image", "masks"], prob=prob, spatial_axis=int(name[-1]))

    steps = augment_steps(cfg)
    return Compose([make(name, prob) for name, prob in steps]) if steps else None


def draw_augment(cfg: AugmentConfig, seed: int) -> dict[str, Any]:
    """The random parameters :func:`build_augmentation`'s ``Compose`` draws after ``set_random_state(seed=seed)``,
    without an image: {step: parameters} for the steps that fire (plain Python values).

    Each MONAI dictionary transform and the array transform inside it are seeded alike: the outer one
    draws whether it fires, the inner one repeats that draw (its own probability is 1) and then draws
    the parameters. ``noise`` also gets a seed for the device's noise field.
    """
    compose = np.random.RandomState(seed)
    draws: dict[str, Any] = {}
    for name, prob in augment_steps(cfg):
        step_seed = int(compose.randint(MONAI_MAX_SEED, dtype="uint32"))
        outer, inner = np.random.RandomState(step_seed), np.random.RandomState(step_seed)
        if not outer.rand() < prob:
            continue
        inner.rand()
        if name == "zoom":
            draws[name] = float(inner.uniform(*cfg.zoom_range))
        elif name == "noise":
            draws[name] = {"std": float(inner.uniform(0, cfg.noise_std)), "seed": step_seed}
        elif name == "sharpen":
            sigma1 = [float(inner.uniform(*SHARPEN_SIGMA1)) for _ in range(3)]
            sigma2 = [float(inner.uniform(SHARPEN_SIGMA2_LOW, s)) for s in sigma1]
            draws[name] = {"sigma1": sigma1, "sigma2": sigma2, "alpha": float(inner.uniform(*SHARPEN_ALPHA))}
        elif name == "scale":
            draws[name] = float(inner.uniform(-cfg.scale_intensity_factor, cfg.scale_intensity_factor))
        elif name.startswith("contrast"):
            draws[name] = float(inner.uniform(*cfg.contrast_gamma))
        else:
            draws[name] = True
    return draws


def apply_augment(
    image: torch.Tensor, bits: torch.Tensor, draws: Sequence[Mapping[str, Any]]
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`draw_augment`'s draws applied to a batch where it lies (CPU or GPU), in MONAI's order.

    ``image`` (B, 1, X, Y, Z) float32 and ``bits`` (B, k, X, Y, Z) uint8 (masks packed 8 to a byte,
    :func:`lorkd.data.batch.pack_bits`: nearest resampling and flips move the bits of a voxel together);
    ``draws[b]`` are sample b's. Returns new tensors; the inputs are left as they were.
    """
    if len(draws) != image.shape[0]:
        raise ValueError(f"apply_augment: {len(draws)} draws for a batch of {image.shape[0]}")
    image, bits = image.clone(), bits.clone()
    for b, draw in enumerate(draws):
        if "zoom" in draw:
            image[b], bits[b] = _zoom(image[b], bits[b], draw["zoom"])
    noisy = _fired(draws, "noise")
    for b in noisy:  # one generator per sample: its field does not depend on the batch it is in
        generator = torch.Generator(image.device).manual_seed(draws[b]["noise"]["seed"])
        field = torch.randn(image.shape[1:], generator=generator, device=image.device, dtype=image.dtype)
        image[b] += field * draws[b]["noise"]["std"]
    sharpen = _fired(draws, "sharpen")
    if sharpen:
        image[sharpen] = _sharpen(image[sharpen], [draws[b]["sharpen"] for b in sharpen])
    scale = _fired(draws, "scale")
    if scale:
        image[scale] *= _column([1 + draws[b]["scale"] for b in scale], image)
    for name in ("contrast_inverted", "contrast"):
        fired = _fired(draws, name)
        if fired:
            image[fired] = _contrast(image[fired], _column([draws[b][name] for b in fired], image), name != "contrast")
    for axis in range(3):
        flipped = _fired(draws, f"flip{axis}")
        if flipped:
            image[flipped], bits[flipped] = image[flipped].flip(axis + 2), bits[flipped].flip(axis + 2)
    return image, bits


def _fired(draws: Sequence[Mapping[str, Any]], name: str) -> list[int]:
    return [b for b, draw in enumerate(draws) if name in draw]


def _column(values: Sequence[float], like: torch.Tensor) -> torch.Tensor:
    """(n, 1, 1, 1, 1) values for per-sample broadcasting over (n, C, X, Y, Z)."""
    return torch.tensor(values, dtype=like.dtype, device=like.device).view(-1, *[1] * (like.ndim - 1))


def _zoom(image: torch.Tensor, bits: torch.Tensor, zoom: float) -> tuple[torch.Tensor, torch.Tensor]:
    """MONAI's ``Zoom`` as ``RandZoomd`` applies it: area for the image, nearest for the (uint8) bits."""
    from monai.transforms import Zoom

    def zoomed(x: torch.Tensor, mode: str, dtype: torch.dtype) -> torch.Tensor:
        out = Zoom(zoom, mode=mode, padding_mode="constant", keep_size=True, dtype=dtype)(x)
        return (out.as_tensor() if hasattr(out, "as_tensor") else out).to(x.dtype)

    return zoomed(image, "area", torch.float32), zoomed(bits, "nearest", torch.uint8)


def _sharpen(image: torch.Tensor, draws: Sequence[Mapping[str, Any]]) -> torch.Tensor:
    """MONAI's ``GaussianSharpen`` (erf kernels, zero padding) with each sample's own sigmas and alpha."""
    blurred = _blur(image, [d["sigma1"] for d in draws])
    twice = _blur(blurred, [d["sigma2"] for d in draws])
    return blurred + _column([d["alpha"] for d in draws], image) * (blurred - twice)


def _blur(image: torch.Tensor, sigmas: Sequence[Sequence[float]]) -> torch.Tensor:
    """Separable Gaussian filter of (n, C, X, Y, Z) with per-sample sigmas (one per axis), zero padded.

    Kernels are MONAI's (``gaussian_1d``, float32 sigma as ``GaussianFilter`` keeps it), zero-extended to
    the batch's widest one, and applied tap by tap as shifted multiply-adds (no conv: 12x faster on the CPU).
    """
    from monai.networks.layers.convutils import gaussian_1d

    for axis in range(3):
        kernels = [gaussian_1d(torch.tensor(s[axis], dtype=torch.float32), SHARPEN_TRUNCATED, "erf") for s in sigmas]
        radius = max((len(k) - 1) // 2 for k in kernels)
        taps = torch.stack([torch.nn.functional.pad(k, [radius - (len(k) - 1) // 2] * 2) for k in kernels])
        taps = taps.to(image.device, image.dtype)
        dim, size = axis + 2, image.shape[axis + 2]
        out = image * taps[:, radius].view(-1, *[1] * (image.ndim - 1))
        for t in range(2 * radius + 1):
            offset = t - radius
            if offset == 0 or abs(offset) >= size:
                continue
            weight = taps[:, t].view(-1, *[1] * (image.ndim - 1))
            src = image.narrow(dim, max(offset, 0), size - abs(offset))  # out[i] += w[t] * in[i + offset]
            out.narrow(dim, max(-offset, 0), size - abs(offset)).addcmul_(src, weight)
        image = out
    return image


def _contrast(image: torch.Tensor, gamma: torch.Tensor, inverted: bool) -> torch.Tensor:
    """MONAI's ``AdjustContrast`` per sample: ``((x - min) / (range + 1e-7)) ** gamma * range + min``."""
    x = -image if inverted else image
    low = x.amin(dim=tuple(range(1, x.ndim)), keepdim=True)
    span = x.amax(dim=tuple(range(1, x.ndim)), keepdim=True) - low
    out = ((x - low) / (span + 1e-7)) ** gamma * span + low
    return -out if inverted else out
