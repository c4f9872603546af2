"""Real-size GPU check: LoRKD-Pro training step, teacher forwards, and expert routing, in bf16.

Measured in one process (median of ``--repeats`` after warm-up; peak memory from the CUDA allocator):
  * LoRKD-Pro student (SAT-Nano-sized backbone + the 8 Pro experts), one 288x288x96 window, 8 prompts:
    forward+backward+AdamW step (routed to one expert), and the full distillation step with a teacher;
  * SAT-Nano and SAT-Pro teacher forwards (no grad);
  * expert routing on a mixed-region batch: plain student, ours, per-sample loop, the paper's EKS.

Needs only torch, peft and pyyaml (no MONAI/Hydra), so it runs on a bare GPU image:
  PYTHONPATH=. python scripts/benchmarks/gpu_check.py [--size 288 288 96] [--repeats 5] [--out FILE.md]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
import yaml

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from lorkd.experts import add_region_experts, route  # noqa: E402
from lorkd.experts.build import expert_layers  # noqa: E402
from lorkd.losses import distillation_loss, segmentation_loss  # noqa: E402
from lorkd.models.sat import SAT  # noqa: E402
from lorkd.utils import CONFIG_DIR  # noqa: E402

REGIONS = ["abdomen", "brain", "head_and_neck", "lower_limb", "pelvis", "spine", "thorax", "upper_limb"]


def sat_from_preset(backbone: str, **extra) -> SAT:
    spec = yaml.safe_load((CONFIG_DIR / "backbone" / f"{backbone}.yaml").read_text())
    return SAT(**spec, query_dim=768, decoder_layers=6, decoder_heads=8, decoder_ffn=2048, dropout=0.1, **extra)


def ranks(name: str) -> dict:
    return yaml.safe_load((CONFIG_DIR / "experts" / f"{name}.yaml").read_text())


def measure(fn: Callable[[], None], repeats: int, device: torch.device) -> tuple[float, float]:
    """(median seconds, peak GiB) of ``fn`` after one warm-up call."""
    fn()
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    sync()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan")
    return statistics.median(times), peak


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, nargs=3, default=[288, 288, 96])
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--routing-batch", type=int, default=2)
    parser.add_argument("--skip-pro", action="store_true", help="skip the SAT-Pro teacher (memory/time)")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.backends.cudnn.benchmark = True
    torch.manual_seed(0)
    dtype = torch.bfloat16
    card = torch.cuda.get_device_name() if device.type == "cuda" else "CPU"
    size = tuple(args.size)
    rows: list[tuple[str, float, float]] = []

    expert_cfg = ranks("ranks_pro")
    student = sat_from_preset("unet_nano")
    student.backbone = add_region_experts(student.backbone, REGIONS, expert_cfg["ranks"])
    student.to(device).train()
    for layer in expert_layers(student):
        for name in layer.lora_B:
            torch.nn.init.normal_(layer.lora_B[name].weight, std=1e-3)
    optimizer = torch.optim.AdamW([p for p in student.parameters() if p.requires_grad], lr=1e-4)
    image = torch.randn(1, 1, *size, device=device)
    queries = torch.randn(args.prompts, 768, device=device)
    target = (torch.rand(1, args.prompts, *size, device=device) > 0.9).float()
    qmask = torch.ones(1, args.prompts, dtype=torch.bool, device=device)
    region = torch.tensor([5], device=device)  # spine: the largest Pro expert (rank 16)

    def student_step(teacher_logits: torch.Tensor | None = None) -> None:
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=dtype), route(student.backbone, region):
            logits = student(image, queries)
        loss = segmentation_loss(logits, target, qmask)[0]
        if teacher_logits is not None:
            loss = loss + 0.1 * distillation_loss(logits, teacher_logits, qmask)
        loss.backward()
        optimizer.step()

    params = sum(p.numel() for n, p in student.named_parameters() if ".lora_" not in n)
    experts = sum(p.numel() for n, p in student.named_parameters() if ".lora_" in n)
    seconds, peak = measure(student_step, args.repeats, device)
    rows.append((f"LoRKD-Pro student fwd+bwd+AdamW ({params / 1e6:.1f}M base + {experts / 1e6:.1f}M experts)", seconds, peak))

    teachers = [("SAT-Nano", "unet_nano")] + ([] if args.skip_pro else [("SAT-Pro", "unet_pro")])
    for name, preset in teachers:
        teacher = sat_from_preset(preset).to(device).eval().requires_grad_(False)

        def teacher_forward(t=teacher) -> torch.Tensor:
            with torch.no_grad(), torch.autocast(device.type, dtype=dtype):
                return t(image, queries)

        seconds, peak = measure(teacher_forward, args.repeats, device)
        count = sum(p.numel() for p in teacher.parameters())
        rows.append((f"{name} teacher forward, no grad ({count / 1e6:.1f}M)", seconds, peak))
        if name == ("SAT-Pro" if not args.skip_pro else "SAT-Nano"):

            def lorkd_step(t=teacher_forward) -> None:
                student_step(t())

            seconds, peak = measure(lorkd_step, args.repeats, device)
            rows.append((f"full LoRKD step: {name} teacher fwd + student fwd+bwd+step", seconds, peak))
        del teacher
        if device.type == "cuda":
            torch.cuda.empty_cache()

    routing_rows = routing_table(student, args, device, dtype)
    lines = [
        f"card: {card}; torch {torch.__version__}; window {size}; {args.prompts} prompts; bf16 autocast; "
        f"median of {args.repeats} after warm-up",
        "",
        "| step | ms | peak GiB |",
        "|---|---|---|",
        *[f"| {name} | {1000 * s:.1f} | {p:.2f} |" for name, s, p in rows],
        "",
        f"Expert routing, forward+backward of the student U-Net, batch {args.routing_batch} with "
        f"{args.routing_batch} different experts, window {size}:",
        "",
        "| method | ms | vs plain | peak GiB |",
        "|---|---|---|---|",
        *routing_rows,
    ]
    text = "\n".join(lines)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")


def routing_table(student: SAT, args, device: torch.device, dtype: torch.dtype) -> list[str]:
    """Mixed-region batch through the student U-Net alone: plain vs our routing vs per-sample vs EKS."""
    unet = student.backbone
    b = args.routing_batch
    x = torch.randn(b, 3, *args.size, device=device)
    regions = torch.arange(b, device=device) % len(REGIONS)
    onehot = F.one_hot(regions, len(REGIONS))

    def backward(out) -> None:
        out.decoded[0].float().square().mean().backward()

    def plain() -> None:
        unet.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=dtype), unet.disable_adapter():
            backward(unet(x))

    def ours() -> None:
        unet.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=dtype), route(unet, regions):
            backward(unet(x))

    def per_sample() -> None:
        unet.zero_grad(set_to_none=True)
        for i in range(b):
            with torch.autocast(device.type, dtype=dtype), route(unet, regions[i : i + 1]):
                backward(unet(x[i : i + 1]))

    def eks() -> None:
        from scripts.benchmarks.routing import eks_forward

        unet.zero_grad(set_to_none=True)
        layers = expert_layers(unet)
        for layer in layers:
            layer.forward = lambda inp, _l=layer: eks_forward(_l, inp, onehot)
        try:
            with torch.autocast(device.type, dtype=dtype):
                backward(unet(x))
        finally:
            for layer in layers:
                del layer.forward

    results = [(name, *measure(fn, args.repeats, device)) for name, fn in
               [("plain student (experts disabled)", plain), ("routed (ours)", ours),
                ("per-sample loop", per_sample), ("EKS grouped conv (paper)", eks)]]  # fmt: skip
    base = results[0][1]
    return [f"| {name} | {1000 * s:.1f} | {s / base:.2f}x | {p:.2f} |" for name, s, p in results]


if __name__ == "__main__":
    main()
