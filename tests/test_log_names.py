"""Names in log lines: a file name holding a newline (or another control character) cannot forge a line."""

from __future__ import annotations

import csv
import logging

import nibabel as nib
import numpy as np
from helpers import compose_config

from lorkd.commands.predict import predict
from lorkd.io import printable

FORGED = "[2026-01-01 00:00:00,000][lorkd][INFO] - all cases verified"


def test_printable_escapes_control_and_direction_characters_and_keeps_every_script():
    assert printable("a\nb\rc\x1b[31md\x00e\x7f\x85") == "a\\nb\\rc\\x1b[31md\\x00e\\x7f\\x85"
    assert printable("x\u2028y\u202ez\u2066") == "x\\u2028y\\u202ez\\u2066"
    assert printable("hígado 肝臓 Ωmega/organ_1.nii.gz") == "hígado 肝臓 Ωmega/organ_1.nii.gz"


def test_a_file_name_with_a_newline_writes_no_forged_line_into_the_log(tiny_lorkd_ckpt, tmp_path, caplog):
    data = tmp_path / "scans"
    data.mkdir()
    # a constant image (its warning names it) and an unreadable one (its error names it)
    nib.save(nib.Nifti1Image(np.zeros((20, 16, 6), np.float32), np.eye(4)), data / f"flat\n{FORGED}.nii.gz")
    (data / f"broken\r\n{FORGED}.nii.gz").write_bytes(b"not a nifti file")
    out = tmp_path / "out"
    overrides = [f"ckpt_path={tiny_lorkd_ckpt}", f"input={data}", f"output_dir={out}", "progress=false",
                 "writer.preview=false", "labels=[liver]", "modality=ct"]  # fmt: skip
    with caplog.at_level(logging.INFO):
        rows = predict(compose_config("predict", overrides))
    assert sorted(r["status"] for r in rows) == ["error", "ok"]
    lines = caplog.text.splitlines()
    assert not [line for line in lines if line.startswith("[2026")]  # no line begins with the name's second part
    assert any(f"flat\\n{FORGED}.nii.gz: constant image" in line for line in lines)
    assert any("case broken\\r\\n[2026" in line and "cannot read image" in line for line in lines)
    with (out / "summary.csv").open(newline="") as f:
        (error,) = [row["error"] for row in csv.DictReader(f) if row["status"] == "error"]
    assert f"broken\\r\\n{FORGED}.nii.gz: cannot read image" in error and "\n" not in error
