"""``python predict.py``: folders and manifests in, case folders + summary.csv out; bad cases, resume, DDP."""

from __future__ import annotations

import csv
import gzip
import json
import os
import subprocess
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from helpers import compose_config, run_script

from lorkd.commands.predict import predict
from lorkd.data.manifest import ManifestError
from lorkd.exit_codes import NotStarted
from lorkd.inference.inputs import discover_cases
from lorkd.inference.predictor import Prediction
from lorkd.inference.writer import (
    MARKER,
    completed,
    label_file_names,
    safe_name,
    save_nifti,
    save_prediction,
)
from lorkd.io import UnsafePathError

AFFINE = np.diag([1.0, 1.0, 3.0, 1.0])


def write_case(path: Path, seed: int = 0, shape=(36, 28, 10)) -> Path:
    rng = np.random.default_rng(seed)
    image = rng.normal(100.0, 40.0, shape).astype(np.float32).clip(1, None)
    image[6:28, 6:22, 3:8] += 300.0
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(image, AFFINE), path)
    return path


def run(ckpt: Path, input: Path, out: Path, *extra: str) -> list[dict]:
    overrides = [f"ckpt_path={ckpt}", f"input={input}", f"output_dir={out}", "progress=false", *extra]
    return predict(compose_config("predict", overrides))


def read_summary(out: Path) -> list[dict]:
    with (out / "summary.csv").open() as f:
        return list(csv.DictReader(f))


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    """Three good scans, one corrupt file, one 4-D scan with 2 channels, one with NaNs."""
    data = tmp_path / "scans"
    for i in range(3):
        write_case(data / f"case{i}.nii.gz", seed=i)
    (data / "corrupt.nii.gz").write_bytes(b"not a nifti file")
    nib.save(nib.Nifti1Image(np.ones((8, 8, 4, 2), np.float32), AFFINE), data / "two_channels.nii.gz")
    nan = np.ones((8, 8, 4), np.float32)
    nan[0, 0, 0] = np.nan
    nib.save(nib.Nifti1Image(nan, AFFINE), data / "with_nan.nii.gz")
    (data / "notes.txt").write_text("not an image")
    return data


def test_folder_with_bad_cases_finishes_the_others_and_reports_them(tiny_lorkd_ckpt, folder, tmp_path):
    out = tmp_path / "out"
    rows = run(tiny_lorkd_ckpt, folder, out, "labels=[liver,left kidney]", "modality=ct")
    written = [(r["case"], r["label"], r["status"]) for r in read_summary(out)]
    assert written == [(r["case"], r.get("label", ""), r["status"]) for r in rows]
    by_case: dict[str, list[dict]] = {}
    for row in rows:
        by_case.setdefault(row["case"], []).append(row)
    assert sorted(by_case) == ["case0", "case1", "case2", "corrupt", "two_channels", "with_nan"]
    for bad, reason in [
        ("corrupt", "cannot read image"),
        ("two_channels", "expected a 3-D volume"),
        ("with_nan", "NaN"),
    ]:
        (row,) = by_case[bad]
        assert row["status"] == "error" and reason in row["error"] and bad in row["error"]
        assert not (out / bad / "prediction.json").exists()
    for name in ("case0", "case1", "case2"):
        assert [r["label"] for r in by_case[name]] == ["liver", "left kidney"]
        assert all(r["status"] == "ok" and r["expert"] == "abdomen" for r in by_case[name])
        case = out / name
        files = {p.relative_to(case).as_posix() for p in case.rglob("*")}
        assert files == {
            "liver.nii.gz", "left_kidney.nii.gz", "segmentation.nii.gz", "labels.json", "preview.png", "prediction.json",
        }  # fmt: skip
        assert json.loads((case / "labels.json").read_text()) == {"1": "liver", "2": "left kidney"}
        mask = nib.load(case / "left_kidney.nii.gz")
        assert mask.get_data_dtype() == np.uint8 and mask.shape == (36, 28, 10)
        assert np.allclose(mask.affine, AFFINE)
        voxels = int(np.count_nonzero(np.asarray(mask.dataobj)))
        row = by_case[name][1]
        assert row["voxels"] == voxels and row["volume_ml"] == pytest.approx(voxels * 3 / 1000, abs=1e-3)
        seg = np.asarray(nib.load(case / "segmentation.nii.gz").dataobj)
        assert set(np.unique(seg)) <= {0, 1, 2}


def test_resume_skips_complete_cases_and_overwrite_redoes_them(tiny_lorkd_ckpt, tmp_path):
    data = tmp_path / "scans"
    for i in range(2):
        write_case(data / f"case{i}.nii.gz", seed=i)
    out = tmp_path / "out"
    args = ("labels=[spleen]", "modality=ct", "inference.threshold=0.4")
    first = run(tiny_lorkd_ckpt, data, out, *args)
    assert {r["status"] for r in first} == {"ok"}
    stamp = (out / "case0" / "spleen.nii.gz").stat().st_mtime_ns
    (out / "case1" / "prediction.json").unlink()  # case1 was interrupted before its marker
    second = run(tiny_lorkd_ckpt, data, out, *args)
    assert [(r["case"], r["status"]) for r in second] == [("case0", "skipped"), ("case1", "ok")]
    assert second[0]["voxels"] == first[0]["voxels"]
    assert (out / "case0" / "spleen.nii.gz").stat().st_mtime_ns == stamp
    third = run(
        tiny_lorkd_ckpt, data, out, "labels=[spleen,liver]", "modality=ct"
    )  # other labels: not complete
    assert {r["status"] for r in third} == {"ok"}
    fourth = run(tiny_lorkd_ckpt, data, out, "labels=[spleen,liver]", "modality=ct", "overwrite=true")
    assert {r["status"] for r in fourth} == {"ok"}
    assert (out / "case0" / "spleen.nii.gz").stat().st_mtime_ns != stamp


def test_manifest_lines_bring_their_own_labels_modality_and_region(tiny_lorkd_ckpt, tmp_path):
    write_case(tmp_path / "a.nii.gz", seed=0)
    write_case(tmp_path / "b.nii.gz", seed=1)
    lines = [
        {"image": "a.nii.gz", "label": ["liver", "left lung"], "modality": "ct", "id": "first"},
        {"image": "b.nii.gz", "label": ["heart"], "region": "abdomen"},
    ]
    manifest = tmp_path / "cases.jsonl"
    manifest.write_text("\n".join(json.dumps(line) for line in lines) + "\n")
    out = tmp_path / "out"
    rows = run(tiny_lorkd_ckpt, manifest, out, "modality=ct", "writer.save_probabilities=true")
    assert [(r["case"], r["label"], r["expert"]) for r in rows] == [
        ("first", "liver", "abdomen"), ("first", "left lung", "thorax"), ("b", "heart", "abdomen"),
    ]  # fmt: skip
    probs = nib.load(out / "first" / "probabilities" / "left_lung.nii.gz")
    assert probs.get_data_dtype() == np.float32 and probs.shape == (36, 28, 10)
    marker = json.loads((out / "b" / "prediction.json").read_text())
    assert marker["image"] == str((tmp_path / "b.nii.gz").resolve()) and marker["routes"] == {
        "heart": "abdomen"
    }


def test_prompt_problems_stop_the_run_before_anything_is_predicted(tiny_lorkd_ckpt, folder, tmp_path):
    out = tmp_path / "out"
    with pytest.raises(NotStarted, match=r"unknown label 'livr'.*closest known labels: liver"):
        run(tiny_lorkd_ckpt, folder, out, "labels=[livr]", "modality=ct")
    assert not out.exists() or not any(p.name == "prediction.json" for p in out.rglob("*"))


def test_inputs_are_validated_up_front(tmp_path):
    write_case(tmp_path / "a.nii.gz")
    with pytest.raises(ValueError, match="labels="):
        discover_cases(tmp_path)
    bad = tmp_path / "bad.jsonl"
    bad.write_text(
        '{"image": "a.nii.gz"}\nnot json\n{"image": "a.nii.gz", "label": ["x"], "modality": "xray"}\n'
    )
    with pytest.raises(ManifestError) as info:
        discover_cases(bad)
    assert [p.split(": ", 1)[0].rsplit(":", 1)[1] for p in info.value.problems] == ["1", "2", "3"]
    clash = tmp_path / "clash.jsonl"
    clash.write_text('{"image": "a.nii.gz", "id": "x/y"}\n{"image": "a.nii.gz", "id": "x_y"}\n')
    with pytest.raises(ValueError, match="same output folder"):
        discover_cases(clash, ["liver"], "ct")
    with pytest.raises(FileNotFoundError):
        discover_cases(tmp_path / "missing")


def test_a_folder_of_non_ascii_or_clashing_names_gets_one_case_folder_each(tmp_path):
    from lorkd.inference.prediction_task import case_folder

    for name in ("肝", "脾", "a b", "a_b", "a+b", "Ωmega"):
        write_case(tmp_path / "in" / f"{name}.nii.gz")
    cases = discover_cases(tmp_path / "in", ["liver"], "ct")
    folders = {case.image.name: case_folder(tmp_path / "out", case).name for case in cases}
    assert len(set(folders.values())) == len(cases) == 6, folders
    assert folders["肝.nii.gz"] == "肝" and folders["脾.nii.gz"] == "脾" and folders["Ωmega.nii.gz"] == "Ωmega"
    assert folders["a_b.nii.gz"] == "a_b"  # spelled exactly: kept; the lossy ones get a hash of their name
    assert folders["a b.nii.gz"].startswith("a_b-") and folders["a+b.nii.gz"].startswith("a_b-")
    assert discover_cases(tmp_path / "in", ["liver"], "ct") == cases  # the same names on every run


def test_label_and_case_names_become_safe_file_names():
    assert safe_name("../../etc/passwd") == "etc_passwd"
    assert safe_name("..") == "label" and safe_name(" left  kidney ") == "left_kidney"
    names = label_file_names(["segmentation", "a/b", "a b", "Labels"])
    assert names == {"segmentation": "segmentation_1", "a/b": "a_b", "a b": "a_b_3", "Labels": "Labels_4"}
    assert all("/" not in n and not n.startswith(".") for n in names.values())


def small_prediction(labels: list[str]) -> Prediction:
    image = nib.Nifti1Image(np.arange(6 * 5 * 4, dtype=np.float32).reshape(6, 5, 4), AFFINE)
    masks = {
        lab: nib.Nifti1Image((np.asarray(image.dataobj) > 10 * i).astype(np.uint8), AFFINE)
        for i, lab in enumerate(labels)
    }
    segmentation = nib.Nifti1Image(np.zeros((6, 5, 4), np.uint8), AFFINE)
    return Prediction(
        masks,
        segmentation,
        {i + 1: lab for i, lab in enumerate(labels)},
        dict.fromkeys(labels, "abdomen"),
        image,
        "ct",
    )


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16, np.float32])
def test_images_go_to_disk_as_nibabel_writes_them(dtype, tmp_path):
    data = (np.random.default_rng(0).random((130, 70, 33)) * 3).astype(dtype)
    data[:65] = 0  # all-zero blocks are skipped, not copied
    image = nib.Nifti1Image(data, AFFINE)
    image.set_sform(AFFINE, code=1)
    image.header.set_xyzt_units("mm", "sec")
    save_nifti(image, tmp_path / "ours.nii.gz")
    nib.save(image, tmp_path / "nibabel.nii.gz")
    with gzip.open(tmp_path / "ours.nii.gz") as ours, gzip.open(tmp_path / "nibabel.nii.gz") as theirs:
        assert ours.read() == theirs.read()  # header and voxels, byte for byte


def test_the_preview_is_drawn_while_the_images_are_written(tmp_path):
    folder = tmp_path / "out" / "case"
    marker = save_prediction(small_prediction(["liver", "spleen"]), folder)
    assert marker["files"] == ["liver.nii.gz", "spleen.nii.gz", "segmentation.nii.gz", "labels.json", "preview.png"]
    assert (folder / "preview.png").read_bytes().startswith(b"\x89PNG")
    assert completed(folder, ["liver", "spleen"]) is not None


def test_rewriting_a_case_removes_stale_files_inside_its_folder_only(tmp_path):
    folder = tmp_path / "out" / "case"
    save_prediction(small_prediction(["liver", "left kidney"]), folder, preview=False)
    assert completed(folder, ["liver", "left kidney"]) is not None and completed(folder, ["liver"]) is None
    marker = json.loads((folder / MARKER).read_text())
    marker["files"].append("../../outside.txt")
    (folder / MARKER).write_text(json.dumps(marker))
    (tmp_path / "outside.txt").write_text("keep me")
    save_prediction(small_prediction(["liver"]), folder, preview=False)
    assert sorted(p.name for p in folder.iterdir()) == [
        "labels.json",
        "liver.nii.gz",
        MARKER,
        "segmentation.nii.gz",
    ]
    assert (tmp_path / "outside.txt").read_text() == "keep me"
    assert [r["voxels"] for r in json.loads((folder / MARKER).read_text())["rows"]] == [119]


def test_two_cpu_processes_write_each_case_exactly_once(tiny_lorkd_ckpt, tmp_path):
    data = tmp_path / "scans"
    for i in range(5):
        write_case(data / f"case{i}.nii.gz", seed=i, shape=(20, 18, 5))
    out = tmp_path / "out"
    env = {
        k: v for k, v in os.environ.items() if k not in ("MASTER_PORT", "MASTER_ADDR", "WORLD_SIZE", "RANK")
    }
    done = run_script(
        "predict.py",
        [
            f"ckpt_path={tiny_lorkd_ckpt}", f"input={data}", f"output_dir={out}", "labels=[liver,spleen]",
            "modality=ct", "progress=false", "trainer.devices=2", "trainer.accelerator=cpu", "trainer.strategy=ddp",
        ],
        tmp_path,
        env,
        timeout=240,
    )  # fmt: skip
    assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]
    rows = read_summary(out)
    keys = [(r["case"], r["label"]) for r in rows]
    assert sorted(keys) == sorted((f"case{i}", lab) for i in range(5) for lab in ("liver", "spleen"))
    assert {r["status"] for r in rows} == {"ok"}
    ranks = [json.loads((out / f"case{i}" / "prediction.json").read_text())["rank"] for i in range(5)]
    assert sorted(ranks) == [0, 0, 0, 1, 1]


def test_writes_never_follow_a_link_out_of_the_output_folder(tmp_path):
    out, outside = tmp_path / "out", tmp_path / "outside"
    outside.mkdir()
    (outside / "liver.nii.gz").write_text("not mine")
    out.mkdir()
    (out / "linked").symlink_to(outside, target_is_directory=True)  # a case folder that is a link
    with pytest.raises(UnsafePathError, match="linked is a symbolic link"):
        save_prediction(small_prediction(["liver"]), out / "linked", preview=False, root=out)
    (out / "case" / "probabilities").mkdir(parents=True)
    save_prediction(small_prediction(["liver"]), out / "case", preview=False, root=out)
    (out / "case" / "probabilities").rmdir()
    (out / "case" / "probabilities").symlink_to(outside, target_is_directory=True)  # a linked subfolder
    prediction = small_prediction(["liver"])
    prediction.probabilities = prediction.masks
    with pytest.raises(UnsafePathError, match="probabilities is a symbolic link"):
        save_prediction(prediction, out / "case", preview=False, root=out)
    (out / "case" / "liver.nii.gz").unlink(missing_ok=True)
    (out / "case" / "liver.nii.gz").symlink_to(outside / "liver.nii.gz")  # a planted file link is replaced
    save_prediction(small_prediction(["liver"]), out / "case", preview=False, root=out)
    assert not (out / "case" / "liver.nii.gz").is_symlink()
    assert sorted(p.name for p in outside.iterdir()) == ["liver.nii.gz"]
    assert (outside / "liver.nii.gz").read_text() == "not mine"


def test_stale_cleanup_removes_only_its_own_files_never_through_a_link(tmp_path):
    folder, outside = tmp_path / "out" / "case", tmp_path / "outside"
    outside.mkdir()
    (outside / "x.nii.gz").write_text("keep me")
    save_prediction(small_prediction(["liver", "spleen"]), folder, preview=False)
    (folder / "notes.txt").write_text("the user's")
    (folder / "sub").symlink_to(outside, target_is_directory=True)
    marker = json.loads((folder / MARKER).read_text())
    marker["files"] += ["notes.txt", "sub/x.nii.gz", "probabilities/../../../outside/x.nii.gz"]
    (folder / MARKER).write_text(json.dumps(marker))
    save_prediction(small_prediction(["liver"]), folder, preview=False)
    assert not (folder / "spleen.nii.gz").exists()  # its own stale file: removed
    assert (folder / "notes.txt").read_text() == "the user's"
    assert (outside / "x.nii.gz").read_text() == "keep me"


def test_a_redone_case_drops_a_killed_runs_temporaries(tmp_path):
    folder = tmp_path / "case"
    save_prediction(small_prediction(["liver"]), folder, preview=False)
    (folder / MARKER).unlink()  # killed: no marker, a partial temporary left behind
    (folder / ".tmp-abc123.nii.gz").write_bytes(b"partial")
    (folder / "probabilities").mkdir()
    (folder / "probabilities" / ".tmp-def456.nii.gz").write_bytes(b"partial")
    save_prediction(small_prediction(["liver"]), folder, preview=False)
    assert not list(folder.rglob(".tmp-*"))


def test_resume_recomputes_a_replaced_input_a_damaged_output_and_new_settings(tiny_lorkd_ckpt, tmp_path):
    import time

    data = tmp_path / "scans"
    for i in range(3):
        write_case(data / f"case{i}.nii.gz", seed=i)
    out = tmp_path / "out"
    args = ("labels=[liver]", "modality=ct")
    start = time.perf_counter()
    first = run(tiny_lorkd_ckpt, data, out, *args)
    wall = time.perf_counter() - start
    assert {r["status"] for r in first} == {"ok"}
    assert 0 < sum(r["seconds"] for r in first) <= wall  # each case's own time, not a clock reading
    write_case(data / "case0.nii.gz", seed=10)  # the input scan replaced under the same name
    liver = out / "case1" / "liver.nii.gz"
    liver.write_bytes(liver.read_bytes()[: liver.stat().st_size // 2])  # a truncated output
    second = run(tiny_lorkd_ckpt, data, out, *args)
    assert [(r["case"], r["status"]) for r in second] == [("case0", "ok"), ("case1", "ok"), ("case2", "skipped")]
    nib.load(liver).get_fdata()  # whole again
    third = run(tiny_lorkd_ckpt, data, out, *args, "inference.threshold=0.4")  # other settings
    assert {r["status"] for r in third} == {"ok"}
    fourth = run(tiny_lorkd_ckpt, data, out, *args, "inference.threshold=0.4", "inference.max_queries=1")
    assert {r["status"] for r in fourth} == {"skipped"}  # max_queries changes no mask


def hinted_override(message: str, key: str) -> str:
    """The ``key=value`` a hint tells the user to add."""
    import re

    match = re.search(rf"(?<![\w.]){re.escape(key)}=(\w+)", message)
    assert match, f"no {key}=... in {message!r}"
    return match.group(0)


def test_every_hint_names_a_key_that_works_in_predict(tiny_lorkd_ckpt, folder, tmp_path):
    with pytest.raises(NotStarted) as info:
        run(tiny_lorkd_ckpt, folder / "case0.nii.gz", tmp_path / "a", "labels=[liver,bone]", "modality=ct")
    fix = hinted_override(str(info.value), "routing.fallback")
    rows = run(tiny_lorkd_ckpt, folder / "case0.nii.gz", tmp_path / "a", "labels=[liver,bone]", "modality=ct", fix)
    assert [(r["label"], r["expert"], r["status"]) for r in rows] == [
        ("liver", "abdomen", "ok"), ("bone", "base", "ok"),
    ]  # fmt: skip
    (row,) = run(tiny_lorkd_ckpt, folder / "with_nan.nii.gz", tmp_path / "b", "labels=[liver]", "modality=ct")
    assert row["status"] == "error"
    fix = hinted_override(row["error"], "inference.nan_policy")
    (row,) = run(tiny_lorkd_ckpt, folder / "with_nan.nii.gz", tmp_path / "b", "labels=[liver]", "modality=ct", fix)
    assert row["status"] == "ok"


def test_a_constant_volume_gets_empty_masks_and_a_warning_naming_it(tiny_lorkd_ckpt, tmp_path, caplog):
    data = tmp_path / "scans"
    data.mkdir()
    nib.save(nib.Nifti1Image(np.zeros((30, 24, 8), np.float32), AFFINE), data / "zeros.nii.gz")
    nib.save(nib.Nifti1Image(np.full((30, 24, 8), 40.0, np.float32), AFFINE), data / "flat.nii.gz")
    with caplog.at_level("WARNING"):
        rows = run(tiny_lorkd_ckpt, data, tmp_path / "out", "labels=[liver,spleen]", "modality=ct")
    assert [(r["case"], r["status"], r["voxels"]) for r in rows] == [
        ("flat", "ok", 0), ("flat", "ok", 0), ("zeros", "ok", 0), ("zeros", "ok", 0),
    ]  # fmt: skip
    for name in ("flat.nii.gz", "zeros.nii.gz"):
        assert any(name in r.getMessage() and "nothing to segment" in r.getMessage() for r in caplog.records)
    assert not any("<array>" in r.getMessage() for r in caplog.records)


def cli(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    """``python predict.py ARGS`` as a subprocess."""
    return run_script("predict.py", ["progress=false", *args], tmp_path)


@pytest.mark.slow
def test_command_line_exit_codes_per_case_errors_and_one_log_line_per_event(tiny_lorkd_ckpt, tmp_path):
    data, out, outside = tmp_path / "scans", tmp_path / "out", tmp_path / "outside"
    write_case(data / "case0.nii.gz", seed=0, shape=(20, 18, 5))
    write_case(data / "case1.nii.gz", seed=1, shape=(20, 18, 5))
    rgb = np.zeros((8, 8, 4), dtype=[("R", "u1"), ("G", "u1"), ("B", "u1")])
    nib.save(nib.Nifti1Image(rgb, AFFINE), data / "rgb.nii.gz")
    outside.mkdir()
    out.mkdir()
    (out / "case1").symlink_to(outside, target_is_directory=True)  # planted: must not be written through
    common = [f"input={data}", "labels=[liver]", "modality=ct"]

    done = cli(tmp_path, f"ckpt_path={tiny_lorkd_ckpt}", f"output_dir={out}", *common)
    log = done.stdout + done.stderr
    assert done.returncode == 1, log[-3000:]  # some case failed, the others done
    rows = {r["case"]: r for r in read_summary(out)}
    assert rows["case0"]["status"] == "ok"
    assert rows["case1"]["status"] == "error" and "symbolic link" in rows["case1"]["error"]
    assert rows["rgb"]["status"] == "error" and "rgb.nii.gz" in rows["rgb"]["error"] and "RGB" in rows["rgb"]["error"]
    assert not list(outside.iterdir())
    assert "Traceback" not in log and log.count("predicting 3 case(s)") == 1  # one log line per event
    assert "GPU available" not in log  # one process: the plain loop, no Lightning
    (run_dir,) = (out / ".runs").iterdir()  # Hydra's config and log, where the README says
    assert (run_dir / ".hydra" / "config.yaml").is_file() and (run_dir / "predict.log").is_file()

    junk = tmp_path / "random.ckpt"
    junk.write_bytes(np.random.default_rng(0).bytes(4096))
    bad = cli(tmp_path, f"ckpt_path={junk}", f"output_dir={tmp_path / 'o2'}", *common)
    assert bad.returncode == 2 and f"{junk} is not a readable checkpoint" in bad.stdout + bad.stderr
    assert "Traceback" not in bad.stdout + bad.stderr and "file an issue" not in bad.stdout + bad.stderr

    (tmp_path / "a_file").write_text("")
    impossible = cli(tmp_path, f"ckpt_path={tiny_lorkd_ckpt}", f"output_dir={tmp_path / 'a_file' / 'out'}", *common)
    assert impossible.returncode == 2 and impossible.stdout == ""
    assert impossible.stderr.strip().splitlines() == [f"error: output_dir={tmp_path / 'a_file' / 'out'} is not writable: Not a directory"]
