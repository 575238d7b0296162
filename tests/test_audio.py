"""Bad input gets a clear error; documented conversions behave as documented."""

import logging
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import soundfile as sf

import jaxspeech as js
from jaxspeech import audio
from jaxspeech.audio import AudioError, as_batch, pcm_to_float, read
from jaxspeech.data import synth


@pytest.fixture(scope="module")
def whisper():
    return js.init("whisper-tiny", encoder_layers=1, decoder_layers=0)


def test_wrong_sample_rate_says_how_to_resample(whisper):
    with pytest.raises(AudioError, match=r"expects 16000 Hz audio, got 44100 Hz.*resample"):
        whisper(np.zeros(44100, np.float32), sample_rate=44100)


def test_stereo_is_refused_with_the_fix(whisper):
    stereo = np.zeros((32000, 2), np.float32)
    with pytest.raises(AudioError, match="channels-last stereo"):
        whisper(stereo)
    with pytest.raises(AudioError, match="multi-channel"):
        whisper(np.zeros((1, 2, 16000), np.float32))


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_samples_name_the_item(whisper, bad):
    wave = np.zeros((3, 16000), np.float32)
    wave[2, 100] = bad
    with pytest.raises(AudioError, match=r"NaN or inf samples \(batch items \[2\]\)"):
        whisper(wave)


def test_empty_audio_is_refused(whisper):
    with pytest.raises(AudioError, match="empty"):
        whisper(np.zeros(0, np.float32))
    with pytest.raises(AudioError, match="empty"):
        whisper([])


def test_integer_pcm_is_scaled_by_the_wav_convention(whisper):
    x = synth.harmonic_sweep(1.0, 16000)
    pcm = np.round(x * 32767).astype(np.int16)
    # the same division (default rtol 1e-7: float32 rounding is 6e-8); then the same
    # features of O(1) from the same samples (measured equal; 1e-5 is float32 noise)
    np.testing.assert_allclose(pcm_to_float(pcm), pcm / 32768.0)
    np.testing.assert_allclose(whisper.features(pcm), whisper.features(pcm / 32768.0), atol=1e-5)
    with pytest.raises(AudioError, match="no PCM convention"):
        pcm_to_float(np.zeros(4, np.int64))


def test_list_of_unequal_clips_is_padded_with_relative_lengths():
    batch, lengths = as_batch([np.ones(100), np.ones(50)], expected_rate=16000)
    assert batch.shape == (2, 100)
    np.testing.assert_allclose(lengths, [1.0, 0.5])  # exact ratios, float32 rounding aside
    assert float(batch[1, 50:].sum()) == 0.0


def test_too_long_audio_names_the_limit():
    with pytest.raises(AudioError, match="longer than m's limit"):
        as_batch(np.zeros(100), expected_rate=10, max_samples=50, name="m")


def test_traced_audio_is_checked_for_shape_only():
    def f(w):
        return as_batch(w, expected_rate=16000)[0].sum()

    assert jax.grad(f)(jnp.ones(8)).shape == (8,)


def test_read_resamples_and_mixes_down(tmp_path):
    stereo = np.stack([synth.harmonic_sweep(1.0, 8000), synth.noise_bursts(1.0, 8000)], axis=1)
    sf.write(tmp_path / "x.wav", stereo, 8000)
    wave = read(tmp_path / "x.wav", 16000)
    assert wave.ndim == 1 and abs(wave.shape[0] - 16000) <= 1  # a resampler rounds the length
    with pytest.raises(FileNotFoundError):
        read(tmp_path / "missing.wav", 16000)


def test_read_says_what_it_converted(tmp_path, caplog, monkeypatch):
    monkeypatch.setattr(audio, "_REPORTED", set())  # as in a fresh process
    stereo = np.stack([synth.harmonic_sweep(1.0, 8000), synth.noise_bursts(1.0, 8000)], axis=1)
    for name in ("a.wav", "b.wav"):
        sf.write(tmp_path / name, stereo, 8000)
    sf.write(tmp_path / "ready.wav", synth.harmonic_sweep(1.0, 16000), 16000)
    with caplog.at_level(logging.INFO, logger="jaxspeech.audio"):
        for name in ("a.wav", "b.wav", "ready.wav"):
            read(tmp_path / name, 16000)
    logged = [(r.levelno, r.getMessage()) for r in caplog.records if r.name == "jaxspeech.audio"]
    done = "2 channels averaged to mono, resampled 8000 -> 16000 Hz"
    assert [level for level, _ in logged] == [logging.WARNING, logging.INFO]  # nothing for ready.wav
    assert logged[0][1].startswith(f"{tmp_path / 'a.wav'}: {done}")
    assert logged[1][1] == f"{tmp_path / 'b.wav'}: {done} (soxr)"


def test_read_conversion_shows_on_stderr_with_no_logging_set_up(tmp_path):
    """As in the command line, which configures no logging: the warning reaches stderr."""
    sf.write(tmp_path / "cd.wav", np.zeros((4410, 2), np.float32), 44100)
    run = subprocess.run([sys.executable, "-c", "import sys; from jaxspeech.audio import read; "
                          "read(sys.argv[1], 16000)", str(tmp_path / "cd.wav")],
                         capture_output=True, text=True, timeout=120, check=True)
    assert "cd.wav: 2 channels averaged to mono, resampled 44100 -> 16000 Hz" in run.stderr
