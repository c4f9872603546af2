"""Experts without peft at inference: the same keys and, for every expert and routing mode, the same
probabilities as the peft network (``torch.equal``: the same operations in the same order)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import TINY, tiny_sat

from lorkd.checkpoints.build import build_network
from lorkd.checkpoints.key_report import KeyReport, load_mapped
from lorkd.checkpoints.schema import ExpertsSpec
from lorkd.experts import add_region_experts, route
from lorkd.experts.plain import ExpertConv3d, PlainExperts, add_plain_experts
from lorkd.inference.sliding_window import WindowModel

REGIONS = ["abdomen", "brain", "thorax"]
RANKS = {"abdomen": 2, "brain": 3, "thorax": 1}


def twin_networks(style: str, scaling: float = 2.0):
    """A SAT with peft experts (random B: every expert differs) and its peft-free twin loaded from its state."""
    peft_net = tiny_sat()
    peft_net.backbone = add_region_experts(peft_net.backbone, REGIONS, RANKS, scaling=scaling, style=style)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in peft_net.named_parameters():
            if ".lora_B." in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    plain_net = tiny_sat()
    plain_net.backbone = add_plain_experts(plain_net.backbone, REGIONS, RANKS, scaling=scaling, style=style)
    load_mapped(plain_net, peft_net.state_dict(), KeyReport(source="peft twin"))
    return peft_net.eval(), plain_net.eval()


@pytest.mark.parametrize("style", ["peft", "lorkd"])
def test_the_peft_free_experts_have_the_peft_keys_and_give_identical_probabilities(style):
    peft_net, plain_net = twin_networks(style, scaling=0.3)  # a scaling whose alpha/r is not exact
    assert peft_net.state_dict().keys() == plain_net.state_dict().keys()
    assert isinstance(plain_net.backbone, PlainExperts)
    assert sum(isinstance(m, ExpertConv3d) for m in plain_net.modules()) > 0
    assert not any(type(m).__module__.startswith("peft") for m in plain_net.modules())
    g = torch.Generator().manual_seed(2)
    windows, queries = torch.randn(2, 1, 16, 16, 16, generator=g), torch.randn(3, 64, generator=g)
    with torch.no_grad():
        for expert in [-1, *range(len(REGIONS))]:  # the shared base and each region, as the Predictor routes
            a = WindowModel(peft_net, queries, expert, max_queries=2)(windows)
            b = WindowModel(plain_net, queries, expert, max_queries=2)(windows)
            assert torch.equal(a, b), (style, expert, (a - b).abs().max())
        for per_sample in (False, True):  # a batch mixing experts, both routing forms
            with route(peft_net.backbone, torch.tensor([2, 0]), per_sample):
                a = peft_net(windows, queries)
            with route(plain_net.backbone, torch.tensor([2, 0]), per_sample):
                b = plain_net(windows, queries)
            assert torch.equal(a, b), (style, per_sample)
        assert torch.equal(peft_net(windows, queries), plain_net(windows, queries))  # unrouted: the first expert


def test_a_checkpoint_student_loads_without_peft_and_predicts_the_same(distinct_lorkd_ckpt):
    from lorkd.checkpoints.loading import load_model

    with_peft, without = load_model(distinct_lorkd_ckpt), load_model(distinct_lorkd_ckpt, plain_experts=True)
    assert isinstance(without.net.backbone, PlainExperts) and without.experts == with_peft.experts
    assert without.parameter_count == with_peft.parameter_count
    queries = with_peft.prompts.queries(["liver", "brain"], "ct")
    windows = torch.randn(2, 1, 32, 32, 16, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        for expert in [-1, *range(len(with_peft.experts))]:
            a = WindowModel(with_peft.net, queries, expert)(windows)
            b = WindowModel(without.net, queries, expert)(windows)
            assert torch.equal(a, b), (expert, (a - b).abs().max())


def test_building_the_peft_free_experts_does_not_import_peft():
    root = Path(__file__).resolve().parents[1]
    code = (
        "import sys; from lorkd.checkpoints.build import build_network; from lorkd.checkpoints.schema import ExpertsSpec\n"
        f"build_network({TINY!r}, ExpertsSpec(['abdomen'], {{'abdomen': 2}}), plain_experts=True)\n"
        "print(sorted(m for m in ('peft', 'transformers', 'lightning') if m in sys.modules))"
    )
    env = dict(os.environ, PYTHONPATH=str(root))
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=root, env=env)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().splitlines()[-1] == "[]"


def test_plain_experts_refuse_what_peft_would_compute_differently():
    with pytest.raises(ValueError, match="1×1"):
        ExpertConv3d(torch.nn.Conv3d(2, 2, 1), {"a": 1}, {"a": 1.0})
    with pytest.raises(ValueError, match="cubic"):
        ExpertConv3d(torch.nn.Conv3d(2, 2, (3, 3, 1)), {"a": 1}, {"a": 1.0}, style="lorkd")
    with pytest.raises(KeyError, match="brain"):
        build_network(TINY, ExpertsSpec(["brain"], {"abdomen": 2}), plain_experts=True)
