"""One picture per clip of what Whisper wrote and where each word's evidence lies.

    fig = transcript_figure("clip.png", tr, 0, features=x[0], wave=wave, spans=spans)

Top: the clip's log-mel (cropped to the clip) with the words' time spans (word timestamps
or known spans) as brackets under it. Below: one row per word, its relevance over time
(summed over the mel bins; red supports the word, blue speaks against it) on a symmetric
scale clipped at the 99th percentile of |R|, each row's own span outlined. On the right,
each word's log-probability and the share of its |R| that reached the audio (not the text
prefix). Per-word spectrogram heatmaps use :func:`jaxspeech.attribution.plot.heatmap`.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from jaxspeech.attribution.plot import _robust_bound

__all__ = ["transcript_figure", "word_rows"]

FRAME_S = 0.01  # Whisper's 10 ms log-mel frames


def word_rows(tr, b: int, words=None) -> tuple[list[str], np.ndarray, np.ndarray, np.ndarray]:
    """``(words, relevance over frames [words, clip frames], log p [words], audio share
    [words])`` of item ``b``: each word's tokens summed. ``words``: ``(word, token indices)``
    pairs to use instead of ``tr.words[b]`` (word timestamps merge punctuation)."""
    frames = tr.frames()[b][:, : int(tr.num_frames[b])]
    score = np.asarray(tr.score[b])
    audio = tr.shares["clip"][b] + tr.shares["padding"][b]
    names, rows, logp, share = [], [], [], []
    for word, idx in (tr.words[b] if words is None else words):
        idx = list(idx)
        names.append(word.strip())
        rows.append(frames[idx].sum(axis=0))
        logp.append(score[idx].sum())
        share.append(float(np.mean(audio[idx])))
    return names, np.asarray(rows), np.asarray(logp), np.asarray(share)


def transcript_figure(path: str | None, tr, b: int, *, features: np.ndarray,
                      wave: np.ndarray | None = None, sample_rate: int = 16000,
                      spans: Sequence[tuple[float, float, str]] | None = None, title: str = "",
                      percentile: float = 99.0, words=None):
    """The figure for item ``b`` of a :class:`~jaxspeech.attribution.transcript.TranscriptAttribution`;
    ``features [n_mels, 3000]`` its log-mel; ``spans`` ``(start_s, end_s, word)`` per word, in
    the transcript's word order (word timestamps, or a clip's known spans). Writes a PNG when
    ``path`` is given; returns the ``matplotlib`` ``Figure``. ``words``: as :func:`word_rows`."""
    from matplotlib.figure import Figure
    from matplotlib.patches import Rectangle

    names, rows, logp, share = word_rows(tr, b, words)
    n_frames = rows.shape[1] if rows.size else int(tr.num_frames[b])
    seconds = n_frames * FRAME_S
    spec = np.asarray(features)[:, :n_frames]
    bound = _robust_bound(rows, percentile) if rows.size else 1.0
    height = 2.4 + 0.32 * max(len(names), 1)
    fig = Figure(figsize=(11, height))
    grid = fig.add_gridspec(2, 3, height_ratios=[1.6, 0.32 * max(len(names), 1) + 0.4],
                            width_ratios=[1, 0.018, 0.2], hspace=0.35, wspace=0.06)
    ax_spec = fig.add_subplot(grid[0, 0])
    ax_rows = fig.add_subplot(grid[1, 0], sharex=ax_spec)
    ax_spec.imshow(spec, origin="lower", aspect="auto", cmap="magma",
                   extent=(0, seconds, 0, spec.shape[0]), interpolation="nearest")
    ax_spec.set_ylabel("mel bin", fontsize=8)
    shares = f"audio {np.nanmean(tr.shares['clip'][b]):.0%}, padding " \
             f"{np.nanmean(tr.shares['padding'][b]):.0%}, text prefix " \
             f"{np.nanmean(tr.shares['prefix'][b]):.0%} of |R| (mean over tokens)"
    ax_spec.set_title(f"{title}\n{shares}" if title else shares, fontsize=9, loc="left")
    if wave is not None:  # the waveform over the spectrogram, scaled into its top bins
        w = np.asarray(wave)[: int(round(seconds * sample_rate))]
        peak = float(np.abs(w).max()) or 1.0
        top = spec.shape[0]
        ax_spec.plot(np.arange(len(w)) / sample_rate, top * (0.85 + 0.12 * w / peak),
                     color="white", lw=0.3, alpha=0.8)
    for i, (start, end, label) in enumerate(spans or ()):
        if start >= seconds:
            continue
        end = min(end, seconds)
        ax_spec.plot([start, start, end, end], [-2, -5, -5, -2], color="black", lw=0.8,
                     clip_on=False)
        ax_spec.text((start + end) / 2, -6, label.strip(), ha="center", va="top", fontsize=7)
        if i < len(names):
            ax_rows.add_patch(Rectangle((start, i - 0.5), end - start, 1.0, fill=False, lw=1.0,
                                        edgecolor="black"))
    image = ax_rows.imshow(rows if rows.size else np.zeros((1, n_frames)), aspect="auto",
                           cmap="RdBu_r", vmin=-bound, vmax=bound, interpolation="nearest",
                           extent=(0, seconds, max(len(names), 1) - 0.5, -0.5))
    ax_rows.set_yticks(range(len(names)), names, fontsize=8)
    ax_rows.set_xlabel("time (s)", fontsize=8)
    ax_rows.tick_params(labelsize=7)
    ax_spec.tick_params(labelsize=7, labelbottom=False, bottom=False)
    ax_spec.set_xlim(0, seconds)
    bar = fig.colorbar(image, cax=fig.add_subplot(grid[1, 1]), extend="both")
    from jaxspeech.attribution.transcript import ENCODER_FRAME_METHODS

    units = f"{tr.method} map" if tr.method in ENCODER_FRAME_METHODS else "relevance (target units)"
    bar.set_label(f"{units},\nsummed over mel bins; clipped at the\n"
                  f"{percentile:g}th percentile of |R|", fontsize=6)
    bar.ax.tick_params(labelsize=7)
    fig.add_subplot(grid[0, 1]).axis("off")
    fig.add_subplot(grid[0, 2]).axis("off")
    side = fig.add_subplot(grid[1, 2], sharey=ax_rows)
    side.axis("off")
    side.text(0.45, -0.6, "log p   audio", fontsize=7, va="bottom", family="monospace")
    for i, (lp, sh) in enumerate(zip(logp, share, strict=True)):
        side.text(0.45, i, f"{lp:5.2f}   {sh:4.0%}", fontsize=7, va="center", family="monospace")
    fig.subplots_adjust(left=0.08, right=0.99, top=0.88, bottom=0.08)
    if path is not None:
        fig.savefig(path, dpi=110)
    return fig
