"""Whisper (Radford et al. 2022), as ``transformers``' ``WhisperForConditionalGeneration``.

Encoder:
    features [B, n_mels, 3000]
      -> conv1 (k3, pad 1) -> GELU -> conv2 (k3, stride 2, pad 1) -> GELU
      -> + embed_positions [1500, d_model]                     "embeddings"
      -> layers.i: x += self_attn(self_attn_layer_norm(x))     "layers.i.self_attn.attention"
                      (per-head context before out_proj)        "layers.i.self_attn.heads"
                   x += fc2(GELU(fc1(final_layer_norm(x))))    "layers.i.hidden_state"
      -> layer_norm                                             encoder output [B, 1500, d_model]

Decoder (when the config has one), given tokens [B, L]:
      embed_tokens(tokens) + embed_positions[:L]               "decoder.embeddings"
      -> decoder.layers.i: x += self_attn(LN(x))  (causal)     "decoder.layers.i.self_attn.attention"
                           x += encoder_attn(LN(x), encoder)   "decoder.layers.i.encoder_attn.attention"
                           x += fc2(GELU(fc1(LN(x))))          "decoder.layers.i.hidden_state"
      -> decoder.layer_norm -> @ embed_tokens.T (tied)          logits [B, L, vocab_size]

Parameter paths mirror the PyTorch names (``layers.3.self_attn.q_proj.kernel``,
``decoder.layers.0.encoder_attn.k_proj.kernel``). The quoted names are the
intermediates ``Model.forward`` returns; encoder attention maps are
``[B, heads, 1500, 1500]``, the decoder's ``[B, heads, L, L]`` and ``[B, heads, L, 1500]``;
each attention's ``heads`` is its context ``[B, T, heads, head_dim]`` before ``out_proj``
(``decoder.layers.i.self_attn.heads``, ``decoder.layers.i.encoder_attn.heads`` too).
Relevance-bearing ops go through :mod:`jaxspeech.layers` / :mod:`jaxspeech.lrp`.
Greedy decoding runs the decoder step by step on a KV cache
(:func:`decoder_cache`, :func:`decode_step`).
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxspeech import layers, lrp
from jaxspeech.frontends import whisper as frontend
from jaxspeech.model import Family, register_family

Rules = lrp.RuleSet | None


@dataclasses.dataclass(frozen=True)
class WhisperConfig:
    """Hyper-parameters, named as in HF's ``WhisperConfig``; ``decoder_layers=0`` is an
    encoder-only model (the default, and what encoder-only checkpoints load as)."""

    n_mels: int = 80
    d_model: int = 384
    encoder_layers: int = 4
    encoder_attention_heads: int = 6
    encoder_ffn_dim: int = 1536
    max_source_positions: int = 1500
    vocab_size: int = 0
    decoder_layers: int = 0
    decoder_attention_heads: int = 0
    decoder_ffn_dim: int = 0
    max_target_positions: int = 448
    # the compute dtype (mixed precision; params stay float32): "float32", "bfloat16", "float16"
    dtype: str = "float32"

    @property
    def head_dim(self) -> int:
        return self.d_model // self.encoder_attention_heads

    @property
    def decoder_head_dim(self) -> int:
        return self.d_model // self.decoder_attention_heads

    @property
    def has_decoder(self) -> bool:
        return self.decoder_layers > 0

    @property
    def n_frames(self) -> int:
        return 2 * self.max_source_positions

    @property
    def n_samples(self) -> int:
        """The analysis window in samples: 30 s for the released models; a smaller
        ``max_source_positions`` gives a shorter window (100 -> 2 s)."""
        return self.n_frames * frontend.HOP_LENGTH

    def __post_init__(self):
        layers.check_dtype(self.dtype)
        for part, heads, layers_ in (("encoder", self.encoder_attention_heads, self.encoder_layers),
                                     ("decoder", self.decoder_attention_heads, self.decoder_layers)):
            if layers_ and (heads <= 0 or self.d_model % heads):
                raise ValueError(
                    f"Whisper {part}_attention_heads={heads} does not divide d_model="
                    f"{self.d_model}" + ("; set decoder_attention_heads too, or decoder_layers=0 "
                                         "for an encoder-only model" if part == "decoder" else ""))

    def normalised(self) -> WhisperConfig:
        """The same model with unused decoder fields cleared (``decoder_layers=0``)."""
        return self if self.has_decoder else self.encoder_only()

    def encoder_only(self) -> WhisperConfig:
        return dataclasses.replace(self, vocab_size=0, decoder_layers=0,
                                   decoder_attention_heads=0, decoder_ffn_dim=0)

    @classmethod
    def from_hf_config(cls, hf: Mapping, decoder: bool = True) -> WhisperConfig:
        """From a ``config.json`` dict (transformers 4 or 5); refuses what the port lacks.
        ``decoder=False``: the encoder only (a checkpoint without decoder tensors)."""
        act = hf.get("activation_function", "gelu")
        if act != "gelu":
            raise ValueError(f"Whisper config activation_function={act!r}: only 'gelu' is ported")
        if hf.get("scale_embedding"):
            raise ValueError("Whisper config scale_embedding=True is not supported by the port")
        config = cls(
            n_mels=int(hf.get("num_mel_bins", 80)),
            d_model=int(hf["d_model"]),
            encoder_layers=int(hf["encoder_layers"]),
            encoder_attention_heads=int(hf["encoder_attention_heads"]),
            encoder_ffn_dim=int(hf["encoder_ffn_dim"]),
            max_source_positions=int(hf.get("max_source_positions", 1500)),
            vocab_size=int(hf.get("vocab_size", 51865)),
            decoder_layers=int(hf.get("decoder_layers", 0)),
            decoder_attention_heads=int(hf.get("decoder_attention_heads", 0)),
            decoder_ffn_dim=int(hf.get("decoder_ffn_dim", 0)),
            max_target_positions=int(hf.get("max_target_positions", 448)),
        )
        return config if decoder and config.has_decoder else config.encoder_only()


def _size(d, layers_, heads, n_mels=80, decoder_layers=None, vocab=51865):
    return WhisperConfig(n_mels=n_mels, d_model=d, encoder_layers=layers_,
                         encoder_attention_heads=heads, encoder_ffn_dim=4 * d,
                         vocab_size=vocab, decoder_layers=layers_ if decoder_layers is None
                         else decoder_layers, decoder_attention_heads=heads, decoder_ffn_dim=4 * d)


# The released sizes (OpenAI's ``dims``); ``.en`` models have no language tokens (51864).
PRESETS = {
    "whisper-tiny": _size(384, 4, 6),
    "whisper-tiny.en": _size(384, 4, 6, vocab=51864),
    "whisper-base": _size(512, 6, 8),
    "whisper-base.en": _size(512, 6, 8, vocab=51864),
    "whisper-small": _size(768, 12, 12),
    "whisper-small.en": _size(768, 12, 12, vocab=51864),
    "whisper-medium": _size(1024, 24, 16),
    "whisper-medium.en": _size(1024, 24, 16, vocab=51864),
    "whisper-large-v2": _size(1280, 32, 20),
    "whisper-large-v3": _size(1280, 32, 20, n_mels=128, vocab=51866),
    # turbo keeps large-v3's encoder; its decoder is pruned to 4 layers.
    "whisper-large-v3-turbo": _size(1280, 32, 20, n_mels=128, decoder_layers=4, vocab=51866),
}


def sinusoids(length: int, channels: int, max_timescale: float = 10000.0) -> np.ndarray:
    """Whisper's positional table ``[length, channels]``: ``[sin | cos]``."""
    log_increment = np.log(max_timescale) / (channels // 2 - 1)
    inv = np.exp(-log_increment * np.arange(channels // 2))
    t = np.arange(length)[:, None] * inv[None, :]
    return np.concatenate([np.sin(t), np.cos(t)], axis=1).astype(np.float32)


class SelfAttention(nn.Module):
    config: WhisperConfig
    rules: Rules = None

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        cfg, r = self.config, layers.rules_at(self, self.rules)
        b, t, d = x.shape
        heads = (b, t, cfg.encoder_attention_heads, cfg.head_dim)
        q = layers.Dense(d, rules=self.rules, name="q_proj")(x) * cfg.head_dim**-0.5
        k = layers.Dense(d, use_bias=False, rules=self.rules, name="k_proj")(x)
        v = layers.Dense(d, rules=self.rules, name="v_proj")(x)
        q, k, v = (a.reshape(heads) for a in (q, k, v))
        context = layers.tap(self, "heads", layers.attention(self, q, k, v, r))  # [B, T, H, D]
        return layers.Dense(d, rules=self.rules, name="out_proj")(context.reshape(b, t, d))


class EncoderLayer(nn.Module):
    config: WhisperConfig
    rules: Rules = None

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        cfg, r = self.config, layers.rules_at(self, self.rules)
        h = layers.LayerNorm(rules=self.rules, name="self_attn_layer_norm")(x)
        x = x + SelfAttention(cfg, self.rules, name="self_attn")(h)
        h = layers.LayerNorm(rules=self.rules, name="final_layer_norm")(x)
        h = layers.Dense(cfg.encoder_ffn_dim, rules=self.rules, name="fc1")(h)
        h = layers.Dense(cfg.d_model, rules=self.rules, name="fc2")(layers.gelu(h, r))
        x = x + h
        return layers.tap(self, "hidden_state", x)


class Whisper(nn.Module):
    """``features [B, n_mels, 2 * max_source_positions]`` -> encoder output
    ``[B, max_source_positions, d_model]``; with ``tokens [B, L]`` (int) -> the decoder's
    teacher-forced logits ``[B, L, vocab_size]`` (causal: position i sees tokens <= i)."""

    config: WhisperConfig
    rules: Rules = None
    remat: bool = False

    @nn.compact
    def __call__(self, features: jnp.ndarray, tokens: jnp.ndarray | None = None) -> jnp.ndarray:
        cfg, r = self.config, layers.rules_at(self, self.rules)
        expected = (cfg.n_mels, cfg.n_frames)
        if features.ndim != 3 or tuple(features.shape[1:]) != expected:
            raise ValueError(
                f"Whisper expects features [batch, {cfg.n_mels}, {cfg.n_frames}] "
                f"(n_mels x {cfg.n_samples / frontend.SAMPLE_RATE:g} s of 10 ms frames), got "
                f"{tuple(features.shape)}; use m.features(wave), which pads or trims audio to "
                f"{cfg.n_samples / frontend.SAMPLE_RATE:g} s")
        x = jnp.swapaxes(layers.to_compute(cfg, features), 1, 2)
        x = layers.gelu(layers.Conv(cfg.d_model, (3,), padding=[(1, 1)], rules=self.rules,
                                    name="conv1")(x), r)
        x = layers.gelu(layers.Conv(cfg.d_model, (3,), strides=(2,), padding=[(1, 1)],
                                    rules=self.rules, name="conv2")(x), r)
        positions = self.param(
            "embed_positions",
            lambda key, shape: jnp.asarray(sinusoids(*shape)),
            (cfg.max_source_positions, cfg.d_model))
        x = x + positions[None].astype(x.dtype)
        x = layers.tap(self, "embeddings", x)
        layer_cls = nn.remat(EncoderLayer) if self.remat else EncoderLayer
        for i in range(cfg.encoder_layers):
            x = layer_cls(cfg, self.rules, name=f"layers.{i}")(x)
        x = layers.LayerNorm(rules=self.rules, name="layer_norm")(x)
        if tokens is None:
            return layers.to_output(x)
        if not cfg.has_decoder:
            raise ValueError("this Whisper checkpoint has no decoder (encoder only); load a "
                             "full model (WhisperForConditionalGeneration, OpenAI .pt or a "
                             "CTranslate2 folder) to decode or explain tokens")
        return WhisperDecoder(cfg, self.rules, self.remat, name="decoder")(tokens, x)[0]


class DecoderAttention(nn.Module):
    """Multi-head attention of the decoder: causal self-attention (``memory=None``) or
    cross-attention over the encoder output ``memory [B, S, d_model]``.

    ``x [B, L, d_model]`` -> ``[B, L, d_model]``. With a ``cache`` (decoding), self-attention
    writes its keys/values at ``offset`` into ``cache["k"], cache["v"] [B, max_length, H, D]``
    and attends over the positions written so far; cross-attention reads the encoder's keys
    and values from ``cache["k"], cache["v"] [B, S, H, D]`` (:func:`decoder_cache`).
    Returns ``(output, cache)``.
    """

    config: WhisperConfig
    rules: Rules = None
    cross: bool = False

    @nn.compact
    def __call__(self, x, memory=None, cache=None, offset=0):
        cfg, r = self.config, layers.rules_at(self, self.rules)
        b, length, d = x.shape
        h, hd = cfg.decoder_attention_heads, cfg.decoder_head_dim
        q = layers.Dense(d, rules=self.rules, name="q_proj")(x) * hd**-0.5
        q = q.reshape(b, length, h, hd)
        if self.cross and cache is not None:
            k, v, where = cache["k"], cache["v"], None
        else:
            source = memory if self.cross else x
            k = layers.Dense(d, use_bias=False, rules=self.rules, name="k_proj")(source)
            v = layers.Dense(d, rules=self.rules, name="v_proj")(source)
            k, v = (a.reshape(b, source.shape[1], h, hd) for a in (k, v))
            where = None
            if not self.cross:
                if cache is not None:
                    k = jax.lax.dynamic_update_slice_in_dim(cache["k"], k, offset, axis=1)
                    v = jax.lax.dynamic_update_slice_in_dim(cache["v"], v, offset, axis=1)
                    cache = {"k": k, "v": v}
                queries = offset + jnp.arange(length)
                where = jnp.arange(k.shape[1])[None, :] <= queries[:, None]  # [L, keys]
                where = where[None, None]
        context = layers.tap(self, "heads", layers.masked_attention(self, q, k, v, r, where=where))
        out = layers.Dense(d, rules=self.rules, name="out_proj")(context.reshape(b, length, d))
        return out, cache


class DecoderLayer(nn.Module):
    config: WhisperConfig
    rules: Rules = None

    @nn.compact
    def __call__(self, x, memory, cache=None, offset=0):
        cfg, r = self.config, layers.rules_at(self, self.rules)
        cache = cache or {}
        h = layers.LayerNorm(rules=self.rules, name="self_attn_layer_norm")(x)
        h, self_cache = DecoderAttention(cfg, self.rules, name="self_attn")(
            h, cache=cache.get("self_attn"), offset=offset)
        x = x + h
        h = layers.LayerNorm(rules=self.rules, name="encoder_attn_layer_norm")(x)
        h, cross_cache = DecoderAttention(cfg, self.rules, cross=True, name="encoder_attn")(
            h, memory, cache=cache.get("encoder_attn"))
        x = x + h
        h = layers.LayerNorm(rules=self.rules, name="final_layer_norm")(x)
        h = layers.Dense(cfg.decoder_ffn_dim, rules=self.rules, name="fc1")(h)
        h = layers.Dense(cfg.d_model, rules=self.rules, name="fc2")(layers.gelu(h, r))
        x = layers.tap(self, "hidden_state", x + h)
        return x, {"self_attn": self_cache, "encoder_attn": cross_cache}


class WhisperDecoder(nn.Module):
    """``tokens [B, L]`` (int) and the encoder output ``memory [B, S, d_model]`` -> logits
    ``[B, L, vocab_size]`` (and the updated cache). ``offset``: the position of ``tokens[:, 0]``
    (decoding with a cache); without a cache the tokens are the whole prefix from 0."""

    config: WhisperConfig
    rules: Rules = None
    remat: bool = False

    @nn.compact
    def __call__(self, tokens, memory, cache=None, offset=0):
        cfg, r = self.config, layers.rules_at(self, self.rules)
        length = tokens.shape[1]
        if cache is None and length > cfg.max_target_positions:
            raise ValueError(f"{length} tokens: Whisper's decoder takes at most "
                             f"{cfg.max_target_positions}")
        embed = nn.Embed(cfg.vocab_size, cfg.d_model, embedding_init=nn.initializers.normal(0.02),
                         name="embed_tokens")
        positions = self.param("embed_positions", nn.initializers.normal(0.02),
                               (cfg.max_target_positions, cfg.d_model))
        x = layers.to_compute(
            cfg, embed(tokens) + jax.lax.dynamic_slice_in_dim(positions, offset, length)[None])
        x = layers.tap(self, "embeddings", x)
        memory = None if memory is None else layers.to_compute(cfg, memory)
        layer_cls = nn.remat(DecoderLayer) if self.remat else DecoderLayer
        new_cache = {}
        for i in range(cfg.decoder_layers):
            name = f"layers.{i}"
            x, new_cache[name] = layer_cls(cfg, self.rules, name=name)(
                x, memory, None if cache is None else cache[name], offset)
        x = layers.LayerNorm(rules=self.rules, name="layer_norm")(x)
        logits = lrp.linear(layers.dense, x, embed.embedding.T, None, r)  # tied output projection
        return layers.to_output(logits), (new_cache if cache is not None else None)


def decoder_cache(config: WhisperConfig, params: Mapping, memory: jnp.ndarray,
                  max_length: int) -> dict:
    """The decoding state for ``memory`` (encoder output ``[B, S, d_model]``): per layer, empty
    self-attention buffers ``[B, max_length, H, D]`` and the cross-attention keys and values of
    the encoder output ``[B, S, H, D]``, computed once."""
    b, s, d = memory.shape
    h, hd = config.decoder_attention_heads, config.decoder_head_dim
    memory = layers.to_compute(config, memory)
    empty = jnp.zeros((b, max_length, h, hd), memory.dtype)
    cache = {}
    for i in range(config.decoder_layers):
        p = params["decoder"][f"layers.{i}"]["encoder_attn"]
        k = layers.Dense(d, use_bias=False).apply({"params": p["k_proj"]}, memory)
        v = layers.Dense(d).apply({"params": p["v_proj"]}, memory)
        cache[f"layers.{i}"] = {"self_attn": {"k": empty, "v": empty},
                                "encoder_attn": {"k": k.reshape(b, s, h, hd),
                                                 "v": v.reshape(b, s, h, hd)}}
    return cache


def decode_step(config: WhisperConfig, params: Mapping, tokens: jnp.ndarray, cache: dict,
                offset, edits: Mapping | None = None) -> tuple[jnp.ndarray, dict]:
    """``tokens [B, L]`` at positions ``offset .. offset+L-1`` -> ``(logits [B, L, vocab], cache)``;
    jittable with ``config`` static (``offset`` may be traced). ``edits``: the decoder's part
    of a bound edit tree (:func:`jaxspeech.edits.decoder_step_edits`)."""
    variables = {"params": params["decoder"]}
    if edits:
        variables[layers.EDITS] = edits
    return WhisperDecoder(config).apply(variables, tokens, None, cache, offset)


# one compiled front end per shape (op-by-op dispatch costs as much as the FFTs)
_log_mel = jax.jit(frontend.log_mel_spectrogram, static_argnums=(1, 2))


def prepare(config: WhisperConfig, wave: jnp.ndarray, lengths=None):
    """Waveform ``[B, samples]`` -> (log-mel ``[B, n_mels, n_frames]``, {}); 3000 frames for
    the released models, ``2 * max_source_positions`` in general.

    Audio longer than the window (30 s) is trimmed to it with a warning (Whisper's
    window); use :mod:`jaxspeech.attribution` chunking for longer recordings.
    """
    seconds = config.n_samples / frontend.SAMPLE_RATE
    if not isinstance(wave, jax.core.Tracer) and wave.shape[-1] > config.n_samples:
        warnings.warn(
            f"audio of {wave.shape[-1] / frontend.SAMPLE_RATE:.1f} s is longer than Whisper's "
            f"{seconds:g} s window; only the first {seconds:g} s are used", stacklevel=4)
    return _log_mel(wave, config.n_mels, config.n_samples), {}


def tokens_to_features(config: WhisperConfig, layer: str, tokens: jnp.ndarray, shape):
    """``[B, 1500]`` (one value per encoder position, 20 ms) -> ``[B, n_mels, 3000]``: each
    position covers the two 10 ms feature frames conv2's stride merged."""
    if tokens.shape[-1] == shape[-1]:  # already at frame rate (the conv1 output)
        frames = tokens
    else:
        frames = jnp.repeat(tokens, shape[-1] // tokens.shape[-1], axis=-1)
    return jnp.broadcast_to(frames[:, None, :], shape)


def example_features(config: WhisperConfig, batch: int):
    return jax.ShapeDtypeStruct((batch, config.n_mels, config.n_frames), jnp.float32), {}


def init_inputs(config: WhisperConfig, batch: int) -> dict:
    """A token prefix for init, so the decoder's params are made too."""
    return {"tokens": jnp.zeros((batch, 1), jnp.int32)} if config.has_decoder else {}


FAMILY = register_family(Family(
    name="whisper",
    config_type=WhisperConfig,
    presets=PRESETS,
    module=lambda config, rules=None, remat=False: Whisper(config, rules, remat),
    init_inputs=init_inputs,
    prepare=prepare,
    example_features=example_features,
    sample_rate=lambda config: frontend.SAMPLE_RATE,
    time_axis=2,
    hop_length=lambda config: frontend.HOP_LENGTH,
    tokens_to_features=tokens_to_features,
))
