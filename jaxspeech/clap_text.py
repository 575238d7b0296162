"""CLAP's text side in JAX: the RoBERTa text tower, text embeddings and zero-shot classification.

A ``ClapModel`` checkpoint loads as one :class:`~jaxspeech.model.Model` whose ``m.text`` is
its :class:`TextTower` (config, params, the folder's tokenizer, ``logit_scale_t``); the
audio tower stays ``m.params``, so every audio entry point is unchanged, and ``js.save`` /
``js.load`` keep both. An audio-only checkpoint (``ClapAudioModelWithProjection``) has
``m.text = None`` and says so when text is asked of it. No torch anywhere on this path.

    texts = ["a dog barking", "rain on a roof"]
    t = js.clap_text_embeddings(m, texts)                    # [2, 512], L2-normalised
    t = js.clap_text_embeddings("path/to/clap", texts)       # or from a checkpoint folder
    p = js.zero_shot(m, wave, texts)                         # [B, 2] probabilities
    p = js.zero_shot(m, wave, t, logit_scale=33.37)          # with precomputed embeddings
    e = m.text.apply(m.text.params, ids, mask)               # the pure, jitted tower

``zero_shot`` reproduces ``ClapModel(...).logits_per_audio.softmax(-1)``:
``exp(logit_scale_a) · normalise(audio) · normalise(text)ᵀ``, softmax over the texts.
(HF's zero-shot *pipeline* first writes each label into "This is a sound of {}.";
pass ``template="This is a sound of {}."`` to do the same.)
"""

from __future__ import annotations

import functools
import os
from collections.abc import Sequence
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from jaxspeech import layers, lrp
from jaxspeech.model import flatten_intermediates
from jaxspeech.models.clap_text import ClapText, ClapTextConfig, init_params
from jaxspeech.roberta_tokenizer import RobertaTokenizer, TextTokens, TokenizerError

__all__ = ["TextTower", "text_tower", "clap_text_embeddings", "zero_shot", "clap_logit_scale",
           "TokenizerError"]


@functools.partial(jax.jit, static_argnames=("config", "rules", "normalize"))
def _apply(config, params, input_ids, attention_mask, inputs_embeds=None, rules=None,
           normalize=True):
    return ClapText(config, rules, normalize).apply({"params": params}, input_ids, attention_mask,
                                                    inputs_embeds)


@functools.partial(jax.jit, static_argnames=("config", "rules"))
def _forward(config, params, input_ids, attention_mask, rules=None):
    out, state = ClapText(config, rules).apply(
        {"params": params}, input_ids, attention_mask,
        mutable=["intermediates", layers.KEEP_ATTENTION_MAPS])
    return out, flatten_intermediates(state.get("intermediates", {}))


class TextTower:
    """CLAP's text tower: ``config`` (:class:`~jaxspeech.models.clap_text.ClapTextConfig`),
    ``params`` (``text_model.*``, ``text_projection.*``), the checkpoint's ``tokenizer``
    (``None`` when the folder had none: embedding ids still works, strings do not) and
    ``logit_scale_t`` (``ClapModel.logit_scale_t``, ``None`` if unknown).

    Like :class:`~jaxspeech.model.Model` it holds no state: ``apply`` takes any params tree
    of the same structure.
    """

    def __init__(self, config: ClapTextConfig, params: dict,
                 tokenizer: RobertaTokenizer | None = None, *, logit_scale_t: float | None = None,
                 tokenizer_problem: str | None = None):
        self.config = config
        self.params = params
        self.tokenizer = tokenizer
        self.logit_scale_t = logit_scale_t
        self._tokenizer_problem = tokenizer_problem
        if tokenizer is not None and tokenizer.pad_id != config.pad_token_id:
            raise TokenizerError(f"the tokenizer's <pad> is id {tokenizer.pad_id}, the text "
                                 f"tower's pad_token_id {config.pad_token_id}: not this model's "
                                 "tokenizer")
        if tokenizer is not None and tokenizer.vocab_size > config.vocab_size:
            raise TokenizerError(f"the tokenizer has {tokenizer.vocab_size} tokens, the text "
                                 f"tower's table {config.vocab_size}: not this model's tokenizer")

    def __repr__(self) -> str:
        from jaxspeech.model import count_params

        return (f"TextTower({count_params(self.params):,} params, {self.config.num_hidden_layers} "
                f"layers, max {self.max_length} tokens, tokenizer "
                f"{'yes' if self.tokenizer else 'none'})")

    @property
    def max_length(self) -> int:
        """Tokens per text (with <s> and </s>): the position table's limit and the
        tokenizer's ``model_max_length``, whichever is smaller."""
        limit = self.config.max_length
        if self.tokenizer is not None and self.tokenizer.max_length is not None:
            limit = min(limit, self.tokenizer.max_length)
        return limit

    def tokenize(self, texts: str | Sequence[str]) -> TextTokens:
        """Texts -> :class:`~jaxspeech.roberta_tokenizer.TextTokens` (cut at
        :attr:`max_length` with a warning; an empty text raises ``ValueError``)."""
        if self.tokenizer is None:
            raise TokenizerError(self._tokenizer_problem or
                                 "this text tower has no tokenizer; tokenize with RoBERTa's "
                                 "and pass input_ids / attention_mask to apply")
        return self.tokenizer.encode(texts, max_length=self.max_length)

    def apply(self, params, input_ids, attention_mask, *, inputs_embeds=None, rules=None,
              normalize: bool = True) -> jax.Array:
        """Pure, jitted: ``input_ids``, ``attention_mask [N, L]`` -> embeddings
        ``[N, projection_dim]`` (L2-normalised unless ``normalize=False``)."""
        return _apply(self.config, params, jnp.asarray(input_ids), jnp.asarray(attention_mask),
                      inputs_embeds, rules=lrp.get_rules(rules), normalize=normalize)

    def forward(self, params, input_ids, attention_mask, *, rules=None):
        """``(embeddings, intermediates)``: ``"text_model.encoder.layer.3.hidden_state"``,
        ``"...layer.3.attention.self.attention"`` ``[N, heads, L, L]``, ``"text_model.pooler_output"``."""
        return _forward(self.config, params, jnp.asarray(input_ids), jnp.asarray(attention_mask),
                        rules=lrp.get_rules(rules))

    def embed(self, texts: str | Sequence[str], *, batch_size: int = 64) -> np.ndarray:
        """``texts`` (N strings) -> L2-normalised embeddings ``[N, projection_dim]`` float32,
        as ``ClapModel.get_text_features`` on the tokenizer's ids. Batches of ``batch_size``
        texts of similar length (sorted by length, returned in the order given; the last
        batch padded to a power of two), each padded to its own longest text rounded up to a
        multiple of 16 tokens: padding changes no embedding, only the work done."""
        tokens = self.tokenize(texts)
        order = np.argsort(tokens.lengths, kind="stable")
        out = []
        for start in range(0, len(tokens), batch_size):
            part = tokens.take(order[start:start + batch_size])
            rows = len(part)
            padded = min(batch_size, 1 << max(rows - 1, 0).bit_length())
            index = np.concatenate([np.arange(rows), np.zeros(padded - rows, int)])
            width = int(-(-part.lengths.max() // 16) * 16)  # this batch's own longest text
            ids, mask = part.input_ids[index, :width], part.attention_mask[index, :width]
            out.append(np.asarray(self.apply(self.params, ids, mask))[:rows])
        embeddings = np.empty((len(tokens), self.config.projection_dim), np.float32)
        embeddings[order] = np.concatenate(out)
        return embeddings

    __call__ = embed


def init_text(config: ClapTextConfig | str = "clap-htsat-unfused", seed: int = 0, *,
              tokenizer: RobertaTokenizer | None = None) -> TextTower:
    """A text tower with random weights (a config or a preset name of
    :data:`jaxspeech.models.clap_text.PRESETS`)."""
    from jaxspeech.models.clap_text import PRESETS

    if isinstance(config, str):
        if config not in PRESETS:
            raise ValueError(f"unknown CLAP text preset {config!r}; known: {sorted(PRESETS)}")
        config = PRESETS[config]
    return TextTower(config, init_params(config, seed), tokenizer)


def text_tower(m) -> TextTower:
    """``m``'s text tower (``m`` a CLAP :class:`~jaxspeech.model.Model` or a
    :class:`TextTower`); ``ValueError`` saying why when it has none."""
    if isinstance(m, TextTower):
        return m
    tower = getattr(m, "text", None)
    if tower is not None:
        return tower
    kind = getattr(m, "kind", type(m).__name__)
    if kind != "clap":
        raise ValueError(f"a {kind} model has no text tower; text needs a CLAP ClapModel checkpoint")
    arch = m.extras.get("architecture", "this checkpoint")
    raise ValueError(f"{arch} has no text tower (an audio-only CLAP checkpoint such as "
                     "ClapAudioModelWithProjection); load a full ClapModel folder (config.json "
                     "model_type 'clap', text_model.* weights and its tokenizer.json) for text")


@functools.lru_cache(maxsize=4)
def _folder_tower(path: str, stamp: float) -> TextTower:
    import jaxspeech as js

    return text_tower(js.load(path))


def _resolve(model_or_folder) -> TextTower:
    if isinstance(model_or_folder, (str, os.PathLike)):
        path = Path(model_or_folder).resolve()
        if not path.is_dir():
            raise ValueError(f"{path} is not a checkpoint folder (an HF ClapModel or jaxspeech "
                             "CLAP folder)")
        return _folder_tower(str(path), path.stat().st_mtime)
    return text_tower(model_or_folder)


def clap_text_embeddings(model_or_folder, texts: str | Sequence[str], *,
                         batch_size: int = 64) -> np.ndarray:
    """``texts`` (N strings) -> L2-normalised embeddings ``[N, projection_dim]`` float32
    (``ClapModel.get_text_features`` with the checkpoint's tokenizer), in JAX.

    ``model_or_folder``: a CLAP model (``js.load`` of a ClapModel folder), its
    :class:`TextTower`, or a checkpoint folder (HF ClapModel or jaxspeech; loaded once)."""
    return _resolve(model_or_folder).embed(texts, batch_size=batch_size)


def clap_logit_scale(m, checkpoint_dir: str | os.PathLike | None = None) -> float:
    """``exp(logit_scale_a)`` of ``m``'s checkpoint: from ``m.extras`` (kept by the HF
    loader and by ``m.save``), else read from ``checkpoint_dir``'s weights."""
    if "logit_scale_a" in m.extras:
        return float(np.exp(m.extras["logit_scale_a"]))
    if checkpoint_dir is not None:
        from jaxspeech.convert.common import find_weights, read_state_dict

        weights = find_weights(checkpoint_dir)
        state = read_state_dict(weights) if weights else {}
        if "logit_scale_a" in state:
            return float(np.exp(np.asarray(state["logit_scale_a"])))
    raise ValueError("no logit_scale_a known for this model (a ClapAudioModelWithProjection has "
                     "none); pass logit_scale= (the multiplier, exp of ClapModel.logit_scale_a)")


def _normalise(x: jnp.ndarray) -> jnp.ndarray:
    return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def zero_shot(m, wave, labels_or_text_embeddings, *, checkpoint_dir: str | os.PathLike | None = None,
              logit_scale: float | None = None, template: str = "{}",
              sample_rate: int | None = None, **prepare_options) -> jax.Array:
    """Audio-text zero-shot probabilities ``[B, N]`` for ``wave`` (as ``m(wave)`` takes it).

    ``labels_or_text_embeddings``: N label strings (each written into ``template`` and
    embedded by ``m``'s text tower, or by the one of ``checkpoint_dir`` when given) or an
    ``[N, D]`` array of text embeddings (normalised here, as ClapModel does).
    ``logit_scale``: the multiplier ``exp(logit_scale_a)``; ``None`` reads it from the
    checkpoint (:func:`clap_logit_scale`). ``prepare_options`` go to the front end
    (``key``, ``crops``, ``longer``)."""
    labels = labels_or_text_embeddings
    if isinstance(labels, str):
        labels = [labels]
    if isinstance(labels, (list, tuple)) and labels and all(isinstance(t, str) for t in labels):
        tower = _resolve(checkpoint_dir) if checkpoint_dir is not None else text_tower(m)
        text = tower.embed([template.format(t) for t in labels])
    else:
        text = np.asarray(labels, np.float32)
        if text.ndim != 2:
            raise ValueError(f"text embeddings must be [N, D], got shape {text.shape}")
    if logit_scale is None:
        source = m.source if m.source and os.path.isdir(m.source) else None
        logit_scale = clap_logit_scale(m, checkpoint_dir if checkpoint_dir is not None else source)
    audio = m(wave, sample_rate=sample_rate, **prepare_options)
    if audio.shape[-1] != text.shape[-1]:
        raise ValueError(f"audio embeddings have {audio.shape[-1]} dims, text embeddings "
                         f"{text.shape[-1]}")
    logits = float(logit_scale) * jnp.einsum("bd,nd->bn", _normalise(audio),
                                              _normalise(jnp.asarray(text)), precision="highest")
    return jax.nn.softmax(logits, axis=-1)
