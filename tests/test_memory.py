"""Training at the users' scale (issue 29): the memory model, micro-batches with accumulation, activation
checkpointing of the U-Net stages, and single-region micro-batches."""

from __future__ import annotations

import itertools

import pytest
import torch
from helpers import compose_config, tiny_sat

from lorkd.data.sampling import RegionSampler
from lorkd.experts import add_region_experts, route
from lorkd.losses import deep_supervision_loss, distillation_loss, segmentation_loss
from lorkd.memory import BUDGET_GIB, experiment_config, training_step_memory
from lorkd.models.unet import PlainConvUNet

GPU_EXPERIMENTS = ["pro", "nano", "teacher_pro", "teacher_nano"]
RECIPE = {"pro": 8, "nano": 8, "teacher_pro": 1, "teacher_nano": 2}  # samples per device and optimizer step


@pytest.mark.parametrize("experiment", GPU_EXPERIMENTS)
def test_every_gpu_experiment_fits_an_80_gb_device_as_shipped(experiment):
    cfg = experiment_config(experiment)
    estimate = training_step_memory(cfg)
    assert estimate.meta["micro_batch"] * estimate.meta["accumulate"] == RECIPE[experiment]
    assert estimate.peak_gib <= BUDGET_GIB, estimate.table()
    assert estimate.activations > 0 and estimate.parameters > 0
    assert abs(estimate.optimizer - 2 * estimate.gradients) < 2**20  # AdamW: two float32 states (and step counters)


def test_the_memory_model_grows_with_the_micro_batch_and_shrinks_with_checkpointing():
    cfg = experiment_config("nano")
    one, two = training_step_memory(cfg, micro_batch=1), training_step_memory(cfg, micro_batch=2)
    assert 1.8 < two.activations / one.activations < 2.2
    checkpointed = training_step_memory(cfg, micro_batch=2, checkpointing=True)
    assert checkpointed.meta["checkpointing"] and checkpointed.activations < 0.4 * two.activations
    assert checkpointed.peak < two.peak


@pytest.mark.slow
def test_the_memory_model_reproduces_the_h100_rows_within_15_percent():
    from scripts.benchmarks.memory import H100, calibration

    counted = calibration()
    ratios = {k: counted[k] / H100[k] for k in H100}
    assert all(0.85 <= r <= 1.15 for r in ratios.values()), ratios


def test_batch_per_step_derives_the_accumulation():
    cfg = compose_config("train", ["experiment=pro", "teacher.checkpoint=/x.pth", "data.batch_size=1"])
    assert cfg.trainer.accumulate_grad_batches == 8
    bad = compose_config("train", ["experiment=pro", "teacher.checkpoint=/x.pth", "data.batch_size=3"])
    with pytest.raises(Exception, match="not a whole number of micro-batches"):
        _ = bad.trainer.accumulate_grad_batches


# ---- activation checkpointing -------------------------------------------------------------------------


def _grads(net: torch.nn.Module, loss_fn) -> dict[str, torch.Tensor]:
    net.zero_grad(set_to_none=True)
    loss_fn().backward()
    return {n: p.grad.clone() for n, p in net.named_parameters() if p.grad is not None}


def _assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys() and a
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-5, atol=1e-7, msg=name)


def _count_conv_calls(net: torch.nn.Module) -> list[int]:
    calls = [0]
    for m in net.modules():
        if type(m) is torch.nn.Conv3d:
            m.register_forward_pre_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    return calls


def test_checkpointed_unet_gradients_equal_plain_ones():
    torch.manual_seed(0)
    net = PlainConvUNet([4, 8, 16], [1, 2, 2])
    x = torch.randn(2, 3, 8, 8, 8)

    def loss():
        out = net(x, pool=[4, 2, 1])
        return out.decoded[0].square().mean() + out.decoded[1].mean() + sum(p.sum() for p in out.pooled)

    calls = _count_conv_calls(net)
    plain = _grads(net, loss)
    plain_calls, calls[0] = calls[0], 0
    net.checkpoint_stages = True
    _assert_same(plain, _grads(net, loss))
    assert calls[0] == 2 * plain_calls  # every stage really ran again in backward


def test_checkpointed_student_with_routed_experts_equals_plain():
    """The recomputation runs in backward, outside ``route``: the experts' routing is restored for it."""
    torch.manual_seed(0)
    net = tiny_sat(checkpoint_stages=False)
    net.backbone = add_region_experts(net.backbone, ["a", "b", "c"], {"a": 2, "b": 3, "c": 4})
    for name, p in net.named_parameters():
        if ".lora_B" in name:
            torch.nn.init.normal_(p, std=0.5)  # non-zero experts, each different
    image, queries = torch.randn(2, 1, 16, 16, 16), torch.randn(3, 64)
    target = (torch.rand(2, 3, 16, 16, 16) > 0.5).float()
    qmask = torch.ones(2, 3, dtype=torch.bool)
    region = torch.tensor([2, 2])  # not the first (peft's active) adapter

    def loss():
        with route(net.backbone, region):
            logits = net(image, queries)
        return segmentation_loss(logits, target, qmask)[0]

    plain = _grads(net, loss)
    net.backbone.base_model.model.checkpoint_stages = True
    _assert_same(plain, _grads(net, loss))
    assert any(".lora_A.c." in n and g.abs().sum() > 0 for n, g in plain.items())


# ---- gradient accumulation ----------------------------------------------------------------------------


def test_accumulated_micro_batches_equal_one_batch():
    """k micro-batches of n, each loss divided by k (Lightning's accumulation), give the gradients of one batch
    of k*n: every loss is a mean over (sample, query) and InstanceNorm is per sample, so nothing couples the
    samples of a batch. What differs: float rounding of the summation order, and the weight of a query when
    micro-batches hold different numbers of valid queries (checked below)."""
    torch.manual_seed(0)
    net = tiny_sat(deep_supervision=True)
    k, n = 2, 1
    image, queries = torch.randn(k * n, 1, 16, 16, 16), torch.randn(k * n, 3, 64)
    target = (torch.rand(k * n, 3, 16, 16, 16) > 0.5).float()
    teacher = torch.randn(k * n, 3, 16, 16, 16)
    qmask = torch.ones(k * n, 3, dtype=torch.bool)

    def loss(sl: slice, mask: torch.Tensor) -> torch.Tensor:
        out = net(image[sl], queries[sl], return_aux=True)
        seg = deep_supervision_loss([out.logits, *out.aux_logits], target[sl], mask[sl])[0]
        return seg + 0.1 * distillation_loss(out.logits, teacher[sl], mask[sl])

    def accumulated(mask: torch.Tensor) -> dict[str, torch.Tensor]:
        net.zero_grad(set_to_none=True)
        for i in range(k):
            (loss(slice(i * n, (i + 1) * n), mask) / k).backward()
        return {name: p.grad.clone() for name, p in net.named_parameters() if p.grad is not None}

    whole = _grads(net, lambda: loss(slice(None), qmask))
    _assert_same(whole, accumulated(qmask))
    uneven = qmask.clone()
    uneven[0, 1:] = False  # micro-batch 0 has 1 valid query, micro-batch 1 has 3
    whole_uneven = _grads(net, lambda: loss(slice(None), uneven))
    differs = accumulated(uneven)
    assert any(not torch.allclose(whole_uneven[name], differs[name], rtol=1e-3) for name in whole_uneven)


# ---- single-region micro-batches ----------------------------------------------------------------------


@pytest.mark.parametrize("experiment", ["pro", "nano"])
def test_every_micro_batch_and_optimizer_step_is_one_region(experiment):
    cfg = experiment_config(experiment)
    micro, accumulate = int(cfg.data.batch_size), int(cfg.trainer.accumulate_grad_batches)
    regions = [r for r in range(8) for _ in range(3)]
    sampler = RegionSampler(regions, [1.0] * len(regions), num_samples=64 * micro * accumulate,
                            region_change_interval=int(cfg.data.region_change_interval), seed=1, rank=0, world_size=1)  # fmt: skip
    drawn = [regions[item] for item, _ in sampler]
    step = micro * accumulate
    steps = [set(drawn[i : i + step]) for i in range(0, len(drawn), step)]
    assert all(len(s) == 1 for s in steps), steps
    assert len({next(iter(s)) for s in steps}) > 1  # and regions do change between steps
    for start in itertools.islice(range(0, len(drawn), micro), 16):
        assert len(set(drawn[start : start + micro])) == 1
