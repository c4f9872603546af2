"""LoRKDModule is built from objects (a loaded teacher, a plain student, an experts spec): no file is read."""

import math
from functools import partial

import pytest
import torch
import torch.nn.functional as F
from helpers import tiny_sat

from lorkd.checkpoints.loading import LoadedModel
from lorkd.checkpoints.schema import CheckpointMeta, ExpertsSpec, TextHead
from lorkd.experts import expert_names
from lorkd.models.text import TextEncoder
from lorkd.modules.lorkd_module import LoRKDModule
from lorkd.prompts import PromptBank
from lorkd.regions import RegionMap

REGIONS = ["abdomen", "thorax"]
RANKS = {"abdomen": 2, "thorax": 4, "brain": 8}


def _region_map() -> RegionMap:
    return RegionMap(regions=REGIONS, labels={"abdomen": ["ct_liver"], "thorax": ["ct_heart"]})


def _teacher(fingerprint: str = "0" * 16) -> LoadedModel:
    """A SATModule-like teacher built in memory: network, text head, a one-prompt bank and its record."""
    torch.manual_seed(1)
    prompts = PromptBank(TextEncoder(None, hidden_dim=16, query_dim=64, proj_hidden=32))
    prompts.load_state_dict({"fingerprint": None, "labels": ["liver"], "embeddings": torch.randn(1, 16)})
    net = tiny_sat()
    meta = CheckpointMeta("sat", TextHead.of(prompts.text_encoder), prompts.state_dict(), net=net.config)
    return LoadedModel(net, prompts, "teacher", source="in-memory teacher", fingerprint=fingerprint, meta=meta)


def _module(**kwargs) -> LoRKDModule:
    arguments = dict(
        teacher=_teacher(), student=tiny_sat(n_convs=1), experts=ExpertsSpec.for_regions(REGIONS, RANKS),
        optimizer=partial(torch.optim.AdamW, lr=1e-3), region_map=_region_map(),
    )  # fmt: skip
    return LoRKDModule(**{**arguments, **kwargs})


def test_a_module_from_objects_starts_from_the_teacher_and_records_its_spec():
    module = _module()
    assert expert_names(module.student.backbone) == REGIONS
    assert not any(p.requires_grad for p in module.teacher.parameters())
    teacher = module.teacher.state_dict()
    student = {k.replace("base_model.model.", "").replace(".base_layer", ""): v for k, v in module.student.state_dict().items()}
    shared = [k for k, v in student.items() if k in teacher and teacher[k].shape == v.shape]
    assert shared and all(torch.equal(student[k], teacher[k]) for k in shared)
    meta = module.checkpoint_metadata()
    assert meta.kind == "lorkd" and meta.experts == ExpertsSpec(REGIONS, {"abdomen": 2, "thorax": 4})
    assert meta.teacher.fingerprint == "0" * 16 and meta.net == module.student_config and meta.net["n_convs"] == 1
    assert module.prompts.embeddings.keys() == {"liver"}
    queries = module.prompts.queries(["liver"], "ct")[None].expand(2, -1, -1)
    with torch.no_grad():
        assert module(torch.randn(2, 1, 16, 16, 16), queries, torch.tensor([0, 1])).shape == (2, 1, 16, 16, 16)


def test_student_init_checkpoint_loads_the_given_state_and_nothing_else_starts_it():
    source = _module(student_init="scratch")
    with torch.no_grad():
        for p in source.student.parameters():
            p.add_(torch.randn_like(p))
    state = source.student.state_dict()
    module = _module(student_init="checkpoint", student_state=state)
    assert all(torch.equal(v, state[k]) for k, v in module.student.state_dict().items())
    with pytest.raises(ValueError, match="student_init=checkpoint needs"):
        _module(student_init="checkpoint")
    with pytest.raises(ValueError, match="student_init=auto"):
        _module(student_state=state)


def test_inconsistent_objects_fail_clearly():
    with pytest.raises(ValueError, match="experts are for regions"):
        _module(experts=ExpertsSpec.for_regions(["abdomen", "brain"], RANKS))
    with pytest.raises(ValueError, match="in-memory teacher has no file fingerprint"):
        _module(teacher=_teacher(fingerprint=""))
    with pytest.raises(KeyError, match="no expert rank configured"):
        ExpertsSpec.for_regions(["spine"], RANKS)


def _batch() -> dict:
    g = torch.Generator().manual_seed(7)
    return {
        "image": torch.randn(2, 1, 16, 16, 16, generator=g),
        "masks": (torch.rand(2, 2, 16, 16, 16, generator=g) > 0.7).float(),
        "query_mask": torch.tensor([[True, True], [True, False]]),
        "labels": [["liver", "liver"], ["liver"]],
        "modality": ["ct", "mri"],
        "region": torch.tensor([0, 1]),
    }


class _LoggedLoss(__import__("lightning").pytorch.Callback):
    """Records the loss the training step returned (what is backpropagated) and what it logged as ``train/loss``
    and ``train/kd_loss``."""

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        metrics = trainer.callback_metrics
        self.returned = float(outputs["loss"])
        self.loss, self.kd = float(metrics["train/loss"]), float(metrics["train/kd_loss"])


@pytest.mark.parametrize("lambda_kd", [0.25, 3.0])
def test_the_logged_training_loss_is_seg_plus_lambda_times_kd_from_the_teachers_logits(lambda_kd):
    """``train/loss`` of one fitted step = Dice+BCE + λ·KD, KD written out here from the teacher's logits (T=2)."""
    import lightning.pytorch as pl

    from lorkd.losses import segmentation_loss

    module = _module(lambda_kd=lambda_kd, temperature=2.0, warmup_steps=1)
    batch = _batch()
    with torch.no_grad():  # before the step: what the step's forward sees
        queries = module.queries_for(batch)
        teacher = module.teacher(batch["image"], queries).double()
        student = module(batch["image"], queries, batch["region"])
    seg = segmentation_loss(student, batch["masks"], batch["query_mask"])[0].item()
    t, s = teacher / 2.0, student.double() / 2.0  # per-query Bernoulli KL at T=2, times T², mean over valid queries
    kl = torch.sigmoid(t) * (F.logsigmoid(t) - F.logsigmoid(s)) + torch.sigmoid(-t) * (F.logsigmoid(-t) - F.logsigmoid(-s))
    kd = 4.0 * kl.flatten(2).mean(-1)[batch["query_mask"]].mean().item()
    logged = _LoggedLoss()
    trainer = pl.Trainer(
        max_steps=1, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, limit_val_batches=0, num_sanity_val_steps=0, callbacks=[logged],
    )  # fmt: skip
    trainer.fit(module, torch.utils.data.DataLoader([batch], batch_size=None))
    assert kd > 1e-3 and logged.kd == pytest.approx(kd, rel=1e-4)
    assert logged.loss == pytest.approx(seg + lambda_kd * kd, rel=1e-4) and logged.returned == pytest.approx(logged.loss)


def _hard_dice_by_hand(logits: torch.Tensor, masks: torch.Tensor, b: int, q: int) -> float:
    pred, ref = torch.sigmoid(logits[b, q]) > 0.5, masks[b, q] > 0.5
    total = int(pred.sum() + ref.sum())
    return 2 * int((pred & ref).sum()) / total if total else 1.0


def test_validation_dice_is_the_mean_over_valid_queries_per_region_and_overall():
    """``val/dice/<region>``: mean hard Dice of that region's samples' valid queries; ``val/dice``: of all of them.
    The padded query of sample 1 is given a mask equal to its prediction (Dice 1): it must not count."""
    import lightning.pytorch as pl

    module = _module()
    batch = _batch()
    with torch.no_grad():
        queries = module.queries_for(batch)
        logits = {"dice": module(batch["image"], queries, batch["region"]), "dice_teacher": module.teacher(batch["image"], queries)}
    batch["masks"][1, 1] = (torch.sigmoid(logits["dice"][1, 1]) > 0.5).float()
    trainer = pl.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False, enable_model_summary=False)
    metrics = trainer.validate(module, torch.utils.data.DataLoader([batch], batch_size=None), verbose=False)[0]
    for name, out in logits.items():
        abdomen = [_hard_dice_by_hand(out, batch["masks"], 0, q) for q in (0, 1)]
        thorax = _hard_dice_by_hand(out, batch["masks"], 1, 0)
        assert metrics[f"val/{name}/abdomen"] == pytest.approx(sum(abdomen) / 2)
        assert metrics[f"val/{name}/thorax"] == pytest.approx(thorax)
        assert metrics[f"val/{name}"] == pytest.approx((sum(abdomen) + thorax) / 3)
    assert len({round(v, 6) for v in metrics.values()}) > 2  # the regions' values differ: a swap would show


def test_learning_rate_warms_up_linearly_then_follows_a_cosine_to_zero():
    from lorkd.modules.base import warmup_cosine

    factor = warmup_cosine(4, 12)
    assert [factor(s) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert [factor(s) for s in (4, 8, 12, 20)] == pytest.approx([1.0, 0.5, 0.0, 0.0], abs=1e-12)
    assert factor(6) == pytest.approx(0.5 * (1 + math.cos(math.pi / 4)))


def test_resuming_with_another_teacher_fails_and_the_same_teacher_gets_its_weights_back():
    """A checkpoint holds no teacher weights, only the teacher's fingerprint: resuming under another teacher is an
    error naming both; under the same one, the teacher's tensors are put back for the strict state load."""
    saved = _module()
    checkpoint = {"state_dict": saved.state_dict()}
    saved.on_save_checkpoint(checkpoint)
    assert not any(k.startswith("teacher.") for k in checkpoint["state_dict"])
    with pytest.raises(ValueError, match=r"distilled from teacher .*\(0{16}\), but the configured teacher is .*\(1{16}\)"):
        _module(teacher=_teacher(fingerprint="1" * 16)).on_load_checkpoint(checkpoint)
    resumed = _module()
    resumed.on_load_checkpoint(checkpoint)
    resumed.load_state_dict(checkpoint["state_dict"])  # strict: the teacher's keys are back
