"""Heatmaps: the waveform above the spectrogram, relevance laid over it."""

from __future__ import annotations

import numpy as np


def spectrogram_view(array: np.ndarray, time_axis: int) -> np.ndarray:
    """One item's features or relevance -> ``[freq, time]`` (first channel of CLAP's stack)."""
    array = np.moveaxis(np.asarray(array), time_axis - 1 if time_axis > 0 else time_axis, -1)
    while array.ndim > 2:
        array = array[0]
    return array


def heatmap(path: str | None, wave: np.ndarray | None, features: np.ndarray, relevance: np.ndarray,
            *, time_axis: int, sample_rate: int, hop_length: int, title: str = "",
            seconds: float | None = None):
    """Waveform (top), features in grey with signed relevance in red/blue (bottom);
    returns the ``matplotlib`` ``Figure`` (shown inline in a notebook) and writes it as a
    PNG when ``path`` is given. ``features``/``relevance`` are one item's arrays in the
    model's layout; ``time_axis`` is their time axis counted with the batch axis.
    ``seconds`` crops the view (e.g. a 3 s clip inside Whisper's 30 s window)."""
    from matplotlib.figure import Figure  # no pyplot: leaves the caller's backend alone

    spec = spectrogram_view(features, time_axis)
    rel = spectrogram_view(relevance, time_axis)
    window = spec.shape[-1] * hop_length / sample_rate
    shown = window if seconds is None else min(seconds, window)
    fig = Figure(figsize=(10, 5))
    axes = fig.subplots(2, 1, sharex=True, gridspec_kw={"height_ratios": [1, 3]})
    if wave is not None:
        t = np.arange(wave.shape[-1]) / sample_rate
        axes[0].plot(t, wave, lw=0.5, color="black")
    axes[0].set_ylabel("waveform")
    axes[0].set_title(title, fontsize=9)
    extent = (0, window, 0, spec.shape[0])
    axes[1].imshow(spec, origin="lower", aspect="auto", cmap="gray", extent=extent)
    visible = rel[..., : max(1, int(round(rel.shape[-1] * shown / window)))]
    bound = float(np.abs(visible).max()) or 1.0
    axes[1].imshow(rel, origin="lower", aspect="auto", cmap="bwr", vmin=-bound, vmax=bound,
                   alpha=0.6, extent=extent)
    axes[1].set_ylabel("mel bin")
    axes[1].set_xlabel("time (s)")
    axes[1].set_xlim(0, shown)
    fig.tight_layout()
    if path is not None:
        fig.savefig(path, dpi=110)
    return fig
