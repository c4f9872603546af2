"""lorkd.io.publish_folder: the one folder publisher (the data cache's entries, lorkd-export's folders)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from lorkd.io import publish_folder


def _folder(path: Path, text: str) -> Path:
    path.mkdir()
    (path / "file.txt").write_text(text)
    return path


def test_a_new_folder_is_published_and_an_earlier_one_replaced_without_leftovers(tmp_path):
    out = tmp_path / "out"
    assert publish_folder(_folder(tmp_path / "stage1", "one"), out)
    assert publish_folder(_folder(tmp_path / "stage2", "two"), out)
    assert (out / "file.txt").read_text() == "two"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # stages moved, the old folder removed


def test_an_existing_folder_the_caller_keeps_stays_and_the_stage_is_left(tmp_path):
    out = _folder(tmp_path / "out", "first")
    stage = _folder(tmp_path / "stage", "second")
    assert not publish_folder(stage, out, keep=lambda target: (target / "file.txt").read_text() == "first")
    assert (out / "file.txt").read_text() == "first" and stage.is_dir()
    assert publish_folder(stage, out, keep=lambda target: False)
    assert (out / "file.txt").read_text() == "second"


def test_the_earlier_folder_is_put_back_when_the_new_one_cannot_be_moved(tmp_path, monkeypatch):
    out = _folder(tmp_path / "out", "earlier")
    stage = _folder(tmp_path / "stage", "new")
    real = os.replace

    def failing(src, dst):
        if Path(src) == stage:
            raise OSError("disk gone")
        return real(src, dst)

    monkeypatch.setattr(os, "replace", failing)
    with pytest.raises(OSError, match="disk gone"):
        publish_folder(stage, out)
    assert (out / "file.txt").read_text() == "earlier"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "stage"]
