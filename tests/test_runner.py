"""The one case runner of predict and eval: skip/resume decided once, cases run, saved and finished in order,
the same through ``Trainer.predict`` and through the plain one-process loop."""

from __future__ import annotations

from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch

from lorkd.data.manifest import Case
from lorkd.inference.case_runner import run_cases as run_plain
from lorkd.inference.case_runner import single_device
from lorkd.inference.case_runner_lightning import LightningCaseRunner


def make_case(name: str) -> Case:
    return Case(Path(f"/data/{name}.nii.gz"), ["liver"], "ct", "D", None, None, name, None, None, 0, Path("m.jsonl"))


class Device:
    """Stands in for a Predictor: only moved to the rank's device."""

    def __init__(self) -> None:
        self.device = None

    def to(self, device):
        self.device = device
        return self


class RecordingTask:
    """A task whose outcomes are strings; it records what the runner asked of it."""

    def __init__(self, done: dict[int, str], folder: Path, meanwhile: dict[str, str] | None = None) -> None:
        self.done = done
        self.folder = folder
        self.meanwhile = dict(meanwhile or {})  # case id -> outcome another run leaves while this one runs
        self.calls: list[str] = []

    def finished(self, cases):
        self.calls.append(f"finished {len(cases)}")
        return self.done

    def lock_file(self, case):
        return self.folder / f"{case.id}.lock"

    def completed(self, case):
        self.calls.append(f"completed {case.id}")
        return self.meanwhile.get(case.id)

    def run(self, index, case, rank, progress):
        self.calls.append(f"run {index} {case.id} rank {rank}")
        return f"new {case.id}"

    def save(self, outcome):
        self.calls.append(f"save {outcome}")
        return outcome + " saved"

    def finish(self, outcomes, kept):
        self.calls.append(f"finish {kept}")
        return list(outcomes)


def run_cases(task: RecordingTask, overwrite: bool, lightning: bool) -> list[str]:
    """The run's result through ``Trainer.predict`` or the plain loop."""
    cases = [make_case(f"c{i}") for i in range(4)]
    predictor = Device()
    if not lightning:
        result = run_plain(task, cases, predictor, "cpu", overwrite=overwrite)
        assert predictor.device == torch.device("cpu")
        return result
    runner = LightningCaseRunner(task, cases, predictor, overwrite=overwrite)
    trainer = pl.Trainer(
        accelerator="cpu", devices=1, logger=False, enable_progress_bar=False, enable_model_summary=False,
        enable_checkpointing=False, use_distributed_sampler=False,
    )  # fmt: skip
    trainer.predict(runner, return_predictions=False)
    assert predictor.device is not None
    return runner.result


@pytest.mark.parametrize("lightning", [True, False])
def test_kept_cases_are_not_run_and_the_outcomes_come_back_in_input_order(lightning, tmp_path):
    task = RecordingTask({1: "old c1", 3: "old c3"}, tmp_path)
    result = run_cases(task, overwrite=False, lightning=lightning)
    assert task.calls == [
        "finished 4", "completed c0", "run 0 c0 rank 0", "save new c0",
        "completed c2", "run 2 c2 rank 0", "save new c2", "finish 2",
    ]  # fmt: skip
    assert result == ["new c0 saved", "old c1", "new c2 saved", "old c3"]


@pytest.mark.parametrize("lightning", [True, False])
def test_overwrite_runs_every_case_without_asking_for_earlier_outcomes(lightning, tmp_path):
    task = RecordingTask({1: "old c1"}, tmp_path)
    result = run_cases(task, overwrite=True, lightning=lightning)
    assert [c for c in task.calls if not c.startswith(("run", "save"))] == ["finish 0"]
    assert result == [f"new c{i} saved" for i in range(4)]


@pytest.mark.parametrize(
    ("trainer", "device"),
    [
        ({"accelerator": "cpu", "devices": 1, "num_nodes": 1}, torch.device("cpu")),
        ({"accelerator": "cpu", "devices": "auto"}, torch.device("cpu")),
        ({"accelerator": "cpu", "devices": [0], "precision": "32-true"}, torch.device("cpu")),
        ({"accelerator": "cpu", "devices": 2}, None),
        ({"accelerator": "cpu", "devices": 1, "num_nodes": 2}, None),
        ({"accelerator": "cpu", "devices": 1, "precision": "bf16-mixed"}, None),
        ({"accelerator": "tpu", "devices": 1}, None),
    ],
)
def test_one_process_is_told_from_the_trainer_config(trainer, device, monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert single_device(trainer) == device


def test_a_launcher_with_several_ranks_goes_through_lightning(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert single_device({"accelerator": "cpu", "devices": 1}) is None


def test_a_case_another_run_holds_is_put_off_then_kept_when_that_run_completed_it(tmp_path):
    from lorkd.io import FileLock

    other = FileLock(tmp_path / "c1.lock")
    assert other.acquire()  # another run on the same folder is writing c1

    class Task(RecordingTask):
        def save(self, outcome):
            if outcome == "new c3":  # ... and completes it while this run does the others
                self.meanwhile["c1"] = "other's c1"
                other.release()
            return super().save(outcome)

    task = Task({}, tmp_path)
    assert run_cases(task, overwrite=False, lightning=False) == ["new c0 saved", "other's c1", "new c2 saved", "new c3 saved"]
    assert [c for c in task.calls if c.startswith(("run", "completed"))] == [
        "completed c0", "run 0 c0 rank 0", "completed c2", "run 2 c2 rank 0", "completed c3", "run 3 c3 rank 0",
        "completed c1",
    ]  # fmt: skip
