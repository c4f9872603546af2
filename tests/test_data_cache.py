"""Preprocessing cache: keys, reuse, and two processes filling it at once."""

from __future__ import annotations

import multiprocessing as mp
import os
from pathlib import Path

import numpy as np
import pytest

import lorkd.data.cache as cache_module
from lorkd.data.cache import LabelMapMasks, PreprocessCache
from lorkd.data.manifest import Case
from lorkd.data.transforms import PreprocessConfig, preprocess_case


@pytest.fixture
def cases(tmp_path, write_nifti):
    out = []
    for i in range(3):
        rng = np.random.default_rng(i)
        image = rng.normal(40, 30, (40, 36, 16)).astype(np.float32)
        labels = np.zeros(image.shape, np.uint8)
        labels[5 + i : 20, 6:18, 3:9] = 1
        labels[22:30, 20:30, 8:12] = 2
        affine = np.diag([0.9, 0.9, 2.5, 1.0])
        img = write_nifti(f"img{i}.nii.gz", image, affine)
        seg = write_nifti(f"seg{i}.nii.gz", labels, affine)
        out.append(
            Case(
                img, ["liver", "spleen", "aorta"], "ct", "D", seg, None, f"c{i}", None, None, i + 1, tmp_path
            )
        )
    return out


def assert_same(entry, direct):
    assert np.array_equal(np.asarray(entry.data.image), direct.image)
    assert np.array_equal(np.asarray(entry.data.masks), direct.masks)
    assert entry.data.info == direct.info and entry.data.labels == direct.labels


def test_entry_is_reused_and_equals_direct_preprocessing(tmp_path, cases, monkeypatch):
    cache = PreprocessCache(tmp_path / "cache")
    cfg = PreprocessConfig()
    first = cache.get(cases[0], cfg)
    assert isinstance(first.data.image, np.memmap)
    assert_same(first, preprocess_case(cases[0], cfg))
    assert first.index.boxes[2] is None and len(first.index.voxels[2]) == 0  # aorta absent
    assert first.index.boxes[0] is not None and len(first.index.voxels[0]) > 0

    def fail(*args, **kwargs):
        raise AssertionError("cache hit expected")

    monkeypatch.setattr(cache_module, "preprocess_case", fail)
    again = PreprocessCache(tmp_path / "cache").get(cases[0], cfg)  # a later run
    assert_same(again, preprocess_case(cases[0], cfg))
    assert [e.name for e in (tmp_path / "cache").iterdir()] == [cache.entry_dir(cases[0], cfg).name]


def test_key_depends_on_config_labels_modality_and_source(tmp_path, cases):
    cache = PreprocessCache(tmp_path / "cache")
    case, cfg = cases[0], PreprocessConfig()
    key = cache.key(case, cfg)
    assert cache.key(case, {"spacing": [1.0, 1.0, 3.0]}) == key  # same config, other spelling
    assert cache.key(case, {"spacing": [1.0, 1.0, 2.0]}) != key
    assert cache.key(case, {"crop_margin_mm": 8.0}) != key  # a preprocessing change is a new entry
    assert cache.key(Case(**{**case.__dict__, "labels": ["liver"]}), cfg) != key
    assert cache.key(Case(**{**case.__dict__, "modality": "mri"}), cfg) != key
    assert cache.key(Case(**{**case.__dict__, "orientation": "LPS"}), cfg) != key
    stat = case.image.stat()
    os.utime(case.image, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))  # the source was rewritten
    assert cache.key(case, cfg) != key


def _fill(root: str, cases: list[Case], barrier, results) -> None:
    barrier.wait()  # both processes miss and preprocess at the same time
    cache = PreprocessCache(root)
    for case in cases:
        missed = cache.load(case) is None
        entry = cache.get(case)
        image, masks = np.asarray(entry.data.image), np.asarray(entry.data.masks)
        results.put((case.id, missed, float(image.sum()), int(masks.sum())))


def test_two_processes_filling_the_cache_at_once_leave_it_consistent(tmp_path, cases):
    root = tmp_path / "cache"
    # spawn, never fork: torch's OpenMP pool has run in this process, and forked children deadlock in it
    ctx = mp.get_context("spawn")
    barrier, results = ctx.Barrier(2), ctx.Queue()
    procs = [
        ctx.Process(target=_fill, args=(str(root), cases, barrier, results), daemon=True) for _ in range(2)
    ]
    try:
        for p in procs:
            p.start()
        seen = [results.get(timeout=180) for _ in range(2 * len(cases))]
        for p in procs:
            p.join(timeout=60)
        assert [p.exitcode for p in procs] == [0, 0]
    finally:  # a hung child must not be joined again at interpreter exit
        for p in procs:
            if p.is_alive():
                p.kill()
    both_missed = [c.id for c in cases if sum(missed for cid, missed, *_ in seen if cid == c.id) == 2]
    assert both_missed, "no entry was written by both processes: the race was not exercised"

    entries = sorted(p.name for p in root.iterdir())
    assert not [n for n in entries if n.startswith(".tmp")], entries
    cache = PreprocessCache(root)
    assert entries == sorted(cache.entry_dir(c).name for c in cases)
    for case in cases:
        entry = cache.load(case)
        assert entry is not None
        direct = preprocess_case(case)
        assert_same(entry, direct)
        sums = {(s, m) for cid, _, s, m in seen if cid == case.id}
        assert sums == {(float(direct.image.sum()), int(direct.masks.sum()))}  # both saw the same data


def test_unreadable_entry_is_rebuilt(tmp_path, cases):
    cache = PreprocessCache(tmp_path / "cache")
    entry_dir = cache.entry_dir(cases[1])
    cache.get(cases[1])
    (entry_dir / "image.npy").write_bytes(b"truncated")
    assert cache.load(cases[1]) is None
    assert_same(cache.get(cases[1]), preprocess_case(cases[1]))
    assert Path(entry_dir).is_dir()


def test_masks_are_stored_as_a_label_map_unless_labels_overlap(tmp_path, cases, write_nifti):
    cache = PreprocessCache(tmp_path / "cache")
    entry = cache.get(cases[0])
    assert (
        isinstance(entry.data.masks, LabelMapMasks) and (cache.entry_dir(cases[0]) / "labelmap.npy").is_file()
    )
    dense = preprocess_case(cases[0]).masks
    assert entry.data.masks.shape == dense.shape and np.array_equal(np.asarray(entry.data.masks), dense)
    assert np.array_equal(entry.data.masks[1:3, 4:20, :7, 2], dense[1:3, 4:20, :7, 2])
    assert np.array_equal(entry.data.masks[0], dense[0])

    region = np.zeros((40, 36, 16), np.uint8)
    region[5:20, 6:18, 3:9] = 1
    inner = region.copy()
    inner[8:12, 8:12, 4:6] = 0
    tumour = region - inner
    affine = np.diag([0.9, 0.9, 2.5, 1.0])  # the image's: masks lie on their image
    paths = {
        "liver": write_nifti("liver.nii.gz", region, affine),
        "liver tumor": write_nifti("tumour.nii.gz", tumour, affine),
    }
    overlapping = Case(
        **{**cases[0].__dict__, "mask": None, "masks": paths, "labels": ["liver", "liver tumor"]}
    )
    entry = cache.get(overlapping)
    assert isinstance(entry.data.masks, np.memmap) and (cache.entry_dir(overlapping) / "masks.npy").is_file()
    assert np.array_equal(entry.data.masks, preprocess_case(overlapping).masks)
    assert entry.data.masks[1].sum() > 0 and (entry.data.masks[0] >= entry.data.masks[1]).all()
