import copy

import pytest
import torch
from helpers import tiny_sat

from lorkd.experts import (
    add_region_experts,
    expert_names,
    expert_parameter_counts,
    forward_routed,
    merged_unet,
    route,
)
from lorkd.experts.routed import base_parameter_count, expert_layers

REGIONS = ["abdomen", "brain", "thorax"]
RANKS = {"abdomen": 2, "brain": 3, "thorax": 1}


def student(style: str, randomize_b: bool = True, dtype=torch.float64):
    torch.manual_seed(0)
    net = tiny_sat().to(dtype)
    base = copy.deepcopy(net)
    net.backbone = add_region_experts(net.backbone, REGIONS, RANKS, style=style)
    if randomize_b:
        g = torch.Generator().manual_seed(1)
        for layer in expert_layers(net):
            for name in REGIONS:
                w = layer.lora_B[name].weight
                w.data = torch.randn(w.shape, generator=g, dtype=dtype) * 0.05
    return net.eval(), base.eval()


def _inputs(b=4, dtype=torch.float64):
    g = torch.Generator().manual_seed(2)
    return torch.randn(b, 1, 32, 32, 16, generator=g, dtype=dtype), torch.randn(3, 64, generator=g, dtype=dtype)


@pytest.mark.parametrize("style", ["peft", "lorkd"])
def test_zero_b_student_equals_its_base_exactly(style):
    net, base = student(style, randomize_b=False)
    x, q = _inputs()
    with torch.no_grad(), route(net, torch.tensor([0, 2, 1, 0])):
        routed = net(x, q)
    assert torch.equal(routed, base(x, q))


@pytest.mark.parametrize("style", ["peft", "lorkd"])
def test_routed_mixed_batch_equals_each_sample_alone(style):
    net, _ = student(style)
    x, q = _inputs()
    regions = torch.tensor([2, 0, 2, 1])
    with torch.no_grad():
        with route(net, regions):
            mixed = net(x, q)
        with route(net, torch.tensor([2, 2, 0, 1])):  # experts in contiguous blocks: the slicing path
            blocks = net(x[[0, 2, 1, 3]], q)
        torch.testing.assert_close(blocks, mixed[[0, 2, 1, 3]], rtol=0, atol=1e-10)
        for b in range(4):
            with route(net, regions[b : b + 1]):
                alone = net(x[b : b + 1], q)
            torch.testing.assert_close(mixed[b : b + 1], alone, rtol=0, atol=1e-10)
        with route(net, torch.tensor([-1])):  # shared base only
            assert not torch.allclose(net(x[:1], q), mixed[:1])


@pytest.mark.parametrize("style", ["peft", "lorkd"])
def test_merging_expert_k_equals_routing_every_sample_to_k(style):
    net, base = student(style)
    x, q = _inputs()
    for k, region in enumerate(REGIONS):
        merged = copy.deepcopy(base)
        merged.backbone = merged_unet(net.backbone, region)
        assert type(merged.backbone).__name__ == "PlainConvUNet"
        assert sum(p.numel() for p in merged.parameters()) == base_parameter_count(net)
        with torch.no_grad(), route(net, torch.full((4,), k)):
            routed = net(x, q)
        torch.testing.assert_close(merged(x, q), routed, rtol=0, atol=1e-10)


@pytest.mark.parametrize("style", ["peft", "lorkd"])
def test_experts_absent_from_the_batch_get_no_gradient(style):
    net, _ = student(style)
    net.train()
    x, q = _inputs()
    with route(net, torch.tensor([0, 0, 2, 2])):
        net(x, q).square().mean().backward()
    for layer in expert_layers(net):
        for name, used in (("abdomen", True), ("brain", False), ("thorax", True)):
            for p in (layer.lora_A[name].weight, layer.lora_B[name].weight):
                if used:
                    assert p.grad is not None and p.grad.abs().sum() > 0
                else:
                    assert p.grad is None or not p.grad.any()
        assert layer.get_base_layer().weight.grad.abs().sum() > 0  # the shared base learns from every sample


def test_routing_errors_are_clear():
    net, _ = student("peft")
    x, q = _inputs()
    with pytest.raises(IndexError, match="out of range"), route(net, torch.tensor([0, 5, 0, 0])):
        net(x, q)
    with pytest.raises(RuntimeError, match="batch of 2"), route(net, torch.tensor([0, 1])):
        net(x, q)
    assert all(layer.routing is None for layer in expert_layers(net))  # cleared after errors


def test_expert_counts_ranks_and_trainable_set():
    net, _ = student("lorkd", randomize_b=False)
    assert expert_names(net) == REGIONS
    layers = {n: m for n, m in net.named_modules() if m in expert_layers(net)}
    enc = next(m for n, m in layers.items() if ".encoder." in n)
    dec = next(m for n, m in layers.items() if ".decoder." in n)
    assert enc.r["brain"] == 3 and dec.r["brain"] == 6 and enc.scaling["brain"] == dec.scaling["brain"] == 2.0
    # official layout: A (3r, 9·Cin), B (3·Cout, 3r)
    cin, cout = enc.get_base_layer().in_channels, enc.get_base_layer().out_channels
    assert enc.lora_A["brain"].weight.shape == (9, 9 * cin) and enc.lora_B["brain"].weight.shape == (3 * cout, 9)
    counts = expert_parameter_counts(net)
    per_rank = counts["abdomen"] / 2
    assert counts == {"abdomen": 2 * per_rank, "brain": 3 * per_rank, "thorax": per_rank}
    assert all(p.requires_grad for p in net.backbone.parameters())
    frozen, _ = student("peft")
    frozen.backbone = add_region_experts(tiny_sat().backbone, REGIONS, RANKS, train_base=False)
    trainable = {n for n, p in frozen.backbone.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_" in n for n in trainable)


@pytest.mark.parametrize("style", ["peft", "lorkd"])
def test_per_sample_weight_form_equals_grouped_form(style):
    net, _ = student(style)
    x, q = _inputs()
    regions = torch.tensor([1, 0, 1, 2])
    net.train()
    outs, grads = [], []
    for per_sample in (False, True):
        net.zero_grad()
        with route(net, regions, per_sample_weights=per_sample):
            out = net(x, q)
        out.square().mean().backward()
        outs.append(out.detach())
        grads.append(torch.cat([p.grad.flatten() for p in net.backbone.parameters() if p.grad is not None]))
    torch.testing.assert_close(outs[0], outs[1], rtol=0, atol=1e-10)
    torch.testing.assert_close(grads[0], grads[1], rtol=0, atol=1e-10)


@pytest.mark.parametrize("style", ["peft", "lorkd"])
def test_mixed_batch_forms_compute_the_same_outputs_and_gradients(style):
    """``split`` (one forward per expert, outputs back in batch order) == ``per_layer`` == ``per_sample_weights``,
    for the logits, the deep-supervision logits and the fused tokens of SAT's output, and for every gradient."""
    net, _ = student(style)
    x, q = _inputs()
    queries = q.expand(x.shape[0], *q.shape) + torch.linspace(0, 1, x.shape[0], dtype=q.dtype)[:, None, None]
    regions = torch.tensor([2, 0, 2, -1])  # unsorted, repeated, and one sample on the shared base alone
    net.train()
    results = {}
    for form in ("split", "per_layer", "per_sample_weights"):
        net.zero_grad()
        out = forward_routed(lambda a, b: net(a, b, return_aux=True), net, regions, (x, queries), form)
        (out.logits.square().mean() + out.memory.square().mean()).backward()
        grads = torch.cat([p.grad.flatten() for p in net.parameters() if p.grad is not None])
        results[form] = (out.logits.detach(), out.memory.detach(), grads)
    for form in ("per_layer", "per_sample_weights"):
        for got, expected in zip(results["split"], results[form]):
            torch.testing.assert_close(got, expected, rtol=0, atol=1e-10)
    with route(net, regions[:1]):  # the split form really put sample 0 (expert 2) first again
        alone = net(x[:1], queries[:1])
    torch.testing.assert_close(results["split"][0][:1], alone.detach(), rtol=0, atol=1e-10)
    with pytest.raises(ValueError, match="mixed_batch must be one of"):
        forward_routed(net, net, regions, (x, queries), "loop")


def test_inference_reuses_the_merged_weight_until_a_parameter_changes():
    net, _ = student("peft")
    x, q = _inputs(b=2)
    layer = expert_layers(net)[0]
    calls = []
    original = layer.expert_delta
    layer.expert_delta = lambda name: calls.append(name) or original(name)
    with torch.no_grad(), route(net, torch.tensor([1, 1])):
        first = net(x, q)
        net(x, q)
        assert calls == ["brain"]  # merged once, reused by the second forward
        layer.lora_B["brain"].weight.add_(0.1)  # an in-place update invalidates it
        changed = net(x, q)
    assert calls == ["brain", "brain"] and not torch.allclose(first, changed)
    with route(net, torch.tensor([1, 1])):
        net(x, q)  # with grad: never cached, so gradients flow to the expert
    assert calls == ["brain", "brain", "brain"]
