import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import demo_overrides

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_two_process_cpu_ddp_fit_updates_seen_experts_and_keeps_ranks_identical(
    tiny_demo_data, tiny_teacher_ckpt, tmp_path
):
    report = tmp_path / "ranks.json"
    overrides = [
        "experiment=demo",
        f"teacher.checkpoint={tiny_teacher_ckpt}",
        *demo_overrides(tiny_demo_data, tmp_path, steps=3),
        "data.region_change_interval=1",
        "trainer.accelerator=cpu",
        "trainer.devices=2",
        "trainer.strategy=ddp_find_unused_parameters_true",
        f"hydra.run.dir={tmp_path}/run",
        "+callbacks.rank_digest._target_=helpers.RankDigest",
        f"+callbacks.rank_digest.path={report}",
    ]
    env = {**os.environ, "PYTHONPATH": str(ROOT / "tests"), "WANDB_MODE": "disabled"}
    env.pop("MASTER_PORT", None)
    proc = subprocess.run(
        [sys.executable, str(ROOT / "train.py"), *overrides],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600, start_new_session=True,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(report.read_text())
    assert len(result["digests"]) == 2 and result["digests"][0] == result["digests"][1]
    assert result["per_rank_regions"][0] != result["per_rank_regions"][1] or len(result["regions"]) >= 1
    seen = {result["expert_names"][r] for r in result["regions"]}
    moved = {name for name, norm in result["lora_b_norms"].items() if norm > 0}
    assert seen and moved == seen  # every expert that saw data (on any rank) was updated, no other
    assert (tmp_path / "run" / "checkpoints" / "last.ckpt").is_file()
