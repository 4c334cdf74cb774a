"""TensorBoard event files of one training: the per-epoch row of ``log.jsonl`` as scalars, the val confusion
matrix of the selected epoch as an image at the end.

The trainer writes them into its work folder (``models/.work-<name>/tb/``), so TensorBoard pointed at
``<run>/models`` shows a training while it runs; ``_write_model`` copies the finished folder into
``models/<name>/tb/`` before the model folder is sealed (``data/integrity.py``), so the event files are part
of the model folder's record like its checkpoint. A resumed training writes a new event file that starts with
a session-start event at the first epoch it replays (what ``SummaryWriter(purge_step=...)`` writes):
TensorBoard drops what an interrupted attempt wrote past the saved state, and the curve has each epoch once.
Only rank 0 of a DDP job writes.

The events are written here, synchronously, in TensorBoard's own format (TFRecord framing with masked
CRC-32C around ``tensorflow.Event`` protocol buffers: wall_time, step, file_version, summary, session_log;
scalars as ``simple_value``, the image as a PNG): no thread, no import of ``tensorboard`` or ``protobuf`` in
training, one ``write`` + ``flush`` per epoch. ``torch.utils.tensorboard.SummaryWriter`` was the first
version: its writer thread cost 7-18 ms per epoch of the default digits run on a busy 2-core machine (a
340-1500 ms epoch) and its import 0.6-3 s per process (bench/results/tracking_overhead.md). Reading needs the
``tensorboard`` package (``pip install tensorboard`` or ``tailforge[track]``); tests read the files with its
``EventAccumulator``.
"""
from __future__ import annotations

import io
import logging
import os
import socket
import struct
import time
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


# ----------------------------------------------------------------------------- the file format
def _crc32c_table() -> list[int]:
    table = []
    for n in range(256):
        c = n
        for _ in range(8):
            c = (c >> 1) ^ 0x82F63B78 if c & 1 else c >> 1
        table.append(c)
    return table


_CRC_TABLE = _crc32c_table()


def crc32c(data: bytes) -> int:
    """CRC-32C (Castagnoli), the checksum of TFRecord files."""
    c = 0xFFFFFFFF
    table = _CRC_TABLE
    for b in data:
        c = table[(c ^ b) & 0xFF] ^ (c >> 8)
    return c ^ 0xFFFFFFFF


def _masked(data: bytes) -> bytes:
    c = crc32c(data)
    return struct.pack("<I", (((c >> 15) | (c << 17)) + 0xA282EAD8) & 0xFFFFFFFF)


def record(data: bytes) -> bytes:
    """One TFRecord: length, masked CRC of the length, the bytes, masked CRC of the bytes."""
    n = struct.pack("<Q", len(data))
    return n + _masked(n) + data + _masked(data)


def _varint(n: int) -> bytes:
    n &= (1 << 64) - 1  # negative int64 as two's complement, as protobuf does
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def _int(field: int, n: int) -> bytes:
    return _varint(field << 3) + _varint(n)


def _bytes(field: int, data: bytes | str) -> bytes:
    data = data.encode() if isinstance(data, str) else data
    return _varint(field << 3 | 2) + _varint(len(data)) + data


def _float(field: int, v: float) -> bytes:
    return _varint(field << 3 | 5) + struct.pack("<f", v)


def _double(field: int, v: float) -> bytes:
    return _varint(field << 3 | 1) + struct.pack("<d", v)


def event(step: int | None = None, *, summary: bytes | None = None, file_version: str | None = None,
          session_start: bool = False, wall_time: float | None = None) -> bytes:
    """A serialized ``Event`` (wall_time 1, step 2, file_version 3, summary 5, session_log 7)."""
    out = _double(1, time.time() if wall_time is None else wall_time)
    if step:
        out += _int(2, step)
    if file_version is not None:
        out += _bytes(3, file_version)
    if summary is not None:
        out += _bytes(5, summary)
    if session_start:
        out += _bytes(7, _int(1, 1))  # SessionLog{status: START}
    return out


def scalar_value(tag: str, v: float) -> bytes:
    """A ``Summary.Value`` (tag 1, simple_value 2)."""
    return _bytes(1, _bytes(1, tag) + _float(2, v))


def image_value(tag: str, png: bytes, height: int, width: int, channels: int = 3) -> bytes:
    """A ``Summary.Value`` with an ``Image`` (height 1, width 2, colorspace 3, encoded_image_string 4)."""
    img = _int(1, height) + _int(2, width) + _int(3, channels) + _bytes(4, png)
    return _bytes(1, _bytes(1, tag) + _bytes(4, img))


def text_value(tag: str, text: str) -> bytes:
    """A ``Summary.Value`` for the text plugin: metadata 9 {plugin_data {plugin_name "text"}}, tensor 8 (a DT_STRING
    scalar: dtype 1 = 7, an empty tensor_shape 2, string_val 8)."""
    meta = _bytes(1, _bytes(1, "text"))
    tensor = _int(1, 7) + _bytes(2, b"") + _bytes(8, text)
    return _bytes(1, _bytes(1, tag) + _bytes(9, meta) + _bytes(8, tensor))


class EventWriter:
    """Appends events to one new ``events.out.tfevents.*`` file in ``folder`` (the name TensorBoard looks for)."""

    _seq = 0

    def __init__(self, folder: Path, purge_step: int | None = None):
        folder.mkdir(parents=True, exist_ok=True)
        EventWriter._seq += 1
        name = f"events.out.tfevents.{time.time():.6f}.{socket.gethostname()}.{os.getpid()}.{EventWriter._seq}"
        self.path = folder / name
        self._fh = open(self.path, "ab")
        self._write(event(file_version="brain.Event:2"))
        if purge_step is not None:  # TensorBoard drops earlier files' events from this step on
            self._write(event(purge_step, session_start=True))
        self.flush()

    def _write(self, data: bytes) -> None:
        self._fh.write(record(data))

    def add(self, step: int, values: list[bytes]) -> None:
        """One event at ``step`` holding the ``Summary.Value``s ``values`` (e.g. ``scalar_value``)."""
        if values:
            self._write(event(step, summary=b"".join(values)))

    def flush(self) -> None:
        self._fh.flush()

    def close(self) -> None:
        if not self._fh.closed:
            self._fh.close()


def open_writer(folder: Path, first_epoch: int = 1) -> EventWriter:
    """The event writer of a training in ``folder`` (steps are epochs, 1-based); ``first_epoch`` > 1 (a resumed
    training): events of that epoch and later from an earlier attempt are dropped by TensorBoard."""
    return EventWriter(folder, purge_step=first_epoch if first_epoch > 1 else None)


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


def write_epoch(writer: EventWriter, rec: dict) -> None:
    """One ``log.jsonl`` row as scalars at step ``rec["epoch"]``, flushed (a watching TensorBoard sees it)."""
    values = [scalar_value(tag, float(rec[key])) for key, tag in SCALARS.items()
              if isinstance(rec.get(key), (int, float)) and not isinstance(rec.get(key), bool)]
    writer.add(rec["epoch"], values)
    writer.flush()


def write_confusion(writer, y: np.ndarray, pred: np.ndarray, class_names: list[str], train_counts, epoch: int) -> None:
    """The row-normalised val confusion matrix of the selected ``epoch`` as an image (``val/confusion_matrix``:
    rows true, columns predicted, white 0 to dark blue 1) and its class order as text.

    Classes are ordered from most to least frequent in train; past ``MAX_CLASSES_SHOWN`` classes only the
    rarest are shown (their rows still normalised by every val image of the class). Drawn with numpy, not
    matplotlib: a figure took ~0.5 s, more than an epoch of the default run."""
    from PIL import Image

    try:
        img, order = confusion_image(y, pred, train_counts)
        buf = io.BytesIO()
        Image.fromarray(img).save(buf, format="PNG")
    except Exception as exc:  # a picture is a bonus: never lose a finished training to it
        log.warning("TensorBoard confusion matrix skipped: %s", exc)
        return
    shown = "the rarest " if len(order) < len(train_counts) else ""
    text = (f"epoch {epoch} (selected on val); {shown}{len(order)} of {len(train_counts)} classes, head to tail: "
            + ", ".join(str(class_names[i]) for i in order))
    writer.add(epoch, [image_value("val/confusion_matrix", buf.getvalue(), img.shape[0], img.shape[1]),
                       text_value("val/confusion_matrix_classes", text)])
    writer.flush()


def confusion_image(y, pred, train_counts, side: int = 320) -> tuple[np.ndarray, np.ndarray]:
    """(an RGB uint8 image of about ``side`` pixels, the class order shown) for true ``y`` and ``pred``."""
    y, pred = np.asarray(y, dtype=np.int64), np.asarray(pred, dtype=np.int64)
    order = np.argsort(-np.asarray(train_counts), kind="stable")
    if len(order) > MAX_CLASSES_SHOWN:
        order = order[-MAX_CLASSES_SHOWN:]
    pos = np.full(len(train_counts), -1, dtype=np.int64)
    pos[order] = np.arange(len(order))
    c = len(order)
    keep = pos[y] >= 0
    totals = np.bincount(pos[y[keep]], minlength=c).astype(np.float64)
    both = keep & (pos[pred] >= 0)
    m = np.bincount(pos[y[both]] * c + pos[pred[both]], minlength=c * c).reshape(c, c) / np.maximum(totals, 1)[:, None]
    white, blue = np.array([247.0, 251.0, 255.0]), np.array([8.0, 48.0, 107.0])
    rgb = (white + np.clip(m, 0, 1)[..., None] * (blue - white)).round().astype(np.uint8)
    k = max(1, side // c)
    return np.repeat(np.repeat(rgb, k, axis=0), k, axis=1), order
