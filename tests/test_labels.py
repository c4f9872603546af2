"""``lorkd-labels`` and ``Predictor.labels()``: the labels a checkpoint or export knows, with experts and sizes."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from lorkd.checkpoints.loading import load_model
from lorkd.experts import base_parameter_count, expert_parameter_counts
from lorkd.inference.predictor import Predictor
from lorkd.regions import RegionMap, UnknownLabelError
from lorkd.utils import PROJECT_ROOT


def _labels_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "lorkd.commands.labels", *args], cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=300
    )


def test_catalogue_of_a_lorkd_checkpoint_lists_every_label_with_its_expert(tiny_lorkd_ckpt):
    predictor = Predictor.from_checkpoint(tiny_lorkd_ckpt, device="cpu")
    entry = predictor.labels()
    demo = RegionMap.from_config("demo")
    listed = {f"{m}_{row['label']}": row for m, rows in entry["labels"].items() for row in rows}
    assert set(listed) == set(demo.label_region)
    assert listed["ct_liver"] == {"label": "liver", "region": "abdomen", "expert": True, "route": "abdomen", "prompt": True}
    whole_body = [row for row in listed.values() if row["region"] == "whole_body"]
    assert whole_body and not any(row["expert"] for row in whole_body)
    net = predictor.model.net
    assert entry["parameters"]["deployed"] == base_parameter_count(net)
    assert entry["parameters"]["experts"] == expert_parameter_counts(net.backbone)
    assert [e["region"] for e in entry["experts"]] == predictor.model.experts
    assert list(predictor.labels("T2")) and set(predictor.labels("T2")["labels"]) == {"mri"}


def test_catalogue_of_an_export_matches_its_checkpoint(tiny_export, distinct_lorkd_ckpt):
    from lorkd.label_catalogue import catalogue

    exported, checkpoint = catalogue(load_model(tiny_export)), catalogue(load_model(distinct_lorkd_ckpt))
    assert exported["labels"] == checkpoint["labels"]
    assert exported["parameters"] == checkpoint["parameters"]


def test_catalogue_of_a_teacher_lists_its_prompt_bank(tiny_teacher_ckpt):
    entry = Predictor.from_checkpoint(tiny_teacher_ckpt, device="cpu").labels("ct")
    assert entry["experts"] == [] and entry["network"] == "teacher"
    rows = entry["labels"]["ct"]
    assert {"liver", "left lung"} <= {row["label"] for row in rows}
    assert {row["route"] for row in rows} == {"model"}


def test_unknown_label_errors_point_to_lorkd_labels(tiny_lorkd_ckpt):
    predictor = Predictor.from_checkpoint(tiny_lorkd_ckpt, device="cpu")
    with pytest.raises(UnknownLabelError, match="lorkd-labels"):
        predictor.check(["livr"], "ct")


@pytest.mark.slow
def test_lorkd_labels_command_prints_a_table_and_json(tiny_lorkd_ckpt):
    done = _labels_cli(f"ckpt_path={tiny_lorkd_ckpt}", "json=true")
    assert done.returncode == 0, done.stderr
    entry = json.loads(done.stdout)
    assert {"ct", "mri"} <= set(entry["labels"]) and entry["experts"][0]["region"] == "abdomen"
    table = _labels_cli(f"ckpt_path={tiny_lorkd_ckpt}", "modality=ct")
    assert table.returncode == 0, table.stderr
    assert "liver" in table.stdout and "ct (" in table.stdout and "mri (" not in table.stdout
    missing = _labels_cli("ckpt_path=/nonexistent.ckpt")
    assert missing.returncode == 1 and "lorkd-labels: error:" in missing.stderr
