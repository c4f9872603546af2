"""Deployed expert vs routed student: inference time, and parameter counts against the teacher.

One run prints two markdown tables:

* time: one forward (no_grad, eval) of the student with its 8 region experts routed to one region
  (``experts.style=peft`` and ``lorkd``), and of the exported model with that expert merged into W0 (a plain
  SAT, what ``lorkd-export`` writes); same weights and inputs, median of ``--repeats`` rounds (variants alternate) after a warm-up;
  max |Δ| checks that merged and routed outputs agree;
* parameters: student base (= one deployed expert), all 8 experts in both styles, the teacher, built on
  the meta device (no memory), for the demo, LoRKD-Nano and LoRKD-Pro (counts without the text encoder and
  without deep-supervision heads).

python scripts/benchmarks/export.py [--timing demo nano] [--size 64 64 32] [--batch 2] [--repeats 5] [--device cpu]
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch
import yaml

from lorkd.checkpoints.adapters import plain_state
from lorkd.experts import add_region_experts, base_parameter_count, expert_parameter_counts, route
from lorkd.experts.routed import expert_layers
from lorkd.models.sat import SAT
from lorkd.utils import CONFIG_DIR

REGIONS = ["abdomen", "brain", "head_and_neck", "lower_limb", "pelvis", "spine", "thorax", "upper_limb"]
DEMO_HEADS = {"query_dim": 64, "decoder_layers": 2, "decoder_heads": 4, "decoder_ffn": 128}
PRESETS: dict[str, dict[str, Any]] = {
    "demo": {"name": "demo (tiny student / small teacher)", "student": "unet_tiny", "teacher": "unet_small",
             "ranks": "ranks_tiny", "heads": DEMO_HEADS, "size": (32, 32, 16)},
    "nano": {"name": "LoRKD-Nano vs SAT-Nano", "student": "unet_student_nano", "teacher": "unet_nano",
             "ranks": "ranks_nano", "heads": {}, "size": (64, 64, 32)},
    "pro": {"name": "LoRKD-Pro vs SAT-Pro", "student": "unet_nano", "teacher": "unet_pro",
            "ranks": "ranks_pro", "heads": {}, "size": (64, 64, 32)},
}  # fmt: skip
_SAT_KEYS = ("features", "strides", "n_convs", "proj_hidden", "mask_hidden", "latent_stride")


def sat_args(backbone: str, heads: dict[str, Any]) -> dict[str, Any]:
    spec = yaml.safe_load((CONFIG_DIR / "backbone" / f"{backbone}.yaml").read_text())
    return {**{k: spec[k] for k in _SAT_KEYS}, **heads, "dropout": 0.0}


def ranks(name: str) -> dict[str, int]:
    return yaml.safe_load((CONFIG_DIR / "experts" / f"{name}.yaml").read_text())["ranks"]


def student(preset: dict[str, Any], style: str) -> SAT:
    net = SAT(**sat_args(preset["student"], preset["heads"]))
    net.backbone = add_region_experts(net.backbone, REGIONS, ranks(preset["ranks"]), style=style)
    return net


def count_row(preset: dict[str, Any]) -> dict[str, Any]:
    with torch.device("meta"):
        teacher = sum(p.numel() for p in SAT(**sat_args(preset["teacher"], preset["heads"])).parameters())
        lorkd, peft = student(preset, "lorkd"), student(preset, "peft")
    base = base_parameter_count(lorkd)
    return {
        "name": preset["name"], "base": base, "teacher": teacher,
        "lorkd": sum(expert_parameter_counts(lorkd.backbone).values()),
        "peft": sum(expert_parameter_counts(peft.backbone).values()),
    }  # fmt: skip


def median_seconds(runs: dict[str, Callable[[], torch.Tensor]], repeats: int, device: torch.device) -> dict[str, float]:
    """Median wall time of each run; the runs alternate within every round so load changes hit them alike."""

    def once(run: Callable[[], torch.Tensor]) -> float:
        start = time.perf_counter()
        run()
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - start

    for run in runs.values():
        once(run)  # warm-up
    times: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(repeats):
        for name, run in runs.items():
            times[name].append(once(run))
    return {name: statistics.median(t) for name, t in times.items()}


@torch.no_grad()
def time_row(key: str, preset: dict[str, Any], size: tuple[int, ...], batch: int, queries: int, repeats: int, device: torch.device) -> dict[str, Any]:
    routed = {}
    for style in ("peft", "lorkd"):
        torch.manual_seed(0)  # the same base W0 for both styles
        routed[style] = student(preset, style)
    for net in routed.values():
        for layer in expert_layers(net):  # non-zero experts, as after training
            for name in layer.lora_B:
                torch.nn.init.normal_(layer.lora_B[name].weight, std=0.01)
        net.to(device).eval()
    region = REGIONS.index("thorax")
    merged = SAT(**routed["lorkd"].config)
    merged.load_state_dict(plain_state(routed["lorkd"], "thorax"), strict=True)
    merged.to(device).eval()
    x = torch.randn(batch, 1, *size, device=device)
    q = torch.randn(queries, merged.query_dim, device=device)
    index = torch.full((batch,), region, device=device)

    def routed_run(style: str) -> Callable[[], torch.Tensor]:
        def run() -> torch.Tensor:
            with route(routed[style].backbone, index):
                return routed[style](x, q)

        return run

    runs = {style: routed_run(style) for style in routed}
    times = median_seconds({**runs, "merged": lambda: merged(x, q)}, repeats, device)
    diff = float((merged(x, q) - routed_run("lorkd")()).abs().max())
    return {"name": key, "input": f"{batch}×1×{'×'.join(map(str, size))}, {queries} prompts", **times, "diff": diff}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--timing", nargs="+", default=["demo", "nano"], choices=sorted(PRESETS))
    parser.add_argument("--size", type=int, nargs=3, help="input size for the real presets (default 64 64 32)")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--queries", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    device = torch.device(args.device)

    print(f"## Inference time, one region (thorax), {device.type}, {torch.get_num_threads()} threads, median of {args.repeats}\n")
    print("| preset | input | routed student, peft experts | routed student, lorkd experts | merged expert (export) | merged / routed (lorkd) | max abs diff |")
    print("|---|---|---|---|---|---|---|")
    for key in args.timing:
        preset = PRESETS[key]
        size = tuple(args.size) if args.size and key != "demo" else preset["size"]
        r = time_row(key, preset, size, args.batch, args.queries, args.repeats, device)
        print(
            f"| {r['name']} | {r['input']} | {1e3 * r['peft']:.1f} ms | {1e3 * r['lorkd']:.1f} ms | "
            f"{1e3 * r['merged']:.1f} ms | {r['merged'] / r['lorkd']:.2f} | {r['diff']:.1e} |", flush=True,
        )  # fmt: skip

    print("\n## Parameters (no text encoder, no deep-supervision heads)\n")
    print("| student / teacher | one deployed expert (= student base) | all 8 experts, lorkd style | all 8 experts, peft style | teacher | deployed / teacher |")
    print("|---|---|---|---|---|---|")
    for preset in PRESETS.values():
        c = count_row(preset)
        print(
            f"| {c['name']} | {c['base']:,} | +{c['lorkd']:,} | +{c['peft']:,} | {c['teacher']:,} | "
            f"{100 * c['base'] / c['teacher']:.1f}% |", flush=True,
        )  # fmt: skip


if __name__ == "__main__":
    main()
