"""``jaxspeech demo``: the whole pipeline on a fresh machine, nothing downloaded.

For each model family it writes a random-weight checkpoint in the reference's own
format (an HF folder for Whisper and CLAP, a SpeechBrain folder for ECAPA) with
the reference library itself, proves parity on it (the ``compare`` table), and
explains speech-like clips with several methods, writing ``.npz`` + ``.png`` per
clip. The weights are random, so the heatmaps show the machinery, not meaning.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np

METHODS = ("attnlrp", "gradient_x_input", "integrated_gradients")


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


def run(out: str, families: tuple[str, ...] = ("whisper",), methods=METHODS) -> int:
    import soundfile as sf

    import jaxspeech as js
    from jaxspeech.attribution.plot import heatmap
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
            method_dir = out_dir / family / method
            method_dir.mkdir(parents=True, exist_ok=True)
            batch = np.asarray(res.relevance)
            for i in range(len(clips)):
                np.savez(method_dir / f"clip{i}.npz", relevance=batch[i],
                         score=np.asarray(res.score[i]), frames=np.asarray(res.frames()[i]))
                heatmap(str(method_dir / f"clip{i}.png"), clips[i], np.asarray(res.features[i]),
                        batch[i], time_axis=model.family.time_axis,
                        sample_rate=model.sample_rate,
                        hop_length=model.family.hop_length(model.config),
                        title=f"{family} (random weights) clip {i}: {method}, {res.target}")
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


def add_commands(sub) -> None:
    p = sub.add_parser("demo", help="parity + attribution on generated checkpoints (no downloads)",
                       description=__doc__)
    p.add_argument("--out", default="out/demo")
    p.add_argument("--families", nargs="+", default=None,
                   help=f"model families (default: {' '.join(WRITERS)})")
    p.set_defaults(fn=lambda args: run(args.out, tuple(args.families or WRITERS)))
