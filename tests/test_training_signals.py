"""Training that stops says so and resumes from its latest state: SIGTERM saves ``last.ckpt`` and exits
143, ``last.ckpt`` is always the latest state (never ``last-v1.ckpt``), a resumed run removes the
temporary files of an interrupted checkpoint write."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import torch
from helpers import demo_overrides, run_training, train_until_signal

from lorkd.exit_codes import STOPPED

TEACHER = "experiment=demo_teacher"


def train(data: Path, out: Path, steps: int, *extra: str) -> Path:
    """A tiny demo-teacher run of ``steps`` steps into ``out``; returns its last.ckpt."""
    run_training([TEACHER, *demo_overrides(data, out, steps=steps), f"paths.cache_dir={out.parent / 'cache'}", *extra], out)
    return out / "checkpoints" / "last.ckpt"


def step_of(path: Path) -> int:
    return int(torch.load(path, map_location="cpu", weights_only=True)["global_step"])


def test_sigterm_saves_last_checkpoint_exits_nonzero_and_the_run_resumes(tiny_demo_data, tmp_path):
    out = tmp_path / "run"
    last = out / "checkpoints" / "last.ckpt"
    overrides = [
        TEACHER,
        *demo_overrides(tiny_demo_data, out, steps=2),  # last.ckpt every 2 steps
        f"paths.cache_dir={tmp_path / 'cache'}",
        "trainer.max_steps=500",  # far more than the test waits for
        f"hydra.run.dir={out}",
    ]
    assert not last.exists()
    code, output = train_until_signal(overrides, last, tmp_path, {**os.environ, "WANDB_MODE": "disabled"})
    assert code == STOPPED, output[-3000:]
    stopped_at = step_of(last)
    assert 2 <= stopped_at < 500
    line = f"stopped by SIGTERM at step {stopped_at} of 500: {last} holds it; resume with ckpt_path={last}"
    assert line in output and line in (out / "demo_teacher.log").read_text()
    assert "finished at step" not in output
    assert not [p.name for p in last.parent.iterdir() if p.name.startswith(".tmp-")]
    # and it resumes from there
    resumed = train(tiny_demo_data, out, stopped_at + 1, f"ckpt_path={last}", "trainer.val_check_interval=500")
    assert step_of(resumed) == stopped_at + 1


def test_last_checkpoint_is_the_latest_state_after_a_resume_with_another_cadence(tiny_demo_data, tmp_path):
    out = tmp_path / "run"
    last = train(tiny_demo_data, out, 2)
    assert step_of(last) == 2
    # resumed into the same folder with another every_n_train_steps (Lightning does not recognise the
    # callback's state then): its saves go on to last.ckpt, and the final step 5, off the cadence of 3
    # and with no validation, is in it too
    train(
        tiny_demo_data, out, 5, f"ckpt_path={last}",
        "callbacks.model_checkpoint.every_n_train_steps=3", "trainer.val_check_interval=100",
    )  # fmt: skip
    names = sorted(p.name for p in last.parent.iterdir())
    assert not [n for n in names if n.startswith("last") and n != "last.ckpt"], names
    assert step_of(last) == 5


def test_resume_removes_temporary_files_of_an_interrupted_checkpoint_write(tiny_demo_data, tmp_path):
    out = tmp_path / "run"
    last = train(tiny_demo_data, out, 1)
    folder = last.parent
    stale = folder / ".tmp-k1lled0.ckpt"  # what atomic_write leaves when the process is killed mid-write
    stale.write_bytes(b"partial")
    kept = [folder / "notes.txt", out / ".tmp-other.ckpt"]  # not a checkpoint temporary; not in the checkpoint folder
    for path in kept:
        path.write_text("keep")
    train(tiny_demo_data, out, 2, f"ckpt_path={last}")
    assert not stale.exists()
    assert all(path.read_text() == "keep" for path in kept)
    assert step_of(last) == 2


def test_slurm_requeue_signal_saves_last_checkpoint_and_requeues_the_job(tiny_demo_data, tmp_path):
    out = tmp_path / "run"
    last = out / "checkpoints" / "last.ckpt"
    bin_dir, calls = tmp_path / "bin", tmp_path / "scontrol.txt"
    bin_dir.mkdir()
    scontrol = bin_dir / "scontrol"
    scontrol.write_text(f'#!/bin/sh\necho "$@" >> {calls}\n')
    scontrol.chmod(0o755)
    slurm = {  # what srun gives a one-task job; --signal=SIGUSR1@120 asks for the requeue signal
        "SLURM_NTASKS": "1", "SLURM_NTASKS_PER_NODE": "1", "SLURM_JOB_NAME": "lorkd", "SLURM_JOB_ID": "4242",
        "SLURM_PROCID": "0", "SLURM_LOCALID": "0", "SLURM_NODEID": "0", "SLURM_NODELIST": "localhost",
    }  # fmt: skip
    env = {**os.environ, **slurm, "PATH": f"{bin_dir}:{os.environ['PATH']}", "WANDB_MODE": "disabled"}
    overrides = [
        TEACHER, *demo_overrides(tiny_demo_data, out, steps=2), f"paths.cache_dir={tmp_path / 'cache'}",
        "trainer.max_steps=500", f"hydra.run.dir={out}",
    ]  # fmt: skip
    code, output = train_until_signal(overrides, last, tmp_path, env, signum=signal.SIGUSR1)
    assert code == STOPPED, output[-3000:]
    assert calls.read_text().split() == ["requeue", "4242"]
    assert "requeued SLURM job 4242; it resumes from last.ckpt" in output
    assert f"stopped by SIGUSR1 at step {step_of(last)} of 500" in output
    assert not list(out.glob("hpc_ckpt_*.ckpt"))  # the state is in last.ckpt, not in Lightning's own file
