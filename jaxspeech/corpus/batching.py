"""Fixed shapes from a corpus of unequal clips: windows, buckets, padded rows, and back.

Every distinct input shape is one more compilation, so a corpus run uses few:

- **Whisper** sees a 30 s window (``2 * max_source_positions`` frames of 10 ms). Every row
  is zero-padded to it, as Whisper itself pads: one shape. Longer audio is cut into
  consecutive 30 s windows, each explained on its own.
- **CLAP** sees a 10 s window (its front end repeat-pads shorter clips). Rows are padded
  to 10 s and their true lengths passed (``lengths``), so the front end pads each clip from
  its own samples: one shape. Longer audio is cut into 10 s windows, like Whisper.
- **ECAPA** takes any length with a mask: each clip is padded up to the next *bucket*
  (1, 2, 4, 8, 16, 32 s, doubling beyond) with its relative length passed, so the model
  masks the padding (SpeechBrain's convention) and an item's result does not depend on
  the bucket. A few shapes, at most 2x padding. No windows unless asked for.

Stitching: the relevance of window ``k`` covers samples ``[k W, (k+1) W)``. A window that
is followed by another keeps its first ``W / hop`` frames (they tile the audio exactly);
the last window keeps the frames of its own samples: those centred inside the clip
(``ceil(n / hop)``) for Whisper and CLAP, the frames the mask keeps (``1 + n // hop``) for
ECAPA. Kept frames are laid end to end along time. Relevance that fell on frames of
padding (Whisper's zeros, CLAP's repeats, ECAPA's masked frames, where it is zero) is not
dropped silently: its total is reported per item as ``relevance_outside``, and the total of
its magnitude as ``relevance_outside_abs`` (sum of ``|R|`` over the padding's features; over
its per-frame sums when only frames are kept), so a reader can say what share of ``|R|``
the padding took. The item's
``score`` is the mean of its windows' scores (each window is a separate forward pass);
all of them are kept as ``window_scores``.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import numpy as np

__all__ = ["Layout", "layout_for", "bucket_width", "split_windows", "Row", "Batch", "Batcher",
           "kept_frames", "take_row", "stitch"]

DEFAULT_BUCKET_SECONDS = (1.0, 2.0, 4.0, 8.0, 16.0, 32.0)


@dataclasses.dataclass(frozen=True)
class Layout:
    """How one model's clips become rows and its relevance comes back.

    ``window``: samples per analysis window (``None``: whole clips); ``buckets``: padded
    widths in samples, ascending (doubling beyond the last); ``lengths``: pass relative
    lengths to the front end (masks); ``time_axis``: time in one item's features (batch
    axis removed); ``frames_rule``: ``"centre"`` (``ceil(n / hop)`` frames of ``n`` samples)
    or ``"mask"`` (``1 + n // hop``, ECAPA's valid frames).
    """

    family: str
    sample_rate: int
    hop: int
    window: int | None
    buckets: tuple[int, ...]
    min_samples: int
    lengths: bool
    time_axis: int
    frames_rule: str

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def layout_for(model, *, window_seconds: float | None = None,
               bucket_seconds: Sequence[float] | None = None) -> Layout:
    """The :class:`Layout` of ``model``'s family. ``window_seconds`` overrides the window
    (ECAPA: chunk long clips; Whisper / CLAP: at most their own window); ``bucket_seconds``
    the ECAPA buckets."""
    kind, cfg, rate = model.kind, model.config, model.sample_rate
    hop = int(model.family.hop_length(cfg))
    spec_ndim = len(model.family.example_features(cfg, 1)[0].shape) - 1
    time_axis = model.family.time_axis % (spec_ndim + 1) - 1

    def to_samples(seconds: float) -> int:  # whole hops, so windows tile the frames exactly
        return max(hop, int(round(seconds * rate / hop)) * hop)

    if kind in ("whisper", "clap"):
        if kind == "whisper":
            native = cfg.n_frames * hop
        else:
            from jaxspeech.frontends import clap as clap_frontend

            native = clap_frontend.MAX_SAMPLES
        window = native if window_seconds is None else min(native, to_samples(window_seconds))
        return Layout(kind, rate, hop, window, (native,), 1, kind == "clap", time_axis, "centre")
    if kind == "ecapa":
        seconds = DEFAULT_BUCKET_SECONDS if bucket_seconds is None else tuple(sorted(bucket_seconds))
        buckets = tuple(sorted({to_samples(s) for s in seconds}))
        window = None if window_seconds is None else to_samples(window_seconds)
        if window is not None:  # a full window fills a bucket exactly
            buckets = tuple(sorted({b for b in buckets if b < window} | {window}))
        min_samples = (cfg.min_frames - 1) * hop
        return Layout(kind, rate, hop, window, buckets, min_samples, True, time_axis, "mask")
    raise ValueError(f"no corpus layout for model family {kind!r}")


def bucket_width(n: int, buckets: Sequence[int]) -> int:
    """The smallest bucket holding ``n`` samples; past the last, the last doubled as often
    as needed."""
    for b in buckets:
        if n <= b:
            return int(b)
    b = int(buckets[-1])
    while b < n:
        b *= 2
    return b


def split_windows(wave: np.ndarray, window: int | None, min_samples: int = 1) -> list[np.ndarray]:
    """``[samples]`` -> consecutive windows of ``window`` samples, the last shorter. A last
    piece under ``min_samples`` is joined to the window before it (it could not be
    explained alone)."""
    n = wave.shape[0]
    if window is None or n <= window:
        return [wave]
    parts = [wave[i:i + window] for i in range(0, n, window)]
    if len(parts) > 1 and parts[-1].shape[0] < min_samples:
        parts[-2:] = [np.concatenate(parts[-2:])]
    return parts


@dataclasses.dataclass
class Row:
    """One window of one item: ``wave [n_samples]``; ``key`` numbers the item in this run,
    ``fields`` are the item's (what a per-item target reads)."""

    key: int
    window: int
    n_windows: int
    wave: np.ndarray
    fields: dict = dataclasses.field(default_factory=dict)

    @property
    def n_samples(self) -> int:
        return int(self.wave.shape[0])


@dataclasses.dataclass
class Batch:
    """``wave [B, width]`` zero-padded rows, ``lengths [B]`` relative lengths; ``rows`` are the
    real rows (the first ``len(rows)``); the rest repeat row 0 so every batch has ``B`` rows
    (one compiled shape) with valid audio (no special case for empty rows)."""

    wave: np.ndarray
    lengths: np.ndarray
    rows: list[Row]

    @property
    def width(self) -> int:
        return int(self.wave.shape[1])


def _pack(rows: list[Row], width: int, batch_size: int) -> Batch:
    wave = np.zeros((batch_size, width), np.float32)
    lengths = np.ones(batch_size, np.float32)
    for i in range(batch_size):
        r = rows[i] if i < len(rows) else rows[0]
        wave[i, : r.n_samples] = r.wave
        lengths[i] = r.n_samples / width
    return Batch(wave, lengths, list(rows))


class Batcher:
    """Collects rows per bucket and hands out full batches (:meth:`add`), then the partial
    ones at the end (:meth:`flush`). Which bucket a row goes to depends on its own length
    only, so a row is computed in the same shape however the corpus is split."""

    def __init__(self, layout: Layout, batch_size: int):
        self.layout, self.batch_size = layout, int(batch_size)
        self._open: dict[int, list[Row]] = {}

    def width_of(self, n_samples: int) -> int:
        return bucket_width(n_samples, self.layout.buckets)

    def add(self, rows: Sequence[Row]) -> list[Batch]:
        out = []
        for row in rows:
            width = self.width_of(row.n_samples)
            group = self._open.setdefault(width, [])
            group.append(row)
            if len(group) == self.batch_size:
                out.append(_pack(group, width, self.batch_size))
                del self._open[width]
        return out

    def flush(self) -> list[Batch]:
        out = [_pack(g, w, self.batch_size) for w, g in sorted(self._open.items()) if g]
        self._open.clear()
        return out


def kept_frames(layout: Layout, n_samples: int, is_last: bool, total: int) -> int:
    """Frames of a row's relevance that belong to its audio (module docs), of ``total``."""
    if not is_last:
        return min(total, layout.window // layout.hop)
    if layout.frames_rule == "mask":
        return min(total, 1 + n_samples // layout.hop)
    return min(total, math.ceil(n_samples / layout.hop))


def take_row(layout: Layout, relevance: np.ndarray | None, frames: np.ndarray,
             row: Row) -> tuple[np.ndarray | None, np.ndarray, float, float]:
    """One row's share: ``(relevance [kept, ...] time-major or None, frames [kept], outside,
    outside_abs)``: the relevance on the padding's frames, summed, and its ``|R|`` summed.

    ``relevance``: the row's relevance in the features' layout (``None`` when only frames
    are kept); ``frames [T]``: it summed over all but time."""
    keep = kept_frames(layout, row.n_samples, row.window == row.n_windows - 1, frames.shape[0])
    outside = float(frames[keep:].sum(dtype=np.float64))
    rel, outside_abs = None, float(np.abs(frames[keep:]).sum(dtype=np.float64))
    if relevance is not None:
        time_major = np.moveaxis(relevance, layout.time_axis, 0)
        rel = time_major[:keep]
        outside_abs = float(np.abs(time_major[keep:]).sum(dtype=np.float64))
    return rel, frames[:keep], outside, outside_abs


def stitch(parts: Sequence[np.ndarray]) -> np.ndarray:
    """Windows' kept relevance (time-major) laid end to end along time."""
    return parts[0] if len(parts) == 1 else np.concatenate(parts, axis=0)
