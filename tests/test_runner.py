"""The one case runner of predict and eval: skip/resume decided once, cases run, saved and finished in order."""

from __future__ import annotations

from pathlib import Path

import lightning.pytorch as pl

from lorkd.data.manifest import Case
from lorkd.inference.runner import CaseRunner


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

    def __init__(self, done: dict[int, str]) -> None:
        self.done = done
        self.calls: list[str] = []

    def finished(self, cases):
        self.calls.append(f"finished {len(cases)}")
        return self.done

    def run(self, index, case, rank, progress):
        self.calls.append(f"run {index} {case.id} rank {rank}")
        return f"new {case.id}"

    def save(self, outcome):
        self.calls.append(f"save {outcome}")
        return outcome + " saved"

    def finish(self, outcomes, kept):
        self.calls.append(f"finish {kept}")
        return list(outcomes)


def run_cases(task: RecordingTask, overwrite: bool) -> CaseRunner:
    cases = [make_case(f"c{i}") for i in range(4)]
    predictor = Device()
    runner = CaseRunner(task, cases, predictor, overwrite=overwrite)
    trainer = pl.Trainer(
        accelerator="cpu", devices=1, logger=False, enable_progress_bar=False, enable_model_summary=False,
        enable_checkpointing=False, use_distributed_sampler=False,
    )  # fmt: skip
    trainer.predict(runner, return_predictions=False)
    assert predictor.device is not None
    return runner


def test_kept_cases_are_not_run_and_the_outcomes_come_back_in_input_order():
    task = RecordingTask({1: "old c1", 3: "old c3"})
    runner = run_cases(task, overwrite=False)
    assert task.calls == [
        "finished 4", "run 0 c0 rank 0", "save new c0", "run 2 c2 rank 0", "save new c2", "finish 2",
    ]  # fmt: skip
    assert runner.result == ["new c0 saved", "old c1", "new c2 saved", "old c3"]


def test_overwrite_runs_every_case_without_asking_for_earlier_outcomes():
    task = RecordingTask({1: "old c1"})
    runner = run_cases(task, overwrite=True)
    assert [c for c in task.calls if not c.startswith(("run", "save"))] == ["finish 0"]
    assert runner.result == [f"new c{i} saved" for i in range(4)]
