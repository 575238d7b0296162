"""SpeechBrain Fbank + sentence mean normalisation: jaxspeech vs the installed speechbrain."""

import contextlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
sb_features = pytest.importorskip("speechbrain.lobes.features")
sb_processing = pytest.importorskip("speechbrain.processing.features")

from jaxspeech.data import synth  # noqa: E402
from jaxspeech.frontends import fbank as F  # noqa: E402

TOL = 1e-4  # max |diff| relative to max |reference| (DESIGN.md)
SR = 16000

# jitted once per shape: eager op-by-op dispatch is slow on the 2-core CI machine
fbank = jax.jit(F.fbank)
sentence_norm = jax.jit(F.sentence_norm, static_argnames="std_norm")


@jax.jit
def front_end(wave, rel_samples):
    rel = F.frame_lengths(rel_samples, wave.shape[-1], wave.shape[0])
    return F.sentence_norm(F.fbank(wave, rel), rel), rel


def rel_err(ours, ref) -> float:
    ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
    assert ours.shape == ref.shape
    return float(np.abs(ours - ref).max() / np.abs(ref).max())


@contextlib.contextmanager
def float64_torch():
    """SpeechBrain's modules in float64: Fbank builds its filters and window in the default
    dtype. Run in float32 it is itself 1.1e-5 (Fbank) and 2.2e-5 (with the sentence mean
    removed) off its float64 result, a fifth of DESIGN's bound; jaxspeech in float32 is
    1.1e-5 and 1.4e-5 off it."""
    dtype = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        yield
    finally:
        torch.set_default_dtype(dtype)


def sb_fbank(wave) -> np.ndarray:
    """SpeechBrain's Fbank (80 mels) of ``wave [B, samples]`` in float64."""
    with float64_torch():
        return sb_features.Fbank(n_mels=80)(torch.from_numpy(np.asarray(wave, np.float64))).numpy()


def sb_matrix(fbanks) -> np.ndarray:
    fc = fbanks.f_central.repeat(fbanks.n_stft, 1).transpose(0, 1)
    band = fbanks.band.repeat(fbanks.n_stft, 1).transpose(0, 1)
    return fbanks._create_fbank_matrix(fc, band).numpy()


@pytest.mark.parametrize("kw", [dict(n_mels=80), dict(n_mels=40, f_min=30.0, f_max=7000.0),
                                dict(n_mels=64, n_fft=512)])
def test_filterbank_matches_speechbrain(kw):
    ref = sb_matrix(sb_features.Fbank(**kw).compute_fbanks)
    ours = F.filterbank(kw["n_mels"], kw.get("n_fft", 400), SR, kw.get("f_min", 0.0), kw.get("f_max"))
    assert ours.shape == ref.shape
    # float32 built step by step as SpeechBrain does; 10**x of the band edges may differ by an
    # ulp, which the triangles' slopes turn into up to 3.2e-6 of a weight ≤ 1 (measured)
    assert np.abs(ours - ref).max() < 5e-5


def batch(seconds=1.5):
    return np.stack([synth.harmonic_sweep(seconds, SR), synth.noise_bursts(seconds, SR),
                     synth.clipped(seconds, SR), synth.silence(seconds, SR)])


def test_fbank_matches_speechbrain_per_item_top_db():
    wave = batch()
    wave[1] *= 1e-3  # a quiet item next to loud ones: its 80 dB floor is its own
    ref = sb_fbank(wave)
    ours = np.asarray(fbank(jnp.asarray(wave)))
    assert ours.shape == (4, 1 + wave.shape[1] // 160, 80)
    assert rel_err(ours, ref) <= TOL  # measured 1.1e-5
    # the floor is per item: an item's features do not depend on its neighbours (the same
    # arithmetic per item, measured equal; 1e-4 dB is float32 noise at ≤ 100 dB, a shared
    # floor would move the quiet item by 60 dB)
    for i in range(wave.shape[0]):
        alone = np.asarray(fbank(jnp.asarray(wave[i:i + 1])))[0]
        np.testing.assert_allclose(ours[i], alone, atol=1e-4)
    floor = ours.max(axis=(1, 2)) - 80.0
    # the floor is active somewhere: its cells hold max - 80 itself (measured equal)
    assert np.isclose(ours[0].min(), floor[0], atol=1e-3)


def test_sentence_norm_matches_inputnormalization_and_its_mask():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((4, 201, 8)).astype(np.float32) * 3 + 5
    # 0.503 * 201 = 101.1 -> SpeechBrain counts ceil = 102 frames (not round, not floor)
    lengths = np.array([1.0, 0.503, 0.5, 0.25], np.float32)
    for std_norm in (False, True):
        norm = sb_processing.InputNormalization(norm_type="sentence", std_norm=std_norm)
        ref = norm(torch.from_numpy(x), torch.from_numpy(lengths)).numpy()
        ours = np.asarray(sentence_norm(jnp.asarray(x), jnp.asarray(lengths), std_norm=std_norm))
        assert rel_err(ours, ref) <= TOL  # measured 1.7e-7
    ours = np.asarray(sentence_norm(jnp.asarray(x), jnp.asarray(lengths)))
    # a float32 mean of 102 values near 5: within ~10 ulp (measured 4.8e-7); counting 101
    # frames instead moves it by ~|x - mean|/102 = 0.04 (measured), 40x the bound below
    np.testing.assert_allclose(ours[1], x[1] - x[1, :102].mean(axis=0), atol=1e-5)
    assert np.abs(ours[1] - (x[1] - x[1, :101].mean(axis=0))).max() > 1e-3


def test_padded_batch_front_end_matches_speechbrain_and_items_alone():
    sizes = [24000, 16100, 8000, 1000]
    n = max(sizes)
    clips = [synth.harmonic_sweep(s / SR, SR, seed=i) for i, s in enumerate(sizes)]
    wave = np.zeros((len(sizes), n), np.float32)
    for i, c in enumerate(clips):
        wave[i, : c.size] = c
    ours, rel = front_end(jnp.asarray(wave), jnp.asarray(sizes, jnp.float32) / n)
    ours, rel = np.asarray(ours), np.array(rel)
    counts = (np.arange(F.n_frames(n))[None] < rel[:, None] * np.float32(F.n_frames(n))).sum(1)
    np.testing.assert_array_equal(counts, [F.n_frames(s) for s in sizes])

    with float64_torch():
        norm = sb_processing.InputNormalization(norm_type="sentence", std_norm=False)
        ref = norm(torch.from_numpy(sb_fbank(wave)), torch.from_numpy(rel.astype(np.float64))).numpy()
    assert rel_err(ours, ref) <= TOL  # measured 1.4e-5
    for i, c in enumerate(clips):  # each item's own frames equal the clip alone
        alone = np.asarray(front_end(jnp.asarray(c[None]), jnp.ones(1))[0])[0]
        assert alone.shape[0] == counts[i]
        # other shapes, other float32 orders: measured 3.8e-6 at |x| ≤ 47 (26x below)
        np.testing.assert_allclose(ours[i, : counts[i]], alone, atol=1e-4)


def test_frame_lengths_select_exactly_the_clip_frames():
    def counts(rel_samples, total):  # the ECAPA mask (eps 0) and make_padding_mask's
        b = rel_samples.shape[0]
        rel = F.frame_lengths(rel_samples, total, b)
        return jnp.stack([F.valid_mask(rel, F.n_frames(total), b, eps).sum(1)
                          for eps in (0.0, F.MASK_EPS)])

    # under jit XLA may rewrite the division and fold comparisons: check both ways
    counts_jit = jax.jit(counts, static_argnums=1)
    bad = []
    for total in (160, 479, 16100, 48013, 64000, 160000):
        sizes = np.unique(np.r_[np.linspace(1, total, 97).astype(int), total // 2])
        rel_samples = jnp.asarray(sizes / total, jnp.float32)
        want = np.array([F.n_frames(s) for s in sizes])
        for fn in (counts, counts_jit):
            got = np.asarray(fn(rel_samples, total))
            bad += [(total, s) for s, ok in zip(sizes, (got == want).all(0), strict=True) if not ok]
    assert not bad
    np.testing.assert_array_equal(np.asarray(F.frame_lengths(None, 1600, 3)), np.ones(3))
    np.testing.assert_array_equal(np.asarray(F.frame_lengths(jnp.ones(2), 1600, 2)), np.ones(2))


def test_fbank_is_differentiable_in_the_waveform():
    wave = jnp.asarray(batch(0.3)[:2])
    lengths = jnp.asarray([1.0, 0.6])

    g = jax.jit(jax.grad(lambda w: jnp.sum(front_end(w, lengths)[0] ** 2)))(wave)
    assert g.shape == wave.shape and bool(jnp.all(jnp.isfinite(g)))
    assert float(jnp.abs(g).max()) > 0
