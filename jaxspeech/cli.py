"""The ``jaxspeech`` command.

    jaxspeech convert SRC DST          any supported checkpoint -> jaxspeech (orbax) folder
    jaxspeech info PATH                kind, config and parameter count
    jaxspeech compare SRC [AUDIO...]   parity against the PyTorch reference; exit 1 above tolerance
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys


def _cmd_convert(args) -> int:
    import jaxspeech as js

    model = js.load(args.src)
    out = model.save(args.dst) if not args.overwrite else _save_overwrite(model, args.dst)
    print(f"converted {args.src} ({model.kind}, {model.n_params:,} params) -> {out}")
    return 0


def _save_overwrite(model, dst):
    from jaxspeech.convert import orbax_io

    return orbax_io.save(model, dst, overwrite=True)


def _cmd_info(args) -> int:
    import jaxspeech as js

    model = js.load(args.path)
    info = {"path": args.path, "kind": model.kind, "format": model.extras.get("format", "jaxspeech"),
            "sample_rate": model.sample_rate, "parameters": model.n_params,
            "config": dataclasses.asdict(model.config)}
    if args.json:
        print(json.dumps(info, indent=2))
    else:
        print(f"{args.path}: {model.kind} ({info['format']}), {model.n_params:,} parameters, "
              f"{model.sample_rate} Hz")
        for key, value in info["config"].items():
            print(f"  {key}: {value}")
    return 0


def _cmd_compare(args) -> int:
    import jax

    jax.config.update("jax_default_matmul_precision", "highest")
    from jaxspeech import audio
    from jaxspeech.compare import compare
    from jaxspeech.convert import load

    clips = None
    if args.audio:
        rate = load(args.src).sample_rate
        clips = [audio.read(p, rate) for p in args.audio]
    report = compare(args.src, clips)
    print(report.table(args.format))
    return 0 if report.ok else 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="jaxspeech", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("convert", help="convert a checkpoint to a jaxspeech (orbax) folder")
    p.add_argument("src", help="HF folder, OpenAI .pt, SpeechBrain folder or jaxspeech folder")
    p.add_argument("dst", help="output folder (e.g. checkpoints/whisper-base)")
    p.add_argument("--overwrite", action="store_true", help="replace DST if it exists")
    p.set_defaults(fn=_cmd_convert)

    p = sub.add_parser("info", help="kind, config and parameter count of a checkpoint")
    p.add_argument("path")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(fn=_cmd_info)

    p = sub.add_parser("compare", help="parity of jaxspeech against the PyTorch reference")
    p.add_argument("src", help="the original checkpoint (HF / OpenAI / SpeechBrain)")
    p.add_argument("audio", nargs="*", help="audio files (default: generated speech-like clips)")
    p.add_argument("--format", choices=("text", "markdown"), default="text")
    p.set_defaults(fn=_cmd_compare)

    _add_extra_commands(sub)
    return parser


def _add_extra_commands(sub) -> None:
    """Commands defined by other modules (attribution, corpus runs, evaluation)."""
    import importlib

    for name in ("jaxspeech.attribution.cli", "jaxspeech.demo", "jaxspeech.corpus.cli",
                 "jaxspeech.probe", "jaxspeech.evaluate"):
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as e:
            if e.name is None or not name.startswith(e.name):
                raise  # a missing dependency inside the module, not the module itself
            continue
        module.add_commands(sub)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.fn(args)
    except (FileNotFoundError, FileExistsError, ValueError) as e:
        print(f"jaxspeech {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
