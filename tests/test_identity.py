"""Resume keys name what was used: the checkpoint bytes loaded (not the file written meanwhile), an export
by its recorded sha256s, a scan or checkpoint replaced by one of the same size, a line's orientation or region."""

from __future__ import annotations

import csv
import json
import os
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
from helpers import compose_config
from test_eval import run_eval, write_case, write_manifest

from lorkd.commands.predict import predict
from lorkd.data.manifest import read_manifest
from lorkd.evaluation.records import input_digest
from lorkd.inference.writer import MARKER
from lorkd.io import file_identity

ARGS = ("labels=[liver]", "modality=ct", "writer.preview=false")


def write_scan(path: Path, seed: int) -> Path:
    """A small CT; ``.nii`` (uncompressed): every seed gives a file of the same size."""
    rng = np.random.default_rng(seed)
    image = rng.normal(100.0, 40.0, (20, 18, 6)).astype(np.float32)
    image[4:16, 4:14, 1:5] += 300.0
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(image, np.diag([1.0, 1.0, 3.0, 1.0])), path)
    return path


def age(path: Path, seconds: int = 60) -> None:
    """Move ``path``'s mtime back, so that a file written later cannot share it (coarse clocks)."""
    stamp = path.stat().st_mtime_ns - seconds * 10**9
    os.utime(path, ns=(stamp, stamp))


def retrained(source: Path, out: Path, scale: float = 0.5) -> Path:
    """``source`` re-saved with its experts and mask head nudged by ``scale``: another model (0: the same)
    in a file whose size depends only on the shapes and ``out``'s name."""
    raw = torch.load(source, map_location="cpu", weights_only=True)
    g = torch.Generator().manual_seed(1)
    for key, value in raw["state_dict"].items():
        if value.is_floating_point() and (".lora_" in key or "mask" in key):
            raw["state_dict"][key] = value + scale * torch.randn(value.shape, generator=g)
    torch.save(raw, out)
    return out


def run(ckpt: Path, input: Path, out: Path, *extra: str) -> list[tuple[str, str]]:
    overrides = [f"ckpt_path={ckpt}", f"input={input}", f"output_dir={out}", "progress=false", *ARGS, *extra]
    return [(r["case"], r["status"]) for r in predict(compose_config("predict", overrides))]


def names(value: object) -> Path:
    """The file ``torch.load`` was given (a path or an open file)."""
    return Path(value.name if hasattr(value, "read") else value).resolve()


def test_predict_records_the_checkpoint_it_loaded_not_the_one_written_meanwhile(tiny_lorkd_ckpt, tmp_path, monkeypatch):
    ckpt = tmp_path / "run" / "last.ckpt"
    ckpt.parent.mkdir()
    shutil.copyfile(tiny_lorkd_ckpt, ckpt)
    age(ckpt)
    loaded = file_identity(ckpt)
    newer = retrained(ckpt, tmp_path / "newer.ckpt")
    real_load = torch.load

    def load_while_training_writes(f, *args, **kwargs):
        value = real_load(f, *args, **kwargs)
        if names(f) == ckpt.resolve() and newer.exists():
            os.replace(newer, ckpt)  # training saves last.ckpt (atomically) right after predict read it
        return value

    scan = write_scan(tmp_path / "scans" / "case0.nii", seed=0)
    monkeypatch.setattr(torch, "load", load_while_training_writes)
    assert run(ckpt, scan, tmp_path / "out") == [("case0", "ok")]
    monkeypatch.undo()
    assert not newer.exists() and file_identity(ckpt) != loaded
    marker = json.loads((tmp_path / "out" / "case0" / MARKER).read_text())
    assert marker["key"]["run"]["checkpoint"] == loaded  # the version whose masks these are
    assert run(ckpt, scan, tmp_path / "out") == [("case0", "ok")]  # the newer model's masks, not the old kept


def rows(out: Path) -> list[dict]:
    with open(out / "per_case.csv", newline="") as f:
        return [{k: v for k, v in row.items() if k != "seconds"} for row in csv.DictReader(f)]


def test_eval_rows_are_filed_under_the_checkpoint_they_were_computed_with(
    tiny_lorkd_ckpt, distinct_lorkd_ckpt, tmp_path, monkeypatch
):
    data = tmp_path / "data"
    data.mkdir()
    manifest = write_manifest(data, [write_case(data, i) for i in range(2)])
    ckpt, first = tmp_path / "run" / "last.ckpt", tmp_path / "first.ckpt"
    ckpt.parent.mkdir()
    shutil.copyfile(tiny_lorkd_ckpt, first)
    age(first)
    shutil.copy2(first, ckpt)  # mtime kept: the same identity as ``first`` had there
    newer = tmp_path / "newer.ckpt"
    shutil.copyfile(distinct_lorkd_ckpt, newer)
    real_load = torch.load

    def training_writes_as_eval_loads(f, *args, **kwargs):
        if names(f) == ckpt.resolve() and newer.exists():
            os.replace(newer, ckpt)  # last.ckpt rewritten between eval's look at it and its read
        return real_load(f, *args, **kwargs)

    overrides = [f"ckpt_path={ckpt}", f"data.test_manifest={manifest}"]
    monkeypatch.setattr(torch, "load", training_writes_as_eval_loads)
    run_eval(overrides, tmp_path / "eval")
    monkeypatch.undo()
    shutil.copy2(first, ckpt)  # the first version back, as it was
    run_eval(overrides, tmp_path / "eval")  # keeps what the first run filed under this version
    run_eval(overrides, tmp_path / "reference")
    assert rows(tmp_path / "eval") == rows(tmp_path / "reference")


def test_an_export_is_known_by_its_recorded_sha256s_not_by_sizes_and_mtimes(tiny_export, distinct_lorkd_ckpt, tmp_path):
    from lorkd.checkpoints.export import export_experts

    other = export_experts(retrained(distinct_lorkd_ckpt, tmp_path / "other.ckpt"), tmp_path / "exports" / "other")
    mine = tmp_path / "exports" / "mine"
    shutil.copytree(tiny_export, mine)
    scan = write_scan(tmp_path / "scans" / "case0.nii", seed=0)
    assert run(mine, scan, tmp_path / "out") == [("case0", "ok")]
    folder = mine.stat()
    for path in mine.rglob("*"):
        if path.is_file():  # another export's files copied in, modification times as they were
            stat = path.stat()
            shutil.copyfile(other / path.relative_to(mine), path)
            os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert (mine.stat().st_size, mine.stat().st_mtime_ns) == (folder.st_size, folder.st_mtime_ns)
    assert run(mine, scan, tmp_path / "out") == [("case0", "ok")]  # not "skipped" with the old export's masks


def test_a_scan_or_checkpoint_replaced_by_one_of_the_same_size_is_predicted_again(tiny_lorkd_ckpt, tmp_path):
    ckpt = tmp_path / "run" / "last.ckpt"
    ckpt.parent.mkdir()
    age(retrained(tiny_lorkd_ckpt, ckpt, scale=0))
    scans = tmp_path / "scans"
    for i in range(2):
        age(write_scan(scans / f"case{i}.nii", seed=i))
    out = tmp_path / "out"
    assert run(ckpt, scans, out) == [("case0", "ok"), ("case1", "ok")]
    size = (scans / "case0.nii").stat().st_size
    write_scan(scans / "case0.nii", seed=10)  # replaced: same size, other voxels
    assert (scans / "case0.nii").stat().st_size == size
    assert run(ckpt, scans, out) == [("case0", "ok"), ("case1", "skipped")]
    size = ckpt.stat().st_size
    retrained(tiny_lorkd_ckpt, ckpt)  # retrained: same size, other weights
    assert ckpt.stat().st_size == size
    assert run(ckpt, scans, out) == [("case0", "ok"), ("case1", "ok")]


def test_a_line_whose_only_change_is_its_orientation_or_region_is_another_input(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    line = write_case(data, 0)
    edits = [{}, {"orientation": "LPS"}, {"orientation": "RAS"}, {"region": "abdomen"}, {"region": "thorax"}]
    digests = []
    for edit in edits:
        (case,), problems = read_manifest(write_manifest(data, [{**line, **edit}]))
        assert problems == []
        digests.append(input_digest(case))
    assert len(set(digests)) == len(edits)
    (case,), _ = read_manifest(write_manifest(data, [line]))
    assert input_digest(case) == digests[0]  # the same line: the same input
