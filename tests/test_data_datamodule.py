"""LoRKDDataModule from the Hydra configs: cache warm-up, loaders, and the train sampler under DDP."""

from __future__ import annotations

import json
from pathlib import Path

import lightning as L
import pytest
import torch
from helpers import compose_config
from hydra.utils import instantiate

from lorkd.data.datamodule import LoRKDDataModule
from lorkd.data.demo import build_demo
from lorkd.data.sampling import RegionSampler


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("demo")
    build_demo(root, seed=0, real=False, counts=(2, 1, 1))
    return root


def make_datamodule(demo_dir: Path, cache: Path, *overrides: str) -> LoRKDDataModule:
    cfg = compose_config(
        "train",
        [
            "data=demo",
            "regions=demo",
            f"paths.demo_data_dir={demo_dir}",
            f"paths.cache_dir={cache}",
            *overrides,
        ],
    )
    return instantiate(cfg.data)


def test_demo_config_builds_every_loader(demo_dir, tmp_path):
    dm = make_datamodule(demo_dir, tmp_path / "cache", "data.samples_per_epoch=16")
    assert dm.patch_size == (64, 64, 32) and dm.max_queries == 8 and dm.batch_size == 2
    assert dm.region_map.regions[0] == "abdomen" and dm.preprocess.spacing == (1.0, 1.0, 3.0)
    dm.prepare_data()
    entries = list((tmp_path / "cache" / "demo").iterdir())
    assert len(entries) == 3 * (2 + 1)  # train + val cases, preprocessed once
    dm.setup("fit")

    loader = dm.train_dataloader()
    assert isinstance(loader.sampler, RegionSampler) and len(loader) == 8
    batches = [dm.on_after_batch_transfer(b, 0) for b in loader]  # what Lightning does on the device
    for batch in batches:
        assert batch["image"].shape == (2, 1, 64, 64, 32) and batch["masks"].dtype == torch.float32
        assert batch["masks"].shape[:2] == batch["query_mask"].shape and batch["masks"].shape[2:] == (
            64,
            64,
            32,
        )
        assert len(set(batch["region"].tolist())) == 1  # region kept for 8 samples: homogeneous batches
    assert {r for b in batches for r in b["region"].tolist()} <= {0, 1, 6}
    assert [b["case_id"] for b in batches] == [
        b["case_id"] for b in dm.train_dataloader()
    ]  # same epoch, same data

    val = [b["case_id"] for b in dm.val_dataloader()]
    assert (
        val == [b["case_id"] for b in dm.val_dataloader()] and sum(map(len, val)) == 3 * 2
    )  # 2 patches/item

    (item,) = [b for b in dm.test_dataloader() if b["index"] == 0]
    assert item["case"].id == "abdomen_ct_003" and item["case"].mask is not None


def test_predict_manifest_needs_no_masks(demo_dir, tmp_path):
    rows = [json.loads(line) for line in (demo_dir / "test.jsonl").read_text().splitlines()]
    predict = tmp_path / "predict.jsonl"
    predict.write_text(
        "".join(json.dumps({**r, "image": str(demo_dir / r["image"]), "mask": None}) + "\n" for r in rows)
    )
    dm = make_datamodule(
        demo_dir, tmp_path / "cache", f"data.predict_manifest={predict}", "data.train_manifest=null"
    )
    cases = [b["case"] for b in dm.predict_dataloader()]
    assert len(cases) == len(rows) and all(c.mask is None and c.masks is None for c in cases)
    with pytest.raises(ValueError, match="no training data"):
        dm.train_dataloader()


class Probe(L.LightningModule):
    """Records, per rank, the sampler Lightning kept and the cases of each batch."""

    def __init__(self, out: str) -> None:
        super().__init__()
        self.out = out
        self.w = torch.nn.Parameter(torch.zeros(1))

    def training_step(self, batch, batch_idx):
        sampler = self.trainer.train_dataloader.sampler
        record = {
            "sampler": type(sampler).__name__,
            "rank": sampler.rank,
            "world": sampler.num_replicas,
            "cases": batch["case_id"],
        }
        with open(f"{self.out}/rank{self.global_rank}.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")
        return (self.w * batch["image"].mean()).sum()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


@pytest.mark.slow
def test_lightning_ddp_keeps_the_region_sampler_with_one_stream_per_rank(demo_dir, tmp_path):
    dm = make_datamodule(demo_dir, tmp_path / "cache", "data.samples_per_epoch=16", "data.augment=false")
    trainer = L.Trainer(
        accelerator="cpu", strategy="ddp_spawn", devices=2, max_steps=3, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0,
    )  # fmt: skip
    trainer.fit(Probe(str(tmp_path)), datamodule=dm)
    ranks = [[json.loads(x) for x in (tmp_path / f"rank{r}.jsonl").read_text().splitlines()] for r in (0, 1)]
    for r, records in enumerate(ranks):
        assert len(records) == 3
        assert all((x["sampler"], x["rank"], x["world"]) == ("RegionSampler", r, 2) for x in records)
    assert [x["cases"] for x in ranks[0]] != [x["cases"] for x in ranks[1]]


def test_loader_workers_fill_the_cache_after_torch_ran_in_the_parent(demo_dir, tmp_path):
    """Forked DataLoader workers must not deadlock in the OpenMP pool that the parent already used."""
    conv = torch.nn.Conv3d(1, 4, 3)
    with torch.no_grad():
        conv(torch.randn(2, 1, 24, 24, 24))  # runs torch's parallel region in this process
    dm = make_datamodule(
        demo_dir,
        tmp_path / "cache",
        "data.samples_per_epoch=8",
        "data.num_workers=2",
        "data.warm_cache=false",  # the workers themselves preprocess into the cache
    )
    dm.setup("fit")
    batches = list(dm.train_dataloader())
    assert len(batches) == 4 and all(b["image"].shape == (2, 1, 64, 64, 32) for b in batches)
    assert list((tmp_path / "cache" / "demo").iterdir())
