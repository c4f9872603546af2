"""Routing a case's labels to region experts (lorkd.inference.routing.plan_groups), with no network: modality-aware
lookups, expert indices in the model's order, groups in order of first appearance."""

from lorkd.inference.routing import plan_groups

EXPERTS = ["abdomen", "brain", "head_and_neck", "lower_limb", "pelvis", "spine", "thorax", "upper_limb"]


def _plan(labels, modality, experts=EXPERTS, **options):
    return [(g.route, g.expert, g.indices) for g in plan_groups(labels, modality, experts, **options)]


def test_labels_go_to_their_regions_expert_by_modality(region_map):
    """sat49 puts the esophagus in head_and_neck for CT and in the thorax for MRI ('T2' is an MRI sequence)."""
    assert _plan(["Liver", "esophagus", "spleen"], "CT", region_map=region_map) == [
        ("abdomen", 0, [0, 2]), ("head_and_neck", 2, [1]),
    ]  # fmt: skip
    assert _plan(["esophagus"], "T2", region_map=region_map) == [("thorax", 6, [0])]
    reordered = EXPERTS[::-1]  # indices follow the model's expert order, not the region map's
    assert _plan(["esophagus", "liver"], "mri", reordered, region_map=region_map) == [
        ("thorax", reordered.index("thorax"), [0]), ("abdomen", reordered.index("abdomen"), [1]),
    ]  # fmt: skip


def test_forced_region_fallbacks_and_models_without_experts(region_map):
    assert _plan(["liver", "esophagus"], "ct", region_map=region_map, region="Head and neck") == [("head_and_neck", 2, [0, 1])]
    assert _plan(["liver", "bone", "livr"], "ct", region_map=region_map, fallback="base") == [
        ("abdomen", 0, [0]), ("base", -1, [1, 2]),
    ]  # fmt: skip
    assert _plan(["bone", "liver"], "ct", region_map=region_map, fallback="teacher") == [
        ("teacher", None, [0]), ("abdomen", 0, [1]),
    ]  # fmt: skip
    assert _plan(["liver", "bone"], "ct", [], region_map=None) == [("model", None, [0, 1])]
