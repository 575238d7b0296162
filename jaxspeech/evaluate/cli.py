"""``jaxspeech evaluate``: the table for audio files, and the curves as PNG."""

from __future__ import annotations

import json
from pathlib import Path

import jax
import numpy as np

from jaxspeech.evaluate.common import DEFAULT_METHODS
from jaxspeech.evaluate.table import evaluate

_CLI_HELP = """Faithfulness and sanity of attribution methods on audio files.

Prints a table (ABPC over frames and patches, MoRF/LeRF AUC, relevance mass in the
planted masks, pointing game, MPRT) and writes to --out: table.md, results.json,
curves_frames.png, curves_patches.png, mprt.png.

    jaxspeech evaluate CHECKPOINT a.wav b.wav --methods gradient_x_input attnlrp --out ev/
    jaxspeech evaluate --preset whisper-tiny a.wav --target layer-norm:layers.1.hidden_state --out ev/

CHECKPOINT: a checkpoint folder, init:PRESET (random weights, --seed), or 'default'
(the shipped model, explained for its head's decision unless --target says otherwise).
--masks FILE.npz: array 'masks', bool [files, ...] in the features' layout or
[files, frames], in the order of the audio files. Targets as `jaxspeech attribute`
(one for all files). The files are evaluated together: a file that cannot be read
stops the command before anything runs (exit status 2).
"""


def add_commands(sub) -> None:
    """Register ``jaxspeech evaluate`` on the CLI's subparsers."""
    import argparse

    p = sub.add_parser("evaluate", help="faithfulness (ABPC), localisation and MPRT of methods",
                       description=_CLI_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    from jaxspeech.checkpoints import add_dtype_argument
    from jaxspeech.cli import checkpoint_help

    p.add_argument("inputs", nargs="+", metavar="CHECKPOINT AUDIO",
                   help=checkpoint_help("CHECKPOINT") + "; then the audio files (with --preset: "
                        "audio files only)")
    p.add_argument("--preset", default=None, help="PRESET: the same as CHECKPOINT init:PRESET")
    p.add_argument("--seed", type=int, default=0, help="init: weights and MPRT randomisation")
    add_dtype_argument(p)
    p.add_argument("--methods", nargs="+", default=list(DEFAULT_METHODS),
                   help="attribution methods (space- or comma-separated)")
    p.add_argument("--target", default=None, help="what to explain (as `jaxspeech attribute`)")
    p.add_argument("--layer", default=None, help="Grad-CAM layer")
    p.add_argument("--masks", default=None, help=".npz with a bool array 'masks'")
    p.add_argument("--steps", type=int, default=20, help="perturbation steps (default 20)")
    p.add_argument("--patch", default="8x10", help="patch size BINSxFRAMES (default 8x10)")
    p.add_argument("--batch-size", type=int, default=4, help="perturbation steps run at once")
    p.add_argument("--no-mprt", action="store_true", help="skip the randomisation test")
    p.add_argument("--mprt-threshold", type=float, default=0.5)
    p.add_argument("--ssim", action="store_true", help="also report SSIM in the MPRT")
    p.add_argument("--format", choices=("text", "markdown"), default="text")
    p.add_argument("--out", required=True, help="output folder")
    p.set_defaults(fn=run)


def _load(args):
    """``(Checkpoint, audio files)`` from the positional inputs (and ``--preset``)."""
    from jaxspeech.checkpoints import INIT, resolve

    inputs = list(args.inputs)
    spec = f"{INIT}{args.preset}" if args.preset is not None else inputs.pop(0)
    return resolve(spec, seed=args.seed, dtype=args.compute_dtype), inputs


def _target(spec: str | None, ckpt):
    """One target for all files, parsed as ``attribute`` parses it; the checkpoint's own
    (the shipped head's decision) when none is given."""
    from jaxspeech.corpus import targets as corpus_targets

    if spec in (None, "default") and ckpt.target is not None:
        return ckpt.target
    parsed = corpus_targets.parse(spec, ckpt.model, checkpoint=ckpt.spec)
    if parsed.fixed is None:
        raise ValueError(f"target {spec!r} is read per item from a corpus; evaluate takes one "
                         "target for all files (use attribute-corpus for per-item targets)")
    return parsed.fixed


def run(args) -> int:
    """``jaxspeech evaluate``: print the table, write table.md, results.json and the PNGs."""
    from jaxspeech import audio
    from jaxspeech.corpus.cli import target_label

    ckpt, files = _load(args)
    model, checkpoint = ckpt.model, ckpt.spec
    if not files:
        raise ValueError("no audio files given")
    try:
        bins, frames = (int(v) for v in args.patch.lower().split("x"))
    except ValueError:
        raise ValueError(f"--patch must look like 8x10 (bins x frames), got {args.patch!r}") from None
    clips = [audio.read(f, model.sample_rate) for f in files]
    target = _target(args.target, ckpt)
    masks = None
    if args.masks is not None:
        with np.load(args.masks) as data:
            if "masks" not in data:
                raise ValueError(f"{args.masks} has no array 'masks' (it has {sorted(data)})")
            masks = data["masks"]
    methods_ = [m for spec in args.methods for m in spec.split(",") if m]
    table = evaluate(model, clips, target, methods_, masks=masks, steps=args.steps,
                     patch=(bins, frames), mprt=not args.no_mprt,
                     mprt_threshold=args.mprt_threshold, ssim=args.ssim,
                     key=jax.random.key(args.seed), batch_size=args.batch_size,
                     method_options={"gradcam": {"layer": args.layer}} if args.layer else None)
    table.info["target"] = target_label(args, ckpt)  # as the user named it, in captions and plots
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    print(table.markdown() if args.format == "markdown" else table.text())
    (out / "table.md").write_text(table.markdown() + "\n")
    result = table.to_dict()
    result["info"].update(checkpoint=checkpoint, audio=[str(f) for f in files])
    (out / "results.json").write_text(json.dumps(result, indent=1))
    written = table.plot(out)
    print(f"wrote {out / 'table.md'}, {out / 'results.json'}, "
          + ", ".join(str(p) for p in written))
    return 0
