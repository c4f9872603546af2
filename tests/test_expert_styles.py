"""Both expert parameterisations (``experts.style=peft`` and the official ``lorkd``) train and export."""

import pytest
import torch
import torch.nn.functional as F
from helpers import demo_overrides, run_training, tiny_sat

from lorkd.checkpoints import schema
from lorkd.experts import add_region_experts, route
from lorkd.experts.routed import expert_layers

REGIONS = ["abdomen", "brain", "thorax"]


@pytest.mark.parametrize("style", ["peft", "lorkd"])
def test_a_few_optimisation_steps_reduce_the_loss_and_move_only_the_used_experts(style):
    net = tiny_sat()
    net.backbone = add_region_experts(net.backbone, REGIONS, {"abdomen": 2, "brain": 2, "thorax": 1}, style=style)
    g = torch.Generator().manual_seed(0)
    x, q = torch.randn(2, 1, 16, 16, 16, generator=g), torch.randn(2, 64, generator=g)
    target = (torch.rand(2, 2, 16, 16, 16, generator=g) > 0.5).float()
    brain = {n: p.detach().clone() for n, p in net.named_parameters() if ".brain." in n}
    optimizer = torch.optim.AdamW([p for p in net.parameters() if p.requires_grad], lr=3e-3)
    losses = []
    for _ in range(4):
        optimizer.zero_grad()
        with route(net.backbone, torch.tensor([0, 2])):  # abdomen and thorax only
            loss = F.binary_cross_entropy_with_logits(net(x, q), target)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    for layer in expert_layers(net):
        assert layer.lora_B["abdomen"].weight.abs().sum() > 0 and layer.lora_B["thorax"].weight.abs().sum() > 0
    assert all(torch.equal(p, brain[n]) for n, p in net.named_parameters() if n in brain)


@pytest.mark.slow
def test_a_lorkd_style_fit_checkpoints_the_official_shapes_and_exports(tiny_demo_data, tiny_teacher_ckpt, tmp_path):
    from lorkd.checkpoints.export import export_experts
    from lorkd.checkpoints.exported import load_export
    from lorkd.checkpoints.loading import load_model

    run_training(
        ["experiment=demo", f"teacher.checkpoint={tiny_teacher_ckpt}", "model.experts.style=lorkd",
         *demo_overrides(tiny_demo_data, tmp_path)],
        tmp_path,
    )  # fmt: skip
    ckpt = tmp_path / "checkpoints" / "last.ckpt"
    raw = torch.load(ckpt, weights_only=True)
    assert schema.read(raw, str(ckpt)).experts.style == "lorkd"
    a = raw["state_dict"]["student.backbone.base_model.model.encoder.stages.1.0.convs.0.conv.lora_A.abdomen.weight"]
    assert tuple(a.shape) == (3 * 4, 9 * 16)  # (3r, 9·Cin); Cin = 16, the demo student's first width
    student = load_model(ckpt)
    exported = load_export(export_experts(ckpt, tmp_path / "export", regions=["abdomen"]))
    x = torch.randn(2, 1, 32, 32, 16)
    q = student.prompts.queries(["liver"], "ct")
    with torch.no_grad(), route(student.net.backbone, torch.zeros(2, dtype=torch.long)):
        routed = student.net(x, q)
    with torch.no_grad():
        torch.testing.assert_close(exported.net("abdomen")(x, q), routed, rtol=1e-4, atol=1e-5)
