"""Expert routing speed: one forward+backward step of the student U-Net on a mixed-region batch.

Compared in one process, same weights and inputs:
  plain       the student U-Net without experts (the floor)
  routed      our routing (``lorkd.experts.forward_routed``), its three mixed-batch forms: one forward
              per expert on its sub-batch (split), one conv per expert group with W0 + ΔW in every layer
              (per_layer), one grouped conv with the present experts' per-sample weights
  per-sample  a Python loop, one sample at a time through its expert, a backward each
  eks         the paper's EKS grouped convolution, reimplemented from its math (lorkd.md §5):
              W'_b = W0 + Σ_t M[b,t]·ΔW_t for every sample, one conv with groups=B

python scripts/benchmarks/routing.py [--backbone unet_student_nano] [--size 64 64 32] [--batch 4] [--repeats 5]
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
import yaml

from lorkd.experts import add_region_experts, forward_routed, route
from lorkd.experts.layers import RoutedLoraConv3d
from lorkd.experts.routed import expert_layers
from lorkd.models.unet import PlainConvUNet
from lorkd.utils import CONFIG_DIR

REGIONS = ["abdomen", "brain", "head_and_neck", "lower_limb", "pelvis", "spine", "thorax", "upper_limb"]


def eks_forward(layer: RoutedLoraConv3d, x: torch.Tensor, onehot: torch.Tensor) -> torch.Tensor:
    """EKS: all T expert deltas every step, per-sample weights, one grouped conv."""
    base = layer.get_base_layer()
    deltas = torch.stack([layer.get_delta_weight(name) for name in layer.lora_A])  # (T, Cout, Cin, k, k, k)
    weights = base.weight[None] + torch.einsum("bt,t...->b...", onehot.to(deltas.dtype), deltas)
    b, cin = x.shape[:2]
    cout = base.out_channels
    bias = base.bias.repeat(b) if base.bias is not None else None
    y = F.conv3d(x.reshape(1, b * cin, *x.shape[2:]), weights.reshape(b * cout, cin, *weights.shape[3:]), bias,
                 base.stride, base.padding, base.dilation, groups=b)  # fmt: skip
    return y.reshape(b, cout, *y.shape[2:])


def time_rounds(steps: list[Callable[[], None]], repeats: int) -> list[float]:
    """Median seconds of each step, timed in interleaved rounds (one warm-up round first), so that drift
    of a noisy machine hits every method alike."""
    for step in steps:
        step()
    times: list[list[float]] = [[] for _ in steps]
    for _ in range(repeats):
        for i, step in enumerate(steps):
            start = time.perf_counter()
            step()
            times[i].append(time.perf_counter() - start)
    return [statistics.median(t) for t in times]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbone", default="unet_student_nano")
    parser.add_argument("--ranks", default="ranks_nano")
    parser.add_argument("--size", type=int, nargs=3, default=[64, 64, 32])
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    torch.manual_seed(0)
    device = torch.device(args.device)

    spec = yaml.safe_load((CONFIG_DIR / "backbone" / f"{args.backbone}.yaml").read_text())
    ranks = yaml.safe_load((CONFIG_DIR / "experts" / f"{args.ranks}.yaml").read_text())["ranks"]
    unet_args = {k: spec[k] for k in ("features", "strides", "n_convs")}
    plain = PlainConvUNet(**unet_args).to(device)
    experts = add_region_experts(PlainConvUNet(**unet_args), REGIONS, ranks).to(device)
    for layer in expert_layers(experts):  # non-zero experts so every path does real work
        for name in layer.lora_B:
            torch.nn.init.normal_(layer.lora_B[name].weight, std=0.01)
    x = torch.randn(args.batch, 3, *args.size, device=device)
    regions = torch.arange(args.batch, device=device) % len(REGIONS)  # every sample a different expert
    onehot = F.one_hot(regions, len(REGIONS))

    def backward(outputs) -> None:
        sum(o.float().square().mean() for o in outputs.decoded[:1]).backward()

    def plain_step() -> None:
        plain.zero_grad(set_to_none=True)
        backward(plain(x))

    def routed_step(form: str) -> Callable[[], None]:
        def step() -> None:
            experts.zero_grad(set_to_none=True)
            backward(forward_routed(experts, experts, regions, (x,), form))

        return step

    def per_sample_step() -> None:
        experts.zero_grad(set_to_none=True)
        for b in range(args.batch):
            with route(experts, regions[b : b + 1]):
                backward(experts(x[b : b + 1]))

    def eks_step() -> None:
        experts.zero_grad(set_to_none=True)
        layers = expert_layers(experts)
        originals = {layer: layer.forward for layer in layers}
        for layer in layers:
            layer.forward = lambda inp, _l=layer: eks_forward(_l, inp, onehot)
        try:
            backward(experts(x))
        finally:
            for layer, fwd in originals.items():
                layer.forward = fwd

    rows = [
        ("plain student (no experts)", plain_step),
        ("routed (ours), split: one forward per expert (CPU default)", routed_step("split")),
        ("routed (ours), per_layer: one conv per expert group", routed_step("per_layer")),
        ("routed (ours), per_sample_weights: grouped conv (CUDA default)", routed_step("per_sample_weights")),
        ("per-sample loop", per_sample_step),
        ("EKS grouped conv (paper: all experts' deltas)", eks_step),
    ]
    results = list(zip([name for name, _ in rows], time_rounds([fn for _, fn in rows], args.repeats)))
    base = results[0][1]
    print(
        f"\nstudent {args.backbone} ({sum(p.numel() for p in plain.parameters()):,} params), experts {args.ranks}, "
        f"batch {args.batch} with {len(set(regions.tolist()))} regions, {tuple(args.size)}, {device.type}, "
        f"{torch.get_num_threads()} threads, median of {args.repeats} interleaved forward+backward steps\n"
    )
    print("| method | ms / step | vs plain |")
    print("|---|---|---|")
    for name, seconds in results:
        print(f"| {name} | {1000 * seconds:.1f} | {seconds / base:.2f}x |")


if __name__ == "__main__":
    main()
