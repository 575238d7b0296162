"""Corpus throughput: items/s on 1 vs 8 devices, and what loading + writing add to compute.

    python benchmarks/corpus.py                                # whisper-tiny, 48 clips, batch 16
    python benchmarks/corpus.py --model whisper-base --items 96 --devices 1 8 --method attnlrp
    python benchmarks/corpus.py --config encoder_layers=2 --config d_model=128 \
        --config encoder_attention_heads=2 --config encoder_ffn_dim=512   # the CPU numbers

Each device count runs in its own process, because the device count is fixed when JAX
starts (on a CPU machine ``--xla_force_host_platform_device_count=N`` simulates N devices;
on a GPU/TPU host the real ones are used and ``--devices`` only labels the row). In
each process:

1. *compile*: one batch through the front end and the attribution, timed apart;
2. *compute*: every batch of the corpus, already decoded and batched in memory, through
   the same sharded step (:class:`jaxspeech.corpus.run.Attributor`), blocking on the
   results (best of ``--repeats``);
3. *pipeline*: :func:`jaxspeech.corpus.attribute_corpus` from the folder of files to shards
   on disk: decoding, resampling, bucketing, the prefetch thread, the devices, stitching
   and writing (best of ``--repeats``, warm).

I/O overhead = pipeline / compute - 1; "load alone" is the time to decode and resample
the corpus in one thread with nothing else running (what prefetching has to hide). The
corpus is synthetic speech-like audio written as 16 kHz wav and 44.1 kHz flac (so that
reading includes decoding and resampling), 2-12 s per clip, made once in a temporary folder.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def make_corpus(folder: Path, n: int, seed: int = 0) -> float:
    import numpy as np
    import soundfile as sf

    from jaxspeech.data import synth

    rng = np.random.default_rng(seed)
    total = 0.0
    for i in range(n):
        seconds = float(rng.uniform(2.0, 12.0))
        rate = 44100 if i % 3 == 0 else 16000
        voice = synth.harmonic_sweep(seconds, rate, f0=(90 + 5 * (i % 20), 180 + 7 * (i % 20)), seed=i)
        wave = voice + synth.noise_bursts(seconds, rate, seed=i)[: voice.shape[0]] * 0.5
        sub = folder / f"spk{i % 4}"
        sub.mkdir(parents=True, exist_ok=True)
        sf.write(sub / f"utt{i:04d}.{'flac' if rate == 44100 else 'wav'}", wave, rate)
        total += seconds
    return total


def child(args) -> dict:
    import jax
    import numpy as np

    import jaxspeech as js
    from jaxspeech.corpus import attribute_corpus, batching, open_source, sharding
    from jaxspeech.corpus import targets as corpus_targets
    from jaxspeech.corpus.run import Attributor

    overrides = {k: int(v) if v.lstrip("-").isdigit() else v
                 for k, v in (kv.split("=", 1) for kv in args.config)}
    model = js.init(args.model, seed=0, **overrides)
    layout = batching.layout_for(model)
    mesh = sharding.local_mesh()
    rows = sharding.round_batch(args.batch_size, mesh)
    spec = corpus_targets.parse(args.target, model, layout=layout)
    t0 = time.perf_counter()
    items = list(open_source(args.corpus).items(model.sample_rate))
    load_s = time.perf_counter() - t0  # decode + resample, one thread, nothing overlapped
    batcher = batching.Batcher(layout, rows)
    batches = []
    for key, item in enumerate(items):
        waves = batching.split_windows(item.wave, layout.window, layout.min_samples)
        batches += batcher.add([batching.Row(key, k, len(waves), w, item.fields)
                                for k, w in enumerate(waves)])
    batches += batcher.flush()
    step = Attributor(model, layout, mesh, args.method, spec, rows)

    t0 = time.perf_counter()
    jax.block_until_ready(step(batches[0]))
    compile_s = time.perf_counter() - t0

    compute, pipeline = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.repeats):  # interleaved, so drift in machine load hits both alike
            t0 = time.perf_counter()
            jax.block_until_ready([step(b) for b in batches])
            compute.append(time.perf_counter() - t0)
            summary = attribute_corpus(model, args.corpus, Path(tmp) / f"out{r}", method=args.method,
                                       target=args.target, batch_size=args.batch_size,
                                       prefetch=args.prefetch, workers=args.workers, progress=False)
            assert summary.done == len(items) and not summary.failures
            pipeline.append(summary.seconds)
    audio = sum(i.wave.shape[0] for i in items) / model.sample_rate
    return {"devices": mesh.size, "platform": jax.devices()[0].platform, "items": len(items),
            "rows": int(sum(len(b.rows) for b in batches)), "batches": len(batches),
            "batch": rows, "audio_s": audio, "load_s": load_s, "compile_s": compile_s,
            "compute_s": min(compute),
            "pipeline_s": min(pipeline), "compute_all": compute, "pipeline_all": pipeline,
            "mean_abs_check": float(np.abs(np.asarray(step(batches[0])[1])).mean())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="whisper-tiny")
    parser.add_argument("--config", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config field of the preset (repeatable)")
    parser.add_argument("--method", default="attnlrp")
    parser.add_argument("--target", default="output-norm")
    parser.add_argument("--items", type=int, default=48)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--prefetch", type=int, default=2)
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--devices", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--corpus", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print("RESULT " + json.dumps(child(args)), flush=True)
        return

    with tempfile.TemporaryDirectory() as tmp:
        corpus = Path(tmp) / "corpus"
        seconds = make_corpus(corpus, args.items)
        print(f"corpus: {args.items} clips, {seconds:.0f} s of audio; model {args.model} "
              f"{' '.join(args.config)}, "
              f"method {args.method}, target {args.target}, batch {args.batch_size}, "
              f"prefetch {args.prefetch}", file=sys.stderr)
        rows = []
        for n in args.devices:
            env = dict(os.environ)
            env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") +
                                f" --xla_force_host_platform_device_count={n}").strip()
            cmd = [sys.executable, __file__, "--child", "--corpus", str(corpus)] + [
                a for a in sys.argv[1:] if a != "--child"]
            proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
            lines = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
            if proc.returncode or not lines:
                sys.exit(f"devices={n} failed:\n{proc.stderr[-4000:]}")
            rows.append(json.loads(lines[-1][len("RESULT "):]))
            print(json.dumps(rows[-1]), file=sys.stderr)

    print("\n| devices | items | batch | compile s | load alone s | compute s (items/s) | "
          "pipeline s (items/s) | audio s/s | I/O overhead |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        overhead = r["pipeline_s"] / r["compute_s"] - 1
        print(f"| {r['devices']} ({r['platform']}) | {r['items']} ({r['rows']} rows) | {r['batch']} | "
              f"{r['compile_s']:.1f} | {r['load_s']:.1f} | "
              f"{r['compute_s']:.1f} ({r['items'] / r['compute_s']:.2f}) | "
              f"{r['pipeline_s']:.1f} ({r['items'] / r['pipeline_s']:.2f}) | "
              f"{r['audio_s'] / r['pipeline_s']:.1f} | {100 * overhead:+.1f}% |")


if __name__ == "__main__":
    main()
