"""``jaxspeech.attribute_match``: which sounds and which words made a CLAP audio-text match.

    res = js.attribute_match(m, wave, ["a dog barking", "rain on a roof"], method="attnlrp")
    res.score                   # [B, N] cosine similarity of each clip with each text
    res.audio_relevance         # [B, N, C, T, 64] over the audio features, per text
    res.text_relevance          # [B, N, L] over the text tokens, per clip
    res.word_relevance          # [B, N, W] tokens merged to the texts' words
    res.words(0, 1)             # [("rain", 0.12), ("on", 0.01), ...] clip 0, text 1
    res.audio(1)                # an Attribution of every clip for text 1 (frames, waveform)
    res = js.attribute_match(m, waves, captions, pairs=True)   # clip b with caption b: [B, ...]
    match_figure("m.png", res, 0, 1)                            # the picture

The target is CLAP's audio-text similarity ``s = â · t̂`` (the two L2-normalised
embeddings; ``logits_per_audio`` is ``exp(logit_scale_a) · s``). One compiled call runs
the audio tower once on the batch and the text tower once on the texts, then every
backward: for text n, one audio backward explains ``s[:, n]`` for all clips at once (items
never meet in the audio tower); for clip b, one text backward explains ``s[b, :]`` for all
texts. ``chunk`` backwards run side by side (``jax.lax.map``), so memory stays that of
``chunk`` backwards whatever B and N are. With ``pairs=True`` (as many texts as clips)
only the matching pairs ``s[b, b]`` are explained: one backward per tower.

**Rules on both sides.** Each tower runs under the rule set (paths ``audio_model.*``,
``audio_projection.*``, ``text_model.*``, ``text_projection.*`` for overrides); the
norms of both embeddings are constants (as LayerNorm's σ), and the similarity itself is a
product of two activations, :func:`jaxspeech.lrp.bilinear` at path ``"similarity"``, so
it splits as the rule set splits q·kᵀ: the uniform rule (AttnLRP, ε, γ, z+) gives each
side half of ``s``, a plain gradient (CP-LRP, gradient × input) gives each side all of it
with the other side held constant. Where the towers conserve (bias-free, CP-LRP) the
relevance of the audio features and of the text tokens therefore add up to ``s``
(uniform) or each is ``s`` (gradient); :meth:`MatchAttribution.conservation` reports
both sides. Text relevance is read at the word embeddings (``R = Σ_d e·∂s/∂e``, as LXT
reads it); the position and token-type embeddings act as biases, so ``<s>`` and ``</s>``
(:attr:`MatchAttribution.special_relevance`) and the positions take the rest.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxspeech import lrp
from jaxspeech.attribution import LRP_METHODS, Attribution, methods
from jaxspeech.model import _module
from jaxspeech.models.clap_text import ClapText, word_embeddings
from jaxspeech.roberta_tokenizer import TextTokens

__all__ = ["attribute_match", "MatchAttribution", "MATCH_METHODS", "SIMILARITY"]

MATCH_METHODS = LRP_METHODS + ("gradient_x_input",)
SIMILARITY = "similarity"  # the layer path of the similarity product, for rule overrides


@dataclasses.dataclass(frozen=True)
class MatchAttribution:
    """Relevance of an audio-text similarity over both inputs.

    All pairs: ``score [B, N]``, ``audio_relevance [B, N, *features]``, ``text_relevance
    [B, N, L]`` (clip b, text n). ``pairs``: ``score [B]``, ``audio_relevance
    [B, *features]``, ``text_relevance [B, L]`` (clip b with text b). ``tokens``: the
    tokenized texts (:class:`~jaxspeech.roberta_tokenizer.TextTokens`, ``L`` tokens each).
    """

    score: jnp.ndarray
    audio_relevance: jnp.ndarray
    text_relevance: jnp.ndarray
    features: jnp.ndarray
    tokens: TextTokens
    method: str
    pairs: bool
    model: Any = dataclasses.field(repr=False)
    wave: Any = dataclasses.field(default=None, repr=False)
    extras: dict = dataclasses.field(default_factory=dict)

    def _text_of(self, b: int, n: int | None) -> int:
        if self.pairs:
            if n not in (None, b):
                raise ValueError(f"pairs=True explains clip {b} with text {b} only, not text {n}")
            return b
        if n is None:
            raise ValueError("give the text index n (all pairs were explained)")
        return n

    def _pair(self, array, b: int, n: int | None):
        return array[b] if self.pairs else array[b, self._text_of(b, n)]

    @property
    def word_relevance(self) -> np.ndarray:
        """``[B, N, W]`` (pairs: ``[B, W]``): each word's tokens summed (``W`` the most words
        of any text, 0 past a text's own words)."""
        index = self.tokens.word_index  # [N, L], -1: <s>, </s>, padding
        onehot = (index[..., None] == np.arange(max(int(index.max()) + 1, 1))).astype(np.float32)
        rel = np.asarray(self.text_relevance, np.float32)
        if self.pairs:
            return np.einsum("bl,blw->bw", rel, onehot)
        return np.einsum("bnl,nlw->bnw", rel, onehot)

    @property
    def special_relevance(self) -> np.ndarray:
        """``[B, N]`` (pairs ``[B]``): the relevance of ``<s>`` and ``</s>``."""
        special = ((self.tokens.word_index < 0) & (self.tokens.attention_mask > 0)).astype(np.float32)
        rel = np.asarray(self.text_relevance, np.float32)
        return (rel * special).sum(-1) if self.pairs else np.einsum("bnl,nl->bn", rel, special)

    def words(self, b: int, n: int | None = None) -> list[tuple[str, float]]:
        """``[(word, relevance)]`` of text ``n`` (pairs: text ``b``) for clip ``b``."""
        t = self._text_of(b, n)
        rel = self._pair(self.word_relevance, b, n)
        return [(w, float(rel[i])) for i, w in enumerate(self.tokens.words[t])]

    def audio(self, n: int | None = None) -> Attribution:
        """The audio side as an :class:`~jaxspeech.attribution.Attribution` (relevance
        ``[B, *features]``, score ``[B]``): every clip for text ``n``, or (pairs) each clip
        for its own text — so ``frames()``, ``to_waveform()`` and the heatmaps apply."""
        if self.pairs:
            rel, score = self.audio_relevance, self.score
        else:
            if n is None:
                raise ValueError("give the text index n (all pairs were explained)")
            rel, score = self.audio_relevance[:, n], self.score[:, n]
        return Attribution(rel, score, self.features, self.method, "text_similarity", self.model,
                           wave=self.wave, extras=dict(self.extras.get("audio_extras", {})))

    def conservation(self) -> dict[str, np.ndarray]:
        """``{"audio", "text", "total"}``, each ``[B, N]`` (pairs ``[B]``): the relevance of
        each side (and of both) over the score. Bias-free with conserving rules: 0.5 / 0.5 /
        1 under the uniform product rule, 1 / 1 / 2 under a plain gradient."""
        score = np.asarray(self.score, np.float64)
        audio_axes = tuple(range(1 if self.pairs else 2, self.audio_relevance.ndim))
        audio = np.asarray(self.audio_relevance, np.float64).sum(audio_axes) / score
        text = np.asarray(self.text_relevance, np.float64).sum(-1) / score
        return {"audio": audio, "text": text, "total": audio + text}


def _unit(x, rules):
    """``x / |x|`` (``F.normalize``); under LRP ``|x|`` is a constant."""
    norm = jnp.sqrt(jnp.sum(jnp.square(x), axis=-1, keepdims=True))
    return x / lrp.norm_std(jnp.maximum(norm, 1e-12), rules)


@functools.partial(jax.jit, static_argnames=("audio_config", "text_config", "rules", "pairs",
                                             "chunk"))
def match_relevance(audio_config, text_config, audio_params, text_params, features, kwargs,
                    input_ids, attention_mask, rules=None, pairs: bool = False, chunk: int = 1):
    """``(score, audio relevance, text relevance)`` of the similarity of each clip (features
    ``[B, ...]``) with each text (``input_ids``, ``attention_mask [N, L]``), or of the
    matching pairs (``pairs``, N = B): shapes as :class:`MatchAttribution`'s. Pure, jitted."""
    audio_module = _module(audio_config, rules, False)
    text_module = ClapText(text_config, rules)
    sim_rules = None if rules is None else rules.at(SIMILARITY)

    def audio_embedding(x):
        a = audio_module.apply({"params": audio_params}, x, **kwargs)
        # ClapModel's audio tower normalises already; ClapAudioModelWithProjection's does not
        return a if audio_config.normalize else _unit(a, rules)

    def text_embedding(e):
        return text_module.apply({"params": text_params}, input_ids, attention_mask, e)

    embeds = word_embeddings(text_params, input_ids)
    a, audio_back = jax.vjp(audio_embedding, features)
    t, text_back = jax.vjp(text_embedding, embeds)
    equation = "bd,bd->b" if pairs else "bd,nd->bn"
    score, sim_back = jax.vjp(lambda a_, t_: lrp.bilinear(equation, a_, t_, sim_rules), a, t)

    def audio_side(cotangent):
        return features * audio_back(sim_back(cotangent)[0])[0]

    def text_side(cotangent):
        return (embeds * text_back(sim_back(cotangent)[1])[0]).sum(-1)

    if pairs:
        ones = jnp.ones_like(score)
        return score, audio_side(ones), text_side(ones)
    b, n = score.shape
    # for text j: s[:, j] of every clip in one audio backward; for clip i: s[i, :] of every
    # text in one text backward
    audio_rel = jax.lax.map(lambda j: audio_side(jnp.zeros_like(score).at[:, j].set(1.0)),
                            jnp.arange(n), batch_size=min(chunk, n))
    text_rel = jax.lax.map(lambda i: text_side(jnp.zeros_like(score).at[i, :].set(1.0)),
                           jnp.arange(b), batch_size=min(chunk, b))
    return score, jnp.moveaxis(audio_rel, 0, 1), text_rel


def attribute_match(model, wave=None, texts: str | Sequence[str] | TextTokens = (),
                    method: str = "attnlrp", *, features=None, pairs: bool = False,
                    sample_rate: int | None = None, params=None, text_params=None,
                    rules: lrp.RuleSet | None = None, epsilon: float | None = None,
                    gamma: float | None = None, chunk: int = 1,
                    **prepare_options) -> MatchAttribution:
    """Explain CLAP's audio-text similarity of each clip of ``wave`` (or of precomputed
    ``features``) with each of ``texts``, over the audio features and the text tokens at
    once (module docs): one compiled call, both towers under the same rules.

    ``model``: a CLAP model with its text tower (``js.load`` of a ClapModel folder).
    ``method``: an LRP rule set (``attnlrp``, ``cp_lrp``, ``epsilon``, ``gamma``,
    ``zplus``; ``rules=`` for a custom :class:`~jaxspeech.lrp.RuleSet`, ``epsilon`` /
    ``gamma`` its parameters) or ``gradient_x_input``. ``pairs``: explain clip b with text
    b only (``len(texts)`` must be the batch size). ``params`` / ``text_params``: other
    params trees for the audio / text tower. ``chunk``: backwards run side by side.
    Front-end options (``lengths``, ``key``, ``crops``) pass through as to ``js.attribute``.
    """
    from jaxspeech.clap_text import text_tower

    if method not in MATCH_METHODS and rules is None:
        raise ValueError(f"attribute_match explains with {', '.join(MATCH_METHODS)}; got "
                         f"{method!r} (for other methods on the audio side use js.attribute with "
                         "js.targets.text_similarity)")
    if model.kind != "clap":
        raise ValueError(f"attribute_match explains a CLAP audio-text match; this is a {model.kind} "
                         "model")
    tower = text_tower(model)
    tokens = texts if isinstance(texts, TextTokens) else tower.tokenize(texts)
    features, kwargs = model.inputs(wave, features, sample_rate=sample_rate, **prepare_options)
    if pairs and len(tokens) != features.shape[0]:
        raise ValueError(f"pairs=True explains clip b with text b: got {features.shape[0]} clips "
                         f"and {len(tokens)} texts")
    if chunk < 1:
        raise ValueError(f"chunk must be >= 1, got {chunk}")
    if rules is None and method in LRP_METHODS:
        rules = methods.rules_for(method, epsilon, gamma)
    score, audio_rel, text_rel = match_relevance(
        model.config, tower.config, model.params if params is None else params,
        tower.params if text_params is None else text_params, features, kwargs,
        jnp.asarray(tokens.input_ids), jnp.asarray(tokens.attention_mask), rules=rules,
        pairs=pairs, chunk=chunk)
    name = rules.name if rules is not None else method
    extras = {}
    if wave is not None:
        extras["audio_extras"] = {"n_samples": np.asarray([np.shape(c)[-1] for c in wave])
                                  if isinstance(wave, (list, tuple))
                                  else np.full(features.shape[0], np.shape(wave)[-1])}
    return MatchAttribution(score, audio_rel, text_rel, features, tokens, name, pairs, model,
                            wave=None if wave is None else wave, extras=extras)
