"""experiment=finetune: one expert learns a new label from an nnU-Net dataset; everything else stays bit-identical."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from helpers import run_training

from lorkd.checkpoints.loading import load_model
from lorkd.experts import forward_routed

NEW = "liver cyst"  # unknown to the demo's region map: the import gives it a region


def finetune_overrides(data: Path, student: Path, teacher: Path, out: Path, steps: int = 3, region: str = "abdomen") -> list[str]:
    return [
        "experiment=finetune",
        f"model.student_state.path={student}",
        f"teacher.checkpoint={teacher}",
        f"model.finetune_region={region}",
        f"data.train_manifest={data}",
        f"data.dataset_import.region={region}",
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


def test_new_label_query_is_trained_saved_exported_and_kept(
    finetuned: tuple[Path, Path], tiny_teacher_ckpt: Path, tmp_path: Path
) -> None:
    """The new label's query trains (the old labels' stay the text head's), travels in the checkpoint's prompt bank
    to predict and export, and a second fine-tune from the result keeps it (frozen) and holds the label by LwF."""
    from helpers import compose_config
    from hydra.utils import instantiate

    from lorkd.checkpoints.export import export_experts
    from lorkd.inference.predictor import Predictor
    from lorkd.prompts import PromptBank

    _, after = finetuned
    model = load_model(after)
    learned = model.prompts.queries([NEW, "liver"], "ct")
    plain = PromptBank(model.prompts.text_encoder)
    plain.load_state_dict({**model.prompts.state_dict(), "learned": {}})
    head = plain.queries([NEW, "liver"], "ct")
    assert list(model.prompts.learned) == [f"ct_{NEW}"]
    assert not torch.allclose(learned[0], head[0]) and torch.equal(learned[1], head[1])
    predictor = Predictor.from_checkpoint(after, window=(32, 32, 16))
    assert torch.equal(predictor.model.prompts.queries([NEW], "ct")[0], learned[0])
    exported = load_model(export_experts(after, tmp_path / "export"))
    assert torch.equal(exported.prompts.queries([NEW], "ct")[0], learned[0])
    again = instantiate(compose_config("train", finetune_overrides(Path("/x"), after, tiny_teacher_ckpt, tmp_path)).model)
    assert torch.equal(again.prompts.queries([NEW], "ct")[0], learned[0]) and NEW in again.lwf_labels


def test_resume_restores_the_new_query(finetuned: tuple[Path, Path], tiny_lorkd_ckpt: Path, tiny_teacher_ckpt: Path, tmp_path: Path) -> None:
    """A killed fine-tune resumes from its last.ckpt (the LwF copy and the new label's query are not in its
    state_dict) and carries the trained query on."""
    data, after = finetuned
    overrides = [*finetune_overrides(data, tiny_lorkd_ckpt, tiny_teacher_ckpt, tmp_path, steps=4), f"ckpt_path={after}"]
    run_training(overrides, tmp_path)
    resumed = load_model(tmp_path / "checkpoints" / "last.ckpt")
    assert set(resumed.prompts.learned) == {f"ct_{NEW}"}
    assert not torch.equal(resumed.prompts.learned[f"ct_{NEW}"], load_model(after).prompts.learned[f"ct_{NEW}"])


def test_kd_only_on_labels_the_teacher_knows(tiny_lorkd_ckpt: Path, tiny_teacher_ckpt: Path) -> None:
    from helpers import compose_config
    from hydra.utils import instantiate

    cfg = compose_config("train", [*finetune_overrides(Path("/x"), tiny_lorkd_ckpt, tiny_teacher_ckpt, Path("/tmp"))])
    module = instantiate(cfg.model)
    assert "liver" in module.teacher_labels and NEW not in module.teacher_labels
    qmask = torch.ones(1, 3, dtype=torch.bool)
    kept = module.distilled({"labels": [["liver", NEW, "spleen"]]}, qmask)
    assert kept.tolist() == [[True, False, True]]


def _batch(module, labels: list[str]) -> dict:
    """One abdomen training sample of ``labels`` (random image, empty masks)."""
    torch.manual_seed(0)
    return {
        "image": torch.randn(1, 1, 32, 32, 16),
        "masks": torch.zeros(1, len(labels), 32, 32, 16),
        "query_mask": torch.ones(1, len(labels)),
        "labels": [labels],
        "modality": ["ct"],
        "region": torch.tensor([module.region_map.regions.index("abdomen")]),
    }


def test_lwf_holds_the_expert_to_its_outputs_before(tiny_lorkd_ckpt: Path, tiny_teacher_ckpt: Path) -> None:
    """LwF: a frozen copy of the starting student; its KD covers the expert's old labels only, is 0 before any
    step and pulls back once the adapter moved; the copy is not saved."""
    from helpers import compose_config
    from hydra.utils import instantiate

    cfg = compose_config("train", finetune_overrides(Path("/x"), tiny_lorkd_ckpt, tiny_teacher_ckpt, Path("/tmp")))
    module = instantiate(cfg.model)
    assert module.anchor is not None and {"liver", "spleen", "aorta"} <= module.lwf_labels
    assert "heart" not in module.lwf_labels and NEW not in module.lwf_labels  # another region's; a new label
    assert not any(p.requires_grad for p in module.anchor.parameters())
    batch = _batch(module, ["liver", NEW])
    kept = module.of_labels(batch, batch["query_mask"], module.lwf_labels)
    assert kept.tolist() == [[1.0, 0.0]]

    def loss(weight: float) -> float:
        module.lambda_lwf = weight
        with torch.no_grad():
            return float(module.training_step(batch, 0))

    assert loss(5.0) == loss(0.0)  # the expert is still the anchor: nothing to pull back
    with torch.no_grad():
        for name, p in module.student.named_parameters():
            if p.requires_grad and ".lora_B." in name:
                p.add_(0.05)
    assert loss(5.0) > loss(0.0) + 1e-6
    checkpoint = {"state_dict": module.state_dict()}
    module.on_save_checkpoint(checkpoint)
    assert not [k for k in checkpoint["state_dict"] if k.startswith(("anchor.", "teacher."))]


MARKER = "fiducial marker"  # belongs to no region of the demo's map: a brand-new region learns it


@pytest.fixture(scope="module")
def new_region(tiny_lorkd_ckpt: Path, tiny_teacher_ckpt: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(nnU-Net dataset with the marker, the checkpoint fine-tuned with a new region ``devices`` of rank 2)."""
    from lorkd.data.demo_nnunet import write_abdomen_dataset

    root = tmp_path_factory.mktemp("new_region")
    data = write_abdomen_dataset(root / "Dataset902_Marker", train=3, test=1, new_label="fiducial_marker")
    overrides = finetune_overrides(data, tiny_lorkd_ckpt, tiny_teacher_ckpt, root / "run", region="devices")
    run_training([*overrides, "model.new_region_rank=2"], root / "run")
    return data, root / "run" / "checkpoints" / "last.ckpt"


def test_new_region_adds_one_expert_and_changes_nothing_else(new_region: tuple[Path, Path], tiny_lorkd_ckpt: Path) -> None:
    _, after = new_region
    before_model, after_model = load_model(tiny_lorkd_ckpt), load_model(after)
    assert after_model.experts == [*before_model.experts, "devices"]
    assert after_model.region_map.region_of(MARKER, "ct") == "devices"
    old, new = dict(before_model.net.named_parameters()), dict(after_model.net.named_parameters())
    assert all(torch.equal(old[k], new[k]) for k in old)  # every parameter there before, bit for bit
    added = sorted(set(new) - set(old))
    assert added and all(".lora_" in k and ".devices." in k for k in added), added[:5]
    encoder_a = next(k for k in added if ".encoder." in k and ".lora_A." in k)
    assert new[encoder_a].shape[0] == 2  # its own rank
    assert any(new[k].abs().sum() > 0 for k in added if ".lora_B." in k)  # it trained (B starts at 0)
    for index, _ in enumerate(before_model.experts):
        assert torch.equal(_outputs(tiny_lorkd_ckpt, index), _outputs(after, index))


def test_new_region_in_catalogue_predict_eval_export(new_region: tuple[Path, Path], tmp_path: Path) -> None:
    from test_eval import run_eval

    from lorkd.checkpoints.export import export_experts
    from lorkd.data.nnunet import import_dataset, write_manifests
    from lorkd.inference.predictor import Predictor
    from lorkd.label_catalogue import catalogue

    data, after = new_region
    model = load_model(after)
    rows = {row["label"]: row for row in catalogue(model, "ct")["labels"]["ct"]}
    assert rows[MARKER]["region"] == "devices" and rows[MARKER]["route"] == "devices"
    predictor = Predictor.from_checkpoint(after, window=(32, 32, 16))
    prediction = predictor.predict(next((data / "imagesTs").glob("*.nii.gz")), ["liver", MARKER], "ct")
    assert prediction.routes == {"liver": "abdomen", MARKER: "devices"}
    manifests = write_manifests(import_dataset(data, {"region": "devices"}, model.region_map), tmp_path / "manifests")
    summary = run_eval([f"ckpt_path={after}", f"data.test_manifest={manifests['test']}"], tmp_path / "eval")
    assert summary["n_failed_cases"] == 0
    exported = load_model(export_experts(after, tmp_path / "export"))
    assert exported.experts[-1] == "devices" and exported.region_map.region_of(MARKER, "ct") == "devices"


@pytest.mark.parametrize(
    ("region", "rank", "error"),
    [("abdomen", 2, "already has a region 'abdomen'"), ("whole_body", 2, "already has a region"),
     ("Bad Name", 2, "lower-case letters"), ("devices", 0, "positive integer")],
)  # fmt: skip
def test_new_region_refused(tiny_lorkd_ckpt: Path, region: str, rank: int, error: str) -> None:
    from lorkd.checkpoints.loading import read_experts_spec, read_region_map

    for reader in (read_experts_spec, read_region_map):
        with pytest.raises(ValueError, match=error):
            reader(tiny_lorkd_ckpt, region, rank)
