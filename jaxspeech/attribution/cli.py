"""``jaxspeech attribute CHECKPOINT AUDIO... --method --target --out DIR``.

Writes, per input file, ``<name>.npz`` (relevance, score, features, relevance pooled to
frames, and the run's configuration as JSON) and ``<name>.png`` (waveform above the
spectrogram with the relevance over it). Files are batched; a progress bar counts
them. A file that cannot be read is reported and skipped; what was written stays.

Targets (``--target``):
  output-norm                   norm of the model output (default; ECAPA with a
                                classifier: predicted)
  predicted                     each item's top class (ECAPA classifier)
  class:N                       class N's logit (ECAPA classifier)
  layer-norm:LAYER              norm of a layer's output, e.g. layer-norm:layers.3.hidden_state
  cosine:AUDIO                  cosine similarity to AUDIO's embedding (speaker verification)
  text:LABEL                    CLAP audio-text similarity to LABEL (text tower of the checkpoint)
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import numpy as np


def add_commands(sub) -> None:
    p = sub.add_parser("attribute", help="explain audio files; writes .npz and .png per file",
                       description=__doc__)
    p.add_argument("checkpoint", help="a checkpoint folder/file, or init:PRESET (random weights)")
    p.add_argument("audio", nargs="+", help="audio files")
    p.add_argument("--method", default="attnlrp", help="attribution method (default attnlrp)")
    p.add_argument("--target", default=None, help="what to explain (see above)")
    p.add_argument("--layer", default=None, help="Grad-CAM layer")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--no-png", action="store_true", help="write .npz only")
    p.set_defaults(fn=run)


def load_model(spec: str):
    import jaxspeech as js

    if spec.startswith("init:"):
        return js.init(spec[len("init:"):])
    return js.load(spec)


def parse_target(spec: str | None, model, checkpoint: str):
    import jaxspeech as js
    from jaxspeech import audio

    t = js.targets
    if spec is None:
        return t.default(model)
    kind, _, arg = spec.partition(":")
    if kind == "output-norm":
        return t.output_norm()
    if kind == "predicted":
        return t.predicted_class()
    if kind == "class":
        return t.class_logit(int(arg))
    if kind == "layer-norm":
        return t.layer_norm(arg)
    if kind == "cosine":
        reference = np.asarray(model(audio.read(arg, model.sample_rate)))[0]
        # a sequence output (Whisper [frames, d_model]) is pooled over frames, as the target
        # pools the explained item's output
        return t.cosine_similarity(reference.reshape(-1, reference.shape[-1]).mean(axis=0))
    if kind == "text":
        from jaxspeech.clap_text import clap_text_embeddings

        return t.text_similarity(clap_text_embeddings(checkpoint, [arg]), 0)
    raise ValueError(f"unknown target {spec!r}; see `jaxspeech attribute --help`")


def run(args) -> int:
    from tqdm import tqdm

    import jaxspeech as js
    from jaxspeech import audio
    from jaxspeech.attribution.plot import heatmap

    model = load_model(args.checkpoint)
    target = parse_target(args.target, model, args.checkpoint)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    run_config = {"checkpoint": args.checkpoint, "kind": model.kind, "method": args.method,
                  "target": args.target or target.name, "layer": args.layer,
                  "jaxspeech": js.__version__}
    failures = []
    with tqdm(total=len(args.audio), unit="file", desc=f"{args.method}") as bar:
        for start in range(0, len(args.audio), args.batch_size):
            names, clips = [], []
            for path in args.audio[start:start + args.batch_size]:
                try:
                    clips.append(audio.read(path, model.sample_rate))
                    names.append(path)
                except (OSError, ValueError) as e:
                    failures.append((path, str(e)))
                    bar.update(1)
            if not clips:
                continue
            res = js.attribute(model, clips, target=target, method=args.method, layer=args.layer)
            frames = np.asarray(res.frames())
            for i, path in enumerate(names):
                stem = out / Path(path).stem
                tmp = f"{stem}.tmp.npz"
                np.savez(tmp, relevance=np.asarray(res.relevance[i]), score=np.asarray(res.score[i]),
                         features=np.asarray(res.features[i]), frames=frames[i],
                         config=json.dumps({**run_config, "audio": os.path.abspath(path)}))
                os.replace(tmp, f"{stem}.npz")
                if not args.no_png:
                    heatmap(f"{stem}.png", clips[i], np.asarray(res.features[i]),
                            np.asarray(res.relevance[i]), time_axis=model.family.time_axis,
                            sample_rate=model.sample_rate,
                            hop_length=model.family.hop_length(model.config),
                            title=f"{Path(path).name}: {args.method}, target "
                                  f"{run_config['target']} = {float(res.score[i]):.4g}")
                bar.update(1)
    done = len(args.audio) - len(failures)
    print(f"attributed {done} of {len(args.audio)} files -> {out}")
    for path, why in failures:
        print(f"  skipped {path}: {why}", file=sys.stderr)
    return 0 if done else 1
