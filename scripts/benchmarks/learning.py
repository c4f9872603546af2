"""Learning speed: validation patch Dice per region against training steps, our SAT teacher versus a
plain MONAI ``BasicUNet`` of about the same size (the peer baseline), in one process.

Both models see the same batches (one draw of the demo's training patches feeds both), the same
queries (the U-Net answers a query with the sigmoid channel of its label), the same loss (SAT's
Dice + BCE over the valid queries), the same optimiser, learning rate and warm-up/cosine schedule,
and are validated on the same fixed validation patches. It also prints the cosine between the
demo labels' queries at initialisation and after training.

    python scripts/benchmarks/learning.py [--steps 300] [--eval-every 100] [hydra overrides ...]

Overrides apply to the composed ``experiment=demo_teacher`` config (e.g. ``model.optimizer.lr=1e-3``).
Needs the demo data (``python scripts/make_demo_data.py --out outputs/demo/data``).
"""

from __future__ import annotations

import argparse
import itertools
import platform
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from torch import nn

from lorkd.data.batch import finish_batch
from lorkd.losses import deep_supervision_loss, hard_dice
from lorkd.modules.base import warmup_cosine
from lorkd.regions import normalize_label

BASELINE_FEATURES = (16, 16, 32, 64, 128, 16)  # BasicUNet: 1.44 M parameters, about the demo teacher's size


def count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


class LabelChannels(nn.Module):
    """A multi-label U-Net answering prompts: query (modality, label) -> the sigmoid channel of that label."""

    def __init__(self, net: nn.Module, keys: Sequence[tuple[str, str]]) -> None:
        super().__init__()
        self.net = net
        self.index = {key: i for i, key in enumerate(keys)}

    def forward(self, image: torch.Tensor, labels: Sequence[Sequence[str]], modalities: Sequence[str], n: int) -> torch.Tensor:
        out = self.net(image)  # (B, C, H, W, D)
        logits = out.new_zeros(out.shape[0], n, *out.shape[2:])
        for b, (labs, mod) in enumerate(zip(labels, modalities)):
            idx = [self.index[(mod, normalize_label(lab))] for lab in labs]
            logits[b, : len(idx)] = out[b, idx]
        return logits


def query_cosines(module: Any, keys: Sequence[tuple[str, str]]) -> torch.Tensor:
    with torch.no_grad():
        q = module.prompts.queries([k[1] for k in keys], [k[0] for k in keys])
    q = torch.nn.functional.normalize(q.float(), dim=-1)
    return q @ q.T


def cosine_table(cos: torch.Tensor, keys: Sequence[tuple[str, str]]) -> str:
    names = [f"{m}:{lab}" for m, lab in keys]
    lines = ["| | " + " | ".join(str(i) for i in range(len(keys))) + " |", "|---" * (len(keys) + 1) + "|"]
    for i, name in enumerate(names):
        lines.append(f"| {i} {name} | " + " | ".join(f"{cos[i, j]:.2f}" for j in range(len(keys))) + " |")
    off = cos[~torch.eye(len(keys), dtype=torch.bool)]
    lines.append(f"\noff-diagonal cosine: max {off.max():.3f}, mean {off.mean():.3f}")
    return "\n".join(lines)


def training_batches(loader) -> Iterator[dict[str, Any]]:
    """Endless training batches; each pass over the loader is a new epoch of the region sampler."""
    for epoch in itertools.count():
        loader.sampler.set_epoch(epoch)
        yield from map(finish_batch, loader)  # as the data module's on_after_batch_transfer


def validate(segment: Callable[[dict[str, Any]], torch.Tensor], loader, n_regions: int) -> torch.Tensor:
    """Mean hard Dice over valid queries: (n_regions + 1,), the last entry all regions together."""
    sums = torch.zeros(2, n_regions + 1, dtype=torch.float64)
    with torch.no_grad():
        for batch in map(finish_batch, loader):
            dice = hard_dice(segment(batch), batch["masks"])
            valid = batch["query_mask"].bool()
            for b in range(dice.shape[0]):
                r = int(batch["region"][b])
                d, c = float(dice[b][valid[b]].sum()), float(valid[b].sum())
                for idx in (r, n_regions):
                    sums[0, idx] += d
                    sums[1, idx] += c
    return sums[0] / sums[1].clamp_min(1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--eval-every", type=int, default=100)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--experiment", default="demo_teacher")
    parser.add_argument("--no-baseline", action="store_true", help="train only our teacher (for quick design sweeps)")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()

    from hydra import compose, initialize_config_dir
    from hydra.utils import instantiate
    from monai.networks.nets import BasicUNet

    from lorkd.utils import CONFIG_DIR, offline_environment, register_resolvers

    offline_environment()
    register_resolvers()
    torch.set_num_threads(args.threads)
    overrides = [f"experiment={args.experiment}", f"trainer.max_steps={args.steps}", *args.overrides]
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = compose(config_name="train", overrides=overrides, return_hydra_config=True)
    torch.manual_seed(cfg.seed)
    data = instantiate(cfg.data)
    data.prepare_data()
    data.setup("fit")
    torch.manual_seed(cfg.seed)
    teacher = instantiate(cfg.model)
    keys = sorted({(c.modality, normalize_label(lab)) for c in data.cases_of("train") for lab in c.labels})
    if teacher.spread_label_queries:  # what SATModule.setup does in train.py
        teacher.spread_queries([k[1] for k in keys])
    cos_init = query_cosines(teacher, keys)
    regions = data.region_map.regions
    torch.manual_seed(cfg.seed)
    baseline = LabelChannels(BasicUNet(3, 1, len(keys), features=BASELINE_FEATURES), keys)

    def loss_of(logits: list[torch.Tensor], batch: dict[str, Any]) -> torch.Tensor:
        return deep_supervision_loss(logits, batch["masks"], batch["query_mask"])[0]

    def teacher_loss(batch):
        out = teacher.net(batch["image"], teacher.queries_for(batch), return_aux=True)
        return loss_of([out.logits, *out.aux_logits], batch)

    def baseline_segment(batch):
        return baseline(batch["image"], batch["labels"], batch["modality"], batch["masks"].shape[1])

    models: dict[str, tuple[nn.Module, Callable, Callable]] = {
        "teacher": (teacher, teacher_loss, lambda b: teacher.net(b["image"], teacher.queries_for(b))),
    }
    if not args.no_baseline:
        models["unet"] = (baseline, lambda b: loss_of([baseline_segment(b)], b), baseline_segment)
    optimisers = {}
    for name, (model, _, _) in models.items():
        opt = instantiate(cfg.model.optimizer)(params=[p for p in model.parameters() if p.requires_grad])
        sched = torch.optim.lr_scheduler.LambdaLR(opt, warmup_cosine(cfg.model.warmup_steps, args.steps))
        optimisers[name] = (opt, sched)

    print(f"torch {torch.__version__}, python {platform.python_version()}, {torch.get_num_threads()} threads")
    print(f"teacher {count(teacher.net):,} parameters (+ text head {count(teacher.text_encoder):,}); "
          f"unet BasicUNet{BASELINE_FEATURES} {count(baseline):,}")  # fmt: skip
    results: dict[int, dict[str, torch.Tensor]] = {}
    seconds = dict.fromkeys(models, 0.0)
    loader = training_batches(data.train_dataloader())
    val_regions = sorted({int(r) for b in data.val_dataloader() for r in b["region"]})
    shown = [(regions[i], i) for i in val_regions] + [("all", len(regions))]
    for step in range(1, args.steps + 1):
        batch = next(loader)
        for name, (model, loss_fn, _) in models.items():
            opt, sched = optimisers[name]
            start = time.perf_counter()
            model.train()
            loss = loss_fn(batch)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            seconds[name] += time.perf_counter() - start
        if step % 10 == 0:
            print(f"step {step}: " + ", ".join(f"{n} {seconds[n] / step:.2f} s/step" for n in models), flush=True)
        if step % args.eval_every == 0 or step == args.steps:
            results[step] = {}
            for name, (model, _, segment) in models.items():
                model.eval()
                results[step][name] = validate(segment, data.val_dataloader(), len(regions))
            line = "; ".join(
                f"{region} " + " / ".join(f"{results[step][n][i]:.3f}" for n in models) for region, i in shown
            )
            print(f"step {step}: validation patch Dice ({' / '.join(models)}): {line}", flush=True)

    names = list(models)
    print("\n| step | region | " + " | ".join(names) + (" | teacher / unet |" if "unet" in models else " |"))
    print("|---" * (len(names) + 2 + ("unet" in models)) + "|")
    for step, res in results.items():
        for region, idx in shown:
            cells = " | ".join(f"{res[n][idx]:.3f}" for n in names)
            ratio = f" | {res['teacher'][idx] / max(res['unet'][idx], 1e-9):.2f}" if "unet" in models else ""
            print(f"| {step} | {region} | {cells}{ratio} |")
    print("\nseconds per training step: " + ", ".join(f"{n} {seconds[n] / args.steps:.3f}" for n in names))
    print("\nquery cosine between the demo labels at initialisation:\n")
    print(cosine_table(cos_init, keys))
    print(f"\nafter {args.steps} steps:\n")
    print(cosine_table(query_cosines(teacher, keys), keys))


if __name__ == "__main__":
    main()
