"""Safe file writing shared by every writer: atomic files (same folder, fsync, rename) and safe file names."""

from __future__ import annotations

import json
import os
import re
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


def file_mode() -> int:
    """Permissions of a newly created file under the process umask (mkstemp alone would give 0600)."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # some filesystems do not open folders
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write(path: str | os.PathLike, write: Callable[[Path], None]) -> Path:
    """Call ``write(tmp)`` on a temporary file in ``path``'s own folder, fsync it, then rename it onto ``path``.

    The temporary file keeps ``path``'s suffixes (writers that infer the format from the name work) and is
    removed if ``write`` fails, so a kill or an error never leaves a partial file under the final name.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=".tmp-", suffix="".join(path.suffixes))
    os.close(fd)
    tmp = Path(name)
    try:
        write(tmp)
        os.chmod(tmp, file_mode())
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)
    return path


def write_text(path: str | os.PathLike, text: str) -> Path:
    """Write UTF-8 ``text`` to ``path`` atomically."""
    return atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def write_json(path: str | os.PathLike, data: Any, **kwargs: Any) -> Path:
    """Write ``data`` as indented JSON to ``path`` atomically (``kwargs`` go to :func:`json.dumps`)."""
    return write_text(path, json.dumps(data, indent=2, **kwargs) + "\n")


def safe_name(name: str, fallback: str = "label", max_length: int = 120) -> str:
    """A file-name stem from free text: letters, digits, ``._-`` only, no ``..`` part, no leading dot, never empty."""
    parts = [part for part in _UNSAFE.split(str(name)) if part.strip(".")]
    stem = "_".join(parts).lstrip(".")
    return stem[:max_length] or fallback
