"""Attribution speed: jaxspeech vs the PyTorch references on the same weights, same run.

    python benchmarks/attribution.py                         # everything below, issue sizes
    python benchmarks/attribution.py --only whisper --config whisper-tiny --batch 2
    python benchmarks/attribution.py --only ig ecapa

Sections:
- ``whisper``: AttnLRP on a Whisper encoder (whisper-base, 30 s, batch 8) — jaxspeech
  ``js.attribute(method="attnlrp")`` vs LXT's rules patched into the ``transformers``
  encoder (:mod:`jaxspeech.attribution.lxt`); plus one jaxspeech forward of the same batch,
  for the cost of an attribution relative to a forward (the floor is about 3: a forward
  and a backward), and the peak resident memory of one call of each side, each measured
  in a fresh process.
- ``ig``: integrated gradients, 32 Gauss–Legendre steps, 4 steps per batch, on
  whisper-tiny (30 s, batch 1) — jaxspeech vs captum ``IntegratedGradients``
  (``internal_batch_size`` 4) on the ``transformers`` encoder.
- ``ecapa``: ε and γ LRP on ECAPA-TDNN (spkrec size) vs zennit on SpeechBrain
  (``benchmarks/attribution_ecapa.py``).

Random weights come from :mod:`jaxspeech.data.reference_checkpoints`; both frameworks
load the same folder. The target is a direction in the last hidden state averaged over
frames 100-199. Each framework is warmed up (jaxspeech's compile time is reported
apart), then the two are timed in alternating rounds; medians of wall time and of
CPU time (all threads) are reported as seconds per item, with ratios PyTorch /
jaxspeech (> 1: jaxspeech faster). The relevance of both is compared as a check.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import header, peak_rss_mb, timed  # noqa: E402

FRAMES = slice(100, 200)


def _inputs(d_model: int, batch: int, n_mels: int = 80):
    rng = np.random.default_rng(0)
    features = rng.standard_normal((batch, n_mels, 3000)).astype(np.float32)
    direction = rng.standard_normal(d_model).astype(np.float32)
    return features, direction


def _rel(a, b) -> float:
    return float(np.abs(np.asarray(a) - b).max() / np.abs(b).max())


def whisper_lrp(config: str, batch: int, rounds: int) -> str:
    import jax
    import torch

    import jaxspeech as js
    from jaxspeech.attribution.lxt import lxt_whisper_encoder, lxt_whisper_relevance
    from jaxspeech.data.reference_checkpoints import write_whisper

    with tempfile.TemporaryDirectory() as folder:
        write_whisper(folder, config, perturb=0.1)
        m = js.load(folder)
        features, direction = _inputs(m.config.d_model, batch)
        target = js.targets.layer_direction(None, direction, frames=np.arange(100, 200))
        d = torch.from_numpy(direction)

        def ours():
            return jax.block_until_ready(
                js.attribute(m, features=features, target=target, method="attnlrp").relevance)

        x = jax.numpy.asarray(features)
        forward = jax.jit(m.apply)
        compile_s, _ = timed(ours, pause=0)
        timed(lambda: jax.block_until_ready(forward(m.params, x)), pause=0)
        with lxt_whisper_encoder(folder) as encoder:
            def theirs():
                return lxt_whisper_relevance(folder, features, lambda h: h[:, FRAMES].mean(1) @ d,
                                             encoder=encoder)

            ref, _ = theirs()  # warm-up, and the agreement check
            agree = _rel(ours(), ref)
            rows = {"jax": [], "torch": [], "fwd": []}
            for _ in range(rounds):
                rows["jax"].append(timed(ours))
                rows["torch"].append(timed(theirs))
                rows["fwd"].append(timed(lambda: jax.block_until_ready(forward(m.params, x))))
    (jw, jc), (tw, tc), (fw, fc) = (np.median(rows[k], axis=0) for k in ("jax", "torch", "fwd"))
    peak_jax, peak_lxt = peak_memory(config, batch)
    return (f"| AttnLRP {config}, 30 s | {batch} | {jw / batch:.2f} | {tw / batch:.2f} | {tw / jw:.2f} "
            f"| {tc / jc:.2f} | {jw / fw:.2f} ({jc / fc:.2f} CPU) | {compile_s - jw:.1f} | {agree:.1e} "
            f"| {peak_jax:.0f} / {peak_lxt:.0f} |")


def peak_memory(config: str, batch: int) -> tuple[float, float]:
    """Peak resident MB of one AttnLRP call, ``(jaxspeech, LXT)``, each in a fresh process
    (a process's peak cannot be reset); both write the same checkpoint first."""
    def child(side):
        out = subprocess.run([sys.executable, os.path.abspath(__file__), "--peak-child", side,
                              "--config", config, "--batch", str(batch)],
                             check=True, capture_output=True, text=True).stdout
        return float(out.split("peak MB")[-1])

    return child("jax"), child("lxt")


def _peak_child(side: str, config: str, batch: int) -> None:
    import jax
    import torch

    import jaxspeech as js
    from jaxspeech.attribution.lxt import lxt_whisper_relevance
    from jaxspeech.data.reference_checkpoints import write_whisper

    with tempfile.TemporaryDirectory() as folder:
        write_whisper(folder, config, perturb=0.1)
        m = js.load(folder)
        features, direction = _inputs(m.config.d_model, batch)
        if side == "jax":
            target = js.targets.layer_direction(None, direction, frames=np.arange(100, 200))
            jax.block_until_ready(
                js.attribute(m, features=features, target=target, method="attnlrp").relevance)
        else:
            d = torch.from_numpy(direction)
            lxt_whisper_relevance(folder, features, lambda h: h[:, FRAMES].mean(1) @ d)
    print(f"peak MB {peak_rss_mb():.0f}")


def integrated_gradients(config: str, batch: int, rounds: int, steps: int = 32) -> str:
    import jax
    import torch
    from captum.attr import IntegratedGradients
    from transformers import WhisperModel

    import jaxspeech as js
    from jaxspeech.data.reference_checkpoints import write_whisper

    with tempfile.TemporaryDirectory() as folder:
        write_whisper(folder, config, perturb=0.1)
        m = js.load(folder)
        encoder = WhisperModel.from_pretrained(folder, attn_implementation="eager").encoder.eval()
    features, direction = _inputs(m.config.d_model, batch)
    target = js.targets.layer_direction(None, direction, frames=np.arange(100, 200))
    d = torch.from_numpy(direction)
    x = torch.from_numpy(features)
    base = features.min(axis=(1, 2), keepdims=True) * np.ones_like(features)

    def ours():
        return jax.block_until_ready(js.attribute(
            m, features=features, target=target, method="integrated_gradients", steps=steps,
            batch_size=4).relevance)

    ig = IntegratedGradients(lambda t: encoder(t).last_hidden_state[:, FRAMES].mean(1) @ d)

    def theirs():
        return ig.attribute(x, baselines=torch.from_numpy(base), n_steps=steps, method="gausslegendre",
                            internal_batch_size=4 * batch).detach().numpy()

    compile_s, _ = timed(ours, pause=0)
    agree = _rel(ours(), theirs())
    rows = {"jax": [], "torch": []}
    for _ in range(rounds):
        rows["jax"].append(timed(ours))
        rows["torch"].append(timed(theirs))
    (jw, jc), (tw, tc) = (np.median(rows[k], axis=0) for k in ("jax", "torch"))
    return (f"| IG {steps} steps {config}, 30 s | {batch} | {jw / batch:.2f} | {tw / batch:.2f} | "
            f"{tw / jw:.2f} | {tc / jc:.2f} | | {compile_s - jw:.1f} | {agree:.1e} | |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", nargs="+", default=["whisper", "ig", "ecapa"],
                        choices=["whisper", "ig", "ecapa"])
    parser.add_argument("--config", default="whisper-base", help="Whisper size for AttnLRP")
    parser.add_argument("--batch", type=int, default=8, help="batch for AttnLRP")
    parser.add_argument("--ig-config", default="whisper-tiny")
    parser.add_argument("--ig-batch", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--peak-child", choices=["jax", "lxt"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.peak_child:
        _peak_child(args.peak_child, args.config, args.batch)
        return

    import torch

    torch.set_num_threads(os.cpu_count() or 1)
    if {"whisper", "ig"} & set(args.only):
        print(header("Attribution vs PyTorch references"))
        print("| method, model | batch | jaxspeech s/item | PyTorch s/item | ratio | CPU-time ratio | "
              "attribution / forward | jax compile s | max rel diff | peak MB jax / torch |")
        print("|---|---|---|---|---|---|---|---|---|---|", flush=True)
    if "whisper" in args.only:
        print(whisper_lrp(args.config, args.batch, args.rounds), flush=True)
    if "ig" in args.only:
        print(integrated_gradients(args.ig_config, args.ig_batch, args.rounds), flush=True)
    if "ecapa" in args.only:
        print(flush=True)
        script = os.path.join(os.path.dirname(os.path.abspath(__file__)), "attribution_ecapa.py")
        subprocess.run([sys.executable, script], check=True)


if __name__ == "__main__":
    main()
