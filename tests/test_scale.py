"""``scripts/benchmarks/scale.py``: FLOPs of a training step on the meta device, and the workers it asks for."""

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from lorkd.memory import experiment_config  # noqa: E402
from scripts.benchmarks.scale import Row, training_step_flops  # noqa: E402

SMALL = ["data.patch_size=[96,96,32]", "data.max_queries=4"]


@pytest.fixture(scope="module")
def pro():
    return experiment_config("pro", SMALL)


def test_step_flops_grow_with_the_micro_batch_and_count_the_recomputation(pro):
    one = training_step_flops(pro, micro_batch=1, checkpointing=False)
    two = training_step_flops(pro, micro_batch=2, checkpointing=False)
    assert two == pytest.approx(2 * one, rel=0.02)
    recomputed = training_step_flops(pro, micro_batch=1, checkpointing=True)
    # one more forward of the student's U-Net: more than nothing, less than a whole forward+backward
    assert 1.05 * one < recomputed < 1.5 * one


def test_workers_per_gpu_keep_up_with_the_step():
    row = Row("pro", 2, 4, False, 43.0, patches_per_s=3.0, sample_mb=30.0, queue_mb=120.0, worker_rss_gib=1.0,
              h100_s_per_sample=0.135)  # fmt: skip
    assert row.workers == 3  # 2 workers make 6 patches/s, the GPU eats 7.4
    assert row.host_gib == pytest.approx(3 * (1.0 + 120 / 1024))
