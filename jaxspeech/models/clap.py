"""CLAP audio tower (Wu et al. 2023; HTSAT by Chen et al. 2022), as ``transformers``'
``ClapAudioModelWithProjection`` / ``ClapModel.get_audio_features``.

    features [B, C, 1001, 64] (C = 1 unfused, 4 fused: whole clip shrunk + 3 crops)
      -> batch_norm over the 64 mel bins
      -> time stretched to 1024 frames (torch bicubic, align_corners=True)
      -> fold: 4 time chunks of 256 frames stacked along frequency -> image [B, 256, 256, C]
      -> patch_embed: proj Conv2d(k4, s4) on channel 0                  [B, 64, 64, 96]
         (fused, items with is_longer: mel_conv2d(k(4,12), s(4,12)) on channels 1-3,
          side by side, mixed in by the AFF block: 2·x·σ + 2·local·(1−σ))
         -> LayerNorm
      -> layers.i (Swin stages at 64², 32², 16², 8²):
           blocks.j: x += attention(layernorm_before(x)) in 8x8 windows, shifted by 4
                     on odd blocks (-100 mask across the wrap), relative position bias
                     x += output(GELU(intermediate(layernorm_after(x))))
                     "...layers.i.blocks.j.hidden_state"  [B, H*W, C] (row-major grid)
                     "...layers.i.blocks.j.attention.attention" [B, windows, heads, 64, 64]
                     "...layers.i.blocks.j.attention.heads" [B, windows, 64, heads, head_dim]
           downsample (not after the last stage): 2x2 neighbours concatenated
                     -> LayerNorm(4C) -> Linear(4C -> 2C, no bias)
      -> norm -> "last_hidden_state" [B, 64, C] (the 8x8 grid, row-major)
      -> mean over all tokens -> "pooler_output" [B, hidden_size]
      -> audio_projection: linear1 -> ReLU -> linear2              [B, projection_dim]
      -> L2-normalised when ``config.normalize`` (get_audio_features; not for
         ClapAudioModelWithProjection's audio_embeds)

Image rows are (time chunk, frequency) and columns time within the chunk: the
8x8 grid of the last stage is 4 chunks x 2 frequency bins by 8 time steps
(:func:`tokens_to_features` lays any token map back over the features). Windows are
numbered row-major over the grid, as HF's ``window_partition``; shifted blocks see
the grid rolled by (-4, -4); :func:`attention_geometry` gives rollout each map's
windows, shifts and merges as token indices.
Parameter paths mirror the PyTorch names
(``audio_model.audio_encoder.layers.0.blocks.1.attention.self.query.kernel``); the
quoted names are the intermediates ``Model.forward`` returns, prefixed with
``audio_model.audio_encoder.``. Relevance-bearing ops go through
:mod:`jaxspeech.layers` / :mod:`jaxspeech.lrp`.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Mapping
from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxspeech import layers, lrp
from jaxspeech.frontends import clap as frontend
from jaxspeech.model import Family, register_family

Rules = lrp.RuleSet | None


@dataclasses.dataclass(frozen=True)
class ClapConfig:
    """Audio-tower hyper-parameters, named as in HF's ``ClapAudioConfig``, plus the front
    end (``ClapFeatureExtractor``: ``sampling_rate``, ``fmin`` = ``frequency_min``,
    ``fmax`` = ``frequency_max``, ``truncation``, ``padding``) and ``normalize`` (L2-normalise
    the embedding as ``ClapModel.get_audio_features`` does; ``ClapAudioModelWithProjection``
    does not)."""

    spec_size: int = 256
    patch_size: tuple[int, int] = (4, 4)
    patch_stride: tuple[int, int] = (4, 4)
    num_mel_bins: int = 64
    window_size: int = 8
    depths: tuple[int, ...] = (2, 2, 6, 2)
    num_attention_heads: tuple[int, ...] = (4, 8, 16, 32)
    patch_embeds_hidden_size: int = 96
    hidden_size: int = 768
    mlp_ratio: float = 4.0
    hidden_act: str = "gelu"
    qkv_bias: bool = True
    enable_fusion: bool = False
    aff_block_r: int = 4
    projection_dim: int = 512
    projection_hidden_act: str = "relu"
    flatten_patch_embeds: bool = True
    enable_patch_layer_norm: bool = True
    layer_norm_eps: float = 1e-5
    sampling_rate: int = 48000
    fmin: float = 50.0
    fmax: float = 14000.0
    truncation: str = "rand_trunc"
    padding: str = "repeatpad"
    normalize: bool = True
    # the compute dtype (mixed precision; params stay float32): "float32", "bfloat16", "float16"
    dtype: str = "float32"

    def __post_init__(self):
        layers.check_dtype(self.dtype)
        problems = []
        if self.truncation not in frontend.TRUNCATIONS:
            problems.append(f"truncation={self.truncation!r} (expected one of {frontend.TRUNCATIONS})")
        elif (self.truncation == "fusion") != self.enable_fusion:
            problems.append(
                f"truncation={self.truncation!r} with enable_fusion={self.enable_fusion}: fused "
                "models take 'fusion' features (4 channels), unfused ones 'rand_trunc' (1 channel)")
        if self.padding not in frontend.PADDINGS:
            problems.append(f"padding={self.padding!r} (expected one of {frontend.PADDINGS})")
        if self.sampling_rate != frontend.SAMPLE_RATE or self.num_mel_bins != frontend.N_MELS:
            problems.append(f"sampling_rate={self.sampling_rate}, num_mel_bins={self.num_mel_bins} "
                            f"(the front end is {frontend.SAMPLE_RATE} Hz, {frontend.N_MELS} mels)")
        if self.spec_size % self.num_mel_bins:
            problems.append(f"spec_size={self.spec_size} is not a multiple of num_mel_bins")
        if len(self.depths) != len(self.num_attention_heads):
            problems.append("depths and num_attention_heads differ in length")
        for i, heads in enumerate(self.num_attention_heads):
            if self.stage_dim(i) % heads:
                problems.append(f"stage {i}: width {self.stage_dim(i)} not divisible by {heads} heads")
        if self.hidden_size != self.stage_dim(len(self.depths) - 1):
            problems.append(f"hidden_size={self.hidden_size} != patch_embeds_hidden_size * "
                            f"2**(stages-1) = {self.stage_dim(len(self.depths) - 1)}")
        grid = self.grid_size
        last = (grid[0] >> (len(self.depths) - 1), grid[1] >> (len(self.depths) - 1))
        if min(last) < self.window_size or any(g % self.window_size for g in last):
            problems.append(f"the last stage's {last} grid must be a multiple of window_size="
                            f"{self.window_size} (HF's relative position bias needs it)")
        if self.hidden_act != "gelu" or self.projection_hidden_act != "relu":
            problems.append(f"hidden_act={self.hidden_act!r}, projection_hidden_act="
                            f"{self.projection_hidden_act!r} (ported: 'gelu' and 'relu')")
        if not self.flatten_patch_embeds:
            problems.append("flatten_patch_embeds=False (HF's LayerNorm would then act on the width)")
        if problems:
            raise ValueError("CLAP config not supported: " + "; ".join(problems))

    @property
    def freq_ratio(self) -> int:
        return self.spec_size // self.num_mel_bins

    @property
    def grid_size(self) -> tuple[int, int]:
        return (self.spec_size // self.patch_stride[0], self.spec_size // self.patch_stride[1])

    def stage_dim(self, i: int) -> int:
        return self.patch_embeds_hidden_size * 2**i

    @property
    def in_channels(self) -> int:
        return 4 if self.enable_fusion else 1

    @classmethod
    def from_hf_config(cls, hf: Mapping, preprocessor: Mapping | None = None,
                       normalize: bool = True) -> ClapConfig:
        """From ``config.json`` (a ``ClapConfig`` with ``audio_config``, or a bare
        ``ClapAudioConfig``) and, when present, ``preprocessor_config.json``. Refuses what
        the port lacks, naming it."""
        audio = dict(hf.get("audio_config", hf))
        for key in ("projection_dim", "projection_hidden_act"):  # ClapConfig's own win
            if key in hf and "audio_config" in hf:
                audio[key] = hf[key]
        fusion_type = audio.get("fusion_type")
        if audio.get("enable_fusion") and fusion_type not in (None, "aff_2d"):
            raise ValueError(f"CLAP fusion_type={fusion_type!r} is not ported (only AFF-2D)")
        if int(audio.get("patch_embed_input_channels", 1)) != 1:
            raise ValueError("CLAP patch_embed_input_channels != 1 is not ported")
        pair = lambda v: (int(v), int(v)) if isinstance(v, (int, float)) else tuple(int(x) for x in v)  # noqa: E731
        pre = dict(preprocessor or {})
        enable_fusion = bool(audio.get("enable_fusion", False))
        for key, want in (("sampling_rate", frontend.SAMPLE_RATE), ("feature_size", frontend.N_MELS),
                          ("fft_window_size", frontend.N_FFT), ("hop_length", frontend.HOP_LENGTH),
                          ("max_length_s", frontend.MAX_SECONDS)):
            if key in pre and int(pre[key]) != want:
                raise ValueError(f"CLAP preprocessor {key}={pre[key]} is not ported (expected {want})")
        if pre.get("top_db") is not None:
            raise ValueError("CLAP preprocessor top_db is not ported (the extractor ignores it too)")
        return cls(
            spec_size=int(audio.get("spec_size", 256)),
            patch_size=pair(audio.get("patch_size", 4)),
            patch_stride=pair(audio.get("patch_stride", 4)),
            num_mel_bins=int(audio.get("num_mel_bins", 64)),
            window_size=int(audio.get("window_size", 8)),
            depths=tuple(int(d) for d in audio.get("depths", (2, 2, 6, 2))),
            num_attention_heads=tuple(int(h) for h in audio.get("num_attention_heads", (4, 8, 16, 32))),
            patch_embeds_hidden_size=int(audio.get("patch_embeds_hidden_size", 96)),
            hidden_size=int(audio.get("hidden_size", 768)),
            mlp_ratio=float(audio.get("mlp_ratio", 4.0)),
            hidden_act=str(audio.get("hidden_act", "gelu")),
            qkv_bias=bool(audio.get("qkv_bias", True)),
            enable_fusion=enable_fusion,
            aff_block_r=int(audio.get("aff_block_r", 4)),
            projection_dim=int(audio.get("projection_dim", 512)),
            projection_hidden_act=str(audio.get("projection_hidden_act", "relu")),
            flatten_patch_embeds=bool(audio.get("flatten_patch_embeds", True)),
            enable_patch_layer_norm=bool(audio.get("enable_patch_layer_norm", True)),
            layer_norm_eps=float(audio.get("layer_norm_eps", 1e-5)),
            fmin=float(pre.get("frequency_min", 50.0)),
            fmax=float(pre.get("frequency_max", 14000.0)),
            truncation=str(pre.get("truncation", "fusion" if enable_fusion else "rand_trunc")),
            padding=str(pre.get("padding") or "repeatpad"),
            normalize=normalize,
        )


_UNFUSED = ClapConfig()
PRESETS = {
    # laion/clap-htsat-unfused and -fused (HTSAT-tiny: 96 wide, depths 2-2-6-2).
    "clap-htsat-unfused": _UNFUSED,
    "clap-htsat-fused": dataclasses.replace(_UNFUSED, enable_fusion=True, truncation="fusion"),
    # laion/larger_clap_general and larger_clap_music (HTSAT-base, no fusion).
    "larger-clap-general": dataclasses.replace(
        _UNFUSED, patch_embeds_hidden_size=128, depths=(2, 2, 12, 2), hidden_size=1024),
    "larger-clap-music": dataclasses.replace(
        _UNFUSED, patch_embeds_hidden_size=128, depths=(2, 2, 12, 2), hidden_size=1024),
}


# --- windows ---------------------------------------------------------------------------

def window_partition(x: jnp.ndarray, ws: int) -> jnp.ndarray:
    """``[B, H, W, C]`` -> ``[B, windows, ws*ws, C]`` (windows in row-major order, as HF)."""
    b, h, w, c = x.shape
    x = x.reshape(b, h // ws, ws, w // ws, ws, c).transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(b, (h // ws) * (w // ws), ws * ws, c)


def window_reverse(x: jnp.ndarray, ws: int, h: int, w: int) -> jnp.ndarray:
    """Inverse of :func:`window_partition`."""
    b, _, _, c = x.shape
    x = x.reshape(b, h // ws, w // ws, ws, ws, c).transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(b, h, w, c)


def relative_position_index(ws: int) -> np.ndarray:
    """``[ws², ws²]`` indices into the ``(2ws-1)²`` bias table (Swin's)."""
    coords = np.stack(np.meshgrid(np.arange(ws), np.arange(ws), indexing="ij")).reshape(2, -1)
    rel = (coords[:, :, None] - coords[:, None, :]).transpose(1, 2, 0) + (ws - 1)
    return rel[:, :, 0] * (2 * ws - 1) + rel[:, :, 1]


def shifted_window_mask(h: int, w: int, ws: int, shift: int) -> np.ndarray:
    """``[windows, ws², ws²]``: 0 within a region, -100 between regions the cyclic shift
    brought together (HF's ``get_attn_mask``)."""
    img = np.zeros((1, h, w, 1), np.float32)
    count = 0
    for hs in (slice(0, -ws), slice(-ws, -shift), slice(-shift, None)):
        for wsl in (slice(0, -ws), slice(-ws, -shift), slice(-shift, None)):
            img[:, hs, wsl, :] = count
            count += 1
    win = np.asarray(window_partition(img, ws))[0, :, :, 0]
    diff = win[:, None, :] - win[:, :, None]
    return np.where(diff != 0, -100.0, 0.0).astype(np.float32)


def window_and_shift(h: int, w: int, window_size: int, shift: int) -> tuple[int, int]:
    """The window and shift a block on an ``h x w`` grid really uses: one window covering
    the grid and no shift once the grid is no larger than a window (HF's
    ``set_shift_and_window_size``)."""
    if min(h, w) <= window_size:
        return min(h, w), 0
    return window_size, shift


def merge_neighbours(x, fill=0):
    """Patch merging's regrouping ``[B, H, W, C]`` -> ``[B, ⌈H/2⌉, ⌈W/2⌉, 4C]``: the 2x2
    neighbours (0,0), (1,0), (0,1), (1,1) side by side, odd sizes padded with ``fill``."""
    h, w = x.shape[1], x.shape[2]
    if h % 2 or w % 2:
        x = jnp.pad(x, [(0, 0), (0, h % 2), (0, w % 2), (0, 0)], constant_values=fill)
    return jnp.concatenate([x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2],
                            x[:, 1::2, 1::2]], axis=-1)


# --- modules ----------------------------------------------------------------------------

class WindowAttention(nn.Module):
    """``attention.self`` + ``attention.output`` on ``[B, windows, ws², C]``."""

    dim: int
    heads: int
    window_size: int
    qkv_bias: bool = True
    rules: Rules = None

    @nn.compact
    def __call__(self, x: jnp.ndarray, mask: np.ndarray | None) -> jnp.ndarray:
        r = layers.rules_at(self, self.rules)
        b, nw, n, c = x.shape
        head_dim = c // self.heads
        ws = self.window_size
        table = self.param("self.relative_position_bias_table", nn.initializers.normal(0.02),
                           ((2 * ws - 1) ** 2, self.heads))
        q, k, v = (layers.Dense(c, use_bias=self.qkv_bias, rules=self.rules, name=f"self.{name}")(x)
                   .reshape(b, nw, n, self.heads, head_dim) for name in ("query", "key", "value"))
        bias = jnp.transpose(table[relative_position_index(ws).reshape(-1)].reshape(n, n, self.heads),
                             (2, 0, 1))[None]  # [1, heads, n, n]
        if mask is not None:  # the same -100 mask for every head: [windows, 1, n, n]
            bias = bias + jnp.asarray(mask)[:, None]
        bias = bias.astype(q.dtype)
        implementation = lrp.attention_implementation(q.dtype, head_dim)
        if implementation != "tiled" and not layers.map_needed(self, "attention"):
            # Windows are independent sequences of n tokens: fold them into the batch.
            def fold(t):  # [B, W, n, heads, D] -> [B·W, n, heads, D]
                return t.reshape(b * nw, n, self.heads, head_dim)

            if mask is not None:  # a bias per window [W, heads, n, n], the same for every item
                bias = jnp.broadcast_to(bias, (b, *bias.shape)).reshape(b * nw, self.heads, n, n)
            context = lrp.fused_attention(fold(q) / math.sqrt(head_dim), fold(k), fold(v), r,
                                          bias=bias, implementation=implementation)
            context = layers.tap(self, "heads", context.reshape(b, nw, n, self.heads, head_dim))
        else:
            # Heads before tokens: the batched products then need no transposes of the scores.
            q, k, v = (t.transpose(0, 1, 3, 2, 4) for t in (q, k, v))
            scores = lrp.bilinear("bwhqd,bwhkd->bwhqk", q, k, r) / math.sqrt(head_dim)
            probs = layers.tap(self, "attention", lrp.attention_weights(scores + bias[None], r))
            context = lrp.bilinear("bwhqk,bwhkd->bwhqd", probs, v, r)
            context = layers.tap(self, "heads", context.transpose(0, 1, 3, 2, 4))  # [B, W, n, heads, D]
        return layers.Dense(c, rules=self.rules, name="output.dense")(context.reshape(b, nw, n, c))


class SwinBlock(nn.Module):
    """One ``ClapAudioLayer``: (shifted-)window attention and MLP, pre-norm, on ``[B, H, W, C]``."""

    config: ClapConfig
    dim: int
    heads: int
    shift: int
    rules: Rules = None

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        cfg, r = self.config, layers.rules_at(self, self.rules)
        _, h, w, c = x.shape
        ws, shift = window_and_shift(h, w, cfg.window_size, self.shift)
        y = layers.LayerNorm(cfg.layer_norm_eps, rules=self.rules, name="layernorm_before")(x)
        pad_h, pad_w = (-h) % ws, (-w) % ws
        if pad_h or pad_w:
            y = jnp.pad(y, [(0, 0), (0, pad_h), (0, pad_w), (0, 0)])
        hp, wp = h + pad_h, w + pad_w
        if shift:
            y = jnp.roll(y, (-shift, -shift), axis=(1, 2))
        mask = shifted_window_mask(hp, wp, ws, shift) if shift else None
        y = WindowAttention(c, self.heads, ws, cfg.qkv_bias, self.rules, name="attention")(
            window_partition(y, ws), mask)
        y = window_reverse(y, ws, hp, wp)
        if shift:
            y = jnp.roll(y, (shift, shift), axis=(1, 2))
        x = x + y[:, :h, :w]
        y = layers.LayerNorm(cfg.layer_norm_eps, rules=self.rules, name="layernorm_after")(x)
        y = layers.Dense(int(cfg.mlp_ratio * c), rules=self.rules, name="intermediate.dense")(y)
        x = x + layers.Dense(c, rules=self.rules, name="output.dense")(layers.gelu(y, r))
        # Sown as HF's token sequence [B, H*W, C] (row-major over the grid), the
        # [batch, tokens, width] layout the attribution targets and Grad-CAM expect.
        seq = layers.tap(self, "hidden_state", x.reshape(x.shape[0], h * w, c))
        return seq.reshape(x.shape)


class PatchMerging(nn.Module):
    """``[B, H, W, C]`` -> ``[B, H/2, W/2, 2C]``: 2x2 neighbours -> LayerNorm -> Linear."""

    rules: Rules = None

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        c = x.shape[-1]
        x = merge_neighbours(x)
        x = layers.LayerNorm(rules=self.rules, name="norm")(x)
        return layers.Dense(2 * c, use_bias=False, rules=self.rules, name="reduction")(x)


class AFF(nn.Module):
    """Attentional feature fusion (``fusion_model``): ``x`` global, ``residual`` local,
    both ``[B, H, W, C]``; ``2·x·σ(l + g) + 2·residual·(1 − σ(l + g))``."""

    channels: int
    ratio: int = 4
    rules: Rules = None

    @nn.compact
    def __call__(self, x: jnp.ndarray, residual: jnp.ndarray) -> jnp.ndarray:
        r = layers.rules_at(self, self.rules)
        inter = self.channels // self.ratio

        def branch(t, first, prefix):
            t = layers.Conv(inter, (1, 1), rules=self.rules, name=f"{prefix}.{first}")(t)
            t = layers.relu(layers.BatchNorm(rules=self.rules, name=f"{prefix}.{first + 1}")(t), r)
            t = layers.Conv(self.channels, (1, 1), rules=self.rules, name=f"{prefix}.{first + 3}")(t)
            return layers.BatchNorm(rules=self.rules, name=f"{prefix}.{first + 4}")(t)

        both = x + residual
        local = branch(both, 0, "local_att")
        global_ = branch(jnp.mean(both, axis=(1, 2), keepdims=True), 1, "global_att")
        weight = layers.sigmoid(local + global_, r)
        return 2 * lrp.gate(x, weight, r) + 2 * lrp.gate(residual, 1 - weight, r)


class PatchEmbed(nn.Module):
    """``image [B, S, S, C]`` -> patch tokens ``[B, S/4, S/4, D]`` (fusion for long items)."""

    config: ClapConfig
    rules: Rules = None

    @nn.compact
    def __call__(self, image: jnp.ndarray, is_longer: jnp.ndarray | None) -> jnp.ndarray:
        cfg = self.config
        d = cfg.patch_embeds_hidden_size
        ph, pw = cfg.patch_size
        sh, sw = cfg.patch_stride
        pad = [((ph - sh) // 2,) * 2, ((pw - sw) // 2,) * 2]
        x = layers.Conv(d, (ph, pw), strides=(sh, sw), padding=pad, rules=self.rules,
                        name="proj")(image[..., :1])
        if cfg.enable_fusion:
            b, s1, s2, _ = image.shape
            # Each crop is embedded alone with a 3x wider patch; the 3 results sit side by side.
            local = jnp.transpose(image[..., 1:], (0, 3, 1, 2)).reshape(b * 3, s1, s2, 1)
            local = layers.Conv(d, (ph, 3 * pw), strides=(sh, 3 * sw), padding=pad,
                                rules=self.rules, name="mel_conv2d")(local)
            _, gh, gw, _ = local.shape
            local = jnp.transpose(local.reshape(b, 3, gh, gw, d), (0, 2, 1, 3, 4))
            local = local.reshape(b, gh, 3 * gw, d)
            width = x.shape[2]
            local = local[:, :, :width] if 3 * gw >= width else jnp.pad(
                local, [(0, 0), (0, 0), (0, width - 3 * gw), (0, 0)])
            fused = AFF(d, cfg.aff_block_r, self.rules, name="fusion_model")(x, local)
            x = jnp.where(is_longer.reshape(b, 1, 1, 1), fused, x)
        if cfg.enable_patch_layer_norm:
            x = layers.LayerNorm(rules=self.rules, name="norm")(x)
        return x


class HTSATEncoder(nn.Module):
    """``ClapAudioEncoder``: features ``[B, C, T<=1024, 64]`` -> pooled ``[B, hidden_size]``."""

    config: ClapConfig
    rules: Rules = None
    remat: bool = False

    def mel_to_image(self, x: jnp.ndarray) -> jnp.ndarray:
        """HF ``reshape_mel2img``: ``[B, C, T, F]`` -> ``[B, F*r, 1024/r, C]`` (r = 4)."""
        cfg = self.config
        b, c, t, f = x.shape
        width = cfg.spec_size * cfg.freq_ratio
        if t < width:
            x = frontend.interpolate_time(x, width, "bicubic", axis=2)
        r = cfg.freq_ratio
        x = x.reshape(b, c, r, width // r, f).transpose(0, 2, 4, 3, 1)
        return x.reshape(b, r * f, width // r, c)

    @nn.compact
    def __call__(self, features: jnp.ndarray, is_longer: jnp.ndarray | None) -> jnp.ndarray:
        cfg = self.config
        width = cfg.spec_size * cfg.freq_ratio
        if (features.ndim != 4 or features.shape[1] != cfg.in_channels
                or features.shape[3] != cfg.num_mel_bins or features.shape[2] > width):
            raise ValueError(
                f"CLAP expects features [batch, {cfg.in_channels}, frames <= {width}, "
                f"{cfg.num_mel_bins}] ({'fused: 4' if cfg.enable_fusion else 'unfused: 1'} "
                f"channel(s)), got {tuple(features.shape)}; use m.features(wave)")
        if cfg.enable_fusion and is_longer is None:
            raise ValueError("a fused CLAP model needs is_longer [batch] (m.prepare returns it)")
        x = layers.BatchNorm(rules=self.rules, name="batch_norm")(layers.to_compute(cfg, features))
        x = self.mel_to_image(x)
        x = PatchEmbed(cfg, self.rules, name="patch_embed")(x, is_longer)
        block = nn.remat(SwinBlock) if self.remat else SwinBlock
        for i, depth in enumerate(cfg.depths):
            dim, heads = cfg.stage_dim(i), cfg.num_attention_heads[i]
            for j in range(depth):
                x = block(cfg, dim, heads, block_shift(cfg, j), self.rules,
                          name=f"layers.{i}.blocks.{j}")(x)
            if i < len(cfg.depths) - 1:
                x = PatchMerging(self.rules, name=f"layers.{i}.downsample")(x)
        x = layers.LayerNorm(rules=self.rules, name="norm")(x)
        b, gh, gw, c = x.shape
        x = layers.tap(self, "last_hidden_state", x.reshape(b, gh * gw, c))
        # HF regroups the grid to (frequency, time) before AdaptiveAvgPool1d; a mean over
        # every token does not depend on the order.
        return layers.tap(self, "pooler_output", jnp.mean(x, axis=1))


class ClapAudio(nn.Module):
    """``features [B, C, 1001, 64]``, ``is_longer [B]`` -> audio embedding ``[B, projection_dim]``."""

    config: ClapConfig
    rules: Rules = None
    remat: bool = False

    @nn.compact
    def __call__(self, features: jnp.ndarray, is_longer: jnp.ndarray | None = None) -> jnp.ndarray:
        cfg, r = self.config, layers.rules_at(self, self.rules)
        if is_longer is not None:
            is_longer = jnp.asarray(is_longer).reshape(-1).astype(bool)
        pooled = HTSATEncoder(cfg, self.rules, self.remat, name="audio_model.audio_encoder")(
            features, is_longer)
        y = layers.Dense(cfg.projection_dim, rules=self.rules, name="audio_projection.linear1")(pooled)
        y = layers.Dense(cfg.projection_dim, rules=self.rules, name="audio_projection.linear2")(
            layers.relu(y, r))
        y = layers.to_output(y)
        if cfg.normalize:  # F.normalize: x / max(||x||, 1e-12)
            norm = jnp.sqrt(jnp.sum(jnp.square(y), axis=-1, keepdims=True))
            y = y / lrp.norm_std(jnp.maximum(norm, 1e-12), r)
        return y


def prepare(config: ClapConfig, wave: jnp.ndarray, lengths=None, *, key: jax.Array | None = None,
            crops=None, longer: str = "per_clip"):
    """Waveform ``[B, samples]`` (48 kHz, any length) -> ``(features [B, 1|4, 1001, 64],
    {"is_longer": [B] bool})``; see :mod:`jaxspeech.frontends.clap`.

    ``lengths``: relative lengths of zero-padded clips (as :func:`jaxspeech.audio.as_batch`
    gives for a list of unequal clips); each clip is then treated at its own length.
    ``key``: a ``jax.random`` key for HF's random crops of clips longer than 10 s
    (``None``: deterministic crops: the start for rand_trunc, front / middle / back for
    fusion). ``crops``: explicit crop starts (``[B]`` sample offsets for rand_trunc,
    ``[B, 3]`` frame offsets for fusion). ``longer``: the ``is_longer`` rule,
    ``"per_clip"`` (default, as HF treats each clip alone), ``"per_batch"`` (HF's batch
    rule) or ``"length"`` (only clips over 10 s, as LAION's evaluation).

    There is no maximum length: longer audio is cropped (rand_trunc) or summarised
    (fusion) by the front end, as the checkpoint's ``truncation`` says.
    """
    n_samples = None
    if lengths is not None:
        if isinstance(lengths, jax.core.Tracer):
            raise ValueError("CLAP clip lengths must be concrete (they fix the crops' shapes)")
        width = wave.shape[-1]
        n_samples = np.clip(np.rint(np.asarray(lengths, np.float64) * width), 1, width).astype(int)
    features, is_longer = frontend.clap_features(
        wave, n_samples, fmin=config.fmin, fmax=config.fmax, truncation=config.truncation,
        padding=config.padding, key=key, crops=crops, longer=longer)
    return features, {"is_longer": is_longer}


# --- token geometry: where tokens sit over the features, and how attention moves them -------

def block_shift(config: ClapConfig, j: int) -> int:
    """The cyclic shift block ``j`` of a stage asks for: none on even blocks, half a window
    on odd ones (before :func:`window_and_shift` adapts it to the grid)."""
    return config.window_size // 2 if j % 2 else 0


def stage_grids(config: ClapConfig) -> list[tuple[int, int]]:
    """``[(H, W)]`` of the token grid of each stage (patch merging halves it, rounding up)."""
    h, w = config.grid_size
    grids = []
    for _ in config.depths:
        grids.append((h, w))
        h, w = (h + 1) // 2, (w + 1) // 2
    return grids


class AttentionGeometry(NamedTuple):
    """One attention map as rollout sees it (``Family.attention_geometry``).

    ``name``: the map's intermediate, ``[B, W, heads, n, n]``; ``output``: the block's
    output intermediate ``[B, H*W, C]``. ``windows [W, n]``: the token (row-major over the
    block's ``H x W`` grid) in query/key slot ``i`` of window ``w``, -1 for a padding
    slot. ``sources [H*W, 4] | None``: the tokens of the previous map's grid that each
    token of this grid was merged from (patch merging's 2x2 neighbours, -1 for padding);
    ``None`` when the grid is the previous map's.
    """

    name: str
    output: str
    windows: np.ndarray
    sources: np.ndarray | None


@functools.lru_cache(maxsize=16)
def attention_geometry(config: ClapConfig) -> tuple[AttentionGeometry, ...]:
    """Every attention map of the encoder in forward order, with the windows, shifts and
    merges the blocks apply, derived by running the blocks' own regrouping
    (:func:`window_partition`, the cyclic roll, :func:`merge_neighbours`) on a grid of
    token indices instead of activations."""
    enc = "audio_model.audio_encoder."
    out, sources = [], None
    for i, ((h, w), depth) in enumerate(zip(stage_grids(config), config.depths, strict=True)):
        tokens = np.arange(h * w).reshape(h, w)
        for j in range(depth):
            ws, shift = window_and_shift(h, w, config.window_size, block_shift(config, j))
            grid = np.pad(tokens, [(0, (-h) % ws), (0, (-w) % ws)], constant_values=-1)
            if shift:
                grid = np.roll(grid, (-shift, -shift), axis=(0, 1))
            windows = np.asarray(window_partition(grid[None, :, :, None], ws))[0, :, :, 0]
            out.append(AttentionGeometry(f"{enc}layers.{i}.blocks.{j}.attention.attention",
                                         f"{enc}layers.{i}.blocks.{j}.hidden_state", windows,
                                         sources))
            sources = None
        merged = np.asarray(merge_neighbours(tokens[None, :, :, None], fill=-1))[0]
        sources = merged.reshape(-1, 4)
    return tuple(out)


@functools.lru_cache(maxsize=16)
def token_index(config: ClapConfig, n_tokens: int, n_frames: int) -> np.ndarray:
    """``[channels, n_frames, num_mel_bins]`` int: the token of a stage's grid (the stage
    whose grid has ``n_tokens`` tokens) that each feature cell feeds, -1 for none.

    A cell (frame t, mel f) of any channel sits at the stretched frame s to which the
    bicubic stretch to 1024 frames gives most of its weight (the one nearest to
    t · 1023 / (n_frames - 1), where the stretch samples frame t exactly; s = t at 1024
    frames), hence at image pixel
    (row (s // 256) · 64 + f, column s % 256) of the fold. Channel 0 reaches patch
    (row // stride_h, column // stride_w) of ``proj``. Fusion's crop channels k = 1..3 each
    reach patch (row // stride_h, (k - 1) · G + column // (3 · stride_w)) of ``mel_conv2d``
    (G of its patches per crop side by side; the image columns past G · 3 · stride_w and
    the columns past the grid are cut). Patch merging takes stage-0 token (r, c) to
    (r >> s, c >> s) at stage s.
    """
    grids = stage_grids(config)
    sizes = [h * w for h, w in grids]
    if n_tokens not in sizes:
        raise ValueError(f"a map over {n_tokens} tokens is not one of this CLAP model's stage grids "
                         f"({', '.join(f'{h}x{w}={h * w}' for h, w in grids)} tokens)")
    stage = sizes.index(n_tokens)
    width = config.spec_size * config.freq_ratio
    chunk = width // config.freq_ratio
    if n_frames > width or n_frames < 1:
        raise ValueError(f"CLAP features have 1..{width} frames, got {n_frames}")
    s = np.arange(n_frames)
    if n_frames < width:  # the stretched frame each frame gives most weight to (ties: the first)
        index, weight = frontend.resize_weights(n_frames, width, "bicubic")
        stretch = np.zeros((width, n_frames), np.float32)
        np.add.at(stretch, (np.repeat(np.arange(width), index.shape[1]), index.reshape(-1)),
                  weight.reshape(-1))
        s = stretch.argmax(0)
    f = np.arange(config.num_mel_bins)
    rows = np.broadcast_to((s // chunk)[:, None] * config.num_mel_bins + f[None, :],
                           (n_frames, config.num_mel_bins))
    cols = np.broadcast_to((s % chunk)[:, None], rows.shape)
    (gh, gw), (sh, sw) = grids[0], config.patch_stride
    ph, pw = config.patch_size
    pad_w = (pw - sw) // 2
    channels = [(rows // sh, cols // sw)]
    if config.enable_fusion:  # mel_conv2d: 3x wider patches and strides, same padding
        per_crop = (config.spec_size + 2 * pad_w - 3 * pw) // (3 * sw) + 1
        j = cols // (3 * sw)
        for k in range(3):
            channels.append((rows // sh, np.where(j < per_crop, k * per_crop + j, gw)))
    side = grids[stage][1]
    return np.stack([np.where((r0 < gh) & (c0 < gw), (r0 >> stage) * side + (c0 >> stage), -1)
                     for r0, c0 in channels])


def tokens_to_features(config: ClapConfig, layer: str, tokens: jnp.ndarray, shape) -> jnp.ndarray:
    """``[B, H*W]`` (one value per token of a stage's grid) -> ``shape`` ``[B, C, T, mels]``:
    each feature cell gets the value of the token it feeds (:func:`token_index`), 0 where
    it feeds none (fusion crop columns that ``mel_conv2d`` cuts).

    Fused models: channel 0 (the whole clip) feeds ``proj``, channels 1-3 (the crops)
    feed ``mel_conv2d`` at the same token positions. Items run with ``is_longer`` False
    ignore their crop channels; the map there is what the tokens would take from them."""
    if len(shape) != 4 or shape[1] != config.in_channels:
        raise ValueError(f"CLAP features are [batch, {config.in_channels}, frames, "
                         f"{config.num_mel_bins}], got {tuple(shape)}")
    index = token_index(config, int(tokens.shape[-1]), int(shape[2]))
    padded = jnp.concatenate([tokens, jnp.zeros_like(tokens[:, :1])], axis=1)
    return padded[:, np.where(index < 0, tokens.shape[-1], index)]


def waveform_relevance(config: ClapConfig, relevance, n_samples, *, crops=None) -> jnp.ndarray:
    """``relevance [B, C, T, 64]`` over the features of clips of ``n_samples`` (an int or
    ``[B]``) samples -> ``[B, max n_samples]`` over each clip's own samples.

    Each frame's relevance is spread evenly over the 480 samples from ``480 t`` on of the
    signal it analysed (the convention of ``Attribution.to_waveform``), and that signal's
    samples are traced back to the clip's, as the front end built it
    (:mod:`jaxspeech.frontends.clap`): a short clip's repeats (``repeatpad``,
    ``repeat``) fold back onto the clip and zero padding gives to nothing; a
    ``rand_trunc`` crop sits at its offset; fusion's channel 0 (the whole clip's mel
    shrunk to 1001 frames) shares each frame between the frames it was interpolated from,
    by the bilinear weights, and its crop channels sit at their frame offsets (short fused
    clips: 4 copies of one signal, summed). Relevance past the clip is dropped, the rest
    is kept. ``crops``: as :func:`prepare` took them (``None``: its key-less crops; crops
    drawn with a key must be passed to be placed right).
    """
    relevance = jnp.asarray(relevance)
    if relevance.ndim != 4 or relevance.shape[1] != config.in_channels:
        raise ValueError(f"CLAP relevance is [batch, {config.in_channels}, frames, "
                         f"{config.num_mel_bins}], got {tuple(relevance.shape)}")
    batch, hop = relevance.shape[0], frontend.HOP_LENGTH
    sizes = np.broadcast_to(np.asarray(n_samples, np.int64), (batch,))
    crops = None if crops is None else np.asarray(crops, np.int64).reshape(batch, -1)
    per_frame = relevance.sum(axis=-1)  # [B, C, T]
    out = []
    for b, n in enumerate(int(v) for v in sizes):
        whole_mel = config.truncation == "fusion" and frontend.n_frames(n) == frontend.CHUNK_FRAMES
        if n <= frontend.MAX_SAMPLES or whole_mel:
            # the analysed signal's samples as clip sample numbers + 1 (0: padding)
            code = np.arange(1, n + 1) if whole_mel else np.asarray(frontend.pad_short(
                jnp.arange(1, frontend.MAX_SAMPLES + 1)[None], np.array([n]), config.padding),
                np.int64)[0]  # exact: float32 holds integers to 2**24
            frames = per_frame[b].sum(axis=0)  # fusion: 4 copies of one signal
        elif config.truncation == "rand_trunc":
            start = int(frontend.deterministic_crops(n, "rand_trunc")[0] if crops is None
                        else crops[b, 0])
            code = start + np.arange(1, frontend.MAX_SAMPLES + 1)
            frames = per_frame[b, 0]
        else:  # fusion, longer than 10 s: frames of the whole clip's mel
            total = frontend.n_frames(n)
            starts = frontend.deterministic_crops(n, "fusion") if crops is None else crops[b]
            index, weight = frontend.resize_weights(total, frontend.CHUNK_FRAMES, "bilinear")
            frames = jnp.zeros(total, relevance.dtype).at[index.reshape(-1)].add(
                (per_frame[b, 0][:, None] * jnp.asarray(weight)).reshape(-1))
            for k in range(3):
                frames = frames.at[int(starts[k]) + np.arange(per_frame.shape[-1])].add(
                    per_frame[b, k + 1])
            code = np.arange(1, n + 1)
        samples = jnp.repeat(frames / hop, hop)[:code.size]
        code = code[:samples.shape[0]]
        clip = jnp.zeros(n + 1, relevance.dtype).at[code].add(samples)[1:]
        out.append(jnp.pad(clip, (0, int(sizes.max()) - n)))
    return jnp.stack(out)


def example_features(config: ClapConfig, batch: int):
    spec = jax.ShapeDtypeStruct((batch, config.in_channels, frontend.CHUNK_FRAMES,
                                 config.num_mel_bins), jnp.float32)
    return spec, {"is_longer": jnp.zeros((batch,), bool)}


FAMILY = register_family(Family(
    name="clap",
    config_type=ClapConfig,
    presets=PRESETS,
    module=lambda config, rules=None, remat=False: ClapAudio(config, rules, remat),
    prepare=prepare,
    example_features=example_features,
    sample_rate=lambda config: config.sampling_rate,
    time_axis=2,
    hop_length=lambda config: frontend.HOP_LENGTH,
    tokens_to_features=tokens_to_features,
    attention_geometry=attention_geometry,
    waveform_relevance=waveform_relevance,
))
