"""Shared fixtures: the region map used by the demo, and a writer of small synthetic NIfTI files."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from lorkd.regions import RegionMap


@pytest.fixture(scope="session", autouse=True)
def lorkd_cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """Networks converted for OpenVINO (predict's default runtime on the CPU) go to a session folder, not ~/.cache."""
    folder = tmp_path_factory.mktemp("lorkd_cache")
    before = os.environ.get("LORKD_CACHE_DIR")
    os.environ["LORKD_CACHE_DIR"] = str(folder)
    yield folder
    if before is None:
        os.environ.pop("LORKD_CACHE_DIR", None)
    else:
        os.environ["LORKD_CACHE_DIR"] = before


@pytest.fixture(scope="session")
def region_map() -> RegionMap:
    """sat49 plus the demo's extra label (ct 'liver tumor' -> abdomen, abnormal), as configs/regions/demo.yaml."""
    return RegionMap.from_config("demo")


@pytest.fixture
def write_nifti(tmp_path: Path) -> Callable[..., Path]:
    """``write_nifti(name, array, affine=None)`` saves under tmp_path and returns the path."""

    def write(name: str, array: np.ndarray, affine: np.ndarray | None = None) -> Path:
        path = tmp_path / name
        path.parent.mkdir(parents=True, exist_ok=True)
        nib.save(
            nib.Nifti1Image(np.asarray(array), np.eye(4) if affine is None else np.asarray(affine)), str(path)
        )
        return path

    return write


@pytest.fixture(scope="session")
def tiny_demo_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small synthetic demo set (2 train / 1 val / 1 test case per region, no real scans)."""
    from lorkd.data.demo import build_demo

    out = tmp_path_factory.mktemp("demo_data")
    build_demo(out, seed=0, real=False, counts=(2, 1, 1))
    return out


@pytest.fixture(scope="session")
def tiny_teacher_ckpt(tiny_demo_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A SATModule checkpoint (demo teacher architecture) after 2 CPU steps."""
    from helpers import demo_overrides, run_training

    out = tmp_path_factory.mktemp("teacher")
    run_training(["experiment=demo_teacher", *demo_overrides(tiny_demo_data, out)], out)
    return out / "checkpoints" / "last.ckpt"


@pytest.fixture(scope="session")
def tiny_lorkd_ckpt(tiny_demo_data: Path, tiny_teacher_ckpt: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A LoRKD checkpoint (demo student + 8 region experts) distilled for 2 CPU steps from ``tiny_teacher_ckpt``."""
    from helpers import demo_overrides, run_training

    out = tmp_path_factory.mktemp("lorkd")
    run_training(["experiment=demo", f"teacher.checkpoint={tiny_teacher_ckpt}", *demo_overrides(tiny_demo_data, out)], out)
    return out / "checkpoints" / "last.ckpt"


@pytest.fixture(scope="session")
def distinct_lorkd_ckpt(tiny_lorkd_ckpt: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``tiny_lorkd_ckpt`` with random LoRA B weights, so every expert differs from the base and merging matters."""
    import torch

    raw = torch.load(tiny_lorkd_ckpt, map_location="cpu", weights_only=True)
    g = torch.Generator().manual_seed(0)
    for key, value in raw["state_dict"].items():
        if ".lora_B." in key:
            raw["state_dict"][key] = torch.randn(value.shape, generator=g) * 0.05
    path = tmp_path_factory.mktemp("distinct") / "lorkd.ckpt"
    torch.save(raw, path)
    return path


@pytest.fixture(scope="session")
def tiny_export(distinct_lorkd_ckpt: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The expert export of ``distinct_lorkd_ckpt`` (alone in its parent folder; tests must not modify it)."""
    from lorkd.checkpoints.export import export_experts

    return export_experts(distinct_lorkd_ckpt, tmp_path_factory.mktemp("exports") / "demo")
