"""Heatmaps: the waveform, the features, and the relevance over the clip's own frames.

    fig = heatmap("a.png", wave, features, relevance, time_axis=m.family.time_axis,
                  sample_rate=m.sample_rate, hop_length=m.family.hop_length(m.config),
                  title="a.wav: attnlrp, target output-norm", seconds=len(wave) / m.sample_rate,
                  spans=[(0.31, 0.62, "quick")], boxes=[(1.2, 1.4, 20, 32)])

Three panels share the time axis: the waveform; the features (log-mel or filterbank, as
the model sees them); the signed relevance (red positive, blue negative) on a symmetric
scale clipped at the 99th percentile of ``|R|``, so that one extreme feature does not turn
the rest white, with a colour bar in the target's units. Known evidence is drawn when
given: ``boxes`` as rectangles on the features and the relevance, word ``spans`` as
labelled brackets under the time axis. Padding (Whisper's 30 s window, CLAP's repeats) is
not drawn; the share of ``|R|`` that fell on it is written in the title.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

__all__ = ["heatmap", "spectrogram_view", "padding_share", "UNITS"]

UNITS = "relevance per feature (target units)"


def spectrogram_view(array: np.ndarray, time_axis: int) -> np.ndarray:
    """One item's features or relevance -> ``[freq, time]`` (first channel of CLAP's stack)."""
    array = np.moveaxis(np.asarray(array), time_axis - 1 if time_axis > 0 else time_axis, -1)
    while array.ndim > 2:
        array = array[0]
    return array


def padding_share(relevance: np.ndarray, outside_abs: float | None) -> float | None:
    """The share of ``|R|`` that fell on padding: ``outside_abs / (outside_abs + sum |R|)``
    for ``relevance`` over the clip and ``outside_abs`` the sum of ``|R|`` over the padding
    (a corpus store's ``relevance_outside_abs``); ``None`` when unknown or all zero."""
    if outside_abs is None or not np.isfinite(outside_abs):
        return None
    total = float(outside_abs) + float(np.abs(relevance).sum(dtype=np.float64))
    return float(outside_abs) / total if total > 0 else None


def _robust_bound(rel: np.ndarray, percentile: float) -> float:
    """The colour scale's half-width: the ``percentile`` of ``|R|``, else its max, else 1."""
    mag = np.abs(rel[np.isfinite(rel)])
    if mag.size == 0:
        return 1.0
    bound = float(np.percentile(mag, percentile))
    return bound if bound > 0 else (float(mag.max()) or 1.0)


def _share_text(share: float) -> str:
    pct = 100 * share
    return f"{pct:.0f} %" if pct >= 10 else f"{pct:.2g} %"


def heatmap(path: str | None, wave: np.ndarray | None, features: np.ndarray, relevance: np.ndarray,
            *, time_axis: int, sample_rate: int, hop_length: int, title: str = "",
            seconds: float | None = None,
            spans: Sequence[tuple[float, float, str]] | None = None,
            boxes: Sequence[tuple[float, float, float, float]] | None = None,
            outside: float | None = None, units: str = UNITS, percentile: float = 99.0):
    """Waveform, features and relevance of one item; returns the ``matplotlib`` ``Figure``
    (shown inline in a notebook) and writes it as a PNG when ``path`` is given.

    ``features`` / ``relevance``: one item's arrays in the model's layout (Whisper
    ``[mels, T]``, ECAPA ``[T, mels]``, CLAP ``[channels, T, mels]``: channel 0 is shown);
    ``time_axis`` is their time axis counted with the batch axis (``model.family.time_axis``);
    frame ``t`` starts at ``t * hop_length / sample_rate`` seconds. ``seconds`` crops the view
    to the clip when the arrays hold padding after it (a 3 s clip in Whisper's 30 s window);
    the share of ``|R|`` on the cropped frames then goes into the title, unless ``outside``
    (that share, in [0, 1], for arrays already cropped) is given. ``spans``: ``(start_s,
    end_s, label)`` brackets under the time axis (words); ``boxes``: ``(t0_s, t1_s, bin0,
    bin1)`` rectangles (planted evidence; bins of the features' frequency axis, ``bin1``
    exclusive). ``percentile``: the colour scale's clipping point of ``|R|``."""
    from matplotlib.figure import Figure  # no pyplot: leaves the caller's backend alone
    from matplotlib.patches import Rectangle
    from matplotlib.ticker import FuncFormatter

    compact = FuncFormatter(lambda v, _: f"{v:.2g}")  # no offset text over the colour bar

    spec = spectrogram_view(features, time_axis)
    rel = spectrogram_view(relevance, time_axis)
    if spec.shape != rel.shape:
        raise ValueError(f"features {spec.shape} and relevance {rel.shape} differ in shape")
    frame_s = hop_length / sample_rate
    n_frames = rel.shape[-1]
    if seconds is not None:
        n_frames = max(1, min(n_frames, int(np.ceil(seconds / frame_s - 1e-9))))
        if outside is None and n_frames < rel.shape[-1]:
            outside = padding_share(rel[:, :n_frames], float(np.abs(rel[:, n_frames:]).sum()))
    spec, rel = spec[:, :n_frames], rel[:, :n_frames]
    shown = n_frames * frame_s
    bound = _robust_bound(rel, percentile)

    if outside is not None:
        title = f"{title}\npadding (not shown): {_share_text(outside)} of |R| fell outside the clip"
    rows = [1.0, 2.0, 2.6] + ([0.45] if spans else [])
    fig = Figure(figsize=(11, 6.3 if spans else 6))
    grid = fig.add_gridspec(len(rows), 2, height_ratios=rows, width_ratios=[1, 0.018],
                            hspace=0.12, wspace=0.02)
    if spans:  # room for the time axis' labels above the brackets
        grid.update(hspace=0.3)
    ax_wave = fig.add_subplot(grid[0, 0])
    ax_feat = fig.add_subplot(grid[1, 0], sharex=ax_wave)
    ax_rel = fig.add_subplot(grid[2, 0], sharex=ax_wave)
    ax_wave.set_title(title, fontsize=9, loc="left")
    if wave is not None:
        wave = np.asarray(wave)[: int(round(shown * sample_rate))]
        ax_wave.plot(np.arange(wave.shape[-1]) / sample_rate, wave, lw=0.5, color="black")
    ax_wave.set_ylabel("waveform", fontsize=8)

    extent = (0, shown, 0, spec.shape[0])
    image = ax_feat.imshow(spec, origin="lower", aspect="auto", cmap="magma", extent=extent,
                           interpolation="nearest")
    feat_bar = fig.colorbar(image, cax=fig.add_subplot(grid[1, 1]), format=compact)
    feat_bar.set_label("feature", fontsize=8)
    ax_feat.set_ylabel("mel bin", fontsize=8)
    image = ax_rel.imshow(rel, origin="lower", aspect="auto", cmap="RdBu_r", vmin=-bound,
                          vmax=bound, extent=extent, interpolation="nearest")
    bar = fig.colorbar(image, cax=fig.add_subplot(grid[2, 1]), extend="both", format=compact)
    bar.set_label(f"{units}\n(clipped at the {percentile:g}th percentile of |R|)", fontsize=7)
    ax_rel.set_ylabel("mel bin", fontsize=8)
    fig.add_subplot(grid[0, 1]).axis("off")

    for t0, t1, f0, f1 in boxes or ():
        for ax, colour in ((ax_feat, "cyan"), (ax_rel, "black")):
            ax.add_patch(Rectangle((t0, f0), t1 - t0, f1 - f0, fill=False, lw=1.2, ls="--",
                                   edgecolor=colour))
    if spans:  # brackets hanging under the relevance panel's time axis
        strip = fig.add_subplot(grid[3, 0], sharex=ax_wave)
        for start, end, label in spans:
            if start >= shown:
                continue
            end = min(end, shown)
            strip.plot([start, start, end, end], [1.0, 0.75, 0.75, 1.0], color="black", lw=0.8)
            strip.text((start + end) / 2, 0.62, label, ha="center", va="top", fontsize=7)
        strip.set_ylim(0, 1)
        strip.axis("off")
        fig.add_subplot(grid[3, 1]).axis("off")
    for ax in (ax_wave, ax_feat, ax_rel):
        ax.tick_params(labelsize=7, labelbottom=ax is ax_rel)
    for colour_bar in (feat_bar, bar):
        colour_bar.ax.tick_params(labelsize=7)
    ax_rel.set_xlabel("time (s)", fontsize=8, labelpad=1)
    ax_wave.set_xlim(0, shown)
    fig.subplots_adjust(left=0.06, right=0.9, top=0.9, bottom=0.03 if spans else 0.08)
    if path is not None:
        fig.savefig(path, dpi=110)
    return fig
