"""Start-up: predicting imports neither peft, W&B, MONAI nor transformers, nor (one process) Lightning
(peft is only for training students with experts; MONAI only for training's augmentations: grids,
resampling and blending are ``lorkd``'s own).

Checked structurally in a fresh interpreter (``scripts/benchmarks/startup.py`` measures the seconds).
"""

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]


def run_probe(code: str, *args: str) -> Any:
    """Run ``code`` in a fresh interpreter (the project on the path, offline) and return the JSON of its
    last stdout line; fails with the probe's stderr when it does not exit 0."""
    env = dict(os.environ, PYTHONPATH=str(ROOT), HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    done = subprocess.run(
        [sys.executable, "-c", code, *args], capture_output=True, text=True, env=env, cwd=ROOT, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


PROBE = """
import json, sys
import numpy as np
from lorkd.inference.predictor import Predictor
before = sorted(m for m in ("peft", "wandb", "monai") if m in sys.modules)
predictor = Predictor.from_checkpoint(sys.argv[1], device="cpu")
result = predictor.predict(np.zeros((24, 24, 12), np.float32) + np.arange(12), ["liver"], "ct", affine=np.eye(4))
after = sorted(m for m in ("peft", "wandb", "monai") if m in sys.modules)
print(json.dumps({"before": before, "after": after, "routes": result.routes}))
"""


def test_predicting_with_an_export_imports_neither_peft_wandb_nor_monai(tiny_export):
    report = run_probe(PROBE, str(tiny_export))
    assert report["routes"] == {"liver": "abdomen"}  # the abdomen expert ran
    assert report["before"] == [] and report["after"] == [], report


CLI_PROBE = """
import json, runpy, sys
found = {}


class Watch:  # who imports transformers: the top-level packages on the stack at its first import
    def find_spec(self, name, path=None, target=None):
        if name == "transformers" and name not in found:
            frame, names = sys._getframe(1), set()
            while frame is not None:
                names.add(str(frame.f_globals.get("__name__", "")).split(".")[0])
                frame = frame.f_back
            found[name] = sorted(names)
        return None


sys.meta_path.insert(0, Watch())
from hydra._internal.config_loader_impl import ConfigLoaderImpl

compositions, load = [], ConfigLoaderImpl.load_configuration
ConfigLoaderImpl.load_configuration = lambda self, *a, **k: compositions.append(1) or load(self, *a, **k)
sys.argv = ["predict.py", *sys.argv[1:]]
try:
    runpy.run_path("predict.py", run_name="__main__")
except SystemExit as exc:
    assert not exc.code, exc.code
heavy = ("peft", "lightning", "wandb", "torchmetrics", "monai", "transformers")
import gc
print(json.dumps({"imported": sorted(m for m in heavy if m in sys.modules), "transformers": found.get("transformers"),
                  "compositions": len(compositions), "frozen": gc.get_freeze_count()}))
"""


def test_predict_py_with_a_lorkd_checkpoint_imports_no_heavy_package(
    distinct_lorkd_ckpt, tmp_path, write_nifti
):
    import numpy as np

    image = write_nifti("ct.nii.gz", (np.arange(24 * 24 * 12).reshape(24, 24, 12) % 200).astype(np.int16))
    args = [f"ckpt_path={distinct_lorkd_ckpt}", f"input={image}", "labels=[liver]", "modality=ct",
            f"output_dir={tmp_path / 'out'}", "progress=false", "writer.preview=false"]  # fmt: skip
    report = run_probe(CLI_PROBE, *args)
    assert (tmp_path / "out" / "summary.csv").is_file()
    # peft (the student's experts), lightning (one process), W&B, MONAI, transformers (prompts cached)
    assert report["imported"] == [] and report["transformers"] is None, report
    assert report["compositions"] == 1, report  # Hydra's extra pass for hydra.mode is skipped
    assert report["frozen"] > 100_000, report  # start-up's objects (torch's) left out of garbage collection


def test_the_mode_pass_is_kept_where_the_mode_may_be_set(tmp_path):
    from lorkd.cli import mode_may_be_set

    (tmp_path / "local").mkdir()
    assert not mode_may_be_set(["input=a.nii.gz", "labels=[liver]"], tmp_path)
    assert mode_may_be_set(["hydra.mode=MULTIRUN"], tmp_path)
    assert mode_may_be_set(["--config-dir", "/elsewhere"], tmp_path)
    assert mode_may_be_set(["-cd=/elsewhere"], tmp_path)
    (tmp_path / "local" / "default.yaml").write_text("hydra:\n  mode: MULTIRUN\n")
    assert mode_may_be_set(["input=a.nii.gz"], tmp_path)


IMPORT_ALL = """
import importlib, json, pkgutil, sys
import lorkd.evaluation, lorkd.inference
first = None  # the first module after whose import MONAI is loaded
for pkg in (lorkd.inference, lorkd.evaluation):
    for info in pkgutil.iter_modules(pkg.__path__):
        importlib.import_module(f"{pkg.__name__}.{info.name}")
        if first is None and "monai" in sys.modules:
            first = f"{pkg.__name__}.{info.name}"
print(json.dumps(first))
"""


def test_no_prediction_or_evaluation_module_imports_monai():
    """A guard for the eval path too: MONAI stays lazy (training's augmentations import it on first use)."""
    assert run_probe(IMPORT_ALL) is None  # else: the module that loaded MONAI
