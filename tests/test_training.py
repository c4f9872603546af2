import pytest
import torch
from helpers import demo_overrides, run_training

from lorkd.checkpoints import schema
from lorkd.checkpoints.loading import load_model
from lorkd.experts.routed import expert_layers
from lorkd.losses import distillation_loss, hard_dice, segmentation_loss


def test_teacher_and_lorkd_checkpoints_after_a_two_step_fit(tiny_teacher_ckpt, tiny_lorkd_ckpt):
    teacher = torch.load(tiny_teacher_ckpt, weights_only=True)
    assert teacher["global_step"] == 2 and schema.read(teacher, "teacher").kind == "sat"
    lorkd = torch.load(tiny_lorkd_ckpt, weights_only=True)
    meta = schema.read(lorkd, "lorkd")
    assert lorkd["global_step"] == 2 and meta.kind == "lorkd" and meta.version == schema.VERSION
    assert not any(k.startswith("teacher.") for k in lorkd["state_dict"])  # teacher stored by path + fingerprint
    assert meta.teacher.path == str(tiny_teacher_ckpt.resolve()) and len(meta.teacher.fingerprint) == 16
    assert meta.data["patch_size"] == [32, 32, 16] and meta.data["preprocess"]["spacing"] == [1.0, 1.0, 3.0]
    assert meta.experts.regions[:2] == ["abdomen", "brain"] and meta.experts.style == "peft"
    counts = meta.parameter_counts
    assert counts["deployed_expert"] == counts["student_base"] <= 0.6 * counts["teacher"]
    assert set(meta.prompt_bank["labels"]) >= {"liver", "left lung", "white matter"}


def test_lorkd_checkpoint_loads_for_inference(tiny_lorkd_ckpt):
    experts = load_model(tiny_lorkd_ckpt, "experts")
    teacher = load_model(tiny_lorkd_ckpt, "teacher")
    assert experts.experts[:2] == ["abdomen", "brain"] and experts.network == "experts"
    assert experts.parameter_count < teacher.parameter_count
    x = torch.randn(2, 1, 32, 32, 16)
    q = experts.prompts.queries(["liver"], "ct")
    with torch.no_grad():
        assert experts.net(x, q).shape == (2, 1, 32, 32, 16)


def test_resume_continues_the_step_count(tiny_demo_data, tiny_teacher_ckpt, tmp_path):
    first = tmp_path / "run"
    common = ["experiment=demo", f"teacher.checkpoint={tiny_teacher_ckpt}"]
    run_training([*common, *demo_overrides(tiny_demo_data, first, steps=2)], first)
    last = first / "checkpoints" / "last.ckpt"
    before = torch.load(last, weights_only=True)
    assert before["global_step"] == 2
    resumed = tmp_path / "resumed"
    overrides = [*common, *demo_overrides(tiny_demo_data, resumed, steps=2), "trainer.max_steps=4", f"ckpt_path={last}"]
    run_training(overrides, resumed)
    after = torch.load(resumed / "checkpoints" / "last.ckpt", weights_only=True)
    assert after["global_step"] == 4
    # the optimiser state was carried over: Adam's step counter continued from 2
    steps = {int(s["step"]) for s in after["optimizer_states"][0]["state"].values()}
    assert steps == {4}


def test_distillation_loss_is_zero_for_identical_logits_and_matches_a_hand_computation():
    torch.manual_seed(0)
    logits = torch.randn(2, 3, 4, 4, 2)
    qmask = torch.tensor([[True, True, False], [True, False, False]])
    assert distillation_loss(logits, logits, qmask).abs().item() < 1e-7
    assert distillation_loss(logits, logits, qmask, mode="softmax").abs().item() < 1e-7
    s, t = torch.tensor([[[0.0, 2.0]]]), torch.tensor([[[1.0, -1.0]]])  # (B=1, N=1, 2 voxels)
    T = 2.0
    expected = 0.0
    for sv, tv in zip(s.flatten().tolist(), t.flatten().tolist()):
        ps, pt = torch.sigmoid(torch.tensor(sv / T)), torch.sigmoid(torch.tensor(tv / T))
        expected += (pt * torch.log(pt / ps) + (1 - pt) * torch.log((1 - pt) / (1 - ps))).item()
    expected = T * T * expected / 2
    got = distillation_loss(s, t, torch.tensor([[True]]), temperature=T)
    assert got.item() == pytest.approx(expected, rel=1e-5)
    # softmax over queries: two queries, one voxel
    s2, t2 = torch.tensor([[[0.0], [1.0]]]), torch.tensor([[[2.0], [0.0]]])
    ps, pt = torch.softmax(s2.flatten(), 0), torch.softmax(t2.flatten(), 0)
    hand = (pt * (pt.log() - ps.log())).sum().item()
    got = distillation_loss(s2, t2, torch.tensor([[True, True]]), mode="softmax")
    assert got.item() == pytest.approx(hand, rel=1e-5)
    # padded queries are ignored
    s3 = torch.cat([s2, torch.full((1, 1, 1), 50.0)], 1)
    t3 = torch.cat([t2, torch.full((1, 1, 1), -50.0)], 1)
    masked = distillation_loss(s3, t3, torch.tensor([[True, True, False]]), mode="softmax")
    assert masked.item() == pytest.approx(hand, rel=1e-5)


def test_segmentation_loss_ignores_padded_queries_and_rewards_perfect_masks():
    target = torch.zeros(1, 2, 4, 4, 4)
    target[0, 0, :2] = 1
    perfect = (target * 2 - 1) * 30
    qmask = torch.tensor([[True, False]])
    loss, parts = segmentation_loss(perfect, target, qmask)
    assert loss.item() < 1e-6
    garbage = perfect.clone()
    garbage[0, 1] = 30  # the padded query predicts everything: must not matter
    assert segmentation_loss(garbage, target, qmask)[0].item() < 1e-6
    assert hard_dice(perfect, target)[0, 0] == 1.0


def test_every_expert_that_saw_data_moved(tiny_lorkd_ckpt, tiny_teacher_ckpt):
    model = load_model(tiny_lorkd_ckpt, "experts")
    layer = expert_layers(model.net)[0]
    trained = {name for name in layer.lora_B if layer.lora_B[name].weight.abs().sum() > 0}
    # the demo data covers abdomen, brain and thorax; the other experts never saw data and keep B = 0
    assert trained <= {"abdomen", "brain", "thorax"} and trained
