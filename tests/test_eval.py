"""``python eval.py``: rows per (case, label) in both spaces and empty rules, resume, corrupt cases,
reports, and a 2-process (gloo) run that gives exactly the rows of one process."""

from __future__ import annotations

import csv
import gzip
import json
import math
import os
import signal
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from helpers import compose_config, run_script

from lorkd.data.manifest import load_manifest
from lorkd.evaluation.outputs import write_outputs
from lorkd.evaluation.pipeline import manifest_problems
from lorkd.evaluation.records import CaseRecord, load_records, record_path, save_record
from lorkd.evaluation.rows import case_rows, voxel_spacing
from lorkd.evaluation.settings import MetricSettings
from lorkd.inference.case_runner import ShardSampler
from lorkd.io import UnsafePathError

ROOT = Path(__file__).resolve().parents[1]
SPACING = (1.5, 1.5, 4.0)  # anisotropic and not SAT's 1x1x3, so the two spaces differ
LABELS = ["liver", "spleen"]


# --------------------------------------------------------------------------- tiny data


def write_case(folder: Path, index: int) -> dict:
    """A small CT (body > 0 HU, liver and spleen blobs) with its label map; returns its manifest line."""
    rng = np.random.default_rng(index)
    shape = (36, 32, 10)
    x, y, z = np.meshgrid(*[np.arange(s) for s in shape], indexing="ij")
    labels = np.zeros(shape, dtype=np.uint8)
    labels[(x - 12 - index) ** 2 + (y - 14) ** 2 + 4 * (z - 5) ** 2 < 40] = 1
    labels[(x - 26) ** 2 + (y - 18 + index) ** 2 + 4 * (z - 5) ** 2 < 16] = 2
    image = np.full(shape, -1000.0, dtype=np.float32)
    image[3:-3, 3:-3, :] = 40.0
    image[labels == 1], image[labels == 2] = 120.0, 80.0
    image += rng.normal(0, 5, shape).astype(np.float32)
    affine = np.diag([*SPACING, 1.0])
    nib.save(nib.Nifti1Image(image, affine), str(folder / f"ct_{index}.nii.gz"))
    nib.save(nib.Nifti1Image(labels, affine), str(folder / f"ct_{index}_seg.nii.gz"))
    return {
        "image": f"ct_{index}.nii.gz", "mask": f"ct_{index}_seg.nii.gz", "label": LABELS,
        "modality": "ct", "dataset": "Tiny", "id": f"case{index}",
    }  # fmt: skip


def write_manifest(folder: Path, lines: list[dict]) -> Path:
    path = folder / "test.jsonl"
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return path


@pytest.fixture
def tiny_cases(tmp_path: Path) -> Path:
    """Five tiny cases (manifest path)."""
    data = tmp_path / "data"
    data.mkdir()
    return write_manifest(data, [write_case(data, i) for i in range(5)])


def truncate(path: Path) -> None:
    """Keep the header but cut the voxel data: nibabel reads the header, fails on the data."""
    raw = gzip.decompress(path.read_bytes())
    path.write_bytes(gzip.compress(raw[: len(raw) // 3]))


OVERRIDES = ["inference.window=[32,32,16]", "~callbacks.progress_bar", "+trainer.enable_progress_bar=false"]


def run_eval(overrides: list[str], out: Path) -> dict:
    """Compose ``eval.yaml``, point its outputs at ``out`` and evaluate in-process (one process)."""
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import open_dict

    from lorkd.commands.evaluate import run

    cfg = compose_config("eval", [*OVERRIDES, *overrides])
    HydraConfig.instance().set_config(cfg)
    with open_dict(cfg):
        cfg.paths.output_dir = str(out)
    summary = run(cfg)
    assert summary is not None
    return summary


def read_rows(out: Path) -> list[dict]:
    with open(out / "per_case.csv", newline="") as f:
        return list(csv.DictReader(f))


# --------------------------------------------------------------------------- pure pieces


def test_rows_follow_both_empty_rules():
    ref = np.zeros((3, 8, 8, 4), dtype=bool)
    ref[0, 2:5, 2:5, 1:3] = True
    pred = ref.copy()
    pred[2, 0, 0, 0] = True  # label 2: prediction only; label 1: both empty
    labels = ["liver", "spleen", "liver tumor"]
    for rule, expected in (("sat", [1.0, 1.0, 0.0]), ("nnunet", [1.0, math.nan, math.nan])):
        rows = case_rows("D", "c", "ct", labels, zip(pred, ref), (1, 1, 3), MetricSettings(empty_rule=rule))
        for row, value in zip(rows, expected):
            for metric in ("dice", "nsd"):
                assert row[metric] == value or (math.isnan(value) and math.isnan(row[metric]))
    assert [(r["tp"], r["fp"], r["fn"], r["n_pred"], r["n_ref"]) for r in rows] == [
        (18, 0, 0, 18, 18), (0, 0, 0, 0, 0), (0, 1, 0, 1, 0)
    ]  # fmt: skip
    assert rows[0]["spacing_mm"] == "1x1x3" and rows[0]["tolerance_mm"] == 1.0


def test_region_and_group_come_from_the_region_map(region_map):
    masks = [(np.ones((4, 4, 4), bool), np.ones((4, 4, 4), bool))] * 3
    rows = case_rows(
        "D", "c", "ct", ["liver", "liver tumor", "made up"], masks, (1, 1, 1), MetricSettings(), region_map
    )
    assert [(r["region"], r["group"]) for r in rows] == [
        ("abdomen", "abdomen"), ("abdomen", "abnormal"), ("unknown", "unknown")
    ]  # fmt: skip


def test_settings_validate_and_give_per_label_tolerances():
    s = MetricSettings.coerce({"space": "preprocessed", "tolerance_overrides": {"Liver ": 5}})
    assert (s.tolerance("liver"), s.tolerance("spleen")) == (5.0, 1.0)
    for bad in ({"space": "world"}, {"empty_rule": "monai"}, {"tolerance_mm": 0}, {"typo": 1}):
        with pytest.raises(ValueError):
            MetricSettings.coerce(bad)


def test_voxel_spacing_reads_oblique_affines():
    rotation = np.array([[0.0, -1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 1.0]])
    affine = np.eye(4)
    affine[:3, :3] = rotation @ np.diag([0.8, 0.7, 2.5])
    assert voxel_spacing(affine) == pytest.approx((0.8, 0.7, 2.5))


def test_records_resume_only_successes_of_the_same_fingerprint_and_never_write_through_a_link(tmp_path):
    ok = CaseRecord("D", "a/b c", [{"dice": math.nan}], fingerprint="f1")
    failed = CaseRecord("D", "x", error="CaseError: bad", fingerprint="f1")
    other = CaseRecord("D", "y", [{"dice": 1.0}], fingerprint="f0")
    for record in (ok, failed, other):
        save_record(tmp_path, record)
    assert record_path(tmp_path, "D", "a/b c").parent == tmp_path / "cases"  # no path escape
    found = load_records(tmp_path, "f1", dict.fromkeys([("D", "a/b c"), ("D", "x"), ("D", "y"), ("D", "missing")], ""))
    assert list(found) == [("D", "a/b c")] and math.isnan(found["D", "a/b c"].rows[0]["dice"])
    linked, outside = tmp_path / "linked", tmp_path / "outside"
    outside.mkdir()
    linked.mkdir()
    (linked / "cases").symlink_to(outside, target_is_directory=True)
    with pytest.raises(UnsafePathError, match="cases is a symbolic link"):
        save_record(linked, ok)
    assert not list(outside.iterdir())


def test_shards_cover_every_case_once_and_may_be_empty():
    shards = [list(ShardSampler(5, r, 3)) for r in range(3)]
    assert sorted(i for s in shards for i in s) == list(range(5))
    assert list(ShardSampler(1, 1, 2)) == []


def test_compare_report_has_the_side_by_side_table_and_parameter_counts(tmp_path):
    rows = [
        {"dataset": "D", "case": "c", "label": "liver", "region": "abdomen", "modality": "ct", "group": "abdomen",
         "tp": 1, "fp": 0, "fn": 0, "n_pred": 1, "n_ref": 1, "dice": d, "nsd": d}
        for d in (0.9,)
    ]  # fmt: skip
    settings = MetricSettings()
    teacher = {"name": "teacher", "network": "teacher", "parameter_count": 2_000_000}
    write_outputs(tmp_path / "teacher", [CaseRecord("D", "c", rows)], settings, teacher)
    lower = [{**rows[0], "dice": 0.8}]
    failed = CaseRecord("D", "bad", error="CaseError: x.nii.gz: cannot read image")
    summary = write_outputs(
        tmp_path / "lorkd", [CaseRecord("D", "c", lower), failed], settings,
        {"name": "lorkd", "network": "experts", "parameter_count": 500_000}, compare=tmp_path / "teacher",
    )  # fmt: skip
    report = (tmp_path / "lorkd" / "report.md").read_text()
    assert "## Comparison per region: lorkd vs teacher" in report
    assert "| abdomen | 0.8000 | 0.9000 | -0.1000 |" in report
    assert "Parameters: lorkd 500,000 (0.50 M)" in report and "Parameters: teacher 2,000,000" in report
    assert "## Failed cases (1" in report and "x.nii.gz: cannot read image" in report
    assert summary["compare"]["name"] == "teacher" and summary["model"]["parameter_count"] == 500_000
    assert (tmp_path / "lorkd" / "dice_by_region.png").read_bytes()[:4] == b"\x89PNG"


def test_manifest_problems_name_the_case(tmp_path):
    manifest = write_manifest(tmp_path, [{"image": "nowhere.nii.gz", "dataset": "D", "id": "lost"}])
    entries = manifest_problems(manifest, [f"{manifest}:1: image file not found: nowhere.nii.gz"])
    assert entries == [
        {"dataset": "D", "case": "lost", "error": f"{manifest}:1: image file not found: nowhere.nii.gz"}
    ]


def test_eval_config_composes_and_runs_in_output_dir(tmp_path):
    cfg = compose_config("eval", ["ckpt_path=x.ckpt", f"output_dir={tmp_path}", "metrics.empty_rule=nnunet"])
    assert (cfg.hydra.run.dir, cfg.metrics.empty_rule, cfg.network) == (str(tmp_path), "nnunet", "experts")
    teacher = compose_config("eval", ["ckpt_path=x.ckpt", "network=teacher"])
    assert teacher.network == "teacher"
    assert cfg.trainer.precision == "32-true" and cfg.compare is None


# --------------------------------------------------------------------------- with a tiny LoRKD checkpoint


def test_both_spaces_give_sane_rows(tiny_lorkd_ckpt, tiny_cases):
    from lorkd.evaluation.scoring import evaluate_case
    from lorkd.inference.predictor import Predictor

    predictor = Predictor.from_checkpoint(tiny_lorkd_ckpt, device="cpu", window=(32, 32, 16))
    case = load_manifest(tiny_cases)[0]
    reference = np.asarray(nib.load(str(case.mask)).dataobj)
    rows = {}
    for space in ("original", "preprocessed"):
        for rule in ("sat", "nnunet"):
            settings = MetricSettings(space=space, empty_rule=rule)
            rows[space, rule] = evaluate_case(predictor, case, settings, predictor.model.region_map)
    for (space, _), found in rows.items():
        assert [r["label"] for r in found] == LABELS
        for r in found:
            assert r["tp"] + r["fn"] == r["n_ref"] > 0 and r["tp"] + r["fp"] == r["n_pred"]
            assert 0.0 <= r["dice"] <= 1.0 and 0.0 <= r["nsd"] <= 1.0 and r["group"] == "abdomen"
            assert r["spacing_mm"] == ("1.5x1.5x4" if space == "original" else "1x1x3")
    assert [r["n_ref"] for r in rows["original", "sat"]] == [int((reference == j).sum()) for j in (1, 2)]
    for original, resampled in zip(
        rows["original", "sat"], rows["preprocessed", "sat"]
    ):  # 1.5*1.5*4/3 = 3x voxels
        assert resampled["n_ref"] == pytest.approx(3 * original["n_ref"], rel=0.3)
    assert rows["original", "sat"] == rows["original", "nnunet"]  # no empty mask here


def test_eval_reports_resumes_and_survives_a_corrupt_case(tiny_lorkd_ckpt, tiny_cases, tmp_path):
    data = tiny_cases.parent
    truncate(data / "ct_3.nii.gz")  # readable header, unreadable voxels: fails at inference
    (data / "ct_4.nii.gz").write_bytes(b"not a nifti")  # unreadable header: fails in the manifest
    out = tmp_path / "eval"
    overrides = [
        f"ckpt_path={tiny_lorkd_ckpt}",
        f"data.test_manifest={tiny_cases}",
        "metrics.tolerance_overrides={liver: 2.0}",
    ]
    summary = run_eval(overrides, out)

    rows = read_rows(out)
    assert sorted({r["case"] for r in rows}) == ["case0", "case1", "case2"] and len(rows) == 6
    assert {r["label"]: r["tolerance_mm"] for r in rows} == {"liver": "2.0", "spleen": "1.0"}
    failed = {e["case"]: e["error"] for e in summary["errors"]}
    assert (
        set(failed) == {"case3", "case4"}
        and "ct_3.nii.gz" in failed["case3"]
        and "ct_4.nii.gz" in failed["case4"]
    )
    assert (summary["n_cases"], summary["n_failed_cases"], summary["space"]) == (3, 2, "original")
    assert summary["model"]["network"] == "experts" and summary["model"]["parameter_count"] > 0
    report = (out / "report.md").read_text()
    assert "empty-mask rule sat" in report and "NSD tolerance 1 mm (overrides: liver 2 mm)" in report
    assert "evaluation space original" in report and "## Failed cases (2" in report
    assert json.loads((out / "summary.json").read_text()) == summary
    assert (out / "dice_by_region.png").is_file()

    records = {p.name: p.stat().st_mtime_ns for p in (out / "cases").glob("*.json")}
    assert len(records) == 4  # 3 evaluated + 1 failed at inference (the manifest failure has no record)
    again = run_eval(overrides, out)  # resume: nothing recomputed but the failed case
    kept = {p.name: p.stat().st_mtime_ns for p in (out / "cases").glob("*.json")}
    failed_file = record_path(out, "Tiny", "case3").name
    assert {k: v for k, v in kept.items() if k != failed_file} == {
        k: v for k, v in records.items() if k != failed_file
    }
    assert read_rows(out) == rows and again["errors"] == summary["errors"]

    record_path(out, "Tiny", "case1").unlink()  # an interrupted run: only case1 is evaluated again
    run_eval([*overrides, "metrics.space=original"], out)
    after = {p.name: p.stat().st_mtime_ns for p in (out / "cases").glob("*.json")}
    assert after[record_path(out, "Tiny", "case0").name] == records[record_path(out, "Tiny", "case0").name]
    assert read_rows(out) == rows

    other = run_eval(
        [*overrides, "metrics.space=preprocessed", "metrics.empty_rule=nnunet"], out
    )  # new settings
    assert other["space"] == "preprocessed" and {r["spacing_mm"] for r in read_rows(out)} == {"1x1x3"}


def test_teacher_report_names_the_teacher_not_the_lorkd_checkpoint(
    tiny_lorkd_ckpt, tiny_teacher_ckpt, tiny_cases, tmp_path
):
    from lorkd.checkpoints.loading import load_model
    from lorkd.io import file_fingerprint

    out = tmp_path / "teacher"
    summary = run_eval(
        [f"ckpt_path={tiny_lorkd_ckpt}", "network=teacher", f"data.test_manifest={tiny_cases}"], out
    )
    model = summary["model"]
    teacher = load_model(tiny_teacher_ckpt)  # the SATModule checkpoint itself
    assert model["network"] == "teacher" and model["checkpoint"] == str(tiny_teacher_ckpt.resolve())
    assert model["checkpoint_sha256"] == file_fingerprint([tiny_teacher_ckpt])
    assert model["loaded_from"] == str(tiny_lorkd_ckpt.resolve())
    assert model["parameter_count"] == teacher.parameter_count
    line = next(t for t in (out / "report.md").read_text().splitlines() if t.startswith("Model:"))
    assert line.startswith(f"Model: teacher (teacher), checkpoint `{tiny_teacher_ckpt.resolve()}` (sha256 ")
    assert f"{teacher.parameter_count:,}" in line and f"the teacher recorded in `{tiny_lorkd_ckpt.resolve()}`" in line


@pytest.mark.slow
def test_two_processes_give_exactly_the_rows_of_one(tiny_lorkd_ckpt, tiny_cases, tmp_path):
    common = [f"ckpt_path={tiny_lorkd_ckpt}", f"data.test_manifest={tiny_cases}"]
    run_eval(common, tmp_path / "one")

    def two_processes(out: Path) -> None:
        args = [
            *common,
            *OVERRIDES,
            f"output_dir={out}",
            "trainer.accelerator=cpu",
            "trainer.devices=2",
            "trainer.strategy=ddp",
        ]
        env = {**os.environ, "WANDB_MODE": "disabled"}
        env.pop("MASTER_PORT", None)
        process = subprocess.Popen(
            [sys.executable, str(ROOT / "eval.py"), *args], cwd=tmp_path, env=env,
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
        )  # fmt: skip
        try:
            output, _ = process.communicate(timeout=300)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            raise
        assert process.returncode == 0, output[-4000:]

    two_processes(tmp_path / "two")
    one, two = (
        (tmp_path / "one" / "per_case.csv").read_text(),
        (tmp_path / "two" / "per_case.csv").read_text(),
    )
    assert one == two and len(read_rows(tmp_path / "two")) == 10
    summary = json.loads((tmp_path / "two" / "summary.json").read_text())
    assert (summary["n_cases"], summary["n_duplicates_dropped"]) == (5, 0)
    assert len(list((tmp_path / "two" / "cases").glob("*.json"))) == 5

    record_path(tmp_path / "two", "Tiny", "case4").unlink()  # one case left for two ranks: rank 1 gets none
    two_processes(tmp_path / "two")
    assert (tmp_path / "two" / "per_case.csv").read_text() == one


def test_resume_recomputes_cases_whose_line_or_mask_changed(tiny_lorkd_ckpt, tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    lines = [write_case(data, i) for i in range(3)]
    manifest = write_manifest(data, lines)
    out = tmp_path / "eval"
    overrides = [f"ckpt_path={tiny_lorkd_ckpt}", f"data.test_manifest={manifest}"]
    run_eval(overrides, out)
    stamps = {i: record_path(out, "Tiny", f"case{i}").stat().st_mtime_ns for i in range(3)}
    lines[0]["label"] = ["liver"]  # a label removed from the line (its mask ids stay valid)
    write_manifest(data, lines)
    seg = data / "ct_1_seg.nii.gz"
    ids = np.asarray(nib.load(str(seg)).dataobj).copy()
    ids[ids == 2] = 0  # the spleen erased from case1's mask
    nib.save(nib.Nifti1Image(ids, nib.load(str(seg)).affine), str(seg))
    run_eval(overrides, out)
    after = {i: record_path(out, "Tiny", f"case{i}").stat().st_mtime_ns for i in range(3)}
    assert after[2] == stamps[2] and after[0] != stamps[0] and after[1] != stamps[1]
    rows = {(r["case"], r["label"]): r for r in read_rows(out)}
    assert sorted(rows) == [("case0", "liver"), ("case1", "liver"), ("case1", "spleen"), ("case2", "liver"), ("case2", "spleen")]
    assert rows["case1", "spleen"]["n_ref"] == "0"


def test_eval_hints_name_keys_that_work_in_eval(tiny_lorkd_ckpt, tmp_path):
    from test_predict_cli import hinted_override

    data = tmp_path / "data"
    data.mkdir()
    line = write_case(data, 0)
    image = nib.load(str(data / "ct_0.nii.gz"))
    voxels = np.asarray(image.dataobj).copy()
    voxels[0, 0, 0] = np.nan
    nib.save(nib.Nifti1Image(voxels, image.affine), str(data / "ct_0.nii.gz"))
    manifest = write_manifest(data, [line, {**write_case(data, 1), "label": ["liver", "bone"]}])
    common = [f"ckpt_path={tiny_lorkd_ckpt}", f"data.test_manifest={manifest}"]
    summary = run_eval(common, tmp_path / "a")
    errors = {e["case"]: e["error"] for e in summary["errors"]}
    assert sorted(errors) == ["case0", "case1"]
    fixes = [hinted_override(errors["case0"], "inference.nan_policy"), hinted_override(errors["case1"], "routing.fallback")]
    fixed = run_eval([*common, *fixes], tmp_path / "b")
    assert fixed["errors"] == [] and fixed["n_cases"] == 2


def eval_cli(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    """``python eval.py ARGS`` as a subprocess."""
    return run_script("eval.py", [*OVERRIDES, *args], tmp_path)


@pytest.mark.slow
def test_command_line_exit_codes_and_one_clean_line_per_failed_case(tiny_lorkd_ckpt, tmp_path):
    import re

    data = tmp_path / "data"
    data.mkdir()
    manifest = write_manifest(data, [write_case(data, 0), {**write_case(data, 1), "label": ["liver", "bone"]}])
    out = tmp_path / "eval"
    done = eval_cli(tmp_path, f"ckpt_path={tiny_lorkd_ckpt}", f"data.test_manifest={manifest}", f"output_dir={out}")
    log = done.stdout + done.stderr
    assert done.returncode == 1, log[-3000:]  # case1 failed, case0 evaluated, reports written
    assert json.loads((out / "summary.json").read_text())["n_failed_cases"] == 1
    assert "Traceback" not in log
    assert len([line for line in log.splitlines() if "Tiny/case1" in line and "failed" in line]) == 1
    assert re.search(r"Dice \d\.\d{4}, NSD \d\.\d{4} ->", log), log[-2000:]
    assert log.count("2 case(s): 0 done by an earlier run") == 1  # one log line per event
    assert "GPU available" not in log  # one process: the plain loop, no Lightning
    assert (out / ".hydra" / "config.yaml").is_file() and (out / "eval.log").is_file()  # as the README says
    missing = eval_cli(tmp_path, f"ckpt_path={tmp_path / 'missing.ckpt'}", f"data.test_manifest={manifest}",
                       f"output_dir={tmp_path / 'e2'}")  # fmt: skip
    assert missing.returncode == 2 and "missing.ckpt does not exist" in missing.stdout + missing.stderr
    assert "Traceback" not in missing.stdout + missing.stderr
