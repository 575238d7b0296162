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

Maps over the encoder's frames (``ENCODER_FRAME_METHODS``): ``gradcam`` (an encoder layer's
output), ``rollout`` and ``gradient_rollout`` (Chefer et al. 2021's rules for an
encoder-decoder, over every attention map) and ``alignment_heads`` (the cross-attention
:mod:`jaxspeech.timing` aligns words with) give one value per 20 ms encoder frame; each is
spread evenly over its two 10 ms mel frames and the mel bins, so a token's map keeps its
total. They say nothing about the text prefix (``prefix_relevance`` is None, its share 0)
and take no ``reference``. The rollout rules, with ``Ā`` a map averaged over its heads:

    encoder      R_ee = I;  per layer  R_ee += Ā R_ee
    decoder      R_de = 0;  per layer  R_de += Ā_self R_de  (causal self-attention)
                                       R_de += Ā_cross R̄_ee (cross-attention)
    token j      the row of R_de at the position that predicts it, over the encoder frames

``rollout``: ``Ā`` = the mean attention, and every update's rows renormalised to sum to 1
(in the encoder exactly :func:`~jaxspeech.attribution.methods.rollout`'s ``0.5 A + 0.5 I``
product, as Abnar & Zuidema and Chefer et al.'s rollout baseline), ``R̄_ee = R_ee``: each
token's map is a distribution over the encoder frames. ``gradient_rollout``: ``Ā`` = the
mean of ``(∇A ⊙ A)⁺``, the gradient of the token's own target (all tokens in one mapped
backward), no renormalisation, and ``R̄_ee = I + D⁻¹(R_ee - I)`` with ``D`` the row sums of
``R_ee - I`` (the paper's eq. 8-9). Two departures from the paper's rule 10,
``R_de += (R̄_dd)ᵀ Ā_cross R̄_ee``, both because Whisper's decoder is causal: its ``(R̄_dd)ᵀ``
would give position i the cross-attention of the later positions that i feeds, which the
prediction at i cannot depend on; and the earlier positions that i attends to are already
carried into row i by the self-attention update, so ``R_dd`` never enters ``R_de``.
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
from jaxspeech.attribution.targets import unknown_layer_message
from jaxspeech.convert.common import unflatten
from jaxspeech.frontends import whisper as frontend
from jaxspeech.layers import KEEP_ATTENTION_MAPS
from jaxspeech.model import _module, flatten_intermediates

__all__ = ["attribute_transcript", "TranscriptAttribution", "TRANSCRIPT_METHODS",
           "ENCODER_FRAME_METHODS", "encoder_frames_to_features"]

# Methods whose maps live on the encoder's 20 ms frames (a layer output or attention over
# them), spread over the log-mel by :func:`encoder_frames_to_features`.
ENCODER_FRAME_METHODS = ("gradcam", "rollout", "gradient_rollout", "alignment_heads")
TRANSCRIPT_METHODS = tuple(lrp.RULE_SETS) + ("saliency", "gradient_x_input",
                                             "integrated_gradients", "smoothgrad"
                                             ) + ENCODER_FRAME_METHODS
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
    token embedding at i; None for integrated gradients, SmoothGrad and the encoder-frame
    methods, whose ``shares["prefix"]`` is then 0). ``shares`` maps "clip", "padding",
    "prefix" to ``[B, n]`` shares of each target's |relevance|. ``words[b]``: ``(word, token
    indices)`` pairs and, when the transcript came from ``js.transcribe`` with word
    timestamps, their times.
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
    item_chunk: int = 1,
    steps: int = 256,
    n_samples: int = 16,
    noise_level: float = 0.1,
    key: jax.Array | None = None,
    rules: lrp.RuleSet | None = None,
    target: str = "logprob",
    layer: str | None = None,
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
    completeness per token is in ``extras["completeness_gap"]``), ``smoothgrad``, or a map over
    the encoder's frames (module doc): ``gradcam`` (``layer``: an encoder layer's output,
    default the last layer's ``hidden_state``; the gradient's mean runs over the clip's
    encoder frames and the padding gets no map), ``rollout``, ``gradient_rollout`` or
    ``alignment_heads`` (the checkpoint's ``extras["generation"]["alignment_heads"]``).
    ``reference``: ``"silence"`` (relevance of ``x - x_silence``) or ``None`` (``x · grad``);
    the encoder-frame methods and saliency take none.
    ``target``: ``"logprob"`` (default) or ``"logit"``, the token's pre-softmax logit (LXT's
    usual target). A log-probability saturates: a word the model is sure of (log p ≈ 0) has
    a near-zero gradient, so its map is faint; its logit does not saturate.

    Memory. ``chunk`` tokens' backward passes run at once (default 4). The gradient methods
    and LRP hold the batch's forward. ``gradcam`` and ``rollout`` hold the encoder's
    attention maps, ``M = L·H·T²·4`` bytes per item (``L`` encoder layers, ``H`` heads,
    ``T`` = 1500 encoder frames: 216 MB on tiny.en), so they run ``item_chunk`` items at a
    time (default 1; vmapped, the rest scanned) and their peak does not grow with B beyond
    the output (``relevance``, ``B·n·n_mels·frames·4`` bytes): about ``item_chunk·M`` plus
    the model; ``gradient_rollout`` holds an item's maps and ``chunk`` tokens' gradients of
    them, ``≈ item_chunk·(2 + chunk)·M``.
    """
    for name, value in (("chunk", chunk), ("item_chunk", item_chunk)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
            raise ValueError(f"{name}={value!r}: expected a positive integer")
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
    if rules is not None and method in ENCODER_FRAME_METHODS:
        raise ValueError(f"rules= sets an LRP rule set; method={method!r} uses none")
    if layer is not None and method != "gradcam":
        raise ValueError(f"layer= is Grad-CAM's; method={method!r} reads no layer")
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
    elif method in ENCODER_FRAME_METHODS:
        per_frame, score = _encoder_frame_maps(m, method, args, x, num_frames, valid.sum(axis=1),
                                               layer, chunk, item_chunk, remat, extras)
        relevance = encoder_frames_to_features(per_frame, m.config.n_mels, m.config.n_frames)
        prefix = None
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


def _teacher_forced(config, params, seq, target_tok, alt, logit, x, perturb=None, *, rules=None,
                    remat=False, maps=False):
    """One teacher-forced forward of ``seq [B, S]``: ``(targets [B, n], intermediates)``.

    Target j: ``log p(target_tok[:, j] | prefix)`` read from the logits at position
    ``S - n + j - 1`` (minus ``log p(alt[:, j])`` where ``alt >= 0``); with ``logit`` the
    pre-softmax logits. ``perturb``: zero ``perturbations`` entries (:func:`jaxspeech.layers.tap`)
    whose gradients are those of the tapped values; ``maps``: keep the attention maps."""
    n = target_tok.shape[1]
    start = seq.shape[1] - n
    variables = {"params": params} if not perturb else {"params": params, "perturbations": perturb}
    collections = ["intermediates"] + ([KEEP_ATTENTION_MAPS] if maps else [])
    logits, state = _module(config, rules, remat).apply(variables, x, tokens=seq,
                                                        mutable=collections)
    logp = logits[:, start - 1:start - 1 + n]  # [B, n, V]
    if not logit:
        logp = jax.nn.log_softmax(logp, axis=-1)
    picked = jnp.take_along_axis(logp, target_tok[..., None], axis=-1)[..., 0]
    other = jnp.take_along_axis(logp, jnp.maximum(alt, 0)[..., None], axis=-1)[..., 0]
    return (jnp.where(alt >= 0, picked - other, picked),
            flatten_intermediates(state.get("intermediates", {})))


def _one_hot_rows(scores, j):
    """The cotangent that picks token ``j``'s target of every item."""
    return jnp.zeros_like(scores).at[:, j].set(1.0)


@functools.partial(jax.jit, static_argnames=("config", "logit", "rules", "chunk", "remat"))
def token_gradients(config, params, seq, target_tok, alt, logit, x, rules=None, chunk=4,
                    remat=False):
    """One teacher-forced forward of ``seq [B, S]`` (prompt + text), then the backward of each
    text token's target (:func:`_teacher_forced`) mapped over the ``n`` tokens, ``chunk`` at
    a time. Returns ``(grad over x [n, B, ...], target [n, B], grad over the token
    embeddings [n, B, S, d], the embeddings [B, S, d])``; under ``rules`` the grads are LRP's.
    """
    n = target_tok.shape[1]

    def targets(x_, delta):
        s, inter = _teacher_forced(config, params, seq, target_tok, alt, logit, x_,
                                   {"decoder": {"embeddings": delta}}, rules=rules, remat=remat)
        return s, inter["decoder.embeddings"] - delta

    b, s = seq.shape
    delta = jnp.zeros((b, s, config.d_model), x.dtype)
    scores, backward, emb = jax.vjp(targets, x, delta, has_aux=True)

    def one_token(j):
        return backward(_one_hot_rows(scores, j))

    gx, gemb = jax.lax.map(one_token, jnp.arange(n), batch_size=min(chunk, n))
    return gx, scores.T, gemb, emb


# --- maps over the encoder's frames ----------------------------------------------------------

def encoder_frames_to_features(v, n_mels: int, n_frames: int) -> jnp.ndarray:
    """``v [..., S]``, one value per 20 ms encoder frame -> ``[..., n_mels, n_frames]``: each
    value spread evenly over the mel frames conv2's stride merged into it (two) and over the
    mel bins, so a map's total is kept."""
    v = jnp.asarray(v)
    per = n_frames // v.shape[-1]
    frames = jnp.repeat(v, per, axis=-1) / (per * n_mels)
    return jnp.broadcast_to(frames[..., None, :], v.shape[:-1] + (n_mels, n_frames))


def _clip_encoder_frames(num_frames) -> np.ndarray:
    """The encoder frames of each clip: those whose two mel frames lie inside it (the
    alignment heads' convention, openai's ``num_frames // 2``)."""
    return np.asarray(num_frames) // 2


def _encoder_frame_maps(m, method, args, x, num_frames, n_text, layer, chunk, item_chunk,
                        remat, extras):
    """``(maps [n, B, S_enc], targets [B, n])`` of an encoder-frame method; ``n_text [B]``:
    each item's number of text tokens."""
    config, params, seq, target_tok, alt, logit = args
    enc_frames = _clip_encoder_frames(num_frames)
    if method == "alignment_heads":
        rows = _alignment_rows(m, x, seq, n_text, target_tok.shape[1], enc_frames)
        scores = _token_targets(*args, x)
        return jnp.swapaxes(rows, 0, 1), scores
    # the maps' shapes for one item: every map-based method runs item by item
    paths = methods.layer_paths(config, x[:1], {"tokens": seq[:1]})
    items = (seq, target_tok, alt, x)
    if method == "gradcam":
        layer = layer or f"layers.{config.encoder_layers - 1}.hidden_state"
        over_frames = [name for name, (_, spec) in paths.items() if not name.startswith("decoder.")
                       and spec.ndim == 3 and spec.shape[1] == config.max_source_positions]
        if layer not in over_frames:
            raise ValueError("gradcam on a transcript reads an encoder layer's output over the "
                             "audio's frames; " + unknown_layer_message(layer, over_frames))
        path, spec = paths[layer]
        valid = jnp.arange(spec.shape[1])[None, :] < jnp.asarray(enc_frames)[:, None]
        extras["layer"] = layer
        return _gradcam(config, params, *items, valid, _spec(spec), logit, path, chunk,
                        item_chunk, remat)
    names = _rollout_names(config, paths)
    if method == "rollout":
        return _rollout(config, params, *items, logit, names, item_chunk)
    flat = tuple(name for group in names for name in group)
    return _gradient_rollout(
        config, params, *items, logit,
        [jnp.zeros(paths[k][1].shape, paths[k][1].dtype) for k in flat], names,
        tuple(paths[k][0] for k in flat), chunk, item_chunk, remat)


def _spec(spec) -> tuple[tuple[int, ...], str]:
    """A map's ``(shape, dtype)`` as a hashable static argument."""
    return tuple(spec.shape), str(spec.dtype)


def _over_items(one_item, items, item_chunk: int):
    """``one_item(*batch_of_one) -> (maps [n, 1, T], targets [1, n])`` mapped over the items
    (``items``: arrays with a leading ``[B]``), ``item_chunk`` at a time (vmapped), so the
    maps of at most ``item_chunk`` items are alive at once: ``(maps [n, B, T], targets [B, n])``.
    The items are independent (their own audio, their own causal decoder), so this is the
    batch's result."""
    def one(item):
        maps, scores = one_item(*(v[None] for v in item))
        return maps[:, 0], scores[0]

    # one item a step is a plain scan: no vmap around the model's backward
    k = min(item_chunk, len(items[0]))
    maps, scores = jax.lax.map(one, items, batch_size=None if k == 1 else k)
    return jnp.swapaxes(maps, 0, 1), scores


@functools.partial(jax.jit, static_argnames=("config", "logit"))
def _token_targets(config, params, seq, target_tok, alt, logit, x):
    """``targets [B, n]`` of the plain forward (no maps kept)."""
    return _teacher_forced(config, params, seq, target_tok, alt, logit, x)[0]


@functools.partial(jax.jit, static_argnames=("config", "logit", "path", "spec", "chunk",
                                             "item_chunk", "remat"))
def _gradcam(config, params, seq, target_tok, alt, x, valid, spec, logit, path, chunk=4,
             item_chunk=1, remat=False):
    """Grad-CAM of every token at the layer output ``path`` (``[1, T, C]`` per item, ``spec``
    its shape and dtype): ``(cams [n, B, T], targets [B, n])``. The layer's gradient comes
    from a zero ``perturbations`` entry there, one backward per token mapped over the tokens
    (``chunk`` at a time), item by item (:func:`_over_items`)."""
    name = ".".join(path)
    n = target_tok.shape[1]

    def one_item(seq, target_tok, alt, x, valid):
        def targets(z):
            s, inter = _teacher_forced(config, params, seq, target_tok, alt, logit, x,
                                       methods._nest(path, z), remat=remat)
            return s, inter[name]

        scores, backward, acts = jax.vjp(targets, jnp.zeros(*spec), has_aux=True)

        def one_token(j):
            (g,) = backward(_one_hot_rows(scores, j))
            return methods.gradcam_map(g, acts, valid)

        return jax.lax.map(one_token, jnp.arange(n), batch_size=min(chunk, n)), scores

    return _over_items(one_item, (seq, target_tok, alt, x, valid), item_chunk)


def _rollout_names(config, paths) -> tuple[tuple[str, ...], tuple[str, ...], tuple[str, ...]]:
    """The attention maps in layer order: encoder self-attention, decoder self-attention,
    cross-attention."""
    names = (tuple(f"layers.{i}.self_attn.attention" for i in range(config.encoder_layers)),
             tuple(f"decoder.layers.{i}.self_attn.attention" for i in range(config.decoder_layers)),
             tuple(f"decoder.layers.{i}.encoder_attn.attention"
                   for i in range(config.decoder_layers)))
    missing = [k for group in names for k in group if k not in paths]
    if missing:  # a model that taps its maps under other names
        raise ValueError(f"rollout reads the attention maps {missing}, which this model does "
                         f"not tap; it has {methods._attention_names(paths)}")
    return names


def _rows_to_one(r: jnp.ndarray) -> jnp.ndarray:
    """Rows scaled to sum to 1; rows of zeros stay zero."""
    total = r.sum(axis=-1, keepdims=True)
    return jnp.where(total > 0, r / jnp.where(total > 0, total, 1), 0.0)


def _decoder_to_encoder(selfs, crosses, normalise: bool) -> jnp.ndarray:
    """``C [B, S, T]`` with ``R_de = C R̄_ee``: from ``C = 0``, per decoder layer
    ``C += Ā_self C`` then ``C += Ā_cross`` (``selfs [B, S, S]``, ``crosses [B, S, T]``);
    ``normalise`` rescales the rows after every update (``rollout``: there ``R̄_ee``'s rows
    sum to 1, so ``R_de``'s rows then do too).

    The first layer's ``Ā_self C`` is skipped, not computed: ``C`` is 0 there. Computed as a
    product with a zeros array, it came out as garbage (NaN, 1e37) under ``jit`` of the
    token-mapped gradient rollout on XLA's CPU backend (jax 0.10.2; the same values, every
    one finite, eagerly and unrolled), and that was the NaN of batches of clips."""
    c = None
    for a_self, a_cross in zip(selfs, crosses, strict=True):
        if c is not None:
            c = c + jnp.einsum("bik,bkt->bit", a_self, c)
            c = _rows_to_one(c) if normalise else c
        c = a_cross if c is None else c + a_cross
        c = _rows_to_one(c) if normalise else c
    return c


def _times_encoder(v: jnp.ndarray, factors) -> jnp.ndarray:
    """``v [B, R, T]`` times ``F_L ⋯ F_1``, as vector-matrix products from the left: never
    ``T x T x T``."""
    for f in reversed(factors):
        v = jnp.einsum("brt,bts->brs", v, f)
    return v


@functools.partial(jax.jit, static_argnames=("config", "logit", "names", "item_chunk"))
def _rollout(config, params, seq, target_tok, alt, x, logit, names, item_chunk=1):
    """Attention rollout of every token: ``(maps [n, B, T], targets [B, n])``, item by item
    (:func:`_over_items`)."""
    enc, dec_self, cross = names
    n = target_tok.shape[1]
    start = seq.shape[1] - n

    def one_item(seq, target_tok, alt, x):
        scores, inter = _teacher_forced(config, params, seq, target_tok, alt, logit, x,
                                        maps=True)
        factors = []
        for name in enc:  # as methods.rollout: 0.5 A + 0.5 I, rows renormalised
            a = inter[name].mean(axis=1)
            a = 0.5 * a + 0.5 * jnp.eye(a.shape[-1], dtype=a.dtype)[None]
            factors.append(a / a.sum(axis=-1, keepdims=True))
        c = _decoder_to_encoder([inter[k].mean(axis=1) for k in dec_self],
                                [inter[k].mean(axis=1) for k in cross], normalise=True)
        rows = _times_encoder(c[:, start - 1:start - 1 + n], factors)
        return jnp.swapaxes(rows, 0, 1), scores

    return _over_items(one_item, (seq, target_tok, alt, x), item_chunk)


def _times_residual_normalised(v: jnp.ndarray, cams) -> jnp.ndarray:
    """``v [B, R, T]`` times ``R̄_ee = I + D⁻¹(R_ee - I)``, ``R_ee = (I + Ā_L) ⋯ (I + Ā_1)`` and
    ``D`` the row sums of ``R_ee - I`` (Chefer et al.'s eq. 8-9; a zero row stays the
    identity's), all vector-matrix products. ``R_ee - I`` is carried as itself, never as
    ``R_ee`` minus ``I``: the gradient-weighted maps are small (~1e-5 on a random model), and
    ``1 + d - 1`` would keep only float32's ~1e-7 of ``1`` of them."""
    d = jnp.zeros(v.shape[:1] + v.shape[2:], v.dtype)  # (R_l - I) 1, from the first layer up
    for a in cams:
        d = d + jnp.einsum("bts,bs->bt", a, 1.0 + d)
    d = d[:, None, :]
    w = jnp.where(d > 0, v / jnp.where(d > 0, d, 1.0), 0.0)
    excess = jnp.zeros_like(w)  # w (R_ee - I): from the last layer down, (w + excess) Ā
    for a in reversed(cams):
        excess = excess + jnp.einsum("brt,bts->brs", w + excess, a)
    return v + excess


@functools.partial(jax.jit, static_argnames=("config", "logit", "names", "paths", "chunk",
                                             "item_chunk", "remat"))
def _gradient_rollout(config, params, seq, target_tok, alt, x, logit, zeros, names, paths,
                      chunk=4, item_chunk=1, remat=False):
    """Gradient rollout of every token: ``(maps [n, B, T], targets [B, n])``, item by item
    (:func:`_over_items`). Every map's gradient comes from a zero ``perturbations`` entry on
    it (``zeros`` at ``paths``, one item's shapes, in the order of ``names``); each token's
    backward, its ``(∇A ⊙ A)⁺`` and its row of the rules are mapped over the tokens,
    ``chunk`` at a time."""
    enc, dec_self, cross = names
    n = target_tok.shape[1]
    start = seq.shape[1] - n
    flat = enc + dec_self + cross
    e, d = len(enc), len(dec_self)

    def one_item(seq, target_tok, alt, x):
        def targets(zs):
            perturb = unflatten(dict(zip(paths, zs, strict=True)))
            s, inter = _teacher_forced(config, params, seq, target_tok, alt, logit, x, perturb,
                                       remat=remat, maps=True)
            return s, [inter[k] for k in flat]

        scores, backward, maps = jax.vjp(targets, zeros, has_aux=True)

        def one_token(j):
            (grads,) = backward(_one_hot_rows(scores, j))
            cams = [jax.nn.relu(g * a).mean(axis=1) for g, a in zip(grads, maps, strict=True)]
            c = _decoder_to_encoder(cams[e:e + d], cams[e + d:], normalise=False)
            row = jax.lax.dynamic_slice_in_dim(c, start - 1 + j, 1, axis=1)  # [1, 1, T]
            return _times_residual_normalised(row, cams[:e])[:, 0]

        return jax.lax.map(one_token, jnp.arange(n), batch_size=min(chunk, n)), scores

    return _over_items(one_item, (seq, target_tok, alt, x), item_chunk)


def _alignment_rows(m, x, seq, n_text, n: int, enc_frames) -> jnp.ndarray:
    """``[B, n, S_enc]``: token j's row of the alignment heads' matrix (:mod:`jaxspeech.timing`:
    their cross-attention over the clip's encoder frames, standardised over the tokens,
    median-filtered, averaged over the heads), the row of the position that predicts it.
    ``seq [B, p + n]``: prompt + text (item b's ``n_text[b]`` tokens, then padding)."""
    from jaxspeech import timing

    cfg = m.config
    gen = m.extras.get("generation") or {}
    if not gen.get("alignment_heads"):
        raise ValueError("alignment_heads reads the checkpoint's alignment heads; this model's "
                         "extras['generation'] has none ([[layer, head], ...])")
    heads = tuple(tuple(int(v) for v in h) for h in gen["alignment_heads"])
    bad = [h for h in heads if not (0 <= h[0] < cfg.decoder_layers
                                    and 0 <= h[1] < cfg.decoder_attention_heads)]
    if bad:
        raise ValueError(f"alignment heads {bad} are outside the decoder's {cfg.decoder_layers} "
                         f"layers x {cfg.decoder_attention_heads} heads")
    if "eos_token_id" not in gen:
        raise ValueError("the model's extras['generation'] has no eos_token_id")
    eot = int(gen["eos_token_id"])
    seq = np.asarray(seq)
    p = seq.shape[1] - n
    # prompt + text + <|endoftext|>, as word timestamps read it; the rows past an item's
    # text are never used, and causal attention keeps them from the others
    tokens = np.concatenate([seq, np.full((len(seq), 1), eot, np.int32)], axis=1)
    matrix, _ = timing._alignment_matrix(
        cfg, m.params, x, jnp.asarray(tokens), jnp.asarray(p + np.asarray(n_text) + 1, jnp.int32),
        jnp.asarray(enc_frames, jnp.int32), heads=heads, eot=eot, medfilt_width=7, qk_scale=1.0)
    return matrix[:, p - 1:p - 1 + n]
