"""Console entry points: ``lorkd-train``, ``lorkd-eval``, ``lorkd-predict``, ``lorkd-export``, ``lorkd-labels`` (and the root scripts)."""

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


def export() -> None:
    """``lorkd-export ckpt_path=CKPT out=DIR`` (key=value arguments, see ``lorkd.checkpoints.commands``)."""
    from lorkd.checkpoints.commands import export_main

    export_main()


def labels() -> None:
    """``lorkd-labels ckpt_path=CKPT [modality=ct] [--json]``: the labels a model knows (see ``lorkd.labels``)."""
    from lorkd.labels import main

    main()
