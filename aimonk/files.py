"""Writing and reading back the files the tool makes: atomic writes and the safe checkpoint reader."""

from __future__ import annotations

import errno
import glob
import hashlib
import io
import os
import shutil
import tempfile
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any, Iterator

import torch


class CheckpointError(ValueError):
    """A model file is missing, damaged, unsafe or incompatible; the message names it."""


class WriteError(OSError):
    """A file could not be written (disk full, no permission, ...); the message names it in one line."""

    def __str__(self) -> str:
        return str(self.strerror)  # the message alone, without OSError's "[Errno N]" prefix


# Why a write failed, by errno: the cases a user can act on, said plainly.
_WRITE_REASONS = {
    errno.ENOSPC: "no space left on the disk (ENOSPC)",
    errno.EDQUOT: "the disk quota is exceeded (EDQUOT)",
    errno.EFBIG: "the file is larger than this process may write (EFBIG: a file-size limit)",
    errno.EACCES: "permission denied (EACCES)",
    errno.EROFS: "the file system is read-only (EROFS)",
}


def write_error(path: str | os.PathLike, e: OSError) -> WriteError:
    """A one-line ``WriteError`` for ``path`` from the ``OSError`` that stopped its write."""
    code = e.errno if e.errno is not None or not _disk_full(Path(path).parent) else errno.ENOSPC
    reason = _WRITE_REASONS.get(code) or (e.strerror or str(e) or type(e).__name__).splitlines()[0]
    return WriteError(code, f"{path}: cannot write it: {reason}")


def _disk_full(folder: Path) -> bool:
    """For writers that report a short write without an errno (numpy): is the disk full?"""
    try:
        return shutil.disk_usage(folder).free < 1 << 16
    except OSError:
        return False


def temp_prefix(path: Path) -> str:
    """The prefix of this process's temp files for ``path``: ``.NAME.PID.`` (the pid says whose they are)."""
    return f".{path.name}.{os.getpid()}."


def remove_stale_temps(path: str | os.PathLike) -> list[Path]:
    """Remove the temp files of ``path`` left by processes that no longer run (a killed save), saying so.

    Returns:
        The files removed.
    """
    path = Path(path)
    removed = []
    for tmp in path.parent.glob(f".{glob.escape(path.name)}.*.tmp"):
        pid = tmp.name[len(path.name) + 2:].split(".", 1)[0]
        if pid.isdigit() and not _alive(int(pid)):
            tmp.unlink(missing_ok=True)
            removed.append(tmp)
    if removed:
        warnings.warn(f"{path.parent}: removed {len(removed)} temp file(s) of {path.name} left by a process that "
                      f"was killed while writing it: {', '.join(t.name for t in removed[:3])}", stacklevel=3)
    return removed


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


@contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "wb") -> Iterator[IO]:
    """Open a unique temp file beside ``path``; on success fsync it and rename it over ``path``.

    A reader never sees a half-written file, two writers never share a temp file, and on any
    error the temp file is removed and the previous ``path`` is left as it was. Temp files of
    ``path`` left by killed processes are removed first (``remove_stale_temps``).

    Args:
        path: the destination; its folder is created if needed.
        mode: ``"wb"`` or ``"w"``.
    Yields:
        The open temp file.
    Raises:
        WriteError: one line naming ``path`` and the reason (e.g. the disk is full).
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_temps(path)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=temp_prefix(path), suffix=".tmp")
    except OSError as e:
        raise write_error(path, e) from None
    try:
        with os.fdopen(fd, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        Path(tmp).unlink(missing_ok=True)
        raise write_error(path, e) from None
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> Path:
    """``torch.save`` through ``atomic_write``.

    The object is serialised in memory first, so a failed write raises the ``OSError`` of the
    write itself (torch's own writer reports it as an untyped ``RuntimeError``).
    """
    return atomic_write_bytes(path, torch_bytes(obj))


def torch_bytes(obj: Any) -> bytes:
    """``obj`` as ``torch.save`` writes it, in memory: a snapshot that later changes to its tensors do not touch."""
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


def atomic_write_bytes(path: str | os.PathLike, data: bytes | memoryview) -> Path:
    """Write ``data`` to ``path`` through ``atomic_write``."""
    with atomic_write(path) as f:
        f.write(data)
    return Path(path)


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` through ``atomic_write``."""
    with atomic_write(path, "w") as f:
        f.write(text)
    return Path(path)


def atomic_savefig(fig, path: str | os.PathLike, **kwargs) -> Path:
    """``fig.savefig`` (PNG unless ``format`` says otherwise) through ``atomic_write``."""
    path = Path(path)
    with atomic_write(path) as f:
        fig.savefig(f, format=kwargs.pop("format", path.suffix.lstrip(".") or "png"), **kwargs)
    return path


def safe_load(path: str | os.PathLike) -> Any:
    """``torch.load`` restricted to tensors and plain data (``weights_only=True``), with clear errors.

    A pickle that would build arbitrary Python objects (and so could run code) is refused, never executed.

    Raises:
        CheckpointError: naming the file and what is wrong with it.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: model file not found")
    try:
        with open(path, "rb") as f:
            head = f.read(4)
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read it ({e.strerror or e})") from None
    if not head:
        raise CheckpointError(f"{path}: empty file (0 bytes); expected a checkpoint written by training")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # torch's notes on pickle protocols
            return torch.load(path, map_location="cpu", weights_only=True)
    except MemoryError:
        raise CheckpointError(f"{path}: not a readable aimonk checkpoint: it claims more memory than there is") from None
    except Exception as e:
        raise CheckpointError(f"{path}: not a readable aimonk checkpoint: {_unreadable_reason(str(e), head)}") from None


def _unreadable_reason(error: str, head: bytes) -> str:
    if "Unsupported global" in error or "GLOBAL" in error:
        return ("it contains arbitrary Python objects, refused for safety because loading them could run "
                "code (only tensors and plain data load)")
    if head.startswith(b"PK"):  # torch's zip format
        return "the file is truncated or corrupted (damaged zip archive)"
    if head.startswith(b"\x80"):  # a bare pickle
        return "it is a bare Python pickle, refused for safety because loading it could run code"
    return "unrecognised file format (expected a PyTorch checkpoint)"


def file_sha256(path: str | os.PathLike) -> str:
    """sha256 of a file's bytes, read in 1 MiB chunks.

    Raises:
        CheckpointError: naming the file, if it is missing or cannot be read.
    """
    h = hashlib.sha256()
    try:
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read it ({e.strerror or e})") from None
    return h.hexdigest()
