"""On-disk cache of preprocessed cases, shared by later runs, DataLoader workers and DDP ranks.

One entry per (source files with their size and mtime, preprocessing config, labels, modality,
orientation): a folder holding ``image.npy``, the masks (``labelmap.npy`` when labels do not
overlap, else ``masks.npy`` with one channel per label), ``voxels.npy`` and ``meta.json``.
An entry is written into a private temporary folder and published with one atomic rename, so a
reader sees a complete entry or none; when several processes fill the same entry at once, the
first rename wins and the others discard their copy. Arrays are memory-mapped on read, so a
training patch reads only its own window.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from lorkd.data.manifest import Case
from lorkd.data.patches import IndexedCase, LabelIndex, index_case
from lorkd.data.transforms import InversionInfo, PreprocessConfig, PreprocessedCase, preprocess_case
from lorkd.io import publish_folder, raise_if_disk_full, safe_name

log = logging.getLogger(__name__)

CACHE_VERSION = 3  # 2: InversionInfo.background; 3: masks brought onto their image's grid (lorkd.data.geometry)


class LabelMapMasks:
    """Read-only (N, X, Y, Z) uint8 masks backed by one label map (id j+1 = channel j).

    How the cache stores non-overlapping masks: N times smaller on disk than one channel per
    label. Slicing ``[channels, x, y, z]`` reads only the requested window; ``np.asarray`` gives
    the dense array.
    """

    dtype = np.dtype(np.uint8)

    def __init__(self, label_map: np.ndarray, n_labels: int) -> None:
        self.label_map = label_map
        self.shape = (int(n_labels), *label_map.shape)

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, key: Any) -> np.ndarray:
        key = key if isinstance(key, tuple) else (key,)
        ids = np.arange(1, self.shape[0] + 1)[key[0]]
        region = np.asarray(self.label_map[key[1:]])
        if np.ndim(ids) == 0:
            return (region == ids).astype(np.uint8)
        return (region[None] == ids.reshape(-1, *[1] * region.ndim)).astype(np.uint8)

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        dense = self[:]
        return dense if dtype is None else dense.astype(dtype)


def _as_label_map(masks: np.ndarray) -> np.ndarray | None:
    """The label map equivalent to one-hot ``masks``, or None when labels overlap."""
    if len(masks) == 0 or int(masks.sum(axis=0, dtype=np.int32).max()) > 1:
        return None
    dtype = np.uint8 if len(masks) < 255 else np.uint16
    ids = np.arange(1, len(masks) + 1, dtype=dtype).reshape(-1, *[1] * (masks.ndim - 1))
    return (masks.astype(dtype) * ids).max(axis=0)


class PreprocessCache:
    """Preprocessed cases under ``root``, keyed by their sources and the preprocessing config."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root).expanduser().resolve()
        self.root.mkdir(parents=True, exist_ok=True)

    def __repr__(self) -> str:
        return f"PreprocessCache({str(self.root)!r})"

    @staticmethod
    def key_inputs(case: Case, cfg: PreprocessConfig) -> dict[str, Any]:
        """Everything the entry depends on (the sources are identified by path, size and mtime)."""
        files = [case.image, *([case.mask] if case.mask else []), *(case.masks or {}).values()]
        stats = []
        for path in files:
            st = Path(path).stat()
            stats.append([str(Path(path).resolve()), st.st_size, st.st_mtime_ns])
        return {
            "version": CACHE_VERSION,
            "files": stats,
            "masks": sorted(case.masks) if case.masks else None,
            "labels": list(case.labels),
            "modality": case.modality,
            "orientation": case.orientation,
            "preprocess": cfg.to_dict(),
        }

    def key(self, case: Case, cfg: PreprocessConfig | Mapping[str, Any] | None = None) -> str:
        inputs = self.key_inputs(case, PreprocessConfig.coerce(cfg))
        return hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()[:32]

    def entry_dir(self, case: Case, cfg: PreprocessConfig | Mapping[str, Any] | None = None) -> Path:
        return self.root / f"{safe_name(case.dataset, '_', 60)}__{safe_name(case.id, '_', 60)}__{self.key(case, cfg)}"

    def load(self, case: Case, cfg: PreprocessConfig | Mapping[str, Any] | None = None) -> IndexedCase | None:
        """The cached entry (memory-mapped), or None when it is not there yet."""
        return self._read(self.entry_dir(case, cfg))

    def get(self, case: Case, cfg: PreprocessConfig | Mapping[str, Any] | None = None) -> IndexedCase:
        """The cached entry, preprocessing and storing the case first when needed."""
        cfg = PreprocessConfig.coerce(cfg)
        target = self.entry_dir(case, cfg)
        hit = self._read(target)
        if hit is not None:
            return hit
        self._write(target, index_case(preprocess_case(case, cfg)), self.key_inputs(case, cfg))
        entry = self._read(target)
        if entry is None:
            raise RuntimeError(f"cache entry {target} for {case.image} is unreadable right after writing it")
        return entry

    def _write(self, target: Path, entry: IndexedCase, inputs: dict[str, Any]) -> None:
        tmp = self.root / f".tmp-{uuid.uuid4().hex}"
        tmp.mkdir()
        try:
            data, index = entry.data, entry.index
            np.save(tmp / "image.npy", np.ascontiguousarray(data.image, dtype=np.float32))
            label_map = _as_label_map(np.asarray(data.masks))
            if label_map is None:  # overlapping labels: one channel per label
                np.save(tmp / "masks.npy", np.ascontiguousarray(data.masks, dtype=np.uint8))
            else:
                np.save(tmp / "labelmap.npy", label_map)
            voxels = np.concatenate(index.voxels) if index.voxels else np.zeros((0, 3), np.int32)
            np.save(tmp / "voxels.npy", voxels.astype(np.int32))
            meta = {
                "inputs": inputs,
                "case_id": data.case_id,
                "dataset": data.dataset,
                "labels": data.labels,
                "modality": data.modality,
                "info": data.info.to_dict(),
                "image_shape": list(data.image.shape),
                "boxes": [list(b) if b is not None else None for b in index.boxes],
                "voxel_counts": [len(v) for v in index.voxels],
            }
            (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
            publish_folder(tmp, target, keep=self._valid)
        except Exception as exc:  # numpy says "71820 requested and 39904 written" for a full disk
            raise_if_disk_full(self.root, exc, f"the cache entry of {inputs['files'][0][0]} could not be written")
            raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    def _valid(self, target: Path) -> bool:
        """Whether an existing entry stays (another process published it first); an unreadable one is replaced."""
        if self._read(target) is not None:
            log.debug("cache entry %s was published by another process first", target)
            return True
        log.warning("replacing unreadable cache entry %s", target)
        return False

    @staticmethod
    def _read(folder: Path) -> IndexedCase | None:
        meta_path = folder / "meta.json"
        if not meta_path.is_file():
            return None
        try:
            meta = json.loads(meta_path.read_text())
            labels = list(meta["labels"])
            image = np.load(folder / "image.npy", mmap_mode="r")
            if (folder / "labelmap.npy").is_file():
                masks: Any = LabelMapMasks(np.load(folder / "labelmap.npy", mmap_mode="r"), len(labels))
            else:
                masks = np.load(folder / "masks.npy", mmap_mode="r")
            voxels = np.load(folder / "voxels.npy")
        except (OSError, ValueError, KeyError) as exc:
            log.warning("cache entry %s is unreadable (%s)", folder, exc)
            return None
        if list(image.shape) != meta["image_shape"] or masks.shape != (len(labels), *image.shape[1:]):
            log.warning("cache entry %s has inconsistent shapes", folder)
            return None
        splits = np.cumsum(meta["voxel_counts"])[:-1]
        index = LabelIndex(
            boxes=[tuple(b) if b is not None else None for b in meta["boxes"]],  # type: ignore[misc]
            voxels=list(np.split(voxels, splits)) if labels else [],
        )
        data = PreprocessedCase(
            image=image,
            masks=masks,
            labels=labels,
            info=InversionInfo.from_dict(meta["info"]),
            modality=meta["modality"],
            case_id=meta["case_id"],
            dataset=meta["dataset"],
        )
        return IndexedCase(data=data, index=index)
