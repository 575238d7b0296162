"""CLAP's mel front end in jnp (HF ``ClapFeatureExtractor``, LAION-CLAP's ``get_audio_features``).

    wave [B, samples] at 48 kHz, each clip at its own length
      short (<= 10 s): pad to 480000 samples by ``padding``
          repeatpad: tile the clip int(480000 / n) times, then zero-pad
          repeat:    tile it int(480000 / n) + 1 times, then cut
          pad:       zero-pad
      long (> 10 s), by ``truncation``
          rand_trunc: a 480000-sample crop of the waveform (start drawn uniformly)
          fusion:     the mel of the *whole* clip; channel 0 = that mel shrunk to 1001
                      frames (bilinear, torch ``interpolate(align_corners=False)``),
                      channels 1-3 = 1001-frame crops from the front / middle / back
                      thirds of the possible start frames
      -> |STFT|^2 (n_fft 1024, hop 480, periodic Hann, centred, reflect padding)
      -> mel filters (rand_trunc: slaney scale + slaney norm; fusion: HTK scale, no norm),
         fmin / fmax from the checkpoint's preprocessor config
      -> 10 * log10(max(x, 1e-10))
      -> features [B, 1, 1001, 64] (rand_trunc) or [B, 4, 1001, 64] (fusion; short clips
         get 4 identical copies), plus ``is_longer [B]``.

Randomness is explicit: with a ``jax.random`` key the crop starts are drawn as HF
draws them (uniformly over the same ranges, one sub-key per item so an item's draw
does not depend on the rest of the batch); without a key the choice is
deterministic: rand_trunc crops the *start* of the clip, fusion takes the first
start of the front third, the middle start of the middle third and the last start
of the back third. ``crops`` passes the starts explicitly (to replay a reference).

``is_longer`` (which items the fused model runs its attention-fusion branch on)
follows one of three rules (``longer=``), because HF's rule depends on the batch:

- ``"per_clip"`` (default): each clip gets the flag HF gives it when processed on its
  own. HF flags a lone clip that is not longer than 10 s anyway ("randomly select one
  audio to be longer" in a batch of one), so every fusion clip is flagged. Outputs
  never depend on what else is in the batch.
- ``"per_batch"``: HF's batch rule: clips longer than 10 s are flagged; if none is,
  one item is (drawn with the key; item 0 without one).
- ``"length"``: only clips longer than 10 s (LAION's original evaluation).

Numerics: HF computes the STFT in float64 and rounds each bin to complex64; so does
this front end on CPU and GPU (a ``jax.enable_x64`` island with its own VJP; the
rest is float32), matching to ~1e-6 relative for any signal. A float32 FFT would
add rounding noise ~120 dB below each frame's peak, which the unclamped dB scale
shows in the empty bins of synthetic tones (~0.3 dB near the -100 dB floor); that
is what happens on TPU, which has no float64. Recorded audio (a 16-bit noise
floor) is unaffected either way.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxspeech.frontends.spectral import frame, mel_filter_bank, power_spectrogram, window

__all__ = ["SAMPLE_RATE", "N_FFT", "HOP_LENGTH", "N_MELS", "MAX_SAMPLES", "CHUNK_FRAMES",
           "TRUNCATIONS", "PADDINGS", "LONGER_RULES", "mel_filters", "log_mel", "float64_fft",
           "pad_short", "fusion_ranges", "deterministic_crops", "interpolate_time",
           "resize_weights", "clap_features"]

SAMPLE_RATE = 48000
N_FFT = 1024
HOP_LENGTH = 480
N_MELS = 64
MAX_SECONDS = 10
MAX_SAMPLES = SAMPLE_RATE * MAX_SECONDS  # 480000
CHUNK_FRAMES = MAX_SAMPLES // HOP_LENGTH + 1  # 1001: a centred STFT has one more frame than hops
TRUNCATIONS = ("rand_trunc", "fusion")
PADDINGS = ("repeatpad", "repeat", "pad")
LONGER_RULES = ("per_clip", "per_batch", "length")


# --- spectra --------------------------------------------------------------------------

def mel_filters(fmin: float, fmax: float, truncation: str) -> np.ndarray:
    """``[513, 64]`` float32: slaney scale and norm for rand_trunc (librosa's defaults, as
    LAION computed it there), HTK scale without norm for fusion (torchaudio's defaults)."""
    if truncation == "fusion":
        fb = mel_filter_bank(N_FFT // 2 + 1, N_MELS, float(fmin), float(fmax), SAMPLE_RATE,
                             norm=None, mel_scale="htk")
    else:
        fb = mel_filter_bank(N_FFT // 2 + 1, N_MELS, float(fmin), float(fmax), SAMPLE_RATE,
                             norm="slaney", mel_scale="slaney")
    return fb.astype(np.float32)


def _spectrum64(frames: jnp.ndarray) -> jnp.ndarray:
    """Windowed rFFT in float64 (call under ``jax.enable_x64``), as HF's NumPy loop."""
    w = jnp.asarray(window("hann", N_FFT), jnp.float64)
    return jnp.fft.rfft(frames.astype(jnp.float64) * w.reshape((1,) * (frames.ndim - 1) + (-1,)),
                        axis=-1)


@jax.custom_vjp
def _power64(frames: jnp.ndarray) -> jnp.ndarray:
    """``|rfft(frames · hann)|²`` ``[..., 513]`` float32, the FFT in float64 and rounded to
    complex64 as HF rounds it. A float32 FFT adds rounding noise ~120 dB below each
    frame's peak, which CLAP's unclamped dB scale shows in tonal signals' empty bins."""
    with jax.enable_x64(True):
        spec = _spectrum64(frames).astype(jnp.complex64)
    return jnp.real(spec) ** 2 + jnp.imag(spec) ** 2


def _power64_fwd(frames):
    return _power64(frames), frames


def _power64_bwd(frames, g):
    with jax.enable_x64(True):
        _, vjp = jax.vjp(lambda f: jnp.abs(_spectrum64(f)) ** 2, frames.astype(jnp.float64))
        (grad,) = vjp(g.astype(jnp.float64))
    return (grad.astype(frames.dtype),)


_power64.defvjp(_power64_fwd, _power64_bwd)


def float64_fft() -> bool:
    """Whether the STFT runs in float64: on CPU and GPU; TPUs have no float64 (there the
    FFT is float32, see the module docs)."""
    return jax.default_backend() in ("cpu", "gpu", "cuda", "rocm")


def log_mel(wave: jnp.ndarray, filters: np.ndarray) -> jnp.ndarray:
    """``wave [B, samples]`` (> 512 samples) -> dB mel ``[B, 1 + samples // 480, 64]``."""
    if not float64_fft():
        power = power_spectrogram(wave, n_fft=N_FFT, hop_length=HOP_LENGTH)
    else:
        padded = jnp.pad(wave, [(0, 0), (N_FFT // 2, N_FFT // 2)], mode="reflect")
        power = _power64(frame(padded, N_FFT, HOP_LENGTH))
    mel = jnp.einsum("btf,fm->btm", power, jnp.asarray(filters), precision="highest")
    return 10.0 * jnp.log10(jnp.maximum(mel, 1e-10))


def pad_short(rows: jnp.ndarray, n: jnp.ndarray, padding: str) -> jnp.ndarray:
    """``rows [B, 480000]`` (each clip's ``n [B]`` samples first) -> ``[B, 480000]`` padded by
    ``padding`` with HF's arithmetic (``int(480000 / n)`` repeats). ``n`` may be traced, so
    clips of every length share one compiled program."""
    if padding not in PADDINGS:
        raise ValueError(f"padding {padding!r}: expected one of {PADDINGS}")
    t = jnp.arange(MAX_SAMPLES)[None, :]
    n = jnp.asarray(n, jnp.int32)[:, None]
    if padding == "repeat":  # tiled int(480000 / n) + 1 times, cut
        limit = jnp.full_like(n, MAX_SAMPLES)
    elif padding == "repeatpad":  # tiled int(480000 / n) times, then zeros
        limit = (MAX_SAMPLES // n) * n
    else:
        limit = n
    return jnp.where(t < limit, jnp.take_along_axis(rows, t % n, axis=1), 0.0)


# --- torch-exact 1-D resampling of the time axis ---------------------------------------

def _cubic1(x, a):
    return ((a + 2) * x - (a + 3)) * x * x + 1


def _cubic2(x, a):
    return ((a * x - 5 * a) * x + 8 * a) * x - 4 * a


@functools.lru_cache(maxsize=64)
def resize_weights(n_in: int, n_out: int, mode: str) -> tuple[np.ndarray, np.ndarray]:
    """Taps of torch's ``interpolate`` along one axis: ``(index [n_out, k], weight [n_out, k])``.

    ``mode="bilinear"``: ``align_corners=False``, 2 taps (the extractor's fusion shrink;
    no antialiasing, as torch's default). ``mode="bicubic"``: ``align_corners=True``,
    4 taps of Keys' kernel with a = -0.75 (the encoder's time stretch to 1024 frames).
    Positions and weights are computed in float32 in the same order as ATen's CPU
    kernels (``area_pixel_compute_source_index``, ``guard_index_and_lambda``,
    ``get_cubic_upsample_coefficients``) so the result matches to rounding.
    """
    f = np.float32
    dst = np.arange(n_out)
    if mode == "bilinear":
        if n_in == n_out:
            return dst[:, None], np.ones((n_out, 1), f)
        scale = f(n_in) / f(n_out)
        src = scale * (dst.astype(f) + f(0.5)) - f(0.5)
        src = np.maximum(src, f(0))
        i0 = np.minimum(np.floor(src).astype(np.int64), n_in - 1)
        lam1 = np.clip(src - i0.astype(f), f(0), f(1)).astype(f)
        i1 = i0 + (i0 < n_in - 1)
        return np.stack([i0, i1], 1), np.stack([f(1) - lam1, lam1], 1).astype(f)
    if mode == "bicubic":
        scale = f(n_in - 1) / f(n_out - 1) if n_out > 1 else f(0)
        src = (scale * dst.astype(f)).astype(f)
        i = np.minimum(np.floor(src).astype(np.int64), n_in - 1)
        t = np.clip(src - i.astype(f), f(0), f(1)).astype(f)
        a = f(-0.75)
        w = np.stack([_cubic2(t + f(1), a), _cubic1(t, a), _cubic1(f(1) - t, a),
                      _cubic2(f(2) - t, a)], 1).astype(f)
        idx = np.clip(i[:, None] - 1 + np.arange(4)[None, :], 0, n_in - 1)
        return idx, w
    raise ValueError(f"mode {mode!r}: expected 'bilinear' or 'bicubic'")


def interpolate_time(x: jnp.ndarray, n_out: int, mode: str, axis: int = -2) -> jnp.ndarray:
    """Resize ``x`` along ``axis`` to ``n_out`` as torch's ``interpolate`` does (see
    :func:`resize_weights`); other axes are untouched (torch's weights along an axis of
    unchanged size are exactly the identity). Linear in ``x``, so differentiable."""
    axis = axis % x.ndim
    idx, w = resize_weights(x.shape[axis], n_out, mode)
    shape = [1] * x.ndim
    shape[axis] = n_out
    out = None
    for k in range(idx.shape[1]):
        term = jnp.take(x, idx[:, k], axis=axis) * jnp.asarray(w[:, k]).reshape(shape)
        out = term if out is None else out + term
    return out


# --- crops ----------------------------------------------------------------------------

def fusion_ranges(total_frames: int) -> list[np.ndarray]:
    """HF's three ranges of chunk starts (front / middle / back thirds of the possible
    starts ``0 .. total_frames - 1001``; an empty third falls back to ``[0]``)."""
    ranges = np.array_split(np.arange(0, total_frames - CHUNK_FRAMES + 1), 3)
    return [r if len(r) else np.array([0]) for r in ranges]


def n_frames(n_samples: int) -> int:
    return 1 + n_samples // HOP_LENGTH


def deterministic_crops(n_samples: int, truncation: str) -> np.ndarray:
    """The crop starts used without a key: rand_trunc ``[0]`` (sample offset, the start);
    fusion ``[first of front, middle of middle, last of back]`` (frame offsets)."""
    if truncation == "rand_trunc":
        return np.array([0])
    front, middle, back = fusion_ranges(n_frames(n_samples))
    return np.array([front[0], middle[len(middle) // 2], back[-1]])


def _random_crops(key, n_samples: int, truncation: str) -> jnp.ndarray:
    if truncation == "rand_trunc":
        return jax.random.randint(key, (1,), 0, n_samples - MAX_SAMPLES + 1)
    keys = jax.random.split(key, 3)
    return jnp.stack([jax.random.randint(k, (), int(r[0]), int(r[-1]) + 1)
                      for k, r in zip(keys, fusion_ranges(n_frames(n_samples)), strict=True)])


def _check_crops(crops: np.ndarray, n_samples: int, truncation: str) -> None:
    if truncation == "rand_trunc":
        lo, hi = 0, n_samples - MAX_SAMPLES
        if crops.shape != (1,) or not lo <= crops[0] <= hi:
            raise ValueError(f"rand_trunc crop for a {n_samples}-sample clip must be one sample "
                             f"offset in [{lo}, {hi}], got {crops.tolist()}")
        return
    ranges = fusion_ranges(n_frames(n_samples))
    if crops.shape != (3,) or not all(r[0] <= c <= r[-1] for c, r in zip(crops, ranges, strict=True)):
        raise ValueError(
            f"fusion crops for a {n_samples}-sample clip must be 3 frame offsets within "
            f"{[(int(r[0]), int(r[-1])) for r in ranges]}, got {crops.tolist()}")


# --- compiled pieces -------------------------------------------------------------------

@functools.partial(jax.jit, static_argnames=("padding",))
def _short_windows(rows, n, *, padding):
    return pad_short(rows, n, padding)


@functools.partial(jax.jit, static_argnames=("truncation", "fmin", "fmax"))
def _window_features(windows, *, truncation, fmin, fmax):
    """``[G, 480000]`` -> ``[G, 1, 1001, 64]`` (rand_trunc) or 4 copies (fusion)."""
    mel = log_mel(windows, mel_filters(fmin, fmax, truncation))
    return mel[:, None] if truncation == "rand_trunc" else jnp.stack([mel] * 4, axis=1)


@functools.partial(jax.jit, static_argnames=("fmin", "fmax"))
def _fusion_long(wave, starts, *, fmin, fmax):
    """Fused clips longer than 10 s, all ``n`` samples: ``wave [G, n]``, ``starts [G, 3]``
    -> ``[G, 4, 1001, 64]`` (shrunk whole + 3 crops; compiled per ``n``)."""
    mel = log_mel(wave, mel_filters(fmin, fmax, "fusion"))  # the whole clip
    if mel.shape[1] == CHUNK_FRAMES:  # 480000 < n < 480480: HF uses the whole mel as is
        return jnp.stack([mel] * 4, axis=1)
    shrunk = interpolate_time(mel, CHUNK_FRAMES, "bilinear", axis=1)
    chunks = jax.vmap(lambda m, s: jnp.stack(
        [jax.lax.dynamic_slice(m, (s[i], 0), (CHUNK_FRAMES, N_MELS)) for i in range(3)]))(
        mel, starts)
    return jnp.concatenate([shrunk[:, None], chunks], axis=1)


def clap_features(
    wave: jnp.ndarray,
    n_samples: Sequence[int] | None = None,
    *,
    fmin: float = 50.0,
    fmax: float = 14000.0,
    truncation: str = "rand_trunc",
    padding: str = "repeatpad",
    key: jax.Array | None = None,
    crops=None,
    longer: str = "per_clip",
) -> tuple[jnp.ndarray, jnp.ndarray]:
    """``wave [B, samples]`` -> ``(features [B, 1 or 4, 1001, 64], is_longer [B] bool)``.

    ``n_samples``: each clip's true length (the rest of its row is padding and is
    ignored, as HF sees only the clip); ``None``: all rows are whole clips. Lengths are
    concrete ints (they choose each clip's path); the samples may be traced, and the
    result is differentiable with respect to them. Clips up to 10 s (and rand_trunc
    crops) share one compiled program whatever their lengths; fused clips over 10 s
    compile once per length (their whole mel is used).
    ``key``: draw crop starts at random (``None``: the deterministic starts, see
    :func:`deterministic_crops`). ``crops``: explicit starts, ``[B]`` sample offsets
    (rand_trunc) or ``[B, 3]`` frame offsets (fusion); rows of clips that are not
    longer than 10 s are ignored. ``longer``: the ``is_longer`` rule (module docs).
    """
    if truncation not in TRUNCATIONS:
        raise ValueError(f"truncation {truncation!r}: expected one of {TRUNCATIONS}")
    if padding not in PADDINGS:
        raise ValueError(f"padding {padding!r}: expected one of {PADDINGS}")
    if longer not in LONGER_RULES:
        raise ValueError(f"longer={longer!r}: expected one of {LONGER_RULES}")
    if key is not None and crops is not None:
        raise ValueError("pass either key (random crops) or crops (explicit), not both")
    wave = jnp.asarray(wave, jnp.float32)
    b, width = wave.shape
    sizes = [width] * b if n_samples is None else [int(s) for s in n_samples]
    if len(sizes) != b or min(sizes) < 1 or max(sizes) > width:
        raise ValueError(f"n_samples {sizes} does not fit a batch of shape {(b, width)}")
    if crops is not None:
        crops = np.asarray(crops, np.int64).reshape(b, -1)
    item_keys = None if key is None else jax.random.split(key, b + 1)

    starts = []
    for i, n in enumerate(sizes):
        if n <= MAX_SAMPLES:
            starts.append(None)
        elif item_keys is not None:
            starts.append(_random_crops(item_keys[i], n, truncation).astype(jnp.int32))
        else:
            c = deterministic_crops(n, truncation) if crops is None else crops[i]
            _check_crops(np.asarray(c), n, truncation)
            starts.append(jnp.asarray(c, jnp.int32))

    # Every clip becomes a 10 s window (padded short clip or rand_trunc crop) featurised in
    # one batch; fused long clips need their whole mel and go by length.
    fmin, fmax = float(fmin), float(fmax)
    sizes_np = np.asarray(sizes)
    parts, order = [], []
    short = np.flatnonzero(sizes_np <= MAX_SAMPLES)
    crop = np.flatnonzero(sizes_np > MAX_SAMPLES) if truncation == "rand_trunc" else short[:0]
    windows = []
    if len(short):
        rows = wave[short, :MAX_SAMPLES] if width >= MAX_SAMPLES else jnp.pad(
            wave[short], [(0, 0), (0, MAX_SAMPLES - width)])
        windows.append(_short_windows(rows, sizes_np[short], padding=padding))
    if len(crop):
        windows.append(jax.vmap(lambda w, s: jax.lax.dynamic_slice(w, (s[0],), (MAX_SAMPLES,)))(
            wave[crop], jnp.stack([starts[i] for i in crop])))
    if windows:
        parts.append(_window_features(windows[0] if len(windows) == 1 else jnp.concatenate(windows),
                                      truncation=truncation, fmin=fmin, fmax=fmax))
        order.extend(short.tolist() + crop.tolist())
    if truncation == "fusion":
        for n in sorted({s for s in sizes if s > MAX_SAMPLES}):
            idx = [i for i, s in enumerate(sizes) if s == n]
            parts.append(_fusion_long(wave[np.asarray(idx), :n], jnp.stack([starts[i] for i in idx]),
                                      fmin=fmin, fmax=fmax))
            order.extend(idx)
    features = parts[0] if len(parts) == 1 else jnp.concatenate(parts, axis=0)
    if order != list(range(b)):
        features = features[np.argsort(order)]

    long_ = np.array([n > MAX_SAMPLES and (truncation == "rand_trunc"
                                           or n_frames(n) != CHUNK_FRAMES) for n in sizes])
    if truncation == "rand_trunc" or longer == "length":
        is_longer = jnp.asarray(long_)
    elif longer == "per_clip":
        is_longer = jnp.ones((b,), bool)
    elif long_.any():
        is_longer = jnp.asarray(long_)
    else:  # per_batch with no long clip: HF flags one item at random
        pick = 0 if item_keys is None else jax.random.randint(item_keys[-1], (), 0, b)
        is_longer = jnp.arange(b) == pick
    return features, is_longer
