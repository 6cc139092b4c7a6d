"""A label review: decisions on audited labels, written as a new labels file plus a log.

The labels file under review is never changed (data is immutable). Each decision rewrites, atomically,
``labels.reviewed.txt`` (the labels with every decision applied, in the same format, validated by
reading it back) and ``review_log.jsonl`` (one JSON object per decision: who, when, what). A review
reopened on the same labels file (same sha256) replays its log, so no decision is lost between sessions.
Train or evaluate on the result with ``--labels .../labels.reviewed.txt`` (notebook parameter ``labels``).
"""

from __future__ import annotations

import getpass
import json
import os
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from aimonk.data import LabelTable, file_digest, parse_labels
from aimonk.explore import label_token
from aimonk.files import atomic_write_text

ACTIONS = ("keep", "flip", "na", "drop")  # keep the label, flip 1 <-> 0, set it to NA, drop the image
REVIEWED_NAME = "labels.reviewed.txt"
LOG_NAME = "review_log.jsonl"


class ReviewError(ValueError):
    """A decision that cannot be applied, or a review log that cannot be read; the message says where."""


class LabelReview:
    """Decisions on the cells of one labels file.

    Args:
        labels: the labels file under review (read only).
        out_dir: where ``labels.reviewed.txt`` and ``review_log.jsonl`` go.
        reviewer: recorded with each decision (default: the login name).
    """

    def __init__(self, labels: str | os.PathLike, out_dir: str | os.PathLike, reviewer: str | None = None):
        self.source = Path(labels)
        self.table: LabelTable = parse_labels(self.source)
        self.sha256 = file_digest(self.source)
        self.out_dir = Path(out_dir)
        if self.reviewed_path.resolve() == self.source.resolve():
            raise ReviewError(f"{self.source}: the review would overwrite the labels under review; "
                              "choose another output folder")
        self.reviewer = reviewer or _login()
        self._row = {n: i for i, n in enumerate(self.table.names)}
        self._others, self.log = self._read_log()

    @property
    def reviewed_path(self) -> Path:
        return self.out_dir / REVIEWED_NAME

    @property
    def log_path(self) -> Path:
        return self.out_dir / LOG_NAME

    def decide(self, image: str, attribute: str | None, action: str, **context) -> dict:
        """Record one decision and rewrite both files.

        Args:
            image: a name from the labels file.
            attribute: the attribute decided on (may be None for ``drop``).
            action: one of ``ACTIONS``.
            context: recorded as is, e.g. ``score``, ``probability``, ``reason``.
        Returns:
            The log entry.
        """
        j = self._check(image, attribute, action)
        old = self.table.targets[self._row[image], j] if j is not None else None
        entry = {"time": datetime.now(timezone.utc).isoformat(timespec="seconds"), "reviewer": self.reviewer,
                 "image": image, "attribute": attribute, "action": action,
                 "old": None if old is None else label_token(old),
                 "new": "dropped" if action == "drop" else label_token(_apply(old, action)),
                 "labels": str(self.source), "labels_sha256": self.sha256, **context}
        self.log.append(entry)
        try:
            self._write()
        except BaseException:
            self.log.pop()  # what is in memory stays what is on disk
            raise
        return entry

    def decided(self) -> dict[tuple[str, str | None], str]:
        """The last action per (image, attribute); ``(image, None)`` for drops."""
        return {(e["image"], e["attribute"] if e["action"] != "drop" else None): e["action"] for e in self.log}

    def reviewed_table(self) -> LabelTable:
        """The labels with every decision applied: later decisions on a cell replace earlier ones; an image
        whose last decision was ``drop`` is left out."""
        targets = self.table.targets.copy()
        last_for_image = {}
        for e in self.log:
            i = self._row[e["image"]]
            last_for_image[i] = e["action"]
            if e["action"] != "drop":
                j = self.table.attributes.index(e["attribute"])
                targets[i, j] = _apply(self.table.targets[i, j], e["action"])
        keep = [i for i in range(len(self.table)) if last_for_image.get(i) != "drop"]
        return LabelTable(names=[self.table.names[i] for i in keep], targets=targets[keep],
                          attributes=list(self.table.attributes), source=self.reviewed_path)

    def _check(self, image: str, attribute: str | None, action: str) -> int | None:
        if action not in ACTIONS:
            raise ReviewError(f"unknown action {action!r}; choose from {', '.join(ACTIONS)}")
        if image not in self._row:
            raise ReviewError(f"{self.source}: no image named {image!r}")
        if attribute is None:
            if action != "drop":
                raise ReviewError(f"{action!r} needs an attribute")
            return None
        if attribute not in self.table.attributes:
            raise ReviewError(f"{self.source}: no attribute {attribute!r}; it has {', '.join(self.table.attributes)}")
        return self.table.attributes.index(attribute)

    def _read_log(self) -> tuple[list[str], list[dict]]:
        """Lines of other labels files' reviews (kept as they are) and this file's earlier decisions."""
        if not self.log_path.exists():
            return [], []
        others, mine = [], []
        for n, line in enumerate(self.log_path.read_text(encoding="utf-8").splitlines(), start=1):
            if not line.strip():
                continue
            try:
                entry = json.loads(line)
                same = entry["labels_sha256"] == self.sha256
                if same:
                    self._check(entry["image"], entry["attribute"] if entry["action"] != "drop" else None,
                                entry["action"])
            except (ValueError, KeyError, TypeError) as e:
                raise ReviewError(f"{self.log_path} line {n}: not a review entry ({e})") from None
            (mine.append(entry) if same else others.append(line))
        return others, mine

    def _write(self) -> None:
        """Both files, atomically; the reviewed labels are read back to prove them valid."""
        lines = [*self._others, *(json.dumps(e, ensure_ascii=False) for e in self.log)]
        atomic_write_text(self.log_path, "\n".join(lines) + "\n")
        table = self.reviewed_table()
        atomic_write_text(self.reviewed_path, format_labels(table))
        back = parse_labels(self.reviewed_path, table.attributes)
        if back.names != table.names or not np.array_equal(back.targets, table.targets):
            raise ReviewError(f"{self.reviewed_path}: reads back differently from what was written")


def format_labels(table: LabelTable) -> str:
    """``table`` in the labels.txt format; a header line only where the attributes are not Attr1..AttrK."""
    default = [f"Attr{j + 1}" for j in range(len(table.attributes))]
    header = [] if table.attributes == default else ["image " + " ".join(table.attributes)]
    rows = [" ".join([n, *(label_token(v) for v in t)]) for n, t in zip(table.names, table.targets)]
    return "\n".join(header + rows) + "\n"


def _apply(old: float, action: str) -> float:
    """The label after ``action`` on a cell whose reviewed label is ``old`` (1, 0 or -1 for NA)."""
    if action == "flip" and old >= 0:
        return 1.0 - old
    return -1.0 if action == "na" else old


def _login() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):  # no login name in some containers
        return "unknown"
