"""Safe file writing shared by every writer: atomic files (same folder, fsync, rename), safe file names,
writes confined to a root folder (no symbolic link followed out of it), file identities, stale temporaries
(named after the process writing them), per-case locks of runs sharing a folder, full-disk errors."""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import logging
import os
import re
import shutil
import socket
import tempfile
import time
import unicodedata
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, BinaryIO, TypeVar

_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")
_UNPRINTABLE = re.compile(r"[\x00-\x1f\x7f-\x9f\u200e\u200f\u2028-\u202e\u2066-\u2069]")
_UNSAFE_UNICODE = re.compile(r"[^\w.-]+")  # \w: letters, digits and _ of every script
_MAX_NAME_BYTES = 200  # below the 255 bytes of a name on Linux and macOS, room for a suffix
_TMP_PREFIX = ".tmp-"
_HOST = re.sub(r"[^A-Za-z0-9.]+", "_", socket.gethostname()) or "host"
_OWNER = re.compile(r"^\.tmp-(\d+)@([A-Za-z0-9._]+)-")
FOREIGN_TEMPORARY_S = 3600.0  # a temporary of another host untouched this long is a killed run's
T = TypeVar("T")


def _umask() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return umask


def file_mode() -> int:
    """Permissions of a newly created file under the process umask (mkstemp alone would give 0600)."""
    return 0o666 & ~_umask()


def follow_umask(tree: str | os.PathLike) -> None:
    """Give ``tree`` and every folder and file below it the permissions a new one gets under the process umask
    (``tempfile.mkdtemp`` makes 0700 folders, safetensors 0600 files); links are left alone."""
    umask = _umask()
    os.chmod(tree, 0o777 & ~umask)
    for dirpath, dirnames, filenames in os.walk(tree):
        for name in dirnames + filenames:
            path = os.path.join(dirpath, name)
            if not os.path.islink(path):
                os.chmod(path, (0o777 if name in dirnames else 0o666) & ~umask)


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
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=_temporary_prefix(), suffix="".join(path.suffixes))
    os.close(fd)
    tmp = Path(name)
    try:
        write(tmp)
        os.chmod(tmp, file_mode())
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        tmp.unlink(missing_ok=True)
        if isinstance(exc, Exception):
            raise_if_disk_full(path.parent, exc, f"{path.name} could not be written")
        raise
    _fsync_dir(path.parent)
    return path


def publish_folder(stage: str | os.PathLike, target: str | os.PathLike, keep: Callable[[Path], bool] | None = None) -> bool:
    """Move the finished folder ``stage`` to ``target`` with one rename (then fsync ``target``'s parent), so a
    reader sees the whole folder or none of it. Returns whether ``stage`` was published.

    An existing ``target`` is kept when ``keep(target)`` says so (another process published the same folder
    first: ``stage`` stays for the caller to remove, False is returned); otherwise it is replaced: moved aside
    into a temporary folder next to it, removed once ``stage`` is in place, and put back if that rename fails.
    """
    stage, target = Path(stage), Path(target)
    try:
        os.replace(stage, target)  # no target, or an empty folder
    except OSError:
        if not target.exists():
            raise
        if keep is not None and keep(target):
            return False
        aside = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
        try:
            try:
                os.replace(target, aside / target.name)
            except FileNotFoundError:  # another process moved it first
                pass
            try:
                os.replace(stage, target)
            except OSError:
                if keep is not None and target.exists() and keep(target):  # published meanwhile
                    return False
                if not target.exists() and (aside / target.name).exists():
                    os.replace(aside / target.name, target)
                raise
        finally:
            shutil.rmtree(aside, ignore_errors=True)
    _fsync_dir(target.parent)
    return True


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


def printable(name: object) -> str:
    """``name`` (a path, a case id, an error naming one) fit for one log line: control characters (newline,
    carriage return, escape, ...) and Unicode line and bidirectional-override marks are written as Python
    escapes (``\\n``, ``\\x1b``, ``\\u202e``), so a file name cannot start a forged line or hide its text."""
    return _UNPRINTABLE.sub(lambda match: match.group().encode("unicode_escape").decode("ascii"), str(name))


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


def _identity(path: Path, stat: os.stat_result) -> dict[str, Any]:
    return {"path": str(path), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}


def file_identity(path: str | os.PathLike) -> dict[str, Any]:
    """Absolute path, size and modification time of a file: cheap, unlike hashing a large checkpoint
    or scan; a replaced or rewritten file changes it."""
    p = Path(path).resolve()
    return _identity(p, p.stat())


def read_stable(path: str | os.PathLike, read: Callable[[BinaryIO], T], attempts: int = 3) -> tuple[T, dict[str, Any]]:
    """``read(f)`` of ``path`` opened once, and the :func:`file_identity` of the bytes it read.

    The identity is taken from the open file, so a file replaced under its name meanwhile (an atomic
    rewrite of ``last.ckpt``) is not mistaken for the one read; a file rewritten in place while it was
    read (its size or mtime moved between the two looks) is read again, up to ``attempts`` times.
    """
    p = Path(path).resolve()
    for _ in range(attempts):
        with open(p, "rb") as f:
            before = os.fstat(f.fileno())
            value = read(f)
            after = os.fstat(f.fileno())
        if (before.st_size, before.st_mtime_ns) == (after.st_size, after.st_mtime_ns):
            return value, _identity(p, before)
    raise OSError(f"{p} changed while it was read, {attempts} times: read it again once it is fully written")


def _temporary_prefix(pid: int | None = None) -> str:
    """``.tmp-<pid>@<host>-``: a temporary file names the process writing it (see :func:`remove_temporaries`)."""
    return f"{_TMP_PREFIX}{os.getpid() if pid is None else pid}@{_HOST}-"


def _written_by_a_live_process(path: Path) -> bool:
    """Whether the temporary ``path`` may still be written: by this process, by another one alive on this
    host, or (its owner cannot be asked) on another host within the last hour. A name without an owner
    (older versions) or of a process that ended: no."""
    match = _OWNER.match(path.name)
    if match is None:
        return False
    pid, host = int(match[1]), match[2]
    if host != _HOST:
        try:
            return time.time() - path.stat().st_mtime < FOREIGN_TEMPORARY_S
        except OSError:
            return False
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # alive, another user's
        return True
    return True


def remove_temporaries(folder: str | os.PathLike) -> list[Path]:
    """Delete the ``.tmp-*`` files :func:`atomic_write` left in ``folder`` and its real subfolders (a
    killed run's), never those another live run is writing; links are never followed. Returns what was removed."""
    removed = []
    for dirpath, _dirnames, filenames in os.walk(folder):  # os.walk does not enter linked folders
        for name in filenames:
            path = Path(dirpath) / name
            if name.startswith(_TMP_PREFIX) and not path.is_symlink() and not _written_by_a_live_process(path):
                path.unlink(missing_ok=True)
                removed.append(path)
    return removed


class DiskFullError(OSError):
    """No space left (or the quota reached) where a run writes; its message is one line naming the folder."""

    def __init__(self, folder: str | os.PathLike, what: str = "") -> None:
        super().__init__(f"no space left on device in {folder}{': ' + what if what else ''}")
        self.errno = errno.ENOSPC


def disk_full(exc: BaseException) -> bool:
    """Whether ``exc`` (or an exception it was raised from) is a full disk or quota (ENOSPC, EDQUOT)."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return False


FULL_BELOW_BYTES = 1 << 20  # a folder with less free space than this, after a failed write, is on a full disk


def raise_if_disk_full(folder: str | os.PathLike, exc: BaseException, what: str = "") -> None:
    """Raise :class:`DiskFullError` naming ``folder`` (from ``exc``) when the write that raised ``exc`` failed
    for want of space: an ENOSPC/EDQUOT error, or, since torch.save and numpy lose the errno ("basic_ios::clear:
    iostream error", "71820 requested and 39904 written"), less than :data:`FULL_BELOW_BYTES` left there."""
    if isinstance(exc, DiskFullError):
        return
    try:
        nearly_full = shutil.disk_usage(folder).free < FULL_BELOW_BYTES
    except OSError:
        nearly_full = False
    if disk_full(exc) or nearly_full:
        raise DiskFullError(folder, what) from exc


LOCKS = ".locks"  # ROOT/.locks/<name>.lock: the lock a run holds while it writes ``name`` in ROOT


def lock_path(root: str | os.PathLike, name: str) -> Path:
    """``root/.locks/<name>.lock`` (the folder created without following a link): the :class:`FileLock`
    that runs writing into ``root`` at the same time take for ``name`` (a case)."""
    return folder_inside(root, Path(root) / LOCKS) / f"{name}.lock"


class FileLock:
    """An exclusive lock (``flock``) on a file that names its holder: two runs writing into one folder
    take it per case, so neither writes or cleans what the other is writing.

    ``acquire(wait=False)`` returns False at once when another process (or another ``FileLock`` of this
    one) holds it. Where the filesystem has no locks, acquiring succeeds with a warning.
    """

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        self._fd: int | None = None

    def acquire(self, wait: bool = True) -> bool:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, file_mode())
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            os.close(fd)
            return False
        except OSError as exc:
            if exc.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):
                os.close(fd)
                raise
            _warn_no_locks(self.path, exc)
        os.ftruncate(fd, 0)
        os.write(fd, f"pid {os.getpid()} on {socket.gethostname()}\n".encode())
        self._fd = fd
        return True

    def holder(self) -> str:
        """Who holds the lock, as it wrote itself into the file ("pid N on HOST"), or "unknown"."""
        try:
            return self.path.read_text(encoding="utf-8").strip() or "unknown"
        except OSError:
            return "unknown"

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing drops the lock; the file stays (removing it would race a waiter)
            self._fd = None

    def __enter__(self) -> FileLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


_warned_no_locks: set[str] = set()


def _warn_no_locks(path: Path, exc: OSError) -> None:
    if str(path.parent) not in _warned_no_locks:
        _warned_no_locks.add(str(path.parent))
        logging.getLogger(__name__).warning(
            "%s: this filesystem cannot lock files (%s); two runs writing there at once are not kept apart",
            path.parent, exc.strerror or exc,
        )  # fmt: skip


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
