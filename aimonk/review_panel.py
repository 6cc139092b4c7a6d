"""The ipywidgets review panel of ``05_audit``: one suspect label at a time; keep, flip, set NA or drop the image.

Every click is saved at once by a ``review.LabelReview`` (``labels.reviewed.txt`` plus
``review_log.jsonl``); the labels file under review is never changed. Driven from Python in tests::

    panel = review_panel(result, "data/sample", "reports/audit")
    panel.buttons["flip"].click()
"""

from __future__ import annotations

import html
import os
from pathlib import Path

import ipywidgets as widgets

from aimonk.audit import AuditResult
from aimonk.data import ImageLoadError, load_image
from aimonk.files import WriteError
from aimonk.review import LabelReview, ReviewError
from aimonk.widgets import ERROR_COLOR, thumbnail_png

BUTTONS = {"keep": ("Keep", "success"), "flip": ("Flip", "warning"), "na": ("Set NA", "info"),
           "drop": ("Drop image", "danger")}


class ReviewPanel(widgets.VBox):
    """A ``VBox`` over an audit's suspects; its parts are attributes so tests can reach them.

    Args:
        result: the audit.
        review: where decisions go.
        images_dir: the folder of the images (``DATA/images``).
        top: how many suspects to offer.
        display_size: side in pixels of the square each image is shown in.

    Parts: ``gate`` (what is not audited, and why), ``image``, ``info``, ``buttons`` (one per action),
    ``back``/``skip``, ``position``, ``status``. State: ``suspects``, ``i`` (the one shown).
    """

    def __init__(self, result: AuditResult, review: LabelReview, images_dir: str | os.PathLike, top: int = 50,
                 display_size: int = 224):
        self.result, self.review, self.images_dir = result, review, Path(images_dir)
        self.suspects = result.suspects(top)
        self.display_size = int(display_size)
        self.gate = widgets.HTML(_gate_html(result))
        self.image = widgets.Image(format="png", width=self.display_size, height=self.display_size,
                                   layout=widgets.Layout(width=f"{self.display_size}px", height=f"{self.display_size}px",
                                                         border="1px solid #ddd"))
        self.info = widgets.HTML("")
        self.buttons = {a: widgets.Button(description=d, button_style=s) for a, (d, s) in BUTTONS.items()}
        self.back, self.skip = widgets.Button(description="< Back"), widgets.Button(description="Skip >")
        self.position, self.status = widgets.HTML(""), widgets.HTML("")
        for action, button in self.buttons.items():
            button.on_click(lambda _, action=action: self.decide(action))
        self.back.on_click(lambda _: self.show(self.i - 1))
        self.skip.on_click(lambda _: self.show(self.i + 1))
        controls = widgets.VBox([self.info, widgets.HBox(list(self.buttons.values())),
                                 widgets.HBox([self.back, self.skip, self.position]), self.status],
                                layout=widgets.Layout(padding="0 0 0 16px"))
        super().__init__([self.gate, widgets.HBox([self.image, controls])], layout=widgets.Layout(padding="8px"))
        decided = review.decided()
        self.i = 0
        self.show(next((k for k, (n, a) in enumerate(zip(self.suspects["image"], self.suspects["attribute"]))
                        if (n, a) not in decided and (n, None) not in decided), 0))

    @property
    def current(self) -> dict | None:
        """The suspect shown (a row of ``AuditResult.suspects``), or None when there is none."""
        return self.suspects.iloc[self.i].to_dict() if 0 <= self.i < len(self.suspects) else None

    def show(self, i: int) -> None:
        """Show suspect ``i`` (clamped to the list)."""
        self.i = max(0, min(i, len(self.suspects)))
        row = self.current
        for b in (*self.buttons.values(), self.skip):
            b.disabled = row is None
        self.back.disabled = self.i == 0
        self.position.value = (f"&nbsp;{min(self.i + 1, len(self.suspects))} of {len(self.suspects)} suspects, "
                               f"{len(self.review.decided())} decision(s) saved")
        if row is None:
            self.image.value = b""
            self.info.value = ("<b>Nothing to review.</b>" if not len(self.suspects) else
                               f"<b>End of the list.</b> Train on the reviewed labels with "
                               f"<code>-p labels {html.escape(str(self.review.reviewed_path))}</code>.")
            return
        self.image.value = self._thumbnail(row["image"])
        self.info.value = _suspect_html(row, self.review.decided())

    def decide(self, action: str) -> None:
        """Save ``action`` for the suspect shown (``drop`` drops its whole image) and move to the next."""
        row = self.current
        if row is None:
            return
        try:
            self.review.decide(row["image"], None if action == "drop" else row["attribute"], action,
                               attribute_shown=row["attribute"], score=round(float(row["score"]), 4),
                               probability=round(float(row["probability"]), 4),
                               reason=f"{row['copies']} copies disagree" if row["duplicate"] else "confident learning")
        except (ReviewError, WriteError, OSError) as e:  # shown in the panel; nothing is lost, nothing advances
            self.status.value = f"<span style='color:{ERROR_COLOR}'><b>Not saved: {html.escape(str(e))}</b></span>"
            return
        self.status.value = (f"<span style='color:#666'>{html.escape(row['image'])}: {action} saved to "
                             f"<code>{html.escape(str(self.review.reviewed_path))}</code> and the log "
                             f"(the labels under review are unchanged)</span>")
        self.show(self.i + 1)

    def _thumbnail(self, name: str) -> bytes:
        try:
            return thumbnail_png(load_image(self.images_dir / name), self.display_size)
        except ImageLoadError as e:
            self.status.value = f"<span style='color:{ERROR_COLOR}'>{html.escape(str(e))}</span>"
            return b""


def _gate_html(result: AuditResult) -> str:
    """The signal gate in words: which attributes are audited, which are not, and why."""
    items = []
    for a, row in result.signal.iterrows():
        word = "audited" if row["signal"] else "<b>not audited</b>: the model cannot tell wrong labels from right ones"
        items.append(f"<li><b>{html.escape(a)}</b>: {word} ({html.escape(row['verdict'])})</li>")
    return "<h3 style='margin:0'>Label review</h3><ul style='margin:4px 0'>" + "".join(items) + "</ul>"


def _suspect_html(row: dict, decided: dict) -> str:
    label = {1: "present (1)", 0: "absent (0)"}[int(row["label"])]
    why = {"identical": "byte-identical copies of this image disagree on this attribute",
           "near-identical": "near-identical images (perceptual hash) disagree on this attribute: check that "
                             "they show the same item"}.get(row.get("copies") or "",
                                                            f"the model gives it p = {row['probability']:.2f} out of sample")
    done = decided.get((row["image"], row["attribute"])) or decided.get((row["image"], None))
    return (f"<b>{html.escape(row['image'])}</b> &middot; {html.escape(row['attribute'])} labelled <b>{label}</b><br>"
            f"<span style='color:#666'>{why}; issue score {row['model_score']:.2f}"
            f"{'; flagged by confident learning' if row['flagged'] and not row['duplicate'] else ''}</span>"
            + (f"<br><span style='color:#2a9d8f'>already decided: {done}</span>" if done else ""))


def review_panel(result: AuditResult, data_dir: str | os.PathLike, out_dir: str | os.PathLike, top: int = 50,
                 reviewer: str | None = None, display_size: int = 224) -> ReviewPanel:
    """The review panel for an audit of ``data_dir``; decisions go to ``out_dir``.

    Args:
        result: from ``audit.audit``; its labels file is the one reviewed.
        data_dir: the audited folder (its ``images/`` are shown).
        out_dir: where ``labels.reviewed.txt`` and ``review_log.jsonl`` are written.
        top: suspects offered.
        reviewer: recorded in the log (default: the login name).
    """
    review = LabelReview(result.settings["labels"], out_dir, reviewer)
    return ReviewPanel(result, review, Path(data_dir) / "images", top, display_size)
