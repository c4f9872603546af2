"""Console entry points: ``lorkd-train``, ``lorkd-eval``, ``lorkd-predict``, ``lorkd-export`` (and the root scripts)."""

from __future__ import annotations

import hydra
from omegaconf import DictConfig

from lorkd.utils import CONFIG_DIR, offline_environment, register_resolvers

offline_environment()
register_resolvers()


@hydra.main(version_base="1.3", config_path=str(CONFIG_DIR), config_name="train")
def train(cfg: DictConfig) -> float | None:
    from lorkd.training import train as run

    metrics = run(cfg)
    return metrics.get("val/dice")


@hydra.main(version_base="1.3", config_path=str(CONFIG_DIR), config_name="eval")
def evaluate(cfg: DictConfig) -> float | None:
    from lorkd.evaluation.pipeline import evaluate as run

    summary = run(cfg)
    return summary["overall"]["dice"] if summary else None


@hydra.main(version_base="1.3", config_path=str(CONFIG_DIR), config_name="predict")
def predict(cfg: DictConfig) -> None:
    from lorkd.inference.run import predict as run

    run(cfg)


@hydra.main(version_base="1.3", config_path=str(CONFIG_DIR), config_name="export")
def export(cfg: DictConfig) -> None:
    """``lorkd-export ckpt_path=CKPT output_dir=DIR`` (see ``lorkd.checkpoints.commands``)."""
    from lorkd.checkpoints.commands import export as run

    run(cfg)


@hydra.main(version_base="1.3", config_path=str(CONFIG_DIR), config_name="convert")
def convert(cfg: DictConfig) -> None:
    """``python scripts/convert_lorkd_official.py ckpt_path=PTH output_path=CKPT official...``."""
    from lorkd.checkpoints.commands import convert as run

    run(cfg)


@hydra.main(version_base="1.3", config_path=str(CONFIG_DIR), config_name="check_manifest")
def check_manifest(cfg: DictConfig) -> None:
    """``python -m lorkd.data.manifest manifests=[M1,M2] [regions=demo | ~regions] [require_masks=false]``."""
    from hydra.utils import instantiate

    from lorkd.data.manifest import check

    manifests = [cfg.manifests] if isinstance(cfg.manifests, str) else list(cfg.manifests)
    region_map = instantiate(cfg.regions) if cfg.get("regions") else None
    status = check(manifests, require_masks=cfg.require_masks, region_map=region_map)
    if status:
        raise SystemExit(status)
