"""Runs sharing an output folder, and a full disk: each case written by one run, another run's files
never removed, a failed case leaves no partial files, one line naming the folder, no traceback."""

from __future__ import annotations

import csv
import errno
import itertools
import logging
import os
import sys
from pathlib import Path

import pytest
from helpers import compose_config, run_script
from test_identity import write_scan

from lorkd.commands.predict import predict
from lorkd.inference import writer
from lorkd.inference.prediction_task import PredictionTask
from lorkd.io import FileLock, _temporary_prefix, lock_path

ARGS = ("labels=[liver]", "modality=ct", "progress=false")


def scans(folder: Path, n: int = 3) -> Path:
    for i in range(n):
        write_scan(folder / f"case{i}.nii", seed=i)
    return folder


def run(ckpt: Path, input: Path, out: Path, *extra: str) -> list[dict]:
    return predict(compose_config("predict", [f"ckpt_path={ckpt}", f"input={input}", f"output_dir={out}", *ARGS, *extra]))


def read_summary(out: Path) -> list[dict]:
    with (out / "summary.csv").open() as f:
        return list(csv.DictReader(f))


def test_a_case_another_run_is_writing_is_left_to_it_and_its_temporaries_are_kept(tiny_lorkd_ckpt, tmp_path, monkeypatch):
    data, out = scans(tmp_path / "scans"), tmp_path / "out"
    other = FileLock(lock_path(out, "case0"))
    assert other.acquire()  # another run (alive: this test's parent process) is writing case0
    partial = out / "case0" / f"{_temporary_prefix(os.getppid())}x.nii.gz"
    partial.parent.mkdir()
    partial.write_bytes(b"being written")
    order = []
    save = PredictionTask.save

    def recording_save(self, outcome):
        order.append(outcome.case.id)
        if outcome.case.id == "case2":
            other.release()  # it stops (killed, say) and leaves case0 unfinished: this run does it last
        return save(self, outcome)

    monkeypatch.setattr(PredictionTask, "save", recording_save)
    rows = run(tiny_lorkd_ckpt, data, out)
    assert order == ["case1", "case2", "case0"]  # put off while the other run held it
    assert [(r["case"], r["status"]) for r in rows] == [("case0", "ok"), ("case1", "ok"), ("case2", "ok")]
    assert partial.read_bytes() == b"being written"  # a live process's temporary: not this run's to remove


def fill_disk_from(call: int, monkeypatch, until: int | None = None) -> None:
    """NIfTI writes ``call`` to ``until`` (None: all later ones) fail with ENOSPC after writing part of their file."""
    calls = itertools.count(1)
    real = writer.save_nifti

    def filling(image, path):
        n = next(calls)
        if n < call or (until is not None and n > until):
            return real(image, path)
        Path(path).write_bytes(b"\0" * 4096)  # what fitted
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(writer, "save_nifti", filling)


def test_a_full_disk_fails_the_case_in_one_line_and_removes_its_partial_files(tiny_lorkd_ckpt, tmp_path, monkeypatch):
    data, out = scans(tmp_path / "scans"), tmp_path / "out"
    fill_disk_from(4, monkeypatch, until=4)  # case0: 2 files; case1: its 2nd does not fit; then space again
    rows = run(tiny_lorkd_ckpt, data, out)
    assert [(r["case"], r["status"]) for r in rows] == [("case0", "ok"), ("case1", "error"), ("case2", "ok")]
    assert rows[1]["error"].startswith(f"no space left on device in {out / 'case1'}:")
    assert "\n" not in rows[1]["error"]
    assert not [p for p in out.glob("case1/**/*") if p.is_file()]  # no partial case left
    assert [r["status"] for r in read_summary(out)] == ["ok", "error", "ok"]


def test_eval_on_a_full_disk_reports_every_case_and_says_which_records_it_could_not_store(
    tiny_lorkd_ckpt, tmp_path, monkeypatch, caplog
):
    from test_eval import run_eval, write_case, write_manifest

    from lorkd.evaluation import task

    data = tmp_path / "data"
    data.mkdir()
    manifest = write_manifest(data, [write_case(data, i) for i in range(2)])
    real = task.save_record

    def full_for_case1(output_dir, record):
        if record.case == "case1":
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(output_dir, record)

    monkeypatch.setattr(task, "save_record", full_for_case1)
    with caplog.at_level(logging.ERROR):
        summary = run_eval([f"ckpt_path={tiny_lorkd_ckpt}", f"data.test_manifest={manifest}"], tmp_path / "eval")
    assert (summary["n_cases"], summary["n_failed_cases"]) == (2, 0)
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR] == [
        f"no space left on device in {tmp_path / 'eval' / 'cases'}: record of Tiny/case1 not stored"
    ]


FULL_DISK = """
import errno, itertools, sys
from pathlib import Path
from lorkd.inference import prediction_task, writer
calls = itertools.count(1)
real = writer.save_nifti
def filling(image, path):
    if next(calls) < 3:
        return real(image, path)
    Path(path).write_bytes(bytes(4096))
    raise OSError(errno.ENOSPC, "No space left on device")
def summary(path, rows):
    raise OSError(errno.ENOSPC, "No space left on device")
writer.save_nifti = filling
prediction_task.write_summary = summary
sys.argv = ["predict.py", *sys.argv[1:]]
from lorkd.cli import predict
predict()
"""


@pytest.mark.slow
def test_the_command_on_a_full_disk_ends_in_one_line_per_problem_without_a_traceback(tiny_lorkd_ckpt, tmp_path):
    import subprocess

    data, out = scans(tmp_path / "scans"), tmp_path / "out"
    done = subprocess.run(
        [sys.executable, "-c", FULL_DISK, f"ckpt_path={tiny_lorkd_ckpt}", f"input={data}", f"output_dir={out}", *ARGS],
        cwd=tmp_path, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    log = done.stdout + done.stderr
    assert done.returncode == 1, log[-3000:]
    assert "Traceback" not in log
    assert log.count(f"no space left on device in {out / 'case1'}:") >= 1
    assert f"no space left on device in {out}: summary.csv not written" in log
    assert not [p for p in out.glob("case[12]/**/*") if p.is_file()]  # the failed cases left nothing


@pytest.mark.slow
def test_two_runs_on_one_folder_predict_each_case_once_and_both_finish(tiny_lorkd_ckpt, tmp_path):
    import subprocess
    import time

    data, out = scans(tmp_path / "scans", 6), tmp_path / "out"
    args = [f"ckpt_path={tiny_lorkd_ckpt}", f"input={data}", f"output_dir={out}", *ARGS]
    command = [sys.executable, str(Path(__file__).resolve().parents[1] / "predict.py"), *args]
    first = subprocess.Popen(command, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    time.sleep(0.8)
    second = run_script("predict.py", args, tmp_path)
    log = first.communicate(timeout=300)[0] + second.stdout + second.stderr
    assert (first.returncode, second.returncode) == (0, 0), log[-3000:]
    predicted = [int(line.split(" predicted")[0].split()[-1]) for line in log.splitlines() if " predicted, " in line]
    assert len(predicted) == 2 and sum(predicted) == 6, log[-3000:]  # each case once, by one run or the other
    assert [r["status"] for r in read_summary(out)] and {r["status"] for r in read_summary(out)} <= {"ok", "skipped"}
