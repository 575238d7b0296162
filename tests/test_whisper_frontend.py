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
    """WhisperFeatureExtractor's features of ``wave`` computed in float64: its numpy path
    (the one it takes without torch) on the zero-padded / trimmed 30 s window. Its call
    runs torch.stft in float32, which is itself 5e-5 (relative to the features' max) off
    this on the speech-like batch, half of DESIGN's bound; this is within 6e-8 of
    jaxspeech's front end run in float64."""
    fe = WhisperFeatureExtractor(feature_size=n_mels)
    w = np.asarray(wave, np.float64)[:, :fe.n_samples]
    w = np.pad(w, ((0, 0), (0, fe.n_samples - w.shape[1])))
    return fe._np_extract_fbank_features(w, "cpu")  # noqa: SLF001 - see the docstring


def rel_diff(ours, ref):
    return np.abs(np.asarray(ours, np.float64) - ref).max() / np.abs(ref).max()


@pytest.mark.parametrize("n_mels", [80, 128])
def test_log_mel_matches_feature_extractor_on_speech_like_signals(n_mels):
    wave = synth.speech_like_batch(6.0, SR)  # sweep, noise bursts, silence, clipped
    ours = frontend.log_mel_spectrogram(jnp.asarray(wave), n_mels)
    assert ours.shape == (4, n_mels, 3000)
    assert rel_diff(ours, reference(wave, n_mels)) < 1e-4  # DESIGN's bound; measured 1.4e-5


def test_audio_longer_than_30_s_is_trimmed_like_the_reference_with_a_warning():
    wave = synth.harmonic_sweep(31.0, SR)[None]
    m = js.init("whisper-tiny", encoder_layers=1, decoder_layers=0)
    with pytest.warns(UserWarning, match="longer than Whisper's 30 s"):
        ours = m.features(wave)
    assert rel_diff(ours, reference(wave, 80)) < 1e-4  # DESIGN's bound
    np.testing.assert_array_equal(ours, m.features(wave[:, : 30 * SR]))


def test_max_clamp_is_per_item_so_batching_does_not_couple_items():
    loud = synth.clipped(3.0, SR)
    quiet = 1e-3 * synth.harmonic_sweep(3.0, SR)
    both = frontend.log_mel_spectrogram(jnp.asarray(np.stack([loud, quiet])))
    alone = frontend.log_mel_spectrogram(jnp.asarray(quiet[None]))
    # the same item's arithmetic in a batch of 2 and of 1 (measured equal); features are
    # O(1), so 1e-6 is float32 noise, while a shared clamp would move the quiet item by ~1
    np.testing.assert_allclose(both[1], alone[0], atol=1e-6)


def test_mel_filters_equal_librosa():
    for n_mels in (80, 128):
        ours = np.asarray(frontend.mel_filters(n_mels)).T
        ref = librosa.filters.mel(sr=SR, n_fft=400, n_mels=n_mels)
        # the same float64 slaney filters stored in float32: rounding 6e-8 relative
        # (measured: 1 % of this bound)
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
    # central difference in float64: O(ε²) truncation, 1e-16/ε rounding; measured 1e-5
    # relative, 1e-3 leaves room for the curvature near the floor
    np.testing.assert_allclose(directional, fd, rtol=1e-3)
