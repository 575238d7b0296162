"""The jaxspeech command: convert, info, compare (exit codes and output)."""

import json

import numpy as np
import pytest
import soundfile as sf

import jaxspeech.compare
from jaxspeech.cli import main
from jaxspeech.data import synth
from jaxspeech.data.reference_checkpoints import write_whisper


@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory):
    path = tmp_path_factory.mktemp("hf")
    write_whisper(path, (32, 1, 2), ffn_dim=64)
    return path


def test_convert_then_info_reports_kind_config_and_count(hf_folder, tmp_path, capsys):
    assert main(["convert", str(hf_folder), str(tmp_path / "out")]) == 0
    assert main(["info", str(tmp_path / "out"), "--json"]) == 0
    info = json.loads(capsys.readouterr().out.split("\n", 1)[1])
    assert info["kind"] == "whisper" and info["config"]["d_model"] == 32
    assert info["parameters"] == 32 * 80 * 3 + 32 + 32 * 32 * 3 + 32 + 1500 * 32 + (
        4 * 32 * 32 + 3 * 32 + 2 * 32 * 64 + 64 + 32 + 4 * 32) + 2 * 32
    # converting onto an existing folder is refused and leaves it intact
    assert main(["convert", str(hf_folder), str(tmp_path / "out")]) == 2
    assert (tmp_path / "out" / "jaxspeech.json").exists()


def test_compare_on_given_audio_passes_and_prints_a_table(hf_folder, tmp_path, capsys):
    sf.write(tmp_path / "a.wav", synth.harmonic_sweep(2.0, 16000), 16000)
    sf.write(tmp_path / "b.flac", synth.noise_bursts(3.0, 16000), 16000)
    code = main(["compare", str(hf_folder), str(tmp_path / "a.wav"), str(tmp_path / "b.flac"),
                 "--format", "markdown"])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "| features | 2x80x3000 |" in out and "| output (end to end) | 2x1500x32 |" in out
    assert "transformers" in out and "FAIL" not in out


def test_compare_exits_non_zero_above_tolerance(hf_folder, monkeypatch, capsys):
    monkeypatch.setattr(jaxspeech.compare, "TOLERANCE", 0.0)
    assert main(["compare", str(hf_folder)]) == 1
    assert "FAIL" in capsys.readouterr().out


def test_errors_are_one_line_not_a_traceback(tmp_path, capsys):
    assert main(["info", str(tmp_path / "missing")]) == 2
    assert "error: no such checkpoint" in capsys.readouterr().err


def test_generated_clips_are_speech_like_and_unequal():
    clips = jaxspeech.compare.default_clips(16000)
    assert len({c.shape[0] for c in clips}) == 2 and all(np.isfinite(c).all() for c in clips)
