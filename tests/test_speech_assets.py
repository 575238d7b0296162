"""The shipped espeak-ng speech clips and their word spans (jaxspeech/assets/speech/).

These read the shipped files only (no espeak-ng needed), except the last test, which
regenerates them with scripts/make_speech_clips.py when espeak-ng is installed.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from jaxspeech.assets import SPEECH_DIR, SpeechClip, speech_clips

MANIFEST = json.loads((SPEECH_DIR / "clips.json").read_text())
CLIPS = speech_clips()
WORD_CLIPS = [c for c in CLIPS if c.words is not None]
RATE = 16000
LSB = 2.0**-15  # one step of the 16-bit PCM the clips are stored in


def samples(t: float) -> int:
    """A manifest time (seconds) as a sample index; they are written as ``sample / 16000``."""
    return round(t * RATE)


def test_manifest_lists_every_file_with_its_rate_and_length():
    entries = {e["id"]: e for e in MANIFEST["clips"]}
    assert len(entries) == len(MANIFEST["clips"]) == len(CLIPS)  # ids are unique
    assert sorted(p.name for p in SPEECH_DIR.glob("*.flac")) == sorted(e["file"] for e in entries.values())
    for clip in CLIPS:
        info = sf.info(clip.path)
        assert (info.samplerate, info.channels, info.subtype) == (RATE, 1, "PCM_16"), clip.id
        assert clip.sample_rate == RATE
        assert info.frames == entries[clip.id]["samples"], clip.id
        wave = clip.read()
        assert wave.dtype == np.float32 and wave.shape == (info.frames,)


def test_clips_come_in_several_voices_and_both_kinds():
    assert len(WORD_CLIPS) >= 8 and len(CLIPS) - len(WORD_CLIPS) >= 2
    assert len({c.voice for c in WORD_CLIPS}) == len(WORD_CLIPS)  # one voice per word clip
    assert {c.voice.split("+")[0] for c in CLIPS} >= {"en-us", "en-gb", "en-gb-scotland", "en-029"}
    assert all(isinstance(c, SpeechClip) for c in CLIPS)


def test_the_words_spell_the_text():
    for clip in WORD_CLIPS:
        spoken = re.sub(r"[^\w\s']", "", clip.text.lower()).split()
        assert [w.lower() for w, _, _ in clip.words] == spoken, clip.id


def test_word_spans_are_in_order_inside_the_clip_and_separated_by_the_pause():
    edge = samples(MANIFEST["edge_s"])
    entries = {e["id"]: e for e in MANIFEST["clips"]}
    for clip in WORD_CLIPS:
        n, gap = entries[clip.id]["samples"], samples(entries[clip.id]["pause"])
        spans = [(samples(s), samples(e)) for _, s, e in clip.words]
        for (_, s, e), (si, ei) in zip(clip.words, spans, strict=True):
            # the times are exact sample positions, not rounded ones
            assert abs(s * RATE - si) < 1e-6 and abs(e * RATE - ei) < 1e-6, clip.id
            assert 0 < si < ei < n, clip.id
        assert spans[0][0] == edge and n - spans[-1][1] == edge, clip.id
        # the script joins the words with a fixed pause: each next word starts exactly
        # `pause` after the previous one ends, so spans neither overlap nor touch
        pauses = [b[0] - a[1] for a, b in zip(spans[:-1], spans[1:], strict=True)]
        assert pauses == [gap] * (len(spans) - 1), clip.id


def test_speech_lies_inside_the_word_spans_and_only_silence_outside():
    for clip in WORD_CLIPS:
        wave = clip.read().astype(np.float64)
        inside = np.zeros(len(wave), bool)
        for word, s, e in clip.words:
            si, ei = samples(s), samples(e)
            inside[si:ei] = True
            rms = np.sqrt(np.mean(wave[si:ei] ** 2))
            # Outside the spans the script writes digital zeros, which 16-bit PCM and
            # FLAC (lossless) keep exactly, so the pause RMS is 0; even granting it one
            # quantisation step (the most any re-encoding could leave), each word must
            # be at least 10x louder.
            assert rms >= 10 * LSB, (clip.id, word, rms)
        assert np.all(wave[~inside] == 0.0), clip.id


def test_every_clip_has_silent_edges_and_the_stated_peak():
    edge = samples(MANIFEST["edge_s"])
    for clip in CLIPS:
        wave = clip.read()
        assert np.all(wave[:edge] == 0.0) and np.all(wave[-edge:] == 0.0), clip.id
        # peak-normalised by the script (PEAK); 16-bit storage moves it by at most 1 LSB
        assert abs(np.abs(wave).max() - MANIFEST["peak"]) <= LSB, clip.id
    assert any(c.words is None for c in CLIPS)


def test_a_manifest_entry_without_a_field_is_refused(tmp_path):
    entry = dict(MANIFEST["clips"][0])
    del entry["voice"]
    (tmp_path / "clips.json").write_text(json.dumps(dict(MANIFEST, clips=[entry])))
    with pytest.raises(ValueError, match=rf"{entry['id']}.*voice"):
        speech_clips(tmp_path)


def _espeak_version() -> str | None:
    if shutil.which("espeak-ng") is None:
        return None
    out = subprocess.run(["espeak-ng", "--version"], capture_output=True, text=True).stdout
    found = re.search(r"text-to-speech:\s*(\S+)", out)
    return found.group(1) if found else None


@pytest.mark.slow
def test_the_script_reproduces_the_shipped_clips(tmp_path):
    # This regenerates assets; it is not a reference check. Without espeak-ng (or with
    # another version of it, whose synthesis differs) there is nothing to regenerate with.
    version = _espeak_version()
    if version is None:
        pytest.skip("espeak-ng is not installed: the shipped clips cannot be regenerated here")
    if version != MANIFEST["espeak_ng"]:
        pytest.skip(f"espeak-ng {version} here, the clips were made with {MANIFEST['espeak_ng']}")
    script = Path(__file__).resolve().parents[1] / "scripts" / "make_speech_clips.py"
    subprocess.run([sys.executable, str(script), "--out", str(tmp_path)], check=True, capture_output=True)
    assert (tmp_path / "clips.json").read_bytes() == (SPEECH_DIR / "clips.json").read_bytes()
    for clip in CLIPS:
        # Compare the 16-bit samples, not the FLAC bytes: the container records the
        # libFLAC version that wrote it, which is not the script's doing.
        made, _ = sf.read(tmp_path / clip.path.name, dtype="int16")
        shipped, _ = sf.read(clip.path, dtype="int16")
        np.testing.assert_array_equal(made, shipped, err_msg=clip.id)
