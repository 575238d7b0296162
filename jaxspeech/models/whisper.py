"""Whisper encoder (Radford et al. 2022), as ``transformers``' ``WhisperEncoder``.

    features [B, n_mels, 3000]
      -> conv1 (k3, pad 1) -> GELU -> conv2 (k3, stride 2, pad 1) -> GELU
      -> + embed_positions [1500, d_model]                     "embeddings"
      -> layers.i: x += self_attn(self_attn_layer_norm(x))     "layers.i.self_attn.attention"
                   x += fc2(GELU(fc1(final_layer_norm(x))))    "layers.i.hidden_state"
      -> layer_norm                                             output [B, 1500, d_model]

Parameter paths mirror the PyTorch names (``layers.3.self_attn.q_proj.kernel``).
The quoted names are the intermediates ``Model.forward`` returns; attention maps
are ``[B, heads, 1500, 1500]``. Relevance-bearing ops go through
:mod:`jaxspeech.layers` / :mod:`jaxspeech.lrp`.
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
    """Encoder hyper-parameters, named as in HF's ``WhisperConfig``."""

    n_mels: int = 80
    d_model: int = 384
    encoder_layers: int = 4
    encoder_attention_heads: int = 6
    encoder_ffn_dim: int = 1536
    max_source_positions: int = 1500

    @property
    def head_dim(self) -> int:
        return self.d_model // self.encoder_attention_heads

    @property
    def n_frames(self) -> int:
        return 2 * self.max_source_positions

    @property
    def n_samples(self) -> int:
        """The analysis window in samples: 30 s for the released models; a smaller
        ``max_source_positions`` gives a shorter window (100 -> 2 s)."""
        return self.n_frames * frontend.HOP_LENGTH

    @classmethod
    def from_hf_config(cls, hf: Mapping) -> WhisperConfig:
        """From a ``config.json`` dict (transformers 4 or 5); refuses what the port lacks."""
        act = hf.get("activation_function", "gelu")
        if act != "gelu":
            raise ValueError(f"Whisper config activation_function={act!r}: only 'gelu' is ported")
        if hf.get("scale_embedding"):
            raise ValueError("Whisper config scale_embedding=True is not supported by the encoder port")
        return cls(
            n_mels=int(hf.get("num_mel_bins", 80)),
            d_model=int(hf["d_model"]),
            encoder_layers=int(hf["encoder_layers"]),
            encoder_attention_heads=int(hf["encoder_attention_heads"]),
            encoder_ffn_dim=int(hf["encoder_ffn_dim"]),
            max_source_positions=int(hf.get("max_source_positions", 1500)),
        )


def _size(d, layers_, heads, n_mels=80):
    return WhisperConfig(n_mels=n_mels, d_model=d, encoder_layers=layers_,
                         encoder_attention_heads=heads, encoder_ffn_dim=4 * d)


PRESETS = {
    "whisper-tiny": _size(384, 4, 6),
    "whisper-base": _size(512, 6, 8),
    "whisper-small": _size(768, 12, 12),
    "whisper-medium": _size(1024, 24, 16),
    "whisper-large-v2": _size(1280, 32, 20),
    "whisper-large-v3": _size(1280, 32, 20, n_mels=128),
    # turbo keeps large-v3's encoder; only the decoder is pruned to 4 layers.
    "whisper-large-v3-turbo": _size(1280, 32, 20, n_mels=128),
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
        context = layers.attention(self, q, k, v, r).reshape(b, t, d)
        return layers.Dense(d, rules=self.rules, name="out_proj")(context)


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


class WhisperEncoder(nn.Module):
    """``features [B, n_mels, 2 * max_source_positions]`` -> ``[B, max_source_positions, d_model]``."""

    config: WhisperConfig
    rules: Rules = None
    remat: bool = False

    @nn.compact
    def __call__(self, features: jnp.ndarray) -> jnp.ndarray:
        cfg, r = self.config, layers.rules_at(self, self.rules)
        expected = (cfg.n_mels, cfg.n_frames)
        if features.ndim != 3 or tuple(features.shape[1:]) != expected:
            raise ValueError(
                f"Whisper expects features [batch, {cfg.n_mels}, {cfg.n_frames}] "
                f"(n_mels x {cfg.n_samples / frontend.SAMPLE_RATE:g} s of 10 ms frames), got "
                f"{tuple(features.shape)}; use m.features(wave), which pads or trims audio to "
                f"{cfg.n_samples / frontend.SAMPLE_RATE:g} s")
        x = jnp.swapaxes(features, 1, 2)
        x = layers.gelu(layers.Conv(cfg.d_model, (3,), padding=[(1, 1)], rules=self.rules,
                                    name="conv1")(x), r)
        x = layers.gelu(layers.Conv(cfg.d_model, (3,), strides=(2,), padding=[(1, 1)],
                                    rules=self.rules, name="conv2")(x), r)
        positions = self.param(
            "embed_positions",
            lambda key, shape: jnp.asarray(sinusoids(*shape)),
            (cfg.max_source_positions, cfg.d_model))
        x = x + positions[None]
        x = layers.tap(self, "embeddings", x)
        layer_cls = nn.remat(EncoderLayer) if self.remat else EncoderLayer
        for i in range(cfg.encoder_layers):
            x = layer_cls(cfg, self.rules, name=f"layers.{i}")(x)
        return layers.LayerNorm(rules=self.rules, name="layer_norm")(x)


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


FAMILY = register_family(Family(
    name="whisper",
    config_type=WhisperConfig,
    presets=PRESETS,
    module=lambda config, rules=None, remat=False: WhisperEncoder(config, rules, remat),
    prepare=prepare,
    example_features=example_features,
    sample_rate=lambda config: frontend.SAMPLE_RATE,
    time_axis=2,
    hop_length=lambda config: frontend.HOP_LENGTH,
    tokens_to_features=tokens_to_features,
))
