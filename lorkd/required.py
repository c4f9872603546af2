"""Required values (``???``) of a composed config, all named in one message before any work.

Every shipped Hydra app registers :class:`RequiredValues` (``configs/hydra/default.yaml`` and
``command.yaml``): a run whose config still holds ``???`` values stops before its run folder is made,
listing each missing value with what it is, and exits with code 2 (:data:`lorkd.exit_codes.NOT_STARTED`).
"""

from __future__ import annotations

import sys
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, ListConfig, OmegaConf

from lorkd.exit_codes import NOT_STARTED

_BIOLORD = "a local BioLORD-2023-C folder (its config and tokenizer; the weights too without a text-encoder file)"
# what each required value is: (config name, key) first, then the key in any app
DESCRIPTIONS: dict[Any, str] = {
    "teacher.checkpoint": "the official SAT vision file to distil (SAT_Pro.pth for experiment=pro, SAT_Nano.pth "
    "for experiment=nano) or a SATModule checkpoint",
    "text_encoder.checkpoint": "the teacher's paired SAT text-encoder file (text_encoder.pth next to SAT_Pro.pth / "
    "SAT_Nano.pth); null for a SATModule teacher, which carries its own",
    "text_encoder.language_model_path": _BIOLORD,
    "data.train_manifest": "the training manifest (jsonl, one case a line; data.val_manifest=... adds validation)",
    "ckpt_path": "the model: a LoRKD or SATModule checkpoint, an official SAT vision file, or an export folder",
    ("export", "ckpt_path"): "our LoRKD checkpoint, or an official lorkd-imbalance-{nano,pro}.pth",
    ("convert", "ckpt_path"): "an official lorkd-imbalance-{nano,pro}.pth",
    "input": "what to segment: a NIfTI file, a folder of NIfTI files or DICOM series, a DICOM series folder, "
    "or a jsonl manifest",
    "output_dir": "the folder to write the results into",
    ("export", "output_dir"): "the export folder to create",
    "output_path": "the LoRKD checkpoint to write (.ckpt)",
    "official.text_checkpoint": "the official file's paired {nano,pro}_text_encoder.pth",
    "official.language_model_path": _BIOLORD,
    "manifests": "one jsonl manifest, or a list of them: manifests=[a.jsonl,b.jsonl]",
}


def missing_values(cfg: DictConfig | ListConfig, prefix: str = "") -> list[str]:
    """The full keys of every ``???`` value in ``cfg`` (not Hydra's own node; interpolations are not followed)."""
    found = []
    keys = list(cfg.keys()) if isinstance(cfg, DictConfig) else range(len(cfg))
    for key in keys:
        if not prefix and key == "hydra":
            continue
        if isinstance(cfg, ListConfig):
            path = f"{prefix}[{key}]"
        else:
            path = f"{prefix}.{key}" if prefix else str(key)
        if OmegaConf.is_interpolation(cfg, key):
            continue
        if OmegaConf.is_missing(cfg, key):
            found.append(path)
            continue
        node = cfg._get_node(key)
        if isinstance(node, (DictConfig, ListConfig)) and not node._is_none():
            found += missing_values(node, path)
    return found


def describe(keys: list[str], config_name: str | None) -> str:
    """One message naming each missing value and what it is."""
    width = max(len(key) for key in keys)
    count = "1 required value is" if len(keys) == 1 else f"{len(keys)} required values are"
    lines = [f"{count} missing from the {config_name or 'run'} config; give each on the command line as key=value:"]
    for key in keys:
        what = DESCRIPTIONS.get((config_name, key)) or DESCRIPTIONS.get(key, "(see the config file)")
        lines.append(f"  {key:<{width}}  {what}")
    return "\n".join(lines)


def exit_if_missing(cfg: DictConfig, config_name: str | None) -> None:
    """Print every missing value of ``cfg`` on stderr and exit 2; return when none is missing."""
    keys = missing_values(cfg)
    if keys:
        print(f"error: {describe(keys, config_name)}", file=sys.stderr)
        sys.exit(NOT_STARTED)


class RequiredValues(Callback):
    """Hydra callback: stop a run (and each job of a multirun) whose config misses required values."""

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        exit_if_missing(config, kwargs.get("config_name"))

    def on_job_start(self, config: DictConfig, **kwargs: Any) -> None:
        exit_if_missing(config, config.hydra.job.config_name)
