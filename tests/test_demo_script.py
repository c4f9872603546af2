"""``scripts/demo.py`` pins what its table depends on: thread count and the CPU kernels' instruction set."""

from __future__ import annotations

import os
import subprocess
import sys

from lorkd.utils import PROJECT_ROOT
from scripts import demo


def test_the_pinned_environment_gives_the_stages_avx2_kernels_and_two_threads():
    probe = "import torch; print(torch.backends.cpu.get_cpu_capability(), torch.get_num_threads())"
    env = {**os.environ, **demo.PINNED}
    done = subprocess.run(
        [sys.executable, "-c", probe], env=env, capture_output=True, text=True, cwd=PROJECT_ROOT
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["AVX2", "2"]  # an AVX-512 host too runs the AVX2 kernels
    assert "2 threads, AVX2 kernels" in demo.environment_line()


# synthetic (teacher, experts) means of the demo runs recorded in RESULTS.md ("The demo across hosts")
RECORDED_RUNS = {
    "AVX2 hosts (README table until issue 25)": (0.814, 0.840),
    "AMD EPYC, AVX-512, kernels not pinned": (0.776, 0.875),
    "Intel Xeon, AVX-512 + AMX, pinned to AVX2": (0.825, 0.877),
}


def test_the_claims_hold_on_every_recorded_run_and_fail_where_they_should():
    for run, means in RECORDED_RUNS.items():
        assert demo.claim_failures(*means) == [], run
    assert demo.claim_failures(0.814, 0.830) == ["experts - teacher +0.016 < +0.02"]  # experts barely ahead
    assert demo.claim_failures(0.70, 0.80) == ["teacher Dice 0.700 < 0.75", "experts Dice 0.800 < 0.82"]
    assert len(demo.claim_failures(0.85, 0.83)) == 1  # experts behind the teacher


def _per_case(folder, rows):
    folder.mkdir(parents=True)
    lines = ["dataset,case,region,label,dice", *(",".join(map(str, row)) for row in rows)]
    (folder / "per_case.csv").write_text("\n".join(lines) + "\n")


def test_synthetic_means_average_the_phantom_rows_only(tmp_path):
    _per_case(tmp_path / "teacher", [
        ("DemoAbdomenCT", "a1", "abdomen", "liver", 0.8), ("DemoBrainMRI", "b1", "brain", "white matter", 0.6),
        ("LiTS", "lits_117", "abdomen", "liver", 0.1),
    ])  # fmt: skip
    _per_case(tmp_path / "lorkd", [
        ("DemoAbdomenCT", "a1", "abdomen", "liver", 0.9), ("DemoBrainMRI", "b1", "brain", "white matter", 0.7),
        ("LiTS", "lits_117", "abdomen", "liver", 0.0),
    ])  # fmt: skip
    teacher, experts = demo.synthetic_means(tmp_path)
    assert (round(teacher, 6), round(experts, 6)) == (0.7, 0.8)


def test_the_readme_states_the_claims_the_demo_checks():
    readme = (PROJECT_ROOT / "README.md").read_text(encoding="utf-8")
    claims = readme.split("## The demo", 1)[1].split("\n## ", 1)[0]
    for bound in (f"≥ {demo.CLAIMS['teacher']}", f"≥ {demo.CLAIMS['experts']}", f"≥ +{demo.CLAIMS['gain']}"):
        assert bound in claims, bound
