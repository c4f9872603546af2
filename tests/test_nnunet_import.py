"""nnU-Net v2 and Decathlon dataset folders as manifests (lorkd.data.nnunet, lorkd-data import)."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from lorkd.data.manifest import add_labels, load_manifest
from lorkd.data.nnunet import DatasetError, import_dataset, is_dataset_folder, write_manifests
from lorkd.regions import RegionMap

SHAPE = (8, 8, 4)


def _save(path: Path, data: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(data, np.eye(4)), str(path))


def _label_map(i: int) -> np.ndarray:
    labels = np.zeros(SHAPE, np.uint8)
    labels[1 : 3 + i % 2, 1:4, 1:3] = 1
    labels[5:7, 5:7, 1:3] = 2
    return labels


def nnunet_dataset(root: Path, n: int = 5, channels: dict | None = None, labels: dict | None = None, test: int = 1) -> Path:
    """A tiny nnU-Net v2 raw dataset: ``n`` training cases (+ ``test`` in imagesTs)."""
    channels = channels or {"0": "CT"}
    labels = labels or {"background": 0, "liver": 1, "gallbladder_cyst": 2}
    for i in range(n + test):
        folder, case = ("imagesTr", f"case_{i:03d}") if i < n else ("imagesTs", f"test_{i:03d}")
        for c in range(len(channels)):
            _save(root / folder / f"{case}_{c:04d}.nii.gz", np.full(SHAPE, 100 * i + c, np.int16))
        if i < n:
            _save(root / "labelsTr" / f"{case}.nii.gz", _label_map(i))
    description = {"channel_names": channels, "labels": labels, "numTraining": n, "file_ending": ".nii.gz", "name": "Gallbladder"}
    (root / "dataset.json").write_text(json.dumps(description))
    return root


def decathlon_dataset(root: Path, n: int = 4, modalities: dict | None = None) -> Path:
    """A tiny Decathlon task folder (4-D images when several modalities)."""
    modalities = modalities or {"0": "CT"}
    training, test = [], []
    for i in range(n + 1):
        shape = SHAPE if len(modalities) == 1 else (*SHAPE, len(modalities))
        image = np.stack([np.full(SHAPE, 10 * i + c, np.int16) for c in range(len(modalities))], -1).reshape(shape)
        folder = "imagesTr" if i < n else "imagesTs"
        _save(root / folder / f"liver_{i}.nii.gz", image)
        if i < n:
            _save(root / "labelsTr" / f"liver_{i}.nii.gz", _label_map(i))
            training.append({"image": f"./imagesTr/liver_{i}.nii.gz", "label": f"./labelsTr/liver_{i}.nii.gz"})
        else:
            test.append(f"./imagesTs/liver_{i}.nii.gz")
    description = {"name": "Liver", "modality": modalities, "labels": {"0": "background", "1": "liver", "2": "tumor"},
                   "numTraining": n, "training": training, "test": test}  # fmt: skip
    (root / "dataset.json").write_text(json.dumps(description))
    return root


@pytest.fixture
def sat49() -> RegionMap:
    return RegionMap.from_config("sat49")


def test_nnunet_import_splits_labels_and_new_label_region(tmp_path: Path, sat49: RegionMap) -> None:
    folder = nnunet_dataset(tmp_path / "Dataset501_Gallbladder")
    assert is_dataset_folder(folder)
    imported = import_dataset(folder, {"region": "abdomen", "seed": 3}, sat49)
    assert imported.format == "nnunet"
    train, val, test = (imported.rows[s] for s in ("train", "val", "test"))
    assert len(train) == 4 and len(val) == 1 and len(test) == 1
    assert {r["id"] for r in train + val} == {f"case_{i:03d}" for i in range(5)}
    row = train[0]
    assert row["label"] == ["liver", "gallbladder cyst"] and row["modality"] == "ct" and row["dataset"] == "Gallbladder"
    assert row["image"].endswith("_0000.nii.gz") and row["mask"].endswith(f"labelsTr/{row['id']}.nii.gz")
    assert row["label_region"] == {"gallbladder cyst": "abdomen"}  # liver is known: no entry
    assert imported.added == {"ct_gallbladder cyst": "abdomen"}
    assert "mask" not in test[0]
    # the same seed gives the same split; another seed another one
    again = import_dataset(folder, {"region": "abdomen", "seed": 3}, sat49)
    assert again.rows["val"] == val
    assert any(import_dataset(folder, {"region": "abdomen", "seed": s}, sat49).rows["val"] != val for s in range(4, 9))
    # the cases carry their new label, which training adds to the region map
    assert "ct_gallbladder cyst" not in sat49
    add_labels(sat49, imported.cases["train"])
    assert sat49.region_of("gallbladder cyst", "ct") == "abdomen"


def test_splits_final_json_fold(tmp_path: Path, sat49: RegionMap) -> None:
    folder = nnunet_dataset(tmp_path / "d")
    folds = [{"train": ["case_000", "case_001", "case_002"], "val": ["case_003", "case_004"]},
             {"train": ["case_001", "case_002", "case_003", "case_004"], "val": ["case_000"]}]  # fmt: skip
    (folder / "splits_final.json").write_text(json.dumps(folds))
    for fold in (0, 1):
        imported = import_dataset(folder, {"region": "abdomen", "fold": fold}, sat49)
        assert [r["id"] for r in imported.rows["val"]] == folds[fold]["val"]
        assert [r["id"] for r in imported.rows["train"]] == folds[fold]["train"]
    with pytest.raises(DatasetError, match="no fold 2"):
        import_dataset(folder, {"region": "abdomen", "fold": 2}, sat49)


def test_mapping_file_renames_and_assigns_regions(tmp_path: Path, sat49: RegionMap) -> None:
    folder = nnunet_dataset(tmp_path / "d", labels={"background": 0, "organ": 1, "lesion": 2})
    mapping = tmp_path / "map.yaml"
    mapping.write_text("labels:\n  organ: liver\n  lesion: {name: Liver Cyst, region: abdomen}\n")
    imported = import_dataset(folder, {"mapping": str(mapping)}, sat49)
    assert imported.rows["train"][0]["label"] == ["liver", "liver cyst"]
    assert imported.added == {"ct_liver cyst": "abdomen"}
    mapping.write_text("labels:\n  organ: liver\n  lesion: {name: liver cyst, region: nowhere}\n  spleen: x\n")
    with pytest.raises(DatasetError) as info:
        import_dataset(folder, {"mapping": str(mapping)}, sat49)
    text = str(info.value)
    assert "region 'nowhere' for label 'liver cyst'" in text and "label(s) ['spleen'] are not in" in text


def test_a_mapping_files_default_region_goes_to_unknown_labels_only(tmp_path: Path, sat49: RegionMap) -> None:
    folder = nnunet_dataset(tmp_path / "d", labels={"background": 0, "heart": 1, "gallbladder polyp": 2})
    mapping = tmp_path / "map.yaml"
    mapping.write_text("region: abdomen\nlabels:\n  heart: heart\n")
    imported = import_dataset(folder, {"mapping": str(mapping)}, sat49)  # heart stays in the thorax
    assert imported.added == {"ct_gallbladder polyp": "abdomen"} and sat49.label_region["ct_heart"] == "thorax"
    mapping.write_text("labels:\n  heart: {name: heart, region: abdomen}\n")  # given per label: a conflict
    with pytest.raises(DatasetError, match="label 'heart' is in region 'thorax' of the region map, not 'abdomen'"):
        import_dataset(folder, {"mapping": str(mapping), "region": "abdomen"}, sat49)


@pytest.mark.parametrize(
    ("channels", "options", "modality"),
    [({"0": "T2"}, {}, "mri"), ({"0": "ADC"}, {}, "mri"), ({"0": "PET"}, {}, "pet"), ({"0": "FLAIR"}, {}, "mri"),
     ({"0": "T2", "1": "ADC"}, {"channel": "ADC"}, "mri"), ({"0": "CT", "1": "PET"}, {"channel": 1}, "pet"),
     ({"0": "zscore"}, {"modality": "mri"}, "mri")],
)  # fmt: skip
def test_channel_names_give_the_modality(tmp_path: Path, channels: dict, options: dict, modality: str) -> None:
    folder = nnunet_dataset(tmp_path / "d", channels=channels, labels={"background": 0, "liver": 1, "spleen": 2})
    imported = import_dataset(folder, {**options, "region": "abdomen"}, RegionMap.from_config("sat49"))
    row = imported.rows["train"][0]
    assert row["modality"] == modality
    index = int(options.get("channel", 0)) if str(options.get("channel", 0)).isdigit() else 1
    assert row["image"].endswith(f"_{index:04d}.nii.gz")


def test_bad_nnunet_datasets_list_every_problem(tmp_path: Path, sat49: RegionMap) -> None:
    with pytest.raises(DatasetError, match="dataset.json: not found"):
        import_dataset(tmp_path, {}, sat49)
    folder = nnunet_dataset(tmp_path / "d", n=4, channels={"0": "T2", "1": "ADC"})
    (folder / "labelsTr" / "case_001.nii.gz").unlink()
    (folder / "imagesTr" / "case_002_0001.nii.gz").unlink()
    _save(folder / "labelsTr" / "case_003.nii.gz", np.zeros((8, 8, 5), np.uint8))  # shape mismatch
    with pytest.raises(DatasetError) as info:
        import_dataset(folder, {}, sat49)
    problems = info.value.problems
    text = "\n".join(problems)
    assert "2 channels (0: T2, 1: ADC); pick one with channel=" in text
    assert f"{folder / 'labelsTr' / 'case_001.nii.gz'}: label file missing" in text
    assert f"{folder / 'imagesTr' / 'case_002_0001.nii.gz'}: missing" in text
    assert all(p.startswith(str(tmp_path)) for p in problems), problems  # each one `file: problem`
    info = pytest.raises(DatasetError, import_dataset, folder, {"channel": "T2"}, sat49)
    text = str(info.value)
    assert "case_003.nii.gz" in text and "does not lie on its image" in text
    assert "unknown to the region map" in text and "'gallbladder cyst'" in text  # no region= given


def test_region_based_and_other_refused_labels(tmp_path: Path, sat49: RegionMap) -> None:
    labels = {"background": 0, "whole tumor": [1, 2], "enhancing tumor": 2}
    folder = nnunet_dataset(tmp_path / "a", labels=labels)
    with pytest.raises(DatasetError, match=r"'whole tumor' is an nnU-Net region-based label \(ids \[1, 2\]\)"):
        import_dataset(folder, {"region": "brain"}, sat49)
    folder = nnunet_dataset(tmp_path / "b", labels={"background": 0, "liver": 1, "spleen": 3})
    with pytest.raises(DatasetError, match=r"label ids \[1, 3\] must be consecutive"):
        import_dataset(folder, {}, sat49)
    folder = nnunet_dataset(tmp_path / "c", channels={"0": "noNorm"})
    with pytest.raises(DatasetError, match="channel 0 is 'noNorm', not a modality; give modality="):
        import_dataset(folder, {"region": "abdomen"}, sat49)


def test_decathlon_single_and_multi_channel(tmp_path: Path, region_map: RegionMap) -> None:
    sat49 = region_map  # demo: ct liver tumor known
    mapping = tmp_path / "map.yaml"
    mapping.write_text("labels:\n  tumor: liver tumor\n")
    folder = decathlon_dataset(tmp_path / "Task03_Liver")
    imported = import_dataset(folder, {"mapping": str(mapping)}, sat49)
    assert imported.format == "decathlon"
    assert imported.rows["train"][0]["label"] == ["liver", "liver tumor"] and imported.added == {}
    assert len(imported.rows["test"]) == 1 and len(imported.rows["train"]) + len(imported.rows["val"]) == 4

    multi = decathlon_dataset(tmp_path / "Task01", modalities={"0": "FLAIR", "1": "T1w"})
    with pytest.raises(DatasetError, match="2 channels"):
        import_dataset(multi, {"mapping": str(mapping)}, sat49)
    imported = import_dataset(multi, {"mapping": str(mapping), "channel": "T1w"}, sat49)
    assert imported.rows["train"][0]["modality"] == "mri"
    out = tmp_path / "out"
    written = write_manifests(imported, out)
    cases = load_manifest(written["train"], region_map=sat49)
    first = nib.load(str(cases[0].image))
    assert first.shape == SHAPE and str(cases[0].image).startswith(str(out / "images"))
    number = int(cases[0].id.split("_")[1])
    assert np.all(np.asarray(first.dataobj) == 10 * number + 1)  # channel 1's voxels


def test_decathlon_missing_label_file(tmp_path: Path, sat49: RegionMap) -> None:
    folder = decathlon_dataset(tmp_path / "Task03_Liver")
    (folder / "labelsTr" / "liver_2.nii.gz").unlink()
    with pytest.raises(DatasetError, match=r"labelsTr/liver_2.nii.gz: label file missing \(training\[2\]"):
        import_dataset(folder, {"region": "abdomen"}, sat49)


def test_datamodule_reads_a_dataset_folder(tmp_path: Path) -> None:
    from lorkd.data.datamodule import LoRKDDataModule

    folder = nnunet_dataset(tmp_path / "d")
    region_map = RegionMap.from_config("sat49")
    dm = LoRKDDataModule(train_manifest=folder, test_manifest=folder, predict_manifest=folder,
                         dataset_import={"region": "abdomen", "seed": 1}, region_map=region_map)  # fmt: skip
    train, val = dm.cases_of("train"), dm.cases_of("val")
    assert len(train) == 4 and len(val) == 1 and {c.id for c in train + val} == {f"case_{i:03d}" for i in range(5)}
    assert region_map.region_of("gallbladder cyst", "ct") == "abdomen"  # shared with the model: checkpoints know it
    assert [c.id for c in dm.cases_of("predict")] == ["test_005"]
    with pytest.raises(DatasetError, match="no labelsTs"):
        dm.cases_of("test")
