"""Manifests: parsing, normalisation, and problems reported with file and line."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from helpers import compose_config

from lorkd.cli import check_manifest
from lorkd.data.image_reader import CaseError, read_volume
from lorkd.data.manifest import LineDefaults, ManifestError, load_manifest, read_manifest, validate_manifest

GOOD = {"image": "ct/case1.nii.gz", "label": ["liver"], "modality": "ct", "dataset": "D", "mask": "ct/case1_seg.nii.gz"}



def write_manifest(path: Path, rows: list) -> Path:
    lines = [r if isinstance(r, str) else json.dumps(r) for r in rows]
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture
def files(write_nifti):
    """Two images (8x8x4) with label maps, one mask of the wrong shape, one per-label binary mask."""
    vol = np.zeros((8, 8, 4), np.int16)
    return {
        "img1": write_nifti("ct/case1.nii.gz", vol),
        "seg1": write_nifti("ct/case1_seg.nii.gz", vol.astype(np.uint8)),
        "img2": write_nifti("ct/case2.nii", vol),
        "seg2": write_nifti("ct/case2_seg.nii.gz", vol.astype(np.uint8)),
        "bad_shape": write_nifti("ct/bad_seg.nii.gz", np.zeros((8, 8, 5), np.uint8)),
        "liver": write_nifti("ct/case2_liver.nii.gz", vol.astype(np.uint8)),
    }


def test_valid_manifest_resolves_paths_and_normalises(tmp_path, files, region_map):
    path = write_manifest(
        tmp_path / "train.jsonl",
        [
            {"image": "ct/case1.nii.gz", "label": ["Liver ", "SPLEEN"], "modality": "CT", "dataset": "D1",
             "mask": "ct/case1_seg.nii.gz", "patient_id": "ignored"},
            "",
            {"image": str(files["img2"]), "label": ["liver"], "modality": "T2", "dataset": "D1",
             "masks": {"Liver": "ct/case2_liver.nii.gz"}, "id": "custom", "region": "Abdomen", "orientation": "asr"},
        ],
    )  # fmt: skip
    cases = load_manifest(path, region_map=region_map)
    assert [c.id for c in cases] == ["case1", "custom"]
    first, second = cases
    assert first.image == files["img1"].resolve() and first.mask == files["seg1"].resolve()
    assert first.labels == ["liver", "spleen"] and first.modality == "ct" and first.line == 1
    assert first.source == path.resolve() and first.region is None and first.masks is None
    assert second.modality == "mri" and second.masks == {"liver": files["liver"].resolve()}
    assert second.region == "abdomen" and second.orientation == "ASR" and second.line == 3


def test_default_id_strips_nii_suffixes(tmp_path, files):
    path = write_manifest(
        tmp_path / "m.jsonl",
        [
            {
                "image": "ct/case2.nii",
                "label": ["liver"],
                "modality": "ct",
                "dataset": "D",
                "mask": "ct/case2_seg.nii.gz",
            }
        ],
    )
    assert load_manifest(path)[0].id == "case2"


def test_every_problem_is_reported_with_file_and_line(tmp_path, files, region_map):
    rows = [
        GOOD,  # 1
        '{"image": "ct/case1.nii.gz", "label": [',  # 2 bad JSON
        {**GOOD, "id": "b", "modality": "xray"},  # 3 unknown modality
        {**GOOD, "id": "c", "label": []},  # 4 empty label list
        {**GOOD, "id": "d", "image": "ct/missing.nii.gz"},  # 5 missing file
        {**GOOD, "id": "e", "mask": "ct/bad_seg.nii.gz"},  # 6 mask shape
        GOOD,  # 7 duplicate id (case1 in dataset D)
        {**GOOD, "id": "g", "label": ["livre"]},  # 8 unknown label, with the closest name
        {**GOOD, "id": "h", "orientation": "RRS"},  # 9 invalid orientation
        {**GOOD, "id": "i", "masks": {"liver": "ct/case2_liver.nii.gz"}},  # 10 mask and masks
        {"image": "ct/case2.nii", "label": ["liver"], "modality": "ct", "dataset": "D"},  # 11 no mask
        [1, 2],  # 12 not an object
    ]
    path = write_manifest(tmp_path / "bad.jsonl", rows)
    problems = validate_manifest(path, region_map=region_map)
    where = {int(p.split(":")[1]) for p in problems}
    assert where == set(range(2, 13))
    assert all(p.startswith(f"{path.resolve()}:") for p in problems)
    text = "\n".join(problems)
    for needle in (
        ":2: bad JSON",
        ":3: unknown modality 'xray'",
        ":4: empty label list",
        ":5: image file not found",
        ":6: mask ",
        "does not lie on its image",
        "the grids cover different spaces",
        ":7: duplicate id 'case1' in dataset 'D' (first on line 1)",
        ":8: unknown label 'livre' for modality 'ct'; closest known labels: liver",
        ":9: invalid 'orientation' 'RRS'",
        ":10: give either 'mask'",
        ":11: missing 'mask'",
        ":12: expected a JSON object",
    ):
        assert needle in text, needle
    with pytest.raises(ManifestError) as info:
        load_manifest(path, region_map=region_map)
    assert isinstance(info.value, ValueError) and info.value.problems == problems
    assert f"{len(problems)} problem(s) in manifest" in str(info.value)


def test_predict_manifests_need_no_mask_and_forced_regions_skip_label_lookup(tmp_path, files, region_map):
    path = write_manifest(
        tmp_path / "p.jsonl",
        [
            {
                "image": "ct/case1.nii.gz",
                "label": ["my new organ"],
                "modality": "ct",
                "dataset": "D",
                "region": "thorax",
            },
            {
                "image": "ct/case2.nii",
                "label": ["liver"],
                "modality": "ct",
                "dataset": "D",
                "region": "belly",
            },
        ],
    )
    problems = validate_manifest(path, require_masks=False, region_map=region_map)
    assert len(problems) == 1 and ":2: unknown region 'belly'" in problems[0]
    assert validate_manifest(path, require_masks=False) == []  # no region map: names are not checked


def test_prediction_lines_take_the_command_line_defaults_and_leave_images_to_their_case(tmp_path, files):
    path = write_manifest(
        tmp_path / "p.jsonl",
        [
            {"image": "ct/case1.nii.gz", "mask": "ct/nowhere.nii.gz"},  # mask ignored, no dataset needed
            {"image": "ct/gone.nii.gz", "label": "Spleen", "modality": "T2", "id": "g", "orientation": "asr"},
            {"image": "ct/case2.nii", "region": "thorax"},
        ],
    )
    defaults = LineDefaults(["liver"], "ct", "abdomen", "RAS")
    cases, problems = read_manifest(path, require_masks=False, defaults=defaults)
    assert problems == []
    first, gone, third = cases
    assert (first.labels, first.modality, first.region, first.orientation) == (["liver"], "ct", "abdomen", "RAS")
    assert first.dataset == "" and first.mask is None and first.masks is None and first.id == "case1"
    assert gone.image == (tmp_path / "ct/gone.nii.gz").resolve()  # read (and failed) when its case runs
    assert (gone.labels, gone.modality, gone.orientation) == (["spleen"], "mri", "ASR") and third.region == "thorax"
    # the same lines for training or evaluation: every missing field is a problem, one entry per line
    problems = validate_manifest(path, require_masks=False)
    assert [p.split(": ", 1)[0].rsplit(":", 1)[1] for p in problems] == ["1", "2", "3"]
    assert "missing 'label' (a list of label names); missing 'modality'; missing or empty 'dataset'" in problems[0]
    bare = write_manifest(tmp_path / "bare.jsonl", [{"image": "ct/case1.nii.gz"}])
    assert read_manifest(bare, require_masks=False, defaults=LineDefaults())[1] == [
        f"{bare.resolve()}:1: missing 'label' (a list of label names), and no labels=... on the command line; "
        "missing 'modality', and no modality=... on the command line"
    ]


def test_missing_manifest_and_empty_manifest(tmp_path):
    assert "manifest not found" in validate_manifest(tmp_path / "nope.jsonl")[0]
    (tmp_path / "empty.jsonl").write_text("\n\n")
    assert "manifest has no cases" in validate_manifest(tmp_path / "empty.jsonl")[0]


def test_read_volume_errors_name_the_file(tmp_path, write_nifti):
    garbage = tmp_path / "broken.nii.gz"
    garbage.write_bytes(b"not a nifti file at all")
    with pytest.raises(CaseError, match="broken.nii.gz: cannot read image"):
        read_volume(garbage)
    flat = write_nifti("flat.nii.gz", np.zeros((8, 8), np.float32))
    with pytest.raises(CaseError, match=r"flat.nii.gz: expected a 3-D volume .* shape \(8, 8\)"):
        read_volume(flat)
    with pytest.raises(CaseError, match="missing.nii.gz: file not found"):
        read_volume(tmp_path / "missing.nii.gz")


def run(*overrides: str) -> int:
    """The manifest check command in process; its exit status."""
    try:
        check_manifest(compose_config("check_manifest", overrides))
    except SystemExit as exit:
        return int(exit.code)
    return 0


def test_command_line_reports_problems(tmp_path, files, capsys):
    ok = write_manifest(tmp_path / "ok.jsonl", [GOOD])
    bad = write_manifest(tmp_path / "bad.jsonl", [{**GOOD, "label": ["liver tumor"]}])

    assert run(f"manifests={ok}") == 0 and "ok.jsonl: OK" in capsys.readouterr().out
    assert run(f"manifests=[{ok},{bad}]") == 1
    assert "bad.jsonl:1: unknown label 'liver tumor'" in capsys.readouterr().out
    assert run(f"manifests=[{bad}]", "regions=demo") == 0  # the demo map knows the CT liver tumour
    assert run(f"manifests=[{bad}]", "~regions") == 0  # no label checks
    masks_missing = write_manifest(tmp_path / "predict.jsonl", [{k: v for k, v in GOOD.items() if k != "mask"}])
    assert run(f"manifests=[{masks_missing}]") == 1
    assert run(f"manifests=[{masks_missing}]", "require_masks=false") == 0


def test_manifest_check_command(tmp_path, files):
    bad = write_manifest(tmp_path / "bad.jsonl", [{**GOOD, "label": ["liver tumor"]}])
    command = [sys.executable, "-m", "lorkd.commands.check_manifest", f"manifests=[{bad}]"]
    done = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True)
    assert done.returncode == 1 and "bad.jsonl:1: unknown label 'liver tumor'" in done.stdout, done.stderr
    assert subprocess.run([*command, "regions=demo"], cwd=tmp_path, capture_output=True).returncode == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.jsonl", "ct"]  # no run folder, no log


def test_command_line_reads_voxels_mask_ids_above_the_labels_and_truncated_images(tmp_path, write_nifti, capsys):
    vol = np.zeros((8, 8, 4), np.int16)
    write_nifti("ct/a.nii.gz", vol)
    ids = np.zeros((8, 8, 4), np.uint8)
    ids[0, 0, 0], ids[1, 1, 1] = 1, 3  # id 3 on a line with 1 label
    write_nifti("ct/a_seg.nii.gz", ids)
    noise = np.random.default_rng(0).normal(size=(32, 32, 16)).astype(np.float32)  # compresses poorly
    truncated = write_nifti("ct/b.nii.gz", noise)
    data = truncated.read_bytes()
    truncated.write_bytes(data[: len(data) // 2])  # a cut download: header readable, gzip stream ends early
    write_nifti("ct/b_seg.nii.gz", np.zeros((32, 32, 16), np.uint8))
    path = write_manifest(
        tmp_path / "m.jsonl",
        [
            {**GOOD, "image": "ct/a.nii.gz", "mask": "ct/a_seg.nii.gz", "id": "a"},
            {**GOOD, "image": "ct/b.nii.gz", "mask": "ct/b_seg.nii.gz", "id": "b"},
        ],
    )
    assert run(f"manifests={path}") == 1
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 2
    assert out[0].startswith(f"{path}:1: ") and "a_seg.nii.gz has id(s) [3] outside 0..1" in out[0]
    assert out[1].startswith(f"{path}:2: ") and "b.nii.gz: cannot read voxels" in out[1]
    assert run(f"manifests={path}", "quick=true") == 0  # headers only
