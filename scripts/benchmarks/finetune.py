"""Add a structure the demo never saw with one adapter (issue 27, item 4), against a plain U-Net from scratch.

From the demo's LoRKD checkpoint (``outputs/demo/{teacher,lorkd}``, trained by ``scripts/demo.py`` when
missing, with ``--teacher-steps``/``--lorkd-steps``), the demo's abdomen phantoms gain a gallbladder and are
written as an nnU-Net v2 dataset (:mod:`lorkd.data.demo_nnunet`: ``--train`` cases, ``--test`` held out in
imagesTs/labelsTs). ``experiment=finetune`` trains the abdomen expert alone for ``--steps`` steps on it;
the peer, a MONAI ``UNet`` whose parameter count is the abdomen adapter's, trains from scratch on the same
patches (same data module, preprocessing, augmentation, batch and steps) to segment the gallbladder.
Reported, on the held-out cases in the preprocessed grid (sliding window, threshold 0.5): the gallbladder's
Dice (fine-tuned expert, peer), the abdomen expert's old labels' Dice before and after, and, for every
other expert, the maximum absolute difference of its logits before and after (must be 0).

    python scripts/benchmarks/finetune.py [--steps 600] [--train 8] [--test 4] [--out outputs/benchmarks/finetune]
        [--teacher T.ckpt --student LORKD.ckpt] [OVERRIDE ...]

OVERRIDEs go to the fine-tuning run (e.g. ``model.lambda_lwf=0`` for plain fine-tuning).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[2]
DEMO = ROOT / "outputs" / "demo"
NEW = "gallbladder"
OLD = ["liver", "spleen", "left kidney", "right kidney", "aorta"]


def run(args: list[str]) -> None:
    print(f"$ {' '.join(args)}", flush=True)
    subprocess.run([sys.executable, *args], cwd=ROOT, check=True)


def dice(pred: np.ndarray, ref: np.ndarray) -> float:
    total = pred.sum() + ref.sum()
    return 1.0 if total == 0 else float(2 * (pred & ref).sum() / total)


def held_out(data: Path, preprocess: dict) -> list[tuple[torch.Tensor, dict[str, np.ndarray]]]:
    """(image (1,1,X,Y,Z), {label: mask}) of each imagesTs case in the preprocessed grid."""
    import nibabel as nib

    from lorkd.data.transforms import preprocess_image, to_preprocessed_grid

    names = [*OLD, NEW]
    cases = []
    for image in sorted((data / "imagesTs").glob("*.nii.gz")):
        array, info = preprocess_image(image, "ct", preprocess)
        labels = np.asarray(nib.load(str(data / "labelsTs" / image.name.replace("_0000", ""))).dataobj)
        masks = to_preprocessed_grid(np.stack([labels == i + 1 for i, _ in enumerate(names)]).astype(np.uint8), info)
        cases.append((torch.from_numpy(array)[None], {n: masks[i] > 0 for i, n in enumerate(names)}))
    return cases


def expert_output(model, image: torch.Tensor, labels: list[str], expert: int, window, activation=torch.sigmoid) -> torch.Tensor:
    """``activation`` of one expert's logits over the whole image (sliding window, SAT's Gaussian blend)."""
    from lorkd.experts import forward_routed
    from lorkd.inference.sliding_window import sliding_window_probabilities

    queries = model.prompts.queries(labels, "ct").unsqueeze(0)

    def net(x: torch.Tensor) -> torch.Tensor:
        region = torch.full((x.shape[0],), expert)
        return forward_routed(lambda a, q: model.net(a, q), model.net.backbone, region, (x, queries.expand(x.shape[0], -1, -1)), "split")

    with torch.no_grad():
        return sliding_window_probabilities(image, lambda x: activation(net(x)), window)


def other_experts_difference(before, after, cases, window) -> dict[str, float]:
    """Max |logit difference| of every expert but the abdomen's before and after, over every held-out image."""
    out = {}
    for index, region in enumerate(before.experts):
        if region == "abdomen":
            continue
        labels = ["liver", "heart"]
        out[region] = max(
            float((expert_output(before, image, labels, index, window, lambda x: x)
                   - expert_output(after, image, labels, index, window, lambda x: x)).abs().max())
            for image, _ in cases
        )  # fmt: skip
    return out


def train_peer(ckpt: Path, data: Path, steps: int, size: int, out: Path, seed: int = 0) -> torch.nn.Module:
    """A MONAI UNet with about ``size`` parameters, trained from scratch on the gallbladder (BCE + Dice)."""
    from monai.networks.nets import UNet

    from lorkd.checkpoints.loading import read_training_data
    from lorkd.data.datamodule import LoRKDDataModule
    from lorkd.losses import segmentation_loss
    from lorkd.regions import RegionMap

    torch.manual_seed(seed)
    width = 4
    while True:  # the widest (w, 2w, 4w, 8w) UNet within the adapter's parameter count
        net = UNet(3, 1, 1, channels=(width + 1, 2 * width + 2, 4 * width + 4, 8 * width + 8), strides=(2, 2, 2), num_res_units=1)
        if sum(p.numel() for p in net.parameters()) > size:
            break
        width += 1
    net = UNet(3, 1, 1, channels=(width, 2 * width, 4 * width, 8 * width), strides=(2, 2, 2), num_res_units=1)
    region_map = RegionMap.from_config("demo")
    dm = LoRKDDataModule(train_manifest=data, preprocess=read_training_data(ckpt, "preprocess"),
                         patch_size=read_training_data(ckpt, "patch_size"), cache_dir=out / "cache",
                         samples_per_epoch=steps * 2, batch_size=2, region_map=region_map, seed=seed,
                         max_queries=16, neg_ratio=16.0,  # every label a query: the gallbladder's target is always known
                         dataset_import={"region": "abdomen"}, augment={"on_device": "auto"})  # fmt: skip
    dm.setup("fit")
    optimizer = torch.optim.AdamW(net.parameters(), lr=2e-3, weight_decay=0.0)
    step, batches = 0, 0
    while step < steps:
        for batch in dm.train_dataloader():
            batches += 1
            if batches > 20 * steps:
                raise RuntimeError(f"{NEW!r} is a query of too few patches ({step} of {batches} batches)")
            batch = dm.on_after_batch_transfer(batch, 0)
            keep = [b for b, labels in enumerate(batch["labels"]) if NEW in labels]
            if not keep:
                continue
            target = torch.stack([batch["masks"][b, batch["labels"][b].index(NEW)] for b in keep])[:, None]
            loss, _ = segmentation_loss(net(batch["image"][keep]), target, torch.ones(len(keep), 1))
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            step += 1
            if step >= steps:
                break
    print(f"peer: MONAI UNet channels {(width, 2 * width, 4 * width, 8 * width)}, {sum(p.numel() for p in net.parameters()):,} parameters", flush=True)
    return net.eval()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--train", type=int, default=8)
    parser.add_argument("--test", type=int, default=4)
    parser.add_argument("--teacher-steps", type=int, default=600)
    parser.add_argument("--lorkd-steps", type=int, default=350)
    parser.add_argument("--out", type=Path, default=ROOT / "outputs" / "benchmarks" / "finetune")
    parser.add_argument("--teacher", type=Path, default=DEMO / "teacher" / "checkpoints" / "last.ckpt")
    parser.add_argument("--student", type=Path, default=DEMO / "lorkd" / "checkpoints" / "last.ckpt", help="LoRKD checkpoint (default: the demo's; trained when missing)")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides of the fine-tuning run")
    args = parser.parse_args()

    from lorkd.checkpoints.loading import load_model, read_training_data
    from lorkd.data.demo_nnunet import write_abdomen_dataset
    from lorkd.experts import expert_parameter_counts
    from lorkd.inference.sliding_window import sliding_window_probabilities

    teacher, student = args.teacher.resolve(), args.student.resolve()
    if not student.is_file():
        if student != (DEMO / "lorkd" / "checkpoints" / "last.ckpt").resolve():
            raise SystemExit(f"--student {student}: no such file")
        run(["scripts/demo.py", f"--teacher-steps={args.teacher_steps}", f"--lorkd-steps={args.lorkd_steps}"])
    data = write_abdomen_dataset(args.out / "Dataset901_DemoGallbladder", train=args.train, test=args.test, new_label=NEW)
    start = time.perf_counter()
    run(["train.py", "experiment=finetune", f"model.student_state.path={student}", f"teacher.checkpoint={teacher}",
         "model.finetune_region=abdomen", f"data.train_manifest={data}", f"trainer.max_steps={args.steps}",
         f"trainer.val_check_interval={args.steps}", f"paths.cache_dir={args.out}/cache", f"hydra.run.dir={args.out}/run", *args.overrides])  # fmt: skip
    finetune_s = time.perf_counter() - start
    after_ckpt = args.out / "run" / "checkpoints" / "last.ckpt"
    before, after = load_model(student), load_model(after_ckpt)
    window = tuple(read_training_data(student, "patch_size"))
    cases = held_out(data, read_training_data(student, "preprocess"))
    abdomen = before.experts.index("abdomen")
    adapter = expert_parameter_counts(before.net.backbone)["abdomen"]
    start = time.perf_counter()
    peer = train_peer(student, data, args.steps, adapter, args.out / "peer")
    peer_s = time.perf_counter() - start
    scores: dict[str, dict[str, list[float]]] = {"before": {}, "after": {}, "peer": {}}
    for image, masks in cases:
        for name, model in (("before", before), ("after", after)):
            probs = expert_output(model, image, [*OLD, NEW], abdomen, window)
            for i, label in enumerate([*OLD, NEW]):
                scores[name].setdefault(label, []).append(dice(probs[i].numpy() > 0.5, masks[label]))
        with torch.no_grad():
            probs = sliding_window_probabilities(image, lambda x: torch.sigmoid(peer(x)), window)
        scores["peer"].setdefault(NEW, []).append(dice(probs[0].numpy() > 0.5, masks[NEW]))
    result = {
        "steps": args.steps, "overrides": args.overrides, "train_cases": args.train, "test_cases": args.test, "adapter_parameters": adapter,
        "peer_parameters": sum(p.numel() for p in peer.parameters()), "finetune_s": round(finetune_s, 1), "peer_s": round(peer_s, 1),
        "dice": {k: {label: round(float(np.mean(v)), 4) for label, v in d.items()} for k, d in scores.items()},
        "other_experts_max_abs_diff": other_experts_difference(before, after, cases, window),
    }  # fmt: skip
    (args.out / "result.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
