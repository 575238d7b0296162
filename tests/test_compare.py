"""`jaxspeech compare` judged against a float64 run of the reference: the rule, each family's
float64 reference, Whisper's decoder row, the failing direction, and real Whisper weights."""

import dataclasses
import shutil

import numpy as np
import pytest
import torch
from test_whisper import to_openai_state
from transformers import WhisperForConditionalGeneration

import jaxspeech as js
import jaxspeech.compare
from jaxspeech import audio
from jaxspeech.assets import speech_clips, whisper_folder
from jaxspeech.compare import FACTOR, TOLERANCE, Row, compare
from jaxspeech.convert import ecapa as convert_ecapa
from jaxspeech.convert import whisper as convert_whisper
from jaxspeech.convert.common import flatten, unflatten
from jaxspeech.data import synth
from jaxspeech.data.reference_checkpoints import ECAPA_SMALL, write_clap, write_ecapa, write_whisper

OUTPUT_ROWS = ["output (on reference features)", "output (end to end)"]
DECODER_ROW = "decoder logits (teacher-forced)"


def rows(report) -> dict[str, Row]:
    return {r.stage: r for r in report.rows}


def whisper_clips():
    return [synth.harmonic_sweep(2.0, 16000), synth.noise_bursts(3.0, 16000)]


@pytest.fixture(scope="module")
def decoder_folder(tmp_path_factory):
    """An HF WhisperForConditionalGeneration folder (vocab 64, one decoder layer) with its
    generation_config.json, written by transformers with random weights."""
    path = tmp_path_factory.mktemp("whisper-decoder")
    write_whisper(path, (32, 1, 2), ffn_dim=64, conditional=True, perturb=0.1, seed=1)
    return path


# --- the rule --------------------------------------------------------------------------------

def test_a_row_passes_within_the_larger_of_tolerance_and_factor_times_the_reference_error(
        monkeypatch):
    def row(err, ref_err):  # relative errors (scale 1)
        return Row("x", (1,), err, err, 1.0, ref_err)

    # a quiet reference: the design tolerance holds
    assert row(TOLERANCE, 1e-7).ok and not row(1.01 * TOLERANCE, 1e-7).ok
    # a float32 reference that is itself 2e-4 from float64 widens the bound to FACTOR x that
    assert row(0.99 * FACTOR * 2e-4, 2e-4).ok and not row(1.01 * FACTOR * 2e-4, 2e-4).ok
    monkeypatch.setattr(jaxspeech.compare, "TOLERANCE", 0.0)  # 0: exact agreement, no widening
    assert not row(1e-9, 2e-4).ok and row(0.0, 2e-4).ok


def test_references_refuse_other_dtypes(tmp_path):
    write_ecapa(tmp_path, ECAPA_SMALL, classifier=False)
    with pytest.raises(ValueError, match="'float32' or 'float64'"):
        convert_ecapa.reference(str(tmp_path), dtype="float16")


# --- Whisper with a decoder ------------------------------------------------------------------

def test_whisper_decoder_folder_passes_with_float64_columns(decoder_folder):
    report = compare(str(decoder_folder), whisper_clips(), max_new_tokens=8)
    assert report.ok, report.table()
    by_stage = rows(report)
    assert list(by_stage) == ["features", *OUTPUT_ROWS, DECODER_ROW]
    b, length, vocab = by_stage[DECODER_ROW].shape
    # the start token, then up to 8 greedy tokens and <|endoftext|>
    assert (b, vocab) == (2, 64) and 2 <= length <= 10
    for r in report.rows:
        # a float64 run really happened (float32 differs from it) and, on small random
        # weights, float32 rounding (~1e-7 relative) is far inside the design bound, so the
        # bound is DESIGN.md's 1e-4 itself
        assert 0 < r.ref_rel < TOLERANCE / FACTOR and r.bound == TOLERANCE, r
    table = report.table("markdown")
    assert "| f32 ref rel | bound |" in table and f"| {DECODER_ROW} | 2x{length}x64 |" in table
    assert "greedy sequences" in table and "transcript: not compared" in table


@pytest.mark.parametrize("where, failing", [
    (("decoder", "layer_norm", "scale"), [DECODER_ROW]),
    (("layer_norm", "scale"), OUTPUT_ROWS),
])
def test_a_wrong_weight_fails_the_rows_it_reaches(decoder_folder, monkeypatch, where, failing):
    """A converter that got one LayerNorm scale 0.1 % wrong: the output that norm produces
    moves by ~1e-3 relative (the scale multiplies every output of the norm), 10x the bound,
    and the rows before it stay within it. (What the encoder's error does to the logits
    depends on how the cross-attention weighs it; that row is not asserted.)"""
    def wrong_load(path):
        m = js.load(path)
        flat = flatten(m.params)
        flat[where] = flat[where] * 1.001
        return js.Model(m.config, unflatten(flat), source=m.source, extras=m.extras)

    monkeypatch.setattr(jaxspeech.compare, "load", wrong_load)
    report = compare(str(decoder_folder), whisper_clips(), max_new_tokens=8)
    assert not report.ok
    bad = [r.stage for r in report.rows if not r.ok]
    assert all(s in bad for s in failing), report.table()
    upstream = ["features"] if where[0] != "decoder" else ["features", *OUTPUT_ROWS]
    assert not any(s in bad for s in upstream), report.table()


def test_openai_pt_decoder_is_compared_on_fixed_tokens(tmp_path):
    """An OpenAI .pt holds no tokenizer, so neither side knows the start token: the decoder is
    teacher-forced on fixed tokens (and there is no transcript)."""
    hf = write_whisper(tmp_path / "hf", (32, 1, 2), ffn_dim=128, perturb=0.1, seed=2)
    dims = {"n_mels": 80, "n_audio_ctx": 1500, "n_audio_state": 32, "n_audio_head": 2,
            "n_audio_layer": 1, "n_vocab": 64, "n_text_ctx": 448, "n_text_state": 32,
            "n_text_head": 2, "n_text_layer": 1}
    torch.save({"dims": dims, "model_state_dict": to_openai_state(hf)}, tmp_path / "m.pt")
    report = compare(str(tmp_path / "m.pt"), whisper_clips())
    assert report.ok, report.table()
    assert rows(report)[DECODER_ROW].shape == (2, 16, 64)
    assert any("fixed pseudo-random tokens" in n for n in report.notes)


def test_hf_state_dict_is_the_inverse_of_the_hf_loader(tmp_path):
    """jaxspeech params -> transformers (hf_torch_model) -> save_pretrained -> js.load gives
    the params back bit for bit, and transformers computes the same logits from them."""
    m = js.init("whisper-tiny", d_model=64, encoder_layers=1, encoder_attention_heads=2,
                encoder_ffn_dim=128, decoder_layers=1, decoder_attention_heads=2,
                decoder_ffn_dim=128, vocab_size=100, seed=3)
    generation = {"decoder_start_token_id": 1, "eos_token_id": 2}
    hf = convert_whisper.hf_torch_model(m.params, m.config, generation)
    assert isinstance(hf, WhisperForConditionalGeneration)
    hf.save_pretrained(tmp_path)
    back = js.load(tmp_path)
    assert back.config == m.config
    ours, theirs = flatten(m.params), flatten(back.params)
    assert ours.keys() == theirs.keys()
    for k in ours:
        np.testing.assert_array_equal(np.asarray(theirs[k]), np.asarray(ours[k]), err_msg=str(k))
    x = np.random.default_rng(0).standard_normal((1, 80, 3000)).astype(np.float32)
    t = np.array([[1, 5, 7, 9]], np.int32)
    with torch.no_grad():
        ref = hf(input_features=torch.from_numpy(x),
                 decoder_input_ids=torch.from_numpy(t).long()).logits.numpy()
    logits = np.asarray(m.apply(m.params, x, tokens=t), np.float64)
    # DESIGN.md's float32 parity bound
    assert np.abs(logits - ref).max() / np.abs(ref).max() < TOLERANCE
    with pytest.raises(js.CheckpointError, match="decoder"):  # a config the params do not fit
        convert_whisper.hf_state_dict(m.params, dataclasses.replace(m.config, decoder_layers=2))


def test_whisper_features_in_float64_are_the_extractors_recipe(decoder_folder):
    """The float64 front end is WhisperFeatureExtractor's recipe, not another one: it agrees
    with the float32 extractor to float32 rounding of the STFT (~1e-7 relative in power,
    which the log and the 8-decade clamp amplify at the quietest kept bins: ~1e-5 of the
    features' range here), far below any recipe difference (a different window or filter
    bank moves features by 1e-2 and more)."""
    wave = np.stack([synth.harmonic_sweep(3.0, 16000), synth.noise_bursts(3.0, 16000)])
    f32, _ = convert_whisper.reference(str(decoder_folder), "float32")[0](wave)
    f64, _ = convert_whisper.reference(str(decoder_folder), "float64")[0](wave)
    assert f64.dtype == np.float64 and f64.shape == f32.shape
    err = np.abs(f32 - f64).max() / np.abs(f64).max()
    assert 0 < err < 1e-4


# --- ECAPA and CLAP --------------------------------------------------------------------------

def test_ecapa_passes_against_speechbrain_in_float64(tmp_path):
    write_ecapa(tmp_path, ECAPA_SMALL, classifier=False)
    clips = [synth.harmonic_sweep(2.0, 16000), synth.noise_bursts(1.5, 16000)]
    report = compare(str(tmp_path), clips)
    assert report.ok, report.table()
    assert list(rows(report)) == ["features", *OUTPUT_ROWS]
    # SpeechBrain's Fbank ran in float64 too (its window and filter bank promoted): every row,
    # features included, has a float32 reference that differs from the float64 one
    assert all(r.ref_rel > 0 for r in report.rows), report.table()


@pytest.mark.slow
def test_clap_passes_against_transformers_in_float64(tmp_path):
    write_clap(tmp_path, dict(depths=[2, 2, 1, 1]), seed=4)
    report = compare(str(tmp_path), [synth.harmonic_sweep(3.0, 48000),
                                     synth.noise_bursts(12.0, 48000)])
    assert report.ok, report.table()
    by_stage = rows(report)
    # transformers' CLAP extractor has no float64 path (complex64 STFT, float32 output), so its
    # features are the same in both runs; the model ran in float64
    assert by_stage["features"].ref_rel == 0
    assert all(by_stage[s].ref_rel > 0 for s in OUTPUT_ROWS), report.table()


# --- real weights: OpenAI's tiny.en ----------------------------------------------------------

TINY_EN = whisper_folder("tiny.en")  # the real weights, a test dependency (jaxspeech[models])


def speech_30s() -> np.ndarray:
    """29.4 s of speech (the first seven shipped clips end to end), zero-padded to Whisper's
    30 s window: a full window, as in issue 13's failing case."""
    speech = np.concatenate([audio.read(str(c.path), 16000) for c in speech_clips()[:7]])
    clip = np.zeros(30 * 16000, np.float32)
    clip[:speech.size] = speech
    return clip


@pytest.fixture(scope="module")
def tiny_en_hf(tmp_path_factory):
    """Real tiny.en as an HF folder: the CT2 weights through hf_torch_model, saved by
    transformers with their tokenizer.json (so transformers reads the weights itself)."""
    path = tmp_path_factory.mktemp("tiny.en-hf")
    m = js.load(str(TINY_EN))
    convert_whisper.hf_torch_model(m.params, m.config, m.extras["generation"]).save_pretrained(path)
    shutil.copy(TINY_EN / "tokenizer.json", path / "tokenizer.json")
    return str(path)


@pytest.mark.slow
@pytest.mark.parametrize("which", ["hf", "ctranslate2"])
def test_real_tiny_en_on_a_30s_clip_passes_against_float64(which, request):
    path = request.getfixturevalue("tiny_en_hf") if which == "hf" else str(TINY_EN)
    report = compare(path, [speech_30s()])
    print(report.table())
    assert report.ok, report.table()
    by_stage = rows(report)
    assert list(by_stage)[-1] == DECODER_ROW
    # the decoder was forced on the reference's own transcript of the clip: dozens of tokens
    assert by_stage[DECODER_ROW].shape[1] > 30
    for t in report.transcripts:  # when jaxspeech.transcribe is there
        assert t.ours == t.ref32, report.table()
