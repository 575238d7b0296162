"""CLAP front end vs transformers' ClapFeatureExtractor (and torch's interpolate), no model weights."""

import contextlib
from unittest import mock

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from transformers import ClapFeatureExtractor

import jaxspeech as js
from jaxspeech.audio import AudioError
from jaxspeech.convert.clap import hf_features
from jaxspeech.data import synth
from jaxspeech.frontends import clap as fc
from jaxspeech.models.clap import ClapConfig, prepare

SR = 48000
TOL = 1e-4  # max |diff| relative to max |reference|, float32 (DESIGN.md)


def rel_err(x, ref) -> float:
    x, ref = np.asarray(x, np.float64), np.asarray(ref, np.float64)
    return float(np.abs(x - ref).max() / np.abs(ref).max())


def clip(seconds: float, seed: int = 0) -> np.ndarray:
    """A voiced sweep over a noise floor, stored as 16-bit PCM would store it."""
    n = int(round(seconds * SR))
    x = synth.harmonic_sweep(n / SR, SR, seed=seed)[:n]
    x = x + 3e-3 * np.random.default_rng(seed).standard_normal(n)
    return (np.round(np.clip(x, -1, 1) * 32767) / 32768).astype(np.float32)


@pytest.fixture(scope="module")
def extractors():
    return {t: ClapFeatureExtractor(frequency_min=50, frequency_max=14000, truncation=t)
            for t in fc.TRUNCATIONS}


@contextlib.contextmanager
def recorded_hf_random(seed: int):
    """Seed NumPy's global RNG and record what the extractor draws from it."""
    np.random.seed(seed)
    drawn = {"choice": [], "randint": []}
    choice, randint = np.random.choice, np.random.randint

    def rec_choice(*a, **k):
        v = choice(*a, **k)
        drawn["choice"].append(int(v))
        return v

    def rec_randint(*a, **k):
        v = randint(*a, **k)
        drawn["randint"].append(int(v))
        return v

    with mock.patch.object(np.random, "choice", rec_choice), \
            mock.patch.object(np.random, "randint", rec_randint):
        yield drawn


def test_mel_filters_equal_hf(extractors):
    fe = extractors["fusion"]
    # the same float64 construction, ours stored in float32: 6e-8 relative (measured 5 % of
    # this bound)
    np.testing.assert_allclose(fc.mel_filters(50, 14000, "rand_trunc"), fe.mel_filters_slaney,
                               rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(fc.mel_filters(50, 14000, "fusion"), fe.mel_filters,
                               rtol=1e-6, atol=1e-9)


def test_float64_stft_matches_hf_on_a_pure_tone(extractors, monkeypatch):
    """A noiseless tone has bins ~130 dB below its peak: HF's float64 FFT resolves them,
    a float32 FFT buries them in rounding noise (the TPU path)."""
    fe = extractors["rand_trunc"]
    wave = synth.harmonic_sweep(10.0, SR)
    ref = fe._np_extract_fbank_features(wave.astype(np.float64), fe.mel_filters_slaney)
    filters = fc.mel_filters(50, 14000, "rand_trunc")
    assert fc.float64_fft()
    # float64 FFT on both sides, ours stored in float32 (2⁻²⁴ = 6e-8 of the max): measured
    # 1.5e-7; a float32 FFT is 2.2e-4 off (22x above the second bound)
    assert rel_err(fc.log_mel(jnp.asarray(wave)[None], filters)[0], ref) < 1e-6
    monkeypatch.setattr(fc, "float64_fft", lambda: False)
    assert rel_err(fc.log_mel(jnp.asarray(wave)[None], filters)[0], ref) > 1e-5
    realistic = clip(10.0, 15)
    ref = fe._np_extract_fbank_features(realistic.astype(np.float64), fe.mel_filters_slaney)
    # float64 FFT, the mel product and log in float32: measured 1.1e-6
    assert rel_err(fc.log_mel(jnp.asarray(realistic)[None], filters)[0], ref) < 1e-5


def test_float64_power_has_the_float32_gradient():
    frames = jnp.asarray(np.random.default_rng(1).standard_normal((7, 1024)).astype(np.float32))
    cot = jnp.asarray(np.random.default_rng(2).standard_normal((7, 513)).astype(np.float32))
    w = jnp.asarray(fc.window("hann", 1024), jnp.float32)[None]

    def power32(f):
        spec = jnp.fft.rfft(f * w, axis=-1)
        return jnp.real(spec) ** 2 + jnp.imag(spec) ** 2

    out, vjp = jax.vjp(fc._power64, frames)
    ref_out, ref_vjp = jax.vjp(power32, frames)
    # a float32 1024-point FFT is within ~log2(1024)·2⁻²⁴ = 6e-7 of the max: measured 2e-7
    assert out.dtype == jnp.float32 and rel_err(out, ref_out) < 1e-5
    (grad,), (ref_grad,) = vjp(cot), ref_vjp(cot)
    assert grad.dtype == jnp.float32 and rel_err(grad, ref_grad) < 1e-5


@pytest.mark.parametrize("mode,n_in,n_out", [("bilinear", 1101, 1001), ("bilinear", 2501, 1001),
                                             ("bilinear", 1001, 1001), ("bicubic", 1001, 1024),
                                             ("bicubic", 700, 1024)])
def test_time_resize_matches_torch(mode, n_in, n_out):
    x = np.random.default_rng(n_in).standard_normal((2, 3, n_in, 64)).astype(np.float32)
    ref = torch.nn.functional.interpolate(torch.from_numpy(x), size=(n_out, 64), mode=mode,
                                          align_corners=mode == "bicubic").numpy()
    out = np.asarray(fc.interpolate_time(jnp.asarray(x), n_out, mode, axis=2))
    assert out.shape == ref.shape
    # float32 weights and 2-4 tap sums in another order, at |x| ≤ 5: a few ulp (measured
    # 2.4e-7)
    assert np.abs(out - ref).max() < 1e-5


@pytest.mark.parametrize("truncation", fc.TRUNCATIONS)
@pytest.mark.parametrize("padding", fc.PADDINGS)
def test_short_clip_matches_hf(extractors, truncation, padding):
    wave = np.stack([clip(3.3, seed=1), clip(3.3, seed=2)])
    ref, ref_longer = hf_features(extractors[truncation], wave, truncation=truncation,
                                  padding=padding)
    out, longer = fc.clap_features(jnp.asarray(wave), truncation=truncation, padding=padding)
    assert out.shape == ref.shape == (2, 4 if truncation == "fusion" else 1, 1001, 64)
    assert rel_err(out, ref) < TOL
    np.testing.assert_array_equal(np.asarray(longer), ref_longer)


@pytest.mark.parametrize("truncation", fc.TRUNCATIONS)
@pytest.mark.parametrize("seconds", [25.0, 10.00625, 10.0])  # 10.00625 s: 480300 samples, 1001 frames
def test_long_clip_matches_hf_replayed_random(extractors, truncation, seconds):
    """HF draws crops from NumPy's global RNG; the draws are recorded and passed to jaxspeech."""
    wave = clip(seconds, seed=3)[None]
    with recorded_hf_random(seed=int(seconds * 100)) as drawn:
        out = extractors[truncation](list(wave), sampling_rate=SR, return_tensors="np")
    ref = np.asarray(out["input_features"], np.float32)
    crops = None
    if truncation == "rand_trunc" and wave.shape[1] > fc.MAX_SAMPLES:
        crops = drawn["randint"][:1]
    elif truncation == "fusion" and drawn["choice"]:
        crops = [drawn["choice"]]
    feats, longer = fc.clap_features(jnp.asarray(wave), truncation=truncation, crops=crops)
    assert rel_err(feats, ref) < TOL
    np.testing.assert_array_equal(np.asarray(longer), np.asarray(out["is_longer"]).reshape(-1))


def test_unequal_clips_each_at_its_own_length(extractors):
    """A list of clips is zero-padded by as_batch; each clip must still be featurised alone."""
    cfg = ClapConfig()
    clips = [clip(3.0, 4), clip(14.0, 5), clip(10.0, 6)]
    model = js.Model(cfg, {})
    feats, kw = model.prepare(clips, sample_rate=SR)
    for i, c in enumerate(clips):
        ref, ref_longer = hf_features(extractors["rand_trunc"], c[None], truncation="rand_trunc",
                                      padding="repeatpad")
        assert rel_err(feats[i], ref[0]) < TOL, i
        assert bool(kw["is_longer"][i]) == bool(ref_longer[0])


def test_is_longer_rules(extractors):
    fe = extractors["fusion"]
    short = np.stack([clip(2.0, 7), clip(2.0, 8)])
    _, per_clip = fc.clap_features(jnp.asarray(short), truncation="fusion")
    assert np.asarray(per_clip).tolist() == [True, True]  # each alone is flagged by HF
    ref, ref_longer = hf_features(fe, short, truncation="fusion", padding="repeatpad", per_clip=False)
    feats, per_batch = fc.clap_features(jnp.asarray(short), truncation="fusion", longer="per_batch")
    assert np.asarray(per_batch).tolist() == ref_longer.tolist() == [True, False]
    assert rel_err(feats, ref) < TOL
    _, length = fc.clap_features(jnp.asarray(short), truncation="fusion", longer="length")
    assert not np.asarray(length).any()
    picks = {int(np.argmax(fc.clap_features(jnp.asarray(short), truncation="fusion",
                                            longer="per_batch", key=jax.random.key(s))[1]))
             for s in range(8)}
    assert picks == {0, 1}  # a random item is flagged, one per batch
    mixed = [clip(2.0, 9), clip(12.0, 10)]
    batch, lengths = js.audio.as_batch(mixed, expected_rate=SR)
    _, kw = prepare(ClapConfig(enable_fusion=True, truncation="fusion"), batch, lengths,
                    longer="per_batch")
    assert np.asarray(kw["is_longer"]).tolist() == [False, True]


def test_random_crops_from_a_key():
    """Crops are reproducible from the key, vary with it, and come from HF's three ranges."""
    wave = jnp.asarray(clip(12.0, 11)[None])  # 1201 frames: starts 0..200 in thirds
    runs = [np.asarray(fc.clap_features(wave, truncation="fusion", key=jax.random.key(s))[0][0])
            for s in (0, 0, 1, 2)]
    np.testing.assert_array_equal(runs[0], runs[1])
    assert not all(np.array_equal(runs[0][1:], r[1:]) for r in runs[2:])
    full = np.asarray(fc.log_mel(wave, fc.mel_filters(50, 14000, "fusion")))[0]
    ranges = fc.fusion_ranges(full.shape[0])
    for r in runs:
        np.testing.assert_array_equal(r[0], runs[0][0])  # the shrunk whole clip
        for chunk, allowed in zip(r[1:], ranges, strict=True):
            err = [np.abs(full[s:s + 1001] - chunk).max() for s in range(full.shape[0] - 1000)]
            # a crop is a copy of the clip's log-mel frames: float32 noise at the right start
            # (measured 6e-6 dB), ~25 dB at every other
            assert min(err) < 1e-3 and int(np.argmin(err)) in allowed.tolist()
    det = np.asarray(fc.clap_features(wave, truncation="fusion")[0][0])
    assert np.abs(det[1] - full[0:1001]).max() < 1e-3  # front: first start
    assert np.abs(det[3] - full[200:1201]).max() < 1e-3  # back: last start
    trunc = [np.asarray(fc.clap_features(wave, key=jax.random.key(s))[0]) for s in (3, 3, 4)]
    np.testing.assert_array_equal(trunc[0], trunc[1])
    assert not np.array_equal(trunc[0], trunc[2])


@pytest.mark.parametrize("seconds,truncation", [(2.0, "rand_trunc"), (11.0, "fusion")])
def test_differentiable_in_the_waveform(seconds, truncation):
    wave = jnp.asarray(clip(seconds, 12)[None])
    grad = jax.grad(lambda w: fc.clap_features(w, truncation=truncation)[0].mean())(wave)
    grad = np.asarray(grad)
    assert grad.shape == wave.shape and np.isfinite(grad).all() and np.abs(grad).max() > 0
    jitted = jax.jit(lambda w: fc.clap_features(w, truncation=truncation)[0])(wave)
    # the same ops fused by jit: float32 order only, ~16 ulp of the max (measured equal)
    assert rel_err(jitted, fc.clap_features(wave, truncation=truncation)[0]) < 1e-6


def test_bad_options():
    wave = jnp.asarray(clip(11.0, 13)[None])
    with pytest.raises(ValueError, match="truncation"):
        fc.clap_features(wave, truncation="chunk")
    with pytest.raises(ValueError, match="padding"):
        fc.clap_features(wave, padding="zeros")
    with pytest.raises(ValueError, match="longer"):
        fc.clap_features(wave, longer="all")
    with pytest.raises(ValueError, match="rand_trunc crop"):
        fc.clap_features(wave, crops=[60000])
    with pytest.raises(ValueError, match="fusion crops"):
        fc.clap_features(wave, truncation="fusion", crops=[[0, 0, 500]])
    with pytest.raises(ValueError, match="either key"):
        fc.clap_features(wave, key=jax.random.key(0), crops=[0])


def test_bad_audio_is_refused():
    model = js.Model(ClapConfig(), {})  # the front end needs no params
    good = clip(1.0, 14)
    with pytest.raises(AudioError, match="48000 Hz"):
        model.prepare(good, sample_rate=16000)
    with pytest.raises(AudioError, match="stereo|multi-channel"):
        model.prepare(np.stack([good, good], axis=1))
    with pytest.raises(AudioError, match="NaN"):
        model.prepare(np.where(np.arange(good.size) == 5, np.nan, good))
    with pytest.raises(AudioError, match="empty"):
        model.prepare(np.zeros(0, np.float32))
