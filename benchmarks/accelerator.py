"""Throughput on whatever device this machine has: jaxspeech vs PyTorch on the same device.

    python benchmarks/accelerator.py                                   # base, small, large-v3
    python benchmarks/accelerator.py --sizes tiny --batch 1 2 --seconds 2 --rounds 1 \
        --corpus-hours 0.01                                                    # CPU, small

For each Whisper encoder size (random weights of the real size, one HF folder both sides
load) and each batch of the sweep (by default doubling from 1 until the device's memory
runs out), three methods: the forward, AttnLRP, and integrated gradients with 32 steps
(``--methods``). jaxspeech runs jitted on ``jax.devices()[0]``; the reference runs
``transformers`` (forward), LXT's AttnLRP rules patched into it, and captum's IG, on CUDA
when torch sees one, else on the CPU. Printed per row: compile time (first call minus a
steady one, jaxspeech), steady wall seconds per batch, throughput in audio hours per hour
(audio seconds processed per wall second) for both, and the ratio PyTorch time / jaxspeech
time (> 1: jaxspeech faster). Which attention kernel ran is in the header
(``lrp.attention_implementation``; ``--attention`` or ``JAXSPEECH_ATTENTION`` overrides it:
on a TPU, ``--attention splash`` measures Pallas' flash kernel against XLA's default).

Both frameworks run in one process, so on a CPU their idle worker threads compete; the
CPU ratios of record come from ``benchmarks/forward.py`` and ``benchmarks/attribution.py``
(one process per framework). Tested on CPU only, at the smallest settings
(``tests/test_accelerator_benchmark.py``): no accelerator has run it yet.

After each size's sweep, one *corpus* row: ``jaxspeech.corpus.attribute_corpus`` (AttnLRP,
output-norm target) over ``--corpus-hours`` of files (``benchmarks/corpus.py``'s synthetic
corpus: 2-12 s clips, a third at 44.1 kHz flac, so decoding and resampling are in it),
files to shards on disk at the attnlrp sweep's fastest batch. Its columns: the first
batch (compilation included), the whole run's wall seconds, audio hours per hour, and the
seconds one hour of audio takes at that rate (the target: under 60 on a GPU). Its ratio
column compares it with LXT's throughput in the attnlrp row at the same batch, which reads
no files: a lower bound on the runner's lead.
"""

from __future__ import annotations

import argparse
import functools
import os
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import timed  # noqa: E402
from corpus import make_corpus  # noqa: E402

from jaxspeech.lrp import ATTENTION_ENV, ATTENTION_IMPLEMENTATIONS  # noqa: E402

# d_model, encoder layers, heads, mel bins (large-v3 has 128 mel bins)
SIZES = {"tiny": (384, 4, 6, 80), "base": (512, 6, 8, 80), "small": (768, 12, 12, 80),
         "medium": (1024, 24, 16, 80), "large-v3": (1280, 32, 20, 128)}
METHODS = ("forward", "attnlrp", "ig32")
FRAMES = slice(0, 50)  # the target: a direction in the last hidden state over the first second


def _is_out_of_memory(error: BaseException) -> bool:
    text = f"{type(error).__name__} {error}".lower()
    return any(s in text for s in ("resource_exhausted", "out of memory", "outofmemory",
                                   "cannot allocate", "failed to allocate"))


def _inputs(n_mels: int, frames: int, d_model: int, batch: int):
    rng = np.random.default_rng(0)
    return (rng.standard_normal((batch, n_mels, frames)).astype(np.float32),
            rng.standard_normal(d_model).astype(np.float32))


def jax_runner(folder: str, method: str, features: np.ndarray, direction: np.ndarray):
    import jax

    import jaxspeech as js

    m = js.load(folder)
    frames = np.arange(FRAMES.start, FRAMES.stop)
    target = js.targets.layer_direction(None, direction, frames=frames)
    x = jax.device_put(features)
    if method == "forward":
        forward = jax.jit(m.apply)
        return lambda: jax.block_until_ready(forward(m.params, x))
    kwargs = {"method": "attnlrp"} if method == "attnlrp" else \
        {"method": "integrated_gradients", "steps": 32, "batch_size": 4}
    return lambda: jax.block_until_ready(
        js.attribute(m, features=features, target=target, **kwargs).relevance)


def torch_runner(folder: str, method: str, features: np.ndarray, direction: np.ndarray, stack):
    import torch
    from transformers import WhisperModel

    device = "cuda" if torch.cuda.is_available() else "cpu"
    x = torch.from_numpy(features).to(device)
    d = torch.from_numpy(direction).to(device)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)

    def target(h):
        return h[:, FRAMES].mean(1) @ d

    if method == "forward":
        encoder = WhisperModel.from_pretrained(folder).encoder.eval().to(device)

        def run():
            with torch.inference_mode():
                encoder(x)
            sync()
        return run
    if method == "attnlrp":
        from jaxspeech.attribution.lxt import lxt_whisper_encoder

        encoder = stack.enter_context(lxt_whisper_encoder(folder)).to(device)

        def run():
            xi = x.clone().requires_grad_(True)
            target(encoder(xi).last_hidden_state).sum().backward()
            (xi * xi.grad).detach()
            sync()
        return run
    from captum.attr import IntegratedGradients

    encoder = WhisperModel.from_pretrained(folder, attn_implementation="eager").encoder.eval()
    encoder = encoder.to(device)
    ig = IntegratedGradients(lambda t: target(encoder(t).last_hidden_state))
    base = x.amin(dim=(1, 2), keepdim=True).expand_as(x).contiguous()

    def run():
        ig.attribute(x, baselines=base, n_steps=32, method="gausslegendre",
                     internal_batch_size=4 * x.shape[0])
        sync()
    return run


def measure(make, rounds: int) -> tuple[float, float]:
    """``(compile seconds, steady wall seconds)``: the first call minus a steady one; the
    median of ``rounds`` steady calls."""
    run = make()
    t0 = time.perf_counter()
    run()
    first = time.perf_counter() - t0
    steady = float(np.median([timed(run, pause=0.1)[0] for _ in range(rounds)]))
    return max(first - steady, 0.0), steady


def device_line() -> str:
    import jax
    import torch

    from jaxspeech import lrp

    dev = jax.devices()[0]
    tdev = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    return (f"# jax {jax.__version__} on {dev.platform} ({dev.device_kind}, {jax.device_count()} "
            f"device(s)); attention kernel {lrp.attention_implementation()}; torch "
            f"{torch.__version__} on {tdev}")


MEAN_CLIP_SECONDS = 7.0  # make_corpus draws clips of 2-12 s


def corpus_row(size: str, folder: str, hours: float, batch: int, torch_rate: float) -> str:
    """``attribute_corpus`` (AttnLRP) over ``hours`` of audio files, files to shards on disk;
    ``torch_rate``: LXT's audio seconds per second at ``batch`` (nan: not measured)."""
    from pathlib import Path

    import jaxspeech as js
    from jaxspeech.corpus import attribute_corpus

    model = js.load(folder)
    clips = max(1, round(hours * 3600 / MEAN_CLIP_SECONDS))
    with tempfile.TemporaryDirectory() as tmp:
        audio = make_corpus(Path(tmp) / "corpus", clips)
        summary = attribute_corpus(model, Path(tmp) / "corpus", Path(tmp) / "out",
                                   method="attnlrp", target="output-norm", batch_size=batch,
                                   progress=False)
    if summary.failures or summary.done != clips:
        raise RuntimeError(f"corpus run: {summary.done} of {clips} clips done; {summary.failures}")
    rate = audio / summary.seconds
    length = f"{audio / 3600:.2f} h" if audio >= 360 else f"{audio:.0f} s"
    return (f"| {size} | corpus attnlrp, {clips} clips, {length} | {batch} | "
            f"{summary.first_batch_seconds:.1f} | {summary.seconds:.1f} | {rate:.1f} | "
            f"{torch_rate:.1f} | {rate / torch_rate:.2f} |  1 h in {3600 / rate:.0f} s")


def sweep(sizes, batches, methods, seconds: float, rounds: int, torch_side: bool,
          layers: int | None = None, corpus_hours: float = 0.0):
    """Yield one table row per (size, method, batch); a batch sweep stops at the first
    out-of-memory on either side. Then, with ``corpus_hours``, the size's corpus row at the
    attnlrp sweep's fastest batch (the largest of ``batches`` when attnlrp was not swept)."""
    import contextlib

    from jaxspeech.data.reference_checkpoints import write_whisper

    frames = int(round(seconds * 100))  # log-mel frames at 100 per second
    for size in sizes:
        d, n_layers, heads, n_mels = SIZES[size]
        n_layers = layers or n_layers
        attnlrp = {}  # batch -> (jax, torch audio seconds per second)
        with tempfile.TemporaryDirectory() as folder:
            write_whisper(folder, (d, n_layers, heads), n_mels=n_mels,
                          max_source_positions=frames // 2, perturb=0.1)
            for method in methods:
                for batch in batches:
                    features, direction = _inputs(n_mels, frames, d, batch)
                    try:
                        run_args = (folder, method, features, direction)
                        j_compile, j_s = measure(functools.partial(jax_runner, *run_args),
                                                 rounds)
                        t_s = float("nan")
                        if torch_side:
                            with contextlib.ExitStack() as stack:
                                _, t_s = measure(
                                    functools.partial(torch_runner, *run_args, stack), rounds)
                    except Exception as error:  # noqa: BLE001 - only memory ends a sweep
                        if not _is_out_of_memory(error):
                            raise
                        yield f"| {size} | {method} | {batch} | out of memory | | | | |"
                        break
                    audio = batch * seconds
                    if method == "attnlrp":
                        attnlrp[batch] = (audio / j_s, audio / t_s)
                    yield (f"| {size} | {method} | {batch} | {j_compile:.1f} | {j_s:.3f} | "
                           f"{audio / j_s:.1f} | {audio / t_s:.1f} | {t_s / j_s:.2f} |")
            if corpus_hours > 0:
                batch = max(attnlrp, key=lambda b: attnlrp[b][0]) if attnlrp else max(batches)
                yield corpus_row(size, folder, corpus_hours, batch,
                                 attnlrp.get(batch, (0.0, float("nan")))[1])


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", nargs="+", default=["base", "small", "large-v3"], choices=SIZES)
    ap.add_argument("--batch", nargs="+", type=int, default=None,
                    help="batch sizes (default: 1, 2, 4, ... until out of memory)")
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    ap.add_argument("--seconds", type=float, default=30.0,
                    help="audio per item (Whisper's window is 30 s; shorter ones for smoke runs)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--layers", type=int, default=None,
                    help="encoder layers (default: the size's own; fewer for smoke runs)")
    ap.add_argument("--no-torch", action="store_true", help="jaxspeech only")
    ap.add_argument("--attention", choices=ATTENTION_IMPLEMENTATIONS, default=None,
                    help="jaxspeech's attention kernel (default: the platform's choice; "
                         "on a TPU, run once with xla and once with splash)")
    ap.add_argument("--corpus-hours", type=float, default=1.0,
                    help="audio the corpus row attributes from files (0: no corpus row)")
    args = ap.parse_args(argv)
    if not 0.04 <= args.seconds <= 30.0:
        raise SystemExit(f"--seconds {args.seconds}: expected between 0.04 and 30")
    if args.corpus_hours < 0:
        raise SystemExit(f"--corpus-hours {args.corpus_hours}: expected 0 (none) or more")
    if args.attention:
        os.environ[ATTENTION_ENV] = args.attention  # read when the models are traced
    batches = args.batch or [2 ** i for i in range(12)]
    print(device_line())
    print("| size | method | batch | jax compile s | jax s/batch | jax audio h/h | "
          "torch audio h/h | torch / jax |")
    print("|---|---|---|---|---|---|---|---|")
    for row in sweep(args.sizes, batches, args.methods, args.seconds, args.rounds,
                     not args.no_torch, args.layers, args.corpus_hours):
        print(row, flush=True)


if __name__ == "__main__":
    main()
