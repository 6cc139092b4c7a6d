"""Paths and names from the user, the disk or ``labels.txt``: shown in messages with hostile characters
escaped (``shown``), and opened for reading without ever blocking (``open_regular_file``)."""

from __future__ import annotations

import errno
import io
import os
import stat


def shown(name: str | os.PathLike) -> str:
    """``name`` as it may be printed: unchanged when every character is printable, else its ``repr``.

    A control character (NUL, an ANSI escape), a Unicode format character (a bidi override) or a
    byte that was not valid UTF-8 in a file name (a lone surrogate) would otherwise reach the
    terminal raw, or make ``print`` fail; ``repr`` writes them as ``\\x1b``, ``\\u202e``, ``\\udcff``.
    """
    text = os.fspath(name)
    return text if text.isprintable() else repr(text)


# Why a path could not be read, by errno: the cases a user can act on, said plainly.
_READ_REASONS = {
    errno.EACCES: "permission denied (EACCES)",
    errno.EPERM: "operation not permitted (EPERM)",
    errno.ELOOP: "a symbolic link loop (ELOOP)",
    errno.ENAMETOOLONG: "the path is too long (ENAMETOOLONG)",
    errno.ENOTDIR: "a component of the path is not a folder (ENOTDIR)",
    errno.EIO: "input/output error: the disk or network file system failed (EIO)",
}


def read_reason(e: OSError) -> str:
    """Why reading a path failed, in a few words, e.g. ``permission denied (EACCES)``."""
    return _READ_REASONS.get(e.errno) or (e.strerror or str(e)).splitlines()[0]


_FILE_KINDS = [(stat.S_ISDIR, "a folder"), (stat.S_ISFIFO, "a FIFO (named pipe)"), (stat.S_ISSOCK, "a socket"),
               (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device")]


def _not_regular(mode: int) -> str:
    """What a non-regular file is, e.g. ``a FIFO (named pipe)``."""
    return next((kind for test, kind in _FILE_KINDS if test(mode)), "a special file")


def open_regular_file(path: str | os.PathLike, error: type[Exception], label: str | None = None,
                      missing: str = "no such image file") -> io.BufferedReader:
    """Open ``path`` for reading in binary, only if it is a regular file; never blocks.

    The file is opened non-blocking and checked with ``fstat`` on the open descriptor, so a FIFO or
    a device file (even one swapped in after an earlier check) is refused instead of hanging the read.

    Args:
        path: the file.
        error: the exception class to raise, e.g. ``ImageLoadError``.
        label: how to call it in the message (defaults to the path, escaped).
        missing: what to say when nothing is there.
    Returns:
        The open binary file.
    Raises:
        error: naming the path and the reason: missing, a broken symbolic link, permission denied,
            a folder, a FIFO, a device.
    """
    label = label or shown(path)
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0))
    except FileNotFoundError:
        if os.path.islink(path):
            raise error(f"{label}: broken symbolic link (it points to {shown(os.readlink(path))}, "
                        "which does not exist)") from None
        raise error(f"{label}: {missing}") from None
    except IsADirectoryError:  # Windows; POSIX opens a folder read-only and fstat says so below
        raise error(f"{label}: a folder, not a regular file") from None
    except OSError as e:
        raise error(f"{label}: cannot read it: {read_reason(e)}") from None
    except ValueError:  # an embedded NUL
        raise error(f"{label}: not a valid path (it contains a NUL byte)") from None
    mode = os.fstat(fd).st_mode
    if not stat.S_ISREG(mode):
        os.close(fd)
        raise error(f"{label}: {_not_regular(mode)}, not a regular file")
    if hasattr(os, "set_blocking"):
        os.set_blocking(fd, True)
    return os.fdopen(fd, "rb")
