"""The ``jaxspeech`` command.

    jaxspeech convert SRC DST          any checkpoint (or default, init:PRESET) -> jaxspeech folder
    jaxspeech info PATH                kind, config and parameter count
    jaxspeech info --presets           the presets init:PRESET takes
    jaxspeech compare SRC [AUDIO...]   parity against the PyTorch reference; exit 1 above tolerance

A checkpoint argument is a folder or file, 'default' (the shipped planted-evidence
model) or init:PRESET (random weights); see jaxspeech.checkpoints.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys


def _cmd_convert(args) -> int:
    from jaxspeech.checkpoints import DEFAULT, resolve
    from jaxspeech.convert import orbax_io

    model = resolve(args.src, seed=args.seed).model
    out = orbax_io.save(model, args.dst, overwrite=args.overwrite)
    print(f"converted {args.src} ({model.kind}, {model.n_params:,} params) -> {out}")
    if args.src == DEFAULT:  # the folder holds the encoder; its head stays a probe file
        print("  its classification head is a linear probe: jaxspeech.assets.default_head()")
    return 0


def _cmd_info(args) -> int:
    if args.presets:
        return _print_presets(args.json)
    if args.path is None:
        raise ValueError("give a checkpoint, or --presets to list the presets")
    from jaxspeech.checkpoints import resolve

    model = resolve(args.path).model
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


def _print_presets(as_json: bool) -> int:
    import jaxspeech as js
    from jaxspeech.model import family_of

    table = js.presets()
    if as_json:
        print(json.dumps({name: {"family": family_of(cfg).name, **dataclasses.asdict(cfg)}
                          for name, cfg in table.items()}, indent=2))
        return 0
    width = max(map(len, table))
    print("presets (random weights: init:PRESET; e.g. jaxspeech convert init:whisper-tiny DIR):")
    for name, cfg in table.items():
        print(f"  {name:<{width}}  {family_of(cfg).name}")
    return 0


def _cmd_compare(args) -> int:
    import jax

    jax.config.update("jax_default_matmul_precision", "highest")
    from jaxspeech import audio
    from jaxspeech.checkpoints import require_original
    from jaxspeech.compare import compare
    from jaxspeech.convert import load

    require_original(args.src, "compare")
    clips = None
    if args.audio:
        rate = load(args.src).sample_rate
        clips = [audio.read(p, rate) for p in args.audio]
    report = compare(args.src, clips)
    print(report.table(args.format))
    return 0 if report.ok else 1


def checkpoint_help(what: str) -> str:
    """The help of a checkpoint argument, presets included (argparse %-formats help)."""
    from jaxspeech.checkpoints import help_text

    return help_text(what).replace("%", "%%")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="jaxspeech", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("convert", help="convert a checkpoint to a jaxspeech (orbax) folder")
    p.add_argument("src", help=checkpoint_help("SRC"))
    p.add_argument("dst", help="output folder (e.g. checkpoints/whisper-base)")
    p.add_argument("--overwrite", action="store_true", help="replace DST if it exists")
    p.add_argument("--seed", type=int, default=0, help="seed of init:PRESET's random weights")
    p.set_defaults(fn=_cmd_convert)

    p = sub.add_parser("info", help="kind, config and parameter count of a checkpoint")
    p.add_argument("path", nargs="?", help=checkpoint_help("PATH"))
    p.add_argument("--presets", action="store_true", help="list the presets init:PRESET takes")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(fn=_cmd_info)

    p = sub.add_parser("compare", help="parity of jaxspeech against the PyTorch reference")
    p.add_argument("src", help="the original checkpoint (HF / OpenAI / SpeechBrain); default "
                               "and init:PRESET have no PyTorch original")
    p.add_argument("audio", nargs="*", help="audio files (default: generated speech-like clips)")
    p.add_argument("--format", choices=("text", "markdown"), default="text")
    p.set_defaults(fn=_cmd_compare)

    _add_extra_commands(sub)
    return parser


def _add_extra_commands(sub) -> None:
    """Commands defined by other modules (attribution, corpus runs, evaluation)."""
    import importlib

    for name in ("jaxspeech.attribution.cli", "jaxspeech.demo", "jaxspeech.corpus.cli",
                 "jaxspeech.probe", "jaxspeech.evaluate", "jaxspeech.transcribe",
                 "jaxspeech.attribution.transcript_cli", "jaxspeech.evaluate.words"):
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
