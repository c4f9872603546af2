"""Console entry points: ``lorkd-train``, ``lorkd-eval``, ``lorkd-predict``, ``lorkd-export``, ``lorkd-labels``, ``lorkd-data`` (and the root scripts).

A command line that Hydra cannot parse, or a config with required values (``???``) left out
(:mod:`lorkd.required`, all of them named), stops every command with one message and exit code 2.

``predict`` and ``eval`` exit with :mod:`lorkd.exit_codes`: 0 every case done, 1 some case failed (the
summary still written) or a full disk kept the summary from being written (one line naming the folder),
2 the run could not start (one line on stderr, no traceback).
"""

from __future__ import annotations

import functools
import logging
import sys
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import hydra
from omegaconf import DictConfig

from lorkd.exit_codes import CASES_FAILED, NOT_STARTED, NotStarted, for_failures
from lorkd.io import DiskFullError
from lorkd.utils import CONFIG_DIR, close_process_group, offline_environment, register_resolvers

offline_environment()
register_resolvers()
log = logging.getLogger(__name__)


# keys an earlier lorkd took, with their names now: predict, eval and labels chose the network with `model=`
RENAMED_KEYS = {"model": "network"}


def _check_overrides(argv: Sequence[str] | None = None, renamed: Mapping[str, str] | None = None) -> None:
    """Parse the command line's overrides as Hydra will: a syntax error is one line and exit 2, before anything runs;
    so is a key of ``renamed`` (old name -> new)."""
    from hydra._internal.utils import get_args_parser
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import OverrideParseException

    args, _ = get_args_parser().parse_known_args(sys.argv[1:] if argv is None else argv)
    try:
        overrides = OverridesParser.create().parse_overrides(args.overrides)
    except OverrideParseException as exc:
        lines = [line.strip() for line in str(exc.message).splitlines()]
        reason = next((x for x in lines if x and not x.startswith(("See ", "Error parsing", "^"))), "syntax error")
        print(
            f"error: cannot parse the override {exc.override!r}: {reason} (quote values holding spaces, brackets "
            "or '=': key='[a, b]'; see https://hydra.cc/docs/advanced/override_grammar/basic/)",
            file=sys.stderr,
        )
        sys.exit(NOT_STARTED)
    for override in overrides:
        new = (renamed or {}).get(override.key_or_group)
        if new is not None:
            print(f"error: {override.input_line}: the key {override.key_or_group!r} is now {new!r} "
                  f"({new}={override.value()})", file=sys.stderr)  # fmt: skip
            sys.exit(NOT_STARTED)


def _checked(main: Callable[[], Any], renamed: Mapping[str, str] | None = None) -> Callable[[], Any]:
    """A Hydra app whose overrides are checked first (:func:`_check_overrides`)."""

    @functools.wraps(main)
    def entry(*args: Any, **kwargs: Any) -> Any:
        if not args and not kwargs:  # from the command line (a composed config passed in is already parsed)
            _check_overrides(renamed=renamed)
        return main(*args, **kwargs)

    return entry


@_checked
@hydra.main(version_base="1.3", config_path=str(CONFIG_DIR), config_name="train")
def train(cfg: DictConfig) -> float | None:
    from lorkd.training import train as run

    metrics = run(cfg)
    close_process_group()
    return metrics.get("val/dice")


def _batch(run: Callable[[], int]) -> int:
    """Run a batch job, turning :class:`NotStarted` into one line and exit code 2, and a full disk that
    kept the run's files from being written into one line and exit code 1."""
    logging.raiseExceptions = False  # a log file on a full disk: lines lost there, no traceback per line
    try:
        code = run()
    except NotStarted as exc:
        log.error("%s", exc)
        return NOT_STARTED
    except DiskFullError as exc:
        log.error("%s", exc)
        return CASES_FAILED
    close_process_group()
    return code


def _exit(code: int) -> None:
    if code:
        sys.exit(code)


def _output_dir_argument() -> str | None:
    """``output_dir=...`` of the command line (a plain value: no interpolation), else None."""
    values = [a.split("=", 1)[1] for a in sys.argv[1:] if a.lstrip("+").startswith("output_dir=")]
    return values[-1] if values and "${" not in values[-1] else None


def _check_output_dir() -> None:
    """Refuse an unusable ``output_dir=`` before Hydra creates its run folder there (exit 2, one line)."""
    from lorkd.io import check_writable_folder

    folder = _output_dir_argument()
    if folder is None:
        return
    try:
        check_writable_folder(folder)
    except OSError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(NOT_STARTED)


@hydra.main(version_base="1.3", config_path=str(CONFIG_DIR), config_name="eval")
def _evaluate(cfg: DictConfig) -> None:
    from lorkd.commands.evaluate import run

    def job() -> int:
        summary = run(cfg)
        return for_failures(summary["n_failed_cases"]) if summary else 0

    _exit(_batch(job))


@hydra.main(version_base="1.3", config_path=str(CONFIG_DIR), config_name="predict")
def _predict(cfg: DictConfig) -> None:
    from lorkd.commands.predict import predict as run

    def job() -> int:
        rows = run(cfg)
        return for_failures(sum(row["status"] == "error" for row in rows))

    _exit(_batch(job))


def evaluate(*args: Any, **kwargs: Any) -> None:
    """``lorkd-eval`` / ``python eval.py`` (exit codes: see the module docstring)."""
    _check_overrides(renamed=RENAMED_KEYS)
    _check_output_dir()
    _evaluate(*args, **kwargs)


def mode_may_be_set(argv: Sequence[str], config_dir: Path = CONFIG_DIR) -> bool:
    """Whether ``hydra.mode`` could be set for this command: by an override or another config folder on the
    command line, or by a user's file in ``configs/local/`` (no shipped config sets it)."""
    flags = ("-cd", "--config-dir", "-cp", "--config-path", "-cn", "--config-name")
    if any("hydra.mode" in a or a.split("=", 1)[0] in flags for a in argv):
        return True
    return any((config_dir / "local").glob("*.y*ml"))


@contextmanager
def _one_composition(argv: Sequence[str]) -> Iterator[None]:
    """Hydra 1.3 composes a run's config twice: once only to read ``hydra.mode``, then for the run. Where
    nothing can set the mode, that first pass returns None: skip it (0.2 s of predict's start-up)."""
    from hydra._internal.hydra import Hydra

    if mode_may_be_set(argv):
        yield
        return
    get_mode = Hydra.get_mode
    Hydra.get_mode = lambda self, *args, **kwargs: None
    try:
        yield
    finally:
        Hydra.get_mode = get_mode


def predict(*args: Any, **kwargs: Any) -> None:
    """``lorkd-predict`` / ``python predict.py`` (exit codes: see the module docstring)."""
    _check_overrides(renamed=RENAMED_KEYS)
    _check_output_dir()
    with _one_composition(sys.argv[1:]):
        _predict(*args, **kwargs)


@_checked
@hydra.main(version_base="1.3", config_path=str(CONFIG_DIR), config_name="export")
def export(cfg: DictConfig) -> None:
    """``lorkd-export ckpt_path=CKPT output_dir=DIR`` (see ``lorkd.commands.export``)."""
    from lorkd.commands.export import export as run

    run(cfg)


@_checked
@hydra.main(version_base="1.3", config_path=str(CONFIG_DIR), config_name="convert")
def convert(cfg: DictConfig) -> None:
    """``python scripts/convert_lorkd_official.py ckpt_path=PTH output_path=CKPT official...``."""
    from lorkd.commands.export import convert as run

    run(cfg)


@_checked
@hydra.main(version_base="1.3", config_path=str(CONFIG_DIR), config_name="check_manifest")
def check_manifest(cfg: DictConfig) -> None:
    """``python -m lorkd.commands.check_manifest manifests=[M1,M2] [regions=demo | ~regions] [require_masks=false] [quick=true]``."""
    from hydra.utils import instantiate

    from lorkd.data.manifest import check

    manifests = [cfg.manifests] if isinstance(cfg.manifests, str) else list(cfg.manifests)
    region_map = instantiate(cfg.regions) if cfg.get("regions") else None
    status = check(manifests, require_masks=cfg.require_masks, region_map=region_map, quick=cfg.quick)
    if status:
        raise SystemExit(status)


@functools.partial(_checked, renamed=RENAMED_KEYS)
@hydra.main(version_base="1.3", config_path=str(CONFIG_DIR), config_name="labels")
def labels(cfg: DictConfig) -> None:
    """``lorkd-labels ckpt_path=CKPT [modality=ct] [json=true]``: the labels a model knows (:mod:`lorkd.label_catalogue`); a user error is one line, exit 1."""
    import json

    from lorkd.commands.export import run_command

    def job() -> str:
        from lorkd.checkpoints.loading import load_model
        from lorkd.label_catalogue import catalogue, format_catalogue

        entry = catalogue(load_model(cfg.ckpt_path, cfg.network), cfg.modality)
        return json.dumps(entry, indent=2) if cfg.json else format_catalogue(entry)

    run_command("lorkd-labels", job)


def _data_arguments(argv: list[str]) -> list[str]:
    """``lorkd-data import DIR key=value...`` as Hydra overrides (``dataset=DIR``); anything else is a usage error."""
    if not argv or argv[0] != "import":
        print("usage: lorkd-data import DIR out=OUT [region=...] [mapping=FILE] [channel=...] (configs/data_import.yaml)", file=sys.stderr)
        sys.exit(NOT_STARTED)
    rest = argv[1:]
    if rest and "=" not in rest[0] and not rest[0].startswith("-"):
        rest = [f"dataset={rest[0]}", *rest[1:]]
    return rest


@hydra.main(version_base="1.3", config_path=str(CONFIG_DIR), config_name="data_import")
def _data_import(cfg: DictConfig) -> None:
    from hydra.utils import instantiate

    from lorkd.data.nnunet import DatasetError, import_dataset, summary, write_manifests

    options = {k: cfg[k] for k in ("channel", "modality", "region", "mapping", "seed", "val_fraction", "fold", "splits")}
    region_map = instantiate(cfg.regions) if cfg.get("regions") else None
    try:
        imported = import_dataset(cfg.dataset, {**options, "dataset": cfg.name}, region_map)
        print(summary(imported, write_manifests(imported, cfg.out)))
    except DatasetError as exc:
        print(f"lorkd-data: error: {exc}", file=sys.stderr)
        raise SystemExit(1) from None


def data() -> None:
    """``lorkd-data import DIR out=OUT [...]``: an nnU-Net v2 or Decathlon dataset folder as manifests (exit 1 on problems)."""
    sys.argv[1:] = _data_arguments(sys.argv[1:])
    _check_overrides()
    _data_import()
