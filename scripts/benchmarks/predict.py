"""Prediction speed and peak memory: our Predictor vs MONAI's sliding_window_inference used naively.

Both run the same network (random weights, a student with its 8 region experts) on the same image,
in one process, one after the other:
  ours   Predictor.predict (``--runtime``, default predict.py's: auto): preprocessing, labels grouped by expert, each window encoded once and
         decoded ``max_queries`` prompts at a time, stitching on the CPU when the volume is large,
         labels mapped back to the input grid only where they can pass the threshold, slab by slab
         (labels whose boxes overlap in one sampling), masks and the multilabel map.
  naive  per expert ``sliding_window_inference`` with all of that expert's prompts decoded at once and
         stitching on the device, then every label mapped back at once and thresholded; resampling
         (preprocessing and mapping back) by MONAI's ``SpatialResample``, as when issue 13 was filed
         (our transforms then called MONAI's ``Spacing`` and ``SpatialResample``).
  naive, our resampling
         the same loop with our resampling (``lorkd.data.grid``): it gains every speed-up of ours
         there, so only the rest of ``Predictor.predict`` separates it from ours.
Workloads: the demo test set (``python scripts/make_demo_data.py --out outputs/demo/data``) and one
CT-sized volume (512x512x120 voxels at 0.8x0.8x2.5 mm, a synthetic body with air around it).
Peak memory: resident set size above the start of the call on the CPU (sampled every 5 ms),
``torch.cuda.max_memory_allocated`` above the start of the call on a GPU.

``--precisions bf16 int8``: ours again with OpenVINO at each reduced precision (one row each; int8 is
calibrated on the workload's own cases, written to a manifest). ``--ckpt``: a trained checkpoint (e.g. the
demo's LoRKD model) as one more preset, on the labels of its prompt bank that the workload asks for (CT:
its abdominal labels). ``--startup``: seconds from building the Predictor to the end of its first window,
with the default runtime (converted model cached) and with torch.

python scripts/benchmarks/predict.py [--device cpu|cuda] [--presets tiny nano] [--workloads demo ct]
    [--overlap 0.5] [--window-tiny 64 64 32] [--window-nano 288 288 96] [--ct-labels 24] [--demo-cases N]
    [--precisions bf16 int8] [--ckpt PATH] [--startup]
"""

from __future__ import annotations

import argparse
import functools
import gc
import json
import shutil
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from unittest import mock

import nibabel as nib
import numpy as np
import torch
import yaml

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

import lorkd.data.transforms as transforms_module  # noqa: E402
from lorkd.checkpoints.loading import LoadedModel  # noqa: E402
from lorkd.data.transforms import PreprocessConfig, invert_to_original  # noqa: E402
from lorkd.experts import add_region_experts, route  # noqa: E402
from lorkd.inference.predictor import Predictor  # noqa: E402
from lorkd.models.sat import SAT  # noqa: E402
from lorkd.models.text import TextEncoder  # noqa: E402
from lorkd.prompts import PromptBank  # noqa: E402
from lorkd.regions import RegionMap  # noqa: E402
from lorkd.utils import CONFIG_DIR  # noqa: E402

PRESETS = {  # backbone, expert ranks, query dim, decoder layers / heads / ffn
    "tiny": ("unet_tiny", "ranks_tiny", 64, 2, 4, 128),
    "nano": ("unet_student_nano", "ranks_nano", 768, 6, 8, 2048),
}
TEXT_DIM = 384  # MiniLM


def build_model(preset: str, window: Sequence[int], regions: RegionMap, labels: Sequence[str]) -> LoadedModel:
    backbone, ranks, query_dim, *_ = PRESETS[preset]
    torch.manual_seed(0)
    net = SAT(
        **yaml.safe_load((CONFIG_DIR / "backbone" / f"{backbone}.yaml").read_text()), query_dim=query_dim,
        **_decoder_arguments(preset),
    )  # fmt: skip
    experts = yaml.safe_load((CONFIG_DIR / "experts" / f"{ranks}.yaml").read_text())
    net.backbone = add_region_experts(
        net.backbone, regions.regions, experts["ranks"], experts["decoder_rank_factor"], experts["scaling"]
    )
    bank = PromptBank(TextEncoder(None, hidden_dim=TEXT_DIM, query_dim=query_dim, proj_hidden=query_dim))
    for label in labels:
        bank.embeddings[label] = torch.randn(TEXT_DIM)
    data = {"preprocess": PreprocessConfig().to_dict(), "patch_size": list(window)}
    return LoadedModel(net.eval(), bank, "experts", list(regions.regions), regions, data, f"random {preset}")


def write_checkpoint(loaded: LoadedModel, path: Path) -> Path:
    """Save a :func:`build_model` student as a LoRKD checkpoint that ``predict.py`` loads (prompts cached)."""
    from lorkd.checkpoints import schema

    _, ranks, *_ = PRESETS[loaded.source.split()[-1]]
    experts = yaml.safe_load((CONFIG_DIR / "experts" / f"{ranks}.yaml").read_text())
    net = loaded.net
    meta = schema.CheckpointMeta(
        kind="lorkd",
        text_encoder=schema.TextHead.of(loaded.prompts.text_encoder),
        prompt_bank=loaded.prompts.state_dict(),
        net=dict(net.config),
        region_map=loaded.region_map.to_dict(),
        data=loaded.data,
        experts=schema.ExpertsSpec(
            regions=list(loaded.experts), ranks=experts["ranks"], decoder_rank_factor=experts["decoder_rank_factor"],
            scaling=experts["scaling"],
        ),
    )  # fmt: skip
    state = {f"student.{k}": v for k, v in net.state_dict().items()}
    state.update({f"text_encoder.{k}": v for k, v in loaded.prompts.text_encoder.state_dict().items()})
    torch.save(schema.write({"state_dict": state}, meta), path)
    return path


def _decoder_arguments(preset: str) -> dict:
    _, _, _, layers, heads, ffn = PRESETS[preset]
    return {"decoder_layers": layers, "decoder_heads": heads, "decoder_ffn": ffn, "dropout": 0.0}


def ct_volume() -> tuple[np.ndarray, np.ndarray]:
    """512x512x120 at 0.8x0.8x2.5 mm: air, an elliptic body (340x240 mm), organs and a spine."""
    x, y = np.meshgrid((np.arange(512) - 255.5) * 0.8, (np.arange(512) - 255.5) * 0.8, indexing="ij")
    body = (x / 170) ** 2 + (y / 120) ** 2 < 1
    plane = np.where(body, 40.0, -1000.0)
    plane[((x - 60) / 70) ** 2 + ((y + 10) / 55) ** 2 < 1] = 60.0  # liver
    plane[((x + 70) / 35) ** 2 + ((y - 30) / 30) ** 2 < 1] = 50.0  # spleen
    plane[(x / 18) ** 2 + ((y - 80) / 18) ** 2 < 1] = 700.0  # vertebra
    rng = np.random.default_rng(0)
    volume = np.repeat(plane[:, :, None], 120, axis=2).astype(np.float32)
    volume += rng.normal(0, 10, volume.shape).astype(np.float32)
    return volume, np.diag([0.8, 0.8, 2.5, 1.0])


@dataclass
class Case:
    name: str
    image: np.ndarray | str
    affine: np.ndarray | None
    labels: list[str]
    modality: str


def demo_cases(folder: Path, limit: int | None) -> list[Case]:
    from lorkd.inference.inputs import discover_cases

    manifest = folder / "test.jsonl"
    if not manifest.is_file():
        raise SystemExit(f"{manifest} not found: python scripts/make_demo_data.py --out {folder}")
    cases = discover_cases(manifest)[:limit]
    return [Case(c.id, str(c.image), None, c.labels, c.modality) for c in cases]


class PeakMemory:
    """Peak memory above the level at entry: CUDA allocator on a GPU, sampled RSS on the CPU."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.peak_mb = 0.0

    def __enter__(self) -> PeakMemory:
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats(self.device)
            self.start = torch.cuda.memory_allocated(self.device)
        else:
            import psutil

            self.process = psutil.Process()
            self.start = self.process.memory_info().rss
            self.high = self.start
            self.running = True
            self.thread = threading.Thread(target=self._sample, daemon=True)
            self.thread.start()
        return self

    def _sample(self) -> None:
        while self.running:
            self.high = max(self.high, self.process.memory_info().rss)
            time.sleep(0.005)

    def __exit__(self, *exc: object) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            self.peak_mb = (torch.cuda.max_memory_allocated(self.device) - self.start) / 2**20
        else:
            self.running = False
            self.thread.join()
            self.high = max(self.high, self.process.memory_info().rss)
            self.peak_mb = (self.high - self.start) / 2**20


def ours(predictor: Predictor, case: Case) -> None:
    predictor.predict(case.image, case.labels, case.modality, affine=case.affine)


def monai_resample(array, src_affine, dst_affine, dst_shape, mode, support=None, within=None) -> np.ndarray:
    """MONAI's ``SpatialResample`` with :func:`lorkd.data.grid.resample`'s arguments (it samples every
    output voxel: ``support`` is not used, ``within`` cuts its box from the whole output)."""
    from monai.data import MetaTensor
    from monai.transforms import SpatialResample

    src = MetaTensor(
        torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32)),
        affine=torch.as_tensor(src_affine, dtype=torch.float64),
    )
    out = SpatialResample(mode=mode, padding_mode="border", dtype=torch.float32)(
        src, dst_affine=torch.as_tensor(dst_affine, dtype=torch.float64), spatial_size=tuple(dst_shape)
    )
    out = np.asarray(out.as_tensor() if isinstance(out, MetaTensor) else out, dtype=np.float32)
    return out if within is None else out[(slice(None), *within)]


def naive(predictor: Predictor, case: Case, sw_batch_size: int = 2) -> None:
    """The textbook MONAI loop, resampling with MONAI's ``SpatialResample``."""
    with mock.patch.object(transforms_module, "resample", monai_resample):
        naive_our_resampling(predictor, case, sw_batch_size)


def naive_our_resampling(predictor: Predictor, case: Case, sw_batch_size: int = 2) -> None:
    """The textbook MONAI loop: all of an expert's prompts in one decode, ``sw_batch_size`` windows per
    forward, stitching where the network runs."""
    from monai.inferers import sliding_window_inference

    _, array, info = predictor.preprocess_input(case.image, case.modality, case.affine)
    net, device = predictor.model.net, predictor.device
    image = torch.from_numpy(array)[None].to(device)
    probabilities = np.zeros((len(case.labels), *info.shape), dtype=np.float32)
    for group in predictor.plan(case.labels, case.modality):
        queries = predictor.model.prompts.queries([case.labels[i] for i in group.indices], case.modality).to(
            device
        )

        def network(
            windows: torch.Tensor, expert: int = group.expert, q: torch.Tensor = queries
        ) -> torch.Tensor:
            autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda")
            with autocast, route(net.backbone, torch.full((windows.shape[0],), expert)):
                return torch.sigmoid(net(windows, q).float())

        with torch.inference_mode():
            out = sliding_window_inference(
                image,
                predictor.window,
                sw_batch_size,
                network,
                overlap=predictor.overlap,
                mode="gaussian",
            )
        probabilities[group.indices] = out[0].cpu().numpy()
    masks = invert_to_original(probabilities, info, mode="bilinear") > predictor.threshold
    np.argmax(masks, axis=0)


class FirstWindow(Exception):
    """Raised by the progress callback at the end of the first window: start-up measured."""


def startup_seconds(make: Callable[[], Predictor], case: Case) -> float:
    """Seconds from ``make()`` (building the Predictor) to the end of its first window on ``case``."""

    def stop(done: int, total: int) -> None:
        raise FirstWindow

    start = time.perf_counter()
    try:
        make().predict(case.image, case.labels, case.modality, affine=case.affine, progress=stop)
    except FirstWindow:
        return time.perf_counter() - start
    raise RuntimeError("the prediction ended without a window")


def calibration_manifest(cases: Sequence[Case], folder: Path) -> Path:
    """The cases as an int8 calibration manifest in ``folder`` (arrays written as NIfTI files)."""
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for i, case in enumerate(cases):
        image = case.image
        if not isinstance(image, str):
            image = str(folder / f"case{i}.nii.gz")
            nib.save(nib.Nifti1Image(case.image, case.affine), image)
        rows.append({"image": image, "label": case.labels, "modality": case.modality})
    path = folder / "calibration.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def measure(
    methods: dict[str, Callable[[Predictor, Case], None]], predictor: Predictor, cases: Sequence[Case]
) -> dict[str, tuple[float, float]]:
    """Mean seconds per case and the largest peak memory (MB) per method; the order of the methods turns
    round from case to case, so a drift in machine load does not favour one of them."""
    seconds: dict[str, list[float]] = {name: [] for name in methods}
    peaks = dict.fromkeys(methods, 0.0)
    for i, case in enumerate(cases):
        order = list(methods)[i % len(methods) :] + list(methods)[: i % len(methods)]
        for name in order:
            with PeakMemory(predictor.device) as memory:
                start = time.perf_counter()
                methods[name](predictor, case)
                if predictor.device.type == "cuda":
                    torch.cuda.synchronize()
                seconds[name].append(time.perf_counter() - start)
            peaks[name] = max(peaks[name], memory.peak_mb)
    return {name: (float(np.mean(seconds[name])), peaks[name]) for name in methods}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--presets", nargs="*", default=["tiny", "nano"], choices=sorted(PRESETS))
    parser.add_argument("--workloads", nargs="+", default=["demo", "ct"], choices=["demo", "ct"])
    parser.add_argument("--demo-dir", type=Path, default=ROOT / "outputs" / "demo" / "data")
    parser.add_argument("--demo-cases", type=int, default=None, help="first N demo test cases (default: all)")
    parser.add_argument("--overlap", type=float, default=0.5)
    parser.add_argument("--window-tiny", type=int, nargs=3, default=[64, 64, 32])
    parser.add_argument("--window-nano", type=int, nargs=3, default=[288, 288, 96])
    parser.add_argument("--ct-labels", type=int, default=24, help="abdominal prompts on the CT volume")
    parser.add_argument("--sw-batch-size", type=int, default=None, help="ours (default: the Predictor's choice)")
    parser.add_argument("--naive-sw-batch-size", type=int, default=2, help="the naive loop's")
    parser.add_argument("--max-queries", type=int, default=16)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--runtime", default="auto", choices=["auto", "torch", "openvino"],
                        help="ours (default: predict.py's, auto; networks converted in the warm-up)")  # fmt: skip
    parser.add_argument("--precisions", nargs="*", default=[], choices=["bf16", "int8"], help="ours again with OpenVINO at these")
    parser.add_argument("--ckpt", type=Path, default=None, help="a trained checkpoint as one more preset")
    parser.add_argument("--startup", action="store_true", help="time building the Predictor to its first window")
    parser.add_argument("--cache-dir", type=Path, default=None, help="converted networks kept here (default: a temporary folder)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    regions = RegionMap.from_config("demo")
    workloads: dict[str, list[Case]] = {}
    if "demo" in args.workloads:
        workloads["demo test set"] = demo_cases(args.demo_dir, args.demo_cases)
    if "ct" in args.workloads:
        abdomen = sorted(
            k.split("_", 1)[1]
            for k, r in regions.label_region.items()
            if r == "abdomen" and k.startswith("ct_")
        )
        image, affine = ct_volume()
        workloads["CT 512x512x120"] = [Case("ct", image, affine, abdomen[: args.ct_labels], "ct")]
    labels = sorted({lab for cases in workloads.values() for case in cases for lab in case.labels})
    warm_up = Case("warm-up", np.full((40, 40, 20), 50.0, np.float32), np.eye(4), ["liver"], "ct")

    print(
        f"device: {device} ({torch.cuda.get_device_name(device) if device.type == 'cuda' else f'{torch.get_num_threads()} CPU threads'})"
    )
    print(
        f"overlap {args.overlap}, gaussian; naive: sw_batch_size {args.naive_sw_batch_size}; ours: sw_batch_size "
        f"{args.sw_batch_size or 'the Predictor default'}, max_queries {args.max_queries}, stitch auto\n"
    )
    print(
        "| workload | preset | window | cases | labels/case | ours s/case | naive s/case | ours/naive time "
        "| naive, our resampling s/case | ours/that time | ours peak MB | naive peak MB | ours/naive memory "
        "| naive, our resampling peak MB | ours/that memory |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    batch = args.naive_sw_batch_size
    methods = {
        "ours": ours,
        "naive": functools.partial(naive, sw_batch_size=batch),
        "naive, our resampling": functools.partial(naive_our_resampling, sw_batch_size=batch),
    }
    cache_dir = args.cache_dir or tempfile.mkdtemp(prefix="lorkd-openvino-")  # converted networks: this run's own
    options = dict(device=device, overlap=args.overlap, sw_batch_size=args.sw_batch_size, max_queries=args.max_queries,
                   cache_dir=cache_dir)  # fmt: skip
    for preset in [*args.presets, *(["checkpoint"] if args.ckpt else [])]:
        window = args.window_tiny if preset == "tiny" else args.window_nano

        def make(runtime: str = args.runtime, preset: str = preset, window: list = window, **more: object) -> Predictor:
            if preset == "checkpoint":
                return Predictor.from_checkpoint(args.ckpt, runtime=runtime, **options, **more)
            return Predictor(build_model(preset, window, regions, labels), runtime=runtime, **options, **more)

        predictor = make()
        print(f"# {preset}: ours runs {predictor.sw_batch_size} window(s) per forward, "
              f"runtime {args.runtime} ({predictor.cpu_runtime or 'torch'})", flush=True)  # fmt: skip
        for name, cases in workloads.items():
            if preset == "checkpoint":  # the labels its prompt bank knows
                known = predictor.model.prompts.embeddings
                cases = [Case(c.name, c.image, c.affine, [lab for lab in c.labels if lab in known], c.modality) for c in cases]
            ours(predictor, warm_up)  # imports and one-time allocations outside the timings
            naive(predictor, warm_up)
            for case in cases:  # every expert converted (OpenVINO) before the timings
                predictor.check(case.labels, case.modality)
            results = measure(methods, predictor, cases)
            (t_ours, m_ours), (t_naive, m_naive), (t_ours_grid, m_ours_grid) = (results[k] for k in methods)
            per_case = np.mean([len(c.labels) for c in cases])
            print(
                f"| {name} | {preset} | {'x'.join(map(str, predictor.window))} | {len(cases)} | {per_case:.1f} "
                f"| {t_ours:.2f} | {t_naive:.2f} | {t_ours / t_naive:.2f} | {t_ours_grid:.2f} | {t_ours / t_ours_grid:.2f} "
                f"| {m_ours:.0f} | {m_naive:.0f} | {m_ours / max(m_naive, 1e-9):.2f} "
                f"| {m_ours_grid:.0f} | {m_ours / max(m_ours_grid, 1e-9):.2f} |",
                flush=True,
            )
            for precision in args.precisions:
                calibration = calibration_manifest(cases, Path(cache_dir) / f"calibration-{preset}") if precision == "int8" else None
                reduced = make("openvino", precision=precision, calibration=calibration)
                for case in cases:
                    reduced.check(case.labels, case.modality)  # converted (and quantised) before the timing
                t, m = measure({"ours": ours}, reduced, cases)["ours"]
                print(f"| {name} | {preset}, ours OpenVINO {precision} | {'x'.join(map(str, predictor.window))} | {len(cases)} "
                      f"| {per_case:.1f} | {t:.2f} | {t_naive:.2f} | {t / t_naive:.2f} | — | — | {m:.0f} | {m_naive:.0f} "
                      f"| {m / max(m_naive, 1e-9):.2f} | — | — |", flush=True)  # fmt: skip
                del reduced
            if args.startup:
                first = cases[0]
                cached = startup_seconds(make, first)
                eager = startup_seconds(lambda: make("torch"), first)
                print(f"# {name}, {preset}: building the Predictor to the end of its first window: {cached:.2f} s with "
                      f"runtime {args.runtime} (converted model cached), {eager:.2f} s with torch", flush=True)  # fmt: skip
    if args.cache_dir is None:
        shutil.rmtree(cache_dir, ignore_errors=True)


if __name__ == "__main__":
    main()
