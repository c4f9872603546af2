"""Runs that cannot start say why in one message and exit 2: every required value left out, bad override syntax."""

from __future__ import annotations

from pathlib import Path

import pytest
from helpers import run_script
from omegaconf import OmegaConf

from lorkd.required import describe, missing_values


def test_every_missing_value_is_found_and_described():
    cfg = OmegaConf.create(
        {"a": "???", "b": {"c": "???", "d": 1, "e": "${a}"}, "f": [1, "???"], "g": None, "hydra": {"x": "???"}}
    )
    assert missing_values(cfg) == ["a", "b.c", "f[1]"]  # not the interpolation, not Hydra's own node
    text = describe(["teacher.checkpoint", "ckpt_path"], "export")
    assert "2 required values are missing from the export config" in text
    assert "SAT_Pro.pth" in text and "lorkd-imbalance" in text  # the export's own description of ckpt_path


def test_train_names_every_missing_value_before_any_work(tmp_path):
    logs = tmp_path / "logs"
    args = ["experiment=pro", "data.train_manifest=/x/train.jsonl", f"paths.log_dir={logs}", f"paths.cache_dir={logs}"]
    done = run_script("train.py", args, cwd=tmp_path, timeout=120)
    assert done.returncode == 2, done.stderr
    err = done.stderr
    assert "3 required values are missing from the train config" in err
    for key, what in [
        ("teacher.checkpoint", "SAT_Pro.pth"),
        ("text_encoder.checkpoint", "text_encoder.pth"),
        ("text_encoder.language_model_path", "BioLORD-2023-C folder"),
    ]:
        assert any(line.split()[:1] == [key] and what in line for line in err.splitlines()), (key, err)
    assert "data.train_manifest" not in err and "Traceback" not in err
    assert not logs.exists()  # no run folder, no cache


@pytest.mark.parametrize(
    "script,args,keys",
    [
        ("predict.py", ["labels=[liver]", "paths.log_dir=logs"], ["ckpt_path", "input", "output_dir"]),
        ("eval.py", ["paths.log_dir=logs"], ["ckpt_path"]),
        ("scripts/export_experts.py", ["only=[abdomen]"], ["ckpt_path", "output_dir"]),  # no run folder
    ],
)
def test_other_commands_name_their_missing_values(tmp_path, script, args, keys):
    done = run_script(script, args, cwd=tmp_path, timeout=120)
    assert done.returncode == 2, done.stderr
    listed = [line.split()[0] for line in done.stderr.splitlines()[1:]]
    assert listed == keys and "Traceback" not in done.stderr
    assert not any(tmp_path.iterdir())  # nothing written


@pytest.mark.parametrize("override", ["labels=[liver", "a b=1"])
def test_an_override_hydra_cannot_parse_is_one_line_and_exit_2(tmp_path, override):
    args = ["ckpt_path=x", "input=y", f"output_dir={tmp_path / 'out'}", override]
    done = run_script("predict.py", args, cwd=tmp_path, timeout=120)
    assert done.returncode == 2
    assert done.stderr.startswith(f"error: cannot parse the override {override!r}: ") and done.stderr.count("\n") == 1
    train = run_script("train.py", [override], cwd=tmp_path, timeout=120)
    assert train.returncode == 2 and train.stderr.count("\n") == 1, train.stderr


@pytest.mark.parametrize("script", ["predict.py", "eval.py"])
def test_the_network_key_under_its_old_name_is_one_line_and_exit_2(tmp_path, script):
    args = ["ckpt_path=x", "input=y", "data.test_manifest=m", f"output_dir={tmp_path / 'out'}", "model=teacher"]
    done = run_script(script, args[:2] + args[3:] if script == "predict.py" else [args[0], *args[2:]], cwd=tmp_path, timeout=120)
    assert done.returncode == 2
    assert done.stderr == "error: model=teacher: the key 'model' is now 'network' (network=teacher)\n"


@pytest.mark.parametrize(
    "content,cause",
    [
        (b"hello world\nnot a checkpoint\n", r"it is a text file \(it begins 'hello world\\nnot a check"),
        (b"", "the file is empty"),
        (bytes(range(7, 40)), "it is neither a zip archive nor a pickle .it begins with the bytes 07 08 09"),
    ],
)
def test_a_file_that_is_no_checkpoint_is_named_with_what_it_is(tmp_path, content, cause):
    from lorkd.checkpoints.loading import CheckpointError, load_model

    path = tmp_path / "model.ckpt"
    path.write_bytes(content)
    with pytest.raises(CheckpointError, match=rf"^{path} is not a readable checkpoint: {cause}"):
        load_model(path)


def test_a_moved_teacher_is_named_as_the_teacher_the_checkpoint_was_distilled_from(tiny_lorkd_ckpt, tmp_path):
    import torch

    from lorkd.checkpoints.loading import load_model

    raw = torch.load(tiny_lorkd_ckpt, weights_only=True)
    moved = tmp_path / "moved" / "teacher.ckpt"
    raw["lorkd"]["teacher"]["path"] = str(moved)
    torch.save(raw, tmp_path / "student.ckpt")
    with pytest.raises(FileNotFoundError, match=rf"^the teacher {tmp_path / 'student.ckpt'} was distilled from \({moved}\) does not exist"):
        load_model(tmp_path / "student.ckpt", "teacher")


def test_an_undecodable_dicom_series_keeps_the_whole_reason_on_one_line(tmp_path, monkeypatch):
    from types import SimpleNamespace

    import numpy as np
    import pydicom
    from dicom_series import write_dicom_series

    from lorkd.data.image_reader import CaseError, read_volume
    from lorkd.inference.prediction_task import case_error

    write_dicom_series(np.zeros((8, 6, 3), np.float32), np.eye(4), tmp_path / "series")
    reason = (
        "Unable to decompress 'High-Throughput JPEG 2000' pixel data because all plugins are missing dependencies:\n"
        "    gdcm - requires gdcm>=3.0.10\n    pylibjpeg - requires pylibjpeg>=2.0 and pylibjpeg-openjpeg>=2.4"
    )

    def undecodable(self):
        raise RuntimeError(reason)

    monkeypatch.setattr(pydicom.dataset.Dataset, "pixel_array", property(undecodable))
    with pytest.raises(CaseError) as caught:
        read_volume(tmp_path / "series")
    line = case_error(SimpleNamespace(image=tmp_path / "series"), caught.value)
    assert "\n" not in str(caught.value) and "cannot decode the pixel data" in line
    assert "missing dependencies: gdcm - requires gdcm>=3.0.10; pylibjpeg - requires pylibjpeg>=2.0" in line


class _Usage:
    def __init__(self, free: int) -> None:
        self.total, self.used, self.free = 1 << 30, (1 << 30) - free, free


def test_a_checkpoint_that_a_full_disk_cut_short_says_so_naming_the_file(tmp_path, monkeypatch):
    import shutil

    import torch

    from lorkd.io import DiskFullError
    from lorkd.modules.checkpoint_io import SafeCheckpointIO

    def save(obj, f):
        Path(f).write_bytes(b"PK\x03\x04partial")
        raise RuntimeError("[enforce fail at inline_container.cc:603] . unexpected pos 64 vs 0\nbasic_ios::clear: iostream error")

    monkeypatch.setattr(torch, "save", save)
    folder = tmp_path / "checkpoints"
    monkeypatch.setattr(shutil, "disk_usage", lambda path: _Usage(1 << 30))  # space left: torch's own error
    with pytest.raises(RuntimeError, match="iostream error"):
        SafeCheckpointIO().save_checkpoint({"step": 1}, folder / "last.ckpt")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: _Usage(4096))
    with pytest.raises(DiskFullError, match=rf"^no space left on device in {folder}: last.ckpt could not be written$"):
        SafeCheckpointIO().save_checkpoint({"step": 1}, folder / "last.ckpt")
    assert list(folder.iterdir()) == []  # no partial file left


def test_a_cache_entry_that_a_full_disk_cut_short_says_so_naming_the_cache(tmp_path, monkeypatch, write_nifti):
    import shutil

    import numpy as np

    from lorkd.data import cache as cache_module
    from lorkd.data.cache import PreprocessCache
    from lorkd.data.manifest import Case
    from lorkd.data.transforms import PreprocessConfig
    from lorkd.io import DiskFullError

    image = write_nifti("img.nii.gz", np.random.default_rng(0).normal(40, 30, (20, 18, 8)).astype(np.float32))
    case = Case(image, ["liver"], "ct", "D", None, None, "c", None, None, 1, tmp_path)

    def save(path, array):
        raise OSError("71820 requested and 39904 written")

    monkeypatch.setattr(cache_module.np, "save", save)
    monkeypatch.setattr(shutil, "disk_usage", lambda path: _Usage(0))
    root = tmp_path / "cache"
    with pytest.raises(DiskFullError, match=rf"^no space left on device in {root}: the cache entry of {image} could not"):
        PreprocessCache(root).get(case, PreprocessConfig())
    assert list(root.iterdir()) == []
