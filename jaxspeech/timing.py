"""Word timestamps from Whisper's alignment heads: cross-attention + dynamic time warping.

The method of openai-whisper's ``whisper/timing.py`` (``find_alignment`` and
``add_word_timestamps`` for one segment without timestamp tokens), re-implemented:

    tokens = sot_sequence + [<|notimestamps|>] + text + [<|endoftext|>]
    one teacher-forced decoder pass, cross-attention maps kept          [B, heads, L, 1500]
      -> the alignment heads, softmax over the clip's encoder frames   [B, A, L, frames]
      -> per head and frame: standardised over the tokens (mean / std)
      -> median filter (width 7) along the frames, mean over the heads  [B, L, frames]
      -> rows <|notimestamps|> .. last text token (each row is the position that
         predicts the next text token, or <|endoftext|>)               [text + 1, frames]
      -> DTW on the negated matrix: the frame at which each row is first entered is
         that token's start; a word spans its first token's start to the next word's
      -> openai's post-processing: long words at sentence ends cut to twice the median
         word duration, punctuation merged into its neighbours, the first word after a
         pause shortened; times in seconds (20 ms per encoder frame), rounded to 10 ms.

The forward, the head selection, normalisation and filter run in one jitted call for
the whole batch; DTW and the word bookkeeping run on the host (see :func:`dtw`).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxspeech.frontends.whisper import HOP_LENGTH, SAMPLE_RATE
from jaxspeech.model import Model

__all__ = ["Word", "word_timestamps", "dtw", "TOKENS_PER_SECOND", "PREPEND_PUNCTUATIONS",
           "APPEND_PUNCTUATIONS"]

# One encoder position covers two 10 ms mel frames (conv2 has stride 2): 20 ms.
TOKENS_PER_SECOND = SAMPLE_RATE / (2 * HOP_LENGTH)
# openai-whisper's defaults (``transcribe(prepend_punctuations=..., append_punctuations=...)``).
PREPEND_PUNCTUATIONS = "\"'“¿([{-"
APPEND_PUNCTUATIONS = "\"'.。,，!！?？:：”)]}、"
SENTENCE_END_MARKS = ".。!！?？"

SplitWords = Callable[[list[int]], tuple[list[str], list[list[int]]]]


@dataclasses.dataclass(frozen=True)
class Word:
    """One word of a transcript: its text (with its leading space, as the tokenizer
    decodes it), ``start`` / ``end`` in seconds from the start of the window, the mean
    probability of its tokens, and the token ids it is made of."""

    word: str
    start: float
    end: float
    probability: float
    tokens: tuple[int, ...]


def word_timestamps(m: Model, features, text_tokens: Sequence[Sequence[int]],
                    sot_sequence: Sequence[int] | Sequence[Sequence[int]], num_frames,
                    split_words: SplitWords | Sequence[SplitWords], *,
                    medfilt_width: int = 7, qk_scale: float = 1.0,
                    last_speech_timestamp: float | Sequence[float] = 0.0,
                    edits=None) -> list[list[Word]]:
    """Word start/end times for each item's ``text_tokens``, as openai-whisper's
    ``add_word_timestamps`` gives for one segment (window start 0, no timestamp tokens).

    Args:
      m: a Whisper model with a decoder and ``m.extras["generation"]`` holding
        ``alignment_heads`` ``[[layer, head], ...]``, ``eos_token_id`` and
        ``no_timestamps_token_id``.
      features: ``[B, n_mels, 3000]`` log-mel features (``m.features(wave)``).
      text_tokens: ``B`` lists of token ids (the transcript); ids >= ``<|endoftext|>``
        (special and timestamp tokens) are dropped, as openai does.
      sot_sequence: the prompt before ``<|notimestamps|>``: ``[<|startoftranscript|>]``
        on English-only models, ``[sot, <|lang|>, <|task|>]`` on multilingual ones; one
        for the batch, or ``B`` of them (a language detected per clip).
      num_frames: ``[B]`` the clip's length in 10 ms mel frames (``samples // 160``,
        at most 3000); the alignment only looks at the encoder frames of the clip.
      split_words: ``tokens -> (words, word_tokens)``, the tokenizer's word split
        (``WhisperTokenizer.split_to_word_tokens``), or ``B`` of them (one per item's
        language); its pieces must concatenate to ``tokens``.
      medfilt_width: odd width of the median filter along the frames.
      qk_scale: multiplies the attention logits before the softmax (> 0).
      last_speech_timestamp: end of the speech before this window, in seconds relative
        to the window's start (scalar or ``[B]``); 0 for the first window. openai
        shortens the first word when it ends more than 4 median word durations later
        (its start clamped at the window's start here, at 0 s of the whole audio there).
      edits: ``{site: edit}`` (:mod:`jaxspeech.edits`): align with the edited model.

    Returns:
      ``B`` lists of :class:`Word` (empty for an empty transcript).
    """
    generation = m.extras.get("generation") or {}
    heads = tuple((int(a), int(b)) for a, b in generation.get("alignment_heads") or ())
    cfg = m.config
    if not getattr(cfg, "has_decoder", False):
        raise ValueError("word timestamps need a Whisper model with a decoder")
    if not heads:
        raise ValueError("the model's extras['generation'] has no alignment_heads "
                         "([[layer, head], ...]); word timestamps read those heads")
    bad = [h for h in heads if not (0 <= h[0] < cfg.decoder_layers
                                    and 0 <= h[1] < cfg.decoder_attention_heads)]
    if bad:
        raise ValueError(f"alignment heads {bad} are outside the decoder's "
                         f"{cfg.decoder_layers} layers x {cfg.decoder_attention_heads} heads")
    for key in ("eos_token_id", "no_timestamps_token_id"):
        if key not in generation:
            raise ValueError(f"the model's extras['generation'] has no {key}")
    eot, no_timestamps = int(generation["eos_token_id"]), int(generation["no_timestamps_token_id"])
    if medfilt_width < 1 or medfilt_width % 2 != 1:
        raise ValueError(f"medfilt_width must be a positive odd number, got {medfilt_width}")
    if not qk_scale > 0:
        raise ValueError(f"qk_scale must be > 0, got {qk_scale}")

    features = jnp.asarray(features)
    if features.ndim != 3 or tuple(features.shape[1:]) != (cfg.n_mels, cfg.n_frames):
        raise ValueError(f"features must be [batch, {cfg.n_mels}, {cfg.n_frames}], "
                         f"got {tuple(features.shape)}")
    batch = features.shape[0]
    if len(text_tokens) != batch:
        raise ValueError(f"{len(text_tokens)} token lists for a batch of {batch}")
    frames = np.asarray(num_frames).reshape(-1)
    if frames.shape != (batch,) or not np.issubdtype(frames.dtype, np.integer):
        raise ValueError(f"num_frames must be [{batch}] integers (10 ms mel frames), "
                         f"got {np.asarray(num_frames)!r}")
    if frames.min() < 2 or frames.max() > cfg.n_frames:
        raise ValueError(f"num_frames must lie in [2, {cfg.n_frames}], got {frames.tolist()}")
    last_speech = np.broadcast_to(np.asarray(last_speech_timestamp, np.float64), (batch,))
    shared = len(sot_sequence) > 0 and np.ndim(sot_sequence[0]) == 0
    sots = [[int(t) for t in s] for s in ([sot_sequence] * batch if shared else sot_sequence)]
    if len(sots) != batch or not all(sots):
        raise ValueError(f"sot_sequence must be one non-empty prompt (starting with "
                         f"<|startoftranscript|>) or {batch} of them, got {sot_sequence!r}")
    splits = [split_words] * batch if callable(split_words) else list(split_words)
    if len(splits) != batch or not all(map(callable, splits)):
        raise ValueError(f"split_words must be a function or {batch} functions")
    texts = [[int(t) for t in tokens if int(t) < eot] for tokens in text_tokens]

    pieces = [_split(splits[b], text) for b, text in enumerate(texts)]
    if not any(texts):
        return [[] for _ in texts]

    # sot_sequence + <|notimestamps|> + text + <|endoftext|>
    lengths = [len(sot) + 1 + len(text) + 1 for sot, text in zip(sots, texts, strict=True)]
    if max(lengths) > cfg.max_target_positions:
        raise ValueError(f"{max(lengths)} tokens with the prompt; the decoder takes at most "
                         f"{cfg.max_target_positions}")
    # Pad to a multiple of 32 (one compile for many lengths); positions past an item's
    # <|endoftext|> are masked out below, and causal attention keeps them from the others.
    width = min(-(-max(lengths) // 32) * 32, cfg.max_target_positions)
    tokens = np.full((batch, width), eot, np.int32)
    for b, (sot, text) in enumerate(zip(sots, texts, strict=True)):
        tokens[b, :lengths[b]] = [*sot, no_timestamps, *text, eot]
    from jaxspeech.edits import bind

    bound = bind(cfg, edits, features, {"tokens": tokens})
    matrix, probs = _alignment_matrix(
        cfg, m.params, features, jnp.asarray(tokens), jnp.asarray(lengths, jnp.int32),
        jnp.asarray(frames // 2, jnp.int32), heads=heads, eot=eot,
        medfilt_width=medfilt_width, qk_scale=float(qk_scale), edits=bound)
    matrix, probs = np.asarray(matrix), np.asarray(probs)

    out = []
    for b, (sot, text) in enumerate(zip(sots, texts, strict=True)):
        if not text:
            out.append([])
            continue
        # Rows <|notimestamps|> .. last text token, the clip's frames; DTW in float64 as
        # openai's (it casts the float32 matrix to double).
        rows = matrix[b, len(sot):lengths[b] - 1, :frames[b] // 2].astype(np.float64)
        text_probs = probs[b, len(sot):len(sot) + len(text)].astype(np.float64)
        timings = _find_words(*pieces[b], rows, text_probs)
        out.append(_post_process(timings, float(last_speech[b])))
    return out


@functools.partial(jax.jit, static_argnames=("config", "heads", "eot", "medfilt_width",
                                             "qk_scale"))
def _alignment_matrix(config, params, features, tokens, lengths, enc_frames, *, heads, eot,
                      medfilt_width, qk_scale, edits=None):
    """The teacher-forced pass and the alignment matrix, for the whole batch.

    ``tokens [B, L]`` (item b valid up to ``lengths[b]``), ``enc_frames [B]`` the clip's
    encoder frames -> ``(matrix [B, L, S], probs [B, L])``: ``matrix`` the filtered,
    head-averaged, standardised alignment weights (zero past ``enc_frames``), ``probs[b, j]``
    the probability of ``tokens[b, j + 1]`` at position ``j`` among the text tokens
    (softmax over ids below ``<|endoftext|>``, as openai's).
    """
    # Inside this jit only the maps read below are live, so XLA drops the encoder's
    # [B, H, 1500, 1500] maps that Model.forward also taps (tiny.en, B = 3: 111 MB of
    # temporaries, less than the 162 MB those maps alone would take).
    logits, inter = Model(config, params).forward(params, features, tokens=tokens, edits=edits)
    length = tokens.shape[1]
    n_source = config.max_source_positions

    logp = jax.nn.log_softmax(logits[:, :-1, :eot], axis=-1)
    nxt = jnp.minimum(tokens[:, 1:], eot - 1)  # eot / padding rows are never read
    probs = jnp.exp(jnp.take_along_axis(logp, nxt[..., None], axis=-1)[..., 0])
    probs = jnp.pad(probs, ((0, 0), (0, 1)))

    weights = jnp.stack([inter[f"decoder.layers.{layer}.encoder_attn.attention"][:, head]
                         for layer, head in heads], axis=1)  # [B, A, L, S]
    in_clip = (jnp.arange(n_source)[None, :] < enc_frames[:, None])[:, None, None, :]
    # openai softmaxes qk_scale * logits over the clip's frames only. A softmax over a
    # subset of the frames is the full softmax renormalised over that subset, and
    # softmax(s * z) is proportional to softmax(z) ** s, so the tapped (full-window)
    # probabilities give the same weights. (Frames whose probability underflowed to 0 in
    # float32, e^-87 below the largest, stay 0: negligible after the renormalisation.)
    if qk_scale != 1.0:
        weights = weights ** qk_scale
    weights = jnp.where(in_clip, weights, 0.0)
    weights = weights / jnp.sum(weights, axis=-1, keepdims=True)

    # Standardise each (head, frame) over the item's tokens (population std, as
    # torch.std_mean(unbiased=False)); padding positions take no part.
    valid = (jnp.arange(length)[None, :] < lengths[:, None])[:, None, :, None]
    count = lengths.astype(weights.dtype)[:, None, None, None]
    mean = jnp.sum(jnp.where(valid, weights, 0.0), axis=2, keepdims=True) / count
    var = jnp.sum(jnp.where(valid, (weights - mean) ** 2, 0.0), axis=2, keepdims=True) / count
    weights = jnp.where(in_clip, (weights - mean) / jnp.sqrt(var), 0.0)

    weights = _median_filter(weights, enc_frames, medfilt_width)
    matrix = jnp.mean(weights, axis=1)
    return jnp.where(in_clip[:, 0], matrix, 0.0), probs


def _median_filter(x: jnp.ndarray, n: jnp.ndarray, width: int) -> jnp.ndarray:
    """Median over ``width`` frames of ``x [B, ..., S]``, item ``b`` holding ``n[b]`` frames
    padded by reflection at both of its ends (``torch.nn.functional.pad(mode="reflect")``,
    the edge not repeated), as openai's ``median_filter``; an item with ``n <= width // 2``
    frames is returned unfiltered, as there.

    The ``width`` shifted copies are sorted by odd-even transposition (``width`` rounds of
    min/max exchanges), which XLA fuses elementwise: on CPU, width 7 over [3, 8, 32, 1500],
    13 ms against 1.0 s for ``jnp.sort`` over a window axis."""
    pad = width // 2
    if pad == 0:
        return x
    s = x.shape[-1]
    last = (n - 1)[:, None]
    lead = (1,) * (x.ndim - 2)
    shifted = []
    for k in range(-pad, pad + 1):
        idx = jnp.abs(jnp.arange(s)[None, :] + k)  # [B, S] after the reflection below
        idx = jnp.clip(jnp.where(idx > last, 2 * last - idx, idx), 0, s - 1)
        idx = jnp.broadcast_to(idx.reshape(idx.shape[0], *lead, s), x.shape)
        shifted.append(jnp.take_along_axis(x, idx, axis=-1))
    for r in range(width):
        for i in range(r % 2, width - 1, 2):
            shifted[i], shifted[i + 1] = (jnp.minimum(shifted[i], shifted[i + 1]),
                                          jnp.maximum(shifted[i], shifted[i + 1]))
    short = (n <= pad).reshape(-1, *(1,) * (x.ndim - 1))
    return jnp.where(short, x, shifted[pad])


def dtw(cost: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Monotonic alignment path through ``cost [N, M]`` (lower is better), as openai's
    ``dtw_cpu``: steps diagonal, down (next row) or right (next frame), ties broken
    towards "right" the same way. Returns ``(rows, cols)``, the path from ``(0, 0)`` to
    ``(N - 1, M - 1)``.

    On the host in numpy: the recurrence is sequential, and the matrix is small
    (tokens x frames, ~50 x 1500). Cells on one anti-diagonal ``i + j = d`` depend only
    on the two before it, so each anti-diagonal is one vectorised step (N + M steps).
    Accumulated in float64, as openai's numba kernel does.
    """
    x = np.asarray(cost, np.float64)
    if x.ndim != 2 or 0 in x.shape:
        raise ValueError(f"dtw needs a non-empty [rows, cols] matrix, got shape {x.shape}")
    n, m = x.shape
    acc = np.full((n + 1, m + 1), np.inf)
    acc[0, 0] = 0.0
    trace = np.full((n + 1, m + 1), -1, np.int8)
    for d in range(2, n + m + 1):
        i = np.arange(max(1, d - m), min(n, d - 1) + 1)
        j = d - i
        diag, up, left = acc[i - 1, j - 1], acc[i - 1, j], acc[i, j - 1]
        step = np.where((diag < up) & (diag < left), 0,
                        np.where((up < diag) & (up < left), 1, 2))
        acc[i, j] = x[i - 1, j - 1] + np.choose(step, (diag, up, left))
        trace[i, j] = step
    trace[0, :] = 2
    trace[:, 0] = 1
    i, j, path = n, m, []
    while i > 0 or j > 0:
        path.append((i - 1, j - 1))
        t = trace[i, j]
        if t == 0:
            i, j = i - 1, j - 1
        elif t == 1:
            i -= 1
        else:
            j -= 1
    rows, cols = np.array(path[::-1]).T
    return rows, cols


@dataclasses.dataclass
class _Timing:  # a word while it is being adjusted and merged
    word: str
    tokens: list[int]
    start: float
    end: float
    probability: float


def _split(split_words: SplitWords, text: list[int]) -> tuple[list[str], list[list[int]]]:
    if not text:
        return [], []
    words, word_tokens = split_words(list(text))
    word_tokens = [[int(t) for t in piece] for piece in word_tokens]
    if [t for piece in word_tokens for t in piece] != text or len(words) != len(word_tokens):
        raise ValueError("split_words must return words whose tokens concatenate to the "
                         f"tokens given; got {word_tokens!r} for {text!r}")
    return list(words), word_tokens


def _find_words(words: list[str], word_tokens: list[list[int]], rows: np.ndarray,
                text_probs: np.ndarray) -> list[_Timing]:
    """The DTW path over ``rows [n_text + 1, frames]`` -> one timing per word."""
    token_rows, frames = dtw(-rows)
    # The frame at which the path first enters each row: row k is the position that
    # predicts text token k, so it is token k's start (row len(text): the last one's end).
    entered = np.pad(np.diff(token_rows), (1, 0), constant_values=1).astype(bool)
    token_start = frames[entered] / TOKENS_PER_SECOND
    bounds = np.pad(np.cumsum([len(t) for t in word_tokens]), (1, 0))
    return [_Timing(w, list(t), token_start[a], token_start[z], np.mean(text_probs[a:z]))
            for w, t, a, z in zip(words, word_tokens, bounds[:-1], bounds[1:], strict=True)]


def _post_process(alignment: list[_Timing], last_speech: float) -> list[Word]:
    """openai's ``add_word_timestamps`` for one segment starting at 0, in its order:
    sentence-boundary cut, punctuation merge, rounding, first-word-after-a-pause cut."""
    durations = np.array([t.end - t.start for t in alignment])
    durations = durations[durations.nonzero()]
    median = min(0.7, float(np.median(durations))) if len(durations) else 0.0
    longest = 2 * median
    if len(durations):  # a word next to a sentence end is at most twice the median long
        for prev, cur in zip(alignment, alignment[1:], strict=False):
            if cur.end - cur.start > longest:
                # (`in` on the string, as openai: the word is a single mark)
                if cur.word in SENTENCE_END_MARKS:
                    cur.end = cur.start + longest
                elif prev.word in SENTENCE_END_MARKS:
                    cur.start = cur.end - longest
    _merge_punctuation(alignment, PREPEND_PUNCTUATIONS, APPEND_PUNCTUATIONS)
    words = [_Timing(t.word, t.tokens, round(t.start, 2), round(t.end, 2), t.probability)
             for t in alignment if t.word]
    if words and words[0].end - last_speech > 4 * median and (
            words[0].end - words[0].start > longest
            or (len(words) > 1 and words[1].end - words[0].start > 2 * longest)):
        # the first word after a pause: at most twice the median long
        if len(words) > 1 and words[1].end - words[1].start > longest:
            boundary = max(words[1].end / 2, words[1].end - longest)
            words[0].end = words[1].start = boundary
        words[0].start = max(0, words[0].end - longest)
    # openai then prefers the segment's own start / end when the first / last word runs
    # 0.5 s past it. Here the segment is the window from 0 to the clip's end, and DTW
    # places every time inside [0, clip end], so neither can apply.
    return [Word(t.word, float(t.start), float(t.end), float(t.probability), tuple(t.tokens))
            for t in words]


def _merge_punctuation(alignment: list[_Timing], prepended: str, appended: str) -> None:
    """In place, as openai's ``merge_punctuations``: an opening mark said on its own
    (`` "``) joins the word after it, a closing one (``.``, ``,``) the word before it;
    the emptied entries keep ``word == ""``."""
    i, j = len(alignment) - 2, len(alignment) - 1
    while i >= 0:
        prev, cur = alignment[i], alignment[j]
        if prev.word.startswith(" ") and prev.word.strip() in prepended:
            cur.word, cur.tokens = prev.word + cur.word, prev.tokens + cur.tokens
            prev.word, prev.tokens = "", []
        else:
            j = i
        i -= 1
    i, j = 0, 1
    while j < len(alignment):
        prev, cur = alignment[i], alignment[j]
        if not prev.word.endswith(" ") and cur.word in appended:
            prev.word, prev.tokens = prev.word + cur.word, prev.tokens + cur.tokens
            cur.word, cur.tokens = "", []
        else:
            i = j
        j += 1
