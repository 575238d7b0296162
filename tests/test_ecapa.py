"""ECAPA-TDNN: parity with SpeechBrain on its own checkpoint files, masks, verification, loading.

Every checkpoint is made here: a SpeechBrain ``ECAPA_TDNN`` / ``Classifier`` with random
weights and random BatchNorm statistics, saved with ``torch.save`` next to a
``hyperparams.yaml`` written as ``speechbrain/spkrec-ecapa-voxceleb``'s, and loaded
through ``jaxspeech.load``. The reference is the installed speechbrain.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
sb_ecapa = pytest.importorskip("speechbrain.lobes.models.ECAPA_TDNN")
pytest.importorskip("hyperpyyaml")

import jaxspeech as js  # noqa: E402
from jaxspeech.convert import CheckpointError  # noqa: E402
from jaxspeech.convert import ecapa as convert  # noqa: E402
from jaxspeech.data import synth  # noqa: E402
from jaxspeech.data.reference_checkpoints import ECAPA_FULL as FULL  # noqa: E402
from jaxspeech.data.reference_checkpoints import ECAPA_SMALL as SMALL  # noqa: E402
from jaxspeech.data.reference_checkpoints import ecapa_modules as make_reference  # noqa: E402, F401
from jaxspeech.data.reference_checkpoints import ecapa_yaml, write_ecapa  # noqa: E402
from jaxspeech.models import ecapa  # noqa: E402

TOL = 1e-4  # max |diff| relative to max |reference|, float32 (DESIGN.md)
# The references run in float64 (convert.ecapa.reference(dtype="float64")), so a bound
# measures jaxspeech's float32 error alone. The front end's is the largest: 2.2e-5 (full
# size) and 1.2e-5 (small), float32 STFT rounding in cells far below a loud sweep's peak,
# the size of SpeechBrain's own float32 error there (1.6e-5); the models', ≤ 1e-6.
REFERENCE_DTYPE = "float64"
SR = 16000


def write_yaml(folder, hp) -> None:
    (folder / "hyperparams.yaml").write_text(ecapa_yaml(hp))


def write_folder(folder, hp, seed=0, classifier=True):
    return write_ecapa(folder, hp, seed=seed, classifier=classifier)


def rel_err(ours, ref) -> float:
    ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
    assert ours.shape == ref.shape, (ours.shape, ref.shape)
    return float(np.abs(ours - ref).max() / np.abs(ref).max())


def clips_unequal(seconds=(2.0, 1.5, 1.01)):
    makers = (synth.harmonic_sweep, synth.noise_bursts, synth.clipped)
    return [makers[i % 3](s, SR) for i, s in enumerate(seconds)]


def sb_alone(model, feats, rel):
    """SpeechBrain's embedding of each item run alone on its valid frames."""
    t = feats.shape[1]
    n = (np.arange(t, dtype=np.float32)[None] < rel[:, None] * np.float32(t)).sum(1)
    with torch.no_grad():
        return np.concatenate([model(torch.from_numpy(feats[i:i + 1, : n[i]]))[:, 0].numpy()
                               for i in range(feats.shape[0])])


# --- full size: speechbrain/spkrec-ecapa-voxceleb ---------------------------------------

@pytest.mark.slow
def test_full_size_parity_with_speechbrain(tmp_path):
    """Everything at the real size in one test: pytest-xdist would build a module
    fixture once per worker."""
    sb, sb_clf = write_folder(tmp_path, FULL)
    m = js.load(str(tmp_path))
    # hyper-parameters read from the yaml, params counted against SpeechBrain's
    assert m.config == ecapa.PRESETS["ecapa-voxceleb"]
    n_sb = sum(p.numel() for p in sb.parameters()) + sum(
        b.numel() for n, b in sb.named_buffers() if "running" in n)
    assert m.n_params == n_sb + 7205 * 192
    assert m.params["classifier"]["weight"].shape == (7205, 192)

    wave, lengths = js.audio.as_batch(clips_unequal(), expected_rate=SR)  # 2 s, 1.5 s, 1.01 s
    features_fn, model_fn = convert.reference(str(tmp_path), REFERENCE_DTYPE)
    ref_feats, ref_kwargs = features_fn(np.asarray(wave), lengths)
    ref_lengths = ref_kwargs["lengths"]
    ref_out = model_fn(ref_feats, **ref_kwargs)

    # front end
    feats, kwargs = m.prepare(wave, lengths=lengths)
    t = feats.shape[1]
    counts = [(np.arange(t)[None] < (np.asarray(v, np.float32) * np.float32(t))[:, None]).sum(1)
              for v in (kwargs["lengths"], ref_lengths)]
    np.testing.assert_array_equal(counts[0], counts[1])
    np.testing.assert_array_equal(counts[0], [201, 151, 102])  # 1 + samples // 160
    assert rel_err(feats, ref_feats) <= TOL, "front end"

    # embeddings, end to end and on the reference's features (one compiled forward),
    # against SpeechBrain run on each item's valid frames
    out, inter = m.forward(m.params, feats, **kwargs)
    on_ref, _ = m.forward(m.params, jnp.asarray(ref_feats), lengths=jnp.asarray(ref_lengths))
    assert out.shape == (3, 192)
    assert rel_err(on_ref, ref_out) <= TOL, "embedding on reference features"
    assert rel_err(out, ref_out) <= TOL, "embedding end to end"

    # SpeechBrain's batched forward: the full-length item agrees; the padded ones see
    # the padding through SpeechBrain's reflect padding (the documented quirk)
    with torch.no_grad():
        batched = sb(torch.from_numpy(ref_feats.astype(np.float32)),
                     torch.from_numpy(ref_lengths.copy()))[:, 0].numpy()
    assert rel_err(out[0], batched[0]) <= TOL
    assert rel_err(batched[2], ref_out[2]) > 10 * TOL  # the quirk is O(1): measured 0.14

    # classifier: cosine logits
    with torch.no_grad():
        ref_logits = sb_clf(torch.from_numpy(np.array(out))[:, None])[:, 0].numpy()
    assert ref_logits.shape == (3, 7205)
    assert rel_err(ecapa.logits(m, out), ref_logits) <= TOL, "logits"
    assert rel_err(inter["logits"], ref_logits) <= TOL


# --- small config: masks, lengths, verification, loading ----------------------------------
# Every new input shape compiles the model again (~4 s on 2 cores), so the tests share
# a few shapes: the batch CLIPS and each of its clips alone.

SECONDS = (0.6, 0.503, 0.05)  # 0.503 s: a frame count that ceil(lengths * T) overshoots


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    folder = tmp_path_factory.mktemp("small-ecapa")
    emb, clf = write_folder(folder, SMALL, seed=3)
    m = js.load(str(folder))
    clips = clips_unequal(SECONDS)
    wave, lengths = js.audio.as_batch(clips, expected_rate=SR)
    feats, kwargs = m.prepare(wave, lengths=lengths)
    return dict(folder=folder, sb=emb, sb_clf=clf, model=m, clips=clips, wave=wave,
                lengths=lengths, feats=feats, kwargs=kwargs,
                emb=np.asarray(m.apply(m.params, feats, **kwargs)))


def test_small_parity_with_speechbrain(small):
    m = small["model"]
    assert m.config.channels == (32, 32, 32, 32, 96) and m.config.se_channels == 8
    features_fn, model_fn = convert.reference(str(small["folder"]), REFERENCE_DTYPE)
    ref_feats, ref_kwargs = features_fn(np.asarray(small["wave"]), small["lengths"])
    assert rel_err(small["feats"], ref_feats) <= TOL
    assert rel_err(small["emb"], model_fn(ref_feats, **ref_kwargs)) <= TOL
    with torch.no_grad():  # SpeechBrain's batched forward without lengths: all full length
        full_len = small["sb"](torch.from_numpy(ref_feats.astype(np.float32)))[:, 0].numpy()
    assert rel_err(m.apply(m.params, jnp.asarray(ref_feats)), full_len) <= TOL


def test_padded_item_equals_item_alone(small):
    m, together = small["model"], small["emb"]
    scale = np.abs(together).max()
    for i, clip in enumerate(small["clips"]):
        alone = np.asarray(m(clip))[0]
        # other shapes, other float32 orders: measured 4e-8 of the scale (250x below)
        assert np.abs(together[i] - alone).max() <= 1e-5 * scale, i


def test_lengths_through_features_apply_and_call(small):
    m, wave, lengths, emb = small["model"], small["wave"], small["lengths"], small["emb"]
    np.testing.assert_allclose(lengths, np.array(SECONDS) / SECONDS[0], rtol=1e-6)  # float32 ratios
    feats = m.features(wave, lengths=lengths)
    for i, clip in enumerate(small["clips"]):
        alone = m.features(clip)[0]
        # other shapes, other float32 orders, at |x| ≤ 60 dB: measured 3.8e-6 (26x below)
        np.testing.assert_allclose(feats[i, : alone.shape[0]], alone, atol=1e-4)
    # The same embedding (|e| ≤ 3) from other programs (features and model jitted together
    # or apart): float32 order only, measured equal. 1e-5 (was 1e-6, ~4 ulp at 3, with no
    # room for a reordered ~20-layer forward, ~√n·2⁻²⁴ per layer): 3e-6 of the scale.
    np.testing.assert_allclose(m.apply(m.params, feats, **small["kwargs"]), emb, atol=1e-5)
    np.testing.assert_allclose(m(wave, lengths=lengths), emb, atol=1e-5)
    np.testing.assert_allclose(m(small["clips"]), emb, atol=1e-5)
    # the lengths are used: without them the padding counts as signal (0.4 apart, O(1))
    without = np.asarray(m(wave))
    np.testing.assert_allclose(without[0], emb[0], atol=1e-5)
    assert np.abs(without[1] - emb[1]).max() > 1e-3
    # lengths=None at apply means full length (the plain reflect padding path); as above
    np.testing.assert_allclose(m.apply(m.params, feats), m.apply(m.params, feats, lengths=jnp.ones(3)),
                               atol=1e-5)


def test_intermediates_and_rules_keep_the_forward(small):
    m, feats, kwargs = small["model"], small["feats"], small["kwargs"]
    out, inter = m.forward(m.params, feats, **kwargs)
    np.testing.assert_allclose(out, small["emb"], atol=1e-5)  # as in the test above
    for name in ("embedding_model.blocks.0.hidden_state", "embedding_model.blocks.3.hidden_state",
                 "embedding_model.blocks.2.res2net_block.blocks.6.hidden_state",
                 "embedding_model.mfa.hidden_state", "embedding_model.asp.attention", "logits"):
        assert name in inter, name
    b, t, _ = feats.shape
    assert inter["embedding_model.blocks.1.hidden_state"].shape == (b, t, 32)
    attention = np.asarray(inter["embedding_model.asp.attention"])
    assert attention.shape == (b, t, 96)
    np.testing.assert_allclose(attention.sum(axis=1), 1.0, atol=1e-5)  # ≤ 60 terms: 2.4e-7
    n2 = m.features(small["clips"][2]).shape[1]
    assert np.all(attention[2, n2:] == 0)  # no attention on padding
    assert inter["logits"].shape == (b, 5)
    # the cosine logits (≤ 0.36) computed again from `out`: float32 order, measured equal
    np.testing.assert_allclose(inter["logits"], ecapa.logits(m, out), atol=1e-6)
    lrp_out = m.apply(m.params, feats, rules="attnlrp", **kwargs)
    np.testing.assert_array_equal(np.asarray(lrp_out), np.asarray(small["emb"]))


def test_gradient_with_respect_to_the_waveform(small):
    m, wave, lengths = small["model"], jnp.asarray(small["wave"]), jnp.asarray(small["lengths"])

    def score(w):
        feats, kwargs = m.family.prepare(m.config, w, lengths)
        return jnp.sum(m.apply(m.params, feats, **kwargs)[:, 0])

    g = np.asarray(jax.jit(jax.grad(score))(wave))
    assert np.all(np.isfinite(g)) and np.abs(g).max() > 0
    # an item's padding does not influence its embedding (frames reach 200 samples past
    # the last sample of the clip)
    for i, clip in enumerate(small["clips"]):
        assert np.abs(g[i, clip.size + 200:]).max(initial=0.0) == 0.0
        assert np.abs(g[i, : clip.size]).max() > 0


def test_verify_scores_and_decisions(small):
    m, a = small["model"], small["clips"]
    b = [synth.harmonic_sweep(SECONDS[0], SR, seed=0), synth.harmonic_sweep(SECONDS[1], SR, seed=7),
         synth.noise_bursts(SECONDS[2], SR, seed=9)]  # same shapes: no new compile
    res = js.verify(m, a, b)
    ea, eb = np.asarray(m(a), np.float64), np.asarray(m(b), np.float64)
    cos = (ea * eb).sum(1) / np.linalg.norm(ea, axis=1) / np.linalg.norm(eb, axis=1)
    # cosines from float32 embeddings vs float64 ones: a few ulp (measured 1.2e-7); the same
    # clip's cosine is 1 to that rounding
    np.testing.assert_allclose(res.score, cos, atol=1e-5)
    np.testing.assert_array_equal(res.decision, cos > 0.25)
    assert res.score[0] > 0.9999  # the same clip
    low, mid, _ = np.sort(cos)
    for threshold in (-1.1, (low + mid) / 2, 1.1):
        np.testing.assert_array_equal(js.verify(m, a, b, threshold=threshold).decision,
                                      cos > threshold)
    np.testing.assert_allclose(js.verify(m, small["wave"], small["wave"], lengths_a=small["lengths"],
                                         lengths_b=small["lengths"]).score, 1.0, atol=1e-5)
    one = js.verify(m, a[2], b)  # one reference against a batch
    assert one.score.shape == (3,)
    np.testing.assert_allclose(one.score, [np.dot(ea[2], e) / np.linalg.norm(ea[2]) / np.linalg.norm(e)
                                           for e in eb], atol=1e-5)
    with pytest.raises(ValueError, match="2 in wave_b"):
        js.verify(m, a, b[:2])


def test_bad_audio_is_refused(small):
    m = small["model"]
    wave = small["clips"][2]
    with pytest.raises(js.audio.AudioError, match="16000 Hz"):
        m(wave, sample_rate=44100)
    with pytest.raises(js.audio.AudioError, match="mono"):
        m(np.stack([wave, wave], axis=1))
    bad = wave.copy()
    bad[10] = np.nan
    with pytest.raises(js.audio.AudioError, match="NaN"):
        m(bad)
    with pytest.raises(js.audio.AudioError, match="empty"):
        m(np.zeros(0, np.float32))
    with pytest.raises(js.audio.AudioError, match=r"clip\(s\) \[1\] have \[300\] samples.*640"):
        m([wave, wave[:300]])  # shorter than reflect padding allows (SpeechBrain fails too)
    with pytest.raises(ValueError, match=r"features \[batch, frames, 80\]"):
        m.apply(m.params, jnp.zeros((1, 50, 40)))


def test_missing_tensor_is_named(small, tmp_path):
    state = small["sb"].state_dict()
    del state["blocks.2.se_block.conv1.conv.bias"]
    torch.save(state, tmp_path / "embedding_model.ckpt")
    write_yaml(tmp_path, SMALL)
    with pytest.raises(CheckpointError, match=r"missing[\s\S]*blocks\.2\.se_block\.conv1\.conv\.bias"):
        js.load(str(tmp_path))


def test_yaml_with_wrong_channels_names_the_layer(small, tmp_path):
    torch.save(small["sb"].state_dict(), tmp_path / "embedding_model.ckpt")
    write_yaml(tmp_path, dict(SMALL, channels=[48, 48, 48, 48, 144]))
    with pytest.raises(CheckpointError, match=r"mis-shaped[\s\S]*blocks\.0\.conv\.conv\.weight"):
        js.load(str(tmp_path))


def test_folder_without_classifier(small, tmp_path):
    torch.save(small["sb"].state_dict(), tmp_path / "embedding_model.ckpt")
    write_yaml(tmp_path, SMALL)
    m = js.load(str(tmp_path))
    assert m.config.out_neurons == 0 and set(m.params) == {"embedding_model"}
    jax.tree.map(np.testing.assert_array_equal, m.params["embedding_model"],
                 small["model"].params["embedding_model"])
    with pytest.raises(ValueError, match="no classifier"):
        ecapa.logits(m, small["emb"])


def test_unsupported_yaml_settings_are_named(tmp_path):
    write_yaml(tmp_path, SMALL)
    text = (tmp_path / "hyperparams.yaml").read_text()
    bad = text.replace("    n_mels: !ref <n_mels>\n", "    n_mels: !ref <n_mels>\n    deltas: True\n", 1)
    (tmp_path / "hyperparams.yaml").write_text(bad)
    with pytest.raises(CheckpointError, match="deltas=True"):
        convert.config_from_hyperparams(convert.read_hyperparams(tmp_path / "hyperparams.yaml"))


def test_hyperparams_reader_resolves_references(tmp_path):
    (tmp_path / "hyperparams.yaml").write_text(
        "base: 16\nn_mels: !ref <base> * 5\nname: !ref run_<base>\n"
        "block: !new:speechbrain.lobes.models.ECAPA_TDNN.ECAPA_TDNN\n"
        "    input_size: !ref <n_mels>\n    channels: !tuple (8, 8, 8)\n"
        "    lin_neurons: 7\n"
        "width: !ref <block[lin_neurons]>\n"
        "act: !name:torch.nn.ReLU\n")
    hp = convert.read_hyperparams(tmp_path / "hyperparams.yaml")
    assert hp["n_mels"] == 80 and hp["name"] == "run_16" and hp["width"] == 7
    assert hp["block"].target == "speechbrain.lobes.models.ECAPA_TDNN.ECAPA_TDNN"
    assert hp["block"]["input_size"] == 80 and hp["block"]["channels"] == (8, 8, 8)
    assert hp["act"].target == "torch.nn.ReLU"


def test_orbax_round_trip_keeps_the_classifier(small, tmp_path):
    m = small["model"]
    back = js.load(m.save(tmp_path / "converted"))
    assert back.config == m.config
    assert set(back.params) == {"embedding_model", "classifier"}
    assert back.params["classifier"]["weight"].shape == (5, 24)
    jax.tree.map(np.testing.assert_array_equal, back.params, m.params)
    np.testing.assert_array_equal(np.asarray(back(small["clips"])), small["emb"])
    assert back.extras["converted_from"] == "speechbrain"


def test_preset_and_detect(tmp_path):
    from jaxspeech.model import param_shapes

    assert js.presets()["ecapa-voxceleb"] == ecapa.EcapaConfig(out_neurons=7205)
    shapes = param_shapes(ecapa.PRESETS["ecapa-voxceleb"])
    assert shapes["embedding_model"]["blocks.1"]["res2net_block"]["blocks.6"]["conv"]["kernel"].shape \
        == (3, 128, 128)
    assert shapes["embedding_model"]["asp"]["tdnn"]["conv"]["kernel"].shape == (1, 3 * 3072, 128)
    key = convert.torch_key
    assert key(("embedding_model", "asp_bn", "mean")) == "embedding_model.asp_bn.norm.running_mean"
    assert key(("embedding_model", "asp", "conv", "kernel")) == "embedding_model.asp.conv.conv.weight"
    assert key(("classifier", "weight")) == "classifier.weight"
    assert not convert.detect(str(tmp_path))
    with pytest.raises(ValueError, match="odd"):
        ecapa.EcapaConfig(kernel_sizes=(5, 3, 4, 3, 1))


def test_context_conv_equals_the_conv_over_the_concatenation():
    rng = np.random.default_rng(0)
    x, mean, std = (jnp.asarray(rng.standard_normal(s), jnp.float32) for s in
                    ((2, 9, 6), (2, 1, 6), (2, 1, 6)))
    w = jnp.asarray(rng.standard_normal((1, 18, 4)), jnp.float32)
    b = jnp.asarray(rng.standard_normal(4), jnp.float32)

    def cat(x, mean, std):
        return jnp.concatenate([x, jnp.broadcast_to(mean, x.shape), jnp.broadcast_to(std, x.shape)], -1)

    def full(*a):
        return jnp.einsum("btc,co->bto", cat(*a), w[0], precision="highest") + b[None, None]

    def fast(*a):
        return ecapa._context_conv(cat(*a), w, b)

    # sums of ≤ 18 products (and their gradients, ≤ 9 x 18) in another order: ~√n·2⁻²⁴ of
    # the scale (≤ 9.4); 1e-5 of it (was 1e-5 absolute: 1.1e-6 of the scale, measured up
    # to 2.2e-7 of it, a 5x margin on noise)
    full_out = full(x, mean, std)
    np.testing.assert_allclose(fast(x, mean, std), full_out, atol=1e-5 * float(jnp.abs(full_out).max()))
    grads = [jax.grad(lambda *a, f=f: jnp.sum(jnp.sin(f(*a))), argnums=(0, 1, 2))(x, mean, std)
             for f in (full, fast)]
    for g_full, g_fast in zip(*grads, strict=True):
        np.testing.assert_allclose(g_fast, g_full, atol=1e-5 * float(jnp.abs(g_full).max()))
