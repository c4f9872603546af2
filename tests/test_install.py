"""A non-editable install works from any directory: configs and callbacks ship inside the package.

The project is installed (``pip install``, no ``-e``) into a fresh virtual environment that reuses the
running interpreter's dependencies through a ``.pth`` line instead of reinstalling them; the console
scripts then run from a folder outside the repository.
"""

from __future__ import annotations

import json
import os
import shutil
import site
import subprocess
import sys
from pathlib import Path

import pytest

from lorkd.utils import PROJECT_ROOT

pytestmark = pytest.mark.slow

# what a source distribution of the project holds (tests, scripts and data are not part of the package)
SOURCES = ("pyproject.toml", "setup.py", "README.md", "lorkd", "callbacks", "configs")


def _run(command: list[str], cwd: Path, env: dict[str, str], timeout: float = 300) -> str:
    done = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, f"{' '.join(command)}\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done.stdout


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, str], Path]:
    """(bin folder of a fresh venv holding a non-editable install of this checkout, its environment,
    its site-packages)."""
    root = tmp_path_factory.mktemp("install")
    source = root / "source"
    source.mkdir()
    for name in SOURCES:
        if (PROJECT_ROOT / name).is_dir():
            shutil.copytree(PROJECT_ROOT / name, source / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(PROJECT_ROOT / name, source / name)
    venv = root / "venv"
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, env=env)
    python = venv / "bin" / "python"
    packages = Path(_run([str(python), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"], root, env).strip())
    # the dependencies already installed here; a .pth path line adds the folder without running the
    # .pth files inside it, so an editable install of lorkd there stays invisible
    (packages / "dependencies.pth").write_text("\n".join(site.getsitepackages()) + "\n")
    _run(
        [sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps", "--no-build-isolation",
         "--ignore-installed", "--no-index", "--quiet", str(source)],
        root, env,
    )  # fmt: skip
    shutil.rmtree(source)  # the installed copy must not need the source tree
    where = _run([str(python), "-c", "import lorkd.callbacks, lorkd.utils as u; print(lorkd.callbacks.__file__, u.CONFIG_DIR)"], root, env)
    callbacks, configs = map(Path, where.split())
    assert callbacks.is_relative_to(packages / "lorkd") and configs == packages / "lorkd" / "configs", where
    assert not (packages / "callbacks").exists() and not (packages / "configs").exists()
    return venv / "bin", env, packages


def test_console_scripts_answer_help_outside_the_repository(installed, tmp_path):
    bin_dir, env, _ = installed
    for command, key in (("lorkd-predict", "ckpt_path"), ("lorkd-export", "ckpt_path"), ("lorkd-eval", "ckpt_path"),
                         ("lorkd-train", "experiment")):  # fmt: skip
        out = _run([str(bin_dir / command), "--help"], tmp_path, env)
        assert "Powered by Hydra" in out and key in out, out[-2000:]


def test_installed_predict_and_export_run_outside_the_repository(installed, tiny_lorkd_ckpt, tiny_demo_data, tmp_path):
    bin_dir, env, packages = installed
    image = json.loads((tiny_demo_data / "test.jsonl").read_text().splitlines()[0])["image"]
    image = Path(image) if Path(image).is_absolute() else tiny_demo_data / image
    _run(
        [str(bin_dir / "lorkd-predict"), f"ckpt_path={tiny_lorkd_ckpt}", f"input={image}", "output_dir=pred",
         "labels=[liver]", "modality=ct", "progress=false", "writer.preview=false"],
        tmp_path, env,
    )  # fmt: skip
    case = next(p for p in (tmp_path / "pred").iterdir() if p.is_dir() and not p.name.startswith("."))
    assert (case / "segmentation.nii.gz").is_file() and (case / "liver.nii.gz").is_file()
    assert (tmp_path / "pred" / "summary.csv").is_file()
    _run([str(bin_dir / "lorkd-export"), f"ckpt_path={tiny_lorkd_ckpt}", "output_dir=export", "only=[abdomen]"], tmp_path, env)
    assert json.loads((tmp_path / "export" / "index.json").read_text())["expert_order"] == ["abdomen"]
    # default outputs (Hydra run folders) go under the working directory, never into the installation
    assert {p.name for p in tmp_path.iterdir()} <= {"export", "pred", "outputs"}
    assert {p.name for p in packages.iterdir() if not p.name.endswith((".pth", ".dist-info"))} <= {"lorkd", "__pycache__"}
