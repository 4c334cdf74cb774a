"""TensorBoard event files of one training: the per-epoch row of ``log.jsonl`` as scalars, the val confusion
matrix of the selected epoch as an image at the end.

The trainer writes them into its work folder (``models/.work-<name>/tb/``), so TensorBoard pointed at
``<run>/models`` shows a training while it runs; ``_write_model`` copies the finished folder into
``models/<name>/tb/`` before the model folder is sealed (``data/integrity.py``), so the event files are part
of the model folder's record like its checkpoint. A resumed training opens the writer with
``purge_step`` = the first epoch it replays: TensorBoard drops what an interrupted attempt wrote past the
saved state, and the curve has each epoch once.

Soft dependency: ``torch.utils.tensorboard`` needs the ``tensorboard`` package. Without it training runs as
before and one warning per process says how to get the curves. Only rank 0 of a DDP job writes.
"""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

log = logging.getLogger("tailforge")
FOLDER = "tb"  # models/<name>/tb/
MAX_CLASSES_SHOWN = 64  # the confusion image: past this many classes, the rarest in train
SCALARS = {  # log.jsonl key -> TensorBoard tag
    "train_loss": "train/loss", "lr": "train/lr", "backbone_lr": "train/backbone_lr", "phase": "train/phase",
    "images_per_s": "train/images_per_s", "time_s": "train/epoch_seconds",
    "val_balanced_acc": "val/balanced_acc", "val_top1": "val/top1",
}
_warned = False


def open_writer(folder: Path, first_epoch: int = 1):
    """A ``SummaryWriter`` on ``folder`` (steps are epochs, 1-based), or None when ``tensorboard`` is missing.

    ``first_epoch`` > 1 (a resumed training): events of that epoch and later from an earlier attempt are purged.
    """
    global _warned
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        if not _warned:
            log.warning("tensorboard is not installed: no TensorBoard curves (pip install tensorboard; "
                        "train.tensorboard: false silences this)")
            _warned = True
        return None
    folder.mkdir(parents=True, exist_ok=True)
    return SummaryWriter(str(folder), purge_step=first_epoch if first_epoch > 1 else None)


class Curves:
    """Holds the training's writer so that ``fit`` closes it whatever happens (``open`` returns the writer)."""

    def __init__(self):
        self.writer = None

    def open(self, folder: Path, first_epoch: int = 1):
        self.writer = open_writer(folder, first_epoch)
        return self.writer

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None


def write_epoch(writer, rec: dict) -> None:
    """One ``log.jsonl`` row as scalars at step ``rec["epoch"]``; flushed so a watching TensorBoard sees it."""
    for key, tag in SCALARS.items():
        v = rec.get(key)
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            writer.add_scalar(tag, float(v), rec["epoch"])
    writer.flush()


def write_confusion(writer, y: np.ndarray, pred: np.ndarray, class_names: list[str], train_counts, epoch: int) -> None:
    """The row-normalised val confusion matrix of the selected ``epoch`` as an image (``val/confusion_matrix``).

    Classes are ordered from most to least frequent in train; past ``MAX_CLASSES_SHOWN`` classes only the
    rarest are shown (their rows still normalised by every val image of the class)."""
    try:
        img = _confusion_image(y, pred, class_names, train_counts, epoch)
    except Exception as exc:  # a picture is a bonus: never lose a finished training to it
        log.warning("TensorBoard confusion matrix skipped: %s", exc)
        return
    writer.add_image("val/confusion_matrix", img, epoch, dataformats="HWC")
    writer.flush()


def _confusion_image(y, pred, class_names, train_counts, epoch: int) -> np.ndarray:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    y, pred = np.asarray(y, dtype=np.int64), np.asarray(pred, dtype=np.int64)
    order = np.argsort(-np.asarray(train_counts), kind="stable")
    title = f"val confusion matrix, epoch {epoch} (selected)"
    if len(order) > MAX_CLASSES_SHOWN:
        order = order[-MAX_CLASSES_SHOWN:]
        title += f", the {MAX_CLASSES_SHOWN} rarest classes of {len(train_counts)}"
    pos = np.full(len(train_counts), -1, dtype=np.int64)
    pos[order] = np.arange(len(order))
    c = len(order)
    keep = pos[y] >= 0
    totals = np.bincount(pos[y[keep]], minlength=c).astype(np.float64)
    both = keep & (pos[pred] >= 0)
    m = np.bincount(pos[y[both]] * c + pos[pred[both]], minlength=c * c).reshape(c, c) / np.maximum(totals, 1)[:, None]
    side = min(10.0, 3 + 0.2 * c)
    fig = Figure(figsize=(side + 1, side), dpi=80)
    canvas = FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    im = ax.imshow(m, cmap="Blues", vmin=0, vmax=1)
    fig.colorbar(im, ax=ax, fraction=0.046)
    if c <= 30:
        names = [str(class_names[i])[:16] for i in order]
        ax.set_xticks(range(c), names, rotation=60, ha="right", fontsize=7)
        ax.set_yticks(range(c), names, fontsize=7)
    ax.set_xlabel("predicted (head -> tail)")
    ax.set_ylabel("true (head -> tail)")
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    canvas.draw()
    return np.asarray(canvas.buffer_rgba())[..., :3].copy()
