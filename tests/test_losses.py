"""Distillation and segmentation losses against references written here from their definitions (float64 loops)."""

import math

import numpy as np
import pytest
import torch

from lorkd.losses import (
    bce_loss,
    deep_supervision_loss,
    distillation_loss,
    hard_dice,
    segmentation_loss,
    soft_dice_loss,
)

T = 2.0


def _inputs(seed: int = 0):
    """(B=3, N=3, 2x2x1) student and teacher logits; sample 2 has no valid query (it must not count)."""
    g = torch.Generator().manual_seed(seed)
    student = torch.randn(3, 3, 2, 2, 1, generator=g) * 3
    teacher = torch.randn(3, 3, 2, 2, 1, generator=g) * 3
    qmask = torch.tensor([[True, True, False], [True, True, True], [False, False, False]])
    return student, teacher, qmask


def softmax_kd_by_hand(student, teacher, qmask, temperature):
    """``T² · mean over samples with a valid query of mean over voxels of KL(softmax(t/T) ‖ softmax(s/T))``,
    the softmax taken over the sample's valid queries only."""
    s, t, m = student.double().numpy(), teacher.double().numpy(), qmask.numpy()
    per_sample = []
    for b in range(s.shape[0]):
        valid = np.flatnonzero(m[b])
        if not valid.size:
            continue
        kls = []
        for v in range(s[b, 0].size):
            zs = [s[b, q].flat[v] / temperature for q in valid]
            zt = [t[b, q].flat[v] / temperature for q in valid]
            ps = [math.exp(z) / sum(math.exp(y) for y in zs) for z in zs]
            pt = [math.exp(z) / sum(math.exp(y) for y in zt) for z in zt]
            kls.append(sum(a * math.log(a / c) for a, c in zip(pt, ps)))
        per_sample.append(sum(kls) / len(kls))
    return temperature**2 * sum(per_sample) / len(per_sample)


def sigmoid_kd_by_hand(student, teacher, qmask, temperature):
    """``T² · mean over valid (sample, query) of mean over voxels of KL(Bern(σ(t/T)) ‖ Bern(σ(s/T)))``."""
    s, t, m = student.double().numpy(), teacher.double().numpy(), qmask.numpy()
    per_query = []
    for b, q in zip(*np.nonzero(m)):
        kls = []
        for zs, zt in zip(s[b, q].flat, t[b, q].flat):
            ps, pt = 1 / (1 + math.exp(-zs / temperature)), 1 / (1 + math.exp(-zt / temperature))
            kls.append(pt * math.log(pt / ps) + (1 - pt) * math.log((1 - pt) / (1 - ps)))
        per_query.append(sum(kls) / len(kls))
    return temperature**2 * sum(per_query) / len(per_query)


def test_softmax_kd_at_t2_by_hand():
    """Two queries, one voxel: teacher (2, 0), student (0, 0) at T=2 -> 4·KL(softmax(1, 0) ‖ (½, ½))."""
    teacher, student = torch.tensor([[[2.0], [0.0]]]), torch.zeros(1, 2, 1)
    p = math.e / (math.e + 1)
    expected = 4 * (p * math.log(2 * p) + (1 - p) * math.log(2 * (1 - p)))
    got = distillation_loss(student, teacher, torch.tensor([[True, True]]), temperature=T, mode="softmax")
    assert got.item() == pytest.approx(expected, rel=1e-6)
    student, teacher, qmask = _inputs()
    got = distillation_loss(student, teacher, qmask, temperature=T, mode="softmax")
    assert got.item() == pytest.approx(softmax_kd_by_hand(student, teacher, qmask, T), rel=1e-5)


def test_sigmoid_kd_at_t2_by_hand():
    student, teacher, qmask = _inputs(1)
    got = distillation_loss(student, teacher, qmask, temperature=T, mode="sigmoid")
    assert got.item() == pytest.approx(sigmoid_kd_by_hand(student, teacher, qmask, T), rel=1e-5)


def test_dice_and_bce_by_hand():
    """SAT's soft Dice ``1 − (2Σpy + ε)/(Σp² + Σy² + ε)`` and the voxel-mean BCE, each averaged over valid queries."""
    student, _, qmask = _inputs(2)
    target = (torch.randn(student.shape, generator=torch.Generator().manual_seed(5)) > 0).float()
    s, y, m = student.double().numpy(), target.double().numpy(), qmask.numpy()
    dice, bce = [], []
    for b, q in zip(*np.nonzero(m)):
        p = [1 / (1 + math.exp(-z)) for z in s[b, q].flat]
        t = list(y[b, q].flat)
        overlap = sum(a * c for a, c in zip(p, t))
        dice.append(1 - (2 * overlap + 1e-7) / (sum(a * a for a in p) + sum(c * c for c in t) + 1e-7))
        bce.append(-sum(c * math.log(a) + (1 - c) * math.log(1 - a) for a, c in zip(p, t)) / len(p))
    assert soft_dice_loss(student, target, qmask).item() == pytest.approx(sum(dice) / len(dice), rel=1e-5)
    assert bce_loss(student, target, qmask).item() == pytest.approx(sum(bce) / len(bce), rel=1e-5)


def test_deep_supervision_weighs_levels_4_2_1_against_nearest_downsampled_targets():
    """Three levels (8³, 4³, 2³): weights ½⁰, ½¹, ½² normalised (4/7, 2/7, 1/7); the target downsamples by
    nearest neighbour, i.e. every 2nd / 4th voxel (binary, never blended); the logged parts are the
    full-resolution level's."""
    g = torch.Generator().manual_seed(3)
    target = (torch.rand(1, 2, 8, 8, 8, generator=g) > 0.5).float()
    logits = [torch.randn(1, 2, s, s, s, generator=g) for s in (8, 4, 2)]
    qmask = torch.tensor([[True, True]])
    levels = [segmentation_loss(out, target[..., ::step, ::step, ::step], qmask) for out, step in zip(logits, (1, 2, 4))]
    loss, parts = deep_supervision_loss(logits, target, qmask)
    expected = (4 * levels[0][0] + 2 * levels[1][0] + levels[2][0]) / 7
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)
    assert parts.keys() == levels[0][1].keys() and all(torch.equal(parts[k], levels[0][1][k]) for k in parts)


def test_hard_dice_thresholds_probabilities_and_scores_two_empty_masks_one():
    logits = torch.tensor([3.0, 3.0, 3.0, -3.0, 0.1, -0.1]).view(1, 1, 6)  # predicted: voxels 0, 1, 2, 4
    target = torch.tensor([1.0, 1.0, 0.0, 1.0, 0.0, 0.0]).view(1, 1, 6)  # reference: voxels 0, 1, 3
    both_empty = torch.full((1, 1, 6), -5.0), torch.zeros(1, 1, 6)
    assert hard_dice(logits, target).item() == pytest.approx(2 * 2 / (4 + 3))
    assert hard_dice(*both_empty).item() == 1.0
    assert hard_dice(both_empty[0], target).item() == 0.0
