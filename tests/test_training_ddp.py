import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import demo_overrides, train_until_signal

from lorkd.exit_codes import STOPPED

ROOT = Path(__file__).resolve().parents[1]


def _env() -> dict[str, str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT / "tests"), "WANDB_MODE": "disabled"}
    env.pop("MASTER_PORT", None)  # Lightning picks a free port
    return env


def _step(path: Path) -> int:
    return int(torch.load(path, map_location="cpu", weights_only=True)["global_step"])


@pytest.mark.slow
@pytest.mark.parametrize(
    "trainer",
    [
        pytest.param(("trainer.accelerator=cpu", "trainer.devices=2", "trainer.strategy=ddp_find_unused_parameters_true"), id="ddp"),
        pytest.param(("trainer=ddp_sim",), id="ddp_sim"),  # spawned workers, whose state stays in them
    ],
)  # fmt: skip
def test_two_process_cpu_ddp_fit_updates_seen_experts_and_keeps_ranks_identical(
    tiny_demo_data, tiny_teacher_ckpt, tmp_path, trainer
):
    report = tmp_path / "ranks.json"
    overrides = [
        "experiment=demo",
        f"teacher.checkpoint={tiny_teacher_ckpt}",
        *demo_overrides(tiny_demo_data, tmp_path, steps=3),
        "data.region_change_interval=1",
        *trainer,
        f"hydra.run.dir={tmp_path}/run",
        "+callbacks.rank_digest._target_=helpers.RankDigest",
        f"+callbacks.rank_digest.path={report}",
    ]
    proc = subprocess.run(
        [sys.executable, str(ROOT / "train.py"), *overrides],
        cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=600, start_new_session=True,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(report.read_text())
    assert len(result["digests"]) == 2 and result["digests"][0] == result["digests"][1]
    assert result["per_rank_regions"][0] != result["per_rank_regions"][1] or len(result["regions"]) >= 1
    seen = {result["expert_names"][r] for r in result["regions"]}
    moved = {name for name, norm in result["lora_b_norms"].items() if norm > 0}
    assert seen and moved == seen  # every expert that saw data (on any rank) was updated, no other
    last = tmp_path / "run" / "checkpoints" / "last.ckpt"
    assert _step(last) == 3
    assert f"finished at step 3; output in {tmp_path / 'run'}" in proc.stdout


@pytest.mark.slow
def test_ddp_sim_teacher_stops_on_sigterm_resumes_and_names_the_step_it_reached(tiny_demo_data, tmp_path):
    out = tmp_path / "run"
    last = out / "checkpoints" / "last.ckpt"
    overrides = [
        "experiment=demo_teacher",
        *demo_overrides(tiny_demo_data, tmp_path, steps=2),
        "trainer=ddp_sim",
        f"hydra.run.dir={out}",
    ]
    # SIGTERM to the main process, which passes it on to its two spawned workers
    code, output = train_until_signal([*overrides, "trainer.max_steps=500"], last, tmp_path, _env())
    assert code == STOPPED, output[-3000:]
    stopped_at = _step(last)
    assert 2 <= stopped_at < 500
    assert f"stopped by SIGTERM at step {stopped_at} of 500: {last} holds it" in output
    # resumed, it finishes at the step it reached (read back from the workers' last.ckpt), not at step 0
    proc = subprocess.run(
        [sys.executable, str(ROOT / "train.py"), *overrides, f"trainer.max_steps={stopped_at + 1}", f"ckpt_path={last}"],
        cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=600, start_new_session=True,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert _step(last) == stopped_at + 1
    assert f"finished at step {stopped_at + 1}; output in {out}" in proc.stdout
