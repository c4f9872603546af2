"""experiment=finetune: one expert learns a new label from an nnU-Net dataset; everything else stays bit-identical."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from helpers import run_training

from lorkd.checkpoints.loading import load_model
from lorkd.experts import forward_routed

NEW = "liver cyst"  # unknown to the demo's region map: the import gives it a region


def finetune_overrides(data: Path, student: Path, teacher: Path, out: Path, steps: int = 3) -> list[str]:
    return [
        "experiment=finetune",
        f"model.student_state.path={student}",
        f"teacher.checkpoint={teacher}",
        "model.finetune_region=abdomen",
        f"data.train_manifest={data}",
        "data.dataset_import.region=abdomen",
        f"paths.cache_dir={out}/cache",
        "data.samples_per_epoch=8",
        "data.val_patches_per_item=1",
        f"trainer.max_steps={steps}",
        f"trainer.val_check_interval={steps}",
        f"callbacks.model_checkpoint.every_n_train_steps={steps}",
        "~callbacks.progress_bar",
        "logger=csv",
    ]


@pytest.fixture(scope="module")
def finetuned(tiny_lorkd_ckpt: Path, tiny_teacher_ckpt: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(nnU-Net dataset with the new label, the fine-tuned checkpoint)."""
    from lorkd.data.demo_nnunet import write_abdomen_dataset

    root = tmp_path_factory.mktemp("finetune")
    data = write_abdomen_dataset(root / "Dataset900_Cyst", train=3, test=1, new_label="liver_cyst")
    run_training(finetune_overrides(data, tiny_lorkd_ckpt, tiny_teacher_ckpt, root / "run"), root / "run")
    return data, root / "run" / "checkpoints" / "last.ckpt"


def _outputs(path: Path, region: int) -> torch.Tensor:
    model = load_model(path)
    torch.manual_seed(0)
    image = torch.randn(1, 1, 32, 32, 16)
    queries = model.prompts.queries(["liver", "heart", "lateral ventricle"], ["ct", "ct", "mri"]).unsqueeze(0)
    with torch.no_grad():
        return forward_routed(lambda x, q: model.net(x, q), model.net.backbone, torch.tensor([region]), (image, queries), "split")


def test_only_the_expert_changes(finetuned: tuple[Path, Path], tiny_lorkd_ckpt: Path) -> None:
    _, after = finetuned
    before_net, after_net = load_model(tiny_lorkd_ckpt).net, load_model(after).net
    old, new = dict(before_net.named_parameters()), dict(after_net.named_parameters())
    assert old.keys() == new.keys()
    changed = {k for k in old if not torch.equal(old[k], new[k])}
    assert changed and all(".lora_" in k and ".abdomen." in k for k in changed), sorted(changed)[:5]
    regions = load_model(after).experts
    for index, region in enumerate(regions):
        same = torch.equal(_outputs(tiny_lorkd_ckpt, index), _outputs(after, index))
        assert same == (region != "abdomen"), region


def test_new_label_in_catalogue_predict_eval_export(finetuned: tuple[Path, Path], tmp_path: Path) -> None:
    from test_eval import run_eval

    from lorkd.checkpoints.export import export_experts
    from lorkd.data.nnunet import import_dataset, write_manifests
    from lorkd.inference.predictor import Predictor
    from lorkd.label_catalogue import catalogue

    data, after = finetuned
    model = load_model(after)
    rows = {row["label"]: row for row in catalogue(model, "ct")["labels"]["ct"]}
    assert rows[NEW]["region"] == "abdomen" and rows[NEW]["route"] == "abdomen" and rows[NEW]["prompt"]
    predictor = Predictor.from_checkpoint(after, window=(32, 32, 16))
    image = next((data / "imagesTs").glob("*.nii.gz"))
    prediction = predictor.predict(image, ["liver", NEW], "ct")
    assert set(prediction.masks) == {"liver", NEW} and prediction.routes[NEW] == "abdomen"
    manifests = write_manifests(import_dataset(data, {"region": "abdomen"}, model.region_map), tmp_path / "manifests")
    summary = run_eval([f"ckpt_path={after}", f"data.test_manifest={manifests['test']}"], tmp_path / "eval")
    assert summary["n_failed_cases"] == 0
    exported = load_model(export_experts(after, tmp_path / "export"))
    assert exported.region_map.region_of(NEW, "ct") == "abdomen"


def test_kd_only_on_labels_the_teacher_knows(tiny_lorkd_ckpt: Path, tiny_teacher_ckpt: Path) -> None:
    from helpers import compose_config
    from hydra.utils import instantiate

    cfg = compose_config("train", [*finetune_overrides(Path("/x"), tiny_lorkd_ckpt, tiny_teacher_ckpt, Path("/tmp"))])
    module = instantiate(cfg.model)
    assert "liver" in module.teacher_labels and NEW not in module.teacher_labels
    qmask = torch.ones(1, 3, dtype=torch.bool)
    kept = module.distilled({"labels": [["liver", NEW, "spleen"]]}, qmask)
    assert kept.tolist() == [[True, False, True]]
