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
