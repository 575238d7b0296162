"""Explaining every token of a transcript: one jaxspeech call vs a per-token loop in jaxspeech
vs LXT on transformers looping over the tokens, real Whisper weights, same CPU, same run.

    python benchmarks/transcript.py                          # real base, chunks 1, 4, 8
    python benchmarks/transcript.py --threads 1 --only contenders        # base: ~9.5 min
    python benchmarks/transcript.py --threads 1 --only chunks --chunks 1 8   # ~5 min
    python benchmarks/transcript.py --model tiny.en --repeats 3 --chunks 4

(the times: on a 2-core machine shared with other jobs, load ~9; split the run there to keep
each command under 10 minutes.)

The utterance: two shipped espeak-ng sentences joined (about 4.9 s; Whisper pads it to its
30 s window), teacher-forced on their texts (19 text tokens after the prompt, with tiny.en's
and base's tokenizers alike). Each contender gives every token's AttnLRP relevance over the
log-mel features, ``[n_tokens, 80, 3000]``, ``x · grad`` (no silence reference, as LXT has
none); the target of token j is its log-probability given the prefix.

1. ``one call``: :func:`jaxspeech.attribution.transcript.token_gradients`, the jitted core of
   ``js.attribute_transcript(..., method="attnlrp", reference=None)``: one teacher-forced
   forward, then the vjp mapped over the tokens ``chunk`` at a time (``--chunks``; the
   default 4 is the contender, the others show how time and memory grow with it). The first
   call is ``js.attribute_transcript`` itself (its relevance must equal the timed core's);
   its extra time over the timed calls is the compile time.
2. ``jax loop``: one ``jax.value_and_grad`` per token on the same model and rules, jitted
   once with the token index traced, called n times (a forward and a backward per token).
3. ``LXT loop``: :func:`jaxspeech.attribution.lxt.lxt_whisper_token_relevance`, LXT's rules
   patched into transformers' ``WhisperForConditionalGeneration`` on the same weights
   (:func:`jaxspeech.convert.whisper.hf_torch_model`, saved as an HF folder), one forward and
   one backward per token. Its time is the call's minus building the patched model (timed
   apart), so the loop alone is compared.

Each contender runs in its own fresh process (thread pools do not meet, and a process's peak
memory is its own), on ``--threads`` cores: a warm-up, then ``--repeats`` timed runs (median
wall and CPU time, all threads; on a shared machine the CPU times are the steady numbers, and
``--threads 1`` keeps torch's idle OpenMP threads from spinning into them). Memory: the
process's peak (VmHWM; compiling included) and one call's own, the timed runs' peak above the
resident memory before them (the peak is reset after the warm-up). The loop processes also
time one forward alone, so the per-token costs f (forward) and b (backward) are measured and
the bound on what one call can win over a loop, ``n (f + b) / (f + n b)``, is printed beside
the measured ratio.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import header, peak_rss_mb, timed  # noqa: E402

CLIPS = ("doctor_sentence_en_us", "weather_sentence_en_gb")
MAIN_CHUNK = 4  # attribute_transcript's default


def rss_mb() -> float:
    """This process's resident memory now (VmRSS), the baseline under a call's peak."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024.0
    raise RuntimeError("no VmRSS in /proc/self/status")


def timed_result(fn, repeats: int):
    """:func:`_common.timed` that also returns the last call's result (no extra run)."""
    last = {}
    wall, cpu = timed(lambda: last.update(result=fn()), repeats)
    return wall, cpu, last["result"]


def prepare(model: str, folder: str) -> dict:
    """Writes the inputs every contender reads into ``folder``: ``inputs.npz`` (features
    ``[1, 80, 3000]``, decoder sequence ``[1, S]`` = prompt + text, the text tokens) and an HF
    folder ``hf/`` holding the same weights for LXT. Returns what the report names."""
    import jaxspeech as js
    from jaxspeech import assets
    from jaxspeech.convert.whisper import hf_torch_model
    from jaxspeech.tokenizer import WhisperTokenizer

    m = js.load(assets.whisper_folder(model))
    clips = {c.id: c for c in assets.speech_clips()}
    wave = np.concatenate([clips[c].read() for c in CLIPS])[None]
    text = " ".join(clips[c].text for c in CLIPS)
    tok = WhisperTokenizer.from_model(m)
    tokens = tok.encode(" " + text)
    # the prompt attribute_transcript builds for a given text (language=None)
    seq = np.asarray([tok.sot_sequence() + [tok.no_timestamps] + tokens], np.int32)
    features = np.asarray(m.features(wave))
    np.savez(os.path.join(folder, "inputs.npz"), features=features, seq=seq,
             tokens=np.asarray(tokens, np.int32))
    hf_torch_model(m.params, m.config, m.extras.get("generation")).save_pretrained(
        os.path.join(folder, "hf"))
    return {"seconds": wave.shape[1] / 16000, "n": len(tokens), "text": text}


def _inputs(folder: str):
    with np.load(os.path.join(folder, "inputs.npz")) as z:
        return z["features"], z["seq"], [int(t) for t in z["tokens"]]


def reset_peak() -> float:
    """Returns what this process holds now and resets its VmHWM to it, so that the next peak is
    a call's own, not the compiler's: freed heap is handed back to the system first (glibc's
    ``malloc_trim``; XLA's and torch's CPU buffers come from malloc), else memory the warm-up
    freed would count as held and a later call would reuse it unseen."""
    import ctypes
    import gc

    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    with open("/proc/self/clear_refs", "w") as f:  # Linux: 5 resets VmHWM to VmRSS
        f.write("5")
    return rss_mb()


def child(side: str, model: str, folder: str, repeats: int, chunk: int, threads: int) -> dict:
    """One contender in this (fresh) process, on ``threads`` cores: a warm-up, then the timed
    runs. Returns the timings and memory (``peak_mb``: the process's peak, warm-up and
    compiling included; ``own_mb``: the timed calls' peak above the resident memory before
    them) and saves the relevance ``[n, 80, 3000]`` to ``folder/<side><chunk>.npy``."""
    cores = sorted(os.sched_getaffinity(0))
    if threads < len(cores):  # before jax / torch start their thread pools
        os.sched_setaffinity(0, cores[:threads])
    features, seq, tokens = _inputs(folder)
    n = len(tokens)
    start = seq.shape[1] - n
    out: dict = {}
    if side == "lxt":
        import torch

        from jaxspeech.attribution.lxt import lxt_whisper, lxt_whisper_token_relevance

        torch.set_num_threads(threads)
        hf = os.path.join(folder, "hf")

        def warm_up():
            lxt_whisper_token_relevance(hf, features, seq[:, :start + 1], 1)  # one token

        def run():
            return lxt_whisper_token_relevance(hf, features, seq, n)[0][0]

        def forward():  # one forward of the patched model, as in the loop (graph kept)
            with lxt_whisper(hf) as model:
                x = torch.from_numpy(features).requires_grad_(True)
                ids = torch.from_numpy(seq).long()
                return timed(lambda: model(input_features=x, decoder_input_ids=ids).logits,
                             repeats)

        def build():
            with lxt_whisper(hf):
                pass
    else:
        import jax
        import jax.numpy as jnp

        import jaxspeech as js
        from jaxspeech import assets
        from jaxspeech.attribution import methods
        from jaxspeech.attribution.transcript import token_gradients
        from jaxspeech.model import _module

        m = js.load(assets.whisper_folder(model))
        rules = methods.rules_for("attnlrp", None, None)
        x = jnp.asarray(features)
        if side == "one":
            args = (m.config, m.params, jnp.asarray(seq), jnp.asarray(seq[:, start:]),
                    jnp.full((1, n), -1, jnp.int32), False, x, rules, chunk, False)
            first_call = {}

            def warm_up():  # the public call; the timed core below must be the same program
                tr = js.attribute_transcript(m, features=features, tokens=[tokens],
                                             num_frames=[features.shape[-1]], method="attnlrp",
                                             reference=None, chunk=chunk)
                first_call.update(relevance=np.asarray(tr.relevance)[0],
                                  cache=token_gradients._cache_size())

            def run():
                return np.asarray(jax.block_until_ready(x[None] * token_gradients(*args)[0]))[:, 0]
        else:
            module = _module(m.config, rules, False)
            seq_j = jnp.asarray(seq)

            def target(x_, j):
                logits = module.apply({"params": m.params}, x_, tokens=seq_j)
                row = jax.lax.dynamic_index_in_dim(logits, start - 1 + j, axis=1, keepdims=False)
                token = jax.lax.dynamic_index_in_dim(seq_j, start + j, axis=1, keepdims=False)
                logp = jax.nn.log_softmax(row, axis=-1)
                return jnp.take_along_axis(logp, token[:, None], axis=-1).sum()

            @jax.jit
            def one_token(x_, j):  # j traced: one program for every token
                score, g = jax.value_and_grad(target)(x_, j)
                return x_ * g, score

            forward_only = jax.jit(lambda x_: module.apply({"params": m.params}, x_,
                                                           tokens=seq_j))

            def warm_up():
                jax.block_until_ready(one_token(x, 0))

            def run():
                rel = jax.block_until_ready([one_token(x, j)[0] for j in range(n)])
                return np.stack([np.asarray(r)[0] for r in rel])

            def forward():
                jax.block_until_ready(forward_only(x))  # compile
                return timed(lambda: jax.block_until_ready(forward_only(x)), repeats)

    t0 = time.perf_counter()
    warm_up()
    first = time.perf_counter() - t0
    warm_peak = peak_rss_mb()
    before = reset_peak()
    out["wall"], out["cpu"], relevance = timed_result(run, repeats)
    out["own_mb"] = peak_rss_mb() - before
    if side == "one":
        if token_gradients._cache_size() != first_call["cache"]:
            raise RuntimeError("the timed core compiled again: its arguments differ from "
                               "attribute_transcript's, so it is not the same call")
        same = float(np.abs(first_call["relevance"] - relevance).max())
        if same != 0.0:
            raise RuntimeError(f"the timed core differs from attribute_transcript by {same}")
        out["compile_s"] = first - out["wall"]
    else:
        out["forward_wall"], out["forward_cpu"] = forward()
    if side == "loop":
        out["compile_s"] = first - out["wall"] / n  # the warm-up also ran one token
    if side == "lxt":  # the loop alone: building the patched model is timed apart
        build_wall, build_cpu = timed(build, repeats)
        out.update(wall=out["wall"] - build_wall, cpu=out["cpu"] - build_cpu,
                   build_wall=build_wall)
    out["peak_mb"] = max(warm_peak, peak_rss_mb())
    np.save(os.path.join(folder, f"{side}{chunk if side == 'one' else ''}.npy"), relevance)
    return out


def run_child(side: str, args, folder: str, chunk: int = MAIN_CHUNK) -> dict:
    done = subprocess.run([sys.executable, os.path.abspath(__file__), "--child", side,
                           "--model", args.model, "--folder", folder, "--repeats",
                           str(args.repeats), "--chunk", str(chunk), "--threads", str(args.threads)],
                          capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(f"the {side} process failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def _rel(a, b) -> float:
    return float(np.abs(a - b).max() / np.abs(b).max())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="base", choices=["tiny.en", "base"])
    parser.add_argument("--repeats", type=int, default=1, help="timed runs per contender")
    parser.add_argument("--chunks", type=int, nargs="+", default=[1, 4, 8],
                        help="tokens per vmapped backward in the one call's sweep (4, "
                             "attribute_transcript's default, is the contender)")
    parser.add_argument("--only", nargs="+", default=["contenders", "chunks"],
                        choices=["contenders", "chunks"],
                        help="the three contenders, the one call's chunk sweep, or both")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1,
                        help="cores per contender (torch threads and the process's CPU affinity); "
                             "1 keeps torch's idle threads from spinning on a loaded machine")
    parser.add_argument("--child", choices=["one", "loop", "lxt"], help=argparse.SUPPRESS)
    parser.add_argument("--folder", help=argparse.SUPPRESS)
    parser.add_argument("--chunk", type=int, default=MAIN_CHUNK, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.model, args.folder, args.repeats, args.chunk,
                               args.threads)))
        return
    if args.threads < 1:
        parser.error("--threads must be at least 1")
    if min(args.chunks) < 1:
        parser.error("--chunks must be at least 1")
    chunks = sorted(set(args.chunks)) if "chunks" in args.only else []
    if "contenders" in args.only:  # the one call at attribute_transcript's default chunk
        chunks = sorted(set(chunks) | {MAIN_CHUNK})
    main_chunk = MAIN_CHUNK if "contenders" in args.only else chunks[0]

    print(header(f"Every token of a transcript explained (AttnLRP), real whisper-{args.model}"))
    with tempfile.TemporaryDirectory() as folder:
        info = prepare(args.model, folder)
        n = info["n"]
        mb = n * 80 * 3000 * 4 / 2**20
        print(f"# utterance: {info['seconds']:.2f} s ({' + '.join(CLIPS)}), {n} text tokens: "
              f"{info['text']!r}; relevance [{n}, 80, 3000] float32 = {mb:.0f} MB; each "
              f"contender in a fresh process on {args.threads} core(s), {args.repeats} timed "
              "run(s), median", flush=True)

        def relevance(key):
            return np.load(os.path.join(folder, f"{key}.npy"))

        one = run_child("one", args, folder, main_chunk)
        ref = relevance(f"one{main_chunk}")
        if "contenders" in args.only:
            print("\n| contender | wall s / utterance | CPU s / utterance | wall ratio / one call | "
                  "CPU ratio / one call | compile s | max rel diff vs one call | "
                  "process peak MB | one call's own MB |")
            print("|---|---|---|---|---|---|---|---|---|")
            print(_row(f"jaxspeech one call (chunk {MAIN_CHUNK})", one, one, 0.0), flush=True)
            loops = {}
            for side, name in (("loop", "jaxspeech per-token loop (jax.grad)"),
                               ("lxt", "LXT on transformers, per-token loop")):
                loops[side] = run_child(side, args, folder)
                print(_row(name, loops[side], one, _rel(relevance(side), ref)), flush=True)
            print("\nper-token costs, CPU s (f: one forward alone; b = loop / n - f, the backward "
                  "with its share of the loop's overhead):")
            for name, side in (("jax", "loop"), ("LXT", "lxt")):
                r = loops[side]
                f = r["forward_cpu"]
                b = r["cpu"] / n - f
                line = f"  {name}: f {f:.2f}, b {b:.2f} (b / f = {b / f:.1f})"
                if side == "loop":
                    bound = n * (f + b) / (f + n * b)
                    line += (f"; the most one saved forward can win over this loop, "
                             f"n (f + b) / (f + n b) = {bound:.2f}; measured {r['cpu'] / one['cpu']:.2f}")
                print(line, flush=True)
        if "chunks" in args.only:
            print("\n| one call, chunk | wall s | CPU s | compile s | process peak MB | "
                  f"one call's own MB | max rel diff vs chunk {main_chunk} |")
            print("|---|---|---|---|---|---|---|")
            sweep = {}
            for c in chunks:
                sweep[c] = one if c == main_chunk else run_child("one", args, folder, c)
                r = sweep[c]
                print(f"| {c} | {r['wall']:.1f} | {r['cpu']:.1f} | {r['compile_s']:.1f} | "
                      f"{r['peak_mb']:.0f} | {r['own_mb']:.0f} | "
                      f"{_rel(relevance(f'one{c}'), ref):.1e} |", flush=True)
            if len(chunks) > 1:
                lo, hi = sweep[chunks[0]], sweep[chunks[-1]]
                per = (hi["own_mb"] - lo["own_mb"]) / (chunks[-1] - chunks[0])
                print(f"\nmemory: the call's own peak grows by {per:.0f} MB per token in a chunk "
                      f"(chunk {chunks[0]} -> {chunks[-1]}): one forward's residuals + chunk x one "
                      f"backward's activations + the relevance ({mb:.0f} MB), whatever the "
                      "transcript's length")


def _row(name: str, r: dict, one: dict, diff: float) -> str:
    compile_s = f"{r['compile_s']:.1f}" if "compile_s" in r else "-"
    return (f"| {name} | {r['wall']:.1f} | {r['cpu']:.1f} | {r['wall'] / one['wall']:.2f} | "
            f"{r['cpu'] / one['cpu']:.2f} | {compile_s} | {diff:.1e} | {r['peak_mb']:.0f} | "
            f"{r['own_mb']:.0f} |")


if __name__ == "__main__":
    main()
