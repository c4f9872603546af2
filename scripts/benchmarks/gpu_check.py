"""Real-size GPU check: LoRKD-Pro training step, teacher forwards, and expert routing, in bf16.

Measured in one process (median of ``--repeats`` after warm-up; peak memory from the CUDA allocator):
  * LoRKD-Pro student (SAT-Nano-sized backbone + the 8 Pro experts), one 288x288x96 window, 8 prompts:
    forward+backward+AdamW step (routed to one expert), and the full distillation step with a teacher;
  * SAT-Nano and SAT-Pro teacher forwards (no grad);
  * expert routing on a mixed-region batch: plain student, ours, per-sample loop, the paper's EKS.

  * prediction of one CT-sized case (512x512x120 at 0.8x0.8x2.5 mm, int16 NIfTI) with a random-weight
    student (``--predict-preset``, 8 experts) saved as a LoRKD checkpoint: ``python predict.py`` end to end
    in a fresh process (start-up, loading, preprocessing, sliding windows, inversion, writing), and
    ``Predictor.predict`` warm in this process; seconds per case and peak GPU memory of each.

Needs a CUDA GPU (it stops with one line without one). The training/routing steps need only torch,
peft and pyyaml; the prediction check needs the installed project (MONAI, Hydra, Lightning):
  PYTHONPATH=. python scripts/benchmarks/gpu_check.py [--size 288 288 96] [--repeats 5] [--out FILE.md]
      [--skip-steps] [--skip-predict] [--predict-preset nano] [--predict-labels 5] [--predict-window 288 288 96]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
import yaml

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from lorkd.experts import add_region_experts, route  # noqa: E402
from lorkd.experts.routed import expert_layers  # noqa: E402
from lorkd.losses import distillation_loss, segmentation_loss  # noqa: E402
from lorkd.models.sat import SAT  # noqa: E402
from lorkd.utils import CONFIG_DIR  # noqa: E402

REGIONS = ["abdomen", "brain", "head_and_neck", "lower_limb", "pelvis", "spine", "thorax", "upper_limb"]


def sat_from_preset(backbone: str, **extra) -> SAT:
    spec = yaml.safe_load((CONFIG_DIR / "backbone" / f"{backbone}.yaml").read_text())
    return SAT(**spec, query_dim=768, decoder_layers=6, decoder_heads=8, decoder_ffn=2048, dropout=0.1, **extra)


def ranks(name: str) -> dict:
    return yaml.safe_load((CONFIG_DIR / "experts" / f"{name}.yaml").read_text())


def lorkd_step(student: SAT, optimizer: torch.optim.Optimizer, image: torch.Tensor, queries: torch.Tensor,
               target: torch.Tensor, qmask: torch.Tensor, region: torch.Tensor,
               teacher_logits: torch.Tensor | None = None) -> None:  # fmt: skip
    """One optimizer step of the student routed to ``region``: Dice+BCE, plus 0.1 x KD given teacher logits
    (what this script times, and what ``memory.py --calibrate`` counts)."""
    optimizer.zero_grad(set_to_none=True)
    with route(student.backbone, region):
        logits = student(image, queries)
    loss = segmentation_loss(logits, target, qmask)[0]
    if teacher_logits is not None:
        loss = loss + 0.1 * distillation_loss(logits, teacher_logits, qmask)
    loss.backward()
    optimizer.step()


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


# Runs predict.py in the child and writes its peak CUDA memory (bytes) to argv[1] when it exits.
PEAK_CHILD = (
    "import atexit, json, runpy, sys, torch\n"
    "out = sys.argv[1]\n"
    "peak = lambda: torch.cuda.max_memory_allocated() if torch.cuda.is_available() else 0\n"
    "atexit.register(lambda: open(out, 'w').write(json.dumps({'peak': peak()})))\n"
    "sys.argv = sys.argv[2:]\n"
    "runpy.run_path(sys.argv[0], run_name='__main__')\n"
)


def prepare_predict_case(
    folder: Path, preset: str, window: tuple[int, ...], n_labels: int, size: tuple[int, int, int] = (512, 512, 120)
) -> tuple[Path, Path, list[str]]:
    """A random-weight LoRKD checkpoint of ``preset`` and the synthetic CT (int16 NIfTI); returns (ckpt, image, labels)."""
    import nibabel as nib
    import numpy as np

    from lorkd.regions import RegionMap
    from scripts.benchmarks.predict import build_model, ct_volume, write_checkpoint

    regions = RegionMap.from_config("demo")
    abdomen = sorted(k.split("_", 1)[1] for k, r in regions.label_region.items() if r == "abdomen" and k.startswith("ct_"))
    labels = abdomen[:n_labels]
    ckpt = write_checkpoint(build_model(preset, window, regions, labels), folder / f"{preset}.ckpt")
    volume, affine = ct_volume()
    image = folder / "ct.nii.gz"
    nib.save(nib.Nifti1Image(np.rint(volume[: size[0], : size[1], : size[2]]).astype(np.int16), affine), image)
    return ckpt, image, labels


def run_predict_cli(ckpt: Path, image: Path, labels: list[str], out: Path) -> tuple[float, float]:
    """``python predict.py`` on one case in a fresh process: (wall seconds, peak CUDA GiB; 0 on the CPU)."""
    peak_file = out.parent / f"{out.name}.peak.json"
    command = [
        sys.executable, "-c", PEAK_CHILD, str(peak_file), str(ROOT / "predict.py"), f"ckpt_path={ckpt}",
        f"input={image}", f"labels=[{','.join(labels)}]", "modality=ct", f"output_dir={out}", "progress=false",
    ]  # fmt: skip
    env = dict(os.environ, PYTHONPATH=str(ROOT), HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", WANDB_MODE="disabled")
    start = time.perf_counter()
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        raise RuntimeError(f"predict.py failed (exit {done.returncode}):\n{done.stderr[-3000:]}")
    return seconds, json.loads(peak_file.read_text())["peak"] / 2**30


def predict_rows(args: argparse.Namespace, device: torch.device) -> list[tuple[str, float, float]]:
    """predict.py end to end and the warm in-process Predictor on one CT-sized case: (name, s, peak GiB)."""
    from lorkd.inference.predictor import Predictor

    window = tuple(args.predict_window)
    with tempfile.TemporaryDirectory() as tmp:
        ckpt, image, labels = prepare_predict_case(Path(tmp), args.predict_preset, window, args.predict_labels)
        cli_seconds, cli_peak = run_predict_cli(ckpt, image, labels, Path(tmp) / "out")
        predictor = Predictor.from_checkpoint(ckpt, device=device)
        predictor.predict(image, labels[:1], "ct")  # warm-up: cuDNN plans, allocator
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        predictor.predict(image, labels, "ct")
        torch.cuda.synchronize()
        warm = time.perf_counter() - start
        warm_peak = torch.cuda.max_memory_allocated() / 2**30
    what = f"{args.predict_preset} student, CT 512x512x120, {len(labels)} labels, window {'x'.join(map(str, window))}"
    return [
        (f"python predict.py end to end, fresh process ({what})", cli_seconds, cli_peak),
        (f"Predictor.predict in process, warm ({what})", warm, warm_peak),
    ]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, nargs=3, default=[288, 288, 96])
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--routing-batch", type=int, default=2)
    parser.add_argument("--skip-pro", action="store_true", help="skip the SAT-Pro teacher (memory/time)")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--skip-steps", action="store_true", help="only the prediction check")
    parser.add_argument("--skip-predict", action="store_true", help="no prediction check")
    parser.add_argument("--predict-preset", default="nano", choices=["tiny", "nano"])
    parser.add_argument("--predict-labels", type=int, default=5)
    parser.add_argument("--predict-window", type=int, nargs=3, default=[288, 288, 96])
    parser.add_argument("--train", nargs="+", default=[], metavar="EXPERIMENT",
                        help="only Trainer.fit steps of these shipped experiments (pro, nano, teacher_pro, teacher_nano)")
    parser.add_argument("--train-steps", type=int, default=6, help="optimizer steps per experiment (2 untimed)")
    parser.add_argument("--train-cases", type=int, default=3, help="synthetic CT cases (512x512x300) in the manifest")
    parser.add_argument("--train-shape", type=int, nargs=3, default=[512, 512, 300])
    parser.add_argument("--train-override", action="append", default=[], help="extra Hydra override (repeatable)")
    parser.add_argument("--train-teacher", default=None, help="teacher backbone instead of the experiment's (tests)")
    parser.add_argument("--allow-cpu", action="store_true", help="--train on the CPU (tests, with shrinking overrides)")
    args = parser.parse_args(argv)
    if args.train:
        train_lines(args)
        return
    if not torch.cuda.is_available():
        raise SystemExit("gpu_check.py needs a CUDA GPU: torch.cuda.is_available() is False on this machine")
    device = torch.device("cuda")
    torch.backends.cudnn.benchmark = True
    torch.manual_seed(0)
    lines = [f"card: {torch.cuda.get_device_name()}; torch {torch.__version__}"]
    if not args.skip_steps:
        lines += step_lines(args, device)
    if not args.skip_predict:
        lines += [
            "",
            "Prediction of one CT-sized case (random weights; bf16 autocast; peak: CUDA allocator):",
            "",
            "| run | s/case | peak GiB |",
            "|---|---|---|",
            *[f"| {name} | {s:.1f} | {p:.2f} |" for name, s, p in predict_rows(args, device)],
        ]
    text = "\n".join(lines)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")


def train_lines(args: argparse.Namespace) -> None:
    """``--train``: real Trainer.fit steps of each experiment; prints (rank 0) and writes ``--out``."""
    from scripts.benchmarks.train_check import run_check, table

    results = []
    for experiment in args.train:
        result = run_check(
            experiment, steps=args.train_steps, cases=args.train_cases, shape=args.train_shape,
            overrides=args.train_override, teacher_backbone=args.train_teacher, allow_cpu=args.allow_cpu,
        )  # fmt: skip
        if result is None:  # a DDP rank other than 0
            return
        results.append(result)
    first = results[0]
    text = "\n".join([
        f"card: {first['device']} x {first['devices']}; torch {torch.__version__}; {first['precision']}; "
        f"patch {'x'.join(map(str, first['patch']))}, {first['queries']} queries; synthetic CT "
        f"{'x'.join(map(str, args.train_shape))}, {args.train_cases} cases; median of the timed micro-batches",
        "",
        *table(results),
    ])  # fmt: skip
    print(text)
    if args.out:
        args.out.write_text(text + "\n")


def step_lines(args: argparse.Namespace, device: torch.device) -> list[str]:
    """Training steps, teacher forwards and the routing table, as markdown lines."""
    dtype = torch.bfloat16
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
        with torch.autocast(device.type, dtype=dtype):
            lorkd_step(student, optimizer, image, queries, target, qmask, region, teacher_logits)

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
    return [
        f"window {size}; {args.prompts} prompts; bf16 autocast; median of {args.repeats} after warm-up",
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
