"""Writing and reading back the files the tool makes: atomic writes and the safe checkpoint reader."""

from __future__ import annotations

import os
import tempfile
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any, Iterator

import torch


class CheckpointError(ValueError):
    """A model file is missing, damaged, unsafe or incompatible; the message names it."""


@contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "wb") -> Iterator[IO]:
    """Open a unique temp file beside ``path``; on success fsync it and rename it over ``path``.

    A reader never sees a half-written file, two writers never share a temp file, and on any
    error the temp file is removed and the previous ``path`` is left as it was.

    Args:
        path: the destination; its folder is created if needed.
        mode: ``"wb"`` or ``"w"``.
    Yields:
        The open temp file.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> Path:
    """``torch.save`` through ``atomic_write``."""
    with atomic_write(path) as f:
        torch.save(obj, f)
    return Path(path)


def safe_load(path: str | os.PathLike) -> Any:
    """``torch.load`` restricted to tensors and plain data (``weights_only=True``), with clear errors.

    A pickle that would build arbitrary Python objects (and so could run code) is refused, never executed.

    Raises:
        CheckpointError: naming the file and what is wrong with it.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: model file not found")
    with open(path, "rb") as f:
        head = f.read(4)
    if not head:
        raise CheckpointError(f"{path}: empty file (0 bytes); expected a checkpoint written by training")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # torch's notes on pickle protocols
            return torch.load(path, map_location="cpu", weights_only=True)
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
