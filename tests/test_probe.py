"""Linear probes: learn a label a layer carries, stay at chance where the label is absent,
round-trip through npz into an attribution target, and run from the command line."""

import re

import numpy as np
import pytest
import soundfile as sf

import jaxspeech as js
from jaxspeech import probe
from jaxspeech.cli import main

SR = 16000
N_CLASSES = 4
TONE_BANDS = ((300, 500), (900, 1300), (2000, 2800), (4000, 5500))  # Hz, one per class


def tones(n: int, seed: int, seconds: float = 1.0):
    """``n`` clips: noise plus a tone whose frequency band is the class; ``(waves, labels)``."""
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % N_CLASSES
    t = np.arange(int(seconds * SR)) / SR
    waves = 0.05 * rng.standard_normal((n, t.size))
    for i, k in enumerate(labels):
        f = rng.uniform(*TONE_BANDS[k])
        waves[i] += rng.uniform(0.1, 0.3) * np.sin(2 * np.pi * f * t + rng.uniform(0, 2 * np.pi))
    return waves.astype(np.float32), labels


@pytest.fixture(scope="module")
def model():
    # a random small Whisper with a 1 s window: its pooled features still carry the band
    return js.init("whisper-tiny", seed=0, d_model=48, encoder_layers=2, encoder_attention_heads=4,
                   encoder_ffn_dim=96, max_source_positions=50, decoder_layers=0)


@pytest.fixture(scope="module")
def data(model):
    waves, labels = tones(160, seed=0)
    names = probe.probe_layers(model, "embeddings,layers.1.hidden_state,output")
    return waves, labels, probe.pooled_features(model, waves, names, batch_size=32)


def test_all_layers_are_the_hidden_states_and_the_output(model):
    names = probe.probe_layers(model)
    assert names == ["embeddings", "layers.0.hidden_state", "layers.1.hidden_state", "output"]
    with pytest.raises(ValueError, match="layers.0.hidden_state"):
        probe.probe_layers(model, "layers.7.hidden_state")


def test_pooled_features_are_the_mean_over_frames_whatever_the_batching(model, data):
    waves, _, feats = data
    # 37 clips: a full batch and a padded one (160 were five full batches)
    again = probe.pooled_features(model, waves[:37], list(feats), batch_size=32)
    # the same means from other batchings / programs: DESIGN's float32 bound (measured
    # equal for the batchings, 1e-7 relative for the forward's own mean)
    for name in feats:
        np.testing.assert_allclose(again[name], feats[name][:37], rtol=1e-4, atol=1e-5)
    y, inter = model.forward(model.params, model.features(waves[:4]))
    np.testing.assert_allclose(feats["output"][:4], y.mean(axis=1), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(feats["embeddings"][:4], inter["embeddings"].mean(axis=1),
                               rtol=1e-4, atol=1e-5)


def test_a_probe_learns_a_label_the_layer_carries(model, data):
    waves, labels, feats = data
    results = probe.train_probes(model, waves, labels, list(feats), features=feats, seed=0)
    assert [r.probe.layer for r in results] == ["embeddings", "layers.1.hidden_state", None]
    for r in results:  # the tone class is plain in every layer: measured 100 % held out
        assert r.test_accuracy >= 0.9, (r.probe.layer, r.test_accuracy)
        assert r.probe.weight.shape == (48, N_CLASSES)


def test_a_probe_stays_at_chance_where_the_label_is_absent(model, data):
    waves, labels, feats = data
    # labels drawn independently of the audio: nothing in any layer can predict them
    shuffled = np.random.default_rng(1).permutation(labels)
    results = probe.train_probes(model, waves, shuffled, list(feats), features=feats, seed=0)
    for r in results:
        # chance is 0.25, and on 40 held-out clips its σ is 0.07: 0.5 is 3.7σ above it
        # (measured 0.28, 0.28, 0.23)
        assert r.test_accuracy <= 0.5, (r.probe.layer, r.test_accuracy)
        assert r.train_accuracy > r.test_accuracy  # it fits the training labels, in vain


def test_fit_linear_separates_separable_points_and_acts_on_raw_features():
    rng = np.random.default_rng(0)
    y = np.arange(300) % 3
    x = rng.standard_normal((300, 5)) + 4.0 * np.eye(3, 5)[y]
    x = 100.0 + 10.0 * x  # far from standardised: the returned weights must undo the scaling
    w, b = probe.fit_linear(x, y, 3)
    # the class means are 4√2 σ apart: the best linear rule errs on ~0.5 % (measured 0)
    assert np.mean(np.argmax(x @ w + b, -1) == y) > 0.97


def test_split_is_stratified_and_disjoint():
    labels = np.repeat(np.arange(4), [10, 20, 30, 40])
    train, test = probe.split(labels, 0.25, seed=3)
    assert not set(train) & set(test) and len(train) + len(test) == 100
    np.testing.assert_array_equal(np.bincount(labels[test]), [2, 5, 8, 10])


def test_saved_probe_is_a_linear_probe_target(model, data, tmp_path):
    waves, labels, feats = data
    (r,) = probe.train_probes(model, waves, labels, ["layers.1.hidden_state"], features=feats)
    path = r.probe.save(tmp_path / "p.npz")
    back = probe.read_probe(path)
    np.testing.assert_array_equal(back.weight, r.probe.weight)
    assert back.layer == "layers.1.hidden_state" and back.classes == ("0", "1", "2", "3")
    x = model.features(waves[:4])
    y, inter = model.forward(model.params, x)
    logits = inter["layers.1.hidden_state"].mean(1) @ back.weight + back.bias[None, :]
    target = probe.load_probe(path, index=labels[:4])
    # the same logits: float32 order only (measured equal; the attribution's, 1.4e-6)
    np.testing.assert_allclose(target(y, inter), logits[np.arange(4), labels[:4]], rtol=1e-5)
    top = probe.load_probe(path)
    np.testing.assert_allclose(top(y, inter), logits.max(-1), rtol=1e-5)
    res = js.attribute(model, waves[:4], target=target, method="gradient_x_input")
    assert res.relevance.shape == x.shape and np.isfinite(res.relevance).all()
    np.testing.assert_allclose(res.score, logits[np.arange(4), labels[:4]], rtol=1e-4)


def test_malformed_probe_files_are_refused(tmp_path):
    np.savez(tmp_path / "bad.npz", w=np.zeros((3, 2)), b=np.zeros(2))
    with pytest.raises(ValueError, match="missing"):
        probe.read_probe(tmp_path / "bad.npz")
    np.savez(tmp_path / "bad2.npz", w=np.zeros((3, 2)), b=np.zeros(3), layer="output",
             classes=np.array(["a", "b"]), pooling="mean")
    with pytest.raises(ValueError, match="disagree"):
        probe.read_probe(tmp_path / "bad2.npz")


def _table(out: str) -> dict[str, float]:
    """``{layer: held-out accuracy}`` from the command's table."""
    rows = re.findall(r"^(\S+)\s+(\d+)\s+([\d.]+)\s+([\d.]+)$", out, flags=re.M)
    return {name: float(test) for name, _, _, test in rows}


def test_cli_on_planted_clips_with_the_default_model(tmp_path, capsys):
    code = main(["probe", "planted:128:11", "--model", "default",
                 "--layers", "embeddings,output", "--out", str(tmp_path)])
    out = capsys.readouterr().out
    assert code == 0, out
    table = _table(out)
    assert set(table) == {"embeddings", "output"}
    # the default model's output carries the planted class (measured 100 %)
    assert table["output"] >= 0.9
    target = probe.load_probe(tmp_path / "output.npz", index=0)
    assert target.layer is None and probe.read_probe(tmp_path / "output.npz").classes[0] == "class0"


def test_cli_on_a_csv_manifest_with_a_named_label_column(model, tmp_path, capsys):
    waves, labels = tones(24, seed=5, seconds=0.5)
    rows = ["path,speaker,other"]
    for i, (w, k) in enumerate(zip(waves, labels, strict=True)):
        sf.write(tmp_path / f"c{i}.wav", w[: 4000 + 100 * i], SR)  # unequal lengths
        rows.append(f"c{i}.wav,spk{k},x")
    (tmp_path / "data.csv").write_text("\n".join(rows) + "\n")
    model.save(tmp_path / "model")
    code = main(["probe", str(tmp_path / "data.csv"), "--model", str(tmp_path / "model"),
                 "--layers", "output", "--label", "speaker", "--out", str(tmp_path / "probes")])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "output" in _table(out)
    assert probe.read_probe(tmp_path / "probes" / "output.npz").classes == (
        "spk0", "spk1", "spk2", "spk3")
    assert main(["probe", str(tmp_path / "data.csv"), "--model", str(tmp_path / "model"),
                 "--label", "gender"]) == 2  # a missing column is an error, not a crash
