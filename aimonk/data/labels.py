"""labels.txt: the strict parser and the ``LabelTable`` it returns."""

from __future__ import annotations

import os
import re
import unicodedata
import warnings
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Sequence

import numpy as np

from aimonk import config
from aimonk.data.paths import open_regular_file, shown

NA = -1.0  # how an unknown label is stored in a target array



class LabelFileError(ValueError):
    """labels.txt is malformed; the message names the file and the line."""



@dataclass
class LabelTable:
    """The parsed contents of a labels.txt file.

    ``targets`` has shape (N, n_attributes) and holds 1.0, 0.0 or -1.0 (NA).
    """

    names: list[str]
    targets: np.ndarray
    attributes: list[str]
    source: Path | None = None
    line_numbers: list[int] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.names)

    def subset(self, index: Sequence[int]) -> "LabelTable":
        index = list(index)
        return LabelTable(
            names=[self.names[i] for i in index],
            targets=self.targets[index],
            attributes=list(self.attributes),
            source=self.source,
            line_numbers=[self.line_numbers[i] for i in index] if self.line_numbers else [],
        )

    def counts(self) -> "dict[str, dict[str, int]]":
        """Per attribute, how many labels are 1, 0 and NA."""
        t = self.targets
        return {
            a: {"1": int((t[:, j] == 1).sum()), "0": int((t[:, j] == 0).sum()), "NA": int((t[:, j] < 0).sum())}
            for j, a in enumerate(self.attributes)
        }



def _parse_token(token: str) -> float | None:
    low = token.lower()
    if low in config.POSITIVE_TOKENS:
        return 1.0
    if low in config.NEGATIVE_TOKENS:
        return 0.0
    if low in config.NA_TOKENS:
        return NA
    return None



def _check_printable(kind: str, name: str, where: str) -> None:
    """A NUL, a control character (an ANSI escape) or an invisible format character is refused: it
    cannot name a file safely, and would reach the terminal raw in every later message."""
    bad = next((c for c in name if not c.isprintable()), None)
    if bad is not None:
        what = "a NUL byte" if bad == "\0" else f"the non-printable character {ascii(bad)}"
        raise LabelFileError(f"{where}: {kind} {name!r} contains {what}; names must be printable text")


def _check_name(name: str, where: str) -> None:
    _check_printable("image name", name, where)
    if name.startswith(("/", "\\")) or PurePosixPath(name).is_absolute() or (len(name) > 1 and name[1] == ":"):
        raise LabelFileError(f"{where}: image name {name!r} is an absolute path; names must be relative to images/")
    if ".." in PurePosixPath(name.replace("\\", "/")).parts:
        raise LabelFileError(f"{where}: image name {name!r} contains '..'; names must stay inside images/")



def parse_labels(path: str | os.PathLike, attributes: Sequence[str] | None = None) -> LabelTable:
    """Parse a labels.txt file strictly.

    Each non-blank line is ``NAME t1 ... tK`` separated by any whitespace, where each token is
    ``1``, ``0`` or ``NA`` (``na``, ``NaN`` and ``N/A`` are accepted as NA). K comes from the file.
    An optional first line whose tokens are all non-label words (e.g. ``image Attr1 Attr2``) is a
    header and names the attributes. A UTF-8 byte-order mark and CRLF line endings are accepted.

    Args:
        path: the labels file.
        attributes: attribute names to use instead of the header or the default ``Attr1..AttrK``.
    Returns:
        A ``LabelTable``.
    Raises:
        LabelFileError: naming the file and line, for a wrong field count, an unknown token,
            a duplicate or unsafe image name (absolute, ``..``, a NUL or other non-printable
            character), names differing only in letter case whose labels conflict, or a file with
            no label rows; and for a file that is missing, unreadable, not a regular file or not
            UTF-8. Names differing only in case with the same labels give a warning.
    """
    path = Path(path)
    lines = _read_lines(path)
    header, n_labels = None, len(attributes) if attributes is not None else None
    names: list[str] = []
    rows: list[list[float]] = []
    line_numbers: list[int] = []
    seen: dict[str, int] = {}
    for lineno, raw in enumerate(lines, start=1):
        fields = raw.split()
        if not fields:
            continue
        where = f"{shown(path)} line {lineno}"
        if not rows and header is None and _is_header(fields):
            header = _check_header(fields[1:], n_labels, where)  # e.g. "image Attr1 Attr2 Attr3 Attr4"
            n_labels = len(header)
            continue
        if n_labels is None:
            if len(fields) < 2:
                raise LabelFileError(f"{where}: expected a file name followed by label tokens, got only {fields[0]!r}")
            n_labels = _typical_label_count(lines)
        name, values = _parse_row(fields, raw, n_labels, where)
        if name in seen:
            raise LabelFileError(f"{where}: duplicate image name {name!r} (first seen on line {seen[name]})")
        seen[name] = lineno
        names.append(name)
        rows.append(values)
        line_numbers.append(lineno)
    _check_case_duplicates(path, names, rows, line_numbers)
    if not rows:
        raise LabelFileError(f"{shown(path)}: no label rows found (expected lines like 'image_0.jpg 1 NA 0 1')")
    if attributes is None:
        attributes = header if header is not None else [f"Attr{j + 1}" for j in range(n_labels)]
    return LabelTable(names=names, targets=np.asarray(rows, dtype=np.float32), attributes=list(attributes),
                      source=path, line_numbers=line_numbers)


_LINE_END = re.compile(r"\r\n|\r|\n")


def _read_lines(path: Path) -> list[str]:
    """The file's lines, decoded as UTF-8 (a byte-order mark is dropped).

    Lines end at LF, CRLF or CR only, as an editor counts them: ``str.splitlines`` would also break at
    form feeds, vertical tabs and other separators, and the line numbers in messages would drift."""
    with open_regular_file(path, LabelFileError, missing="labels file not found") as f:
        data = f.read()
    try:
        return _LINE_END.split(data.decode("utf-8-sig"))
    except UnicodeDecodeError as e:
        raise LabelFileError(f"{shown(path)}: not UTF-8 text ({e.reason} at byte {e.start})") from None


def _check_case_duplicates(path: Path, names: list[str], rows: list[list[float]], line_numbers: list[int]) -> None:
    """Names that differ only in letter case (or Unicode normal form) are one file on a case-insensitive
    disk (macOS, Windows): a warning when their labels agree, an error when they conflict, since one
    image would then carry two sets of labels."""
    first: dict[str, int] = {}
    for i, name in enumerate(names):
        key = unicodedata.normalize("NFC", name).casefold()
        j = first.setdefault(key, i)
        if j == i:
            continue
        same = f"{shown(path)} line {line_numbers[i]}: image name {name!r} differs from {names[j]!r} on line " \
               f"{line_numbers[j]} only in letter case; on a case-insensitive disk they are one file"
        if rows[i] != rows[j]:
            raise LabelFileError(f"{same}, and their labels conflict; rename one of the images or fix its labels")
        warnings.warn(f"{same} (their labels agree)", stacklevel=3)


def _typical_label_count(lines: list[str]) -> int:
    """The most common label count (ties: the earliest), so that a bad first line (e.g. a file name
    with a space) is the line reported, not every line after it."""
    counts = Counter(len(raw.split()) - 1 for raw in lines if len(raw.split()) > 1)
    return next(len(raw.split()) - 1 for raw in lines
                if len(raw.split()) > 1 and counts[len(raw.split()) - 1] == max(counts.values()))


def _is_header(fields: list[str]) -> bool:
    """A first row of words only. A row naming an image file is data even if its tokens are all words
    (then they are bad labels)."""
    name, tokens = fields[0], fields[1:]
    return bool(tokens) and PurePosixPath(name).suffix.lower() not in config.IMAGE_EXTENSIONS and all(
        _parse_token(t) is None and not t.lstrip("+-").replace(".", "", 1).isdigit() for t in tokens)


def _check_header(header: list[str], n_labels: int | None, where: str) -> list[str]:
    for a in header:
        _check_printable("attribute name", a, where)
    if n_labels is not None and len(header) != n_labels:
        raise LabelFileError(f"{where}: header names {len(header)} attributes, expected {n_labels}")
    twice = sorted({a for a in header if header.count(a) > 1})
    if twice:
        raise LabelFileError(f"{where}: header names attribute(s) {twice} more than once; expected unique names")
    return header


def _parse_row(fields: list[str], raw: str, n_labels: int, where: str) -> tuple[str, list[float]]:
    """``(name, values)`` of one data row, checked: the label count, each token, the name."""
    name, tokens = fields[0], fields[1:]
    if len(tokens) != n_labels:
        hint = " (file names may not contain spaces)" if len(tokens) > n_labels else ""
        raise LabelFileError(
            f"{where}: expected {n_labels} labels after the file name, got {len(tokens)}{hint}: {raw.strip()!r}"
        )
    values = []
    for k, token in enumerate(tokens, start=1):
        v = _parse_token(token)
        if v is None:
            looks_like_name = Path(token).suffix.lower() in config.IMAGE_EXTENSIONS
            hint = " (file names may not contain spaces)" if looks_like_name else ""
            raise LabelFileError(f"{where}: label {k} is {token!r}; expected 1, 0 or NA{hint}")
        values.append(v)
    _check_name(name, where)
    return name, values
