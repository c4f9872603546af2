"""The demo data as nnU-Net v2 datasets (lorkd.data.demo_nnunet.write_nnunet_datasets) trains the demo teacher
bit for bit as its manifests do; a list of manifests / dataset folders as data.*_manifest."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch
from helpers import demo_overrides, run_training

from lorkd.data.datamodule import LoRKDDataModule
from lorkd.data.demo_nnunet import write_nnunet_datasets
from lorkd.regions import RegionMap

MANIFESTS = ("data.train_manifest=", "data.val_manifest=", "data.test_manifest=")


def _case_keys(dm: LoRKDDataModule, split: str) -> list[tuple]:
    """What training reads of a split's cases, in order: names, prompts and the files' bytes."""
    return [
        (c.dataset, c.id, c.labels, c.modality, c.region, c.orientation, c.image.read_bytes(), c.mask.read_bytes())
        for c in dm.cases_of(split)
    ]


def test_demo_as_nnunet_datasets_reads_the_same_cases(tiny_demo_data: Path, tmp_path: Path) -> None:
    folders = write_nnunet_datasets(tiny_demo_data, tmp_path / "raw")
    assert [f.name for f in folders] == ["Dataset901_DemoAbdomenCT", "Dataset902_DemoThoraxCT", "Dataset903_DemoBrainMRI"]
    abdomen = folders[0]
    description = json.loads((abdomen / "dataset.json").read_text())
    assert description["channel_names"] == {"0": "CT"} and description["numTraining"] == 3
    assert list(description["labels"]) == ["background", "liver", "spleen", "left_kidney", "right_kidney", "aorta"]
    assert json.loads((abdomen / "splits_final.json").read_text()) == [
        {"train": ["abdomen_ct_000", "abdomen_ct_001"], "val": ["abdomen_ct_002"]}
    ]
    assert json.loads((folders[2] / "dataset.json").read_text())["channel_names"] == {"0": "MRI"}
    manifests = LoRKDDataModule(*(tiny_demo_data / f"{s}.jsonl" for s in ("train", "val", "test")), region_map=RegionMap.from_config("demo"))
    nnunet = LoRKDDataModule(train_manifest=[str(f) for f in folders], test_manifest=[str(f) for f in folders],
                             region_map=RegionMap.from_config("demo"))  # fmt: skip
    assert nnunet.manifests["val"] == [str(f) for f in folders]  # validation from the folders' splits
    for split in ("train", "val", "test"):
        assert _case_keys(nnunet, split) == _case_keys(manifests, split), split
    with pytest.raises(ValueError, match="Dataset901_DemoAbdomenCT: exists"):
        write_nnunet_datasets(tiny_demo_data, tmp_path / "raw")


def test_demo_teacher_trains_bit_identical_from_nnunet_datasets(tiny_demo_data: Path, tmp_path: Path) -> None:
    folders = [str(f) for f in write_nnunet_datasets(tiny_demo_data, tmp_path / "raw")]
    weights, metrics = {}, {}
    for name, data in (
        ("manifests", [f"data.{s}_manifest={tiny_demo_data}/{s}.jsonl" for s in ("train", "val", "test")]),
        ("nnunet", [f"data.train_manifest=[{','.join(folders)}]", "data.val_manifest=null", f"data.test_manifest=[{','.join(folders)}]"]),
    ):
        out = tmp_path / name
        common = [o for o in demo_overrides(tiny_demo_data, out, steps=4) if not o.startswith(MANIFESTS)]
        # regions change every 2 samples: the 8 samples of 4 steps come from several datasets
        run_training(["experiment=demo_teacher", *common, *data, "data.region_change_interval=2"], out)
        weights[name] = torch.load(out / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)["state_dict"]
        metrics[name] = _validation_metrics(out)
    assert weights["nnunet"].keys() == weights["manifests"].keys()
    changed = [k for k, v in weights["manifests"].items() if not torch.equal(v, weights["nnunet"][k])]
    assert not changed, changed
    # validation patches are drawn per case in order: the same cases in the same order, the same Dice
    assert metrics["nnunet"] == metrics["manifests"] and any(k.startswith("val/dice") for k in metrics["nnunet"])


def _validation_metrics(run: Path) -> dict[str, str]:
    """Every ``val/...`` value a run logged (its CSV log), as written."""
    rows = [row for path in sorted(run.glob("csv/**/metrics.csv")) for row in csv.DictReader(path.open())]
    return {k: v for row in rows for k, v in row.items() if k.startswith("val/") and v}


def test_a_list_of_manifests_refuses_a_case_twice(tiny_demo_data: Path) -> None:
    train = str(tiny_demo_data / "train.jsonl")
    dm = LoRKDDataModule(train_manifest=[train, str(tiny_demo_data / "val.jsonl")], region_map=RegionMap.from_config("demo"))
    assert len(dm.cases_of("train")) == 9 and dm.manifests["val"] is None  # no dataset folder: no validation
    dm = LoRKDDataModule(train_manifest=[train, train], region_map=RegionMap.from_config("demo"))
    with pytest.raises(ValueError, match=r"6 case\(s\) given twice:\n.*train.jsonl: case 'abdomen_ct_000' of dataset 'DemoAbdomenCT' is also in"):
        dm.cases_of("train")


def test_manifests_nnunet_cannot_hold_are_refused(tmp_path: Path, write_nifti) -> None:
    import numpy as np

    image = write_nifti("data/a.nii.gz", np.zeros((4, 4, 4), np.int16))
    mask = write_nifti("data/a_seg.nii.gz", np.zeros((4, 4, 4), np.uint8))
    rows = [{"id": "a", "image": str(image), "mask": str(mask), "label": ["liver"], "modality": "ct", "dataset": "D"},
            {"id": "b", "image": str(image), "masks": {"liver": str(mask)}, "label": ["liver"], "modality": "ct", "dataset": "D"},
            {"id": "c", "image": str(image), "mask": str(mask), "label": ["spleen"], "modality": "mri", "dataset": "D"},
            {"id": "d", "image": str(image), "mask": str(mask), "label": ["liver"], "modality": "ct", "dataset": "D", "region": "abdomen"}]  # fmt: skip
    (tmp_path / "data" / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(ValueError) as info:
        write_nnunet_datasets(tmp_path / "data", tmp_path / "raw")
    text = str(info.value)
    assert "3 problem(s)" in text and "train.jsonl:2: case 'b' has no label map" in text
    assert "train.jsonl:3: case 'c' has mri labels ['spleen'], not those of dataset 'D'" in text
    assert "train.jsonl:4: case 'd' sets 'region'/'orientation'" in text
    assert not (tmp_path / "raw").exists()  # nothing written
