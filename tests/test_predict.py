"""Predictor: geometry back to the input's grid, small images, prompt independence, expert routing, errors."""

from __future__ import annotations

import math

import nibabel as nib
import numpy as np
import pytest
import torch
from torch import nn

from lorkd.checkpoints.loading import LoadedModel
from lorkd.inference import sliding_window
from lorkd.inference.predictor import Predictor, _Assembler
from lorkd.models.sat import ImageFeatures
from lorkd.regions import UnknownLabelError, normalize_label

BOX = (slice(10, 25), slice(8, 22), slice(5, 14))


class ThresholdNet(nn.Module):
    """A fake SAT: logits of query (a, b) are ``a * x + b`` on the preprocessed image ``x``."""

    size_divisor = 8

    def __init__(self) -> None:
        super().__init__()
        self.windows = 0
        self.seen: list[torch.Tensor] = []

    def encode(self, image: torch.Tensor) -> ImageFeatures:
        self.windows += image.shape[0]
        self.seen.append(image)
        x = image[:, :1]
        return ImageFeatures(
            per_voxel=[x], memory=x.new_zeros(x.shape[0], 1, 2), pos=x.new_zeros(1, 1, 2), latent=x
        )

    def decode(self, features: ImageFeatures, queries: torch.Tensor) -> list[torch.Tensor]:
        x = features.per_voxel[0]
        return [queries[:, 0].view(1, -1, 1, 1, 1) * x + queries[:, 1].view(1, -1, 1, 1, 1)]


class StubBank:
    """A prompt bank whose query for a label is a fixed vector (KeyError for unknown prompts)."""

    def __init__(self, vectors: dict[str, tuple[float, float]]) -> None:
        self.embeddings = {k: torch.tensor(v, dtype=torch.float32) for k, v in vectors.items()}

    def queries(self, labels, modality) -> torch.Tensor:
        return torch.stack([self.embeddings[normalize_label(lab)] for lab in labels])


def fake_predictor(**options) -> Predictor:
    bank = StubBank({"object": (20.0, 0.0), "wide": (1.0, 3.0), "everywhere": (0.0, 5.0), "nothing": (0.0, -5.0)})
    data = {"preprocess": {"orientation": "RAS", "spacing": [1.0, 1.0, 3.0]}, "patch_size": [16, 16, 8]}
    model = LoadedModel(ThresholdNet(), bank, "teacher", data=data, source="fake.ckpt")  # type: ignore[arg-type]
    return Predictor(model, device="cpu", **options)


def segment_at_half_intensity(predictor: Predictor, image: np.ndarray, affine: np.ndarray) -> None:
    """Point the fake's "object" query at the intensity halfway between background and box, as
    preprocessed, so its mask is the box's partial-volume boundary."""
    _, array, _ = predictor.preprocess_input(image, "ct", affine)
    low, high = float(array.min()), float(array.max())
    a = 40.0 / (high - low)
    predictor.model.prompts.embeddings["object"] = torch.tensor([a, -a * (low + high) / 2])


def box_image(shape=(40, 36, 20)) -> np.ndarray:
    """CT-like: background 50 HU (all foreground, so no crop), a box of 800 HU."""
    image = np.full(shape, 50.0, dtype=np.float32)
    image[BOX] = 800.0
    return image


def rotation(degrees_z: float, degrees_x: float) -> np.ndarray:
    a, b = math.radians(degrees_z), math.radians(degrees_x)
    rz = np.array([[math.cos(a), -math.sin(a), 0], [math.sin(a), math.cos(a), 0], [0, 0, 1]])
    rx = np.array([[1, 0, 0], [0, math.cos(b), -math.sin(b)], [0, math.sin(b), math.cos(b)]])
    return rz @ rx


def affine_of(linear: np.ndarray, origin=(-20.0, 15.0, 40.0)) -> np.ndarray:
    affine = np.eye(4)
    affine[:3, :3] = linear
    affine[:3, 3] = origin
    return affine


GEOMETRIES = {
    # name: (affine, margin in voxels per axis around the box edges where either answer is fine)
    "ras": (affine_of(np.diag([1.5, 1.5, 2.0])), (2, 2, 3)),
    "lps": (affine_of(np.diag([-1.0, -1.0, 2.5])), (2, 2, 3)),
    "oblique": (affine_of(rotation(25, 10) @ np.diag([1.2, 1.2, 2.0])), (3, 3, 3)),
    "anisotropic": (affine_of(np.diag([0.7, 0.9, 4.0])), (3, 3, 2)),
}


@pytest.mark.parametrize("name", sorted(GEOMETRIES))
def test_masks_come_back_on_the_input_grid_and_the_right_voxels(name):
    affine, margin = GEOMETRIES[name]
    image = box_image()
    predictor = fake_predictor()
    segment_at_half_intensity(predictor, image, affine)
    result = predictor.predict(image, ["object"], "ct", affine=affine)
    mask = np.asarray(result.masks["object"].dataobj)
    for out in (result.masks["object"], result.segmentation):
        assert out.shape == image.shape
        assert np.array_equal(out.affine, affine)
    assert mask.dtype == np.uint8 and set(np.unique(mask)) <= {0, 1}
    inner = tuple(slice(s.start + m, s.stop - m) for s, m in zip(BOX, margin))
    outer = np.ones(image.shape, dtype=bool)
    outer[tuple(slice(max(s.start - m, 0), s.stop + m) for s, m in zip(BOX, margin))] = False
    assert mask[inner].all(), "voxels well inside the object were lost"
    assert not mask[outer].any(), "voxels well outside the object were segmented (wrong orientation/shift?)"
    truth = np.zeros(image.shape, dtype=bool)
    truth[BOX] = True
    dice = 2 * np.logical_and(mask, truth).sum() / (mask.sum() + truth.sum())
    assert dice > 0.9


def test_path_nibabel_and_array_inputs_agree_and_keep_the_file_header(tmp_path):
    affine, _ = GEOMETRIES["lps"]
    path = tmp_path / "case.nii.gz"
    source = nib.Nifti1Image(box_image(), affine)
    source.set_qform(affine, code=1)
    nib.save(source, path)
    predictor = fake_predictor()
    loaded = nib.load(path)
    results = [
        predictor.predict(path, "object", "ct"),
        predictor.predict(loaded, "object", "ct"),
        predictor.predict(np.asarray(loaded.dataobj), "object", "ct", affine=loaded.affine),
    ]
    masks = [np.asarray(r.masks["object"].dataobj) for r in results]
    assert all(np.array_equal(masks[0], m) for m in masks[1:]) and masks[0].any()
    assert np.array_equal(results[0].masks["object"].affine, loaded.affine)
    assert int(results[0].masks["object"].header["qform_code"]) == 1


@pytest.mark.parametrize("slabs", [[slice(1, 9)], [slice(1, 3), slice(3, 4), slice(4, 9)]])
@pytest.mark.parametrize("order", [[0, 1, 2, 3], [2, 0, 3, 1], [3, 2, 1, 0]])
def test_a_tie_goes_to_the_earlier_label_whatever_order_labels_arrive_in(order, slabs):
    """Labels arrive in expert-group order, each in one box or slab by slab (every label of a group in
    one slab before the next slab); the map is the most probable label above the threshold, the lowest
    id on a tie (probabilities on a coarse grid: many exact ties, 1.0 included)."""
    rng = np.random.default_rng(0)
    probabilities = rng.integers(0, 5, size=(4, 9, 8, 7)).astype(np.float32) / 4
    reference = nib.Nifti1Image(np.zeros((9, 8, 7), np.float32), np.eye(4))
    assembler = _Assembler(reference, ["a", "b", "c", "d"], threshold=0.5, keep_probabilities=False)
    groups = [order[:2], order[2:]]  # two groups of two labels
    for group in groups:
        for rows in slabs:
            for index in group:
                box = (rows, slice(0, 8), slice(2, 7))
                assembler.add(index, probabilities[index][box], box)
    inside = np.zeros_like(probabilities, dtype=bool)
    inside[:, 1:, :, 2:] = probabilities[:, 1:, :, 2:] > 0.5
    scores = np.where(inside, probabilities, -1)
    expected = np.where(inside.any(axis=0), np.argmax(scores, axis=0) + 1, 0)  # argmax: the first maximum
    assert np.array_equal(assembler.segmentation, expected)
    for index, label in enumerate("abcd"):
        assert np.array_equal(np.asarray(assembler.masks[label].dataobj), inside[index])


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16])
def test_the_map_ignores_nan_and_keeps_every_id_of_its_dtype(dtype):
    """NaN probabilities are never above the threshold nor the best; ids up to the map's dtype (uint16
    from 256 labels) are written whole."""
    n = 2 if dtype == np.uint8 else 300
    labels = [f"l{i}" for i in range(n)]
    reference = nib.Nifti1Image(np.zeros((4, 3, 2), np.float32), np.eye(4))
    assembler = _Assembler(reference, labels, threshold=0.5, keep_probabilities=False)
    assert assembler.segmentation.dtype == dtype
    first = np.full((4, 3, 2), 0.7, np.float32)
    first[0] = np.nan
    last = np.full((4, 3, 2), np.nan, np.float32)
    last[1:3] = 0.9
    box = (slice(0, 4), slice(0, 3), slice(0, 2))
    assembler.add(0, first, box)
    assembler.add(n - 1, last, box)
    expected = np.array([0, n, n, 1])[:, None, None] * np.ones((4, 3, 2), int)
    assert np.array_equal(assembler.segmentation, expected)
    assert not np.isnan(assembler.best).any() and assembler.best[3].max() == np.float32(0.7)
    assert np.array_equal(np.asarray(assembler.mask("l0").dataobj)[:, 0, 0], [0, 1, 1, 1])


def test_multilabel_map_takes_the_most_probable_label_with_ids_in_prompt_order():
    image = box_image()
    affine = GEOMETRIES["ras"][0]
    box = np.zeros(image.shape, dtype=bool)
    box[BOX] = True
    core = tuple(slice(s.start + 3, s.stop - 3) for s in BOX)
    for labels in (["object", "wide"], ["wide", "object"]):
        result = fake_predictor().predict(image, labels, "ct", affine=affine, return_probabilities=True)
        seg = np.asarray(result.segmentation.dataobj)
        assert result.label_ids == {1: labels[0], 2: labels[1]}
        assert np.all(seg[core] == labels.index("object") + 1)  # both masks cover the box: the surer one wins
        assert np.all(seg[~box][:100] == labels.index("wide") + 1)
        wide = np.asarray(result.masks["wide"].dataobj)
        assert wide[core].all(), "masks keep overlaps; only the multilabel map picks one label"
        probs = np.asarray(result.probabilities["object"].dataobj)
        assert probs.dtype == np.float32 and probs.shape == image.shape


def test_windows_respect_the_size_divisor_and_a_small_image_is_padded():
    predictor = fake_predictor(window=(10, 12, 5))
    assert predictor.window == (16, 16, 8)
    image = box_image((12, 10, 3))
    image[4:8, 3:7, 1:2] = 800.0
    result = predictor.predict(image, ["object"], "ct", affine=np.diag([1.0, 1.0, 3.0, 1.0]))
    mask = np.asarray(result.masks["object"].dataobj)
    assert mask.shape == (12, 10, 3)
    assert mask[5:7, 4:6, 1].all() and not mask[:, :, 0].any() and not mask[:2].any()


def mri_box(shape=(12, 10, 3)) -> np.ndarray:
    """Zero background, a box of 300 with a brighter core: after SAT's crop the box fills the array."""
    image = np.zeros(shape, np.float32)
    image[2:-2, 2:-2, :] = 300.0
    image[4:-4, 4:-4, 1] = 600.0
    return image


def test_windows_past_the_image_see_its_background_not_zero():
    predictor = fake_predictor(window=(16, 16, 8), edge_padding=0)
    _, array, info = predictor.preprocess_input(mri_box(), "mri", np.diag([1.0, 1.0, 3.0, 1.0]))
    predictor.predict_preprocessed(array, ["object"], "mri", info=info)
    window = predictor.model.for_expert(None)[0].seen[-1][0, 0].numpy()
    assert window.shape == (16, 16, 8) and info.background == float(array.min()) < 0
    padding = window.size - array.size  # MONAI pads both sides; SAT padded with 0, the mean intensity
    assert np.count_nonzero(window == info.background) == padding + np.count_nonzero(array == info.background)
    sat = fake_predictor(window=(16, 16, 8), background_padding=False)
    sat.predict_preprocessed(array, ["object"], "mri", info=info)
    assert np.count_nonzero(sat.model.for_expert(None)[0].seen[-1] == 0) == padding + np.count_nonzero(array == 0)


def test_edge_padding_keeps_the_crop_faces_off_the_window_borders():
    affine = np.diag([1.0, 1.0, 3.0, 1.0])
    image = mri_box((40, 36, 12))
    results = {}
    for pad in (0, 3):
        predictor = fake_predictor(window=(16, 16, 8), edge_padding=pad)
        _, array, info = predictor.preprocess_input(image, "mri", affine)
        results[pad] = predictor.predict(image, "object", "mri", affine=affine, return_probabilities=True)
        net = predictor.model.for_expert(None)[0]
        first = net.seen[0][0, 0].numpy()  # the window at the array's low corner
        padded = np.pad(array[0], pad, constant_values=info.background)  # pad 3: 3 faces of background
        assert np.array_equal(first, padded[:16, :16, :8]) and np.array_equal(padded.shape, np.add(info.shape, 2 * pad))
    probs = [np.asarray(results[pad].probabilities["object"].dataobj) for pad in (0, 3)]
    assert np.allclose(probs[0], probs[1], atol=1e-6)  # a voxel-wise network: padding changes nothing else
    with pytest.raises(ValueError, match="edge_padding"):
        fake_predictor(edge_padding=-1)


def two_bodies() -> tuple[np.ndarray, np.ndarray]:
    """Zero background with two bright boxes: after SAT's crop, background lies between them."""
    image = np.zeros((40, 36, 20), np.float32)
    image[5:15, 5:15, 5:10] = 800.0
    image[25:35, 20:30, 10:15] = 400.0
    return image, np.diag([1.0, 1.0, 3.0, 1.0])  # already the 1x1x3 grid: no resampling


def test_masks_stay_inside_the_body_unless_body_mask_is_off():
    image, affine = two_bodies()
    body = image > 0
    crop = np.zeros_like(body)
    crop[5:35, 5:30, 5:15] = True  # the foreground box SAT crops to
    masks = {
        options: np.asarray(fake_predictor(**dict(options)).predict(image, "everywhere", "mri", affine=affine)
                            .masks["everywhere"].dataobj).astype(bool)
        for options in ((("edge_padding", 0),), (("body_margin_mm", 0.0),), (("body_mask", False),))
    }  # fmt: skip
    assert np.array_equal(masks[(("body_margin_mm", 0.0),)], body)
    grown = np.zeros_like(body)  # the default 5 mm: 5 voxels in x and y, 2 slices of 3 mm in z
    grown[0:20, 0:20, 3:12] = grown[20:40, 15:35, 8:17] = True
    assert np.array_equal(masks[(("edge_padding", 0),)], grown & crop)
    assert np.array_equal(masks[(("body_mask", False),)], crop)  # SAT: the whole crop, background too
    with pytest.raises(ValueError, match="body_margin_mm"):
        fake_predictor(body_margin_mm=-1)


def test_unknown_prompt_names_the_closest_known_prompts():
    with pytest.raises(UnknownLabelError, match="closest known prompts: object"):
        fake_predictor().predict(box_image(), ["objekt"], "ct", affine=np.eye(4))


def test_bad_arguments_fail_clearly():
    with pytest.raises(ValueError, match="duplicate labels"):
        fake_predictor().predict(box_image(), ["object", "Object"], "ct", affine=np.eye(4))
    with pytest.raises(ValueError, match="needs its affine"):
        fake_predictor().predict(box_image(), ["object"], "ct")
    with pytest.raises(ValueError, match="threshold"):
        fake_predictor(threshold=1.5)
    with pytest.raises(ValueError, match="fallback"):
        fake_predictor(fallback="nearest")


def test_windows_per_forward_follow_the_window_size_on_the_cpu(caplog):
    small = fake_predictor()  # 16x16x8 windows: two per forward (one takes a slow conv path)
    assert small.sw_batch_size == 2
    large = fake_predictor(window=(128, 64, 64))  # 2**19 voxels: one per forward, half the memory
    assert large.sw_batch_size == 1
    image = np.random.default_rng(0).normal(size=(1, 192, 64, 64)).astype(np.float32)
    large.predict_preprocessed(image, ["object"], "ct")
    assert [w.shape[0] for w in large.model.net.seen] == [1, 1]
    assert fake_predictor(window=(128, 64, 64), sw_batch_size=3).sw_batch_size == 3
    with caplog.at_level("WARNING"):
        assert fake_predictor(sw_batch_size=1).sw_batch_size == 2
    assert any("slow for 16x16x8 windows" in r.getMessage() for r in caplog.records)
    with pytest.raises(ValueError, match="sw_batch_size must be >= 1"):
        fake_predictor(sw_batch_size=0)


def test_count_windows_matches_monai():
    from monai.data.utils import dense_patch_slices

    for shape, window in [
        ((100, 120, 40), (64, 64, 32)),
        ((64, 64, 32), (64, 64, 32)),
        ((20, 300, 7), (32, 32, 16)),
    ]:
        padded = [max(s, w) for s, w in zip(shape, window)]
        interval = [w if p == w else max(int(w * 0.5), 1) for p, w in zip(padded, window)]
        expected = len(dense_patch_slices(padded, window, interval))
        assert sliding_window.count_windows(shape, window, 0.5) == expected


# ---- a real LoRKD checkpoint (2 training steps; demo student with 8 region experts) ----------------------


@pytest.fixture(scope="module")
def lorkd(tiny_lorkd_ckpt) -> Predictor:
    return Predictor.from_checkpoint(tiny_lorkd_ckpt, device="cpu")


def ct_volume(shape=(40, 30, 12), seed=0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    image = rng.normal(100.0, 40.0, shape).astype(np.float32).clip(1, None)
    image[8:30, 6:24, 3:10] += 300.0
    return image, np.diag([1.0, 1.0, 3.0, 1.0])


@pytest.fixture
def routed(monkeypatch) -> list[list[int]]:
    """Expert indices of every routed forward (records calls to lorkd.experts.route)."""
    calls: list[list[int]] = []
    real = sliding_window.route

    def spy(model, region_index, per_sample_weights=None):
        calls.append(region_index.tolist())
        return real(model, region_index, per_sample_weights)

    monkeypatch.setattr(sliding_window, "route", spy)
    return calls


def test_a_label_does_not_depend_on_other_prompts_their_order_or_chunking(lorkd):
    image, affine = ct_volume()
    alone = lorkd.predict(image, ["liver"], "ct", affine=affine, return_probabilities=True)
    reference = np.asarray(alone.probabilities["liver"].dataobj)
    runs = [
        (["liver", "spleen", "aorta"], 16),
        (["aorta", "spleen", "liver"], 16),
        (["spleen", "liver", "aorta"], 1),
        (["aorta", "liver", "spleen"], 2),
    ]
    for labels, max_queries in runs:
        lorkd.max_queries = max_queries
        try:
            result = lorkd.predict(image, labels, "ct", affine=affine, return_probabilities=True)
        finally:
            lorkd.max_queries = 16
        probs = np.asarray(result.probabilities["liver"].dataobj)
        np.testing.assert_allclose(probs, reference, atol=1e-5)
        sure = np.abs(reference - lorkd.threshold) > 1e-4
        assert np.array_equal(
            np.asarray(result.masks["liver"].dataobj)[sure], np.asarray(alone.masks["liver"].dataobj)[sure]
        )


def test_mapping_labels_back_in_chunks_of_any_size_gives_identical_outputs(monkeypatch):
    """Labels go back to the input grid a few at a time (bounding peak memory): bit-identical to all at once."""
    from lorkd.inference import predictor as predictor_module

    predictor = fake_predictor()
    image, affine = box_image(), np.diag([0.8, 0.9, 2.5, 1.0])
    labels = ["object", "wide", "everywhere"]
    results = []
    for budget in (1, 2**40):  # one label per chunk; every label in one chunk
        monkeypatch.setattr(predictor_module, "_INVERT_BYTES", budget)
        results.append(predictor.predict(image, labels, "ct", affine=affine, return_probabilities=True))
    one, together = results
    for label in labels:
        assert np.array_equal(one.probabilities[label].get_fdata(), together.probabilities[label].get_fdata())
        assert np.array_equal(np.asarray(one.masks[label].dataobj), np.asarray(together.masks[label].dataobj))
    assert np.array_equal(np.asarray(one.segmentation.dataobj), np.asarray(together.segmentation.dataobj))
    assert np.asarray(together.masks["object"].dataobj).any()  # the comparison is not between empty masks


@pytest.mark.parametrize("slab", [50, 1 << 22])  # slabs of a few rows each; one slab
@pytest.mark.parametrize("budget", [1, 2**40])  # one label per sampling; labels grouped as their boxes allow
@pytest.mark.parametrize("name", sorted(GEOMETRIES))
def test_masks_mapped_back_only_where_a_label_can_pass_the_threshold_equal_the_whole_mapping(name, budget, slab, monkeypatch):
    """Without kept probabilities each label goes back to the input grid only in the box where it can
    pass the threshold, slab by slab: masks and the multilabel map are bit-identical to mapping every
    voxel back."""
    from lorkd.data import grid
    from lorkd.inference import predictor as predictor_module

    monkeypatch.setattr(predictor_module, "_INVERT_CROP_BYTES", budget)
    monkeypatch.setattr(grid, "SLAB_VOXELS", slab)
    predictor = fake_predictor()
    affine = GEOMETRIES[name][0]
    image = box_image((44, 40, 22))
    image[:3], image[:, -2:] = 0.0, 0.0  # zero faces: a foreground crop to undo as well
    segment_at_half_intensity(predictor, image, affine)
    labels = ["object", "wide", "everywhere", "nothing"]
    boxed = predictor.predict(image, labels, "ct", affine=affine)
    whole = predictor.predict(image, labels, "ct", affine=affine, return_probabilities=True)
    assert boxed.probabilities is None
    for label in labels:
        assert np.array_equal(np.asarray(boxed.masks[label].dataobj), np.asarray(whole.masks[label].dataobj)), label
    assert np.array_equal(np.asarray(boxed.segmentation.dataobj), np.asarray(whole.segmentation.dataobj))
    masks = {label: np.asarray(whole.masks[label].dataobj) for label in labels}
    assert masks["object"].any() and masks["everywhere"].any() and not masks["nothing"].any()
    assert not masks["everywhere"].all()  # the crop's zeros: part of the grid is outside every mask


@pytest.mark.parametrize("edge_padding", [0, 3])
def test_masks_alone_blend_into_the_grid_before_the_crop_with_the_same_outputs(edge_padding):
    """Masks alone: each group's probabilities are blended into a zero buffer of the grid before the crop
    (padded ones copied there); masks and map equal those of the path that keeps probabilities."""
    predictor = fake_predictor(edge_padding=edge_padding)
    affine = GEOMETRIES["ras"][0]
    image = box_image((44, 40, 22))
    image[:4] = 0.0  # a crop to undo
    segment_at_half_intensity(predictor, image, affine)
    labels = ["object", "wide"]
    boxed = predictor.predict(image, labels, "ct", affine=affine)
    whole = predictor.predict(image, labels, "ct", affine=affine, return_probabilities=True)
    for label in labels:
        assert np.array_equal(np.asarray(boxed.masks[label].dataobj), np.asarray(whole.masks[label].dataobj)), label
    assert np.array_equal(np.asarray(boxed.segmentation.dataobj), np.asarray(whole.segmentation.dataobj))
    assert np.asarray(boxed.masks["object"].dataobj).any()


def test_one_large_window_per_forward_gives_two_per_forwards_probabilities_within_rounding(tiny_lorkd_ckpt):
    single = Predictor.from_checkpoint(tiny_lorkd_ckpt, device="cpu", window=(128, 128, 32))  # 2**19 voxels
    double = Predictor.from_checkpoint(tiny_lorkd_ckpt, device="cpu", window=(128, 128, 32), sw_batch_size=2)
    assert (single.sw_batch_size, double.sw_batch_size) == (1, 2)
    image = np.random.default_rng(3).normal(size=(1, 192, 128, 32)).astype(np.float32)  # two windows
    one, two = (p.predict_preprocessed(image, ["liver", "spleen"], "ct", region="abdomen") for p in (single, double))
    np.testing.assert_allclose(one, two, rtol=0, atol=1e-5)  # another conv kernel: float32 rounding apart


def test_multi_region_prompts_run_each_expert_on_its_own_labels(lorkd, routed):
    image, affine = ct_volume()
    experts = lorkd.model.experts
    result = lorkd.predict(image, ["liver", "left lung", "spleen", "heart"], "ct", affine=affine)
    assert result.routes == {
        "liver": "abdomen",
        "left lung": "thorax",
        "spleen": "abdomen",
        "heart": "thorax",
    }
    ran = {i for call in routed for i in call}
    assert ran == {experts.index("abdomen"), experts.index("thorax")}
    assert all(len(set(call)) == 1 for call in routed), "a window batch runs one expert"


def test_a_forced_region_sends_every_label_to_that_expert(lorkd, routed):
    image, affine = ct_volume()
    result = lorkd.predict(image, ["liver", "left lung"], "ct", affine=affine, region="thorax")
    assert set(result.routes.values()) == {"thorax"}
    assert {i for call in routed for i in call} == {lorkd.model.experts.index("thorax")}


def test_unknown_labels_and_regions_without_experts_are_clear_errors(lorkd):
    with pytest.raises(
        UnknownLabelError, match=r"unknown label 'livr'.*closest known labels: liver.*fallback=base"
    ):
        lorkd.check(["livr"], "ct")
    with pytest.raises(ValueError, match=r"'bone'.*region 'whole_body', which has no expert"):
        lorkd.check(["bone"], "ct")
    with pytest.raises(ValueError, match="region 'chest' has no expert"):
        lorkd.check(["liver"], "ct", region="chest")


def test_every_unknown_label_of_a_case_is_reported_with_its_closest_names(lorkd):
    with pytest.raises(UnknownLabelError) as caught:
        lorkd.check(["livr", "liver", "bone", "spleeen"], "ct")
    message = str(caught.value)
    assert "unknown label 'livr' for modality 'ct' (closest known labels: liver" in message
    assert "unknown label 'spleeen' for modality 'ct' (closest known labels: spleen" in message
    assert "label 'bone' (ct) belongs to region 'whole_body', which has no expert" in message


def test_fallback_warns_once_for_each_label_not_in_the_catalogue(tiny_lorkd_ckpt, caplog):
    predictor = Predictor.from_checkpoint(tiny_lorkd_ckpt, device="cpu", fallback="base")
    with caplog.at_level("WARNING", logger="lorkd.inference.predictor"):
        for _ in range(2):  # two cases: one warning per label
            groups = predictor.plan(["livr", "liver", "bone", "spleeen"], "ct")
    assert {g.route for g in groups} == {"base", "abdomen"}
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 2, warnings  # 'bone' is in the catalogue (a region without expert): no warning
    assert "label 'livr' for modality 'ct' (closest known labels: liver" in warnings[0]
    assert "routing.fallback=base" in warnings[0] and "'spleeen'" in warnings[1]


def test_fallback_base_runs_the_shared_weights(tiny_lorkd_ckpt, routed):
    predictor = Predictor.from_checkpoint(tiny_lorkd_ckpt, device="cpu", fallback="base")
    image, affine = ct_volume(shape=(20, 18, 4))
    result = predictor.predict(image, ["liver", "bone"], "ct", affine=affine)
    assert result.routes == {"liver": "abdomen", "bone": "base"}
    assert {i for call in routed for i in call} == {predictor.model.experts.index("abdomen"), -1}
    assert result.masks["bone"].shape == image.shape  # smaller than the 32x32x16 window: padded, cropped back


def test_fallback_teacher_segments_labels_without_expert_with_the_teacher(tiny_lorkd_ckpt):
    predictor = Predictor.from_checkpoint(tiny_lorkd_ckpt, device="cpu", fallback="teacher")
    image, affine = ct_volume(shape=(20, 18, 4))
    result = predictor.predict(image, ["spleen", "bone"], "ct", affine=affine)
    assert result.routes == {"spleen": "abdomen", "bone": "teacher"}


def test_teacher_checkpoint_runs_all_labels_itself(tiny_teacher_ckpt):
    predictor = Predictor.from_checkpoint(tiny_teacher_ckpt, device="cpu")
    image, affine = ct_volume(shape=(20, 18, 4))
    result = predictor.predict(image, ["liver", "white matter"], "mri", affine=affine)
    assert set(result.routes.values()) == {"model"}


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_gpu_with_amp_matches_the_cpu(tiny_lorkd_ckpt):
    image, affine = ct_volume()
    cpu = Predictor.from_checkpoint(tiny_lorkd_ckpt, device="cpu")
    gpu = Predictor.from_checkpoint(tiny_lorkd_ckpt, device="cuda")
    assert gpu.amp
    a = cpu.predict(image, ["liver", "left lung"], "ct", affine=affine, return_probabilities=True)
    b = gpu.predict(image, ["liver", "left lung"], "ct", affine=affine, return_probabilities=True)
    for label in ("liver", "left lung"):
        pa, pb = (np.asarray(r.probabilities[label].dataobj) for r in (a, b))
        assert np.abs(pa - pb).max() < 0.05
