"""SAT's training augmentations as configurable MONAI dictionary transforms on ``image``/``masks``."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any

from lorkd.data.transforms import dataclass_from_mapping


@dataclass
class AugmentConfig:
    """Probabilities and ranges of SAT's augmentations (defaults = SAT / LoRKD); a 0 probability drops one.

    Zoom resamples image (area) and masks (nearest) together and keeps the patch size (zero padding
    when zooming out); the intensity augmentations touch the image only. ``flip_axes`` (not SAT's; none
    by default) mirrors image and masks along each listed spatial axis (0 = x, 1 = y, 2 = z of the
    patch's RAS grid) with ``flip_prob``, each axis on its own: use it only along axes that no label's
    name depends on (not x when labels say left/right).
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

    def __post_init__(self) -> None:
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


def build_augmentation(cfg: AugmentConfig) -> Any | None:
    """A MONAI ``Compose`` over {"image": (1,X,Y,Z), "masks": (n,X,Y,Z)}, or None when disabled."""
    if not cfg.enabled:
        return None
    from monai.transforms import (
        Compose,
        RandAdjustContrastd,
        RandFlipd,
        RandGaussianNoised,
        RandGaussianSharpend,
        RandScaleIntensityd,
        RandZoomd,
    )

    steps: list[Any] = []
    if cfg.zoom_prob > 0:
        steps.append(
            RandZoomd(
                keys=["image", "masks"],
                prob=cfg.zoom_prob,
                min_zoom=cfg.zoom_range[0],
                max_zoom=cfg.zoom_range[1],
                mode=["area", "nearest"],
                padding_mode="constant",
                keep_size=True,
            )
        )
    if cfg.noise_prob > 0:
        steps.append(RandGaussianNoised(keys=["image"], prob=cfg.noise_prob, mean=0.0, std=cfg.noise_std))
    if cfg.sharpen_prob > 0:
        steps.append(RandGaussianSharpend(keys=["image"], prob=cfg.sharpen_prob))
    if cfg.scale_intensity_prob > 0:
        steps.append(
            RandScaleIntensityd(
                keys=["image"], factors=cfg.scale_intensity_factor, prob=cfg.scale_intensity_prob
            )
        )
    if cfg.contrast_inverted_prob > 0:
        steps.append(
            RandAdjustContrastd(
                keys=["image"], prob=cfg.contrast_inverted_prob, gamma=cfg.contrast_gamma, invert_image=True
            )
        )
    if cfg.contrast_prob > 0:
        steps.append(RandAdjustContrastd(keys=["image"], prob=cfg.contrast_prob, gamma=cfg.contrast_gamma))
    if cfg.flip_prob > 0:
        steps += [RandFlipd(keys=["image", "masks"], prob=cfg.flip_prob, spatial_axis=a) for a in cfg.flip_axes]
    return Compose(steps) if steps else None
