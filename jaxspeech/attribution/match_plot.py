"""One picture of an audio-text match: where in the clip and which words of the caption.

    fig = match_figure("match.png", res, 0, 1)     # clip 0 with text 1 of attribute_match

Left: the clip's features (CLAP's log-mel, the first channel) and the signed relevance over
them (red for the match, blue against it) on a symmetric scale clipped at the 99th
percentile of ``|R|``. Right: the caption's words top to bottom, each box coloured by its
relevance (tokens summed) on its own symmetric scale, with the value; ``<s> </s>`` (the
specials, which take what the pooled ``<s>`` token holds) greyed below. The title gives
the similarity, the method and how much relevance each side got.
"""

from __future__ import annotations

import numpy as np

from jaxspeech.attribution.plot import _robust_bound, spectrogram_view

__all__ = ["match_figure"]


def match_figure(path: str | None, res, b: int, n: int | None = None, *, title: str = "",
                 percentile: float = 99.0):
    """The figure of clip ``b`` with text ``n`` (pairs: its own text) of a
    :class:`~jaxspeech.attribution.match.MatchAttribution`; writes a PNG when ``path`` is
    given and returns the ``matplotlib`` ``Figure``."""
    from matplotlib import colormaps
    from matplotlib.colors import Normalize
    from matplotlib.figure import Figure
    from matplotlib.patches import FancyBboxPatch
    from matplotlib.ticker import FuncFormatter

    compact = FuncFormatter(lambda v, _: f"{v:.2g}")  # no offset text over the colour bars

    model = res.model
    t = res._text_of(b, n)
    time_axis = model.family.time_axis
    spec = spectrogram_view(np.asarray(res.features[b]), time_axis)
    rel = spectrogram_view(np.asarray(res._pair(res.audio_relevance, b, n)), time_axis)
    frame_s = model.family.hop_length(model.config) / model.sample_rate
    seconds = rel.shape[-1] * frame_s
    words = res.words(b, n)
    special = float(res._pair(res.special_relevance, b, n))
    score = float(res._pair(np.asarray(res.score), b, n))
    sides = {k: float(res._pair(v, b, n)) for k, v in res.conservation().items()}

    fig = Figure(figsize=(12, 5.6))
    grid = fig.add_gridspec(2, 4, width_ratios=[1, 0.018, 0.11, 0.3], height_ratios=[1, 1.3],
                            hspace=0.15, wspace=0.03)
    ax_feat = fig.add_subplot(grid[0, 0])
    ax_rel = fig.add_subplot(grid[1, 0], sharex=ax_feat)
    extent = (0, seconds, 0, spec.shape[0])
    image = ax_feat.imshow(spec, origin="lower", aspect="auto", cmap="magma", extent=extent,
                           interpolation="nearest")
    fig.colorbar(image, cax=fig.add_subplot(grid[0, 1]), format=compact).ax.tick_params(labelsize=7)
    bound = _robust_bound(rel, percentile)
    image = ax_rel.imshow(rel, origin="lower", aspect="auto", cmap="RdBu_r", vmin=-bound,
                          vmax=bound, extent=extent, interpolation="nearest")
    bar = fig.colorbar(image, cax=fig.add_subplot(grid[1, 1]), extend="both", format=compact)
    bar.set_label(f"relevance per feature\n(clipped at the {percentile:g}th pct of |R|)", fontsize=7)
    bar.ax.tick_params(labelsize=7)
    ax_feat.set_ylabel("mel bin", fontsize=8)
    ax_rel.set_ylabel("mel bin", fontsize=8)
    ax_rel.set_xlabel("time (s)", fontsize=8)
    ax_feat.tick_params(labelsize=7, labelbottom=False)
    ax_rel.tick_params(labelsize=7)
    ax_feat.set_title("audio: features (top) and relevance (bottom)", fontsize=8, loc="left")

    ax_words = fig.add_subplot(grid[:, 3])
    ax_words.axis("off")
    fig.add_subplot(grid[:, 2]).axis("off")
    values = np.array([v for _, v in words]) if words else np.zeros(1)
    word_bound = float(np.abs(values).max()) or 1.0
    colour = colormaps["RdBu_r"]
    norm = Normalize(-word_bound, word_bound)
    rows = len(words) + 2
    ax_words.set_xlim(0, 1)
    ax_words.set_ylim(rows, -1)
    ax_words.text(0.02, -0.5, "caption words (relevance)", fontsize=8, va="center")
    for i, (word, value) in enumerate(words):
        ax_words.add_patch(FancyBboxPatch((0.02, i + 0.12), 0.62, 0.76, boxstyle="round,pad=0.01",
                                          facecolor=colour(norm(value)), edgecolor="0.6", lw=0.5))
        ink = "white" if abs(norm(value) - 0.5) > 0.35 else "black"
        ax_words.text(0.05, i + 0.5, word, fontsize=9, va="center", color=ink)
        ax_words.text(0.68, i + 0.5, f"{value:+.3g}", fontsize=8, va="center", family="monospace")
    ax_words.add_patch(FancyBboxPatch((0.02, len(words) + 0.32), 0.62, 0.76,
                                      boxstyle="round,pad=0.01", facecolor="0.92", edgecolor="0.6",
                                      lw=0.5))
    ax_words.text(0.05, len(words) + 0.7, "<s> </s>", fontsize=8, va="center", color="0.35")
    ax_words.text(0.68, len(words) + 0.7, f"{special:+.3g}", fontsize=8, va="center",
                  family="monospace", color="0.35")

    caption = res.tokens.texts[t]
    head = title or f"clip {b} × text {t}: “{caption[:80]}{'…' if len(caption) > 80 else ''}”"
    fig.suptitle(f"{head}\nsimilarity s = {score:.4g} ({res.method}); relevance / s: audio "
                 f"{sides['audio']:.3g}, text {sides['text']:.3g}", fontsize=9, x=0.06, ha="left")
    fig.subplots_adjust(left=0.06, right=0.98, top=0.86, bottom=0.09)
    if path is not None:
        fig.savefig(path, dpi=110)
    return fig
