"""``jaxspeech attribute CHECKPOINT AUDIO... --method --target --out DIR``.

The corpus runner (:mod:`jaxspeech.corpus`) on the files given, so a file gets the same
stored result here as in ``attribute-corpus``: audio longer than the model's window is
cut into windows (Whisper 30 s, CLAP 10 s) and laid back end to end, ECAPA clips are
padded only to their length bucket (1, 2, 4 ... s) and masked, the relevance that fell on
padding is cropped off and reported as ``relevance_outside``, and each clip's true length
is recorded. DIR holds the run as a corpus results folder (``open_results(DIR)``;
``--resume`` completes it) and, per file:

  <name>.npz   relevance and features over the clip's own frames (the features' layout),
               frames (relevance per frame), score (mean over windows), window_scores,
               relevance_outside, relevance_outside_abs, n_samples, sample_rate, config (JSON)
  <name>.png   the waveform, the features and the relevance over them, colour bar in
               target units; the share of |R| that fell on padding in the title

Exit status: 0 when every file was attributed; 1 when any failed (a missing or unreadable
file is reported with its reason; what was written stays; --allow-failures: 0 when at
least one was done); 2 for an error before the run (checkpoint, target, options).

Targets (--target):
  default                       the checkpoint's own: the shipped model's head decision,
                                ECAPA with a classifier: predicted, else output-norm
  output-norm                   norm of the model output
  predicted                     each item's top class (ECAPA classifier)
  class:N                       class N's logit (ECAPA classifier)
  layer-norm:LAYER              norm of a layer's output, e.g. layer-norm:layers.3.hidden_state
  cosine:AUDIO                  cosine similarity to AUDIO's embedding (speaker verification)
  text:LABEL                    CLAP audio-text similarity to LABEL (text tower of the checkpoint)
"""

from __future__ import annotations

import argparse
import io
import json
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np

__all__ = ["add_commands", "run", "write_item", "output_names"]


def add_commands(sub) -> None:
    from jaxspeech.checkpoints import add_dtype_argument
    from jaxspeech.cli import checkpoint_help
    from jaxspeech.corpus.cli import add_run_options

    p = sub.add_parser("attribute", help="explain audio files; writes .npz and .png per file",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", help=checkpoint_help("CHECKPOINT"))
    add_dtype_argument(p)
    p.add_argument("audio", nargs="+", help="audio files")
    add_run_options(p, batch_size=8)
    p.add_argument("--no-png", action="store_true", help="write .npz only")
    p.set_defaults(fn=run)


def output_names(paths: Sequence[str]) -> dict[str, str]:
    """``{path: file name stem in --out}``; two inputs that would write the same name are
    refused before anything runs."""
    names: dict[str, str] = {}
    for path in paths:
        stem = Path(path).stem
        other = next((p for p, s in names.items() if s == stem and p != path), None)
        if other is not None:
            raise ValueError(f"{other} and {path} would both write {stem}.npz; "
                             "attribute them into different --out folders")
        names[path] = stem
    return names


def run(args) -> int:
    from jaxspeech.checkpoints import resolve
    from jaxspeech.corpus import batching, open_results
    from jaxspeech.corpus.cli import exit_status, log_to_stderr, run_arguments, target_label
    from jaxspeech.corpus.run import attribute_corpus

    names = output_names(args.audio)
    ckpt = resolve(args.checkpoint, dtype=args.compute_dtype)
    log_to_stderr()
    options = run_arguments(args, ckpt)
    summary = attribute_corpus(ckpt.model, list(args.audio), args.out, **options)
    layout = batching.layout_for(ckpt.model, window_seconds=options["window_seconds"],
                                 bucket_seconds=options["bucket_seconds"])
    results = open_results(args.out)
    label = target_label(args, ckpt)
    written = 0
    for path, stem in names.items():
        if path in results:
            write_item(Path(args.out), stem, results[path], results.config, ckpt.model, layout,
                       title=f"{Path(path).name}: {args.method}, target {label}",
                       png=not args.no_png)
            written += 1
    print(f"attributed {written} of {len(names)} files -> {args.out}")
    print(summary.text(), file=sys.stderr)
    return exit_status(summary, args.allow_failures)


def write_item(out: Path, stem: str, result: dict, run_config: dict, model, layout, *,
               title: str, png: bool = True) -> None:
    """``out/<stem>.npz`` (and ``.png``) of one stored result (``open_results(out)[id]``),
    each written atomically. The features are recomputed through the run's shapes
    (:func:`jaxspeech.corpus.run.item_features`) from the audio, read again."""
    from jaxspeech.corpus.run import item_features
    from jaxspeech.corpus.sources import read_audio
    from jaxspeech.corpus.store import write_atomic

    wave = read_audio(result["source"], model.sample_rate)
    features = item_features(model, layout, wave)
    relevance = result["relevance"]
    if features.shape != relevance.shape:  # the audio changed since the run
        raise ValueError(f"{result['source']}: features {features.shape} but stored relevance "
                         f"{relevance.shape}; the file changed after it was attributed")
    config = {**run_config, "id": result["id"], "audio": result["source"]}
    buf = io.BytesIO()
    np.savez(buf, relevance=relevance, features=features, frames=result["frames"],
             score=np.float32(result["score"]), window_scores=result["window_scores"],
             relevance_outside=np.float32(result["relevance_outside"]),
             relevance_outside_abs=np.float32(result["relevance_outside_abs"]),
             n_samples=np.int64(result["n_samples"]), sample_rate=np.int64(result["sample_rate"]),
             config=json.dumps(config, sort_keys=True, default=str))
    write_atomic(out / f"{stem}.npz", buf.getvalue())
    if not png:
        return
    from jaxspeech.attribution.plot import heatmap, padding_share

    windows = len(result["window_scores"])
    score = f"{result['score']:.4g}" + (f" (mean of {windows} windows)" if windows > 1 else "")
    fig = heatmap(None, wave, features, relevance, time_axis=model.family.time_axis,
                  sample_rate=model.sample_rate, hop_length=layout.hop, title=f"{title} = {score}",
                  outside=padding_share(relevance, result["relevance_outside_abs"]))
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    write_atomic(out / f"{stem}.png", buf.getvalue())

