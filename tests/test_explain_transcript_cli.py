"""``jaxspeech explain-transcript``: per-clip .npz and pictures, per-word heatmaps, exit status."""

import json
import os

import numpy as np
import pytest
import soundfile as sf

import jaxspeech as js
from jaxspeech.assets import speech_clips, whisper_folder
from jaxspeech.cli import main


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """tiny.en's vocabulary, tokenizer and generation settings on a 1+1-layer random Whisper,
    saved as a jaxspeech folder (which keeps both)."""
    real = js.load(whisper_folder("tiny.en"))
    m = js.init("whisper-tiny.en", seed=2, d_model=64, encoder_layers=1, decoder_layers=1,
                encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=128,
                decoder_ffn_dim=128)
    generation = dict(real.extras["generation"], alignment_heads=[[0, 0], [0, 1]])
    m.extras.update(generation=generation, tokenizer_json=real.extras["tokenizer_json"])
    return m.save(tmp_path_factory.mktemp("ckpt") / "small")


def test_writes_npz_picture_and_word_heatmaps(checkpoint, tmp_path):
    clip = speech_clips()[0]
    code = main(["explain-transcript", checkpoint, str(clip.path), "--text", clip.text,
                 "--out", str(tmp_path), "--method", "gradient_x_input"])
    assert code == 0
    data = np.load(tmp_path / f"{clip.id}.npz")
    meta = json.loads(str(data["meta"]))
    n = len(data["tokens"])
    assert data["relevance"].shape == (n, 80, meta["clip_frames"])
    assert data["prefix_relevance"].shape[0] == n and data["score"].shape == (n,)
    np.testing.assert_allclose(data["share_padding"], 0.0)  # the silence reference
    words = meta["words"]
    assert "".join(w["word"] for w in words).strip() == clip.text
    assert sorted(i for w in words for i in w["tokens"]) == list(range(n))
    assert all(0 <= w["start"] <= w["end"] <= len(clip.read()) / 16000 + 0.02 for w in words)
    assert (tmp_path / f"{clip.id}.png").stat().st_size > 10_000
    assert len(os.listdir(tmp_path / f"{clip.id}_words")) == len(words)


def test_long_audio_is_explained_window_by_window(checkpoint, tmp_path):
    wave = np.concatenate([c.read() for c in speech_clips()[:8]] * 2)  # ~65 s
    sf.write(tmp_path / "long.wav", wave, 16000)
    code = main(["explain-transcript", checkpoint, str(tmp_path / "long.wav"), "--text",
                 "one two three", "--out", str(tmp_path / "out"), "--method", "saliency",
                 "--no-png"])
    assert code == 0
    names = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert names == ["long.w0.npz", "long.w1.npz", "long.w2.npz"]
    meta = json.loads(str(np.load(tmp_path / "out" / "long.w2.npz")["meta"]))
    assert meta["window_start_s"] == 60.0


def test_exit_status_says_whether_every_file_was_explained(checkpoint, tmp_path, capsys):
    clip = speech_clips()[0]
    code = main(["explain-transcript", checkpoint, str(clip.path), str(tmp_path / "nope.wav"),
                 "--out", str(tmp_path), "--method", "saliency", "--no-png"])
    err = capsys.readouterr().err
    assert code == 1 and "nope.wav" in err
    assert (tmp_path / f"{clip.id}.npz").exists()  # what was done is kept
    assert main(["explain-transcript", checkpoint, str(clip.path), str(clip.path), "--text", "a",
                 "--out", str(tmp_path)]) == 2


def test_method_choices_include_the_encoder_frame_maps(checkpoint, tmp_path, capsys):
    clip = speech_clips()[0]
    code = main(["explain-transcript", checkpoint, str(clip.path), "--text", clip.text, "--out",
                 str(tmp_path), "--method", "gradcam", "--layer", "layers.0.hidden_state",
                 "--no-png"])
    assert code == 0
    data = np.load(tmp_path / f"{clip.id}.npz")
    assert "prefix_relevance" not in data  # a map over the audio only
    np.testing.assert_allclose(data["share_prefix"], 0.0)
    assert json.loads(str(data["meta"]))["method"] == "gradcam"
    assert main(["explain-transcript", checkpoint, str(clip.path), "--text", clip.text, "--out",
                 str(tmp_path), "--method", "gradcam", "--layer", "nope"]) == 1
    assert "layers.0.hidden_state" in capsys.readouterr().err  # the layers it has
    with pytest.raises(SystemExit):
        main(["explain-transcript", checkpoint, str(clip.path), "--out", str(tmp_path),
              "--method", "occlusion"])
    assert "invalid choice: 'occlusion'" in capsys.readouterr().err
