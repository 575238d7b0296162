"""``jaxspeech attribute-corpus SOURCE --model M --method METHOD --target T --out DIR``.

SOURCE: a folder of audio (recursive: wav, flac, mp3, ogg), a manifest (.csv with a
header / .jsonl: path, optional id, label, reference, text, start, end), or tfds:NAME
(with --split and --data-dir; nothing is downloaded).

Results go to DIR in shards with a manifest of completed items; --resume completes an
interrupted run (nothing lost, nothing duplicated). A progress bar shows items/s and
the time left; the summary at the end lists failures with their reasons. Bad files are
skipped and logged, never stopping the run; the exit status is 1 if any item failed
(--allow-failures: 0 when at least one item is done), 2 for an error before the run.

Targets (--target): default, output-norm, predicted, class:N, layer-norm:LAYER,
cosine:AUDIO, text:LABEL, and per item from the source: label, reference, text.

Many devices: the batch is sharded over every local device. Many hosts: start one
process per host with --distributed (JAX finds TPU pods / SLURM itself) or with
--coordinator HOST:PORT --num-processes N --process-id I; each reads its own share.

    jaxspeech build-l2arctic L2ARCTIC_DIR --data-dir DIR   prepare a local L2-ARCTIC for tfds:l2_arctic
"""

from __future__ import annotations

import argparse
import logging
import sys

_METHOD_OPTIONS = ("layer", "steps", "epsilon", "gamma", "n_samples", "noise_level")


def add_run_options(p, *, batch_size: int) -> None:
    """The options ``attribute`` and ``attribute-corpus`` share: the method and its options,
    the target, batching and windows, resume, the exit status."""
    p.add_argument("--method", default="attnlrp", help="attribution method (default attnlrp)")
    p.add_argument("--target", default=None, help="what to explain (see above; default: default)")
    p.add_argument("--out", required=True, help="results folder")
    p.add_argument("--batch-size", type=int, default=batch_size,
                   help=f"rows per batch, all devices together (default {batch_size})")
    p.add_argument("--resume", action="store_true", help="skip items already complete in --out")
    p.add_argument("--window-seconds", type=float, default=None,
                   help="chunk long audio into windows (default: Whisper 30 s, CLAP 10 s, ECAPA none)")
    p.add_argument("--buckets", default=None,
                   help="ECAPA padded lengths in seconds, e.g. 2,4,8,16 (default 1,2,4,...,32)")
    p.add_argument("--layer", default=None, help="Grad-CAM layer")
    p.add_argument("--steps", type=int, default=None, help="integrated-gradients steps")
    p.add_argument("--epsilon", type=float, default=None, help="LRP epsilon")
    p.add_argument("--gamma", type=float, default=None, help="LRP gamma")
    p.add_argument("--n-samples", type=int, default=None, help="SmoothGrad samples")
    p.add_argument("--noise-level", type=float, default=None, help="SmoothGrad noise level")
    p.add_argument("--allow-failures", action="store_true",
                   help="exit 0 when at least one input was done (failures are still reported); "
                        "by default any failed input makes the exit status 1")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def run_arguments(args, ckpt) -> dict:
    """``attribute_corpus`` keywords from the shared options (:func:`add_run_options`) and
    the resolved checkpoint (whose own target, if it names one, is the default)."""
    target = args.target
    if target in (None, "default") and ckpt.target is not None:
        target = ckpt.target
    buckets = None if args.buckets is None else [float(b) for b in args.buckets.split(",")]
    options = {k: getattr(args, k) for k in _METHOD_OPTIONS if getattr(args, k) is not None}
    return dict(method=args.method, target=target, batch_size=args.batch_size,
                resume=args.resume, window_seconds=args.window_seconds, bucket_seconds=buckets,
                progress=not args.no_progress, checkpoint=ckpt.spec, **options)


def target_label(args, ckpt) -> str:
    """The target as the user named it (``output-norm``), or ``default (its name)``."""
    if args.target not in (None, "default"):
        return args.target
    import jaxspeech as js

    target = ckpt.target or js.targets.default(ckpt.model)
    if target.name == "layer_norm" and target.layer is None:  # spelled as --target spells it
        return "default (output-norm)"
    if target.name == "predicted_class":
        return "default (predicted)"
    return f"default ({target.name})"


def exit_status(summary, allow_failures: bool) -> int:
    """0 when every input was done; 1 when any failed, unless ``allow_failures`` and at
    least one was done (this run or a resumed one)."""
    if not summary.failures:
        return 0
    return 0 if allow_failures and summary.done + summary.already_done > 0 else 1


def add_commands(sub) -> None:
    from jaxspeech.checkpoints import add_dtype_argument
    from jaxspeech.cli import checkpoint_help

    p = sub.add_parser("attribute-corpus", help="attribute a whole corpus; sharded, resumable",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("source", help="folder, .csv/.jsonl manifest, or tfds:NAME")
    p.add_argument("--model", required=True, help=checkpoint_help("MODEL"))
    add_dtype_argument(p)
    add_run_options(p, batch_size=16)
    p.add_argument("--dtype", choices=("float32", "float16"), default="float32",
                   help="storage dtype of relevance")
    p.add_argument("--pool", choices=("none", "frames"), default="none",
                   help="frames: store relevance summed over all but time")
    p.add_argument("--shard-size", type=int, default=None, help="items per shard file")
    p.add_argument("--prefetch", type=int, default=2, help="batches read ahead")
    p.add_argument("--workers", type=int, default=4, help="threads reading audio")
    p.add_argument("--split", default="train", help="tfds split (default train)")
    p.add_argument("--data-dir", default=None, help="tfds data_dir")
    p.add_argument("--audio-key", default=None, help="tfds audio feature")
    p.add_argument("--label-key", default=None, help="tfds label feature")
    p.add_argument("--text-key", default=None, help="tfds text feature")
    p.add_argument("--text-embeddings", default=None,
                   help=".npz with texts [N] and embeddings [N, D] for text targets")
    p.add_argument("--distributed", action="store_true",
                   help="jax.distributed.initialize() with the cluster found by JAX")
    p.add_argument("--coordinator", default=None, help="HOST:PORT of process 0 (implies --distributed)")
    p.add_argument("--num-processes", type=int, default=None)
    p.add_argument("--process-id", type=int, default=None)
    p.set_defaults(fn=run)

    p = sub.add_parser("build-l2arctic", help="prepare a local L2-ARCTIC copy as tfds:l2_arctic")
    p.add_argument("manual_dir", help="the folder holding the speaker folders (ABA/, ASI/, ...)")
    p.add_argument("--data-dir", required=True, help="tfds data_dir to prepare it in")
    p.set_defaults(fn=build_l2arctic)


def run(args) -> int:
    # jax.distributed must start before anything else touches JAX's backends.
    if args.distributed or args.coordinator:
        from jaxspeech.corpus.sharding import initialize

        initialize(args.coordinator, args.num_processes, args.process_id)

    from jaxspeech.checkpoints import resolve
    from jaxspeech.corpus.run import attribute_corpus

    log_to_stderr()
    ckpt = resolve(args.model, dtype=args.compute_dtype)
    source_options = None
    if args.source.startswith("tfds:"):
        source_options = {"split": args.split, "data_dir": args.data_dir, "audio_key": args.audio_key,
                          "label_key": args.label_key, "text_key": args.text_key}
    summary = attribute_corpus(
        ckpt.model, args.source, args.out, dtype=args.dtype,
        pool=None if args.pool == "none" else args.pool, items_per_shard=args.shard_size,
        prefetch=args.prefetch, workers=args.workers, text_embeddings=args.text_embeddings,
        source_options=source_options, **run_arguments(args, ckpt))
    print(summary.text(), file=sys.stderr)
    return exit_status(summary, args.allow_failures)


class _TqdmStderr(logging.Handler):
    """Log lines above the progress bar (``tqdm.write``), to the current ``sys.stderr``."""

    def emit(self, record: logging.LogRecord) -> None:
        from tqdm import tqdm

        tqdm.write(self.format(record), file=sys.stderr)


def log_to_stderr() -> None:
    """The corpus log (skipped files and why) on stderr, above the progress bar."""
    log = logging.getLogger("jaxspeech.corpus")
    if not any(isinstance(h, _TqdmStderr) for h in log.handlers):
        handler = _TqdmStderr()
        handler.setFormatter(logging.Formatter("%(name)s: %(message)s"))
        log.addHandler(handler)
        log.setLevel(logging.INFO)
        log.propagate = False  # printed once, not again by a root handler


def build_l2arctic(args) -> int:
    from jaxspeech.corpus.l2arctic import build

    print(f"prepared {build(args.manual_dir, args.data_dir)}")
    return 0
