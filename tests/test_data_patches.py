"""Training patches: SAT's query choice, query_mask, crops, region items, augmentation, case loaders."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch

from lorkd.data.batch import finish_batch, unpack_bits
from lorkd.data.cache import PreprocessCache
from lorkd.data.datasets import (
    CaseDataset,
    PatchDataset,
    ValidationPatches,
    collate_case,
    collate_patches,
    expand_items,
)
from lorkd.data.manifest import Case
from lorkd.data.patches import crop_padded, crop_start, select_queries
from lorkd.data.transforms import PreprocessConfig

RAW = PreprocessConfig(orientation=None, spacing=None, crop_foreground=False)
LABELS = ["liver", "spleen", "pancreas", "aorta"]  # all abdomen in sat49


def rng(seed=0):
    return np.random.default_rng(seed)


def masks(sample):
    """A sample's (n, X, Y, Z) float32 masks, unpacked from its mask bits as the device does it."""
    return unpack_bits(sample["mask_bits"][None], len(sample["labels"]))[0]


@pytest.mark.parametrize(
    ("present", "max_queries", "positives", "n_negatives"),
    [
        ([True, False, True, False, False, False], 8, [0, 2], 1),  # int(0.5 * 2) = 1 negative
        ([False, True, False, False], 8, [1], 0),  # int(0.5 * 1) = 0
        ([True, True, True, False, False, False], 4, [0, 1, 2], 1),  # capped by max_queries - 3
        ([True] * 6 + [False] * 4, 6, None, 0),  # as many positives as max_queries: no negative
    ],
)
def test_select_queries_positives_first_then_half_as_many_negatives(
    present, max_queries, positives, n_negatives
):
    for seed in range(5):
        chosen = select_queries(present, max_queries, rng(seed))
        n_pos = sum(present) if positives is None else len(positives)
        assert len(chosen) == n_pos + n_negatives <= max_queries
        if positives is not None:
            assert chosen[: len(positives)] == positives
        assert all(not present[i] for i in chosen[n_pos:]) and len(set(chosen)) == len(chosen)


def test_select_queries_many_positives_and_none():
    chosen = select_queries([True] * 20, 8, rng())
    assert len(chosen) == 8 == len(set(chosen))
    none = select_queries([False] * 10, 4, rng())
    assert len(none) == 4 == len(set(none))
    assert len(select_queries([False] * 3, 8, rng())) == 3


def test_crop_start_and_padding():
    assert crop_start((100, 50, 10), (20, 20, 20), rng(), center=(5, 45, 5)) == (0, 30, 0)
    assert crop_start((100, 50, 10), (20, 20, 20), rng(), center=(50, 25, 5)) == (40, 15, 0)
    array = np.arange(2 * 4 * 4 * 3).reshape(2, 4, 4, 3)
    out = crop_padded(array, (2, 0, 0), (4, 4, 4))
    assert (
        out.shape == (2, 4, 4, 4)
        and np.array_equal(out[:, :2, :, :3], array[:, 2:])
        and out[:, 2:].sum() == 0
    )
    filled = crop_padded(array.astype(np.float32), (2, 0, 0), (4, 4, 4), fill=-1.5)
    assert np.array_equal(filled[:, :2, :, :3], array[:, 2:]) and np.all(filled[:, 2:] == -1.5)


@pytest.fixture
def known_case(tmp_path, write_nifti):
    """64^3 volume: liver and spleen blobs next to each other at the centre, aorta in a far corner,
    pancreas listed but absent from the mask."""
    image = np.random.default_rng(0).normal(100, 20, (64, 64, 64)).astype(np.float32)
    labels = np.zeros(image.shape, np.uint8)
    labels[28:32, 28:32, 28:32] = 1  # liver: 64 voxels
    labels[33:36, 30:33, 30:33] = 2  # spleen: 27 voxels
    labels[0:3, 60:64, 60:64] = 4  # aorta, far away
    img, seg = write_nifti("img.nii.gz", image), write_nifti("seg.nii.gz", labels)
    return Case(img, LABELS, "ct", "Known", seg, None, "known", None, None, 1, tmp_path / "m.jsonl")


def patches(case, region_map, tmp_path, **kw):
    args = dict(
        patch_size=(16, 16, 16), max_queries=8, label_centered_prob=1.0, augment=False, region_map=region_map
    )
    return PatchDataset([case], PreprocessCache(tmp_path / "cache"), RAW, **{**args, **kw})


def test_query_selection_and_query_mask_on_a_known_case(known_case, region_map, tmp_path):
    ds = patches(known_case, region_map, tmp_path)
    assert len(ds) == 1 and ds.items[0].labels == tuple(LABELS) and ds.items[0].region == 0
    kinds = set()
    for seed in range(20):
        s = ds[(0, seed)]
        assert s["image"].shape == (1, 16, 16, 16) and s["image"].dtype == torch.float32
        assert s["mask_bits"].shape == (1, 16, 16, 16) and s["mask_bits"].dtype == torch.uint8
        assert masks(s).shape == (len(s["labels"]), 16, 16, 16) and masks(s).dtype == torch.float32
        assert (s["region"], s["dataset"], s["case_id"], s["modality"]) == (0, "Known", "known", "ct")
        sums = [int(m.sum()) for m in masks(s)]
        if s["labels"][0] == "aorta":  # centred on the corner blob: 1 positive, int(0.5 * 1) = 0 negatives
            assert s["labels"] == ["aorta"] and sums == [48]
        else:  # centred on liver or spleen: both whole in the crop, then 1 negative (absent or far)
            assert s["labels"][:2] == ["liver", "spleen"] and s["labels"][2] in ("pancreas", "aorta")
            assert sums == [64, 27, 0]
        kinds.add(s["labels"][0])
    assert kinds == {"aorta", "liver"}

    three = next(ds[(0, k)] for k in range(20) if len(ds[(0, k)]["labels"]) == 3)
    small = patches(known_case, region_map, tmp_path, max_queries=1)[(0, 3)]
    assert len(small["labels"]) == 1
    batch = finish_batch(collate_patches([three, small]))
    assert batch["image"].shape == (2, 1, 16, 16, 16) and batch["masks"].shape == (2, 3, 16, 16, 16)
    assert batch["query_mask"].tolist() == [[True, True, True], [True, False, False]]
    assert batch["masks"][1, 1:].sum() == 0 and batch["labels"][1] == small["labels"]
    assert batch["region"].dtype == torch.long and batch["region"].tolist() == [0, 0]
    assert batch["case_id"] == ["known", "known"] and batch["dataset"] == ["Known", "Known"]


def test_patches_are_deterministic_per_key_and_image_matches_the_volume(known_case, region_map, tmp_path):
    ds = patches(known_case, region_map, tmp_path, label_centered_prob=0.5, augment=True)
    a, b = ds[(0, 123)], ds[(0, 123)]
    assert torch.equal(a["image"], b["image"]) and torch.equal(a["mask_bits"], b["mask_bits"])
    assert torch.equal(ds[0]["image"], ds[0]["image"])  # plain index: depends on (seed, index)
    plain = patches(known_case, region_map, tmp_path, label_centered_prob=0.0)
    volume = np.asarray(plain.load(0).data.image[0])
    window = plain[(0, 5)]["image"][0].numpy()  # no augmentation: a window of the volume
    hits = np.argwhere(np.isclose(volume, window[0, 0, 0]))
    assert any(np.array_equal(volume[x : x + 16, y : y + 16, z : z + 16], window) for x, y, z in hits)


def test_small_volumes_are_padded_with_their_background(tmp_path, write_nifti, region_map):
    image = np.full((10, 12, 6), 5.0, np.float32)
    image[2:8, 2:8, 1:5] = 50.0
    labels = np.zeros(image.shape, np.uint8)
    labels[2:8, 2:8, 1:5] = 1
    case = Case(
        write_nifti("i.nii.gz", image), ["liver"], "ct", "D", write_nifti("s.nii.gz", labels), None, "s", None, None,
        1, tmp_path,
    )  # fmt: skip
    ds = patches(case, region_map, tmp_path)
    s, background = ds[(0, 0)], ds.load(0).data.info.background  # -500 HU normalised; 0 is the mean
    assert background < float(s["image"][0, :10, :12, :6].min())
    assert s["image"].shape == (1, 16, 16, 16) and bool((s["image"][0, 10:] == background).all())
    assert masks(s)[0].sum() == 6 * 6 * 4 and masks(s)[0, 10:].sum() == 0


def test_zoom_keeps_the_patch_size_and_masks_binary(known_case, region_map, tmp_path):
    augment = {"zoom_prob": 1.0, "noise_prob": 1.0, "sharpen_prob": 1.0, "contrast_prob": 1.0}
    ds = patches(known_case, region_map, tmp_path, augment=augment)
    for seed in range(4):
        s = ds[(0, seed)]
        assert s["image"].shape == (1, 16, 16, 16) and s["mask_bits"].shape[1:] == (16, 16, 16)
        assert type(s["image"]) is torch.Tensor and set(masks(s).unique().tolist()) <= {0.0, 1.0}
    with pytest.raises(ValueError, match="unknown augment key"):
        patches(known_case, region_map, tmp_path, augment={"zoom": 1.0})


def test_flips_mirror_image_and_masks_together_along_the_chosen_axes(known_case, region_map, tmp_path):
    only_flips = {k: 0.0 for k in ("zoom_prob", "noise_prob", "sharpen_prob", "scale_intensity_prob",
                                   "contrast_inverted_prob", "contrast_prob")}  # fmt: skip
    plain = patches(known_case, region_map, tmp_path, augment={**only_flips, "flip_prob": 0.0, "flip_axes": [1, 2]})
    flipped = patches(known_case, region_map, tmp_path, augment={**only_flips, "flip_prob": 1.0, "flip_axes": [1, 2]})
    for seed in range(3):
        a, b = plain[(0, seed)], flipped[(0, seed)]  # same crop and queries: only the flips differ
        assert a["labels"] == b["labels"]
        assert torch.equal(b["image"], a["image"].flip(2, 3)) and torch.equal(masks(b), masks(a).flip(2, 3))
        assert not torch.equal(b["image"], a["image"])
    with pytest.raises(ValueError, match="flip_axes"):
        patches(known_case, region_map, tmp_path, augment={"flip_axes": [3]})


def test_multi_region_cases_become_one_item_per_region(tmp_path, region_map, caplog):
    def case(labels, region=None, modality="ct"):
        return Case(
            tmp_path / "x.nii.gz", labels, modality, "Multi", None, None, "m", region, None, 1, tmp_path
        )

    with caplog.at_level(logging.WARNING):
        items = expand_items(
            [case(["left lung", "liver", "bone", "aorta"]), case(["liver", "bone"], "pelvis")], region_map
        )
    assert [(i.case_index, i.region_name, i.labels, i.label_indices) for i in items] == [
        (0, "abdomen", ("liver", "aorta"), (1, 3)),
        (0, "thorax", ("left lung",), (0,)),
        (1, "pelvis", ("liver", "bone"), (0, 1)),
    ]
    assert items[0].group == "Multi_abdomen" and items[1].region == region_map.region_index("thorax")
    assert "'ct_bone' has no expert region; dropped from training in 1 case(s)" in caplog.text


def test_validation_patches_are_fixed(known_case, region_map, tmp_path):
    make = lambda: ValidationPatches(patches(known_case, region_map, tmp_path), patches_per_item=3, seed=7)  # noqa: E731
    first, second = make(), make()
    assert len(first) == 3
    for i in range(3):
        assert (
            torch.equal(first[i]["image"], second[i]["image"]) and first[i]["labels"] == second[i]["labels"]
        )
    with pytest.raises(ValueError, match="augment=False"):
        ValidationPatches(patches(known_case, region_map, tmp_path, augment=True))


def test_case_dataset_yields_cases_one_at_a_time(known_case):
    loader = torch.utils.data.DataLoader(CaseDataset([known_case]), batch_size=1, collate_fn=collate_case)
    (item,) = list(loader)
    assert item["index"] == 0 and item["case"] is known_case
