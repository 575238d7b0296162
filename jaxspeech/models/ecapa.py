"""ECAPA-TDNN (Desplanques et al. 2020) as SpeechBrain's ``ECAPA_TDNN`` + ``Classifier``.

    features [B, T, n_mels] (Fbank + sentence mean norm), lengths [B] (relative)
      -> blocks.0: TDNN k5                                   "embedding_model.blocks.0.hidden_state"
      -> blocks.1..3: SE-Res2Net (k3, dilation 2, 3, 4)      "embedding_model.blocks.i.hidden_state"
           tdnn1 (k1) -> res2net_block -> tdnn2 (k1) -> se_block -> + residual
      -> mfa: TDNN k1 over cat(blocks.1..3)                  "embedding_model.mfa.hidden_state"
      -> asp: attentive statistics pooling, global context   "embedding_model.asp.attention"
           cat[x, mean, std] -> tdnn -> tanh -> conv -> softmax over valid frames
           -> cat[weighted mean, weighted std]
      -> asp_bn (BatchNorm) -> fc (k1)                       output: embedding [B, lin_neurons]
    classifier (optional): cosine logits normalize(emb) @ normalize(W).T   "logits" [B, out_neurons]

TDNN = conv ('same' length, *reflect* padding, per side floor(d(k-1)/2)) -> ReLU ->
BatchNorm (inference statistics stored in the params tree). Every TDNN block sows
and exposes (:func:`jaxspeech.layers.tap`) its output as ``<path>.hidden_state``.

Params: ``{"embedding_model": ..., "classifier": {"weight": [out_neurons, lin_neurons]}}``
(no ``classifier`` when ``out_neurons == 0``). Paths mirror SpeechBrain's state-dict
names with SpeechBrain's wrapper level dropped: ``blocks.1.res2net_block.blocks.0.conv``
is the torch ``blocks.1.res2net_block.blocks.0.conv.conv``, ``...norm`` is ``...norm.norm``
(see :func:`jaxspeech.convert.ecapa.torch_key`). ``apply`` returns the embedding;
the logits are the intermediate ``"logits"`` of ``Model.forward`` or
:func:`logits` ``(m, embedding)``.

Lengths (relative, SpeechBrain's convention): frame ``t`` of item ``b`` is valid when
``t < lengths[b] * T`` (``length_to_mask``). Everything an item's embedding depends
on is computed from its valid frames only: the SE means, the pooling statistics and
softmax (masked), *and* the reflect padding of every convolution, which reflects at
the item's own last valid frame. So a padded item gives the embedding it gives
alone. SpeechBrain reflects at the end of the padded tensor, so there the last
frames of a short item see padding and its embedding changes slightly with the
batch (speechbrain #1374, #945); for items that fill the batch the two agree.
There is no maximum input length. The minimum is ``config.min_frames`` frames (5 for
the preset: 640 samples, 40 ms), what reflect padding needs at the largest dilation;
SpeechBrain refuses shorter inputs too. Shorter inputs and clips in a list raise.
"""

from __future__ import annotations

import dataclasses
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxspeech import audio, layers, lrp
from jaxspeech.frontends import fbank as frontend
from jaxspeech.model import Family, register_family

Rules = lrp.RuleSet | None


@dataclasses.dataclass(frozen=True)
class EcapaConfig:
    """ECAPA-TDNN hyper-parameters, named as SpeechBrain's ``ECAPA_TDNN`` arguments,
    plus the classifier size and the ``Fbank`` / ``InputNormalization`` settings."""

    n_mels: int = 80  # ECAPA_TDNN input_size
    channels: tuple[int, ...] = (1024, 1024, 1024, 1024, 3072)
    kernel_sizes: tuple[int, ...] = (5, 3, 3, 3, 1)
    dilations: tuple[int, ...] = (1, 2, 3, 4, 1)
    groups: tuple[int, ...] = (1, 1, 1, 1, 1)
    attention_channels: int = 128
    res2net_scale: int = 8
    se_channels: int = 128
    global_context: bool = True
    lin_neurons: int = 192
    out_neurons: int = 0  # Classifier out_neurons; 0: no classifier head
    # front end (SpeechBrain Fbank; window and hop in ms as there)
    sample_rate: int = 16000
    n_fft: int = 400
    win_length_ms: float = 25.0
    hop_length_ms: float = 10.0
    f_min: float = 0.0
    f_max: float | None = None
    std_norm: bool = False  # InputNormalization(norm_type="sentence", std_norm=...)
    # the compute dtype (mixed precision; params stay float32): "float32", "bfloat16", "float16"
    dtype: str = "float32"

    def __post_init__(self):
        layers.check_dtype(self.dtype)
        n = len(self.channels)
        if not (n == len(self.kernel_sizes) == len(self.dilations) == len(self.groups)) or n < 3:
            raise ValueError(
                f"ECAPA config: channels, kernel_sizes, dilations and groups must have the same "
                f"length >= 3, got {len(self.channels)}, {len(self.kernel_sizes)}, "
                f"{len(self.dilations)}, {len(self.groups)}")
        if any(k % 2 == 0 for k in self.kernel_sizes):
            raise ValueError(f"ECAPA config: kernel_sizes {self.kernel_sizes} must be odd "
                             "('same' padding)")
        if any(c % self.res2net_scale for c in self.channels[1:-1]):
            raise ValueError(f"ECAPA config: channels {self.channels[1:-1]} must be divisible "
                             f"by res2net_scale={self.res2net_scale}")

    @property
    def win_length(self) -> int:
        return int(round(self.sample_rate / 1000.0 * self.win_length_ms))

    @property
    def hop_length(self) -> int:
        return int(round(self.sample_rate / 1000.0 * self.hop_length_ms))

    @property
    def min_frames(self) -> int:
        """The fewest frames an item may have: reflect padding of ``p`` frames needs
        ``p + 1`` (torch's reflect pad refuses less)."""
        return 1 + max(d * (k - 1) // 2 for k, d in zip(self.kernel_sizes, self.dilations,
                                                         strict=True))


PRESETS = {
    # speechbrain/spkrec-ecapa-voxceleb (VoxCeleb 1+2, 7205 training speakers)
    "ecapa-voxceleb": EcapaConfig(out_neurons=7205),
}


# --- padding and masks ----------------------------------------------------------------

def pad_same(x: jnp.ndarray, n_valid: jnp.ndarray | None, kernel_size: int,
             dilation: int) -> jnp.ndarray:
    """Reflect-pad ``x [B, T, C]`` by ``p = floor(d(k-1)/2)`` per side (SpeechBrain's 'same').

    Each item is reflected at its own last valid frame (``n_valid [B]``; ``None``: all
    ``T``): padded position ``n - 1 + i`` (``i = 1..p``) takes frame ``n - 1 - i``, and
    ``-i`` takes frame ``i``. Both are ``x`` shifted by ``2i``, so the padding is ``2p``
    static shifts and selects that XLA fuses into one pass (XLA:CPU gathers made the
    whole forward ~40% slower). Exact for items of at least ``p + 1`` frames
    (``EcapaConfig.min_frames``; SpeechBrain refuses shorter inputs).
    """
    pad = dilation * (kernel_size - 1) // 2
    if pad == 0:
        return x
    b, t = x.shape[:2]
    n = jnp.full((b,), t, jnp.int32) if n_valid is None else n_valid
    position = jnp.arange(t + 2 * pad)[None, :] - pad  # in x's frame indices
    zero = jnp.zeros((), x.dtype)

    def shifted(by):  # shifted(by)[:, q] = x[:, q - pad - by]
        return jax.lax.pad(x, zero, [(0, 0, 0), (pad + by, pad - by, 0), (0, 0, 0)])

    out = shifted(0)
    for i in range(1, pad + 1):
        out = jnp.where((position == -i)[:, :, None], shifted(-2 * i), out)
        out = jnp.where((position == n[:, None] - 1 + i)[:, :, None], shifted(2 * i), out)
    return out


def _masked_mean(x: jnp.ndarray, weights: jnp.ndarray) -> jnp.ndarray:
    """``sum_t weights * x`` of ``x [B, T, C]``, ``weights [B, T, 1]`` -> ``[B, 1, C]``.

    A matrix product: XLA:CPU compiles ``jnp.sum(weights * x, axis=1)`` (a reduction
    over the middle axis) ~50x slower at batch 1, and recomputes fused means inside
    a following variance."""
    return jnp.einsum("bt,btc->bc", weights[:, :, 0], x,
                      precision=jax.lax.Precision.HIGHEST)[:, None, :]


# --- modules --------------------------------------------------------------------------

def _context_conv(x: jnp.ndarray, w: jnp.ndarray, b: jnp.ndarray | None) -> jnp.ndarray:
    """The 1x1 conv ``[B, T, 3C] -> [B, T, out]`` over ``cat[x, mean, std]`` whose last two
    parts are constant over time (global context), as ``x W_x + (mean W_m + std W_s)``.

    Equal to the full 1x1 conv on such inputs (also its gradient after the broadcast:
    the constant parts are read at frame 0 only). It reads slices of the concatenation,
    so XLA never builds the ``[B, T, 3C]`` tensor and does a third of the work, while
    the LRP rules still see one linear layer over the concatenation.
    """
    c = x.shape[-1] // 3

    def part(i, frames):  # each slice within one operand of the concatenation
        return jnp.einsum("btc,co->bto", x[:, frames, i * c:(i + 1) * c], w[0, i * c:(i + 1) * c],
                          precision=jax.lax.Precision.HIGHEST)

    y = part(0, slice(None)) + (part(1, slice(0, 1)) + part(2, slice(0, 1)))
    return y if b is None else y + layers.per_channel(b, y)


class _ContextConv(nn.Module):
    """A 1x1 conv (params as :class:`layers.Conv`) computed by :func:`_context_conv`."""

    features: int
    rules: Rules = None

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        w = self.param("kernel", nn.initializers.lecun_normal(), (1, x.shape[-1], self.features))
        b = self.param("bias", nn.initializers.normal(0.02), (self.features,))
        return lrp.linear(_context_conv, x, w, b, layers.rules_at(self, self.rules))


class TDNNBlock(nn.Module):
    """conv (reflect 'same') -> ReLU -> BatchNorm; ``[B, T, C_in] -> [B, T, features]``.

    ``global_context``: the input is ``cat[x, mean, std]`` with time-constant statistics
    (the pooling's attention TDNN, kernel 1); see :func:`_context_conv`.
    """

    features: int
    kernel_size: int = 1
    dilation: int = 1
    groups: int = 1
    global_context: bool = False
    rules: Rules = None

    @nn.compact
    def __call__(self, x: jnp.ndarray, n_valid: jnp.ndarray | None) -> jnp.ndarray:
        r = layers.rules_at(self, self.rules)
        if self.global_context:
            x = _ContextConv(self.features, rules=self.rules, name="conv")(x)
        else:
            x = pad_same(x, n_valid, self.kernel_size, self.dilation)
            x = layers.Conv(self.features, (self.kernel_size,), dilation=(self.dilation,),
                            groups=self.groups, rules=self.rules, name="conv")(x)
        x = layers.BatchNorm(rules=self.rules, name="norm")(layers.relu(x, r))
        return layers.tap(self, "hidden_state", x)


class Res2NetBlock(nn.Module):
    """Split channels into ``scale`` groups: y0 = x0, y1 = B0(x1), yi = B(i-1)(xi + y(i-1))."""

    features: int
    scale: int
    kernel_size: int
    dilation: int
    rules: Rules = None

    @nn.compact
    def __call__(self, x: jnp.ndarray, n_valid: jnp.ndarray | None) -> jnp.ndarray:
        width = self.features // self.scale
        ys = []
        for i, xi in enumerate(jnp.split(x, self.scale, axis=-1)):
            if i == 0:
                y = xi
            else:
                y = TDNNBlock(width, self.kernel_size, self.dilation, rules=self.rules,
                              name=f"blocks.{i - 1}")(xi if i == 1 else xi + y, n_valid)
            ys.append(y)
        return jnp.concatenate(ys, axis=-1)


class SEBlock(nn.Module):
    """Squeeze-excitation: masked time mean -> conv1 -> ReLU -> conv2 -> sigmoid -> gate x."""

    se_channels: int
    rules: Rules = None

    @nn.compact
    def __call__(self, x: jnp.ndarray, weights: jnp.ndarray) -> jnp.ndarray:
        r = layers.rules_at(self, self.rules)
        s = _masked_mean(x, weights)
        s = layers.relu(layers.Conv(self.se_channels, (1,), rules=self.rules, name="conv1")(s), r)
        s = layers.sigmoid(layers.Conv(x.shape[-1], (1,), rules=self.rules, name="conv2")(s), r)
        return lrp.gate(x, s, r)


class SERes2NetBlock(nn.Module):
    """tdnn1 (k1) -> res2net_block -> tdnn2 (k1) -> se_block -> + residual (shortcut conv
    when the width changes)."""

    features: int
    kernel_size: int
    dilation: int
    res2net_scale: int
    se_channels: int
    groups: int = 1
    rules: Rules = None

    @nn.compact
    def __call__(self, x: jnp.ndarray, n_valid: jnp.ndarray | None,
                 weights: jnp.ndarray) -> jnp.ndarray:
        residual = x
        if x.shape[-1] != self.features:
            residual = layers.Conv(self.features, (1,), rules=self.rules, name="shortcut")(x)
        x = TDNNBlock(self.features, groups=self.groups, rules=self.rules, name="tdnn1")(x, n_valid)
        x = Res2NetBlock(self.features, self.res2net_scale, self.kernel_size, self.dilation,
                         rules=self.rules, name="res2net_block")(x, n_valid)
        x = TDNNBlock(self.features, groups=self.groups, rules=self.rules, name="tdnn2")(x, n_valid)
        x = SEBlock(self.se_channels, rules=self.rules, name="se_block")(x, weights)
        x = x + residual
        return layers.tap(self, "hidden_state", x)


class AttentiveStatisticsPooling(nn.Module):
    """``x [B, T, C]`` -> ``[B, 1, 2C]``: channel-wise attention over the valid frames,
    then the attention-weighted mean and std (``sqrt(max(var, 1e-12))``)."""

    attention_channels: int
    global_context: bool = True
    eps: float = 1e-12
    rules: Rules = None

    def statistics(self, x: jnp.ndarray, weights: jnp.ndarray, r: Rules):
        """Weighted mean and std over time, ``[B, 1, C]`` each. ``weights`` sum to 1 over
        time: ``[B, T, C]`` attention (an activation: products are bilinear for LRP) or
        ``[B, T, 1]`` the constant masked average (products are linear)."""
        def wsum(w, v):
            if w.shape[-1] == 1:
                return _masked_mean(v, w)
            return lrp.bilinear("btc,btc->bc", w, v, r)[:, None, :]

        mean = wsum(weights, x)
        centred = x - mean
        var = wsum(weights, lrp.bilinear("btc,btc->btc", centred, centred, r))
        return mean, lrp.sqrt(jnp.maximum(var, self.eps), r)

    @nn.compact
    def __call__(self, x: jnp.ndarray, valid: jnp.ndarray, n_valid: jnp.ndarray | None,
                 weights: jnp.ndarray) -> jnp.ndarray:
        r = layers.rules_at(self, self.rules)
        b, t, c = x.shape
        if self.global_context:
            mean, std = self.statistics(x, weights, r)
            attn = jnp.concatenate(
                [x, jnp.broadcast_to(mean, (b, t, c)), jnp.broadcast_to(std, (b, t, c))], axis=-1)
        else:
            attn = x
        attn = TDNNBlock(self.attention_channels, global_context=self.global_context,
                         rules=self.rules, name="tdnn")(attn, n_valid)
        attn = layers.Conv(c, (1,), rules=self.rules, name="conv")(layers.tanh(attn, r))
        attn = lrp.attention_weights(attn, r, where=valid[:, :, None], axis=1)
        attn = layers.tap(self, "attention", attn)
        mean, std = self.statistics(x, attn, r)
        return jnp.concatenate([mean, std], axis=-1)


class EcapaTdnn(nn.Module):
    """``features [B, T, n_mels]``, relative ``lengths [B]`` -> embedding ``[B, lin_neurons]``."""

    config: EcapaConfig
    rules: Rules = None
    remat: bool = False

    @nn.compact
    def __call__(self, features: jnp.ndarray, lengths: jnp.ndarray | None = None) -> jnp.ndarray:
        cfg = self.config
        if features.ndim != 3 or features.shape[-1] != cfg.n_mels:
            raise ValueError(f"ECAPA expects features [batch, frames, {cfg.n_mels}], got "
                             f"{tuple(features.shape)}; use m.features(wave)")
        b, t, _ = features.shape
        if t < cfg.min_frames:
            raise ValueError(f"ECAPA needs at least {cfg.min_frames} frames, got {t} "
                             f"({(cfg.min_frames - 1) * cfg.hop_length} samples of audio)")
        features = layers.to_compute(cfg, features)
        valid = frontend.valid_mask(lengths, t, b)  # SpeechBrain's length_to_mask
        n_valid = None if lengths is None else jnp.sum(valid, axis=1).astype(jnp.int32)
        m = valid[:, :, None].astype(features.dtype)
        weights = m / jnp.sum(m, axis=1, keepdims=True)  # masked time average

        ch, ks, ds, gs = cfg.channels, cfg.kernel_sizes, cfg.dilations, cfg.groups
        x = TDNNBlock(ch[0], ks[0], ds[0], gs[0], rules=self.rules, name="blocks.0")(
            features, n_valid)
        block_cls = nn.remat(SERes2NetBlock) if self.remat else SERes2NetBlock
        outputs = []
        for i in range(1, len(ch) - 1):
            x = block_cls(ch[i], ks[i], ds[i], cfg.res2net_scale, cfg.se_channels, gs[i],
                          rules=self.rules, name=f"blocks.{i}")(x, n_valid, weights)
            outputs.append(x)
        x = TDNNBlock(ch[-1], ks[-1], ds[-1], gs[-1], rules=self.rules, name="mfa")(
            jnp.concatenate(outputs, axis=-1), n_valid)
        x = AttentiveStatisticsPooling(cfg.attention_channels, cfg.global_context,
                                       rules=self.rules, name="asp")(x, valid, n_valid, weights)
        x = layers.BatchNorm(rules=self.rules, name="asp_bn")(x)
        x = layers.Conv(cfg.lin_neurons, (1,), rules=self.rules, name="fc")(x)
        return layers.to_output(x[:, 0, :])


def _cosine(x, w, b):
    return jnp.einsum("bi,oi->bo", x, w, precision=jax.lax.Precision.HIGHEST)


def _l2_normalize(x: jnp.ndarray, rules: Rules = None, eps: float = 1e-12) -> jnp.ndarray:
    """``F.normalize``: ``x / max(||x||, eps)`` over the last axis; the norm is a
    normalising scale for LRP."""
    norm = jnp.sqrt(jnp.sum(jnp.square(x), axis=-1, keepdims=True))
    return x / lrp.norm_std(jnp.maximum(norm, eps), rules)


class Classifier(nn.Module):
    """SpeechBrain's AAM-softmax head at inference: cosine logits
    ``normalize(embedding [B, D]) @ normalize(weight [out, D]).T -> [B, out]``."""

    out_neurons: int
    rules: Rules = None

    @nn.compact
    def __call__(self, embedding: jnp.ndarray) -> jnp.ndarray:
        r = layers.rules_at(self, self.rules)
        w = self.param("weight", nn.initializers.xavier_uniform(),
                       (self.out_neurons, embedding.shape[-1]))
        return lrp.linear(_cosine, _l2_normalize(embedding, r), _l2_normalize(w), None, r)


class Ecapa(nn.Module):
    """``embedding_model`` (+ ``classifier``): features -> embedding ``[B, lin_neurons]``;
    the classifier's logits are sown as ``"logits"``."""

    config: EcapaConfig
    rules: Rules = None
    remat: bool = False

    @nn.compact
    def __call__(self, features: jnp.ndarray, lengths: jnp.ndarray | None = None) -> jnp.ndarray:
        emb = EcapaTdnn(self.config, self.rules, self.remat, name="embedding_model")(
            features, lengths)
        if self.config.out_neurons:
            scores = Classifier(self.config.out_neurons, self.rules, name="classifier")(emb)
            layers.tap(self, "logits", scores)
        return emb


def classifier_logits(params_head: dict, embedding: jnp.ndarray, rules: Rules = None) -> jnp.ndarray:
    """Cosine logits ``[B, out_neurons]`` of ``embedding [B, D]`` from the head's params
    (``params["classifier"]``: ``{"weight": [out_neurons, D]}``)."""
    out = params_head["weight"].shape[0]
    return Classifier(out, rules).apply({"params": params_head}, embedding)


def logits(model, embedding: jnp.ndarray, params: dict | None = None) -> jnp.ndarray:
    """The classifier logits of a loaded model for ``embedding [B, D]`` (``m.apply``'s output)."""
    params = model.params if params is None else params
    if "classifier" not in params:
        raise ValueError("this ECAPA model has no classifier head (out_neurons=0; "
                         "SpeechBrain folder without classifier.ckpt)")
    return classifier_logits(params["classifier"], embedding)


# --- family ---------------------------------------------------------------------------

def prepare(config: EcapaConfig, wave: jnp.ndarray, lengths=None):
    """Waveform ``[B, samples]`` (relative sample ``lengths [B]`` or ``None``) ->
    ``(features [B, 1 + samples // hop, n_mels], {"lengths": relative frame lengths [B]})``.

    Fbank -> sentence mean normalisation over each item's own frames; the lengths
    returned select exactly those frames (:func:`jaxspeech.frontends.fbank.frame_lengths`).
    Any duration from ``(min_frames - 1) * hop`` samples (40 ms) up is accepted. Jitted
    (config static); differentiable in ``wave``.
    """
    wave = jnp.asarray(wave, jnp.float32)
    lengths = jnp.ones(wave.shape[:1], jnp.float32) if lengths is None \
        else jnp.asarray(lengths, jnp.float32)
    if not isinstance(lengths, jax.core.Tracer):  # concrete: say which clip is too short
        samples = np.round(np.asarray(lengths) * wave.shape[-1]).astype(int)
        short = np.flatnonzero(1 + samples // config.hop_length < config.min_frames)
        if short.size:
            need = (config.min_frames - 1) * config.hop_length
            raise audio.AudioError(
                f"clip(s) {short.tolist()} have {samples[short].tolist()} samples; ECAPA needs "
                f"at least {need} ({1000 * need / config.sample_rate:.0f} ms)")
    return _prepare(config, wave, lengths)


@functools.partial(jax.jit, static_argnums=0)
def _prepare(config: EcapaConfig, wave: jnp.ndarray, lengths: jnp.ndarray):
    rel = frontend.frame_lengths(lengths, wave.shape[-1], wave.shape[0], config.hop_length)
    feats = frontend.fbank(
        wave, rel, n_mels=config.n_mels, sample_rate=config.sample_rate, n_fft=config.n_fft,
        win_length=config.win_length, hop_length=config.hop_length, f_min=config.f_min,
        f_max=config.f_max)
    return frontend.sentence_norm(feats, rel, std_norm=config.std_norm), {"lengths": rel}


def tokens_to_features(config: EcapaConfig, layer: str, tokens: jnp.ndarray, shape):
    """``[B, T]`` (one value per frame: every ECAPA layer keeps the 10 ms frame rate)
    -> ``[B, T, n_mels]``."""
    return jnp.broadcast_to(tokens[:, :, None], shape)


def example_features(config: EcapaConfig, batch: int):
    return jax.ShapeDtypeStruct((batch, 200, config.n_mels), jnp.float32), {}


FAMILY = register_family(Family(
    name="ecapa",
    config_type=EcapaConfig,
    presets=PRESETS,
    module=lambda config, rules=None, remat=False: Ecapa(config, rules, remat),
    prepare=prepare,
    example_features=example_features,
    sample_rate=lambda config: config.sample_rate,
    time_axis=1,
    hop_length=lambda config: config.hop_length,
    tokens_to_features=tokens_to_features,
))
