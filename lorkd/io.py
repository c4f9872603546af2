"""Safe file writing shared by every writer: atomic files (same folder, fsync, rename), safe file names,
writes confined to a root folder (no symbolic link followed out of it), file identities, stale temporaries."""

from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile
import unicodedata
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")
_UNSAFE_UNICODE = re.compile(r"[^\w.-]+")  # \w: letters, digits and _ of every script
_MAX_NAME_BYTES = 200  # below the 255 bytes of a name on Linux and macOS, room for a suffix
_TMP_PREFIX = ".tmp-"


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
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=_TMP_PREFIX, suffix="".join(path.suffixes))
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


def _hash_file(digest: Any, path: str | os.PathLike) -> None:
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)


def sha256_file(path: str | os.PathLike) -> str:
    """The sha256 of a file's bytes (hex), as recorded for every file of an export."""
    digest = hashlib.sha256()
    _hash_file(digest, path)
    return digest.hexdigest()


def file_fingerprint(paths: Sequence[Path]) -> str:
    """The identity of a file (or a set of files): the first 16 hex digits of the sha256 of each file's
    name and bytes, in name order (what checkpoints record of their teacher and language model)."""
    digest = hashlib.sha256()
    for path in sorted(paths):
        digest.update(path.name.encode())
        _hash_file(digest, path)
    return digest.hexdigest()[:16]


def safe_name(name: str, fallback: str = "label", max_length: int = 120, unicode: bool = False) -> str:
    """A file-name stem from free text: letters, digits, ``._-`` only, no ``..`` part, no leading dot, never empty.

    ``unicode``: letters and digits of every script are kept (``肝`` stays ``肝``, NFC-normalised), and the
    stem is also cut to :data:`_MAX_NAME_BYTES` bytes of UTF-8 (file systems limit a name's bytes).
    """
    text = unicodedata.normalize("NFC", str(name)) if unicode else str(name)
    parts = [part for part in (_UNSAFE_UNICODE if unicode else _UNSAFE).split(text) if part.strip(".")]
    stem = "_".join(parts).lstrip(".")[:max_length]
    while len(stem.encode("utf-8")) > _MAX_NAME_BYTES:
        stem = stem[:-1]
    return stem or fallback


class UnsafePathError(OSError):
    """A write or removal that would leave its root folder (through ``..`` or a symbolic link)."""


def folder_inside(root: str | os.PathLike, folder: str | os.PathLike) -> Path:
    """Create ``folder`` (below ``root``) one part at a time, never through a symbolic link; return it.

    ``root`` itself may be a link (an output folder on another disk); every part below it must be a
    real folder, and the result must resolve inside ``root``: else :class:`UnsafePathError`.
    """
    root, folder = Path(root), Path(folder)
    try:
        parts = folder.relative_to(root).parts
    except ValueError:
        raise UnsafePathError(f"{folder} is not inside {root}") from None
    if ".." in parts:
        raise UnsafePathError(f"{folder}: '..' leaves {root}")
    root.mkdir(parents=True, exist_ok=True)
    current = root
    for part in parts:
        current = current / part
        if current.is_symlink():
            raise UnsafePathError(
                f"{current} is a symbolic link: refusing to write through it (remove the link)"
            )
        current.mkdir(exist_ok=True)
    if not current.resolve().is_relative_to(root.resolve()):
        raise UnsafePathError(f"{current} resolves outside {root}")
    return current


def path_inside(root: str | os.PathLike, relative: str | os.PathLike) -> Path | None:
    """``root/relative`` when it names an entry below ``root`` without ``..`` or a link among its folders."""
    rel = Path(relative)
    if rel.is_absolute() or ".." in rel.parts or not rel.parts:
        return None
    root = Path(root)
    current = root
    for part in rel.parts[:-1]:
        current = current / part
        if current.is_symlink() or not current.is_dir():
            return None
    return current / rel.parts[-1]


def file_identity(path: str | os.PathLike) -> dict[str, Any]:
    """Absolute path, size and modification time of a file: cheap, unlike hashing a large checkpoint
    or scan; a replaced or rewritten file changes it."""
    p = Path(path).resolve()
    stat = p.stat()
    return {"path": str(p), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}


def remove_temporaries(folder: str | os.PathLike) -> list[Path]:
    """Delete the ``.tmp-*`` files :func:`atomic_write` left in ``folder`` and its real subfolders
    (a killed run's); links are never followed. Returns what was removed."""
    removed = []
    for dirpath, _dirnames, filenames in os.walk(folder):  # os.walk does not enter linked folders
        for name in filenames:
            path = Path(dirpath) / name
            if name.startswith(_TMP_PREFIX) and not path.is_symlink():
                path.unlink(missing_ok=True)
                removed.append(path)
    return removed


def check_writable_folder(path: str | os.PathLike, what: str = "output_dir") -> Path:
    """Create ``path`` and make sure a file can be written there; one clear :class:`OSError` otherwise."""
    folder = Path(path).expanduser()
    if folder.exists() and not folder.is_dir():
        raise NotADirectoryError(f"{what}={folder} is not a folder")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(dir=folder, prefix=_TMP_PREFIX)
        os.close(fd)
        os.unlink(name)
    except OSError as exc:
        raise PermissionError(f"{what}={folder} is not writable: {exc.strerror or exc}") from None
    return folder
