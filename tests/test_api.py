"""The Python API without Hydra: ``lorkd.segment`` (images in, images in their own grid out),
``lorkd.load``, ``lorkd.evaluate`` and ``lorkd.export``, from a plain interpreter."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from test_eval import write_case, write_manifest

import lorkd
from lorkd import api

ROOT = Path(__file__).resolve().parents[1]
WINDOW = [32, 32, 16]


def python(code: str, *args: str) -> dict:
    """Run ``code`` with ``python -c`` (offline, the project on the path); the JSON of its last line."""
    env = dict(os.environ, PYTHONPATH=str(ROOT), HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    done = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def ct_image(path: Path) -> Path:
    """A small CT on an oblique, anisotropic grid (not the checkpoint's): outputs must come back on it."""
    shape = (30, 26, 9)
    x, y, z = np.meshgrid(*[np.arange(s) for s in shape], indexing="ij")
    image = np.full(shape, -1000.0, np.float32)
    image[3:-3, 3:-3, :] = 40.0
    image[(x - 12) ** 2 + (y - 13) ** 2 + 4 * (z - 4) ** 2 < 40] = 120.0
    affine = np.array([[0, -1.4, 0, 20], [1.6, 0, 0, -5], [0, 0, 3.5, 7], [0, 0, 0, 1]], float)
    nib.save(nib.Nifti1Image(image, affine), str(path))
    return path


SEGMENT = """
import json, sys
import nibabel as nib
import numpy as np
import lorkd, lorkd.api

checkpoint, image, out = sys.argv[1:]
loads = []
load = lorkd.api.load
lorkd.api.load = lambda *a, **k: loads.append(1) or load(*a, **k)
from_path = lorkd.segment(image, ["liver", "spleen"], modality="ct", model=checkpoint, device="cpu", window=[32, 32, 16])
in_memory = nib.load(image)
from_image = lorkd.segment(in_memory, ["liver", "spleen"], modality="ct", model=checkpoint, device="cpu", window=[32, 32, 16])
np.savez(out, path_liver=np.asarray(from_path.masks["liver"].dataobj), image_liver=np.asarray(from_image.masks["liver"].dataobj),
         path_map=np.asarray(from_path.segmentation.dataobj), image_map=np.asarray(from_image.segmentation.dataobj))
print(json.dumps({
    "loads": len(loads), "hydra": "hydra" in sys.modules,
    "shapes": [list(from_path.masks["liver"].shape), list(from_image.segmentation.shape)],
    "affines": [from_path.masks["liver"].affine.tolist(), from_image.masks["spleen"].affine.tolist()],
    "input": [list(in_memory.shape), in_memory.affine.tolist()],
    "label_ids": from_path.label_ids, "routes": from_image.routes,
}))
"""


def test_segment_from_a_plain_interpreter_on_a_nifti_path_and_a_nibabel_image(distinct_lorkd_ckpt, tmp_path):
    image = ct_image(tmp_path / "ct.nii.gz")
    out = tmp_path / "masks.npz"
    report = python(SEGMENT, str(distinct_lorkd_ckpt), str(image), str(out))
    assert report["loads"] == 1 and not report["hydra"], report  # loaded once for both calls; no Hydra
    shape, affine = report["input"]
    assert report["shapes"] == [shape, shape]  # in the input's grid
    assert np.allclose(report["affines"][0], affine) and np.allclose(report["affines"][1], affine)
    assert report["label_ids"] == {"1": "liver", "2": "spleen"} and report["routes"] == {"liver": "abdomen", "spleen": "abdomen"}
    masks = np.load(out)
    assert np.array_equal(masks["path_liver"], masks["image_liver"]) and np.array_equal(masks["path_map"], masks["image_map"])
    # the same as the Predictor's own result
    expected = lorkd.Predictor.from_checkpoint(distinct_lorkd_ckpt, device="cpu", window=WINDOW).predict(
        str(image), ["liver", "spleen"], "ct"
    )
    assert np.array_equal(masks["path_map"], np.asarray(expected.segmentation.dataobj))
    assert masks["path_map"].any() or not np.asarray(expected.segmentation.dataobj).any()


def test_segment_reuses_the_loaded_model_until_file_options_or_device_change(distinct_lorkd_ckpt, tmp_path, monkeypatch):
    checkpoint = tmp_path / "lorkd.ckpt"
    checkpoint.write_bytes(distinct_lorkd_ckpt.read_bytes())
    image = nib.load(ct_image(tmp_path / "ct.nii.gz"))
    loads: list[dict] = []
    load = api.load
    monkeypatch.setattr(api, "load", lambda *a, **k: loads.append(k) or load(*a, **k))
    monkeypatch.setattr(api, "_last", [])

    def run(**options):
        return lorkd.segment(image, "liver", modality="ct", model=checkpoint, device="cpu", window=WINDOW, **options)

    first = run()
    run()
    assert len(loads) == 1
    run(threshold=0.6)
    assert len(loads) == 2 and loads[-1]["threshold"] == 0.6
    os.utime(checkpoint, ns=(1, 1))  # a rewritten file (another identity) is loaded again
    again = run(threshold=0.6)
    assert len(loads) == 3 and len(api._last) == 1  # one Predictor kept
    assert first.masks["liver"].shape == again.masks["liver"].shape == image.shape

    predictor = lorkd.load(checkpoint, device="cpu", window=WINDOW)
    given = lorkd.segment(image, ["liver"], modality="ct", model=predictor)
    assert np.array_equal(np.asarray(given.masks["liver"].dataobj), np.asarray(first.masks["liver"].dataobj))
    assert len(loads) == 4  # lorkd.load's own; a Predictor given to segment: nothing loaded
    with pytest.raises(ValueError, match="pass them to lorkd.load"):
        lorkd.segment(image, ["liver"], modality="ct", model=predictor, threshold=0.3)


EVALUATE = """
import json, sys
import lorkd, lorkd.api

checkpoint, manifest, out = sys.argv[1:]
summary = lorkd.evaluate(checkpoint, manifest, out, options={"window": [32, 32, 16]},
                         metrics={"tolerance_overrides": {"liver": 2.0}}, trainer={"accelerator": "cpu", "devices": 1})
print(json.dumps({"summary": summary, "hydra": "hydra" in sys.modules, "lightning": "lightning" in sys.modules}))
"""


def _metric_rows(folder: Path) -> list[tuple]:
    with open(folder / "per_case.csv", newline="") as f:
        return sorted((r["case"], r["label"], r["dice"], r["nsd"], r["tolerance_mm"]) for r in csv.DictReader(f))


def test_evaluate_from_a_plain_interpreter_matches_eval_py(tiny_lorkd_ckpt, tmp_path):
    from test_eval import run_eval

    data = tmp_path / "data"
    data.mkdir()
    manifest = write_manifest(data, [write_case(data, i) for i in range(2)])
    report = python(EVALUATE, str(tiny_lorkd_ckpt), str(manifest), str(tmp_path / "api"))
    summary = report["summary"]
    assert not report["hydra"] and not report["lightning"], report  # one process: neither Hydra nor Lightning
    assert (summary["n_cases"], summary["n_failed_cases"], summary["model"]["network"]) == (2, 0, "experts")
    assert json.loads((tmp_path / "api" / "summary.json").read_text()) == summary
    overrides = [f"ckpt_path={tiny_lorkd_ckpt}", f"data.test_manifest={manifest}", "metrics.tolerance_overrides={liver: 2.0}"]
    run_eval(overrides, tmp_path / "cli")
    assert _metric_rows(tmp_path / "api") == _metric_rows(tmp_path / "cli")  # the app calls the same function
    assert {r[4] for r in _metric_rows(tmp_path / "api") if r[1] == "liver"} == {"2.0"}


def test_export_without_hydra(distinct_lorkd_ckpt, tmp_path):
    out = lorkd.export(distinct_lorkd_ckpt, tmp_path / "export", regions=["abdomen", "thorax"])
    assert out == tmp_path / "export"
    index = json.loads((out / "index.json").read_text())
    assert sorted(index["regions"]) == ["abdomen", "thorax"]
    with pytest.raises(FileExistsError):
        lorkd.export(distinct_lorkd_ckpt, out)  # an existing export is replaced only with overwrite=True
    lorkd.export(distinct_lorkd_ckpt, out, regions=["brain"], overwrite=True)
    assert sorted(json.loads((out / "index.json").read_text())["regions"]) == ["brain"]


def test_import_lorkd_is_cheap():
    report = python("import json, sys, lorkd; print(json.dumps(sorted(m for m in ('torch', 'numpy', 'nibabel', 'hydra') if m in sys.modules)))")
    assert report == []
    assert set(lorkd.__all__) == {"segment", "load", "evaluate", "export", "Predictor", "Prediction"}
    assert all(callable(getattr(lorkd, name)) for name in lorkd.__all__)
