"""Make the shipped speech clips whose word spans are known, with espeak-ng.

    python scripts/make_speech_clips.py                 # writes jaxspeech/assets/speech/
    python scripts/make_speech_clips.py --out /tmp/sp   # somewhere else

Word-span clips: each word of a sentence is synthesised *alone* (its own espeak-ng
call), resampled to 16 kHz, and trimmed to its voiced span — the 10 ms frames from
the first to the last whose RMS is within ``TRIM_DB`` of the word's loudest frame.
The words are then joined with digital silence (a pause fixed per clip) and
``EDGE_S`` of silence at both ends, so each word's span in the clip is known to the
sample and nothing but silence lies between spans (what trimming cuts away holds
under 1e-4 of any word's energy: the spans hold the whole word). Whole-sentence clips (one
espeak-ng call per sentence, natural co-articulation) are made the same way but keep
no word spans (``words: null``); they are for transcription, not for span scoring.

Every clip has its own voice (accent and, by a ``+variant``, speaker) and speed.
Each clip is peak-normalised to ``PEAK`` and written as 16-bit mono FLAC; the spans,
texts and voices go into ``clips.json`` (times in seconds, ``sample / 16000``
exactly, so ``round(t * 16000)`` gives back the sample index), with the espeak-ng
version used. The output is deterministic: espeak-ng's synthesis, soxr's resampling
and the FLAC encoder have no randomness, so a rerun writes identical files
(``tests/test_speech_assets.py`` checks this when espeak-ng is installed).
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

import numpy as np
import soundfile as sf

from jaxspeech.audio import resample

OUT = Path(__file__).resolve().parents[1] / "jaxspeech" / "assets" / "speech"
RATE = 16000
EDGE_S = 0.3       # leading and trailing silence of every clip
FRAME_S = 0.010    # trimming resolution
TRIM_DB = 40.0     # a frame is voiced when its RMS is within 40 dB of the word's loudest
FADE_S = 0.002     # raised-cosine fade inside each trimmed edge: no click at the cut
PEAK = 0.5         # peak level of every clip (headroom; 16-bit keeps ~84 dB below it)

# (id, text, voice, words per minute, pause between words in seconds). The words
# avoid "a" (said alone, espeak-ng names the letter: /eɪ/). Numbers are spelled out.
WORD_CLIPS = [
    ("stella_rp", "Stella bought seven red apples today.", "en-gb-x-rp", 165, 0.20),
    ("taylor_en_gb", "Please call Taylor after the meeting.", "en-gb+f3", 170, 0.20),
    ("train_scotland", "The train leaves at nine fifteen.", "en-gb-scotland+f2", 155, 0.18),
    ("brother_en_us", "My brother lives in London now.", "en-us+m3", 165, 0.12),
    ("boxes_caribbean", "We found twelve blue boxes near the river.", "en-029", 165, 0.14),
    ("david_nyc", "David plays the piano every morning.", "en-us-nyc", 170, 0.20),
    ("window_lancaster", "Open the window and let fresh air in.", "en-gb-x-gbclan", 165, 0.16),
    ("emily_midlands", "Emily wrote three letters to her mother.", "en-gb-x-gbcwmd", 175, 0.15),
]
SENTENCE_CLIPS = [
    ("doctor_sentence_en_us", "The doctor will see you at four o'clock.", "en-us+m2", 160),
    ("weather_sentence_en_gb", "It will rain in the north tomorrow.", "en-gb+f2", 160),
    ("coffee_sentence_en_us", "Peter makes hot coffee every day.", "en-us+f3", 150),
]


def espeak_version() -> str:
    """The installed espeak-ng's version string (e.g. ``"1.51"``)."""
    out = subprocess.run(["espeak-ng", "--version"], check=True, capture_output=True, text=True)
    found = re.search(r"text-to-speech:\s*(\S+)", out.stdout)
    if not found:
        raise RuntimeError(f"cannot read the espeak-ng version from {out.stdout!r}")
    return found.group(1)


def synthesise(text: str, voice: str, speed: int, workdir: Path) -> np.ndarray:
    """espeak-ng's rendering of ``text`` -> float32 ``[samples]`` at 16 kHz."""
    wav = workdir / "say.wav"
    subprocess.run(["espeak-ng", "-v", voice, "-s", str(speed), "-w", str(wav), text],
                   check=True, capture_output=True)
    data, rate = sf.read(wav, dtype="float32")
    if data.ndim != 1 or data.size == 0:
        raise RuntimeError(f"espeak-ng gave no mono audio for {text!r} ({voice})")
    return resample(data, rate, RATE)


def voiced_span(wave: np.ndarray) -> tuple[int, int]:
    """``(start, end)`` samples of the frames from the first to the last voiced one."""
    hop = round(FRAME_S * RATE)
    n = len(wave) // hop
    rms = np.sqrt(np.mean(wave[:n * hop].reshape(n, hop).astype(np.float64) ** 2, axis=1))
    voiced = np.flatnonzero(rms >= rms.max() * 10 ** (-TRIM_DB / 20))
    return int(voiced[0] * hop), int((voiced[-1] + 1) * hop)


def trimmed(wave: np.ndarray) -> np.ndarray:
    """``wave`` cut to its voiced span, with a short fade inside both edges."""
    start, end = voiced_span(wave)
    out = wave[start:end].copy()
    k = round(FADE_S * RATE)
    ramp = (0.5 - 0.5 * np.cos(np.pi * (np.arange(k) + 0.5) / k)).astype(np.float32)
    out[:k] *= ramp
    out[-k:] *= ramp[::-1]
    return out


def words_of(text: str) -> list[str]:
    """The words espeak-ng says one by one: the text split on spaces, with the
    sentence punctuation stripped (inner apostrophes kept: ``o'clock``)."""
    return [w.strip(".,;:!?\"") for w in text.split()]


def write_clip(path: Path, wave: np.ndarray) -> None:
    # Exact zeros stay exact zeros in 16-bit PCM: the pauses are digital silence.
    sf.write(path, wave, RATE, format="FLAC", subtype="PCM_16")


def word_clip(text: str, voice: str, speed: int, pause: float, workdir: Path):
    """``(wave [samples], [(word, start_sample, end_sample)])``: words said alone, trimmed,
    joined by ``pause`` seconds of silence, ``EDGE_S`` at both ends, peak ``PEAK``."""
    edge, gap = round(EDGE_S * RATE), round(pause * RATE)
    pieces, spans, at = [np.zeros(edge, np.float32)], [], edge
    for i, word in enumerate(words_of(text)):
        if i:
            pieces.append(np.zeros(gap, np.float32))
            at += gap
        said = trimmed(synthesise(word, voice, speed, workdir))
        pieces.append(said)
        spans.append((word, at, at + len(said)))
        at += len(said)
    pieces.append(np.zeros(edge, np.float32))
    wave = np.concatenate(pieces)
    return (wave * (PEAK / np.abs(wave).max())).astype(np.float32), spans


def sentence_clip(text: str, voice: str, speed: int, workdir: Path) -> np.ndarray:
    """The sentence in one espeak-ng call, trimmed, ``EDGE_S`` at both ends, peak ``PEAK``."""
    edge = np.zeros(round(EDGE_S * RATE), np.float32)
    wave = np.concatenate([edge, trimmed(synthesise(text, voice, speed, workdir)), edge])
    return (wave * (PEAK / np.abs(wave).max())).astype(np.float32)


def make(out: Path) -> Path:
    """Write every clip and ``clips.json`` into ``out``; returns the manifest's path."""
    if shutil.which("espeak-ng") is None:
        raise SystemExit("espeak-ng is not on PATH (apt-get install espeak-ng)")
    out.mkdir(parents=True, exist_ok=True)
    entries = []
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        for clip_id, text, voice, speed, pause in WORD_CLIPS:
            wave, spans = word_clip(text, voice, speed, pause, workdir)
            write_clip(out / f"{clip_id}.flac", wave)
            entries.append(dict(id=clip_id, file=f"{clip_id}.flac", text=text, voice=voice, speed=speed,
                                pause=pause, sample_rate=RATE, samples=len(wave),
                                words=[dict(word=w, start=s / RATE, end=e / RATE) for w, s, e in spans]))
        for clip_id, text, voice, speed in SENTENCE_CLIPS:
            wave = sentence_clip(text, voice, speed, workdir)
            write_clip(out / f"{clip_id}.flac", wave)
            entries.append(dict(id=clip_id, file=f"{clip_id}.flac", text=text, voice=voice, speed=speed,
                                pause=None, sample_rate=RATE, samples=len(wave), words=None))
    manifest = dict(made_by="scripts/make_speech_clips.py", espeak_ng=espeak_version(),
                    trim_db=TRIM_DB, edge_s=EDGE_S, peak=PEAK, clips=entries)
    path = out / "clips.json"
    path.write_text(json.dumps(manifest, indent=1) + "\n")
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=OUT, help=f"folder to write (default {OUT})")
    args = parser.parse_args()
    path = make(args.out)
    clips = json.loads(path.read_text())["clips"]
    total = sum((args.out / c["file"]).stat().st_size for c in clips)
    for c in clips:
        print(f"{c['id']:24s} {c['samples'] / RATE:5.2f} s  {c['voice']:20s} {c['text']}")
    print(f"{len(clips)} clips, {total / 1024:.0f} KiB, manifest {path}")


if __name__ == "__main__":
    main()
