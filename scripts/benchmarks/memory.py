"""Peak GPU memory of training steps, counted on the meta device (no GPU, no memory): :mod:`lorkd.memory`.

  PYTHONPATH=. python scripts/benchmarks/memory.py                 # every GPU experiment as shipped
  PYTHONPATH=. python scripts/benchmarks/memory.py --calibrate     # the H100 rows of gpu_check.py, model vs measured
  PYTHONPATH=. python scripts/benchmarks/memory.py --sweep pro     # micro-batch x checkpointing for one experiment

``--calibrate`` runs exactly what ``gpu_check.py`` measured (same networks, inputs, optimizer, what else
was alive on the card), counted, and prints the model's GiB against the measured ones of RESULTS.md.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from lorkd.memory import (  # noqa: E402
    BUDGET_GIB,
    CUDA_OVERHEAD,
    GIB,
    LiveMemory,
    experiment_config,
    training_step_memory,
)

EXPERIMENTS = ["pro", "nano", "teacher_pro", "teacher_nano"]
# gpu_check.py on an NVIDIA H100 80GB HBM3 (RESULTS.md, "gpu_check.py — NVIDIA H100"), peak GiB
H100 = {
    "student": 18.07,  # LoRKD-Pro student fwd+bwd+AdamW, batch 1, 8 prompts
    "sat_nano": 9.44,  # SAT-Nano teacher forward, no grad
    "sat_pro": 17.77,  # SAT-Pro teacher forward, no grad
    "lorkd": 19.96,  # full LoRKD step: SAT-Pro teacher fwd + student fwd+bwd+step
    "plain_b2": 45.09,  # plain student U-Net (experts disabled) fwd+bwd, batch 2
}


def calibration(size=(288, 288, 96), prompts: int = 8) -> dict[str, float]:
    """Counted peaks (GiB, before the CUDA overhead) of gpu_check.py's rows, in its order and with what it
    kept alive: the student and its AdamW states throughout, the last teacher during the routing table."""
    from lorkd.experts import add_region_experts
    from scripts.benchmarks.gpu_check import REGIONS, lorkd_step, ranks, sat_from_preset

    meta = torch.device("meta")
    with meta:
        student = sat_from_preset("unet_nano")
        student.backbone = add_region_experts(student.backbone, REGIONS, ranks("ranks_pro")["ranks"])
    student.train()
    trainable = [p for p in student.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-4, foreach=True)
    image = torch.empty(1, 1, *size, device=meta)
    queries = torch.empty(prompts, 768, device=meta)
    target = torch.empty(1, prompts, *size, device=meta)
    qmask = torch.ones(1, prompts, dtype=torch.bool, device=meta)
    region = torch.tensor([5])
    for p in trainable:
        p.grad = torch.zeros_like(p)
    optimizer.step()  # gpu_check measures after a warm-up step: the states exist, and so do the grads

    def count(fn: Callable[[], None], *alive: torch.nn.Module) -> float:
        tracker = LiveMemory()
        for t in [*student.parameters(), *(p.grad for p in trainable if p.grad is not None), image, queries, target,
                  *(t for s in optimizer.state.values() for t in s.values()), *(p for m in alive for p in m.parameters())]:  # fmt: skip
            tracker.track(t)
        with tracker.counting("bf16-mixed"):
            fn()
        return tracker.peak / GIB

    def student_step(teacher_logits=None) -> None:
        lorkd_step(student, optimizer, image, queries, target, qmask, region, teacher_logits)

    out = {"student": count(student_step)}
    for name, preset in [("sat_nano", "unet_nano"), ("sat_pro", "unet_pro")]:
        with meta:
            teacher = sat_from_preset(preset).eval().requires_grad_(False)

        def forward(t=teacher) -> torch.Tensor:
            with torch.no_grad():
                return t(image, queries)

        out[name] = count(forward, teacher)
    out["lorkd"] = count(lambda: student_step(forward()), teacher)
    unet = student.backbone
    x = torch.empty(2, 3, *size, device=meta)

    def plain() -> None:
        unet.zero_grad(set_to_none=True)
        with unet.disable_adapter():
            unet(x).decoded[0].float().square().mean().backward()

    out["plain_b2"] = count(plain, teacher)  # gpu_check's closure still holds the SAT-Pro teacher here
    return out


def issue_saved(batch: int, size=(288, 288, 96), queries: int = 16) -> float:
    """GiB autograd saves in a float32 forward of SAT(**unet_nano) (the count issue 29 quotes: 24.6 / 193.6)."""
    from scripts.benchmarks.gpu_check import sat_from_preset

    with torch.device("meta"):
        net = sat_from_preset("unet_nano").train()
    tracker = LiveMemory()
    tracker.excluded = {p.untyped_storage()._cdata for p in net.parameters()}
    with tracker.counting("32-true"):
        net(torch.empty(batch, 1, *size, device="meta"), torch.empty(queries, 768, device="meta"))
    return sum(tracker.saved.get("start", {}).values()) / GIB


def calibration_table(counted: dict[str, float], overhead: float = CUDA_OVERHEAD) -> list[str]:
    names = {
        "student": "LoRKD-Pro student fwd+bwd+AdamW, batch 1, 8 prompts",
        "sat_nano": "SAT-Nano teacher forward, no grad",
        "sat_pro": "SAT-Pro teacher forward, no grad",
        "lorkd": "full LoRKD step: SAT-Pro teacher fwd + student fwd+bwd+step",
        "plain_b2": "plain student U-Net fwd+bwd, batch 2",
    }
    rows = ["| gpu_check.py row (H100) | measured GiB | model GiB | model / measured |", "|---|---|---|---|"]
    for key, label in names.items():
        model = counted[key] * overhead
        rows.append(f"| {label} | {H100[key]:.2f} | {model:.2f} | {model / H100[key]:.2f} |")
    return rows


def experiment_rows(experiments: list[str]) -> list[str]:
    rows = ["| experiment | micro-batch x accumulate | checkpointing | params | grads | optimizer | teacher fwd "
            "| activations | logits+loss | peak GiB | budget |", "|---|---|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for name in experiments:
        e = training_step_memory(experiment_config(name))
        g = e.gib()
        rows.append(
            f"| {name} | {e.meta['micro_batch']} x {e.meta['accumulate']} | {e.meta['checkpointing']} | "
            f"{g['parameters']:.2f} | {g['gradients']:.2f} | {g['optimizer']:.2f} | {g['teacher_forward']:.2f} | "
            f"{g['activations']:.2f} | {g['logits_loss']:.2f} | {e.peak_gib:.1f} | {'ok' if e.peak_gib <= BUDGET_GIB else 'OVER'} |"
        )
    return rows


def sweep_rows(experiment: str, batches: list[int]) -> list[str]:
    rows = ["| micro-batch | checkpointing | peak GiB | activations GiB | fits 72 GiB |", "|---|---|---|---|---|"]
    cfg = experiment_config(experiment)
    for micro in batches:
        for ckpt in (False, True):
            e = training_step_memory(cfg, micro_batch=micro, checkpointing=ckpt)
            fits = "yes" if e.peak_gib <= BUDGET_GIB else "no"
            rows.append(f"| {micro} | {ckpt} | {e.peak_gib:.1f} | {e.activations / GIB:.2f} | {fits} |")
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--calibrate", action="store_true", help="gpu_check.py's H100 rows: model vs measured")
    parser.add_argument("--sweep", default=None, help="micro-batch x checkpointing table of one experiment")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 2, 4, 8])
    parser.add_argument("--experiments", nargs="+", default=EXPERIMENTS)
    args = parser.parse_args(argv)
    if args.calibrate:
        lines = calibration_table(calibration())
        lines += ["", "| saved by autograd, float32, SAT(unet_nano), 16 queries | issue 29 GiB | counted GiB |", "|---|---|---|"]
        lines += [f"| batch {b} | {quoted} | {issue_saved(b):.1f} |" for b, quoted in [(1, 24.6), (8, 193.6)]]
    elif args.sweep:
        lines = sweep_rows(args.sweep, args.batches)
    else:
        lines = experiment_rows(args.experiments)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
