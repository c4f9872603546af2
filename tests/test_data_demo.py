"""Demo data set: byte-identical for a seed, routed to three regions, small enough for CPU training."""

from __future__ import annotations

import hashlib
import importlib.util
import time
from pathlib import Path

import nibabel as nib
import pytest

from lorkd.data.demo import PHANTOMS, build_demo
from lorkd.data.manifest import load_manifest
from lorkd.data.transforms import preprocess_case


def digests(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def test_same_seed_same_bytes(tmp_path):
    a = build_demo(tmp_path / "a", seed=5, real=False, counts=(2, 1, 1))
    build_demo(tmp_path / "b", seed=5, real=False, counts=(2, 1, 1))
    build_demo(tmp_path / "c", seed=6, real=False, counts=(2, 1, 1))
    da, db, dc = (digests(tmp_path / n) for n in "abc")
    assert da == db and len(da) == 3 * 4 * 2 + 4  # images + label maps, 3 manifests, README
    changed = [k for k in da if k.endswith(".nii.gz") and da[k] != dc[k]]
    assert len(changed) == 3 * 4 * 2
    assert [len(a[s]) for s in ("train", "val", "test")] == [6, 3, 3]


def test_phantoms_route_to_their_regions_with_varied_geometry(tmp_path, region_map):
    build_demo(tmp_path, seed=0, real=False, counts=(3, 1, 1))
    cases = load_manifest(tmp_path / "train.jsonl", region_map=region_map)
    expected = {"DemoAbdomenCT": "abdomen", "DemoThoraxCT": "thorax", "DemoBrainMRI": "brain"}
    for case in cases:
        assert {region_map.region_of(label, case.modality) for label in case.labels} == {
            expected[case.dataset]
        }
    codes = {nib.aff2axcodes(nib.load(str(c.image)).affine) for c in cases}
    zooms = {tuple(round(float(z), 2) for z in nib.load(str(c.image)).header.get_zooms()) for c in cases}
    assert {("R", "A", "S"), ("L", "P", "S")} <= codes and {(1.0, 1.0, 3.0), (0.8, 0.8, 2.5)} <= zooms


@pytest.mark.slow
def test_full_build_counts_sizes_and_real_scans(tmp_path, region_map):
    start = time.perf_counter()
    manifests = build_demo(tmp_path, seed=0, real=True)
    assert time.perf_counter() - start < 60
    build_demo(tmp_path / "again", seed=0, real=True)
    first = {k: v for k, v in digests(tmp_path).items() if not k.startswith("again/")}
    assert first == digests(tmp_path / "again")  # real scans included
    for split, minimum in zip(("train", "val", "test"), (8, 2, 4)):
        cases = load_manifest(tmp_path / f"{split}.jsonl", region_map=region_map)
        assert len(cases) == len(manifests[split])
        for spec in PHANTOMS:
            assert sum(c.dataset == spec.dataset for c in cases) >= minimum
    test = load_manifest(tmp_path / "test.jsonl", region_map=region_map)
    real = {c.dataset: c for c in test if c.dataset in ("LiTS", "MNI152")}
    readme = (tmp_path / "README.md").read_text()
    for dataset, package, needle in (
        ("LiTS", "liver_ct_segmentation_package", "assumed 1 mm isotropic"),
        ("MNI152", "nilearn", "MNI152 2009a"),
    ):
        if importlib.util.find_spec(package) is None:
            continue
        assert dataset in real and needle in readme
    for case in test:
        out = preprocess_case(case)
        assert out.masks.reshape(len(case.labels), -1).sum(1).min() > 0, case.id  # every label present
        if case.dataset.startswith("Demo"):
            x, y, z = out.info.shape
            assert 64 <= x <= 112 and 64 <= y <= 112 and 32 <= z <= 48, (case.id, out.info.shape)
