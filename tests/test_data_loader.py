"""The loader of issue 29: masks travel as bits, augmentation drawn in the worker and applied to the batch on
the device, equal to MONAI's per-sample path on the same draws."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lorkd.data.augment import AugmentConfig, apply_augment, build_augmentation, draw_augment
from lorkd.data.batch import finish_batch, pack_bits, pack_label_window, unpack_bits
from lorkd.data.cache import PreprocessCache
from lorkd.data.datamodule import augment_on_device
from lorkd.data.datasets import PatchDataset, collate_patches
from lorkd.data.manifest import Case
from lorkd.data.transforms import PreprocessConfig
from lorkd.losses import segmentation_loss

RAW = PreprocessConfig(orientation=None, spacing=None, crop_foreground=False)
LABELS = ["liver", "spleen", "pancreas", "aorta", "kidney", "gallbladder", "stomach", "duodenum", "colon"]
ALL = {"zoom_prob": 1.0, "noise_prob": 1.0, "sharpen_prob": 1.0, "scale_intensity_prob": 1.0,
       "contrast_inverted_prob": 1.0, "contrast_prob": 1.0, "flip_prob": 1.0, "flip_axes": [0, 1, 2]}  # fmt: skip


@pytest.fixture
def case(tmp_path, write_nifti):
    """48x40x24 volume with 9 labelled boxes (non-overlapping: the cache keeps a label map)."""
    rng = np.random.default_rng(0)
    image = rng.normal(100, 40, (48, 40, 24)).astype(np.float32)
    labels = np.zeros(image.shape, np.uint8)
    for j in range(len(LABELS)):
        x, y = 4 + 5 * (j % 8), 4 + 16 * (j // 8)
        labels[x : x + 4, y : y + 10, 4 + j : 12 + j] = j + 1
    img, seg = write_nifti("img.nii.gz", image), write_nifti("seg.nii.gz", labels)
    return Case(img, LABELS, "ct", "Known", seg, None, "known", None, None, 1, tmp_path / "m.jsonl")


def dataset(case, region_map, tmp_path, **kw) -> PatchDataset:
    args = dict(patch_size=(40, 32, 16), max_queries=9, label_centered_prob=1.0, region_map=region_map)
    return PatchDataset([case], PreprocessCache(tmp_path / "cache"), RAW, **{**args, **kw})


def monai_draws(compose, seed: int) -> dict:
    """What MONAI's own Compose (:func:`build_augmentation`) draws for ``seed``, read from its transforms
    after a call on a tiny sample."""
    compose.set_random_state(seed=seed)
    compose({"image": torch.zeros(1, 4, 4, 4), "masks": torch.zeros(1, 4, 4, 4)})
    draws = {}
    for t in compose.transforms:
        name = type(t).__name__
        if not t._do_transform:
            continue
        if name == "RandZoomd":
            draws["zoom"] = t.rand_zoom._zoom[0]
        elif name == "RandGaussianNoised":
            draws["noise"] = t.rand_gaussian_noise.noise
        elif name == "RandGaussianSharpend":
            s = t.rand_sharpen
            draws["sharpen"] = {"sigma1": [s.x1, s.y1, s.z1], "sigma2": [s.x2, s.y2, s.z2], "alpha": s.a}
        elif name == "RandScaleIntensityd":
            draws["scale"] = t.scaler.factor
        elif name == "RandAdjustContrastd":
            draws["contrast_inverted" if t.adjuster.invert_image else "contrast"] = t.adjuster.gamma_value
        else:
            draws[f"flip{t.flipper.spatial_axis}"] = True
    return draws


@pytest.mark.parametrize("overrides", [{}, ALL], ids=["sat", "all"])
def test_draws_are_the_ones_monai_makes_for_the_same_seed(overrides):
    cfg = AugmentConfig.coerce({**overrides, "flip_axes": [0, 2]})
    compose = build_augmentation(cfg)
    for seed in range(20):
        ours, theirs = draw_augment(cfg, seed), monai_draws(compose, seed)
        assert set(ours) == set(theirs), seed
        if "noise" in ours:  # MONAI's field continues the stream that drew the std
            stream = np.random.RandomState(ours["noise"]["seed"])
            stream.rand(), stream.uniform()
            field = stream.normal(0.0, ours["noise"]["std"], (1, 4, 4, 4)).astype(np.float32)
            assert np.array_equal(np.asarray(theirs.pop("noise")), field)
            ours.pop("noise")
        assert ours == theirs, seed


def test_draw_probabilities_and_ranges_match_monai():
    cfg = AugmentConfig.coerce({"flip_axes": [1]})
    n = 400
    ours = [draw_augment(cfg, seed) for seed in range(n)]
    compose = build_augmentation(cfg)
    theirs = [monai_draws(compose, seed + 10**6) for seed in range(n)]  # other seeds: compared as distributions
    probs = {"zoom": 0.2, "noise": 0.1, "sharpen": 0.2, "scale": 0.15, "contrast_inverted": 0.1,
             "contrast": 0.3, "flip1": 0.5}  # fmt: skip
    for name, p in probs.items():
        bound = 4 * (p * (1 - p) / n) ** 0.5
        rate_ours, rate_theirs = (sum(name in d for d in draws) / n for draws in (ours, theirs))
        assert abs(rate_ours - p) < bound and abs(rate_theirs - p) < bound, name
    for name, (low, high) in {"zoom": (0.7, 1.4), "scale": (-0.25, 0.25), "contrast": (0.7, 1.5)}.items():
        values = [[d[name] for d in draws if name in d] for draws in (ours, theirs)]
        for v in values:
            assert low <= min(v) and max(v) <= high and min(v) < low + 0.1 * (high - low) < high - 0.1 * (high - low) < max(v)
        assert abs(np.mean(values[0]) - np.mean(values[1])) < 0.1 * (high - low), name
    alphas = [d["sharpen"]["alpha"] for d in ours if "sharpen" in d]
    assert 10 <= min(alphas) and max(alphas) <= 30
    pairs = [pair for d in ours if "sharpen" in d for pair in zip(d["sharpen"]["sigma1"], d["sharpen"]["sigma2"])]
    assert all(0.5 <= s2 <= s1 <= 1.0 for s1, s2 in pairs)
    stds = [d["noise"]["std"] for d in ours if "noise" in d]
    assert 0 <= min(stds) and max(stds) <= 0.1 and abs(np.mean(stds) - 0.05) < 0.015


@pytest.mark.parametrize("overrides", [ALL, {"flip_axes": [0, 1]}, {"zoom_prob": 1.0, "zoom_range": [0.7, 0.8]}],
                         ids=["all", "sat", "zoom-out"])  # fmt: skip
def test_the_device_path_equals_monais_per_sample_path_on_the_same_draws(case, region_map, tmp_path, overrides):
    augment = {**overrides, "noise_prob": 0.0}  # the noise field is the one draw the paths make apart
    cpu = dataset(case, region_map, tmp_path, augment=augment)
    device = dataset(case, region_map, tmp_path, augment=augment, augment_on_device=True)
    keys = [(0, seed) for seed in range(6)]
    expected = finish_batch(collate_patches([cpu[k] for k in keys]))
    samples = [device[k] for k in keys]
    assert all("augment" in s for s in samples) and any(len(s["augment"]) > 1 for s in samples)
    got = finish_batch(collate_patches(samples))
    assert got["labels"] == expected["labels"] and torch.equal(got["query_mask"], expected["query_mask"])
    torch.testing.assert_close(got["image"], expected["image"], rtol=1e-4, atol=1e-4)
    assert torch.equal(got["masks"], expected["masks"])  # nearest zoom and flips: the same voxels


def test_device_noise_is_monais_law_and_its_own_per_sample(case, region_map, tmp_path):
    only_noise = {**{k: 0.0 for k in ALL if k.endswith("_prob")}, "noise_prob": 1.0}
    ds = dataset(case, region_map, tmp_path, augment=only_noise, augment_on_device=True)
    samples = [ds[(0, seed)] for seed in range(3)]
    plain = finish_batch(collate_patches([{k: v for k, v in s.items() if k != "augment"} for s in samples]))
    batch = finish_batch(collate_patches(samples))
    for b, s in enumerate(samples):
        noise = batch["image"][b] - plain["image"][b]
        std = s["augment"]["noise"]["std"]
        assert abs(float(noise.std()) / std - 1) < 0.05 and abs(float(noise.mean())) < 0.05 * std
    alone = finish_batch(collate_patches(samples[1:2]))
    assert torch.equal(alone["image"][0], batch["image"][1])  # the field does not depend on the batch


def test_masks_travel_as_bits_and_the_losses_see_the_same_targets(case, region_map, tmp_path):
    whole = dataset(case, region_map, tmp_path, patch_size=(48, 40, 24), augment=False)  # the crop is the volume
    dense = np.asarray(whole.load(0).data.masks)
    samples = [whole[(0, seed)] for seed in range(4)]
    batch = collate_patches(samples)
    assert batch["mask_bits"].dtype == torch.uint8 and batch["mask_bits"].shape == (4, 2, 48, 40, 24)
    assert "masks" not in batch and batch["image"].dtype == torch.float32
    done = finish_batch(batch)
    logits = torch.randn(done["masks"].shape)
    for b, s in enumerate(samples):
        ids = [LABELS.index(label) for label in s["labels"]]
        target = torch.zeros(done["masks"].shape[1:])
        target[: len(ids)] = torch.from_numpy(dense[ids].astype(np.float32))
        assert done["masks"].dtype == torch.float32 and torch.equal(done["masks"][b], target)
        qmask = batch["query_mask"][b : b + 1]
        ref = segmentation_loss(logits[b : b + 1], target[None], qmask)[0]
        assert torch.equal(segmentation_loss(logits[b : b + 1], done["masks"][b : b + 1], qmask)[0], ref)


@pytest.mark.parametrize("n", [1, 7, 8, 9, 16, 17])
def test_bits_round_trip_and_the_label_map_packing(n):
    rng = np.random.default_rng(n)
    masks = rng.random((n, 5, 6, 7)) < 0.3
    bits = pack_bits(list(masks), (5, 6, 7))
    assert bits.shape == ((n + 7) // 8, 5, 6, 7) and bits.dtype == np.uint8
    assert torch.equal(unpack_bits(torch.from_numpy(bits)[None], n)[0], torch.from_numpy(masks).float())
    window = rng.integers(0, 20, (5, 6, 7)).astype(np.uint8)
    ids = [int(i) for i in rng.permutation(np.arange(1, 25))[:n]]  # some ids are absent from the window
    assert np.array_equal(pack_label_window(window, ids), pack_bits([window == i for i in ids], (5, 6, 7)))


def test_float16_images_and_what_a_sample_weighs(case, region_map, tmp_path):
    full = dataset(case, region_map, tmp_path, augment=False)
    half = dataset(case, region_map, tmp_path, augment=False, image_dtype="float16")
    a, b = full[(0, 3)], half[(0, 3)]
    assert b["image"].dtype == torch.float16 and torch.equal(b["image"], a["image"].half())
    voxels = 40 * 32 * 16
    assert a["image"].nbytes + a["mask_bits"].nbytes == voxels * (4 + 2)  # 9 queries: 2 byte planes
    assert b["image"].nbytes + b["mask_bits"].nbytes == voxels * (2 + 2)
    with pytest.raises(ValueError, match="image_dtype"):
        dataset(case, region_map, tmp_path, image_dtype="int8")


def test_apply_augment_leaves_its_inputs_and_checks_the_batch():
    image, bits = torch.randn(2, 1, 8, 8, 8), torch.randint(0, 255, (2, 1, 8, 8, 8), dtype=torch.uint8)
    before = image.clone(), bits.clone()
    out, out_bits = apply_augment(image, bits, [{"flip0": True, "scale": 0.1}, {}])
    assert torch.equal(image, before[0]) and torch.equal(bits, before[1])
    torch.testing.assert_close(out[0], image[0].flip(1) * 1.1)
    assert torch.equal(out_bits[0], bits[0].flip(1)) and torch.equal(out[1], image[1])
    with pytest.raises(ValueError, match="2 draws for a batch of 3"):
        apply_augment(torch.zeros(3, 1, 2, 2, 2), torch.zeros(3, 1, 2, 2, 2, dtype=torch.uint8), [{}, {}])
    with pytest.raises(ValueError, match="on_device"):
        AugmentConfig.coerce({"on_device": "gpu"})


def test_on_device_resolution():
    assert augment_on_device(AugmentConfig.coerce({"on_device": "auto"}))
    assert augment_on_device(AugmentConfig.coerce({"on_device": True}))
    assert not augment_on_device(AugmentConfig.coerce({"on_device": False}))
    assert not augment_on_device(AugmentConfig.coerce(False))  # nothing to augment
