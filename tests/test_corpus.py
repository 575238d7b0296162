"""Corpus runs in one process: sources (folder, manifest, a real TFDS dataset built on
disk), batching (buckets, windows, stitching), the results store (float16, frames,
recovery after a kill), per-item targets, and the ``attribute-corpus`` command.

Every run is checked against :func:`jaxspeech.attribute` on the same audio, window by
window: the corpus machinery may pad, bucket, chunk and shard, but must not change a
number.
"""

import dataclasses
import json
import shutil

import jax
import numpy as np
import pytest
import soundfile as sf

import jaxspeech as js
from jaxspeech.cli import main
from jaxspeech.corpus import attribute_corpus, batching, open_results, open_source, store
from jaxspeech.corpus.sources import read_audio
from jaxspeech.corpus.targets import logits_layer
from jaxspeech.model import Model, param_shapes, presets

# encoder only (the presets carry their decoders, whose 6 heads would not divide d_model 32)
TINY_WHISPER = dict(d_model=32, encoder_layers=1, encoder_attention_heads=1, encoder_ffn_dim=64,
                    vocab_size=0, decoder_layers=0, decoder_attention_heads=0, decoder_ffn_dim=0)
TINY_ECAPA = dict(n_mels=24, channels=(16, 16, 48), kernel_sizes=(5, 3, 1), dilations=(1, 2, 1),
                  groups=(1, 1, 1), attention_channels=8, res2net_scale=2, se_channels=8,
                  lin_neurons=8, out_neurons=6)
TINY_CLAP = dict(depths=(1, 1), num_attention_heads=(1, 2), patch_embeds_hidden_size=16,
                 hidden_size=32, projection_dim=16)
WINDOW = 480000  # Whisper's 30 s at 16 kHz


def random_model(name: str, seed: int = 0, **overrides) -> Model:
    """A preset with random weights drawn in numpy from the params' shapes (no compiled
    initialiser: several times faster on CPU). Normalisation statistics are 0 / 1."""
    config = dataclasses.replace(presets()[name], **overrides)
    rng = np.random.default_rng(seed)

    def leaf(path, spec):
        key = jax.tree_util.keystr(path)
        if "var" in key or "scale" in key:
            return np.ones(spec.shape, np.float32)
        if "mean" in key or "bias" in key:
            return np.zeros(spec.shape, np.float32)
        fan_in = int(np.prod(spec.shape[:-1])) or 1
        return rng.normal(0, 1 / np.sqrt(fan_in), spec.shape).astype(np.float32)

    return Model(config, jax.tree_util.tree_map_with_path(leaf, param_shapes(config)),
                 source=f"random:{name}")


def tone(seconds: float, rate: int, freq: float, seed: int = 0) -> np.ndarray:
    t = np.arange(int(round(seconds * rate))) / rate
    noise = np.random.default_rng(seed).standard_normal(t.shape)
    return (0.3 * np.sin(2 * np.pi * freq * t) + 0.05 * noise).astype(np.float32)


# --- sources -------------------------------------------------------------------------------

def test_folder_source_is_recursive_sorted_and_resampled(tmp_path):
    (tmp_path / "b" / "c").mkdir(parents=True)
    sf.write(tmp_path / "z.wav", tone(1.0, 16000, 200), 16000)
    sf.write(tmp_path / "b" / "c" / "x.flac", tone(0.5, 44100, 300), 44100)
    sf.write(tmp_path / "b" / "y.mp3", tone(0.75, 22050, 250), 22050, format="MP3")
    sf.write(tmp_path / ".hidden.wav", tone(0.1, 16000, 200), 16000)
    (tmp_path / "notes.txt").write_text("not audio")
    src = open_source(tmp_path)
    entries = src.entries()
    assert [e.id for e in entries] == ["b/c/x.flac", "b/y.mp3", "z.wav"]
    items = {i.id: i for i in src.items(16000)}
    assert items["z.wav"].wave.shape == (16000,) and items["b/c/x.flac"].wave.shape == (8000,)
    # an MP3 frame is 1152 samples (836 at 16 kHz): the codec may pad up to one (measured 0)
    assert abs(items["b/y.mp3"].wave.shape[0] - 12000) < 1200
    assert all(i.wave.dtype == np.float32 and i.sample_rate == 16000 for i in items.values())
    # PCM_16 written as round(32767 x), read as /32768: ≤ (|x| + 0.5)/32768 = 4.6e-5 off for
    # |x| ≤ 1 (measured 3.05e-5, one step)
    np.testing.assert_allclose(items["z.wav"].wave, tone(1.0, 16000, 200), atol=1e-4)


def test_manifest_rows_segments_and_fields(tmp_path):
    wave = tone(2.0, 16000, 220)
    sf.write(tmp_path / "a.wav", wave, 16000)
    sf.write(tmp_path / "ref.wav", tone(1.0, 16000, 330), 16000)
    (tmp_path / "m.csv").write_text(
        "path,label,reference,text,start,end,speaker\n"
        "a.wav,3,ref.wav,hello,0.5,1.25,s1\n"
        "a.wav,x,,,,,s2\n")
    csv_entries = open_source(tmp_path / "m.csv").entries()
    assert [e.id for e in csv_entries] == ["a.wav@0.5-1.25", "a.wav"]
    first = open_source(tmp_path / "m.csv").load(csv_entries[0], 16000)
    whole = read_audio(tmp_path / "a.wav", 16000)
    np.testing.assert_array_equal(first.wave, whole[8000:20000])  # the segment, read alone
    assert first.label == 3 and first.text == "hello" and first.fields["speaker"] == "s1"
    assert first.reference == str(tmp_path / "ref.wav")
    assert open_source(tmp_path / "m.csv").load(csv_entries[1], 16000).label == "x"
    (tmp_path / "m.jsonl").write_text(
        json.dumps({"id": "u1", "path": str(tmp_path / "a.wav"), "label": 2}) + "\n\n" +
        json.dumps({"id": "u2", "path": "a.wav", "start": 1.0}) + "\n")
    items = list(open_source(tmp_path / "m.jsonl").items(8000))
    assert [(i.id, i.label, i.wave.shape[0]) for i in items] == [("u1", 2, 16000), ("u2", None, 8000)]
    (tmp_path / "dup.jsonl").write_text('{"id": "u", "path": "a.wav"}\n' * 2)
    with pytest.raises(ValueError, match="appears twice"):
        open_source(tmp_path / "dup.jsonl").entries()
    (tmp_path / "nopath.csv").write_text("file\na.wav\n")
    with pytest.raises(ValueError, match="no 'path'"):
        open_source(tmp_path / "nopath.csv").entries()


# --- batching ------------------------------------------------------------------------------

def test_batches_have_few_shapes_and_windows_tile_the_audio():
    layout = batching.Layout("ecapa", 16000, 160, None, (16000, 32000, 64000), 640, True, 0, "mask")
    assert [batching.bucket_width(n, layout.buckets) for n in (1, 16000, 16001, 64001, 200000)] == \
        [16000, 16000, 32000, 128000, 256000]
    batcher = batching.Batcher(layout, 4)
    lengths = [3000, 20000, 15000, 31000, 9000, 16000, 40000]
    rows = [batching.Row(i, 0, 1, np.full(n, i + 1, np.float32)) for i, n in enumerate(lengths)]
    batches = batcher.add(rows) + batcher.flush()
    assert sorted(b.width for b in batches) == [16000, 32000, 64000]
    for b in batches:
        assert b.wave.shape == (4, b.width)  # always B rows
        for i in range(4):
            row = b.rows[i] if i < len(b.rows) else b.rows[0]  # padding repeats row 0
            assert b.lengths[i] == row.n_samples / b.width
            assert (b.wave[i, :row.n_samples] == row.wave).all() and not b.wave[i, row.n_samples:].any()
    assert sorted(r.key for b in batches for r in b.rows) == list(range(7))
    # windows: consecutive, a last piece too short to explain is joined to the one before
    wave = np.arange(2500, dtype=np.float32)
    assert [p.shape[0] for p in batching.split_windows(wave, 1000, 1)] == [1000, 1000, 500]
    parts = batching.split_windows(wave, 1000, 600)
    assert [p.shape[0] for p in parts] == [1000, 1500] and (np.concatenate(parts) == wave).all()
    # kept frames: non-last windows tile exactly, the last keeps its own frames
    w = dataclasses.replace(layout, window=1600, frames_rule="centre")
    assert batching.kept_frames(w, 1600, False, 11) == 10
    assert batching.kept_frames(w, 1601, True, 11) == 11 and batching.kept_frames(w, 161, True, 11) == 2
    assert batching.kept_frames(layout, 1600, True, 50) == 11  # ECAPA: 1 + n // hop (the mask)


# --- Whisper: windows, per-item reference targets, the store --------------------------------

@pytest.fixture(scope="module")
def whisper_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpus_whisper")
    audio_dir = root / "audio"
    audio_dir.mkdir()
    sf.write(audio_dir / "long.wav", tone(34.0, 16000, 180), 16000)  # two windows
    sf.write(audio_dir / "short.flac", tone(1.3, 22050, 260, seed=1), 22050)
    sf.write(audio_dir / "mid.wav", tone(4.0, 8000, 300, seed=2), 8000)
    sf.write(audio_dir / "ref_a.wav", tone(2.0, 16000, 500, seed=3), 16000)
    sf.write(audio_dir / "ref_b.wav", tone(3.0, 16000, 120, seed=4), 16000)
    (audio_dir / "broken.wav").write_bytes(b"RIFF\x00\x00garbage")
    rows = [("long", "long.wav", "ref_a.wav"), ("short", "short.flac", "ref_b.wav"),
            ("mid", "mid.wav", "ref_a.wav"), ("broken", "broken.wav", "ref_a.wav"),
            ("noref", "short.flac", "missing.wav")]
    manifest = root / "trials.csv"
    manifest.write_text("id,path,reference,label\n" +
                        "".join(f"{i},audio/{p},audio/{r},{n}\n" for n, (i, p, r) in enumerate(rows)))
    model = random_model("whisper-tiny", **TINY_WHISPER)
    summary = attribute_corpus(model, manifest, root / "out", method="attnlrp", target="reference",
                               batch_size=4, progress=False)
    return root, model, summary, open_results(root / "out")


def test_whisper_windows_and_reference_targets_match_attribute(whisper_run):
    root, model, summary, res = whisper_run
    assert summary.done == 3 and sorted(res.ids) == ["long", "mid", "short"] and res.duplicates == []
    assert set(summary.failures) == {"broken", "noref"} and "missing.wav" in res.failures["noref"]
    # the same windows explained directly, each against its reference's pooled embedding
    waves = {i: read_audio(root / "audio" / p, 16000) for i, p in
             [("long", "long.wav"), ("short", "short.flac"), ("mid", "mid.wav")]}
    refs = {r: np.asarray(model(read_audio(root / "audio" / r, 16000)))[0].mean(0)
            for r in ("ref_a.wav", "ref_b.wav")}
    windows = [("long", waves["long"][:WINDOW], "ref_a.wav"), ("long", waves["long"][WINDOW:], "ref_a.wav"),
               ("short", waves["short"], "ref_b.wav"), ("mid", waves["mid"], "ref_a.wav")]
    direct = js.attribute(model, [w for _, w, _ in windows], method="attnlrp",
                          target=js.targets.cosine_similarity(np.stack([refs[r] for *_, r in windows])))
    rel, score = np.asarray(direct.relevance), np.asarray(direct.score)
    for ident in ("long", "short", "mid"):
        rows = [k for k, (i, _, _) in enumerate(windows) if i == ident]
        kept = [min(3000, -(-windows[k][1].shape[0] // 160)) if k == rows[-1] else 3000 for k in rows]
        expect = np.concatenate([rel[k][:, :n] for k, n in zip(rows, kept, strict=True)], axis=1)
        got = res[ident]
        assert got["relevance"].shape == expect.shape == (80, -(-waves[ident].shape[0] // 160))
        # the same windows in other batches (other programs): float32 order only, measured
        # 5e-7 of the max (window scores 2e-7, sums 3e-7 relative); 20x and more below
        np.testing.assert_allclose(got["relevance"], expect, rtol=0, atol=1e-5 * np.abs(expect).max())
        np.testing.assert_allclose(got["window_scores"], score[rows], rtol=1e-5)
        assert got["score"] == pytest.approx(score[rows].mean(), rel=1e-5)
        total = sum(rel[k].sum() for k in rows)  # nothing is lost: kept + outside = all
        assert got["relevance"].sum() + got["relevance_outside"] == pytest.approx(total, rel=1e-4)
        frames = got["relevance"].sum(0)
        np.testing.assert_allclose(got["frames"], frames, rtol=0, atol=1e-5 * np.abs(frames).max())
        assert got["n_samples"] == waves[ident].shape[0] and got["n_windows"] == len(rows)
    assert res["long"]["label"] == 0 and res["mid"]["reference"].endswith("ref_a.wav")


def test_store_recovers_from_a_kill_and_refuses_to_mix_runs(whisper_run, tmp_path):
    root, model, _, res = whisper_run
    out = tmp_path / "out"
    shutil.copytree(root / "out", out)
    # what a kill can leave: a temporary file, a renamed shard never committed, a torn line
    shard = next((out / "shards").iterdir())
    shutil.copy(shard, out / "shards" / "p00000-000007.npz")
    (out / "shards" / ".p00000-000008.npz.tmp-123").write_bytes(b"partial")
    with open(out / "manifest-p00000.jsonl", "a") as f:
        f.write('{"shard": "p00000-000007.npz", "ids": ["lo')
    again = open_results(out)
    assert again.ids == res.ids and again.duplicates == []  # the reader sees commits only
    writer = store.ShardWriter(out, 0)
    assert sorted(p.name for p in (out / "shards").iterdir()) == [shard.name]
    assert (out / "manifest-p00000.jsonl").read_text().endswith("}\n")
    assert writer._seq == 8  # never reuses a shard name
    # resuming completes nothing twice; another configuration is refused
    resumed = attribute_corpus(model, root / "trials.csv", out, method="attnlrp", target="reference",
                               batch_size=4, resume=True, progress=False)
    assert resumed.already_done == 3 and resumed.done == 0 and len(open_results(out)) == 3
    with pytest.raises(ValueError, match="another configuration.*method"):
        attribute_corpus(model, root / "trials.csv", out, method="gradient_x_input",
                         target="reference", batch_size=4, resume=True, progress=False)
    with pytest.raises(FileExistsError, match="--resume"):
        attribute_corpus(model, root / "trials.csv", out, method="attnlrp", target="reference",
                         batch_size=4, progress=False)


def test_cli_progress_summary_float16_frames(whisper_run, tmp_path, capsys):
    root, model, _, res = whisper_run
    model.save(tmp_path / "model")
    code = main(["attribute-corpus", str(root / "trials.csv"), "--model", str(tmp_path / "model"),
                 "--method", "attnlrp", "--target", "reference", "--out", str(tmp_path / "out"),
                 "--batch-size", "4", "--dtype", "float16", "--pool", "frames"])
    err = capsys.readouterr().err
    assert code == 1, err  # two items failed: the exit status tells a script so
    assert "item/s" in err  # the progress bar's rate (and ETA)
    assert "3 items attributed, 2 failed" in err and "items/s" in err
    assert "failed broken: AudioError" in err and "skipped broken" in err  # logged with a reason
    small = open_results(tmp_path / "out")
    assert small.ids == res.ids
    for ident in res.ids:
        frames = res[ident]["relevance"].sum(0)
        got = small[ident]["relevance"]
        assert got.dtype == np.float32 and got.shape == frames.shape  # pooled, read back as float32
        # float16 keeps 11 bits: each value within 2⁻¹¹ = 4.9e-4 of itself (rtol: 4 of those;
        # atol for the smallest frames); the score stays float32, the same run's value
        np.testing.assert_allclose(got, frames, rtol=2e-3, atol=1e-3 * np.abs(frames).max())
        assert small[ident]["score"] == pytest.approx(res[ident]["score"], rel=1e-6)
    size = sum(p.stat().st_size for p in (tmp_path / "out" / "shards").iterdir())
    full = sum(p.stat().st_size for p in (root / "out" / "shards").iterdir())
    # 80 mel bins pooled, 2 bytes instead of 4: 160x less relevance, the other fields and the
    # npz headers stay (measured 98x less)
    assert size < full / 40


# --- TFDS: a real dataset built on disk (L2-ARCTIC layout), ECAPA buckets, label targets ---

def _l2arctic_copy(root):
    spec = {"ABA": [0.3, 1.5], "BWC": [0.9, 0.005]}  # the last one is too short for ECAPA
    for n, (spk, durations) in enumerate(spec.items()):
        (root / spk / "wav").mkdir(parents=True)
        (root / spk / "transcript").mkdir()
        for k, seconds in enumerate(durations):
            pcm = (tone(seconds, 44100, 150 + 100 * n + 50 * k, seed=n * 10 + k) * 32767).astype(np.int16)
            sf.write(root / spk / "wav" / f"arctic_a000{k + 1}.wav", pcm, 44100, subtype="PCM_16")
            (root / spk / "transcript" / f"arctic_a000{k + 1}.txt").write_text(f"prompt {spk} {k}\n")
    (root / "suitcase_corpus").mkdir()  # no wav/: not a speaker, ignored
    return root


def test_tfds_l2arctic_ecapa_buckets_and_label_targets(tmp_path):
    from jaxspeech.corpus.l2arctic import build

    manual = _l2arctic_copy(tmp_path / "l2arctic")
    data_dir = tmp_path / "tfds"
    assert main(["build-l2arctic", str(manual), "--data-dir", str(data_dir)]) == 0
    src = open_source("tfds:l2_arctic", split="train", data_dir=data_dir)
    assert src.sample_rate == 44100 and len(src.entries()) == 4
    items = {i.fields["key"]: i for i in src.items(16000)}
    assert sorted(items) == ["ABA/arctic_a0001", "ABA/arctic_a0002", "BWC/arctic_a0001",
                             "BWC/arctic_a0002"]
    aba = items["ABA/arctic_a0002"]
    assert aba.label == 0 and items["BWC/arctic_a0001"].label == 1  # l1: arabic, mandarin
    assert aba.text == "prompt ABA 1"
    assert aba.fields["speaker"] == "ABA" and aba.fields["gender"] == "M"
    original = read_audio(manual / "ABA" / "wav" / "arctic_a0002.wav", 16000)
    np.testing.assert_array_equal(aba.wave, original)  # the same samples as the wav file

    model = random_model("ecapa-voxceleb", **TINY_ECAPA)
    summary = attribute_corpus(model, "tfds:l2_arctic", tmp_path / "out", method="attnlrp",
                               target="label", batch_size=2, bucket_seconds=(1.0, 2.0),
                               progress=False, source_options={"data_dir": data_dir})
    res = open_results(tmp_path / "out")
    too_short = items["BWC/arctic_a0002"].id
    assert summary.done == 3 and list(summary.failures) == [too_short]
    assert "needs at least" in summary.failures[too_short]
    # the clips padded together to the longest (1.5 s) instead of to their buckets (1 s, 2 s):
    # ECAPA's masks make the padding irrelevant, so the numbers agree
    got = [res[ident] for ident in res.ids]
    waves = [items[g["key"]].wave for g in got]
    target = dataclasses.replace(js.targets.class_logit(np.array([g["label"] for g in got])),
                                 layer=logits_layer(model))
    direct = js.attribute(model, waves, method="attnlrp", target=target)
    for k, (g, wave) in enumerate(zip(got, waves, strict=True)):
        n = 1 + wave.shape[0] // 160
        expect = np.asarray(direct.relevance[k])[:n]
        assert g["relevance"].shape == expect.shape == (n, 24)
        # other paddings (buckets vs the longest clip), so other programs: DESIGN's bound
        # (measured 2e-7 of the max)
        np.testing.assert_allclose(g["relevance"], expect, rtol=0, atol=1e-4 * np.abs(expect).max())
        assert g["score"] == pytest.approx(float(direct.score[k]), rel=1e-4, abs=1e-6)
        # masked frames: nothing, exactly (measured 0); 1e-6 of Σ|R| would be float32 noise
        assert abs(g["relevance_outside"]) <= 1e-6 * np.abs(expect).sum()
    (manual / "XYZ" / "wav").mkdir(parents=True)
    with pytest.raises(ValueError, match="not L2-ARCTIC speakers"):
        build(manual, tmp_path / "tfds2")


# --- CLAP: 10 s windows, per-item text targets ----------------------------------------------

def test_clap_long_audio_windows_and_text_targets(tmp_path):
    sf.write(tmp_path / "long.wav", tone(12.0, 48000, 440), 48000)
    sf.write(tmp_path / "short.wav", tone(3.0, 44100, 660, seed=1), 44100)
    (tmp_path / "captions.jsonl").write_text(
        '{"path": "long.wav", "text": "a whistle"}\n{"path": "short.wav", "text": "a beep"}\n'
        '{"path": "short.wav", "id": "uncaptioned", "text": "never embedded"}\n')
    emb = np.random.default_rng(0).standard_normal((2, 16)).astype(np.float32)
    np.savez(tmp_path / "text.npz", texts=np.array(["a whistle", "a beep"]), embeddings=emb)
    model = random_model("clap-htsat-unfused", **TINY_CLAP)
    summary = attribute_corpus(model, tmp_path / "captions.jsonl", tmp_path / "out", method="attnlrp",
                               target="text", text_embeddings=str(tmp_path / "text.npz"),
                               batch_size=3, progress=False)
    assert summary.done == 2 and "no text embedding" in summary.failures["uncaptioned"]
    res = open_results(tmp_path / "out")
    long, short = read_audio(tmp_path / "long.wav", 48000), read_audio(tmp_path / "short.wav", 48000)
    direct = js.attribute(model, [long[:480000], long[480000:], short], method="attnlrp",
                          target=js.targets.text_similarity(emb[[0, 0, 1]], np.arange(3)))
    rel, score = np.asarray(direct.relevance), np.asarray(direct.score)
    expect = np.concatenate([rel[0][:, :1000], rel[1][:, :200]], axis=1)  # 10 s + 2 s, 10 ms frames
    got = res["long.wav"]
    assert got["relevance"].shape == expect.shape == (1, 1200, 64)
    # as for Whisper above: float32 order only (measured equal)
    np.testing.assert_allclose(got["relevance"], expect, rtol=0, atol=1e-5 * np.abs(expect).max())
    np.testing.assert_allclose(got["window_scores"], score[:2], rtol=1e-5)
    np.testing.assert_allclose(res["short.wav"]["relevance"], rel[2][:, :300], rtol=0,
                               atol=1e-5 * np.abs(rel[2]).max())
    assert res["short.wav"]["score"] == pytest.approx(float(score[2]), rel=1e-5)
