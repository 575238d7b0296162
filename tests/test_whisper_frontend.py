"""Whisper log-mel front end against transformers' WhisperFeatureExtractor."""

import jax
import jax.numpy as jnp
import librosa
import numpy as np
import pytest
from transformers import WhisperFeatureExtractor

import jaxspeech as js
from jaxspeech.data import synth
from jaxspeech.frontends import whisper as frontend

SR = 16000


def reference(wave, n_mels):
    fe = WhisperFeatureExtractor(feature_size=n_mels)
    return fe(list(np.asarray(wave)), sampling_rate=SR, return_tensors="np")["input_features"]


def rel_diff(ours, ref):
    return np.abs(np.asarray(ours, np.float64) - ref).max() / np.abs(ref).max()


@pytest.mark.parametrize("n_mels", [80, 128])
def test_log_mel_matches_feature_extractor_on_speech_like_signals(n_mels):
    wave = synth.speech_like_batch(6.0, SR)  # sweep, noise bursts, silence, clipped
    ours = frontend.log_mel_spectrogram(jnp.asarray(wave), n_mels)
    assert ours.shape == (4, n_mels, 3000)
    assert rel_diff(ours, reference(wave, n_mels)) < 1e-4


def test_audio_longer_than_30_s_is_trimmed_like_the_reference_with_a_warning():
    wave = synth.harmonic_sweep(31.0, SR)[None]
    m = js.init("whisper-tiny", encoder_layers=1)
    with pytest.warns(UserWarning, match="longer than Whisper's 30 s"):
        ours = m.features(wave)
    assert rel_diff(ours, reference(wave, 80)) < 1e-4
    np.testing.assert_array_equal(ours, m.features(wave[:, : 30 * SR]))


def test_max_clamp_is_per_item_so_batching_does_not_couple_items():
    loud = synth.clipped(3.0, SR)
    quiet = 1e-3 * synth.harmonic_sweep(3.0, SR)
    both = frontend.log_mel_spectrogram(jnp.asarray(np.stack([loud, quiet])))
    alone = frontend.log_mel_spectrogram(jnp.asarray(quiet[None]))
    np.testing.assert_allclose(both[1], alone[0], atol=1e-6)


def test_mel_filters_equal_librosa():
    for n_mels in (80, 128):
        ours = np.asarray(frontend.mel_filters(n_mels)).T
        ref = librosa.filters.mel(sr=SR, n_fft=400, n_mels=n_mels)
        np.testing.assert_allclose(ours, ref, rtol=1e-5, atol=1e-8)


def test_front_end_is_differentiable_in_the_waveform():
    wave = jnp.asarray(synth.harmonic_sweep(1.0, SR)[None])
    grad = jax.grad(lambda w: frontend.log_mel_spectrogram(w).sum())(wave)
    assert grad.shape == wave.shape
    assert bool(jnp.isfinite(grad).all()) and float(jnp.abs(grad).max()) > 0
    # directional finite difference, in float64: log-mel is very curved where bins are
    # near the floor, so float32 differences cannot resolve it
    with jax.enable_x64(True):
        w64 = jnp.asarray(wave, jnp.float64)
        v = jnp.zeros_like(w64).at[0, 3800:4200].set(
            np.random.default_rng(0).standard_normal(400))

        def local(w):  # the frames that see samples 3800-4200
            return frontend.log_mel_spectrogram(w)[:, :, 20:31].sum()

        directional = float(jnp.vdot(jax.grad(local)(w64), v))
        eps = 1e-6
        fd = (float(local(w64 + eps * v)) - float(local(w64 - eps * v))) / (2 * eps)
    np.testing.assert_allclose(directional, fd, rtol=1e-3)
