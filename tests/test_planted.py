"""Planted-evidence clips: reproducible by seed, balanced, and their masks mark where the
evidence really is (measured on the evidence signal through each front end's own filters)."""

import numpy as np
import pytest

import jaxspeech as js
from jaxspeech.data import planted
from jaxspeech.frontends import fbank
from jaxspeech.frontends import whisper as whisper_fe
from jaxspeech.frontends.spectral import power_spectrogram
from jaxspeech.models.whisper import WhisperConfig

SMALL_WHISPER = dict(d_model=32, encoder_layers=1, encoder_attention_heads=2, encoder_ffn_dim=64,
                     max_source_positions=100)


@pytest.fixture(scope="module")
def clips():
    return planted.generate(12, seed=7, parts=True)


@pytest.fixture(scope="module")
def whisper_config():
    return WhisperConfig(**SMALL_WHISPER)


def test_same_seed_same_clips_and_parts_do_not_change_them(clips):
    again = planted.generate(12, seed=7)
    np.testing.assert_array_equal(again.waves, clips.waves)
    np.testing.assert_array_equal(again.labels, clips.labels)
    np.testing.assert_array_equal(again.spans, clips.spans)
    np.testing.assert_array_equal(again.distractor_freqs, clips.distractor_freqs)
    assert again.evidence is None and clips.evidence is not None


def test_different_seeds_differ(clips):
    other = planted.generate(12, seed=8)
    assert not np.allclose(other.waves, clips.waves)
    assert (other.spans != clips.spans).any()


@pytest.mark.parametrize("n, n_classes", [(12, 4), (10, 4), (9, 3)])
def test_labels_are_balanced_and_shuffled(n, n_classes):
    labels = planted.generate(n, seed=1, n_classes=n_classes, seconds=0.5).labels
    counts = np.bincount(labels, minlength=n_classes)
    assert counts.max() - counts.min() <= 1 and counts.sum() == n
    assert (labels != np.arange(n) % n_classes).any()


def test_clips_are_speech_like_not_silent_and_not_clipped(clips):
    assert clips.waves.shape == (12, 32000) and clips.waves.dtype == np.float32
    # the generator scales each clip to a 0.9 peak (measured 0.83); 1e-6: float32 rounding
    assert np.abs(clips.waves).max() <= 0.9 + 1e-6
    # silences: 10 ms frames 20 dB quieter than the loud ones, in every clip (at least 50 ms
    # of them; measured 17 to 81 frames)
    energy = (clips.waves[:, :31840].reshape(12, -1, 160) ** 2).mean(-1)
    quiet = energy < 1e-2 * np.quantile(energy, 0.95, axis=1, keepdims=True)
    assert (quiet.sum(1) >= 5).all()


def test_evidence_follows_the_class_band_rule(clips):
    table = planted.bands(4)
    lo, hi = table[2 * clips.labels].T
    assert ((clips.freqs[:, 0] >= lo) & (clips.freqs[:, 1] <= hi)).all()
    # distractors only in the odd (distractor) bands, never a class band
    d_lo, d_hi = clips.distractor_freqs[..., 0], clips.distractor_freqs[..., 1]
    in_class_band = ((d_hi[..., None] > table[0::2, 0]) & (d_lo[..., None] < table[0::2, 1])).any(-1)
    assert not in_class_band.any()
    np.testing.assert_allclose(clips.class_bands, table[0::2])


def test_sample_mask_is_exactly_where_the_evidence_sounds(clips):
    mask = clips.sample_mask()
    assert mask.shape == clips.waves.shape
    assert (clips.evidence[~mask] == 0).all()
    assert (np.abs(clips.evidence[mask]) > 0).mean() > 0.99  # tones cross 0 at few samples (99.94 %)
    assert ((clips.distractors != 0) <= clips.distractor_sample_mask()).all()
    # the mix is speech + evidence + distractors: removing the evidence changes only the span
    changed = clips.waves != (clips.waves - clips.evidence)
    assert (changed <= mask).all()


def _mel_energy(wave, filters, n_frames):
    power = np.asarray(power_spectrogram(wave, n_fft=400, hop_length=160))[:, :n_frames]
    return np.einsum("btf,fm->btm", power, filters)  # [B, frames, mels]


def test_whisper_feature_mask_holds_the_evidence_energy(clips, whisper_config):
    mask = clips.feature_mask(whisper_config)
    assert mask.shape == (12, 80, 200) and mask.dtype == bool
    filters = np.asarray(whisper_fe.mel_filters(80))
    for signal, m in ((clips.evidence, mask), (clips.distractors,
                                               clips.distractor_feature_mask(whisper_config))):
        energy = np.swapaxes(_mel_energy(signal, filters, 200), 1, 2)  # [B, mels, frames]
        inside = (energy * m).sum((1, 2)) / energy.sum((1, 2))
        # the mask's promise: 90 % of the energy (measured ≥ 99.97 %; the rest is the
        # window's leakage out of the band)
        assert (inside > 0.9).all(), inside
        # and the region is tight: a small part of the time-frequency plane (measured 0.9 %)
        assert m.mean() < 0.1
    # the evidence region of class k lies in band 2k, so it moves up with the class
    centre = np.array([np.nonzero(mask[i].any(1))[0].mean() for i in range(12)])
    highest_of_class = [centre[clips.labels == k].max() for k in range(3)]
    lowest_of_next = [centre[clips.labels == k + 1].min() for k in range(3)]
    assert (np.array(highest_of_class) < np.array(lowest_of_next)).all()


def test_ecapa_feature_mask_is_in_its_time_by_mel_layout(clips):
    config = js.presets()["ecapa-voxceleb"]
    mask = clips.feature_mask(config)
    assert mask.shape == (12, 201, 80)
    filters = fbank.filterbank(80)
    energy = _mel_energy(clips.evidence, filters, 201)
    # as for Whisper: 90 % promised, ≥ 99.97 % measured
    assert ((energy * mask).sum((1, 2)) / energy.sum((1, 2)) > 0.9).all()


def test_clap_masks_are_refused_with_a_pointer():
    config = js.presets()["clap-htsat-unfused"]
    clips = planted.generate(2, seed=0, sample_rate=48000, seconds=0.5)
    with pytest.raises(ValueError, match="Whisper and ECAPA"):
        clips.feature_mask(config)
    assert clips.sample_mask().shape == (2, 24000)


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match="Nyquist"):
        planted.generate(2, seed=0, sample_rate=8000)
    with pytest.raises(ValueError, match="n_classes"):
        planted.generate(2, seed=0, n_classes=1)
