"""Explain what Whisper wrote: every token of a transcript in one compiled call.

    tr = js.attribute_transcript(m, wave)                 # the model's own greedy transcript
    tr = js.attribute_transcript(m, wave, text="Stella bought seven apples")   # a given text
    tr.relevance          # [B, n_tokens, n_mels, frames]: each token's relevance over the audio
    tr.prefix_relevance   # [B, n_tokens, n_positions]: over the decoder input (prompt + text)
    tr.shares             # share of |R| on the clip, on the 30 s padding and on the text prefix
    tr.word_relevance()   # per word: its tokens' relevance summed

The target of token j is ``log p(token_j | audio, prefix)`` read from one teacher-forced
decoder pass (``contrast=``: minus the log-probability of another token at the same place,
"why *Stella*, not *Taylor*"). The forward runs once; the backward of every token's target
is then mapped over the tokens (``chunk`` at a time, vmapped), so memory grows with
``chunk``, not with the transcript.

The padding problem. Whisper pads every clip to 30 s, and its normalised log-mel of the
padding is the item's floor value (about -0.7 on speech), not 0: any ``x · grad`` rule
credits those constant frames. ``reference="silence"`` (the default) takes relevance of
``x - x_silence`` at the input, as DeepLIFT and the zB rule use a reference point: the
padding then gets exactly 0, and speech frames are explained by how they differ from
silence. ``reference=None`` gives the plain ``x · grad`` maps. Every result reports the
share of |R| inside the clip, on the padding and on the text prefix.
"""

from __future__ import annotations

import dataclasses
import functools
import warnings
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxspeech import lrp
from jaxspeech.attribution import methods
from jaxspeech.frontends import whisper as frontend
from jaxspeech.model import _module

__all__ = ["attribute_transcript", "TranscriptAttribution", "TRANSCRIPT_METHODS"]

TRANSCRIPT_METHODS = tuple(lrp.RULE_SETS) + ("saliency", "gradient_x_input",
                                             "integrated_gradients", "smoothgrad")
# IG's completeness gap above which a warning says to raise ``steps``. Measured per token
# (log-probability targets, silence baseline, Gauss-Legendre nodes) on the shipped span
# clips (scripts/word_faithfulness.py ig), worst / median gap: tiny.en 64 steps 67 % / 10 %,
# 128 steps 14 % / 1.5 %, 256 steps 2.5 % / 0.3 %; base 128 steps 24 % / 8 %, 256 steps
# 2.7 % / 1.0 % (256 steps: one clip each). On tiny.en the log-probabilities rise steeply
# over alpha ~ 0.1-0.25, where speech emerges from the silence floor, and few nodes miss
# that rise. The default, 256 steps, stays under this threshold on both models.
IG_GAP_WARNING = 0.05


@dataclasses.dataclass(frozen=True)
class TranscriptAttribution:
    """Relevance of every text token of a transcript, per item.

    ``tokens[b]``: item b's text tokens (no prompt, no end token); arrays are padded to the
    longest transcript ``n`` and ``valid [B, n]`` marks real tokens. ``score [B, n]``: each
    token's target (its log-probability, or the contrast). ``relevance [B, n, n_mels, frames]``
    over the audio features, ``prefix_relevance [B, n, S]`` over the decoder's input positions
    (``prompt_length`` prompt tokens, then the text; position i holds the relevance of the
    token embedding at i). ``shares`` maps "clip", "padding", "prefix" to ``[B, n]`` shares
    of each target's |relevance|. ``words[b]``: ``(word, token indices)`` pairs and, when
    the transcript came from ``js.transcribe`` with word timestamps, their times.
    """

    tokens: list[list[int]]
    token_text: list[list[str]]
    words: list[list[tuple[str, tuple[int, ...]]]]
    relevance: jnp.ndarray
    prefix_relevance: jnp.ndarray | None
    score: jnp.ndarray
    valid: np.ndarray
    shares: dict[str, np.ndarray]
    prompt_length: int
    num_frames: np.ndarray
    method: str
    reference: str | None
    target: str = "logprob"
    extras: dict = dataclasses.field(default_factory=dict)

    def word_relevance(self, b: int) -> list[tuple[str, np.ndarray]]:
        """Item ``b``'s words with their relevance over the features (their tokens' sum)."""
        rel = np.asarray(self.relevance[b])
        return [(word, rel[list(idx)].sum(axis=0)) for word, idx in self.words[b]]

    def frames(self) -> np.ndarray:
        """``[B, n, frames]``: relevance summed over the mel bins."""
        return np.asarray(self.relevance).sum(axis=2)


def _tokenizer(m):
    from jaxspeech.tokenizer import WhisperTokenizer

    return WhisperTokenizer.from_model(m)


def attribute_transcript(
    m,
    wave=None,
    text: str | Sequence[str] | None = None,
    method: str = "attnlrp",
    *,
    tokens: Sequence[Sequence[int]] | None = None,
    contrast: Sequence[Sequence[int]] | None = None,
    features=None,
    num_frames=None,
    language: str | None = None,
    task: str = "transcribe",
    reference: str | None = "silence",
    sample_rate: int | None = None,
    chunk: int = 4,
    steps: int = 256,
    n_samples: int = 16,
    noise_level: float = 0.1,
    key: jax.Array | None = None,
    rules: lrp.RuleSet | None = None,
    target: str = "logprob",
    remat: bool = False,
) -> TranscriptAttribution:
    """Explain each text token of a transcript of ``wave`` (``[B, samples]`` at 16 kHz, a list
    of clips, or precomputed ``features`` with ``num_frames``: each clip's length in 10 ms
    frames).

    The transcript is ``tokens`` (text token ids per item), else ``text`` (one string, or
    one per item; tokenized with the checkpoint's tokenizer), else the model's own greedy
    transcript (:func:`jaxspeech.transcribe`). ``contrast``: per item one alternative token
    per text token (-1: none); the target becomes ``log p(token) - log p(alternative)``.
    ``method``: an LRP rule set (``rules=`` for a custom one), ``saliency``,
    ``gradient_x_input``, ``integrated_gradients`` (``steps``; baseline: silence, its
    completeness per token is in ``extras["completeness_gap"]``) or ``smoothgrad``.
    ``reference``: ``"silence"`` (relevance of ``x - x_silence``) or ``None`` (``x · grad``).
    ``target``: ``"logprob"`` (default) or ``"logit"``, the token's pre-softmax logit (LXT's
    usual target). A log-probability saturates: a word the model is sure of (log p ≈ 0) has
    a near-zero gradient, so its map is faint; its logit does not saturate.
    """
    if method not in TRANSCRIPT_METHODS and rules is None:
        raise ValueError(f"unknown method {method!r} for transcripts; choose from "
                         f"{', '.join(TRANSCRIPT_METHODS)}")
    if target not in ("logprob", "logit"):
        raise ValueError(f"target={target!r}: expected 'logprob' or 'logit'")
    if reference not in ("silence", None):
        raise ValueError(f"reference={reference!r}: expected 'silence' or None")
    if m.kind != "whisper" or not m.config.has_decoder:
        raise ValueError("attribute_transcript explains a Whisper decoder's tokens; this model "
                         f"({m.kind}{', encoder only' if m.kind == 'whisper' else ''}) has none")
    if features is None:
        if wave is None:
            raise ValueError("give a waveform (wave=...) or features=... with num_frames=...")
        from jaxspeech import audio

        batch, lengths = audio.as_batch(wave, expected_rate=m.sample_rate, sample_rate=sample_rate,
                                        name=m.kind)
        if batch.shape[-1] > m.config.n_samples:
            raise ValueError(
                f"audio of {batch.shape[-1] / m.sample_rate:.1f} s is longer than Whisper's "
                f"{m.config.n_samples / m.sample_rate:g} s window; explain each 30 s window "
                "on its own (jaxspeech attribute-corpus windows long audio)")
        features = m.features(batch)
        lengths = np.asarray(lengths if lengths is not None else [batch.shape[-1]] * len(batch))
        num_frames = clip_frames(lengths, m.config.n_frames)
    else:
        features = jnp.asarray(features)
        if num_frames is None:
            num_frames = np.full(features.shape[0], features.shape[-1])
        num_frames = np.asarray(num_frames)
    n_items = features.shape[0]
    tok = None
    prompt = None
    if tokens is None:
        tok = _tokenizer(m)
        if text is None:
            from jaxspeech.transcribe import transcribe

            if wave is None:
                raise ValueError("to explain the model's own transcript, give the waveform")
            found = transcribe(m, wave, language=language, task=task, sample_rate=sample_rate)
            tokens = [list(t.tokens) for t in found]
            language = language or found[0].language
        else:
            texts = [text] * n_items if isinstance(text, str) else list(text)
            if len(texts) != n_items:
                raise ValueError(f"{len(texts)} texts for {n_items} clips")
            tokens = []
            for t in texts:
                if not t.strip():
                    raise ValueError("an empty text has no tokens to explain")
                tokens.append(tok.encode(t if t.startswith(" ") else " " + t))
    tokens = [list(map(int, t)) for t in tokens]
    if len(tokens) != n_items:
        raise ValueError(f"{len(tokens)} token lists for {n_items} clips")
    if not any(tokens):
        raise ValueError("the transcript is empty (silence?): there are no tokens to explain")
    if tok is None:
        tok = _tokenizer(m)
    prompt = tok.sot_sequence(language=language, task=task) + [tok.no_timestamps]
    vocab = m.config.vocab_size
    bad = sorted({t for row in tokens for t in row if not 0 <= t < vocab})
    if bad:
        raise ValueError(f"token ids {bad[:5]} are outside the vocabulary (0..{vocab - 1})")

    n = max(len(t) for t in tokens)
    p = len(prompt)
    if p + n > m.config.max_target_positions:
        raise ValueError(f"{p + n} decoder positions: Whisper's decoder takes at most "
                         f"{m.config.max_target_positions}")
    seq = np.full((n_items, p + n), tok.eot, np.int32)
    seq[:, :p] = prompt
    valid = np.zeros((n_items, n), bool)
    for b, row in enumerate(tokens):
        seq[b, p:p + len(row)] = row
        valid[b, :len(row)] = True
    target_tok = seq[:, p:]
    alt = np.full((n_items, n), -1, np.int32)
    if contrast is not None:
        for b, row in enumerate(contrast):
            alt[b, :len(row)] = row
    rule_set = rules if rules is not None else (
        methods.rules_for(method, None, None) if method in lrp.RULE_SETS else None)

    x = jnp.asarray(features)
    x_ref = _silence(x) if reference == "silence" else jnp.zeros_like(x)
    args = (m.config, m.params, jnp.asarray(seq), jnp.asarray(target_tok), jnp.asarray(alt),
            target == "logit")
    extras: dict[str, Any] = {}
    if method == "integrated_gradients":
        base = _silence(x)
        gx = jnp.zeros((n,) + x.shape, x.dtype)
        alphas, weights = methods.ig_nodes(steps)
        for a, w in zip(alphas, weights, strict=True):  # steps vjps; each maps over all tokens at once
            g, _, _, _ = token_gradients(*args, base + a * (x - base), None, chunk, remat)
            gx = gx + w * g
        relevance = (x - base)[None] * gx
        prefix = None
        _, score, _, _ = token_gradients(*args, x, None, chunk, remat)
        _, score0, _, _ = token_gradients(*args, base, None, chunk, remat)
        score, score0 = score.T, score0.T
        total = relevance.sum(axis=(2, 3)).T
        gap = np.asarray(jnp.abs(total - (score - score0)) / jnp.abs(score - score0))
        gap = np.where(valid, gap, np.nan)
        extras.update(completeness_gap=gap, baseline_score=np.asarray(score0), steps=steps)
        worst = np.nanmax(gap)
        if worst > IG_GAP_WARNING:
            warnings.warn(f"integrated gradients: completeness gap up to {worst:.1%} with "
                          f"{steps} steps; raise steps= for this model", stacklevel=2)
    elif method == "smoothgrad":
        key = jax.random.key(0) if key is None else key
        axes = tuple(range(1, x.ndim))
        sigma = noise_level * (x.max(axis=axes, keepdims=True) - x.min(axis=axes, keepdims=True))
        gx = jnp.zeros((n,) + x.shape, x.dtype)
        for k in jax.random.split(key, n_samples):
            g, _, _, _ = token_gradients(*args, x + sigma * jax.random.normal(k, x.shape),
                                         None, chunk, remat)
            gx = gx + g / n_samples
        relevance, prefix = gx, None
        _, score, _, _ = token_gradients(*args, x, None, chunk, remat)
        score = score.T
    else:
        gx, score, gemb, emb = token_gradients(*args, x, rule_set, chunk, remat)
        score = score.T
        if method == "saliency":
            relevance, prefix = jnp.abs(gx), jnp.abs(gemb * emb[None]).sum(-1)
        else:
            relevance = (x - x_ref)[None] * gx
            prefix = (gemb * emb[None]).sum(-1)  # [n, B, S]: x · grad at each token embedding
    relevance = jnp.swapaxes(relevance, 0, 1)  # [B, n, n_mels, frames]
    if prefix is not None:
        prefix = jnp.swapaxes(prefix, 0, 1)

    shares = _shares(np.asarray(relevance), None if prefix is None else np.asarray(prefix),
                     num_frames, valid)
    token_text = [tok.decode_each(row) for row in tokens]
    words = []
    for row in tokens:
        names, groups = tok.split_to_word_tokens(row, language=language)
        idx, pos = [], 0
        for name, group in zip(names, groups, strict=True):
            idx.append((name, tuple(range(pos, pos + len(group)))))
            pos += len(group)
        words.append(idx)
    return TranscriptAttribution(
        tokens=tokens, token_text=token_text, words=words, relevance=relevance,
        prefix_relevance=prefix, score=score, valid=valid, shares=shares, prompt_length=p,
        num_frames=np.asarray(num_frames), method=method if rules is None else rules.name,
        reference=reference, target=target, extras=extras)


def clip_frames(n_samples, max_frames: int) -> np.ndarray:
    """How many log-mel frames see each clip of ``n_samples``: frame i's centred window spans
    samples ``[160 i - 200, 160 i + 200)``, so frames up to ``(n + 200) / 160`` touch it."""
    half = frontend.N_FFT // 2
    n = np.asarray(n_samples)
    return np.minimum(-(-(n + half) // frontend.HOP_LENGTH), max_frames)


def _silence(x: jnp.ndarray) -> jnp.ndarray:
    """Each item's silence in normalised log-mel terms: its floor value (the padding)."""
    return jnp.broadcast_to(x.min(axis=(1, 2), keepdims=True), x.shape)


def _shares(relevance, prefix, num_frames, valid) -> dict[str, np.ndarray]:
    """``[B, n]`` shares of |R| on the clip's frames, on the padding and on the text prefix."""
    a = np.abs(relevance).sum(axis=2)  # [B, n, frames]
    inside = np.arange(a.shape[-1])[None, None, :] < np.asarray(num_frames)[:, None, None]
    clip = (a * inside).sum(-1)
    padding = (a * ~inside).sum(-1)
    text = np.zeros_like(clip) if prefix is None else np.abs(prefix).sum(-1)
    total = np.maximum(clip + padding + text, np.finfo(np.float32).tiny)
    out = {"clip": clip / total, "padding": padding / total, "prefix": text / total}
    return {k: np.where(valid, v, np.nan) for k, v in out.items()}


@functools.partial(jax.jit, static_argnames=("config", "logit", "rules", "chunk", "remat"))
def token_gradients(config, params, seq, target_tok, alt, logit, x, rules=None, chunk=4,
                    remat=False):
    """One teacher-forced forward of ``seq [B, S]`` (prompt + text), then the backward of each
    text token's target mapped over the ``n`` tokens, ``chunk`` at a time.

    Target j: ``log p(target_tok[:, j] | prefix)`` read from the logits at position
    ``S - n + j - 1`` (minus ``log p(alt[:, j])`` where ``alt >= 0``); with ``logit`` the
    pre-softmax logits instead of log-probabilities. Returns
    ``(grad over x [n, B, ...], target [n, B], grad over the token embeddings [n, B, S, d],
    the embeddings [B, S, d])``; under ``rules`` the grads are LRP's.
    """
    n = target_tok.shape[1]
    start = seq.shape[1] - n
    module = _module(config, rules, remat)

    def targets(x_, delta):
        logits, state = module.apply(
            {"params": params, "perturbations": {"decoder": {"embeddings": delta}}},
            x_, tokens=seq, mutable=["intermediates"])
        logp = logits[:, start - 1:start - 1 + n]  # [B, n, V]
        if not logit:
            logp = jax.nn.log_softmax(logp, axis=-1)
        picked = jnp.take_along_axis(logp, target_tok[..., None], axis=-1)[..., 0]
        other = jnp.take_along_axis(logp, jnp.maximum(alt, 0)[..., None], axis=-1)[..., 0]
        emb = state["intermediates"]["decoder"]["embeddings"][0] - delta
        return jnp.where(alt >= 0, picked - other, picked), emb

    b, s = seq.shape
    delta = jnp.zeros((b, s, config.d_model), x.dtype)
    scores, backward, emb = jax.vjp(targets, x, delta, has_aux=True)

    def one_token(j):
        return backward(jnp.zeros_like(scores).at[:, j].set(1.0))

    gx, gemb = jax.lax.map(one_token, jnp.arange(n), batch_size=min(chunk, n))
    return gx, scores.T, gemb, emb
