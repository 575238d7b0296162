"""CLAP audio tower forward speed: jaxspeech (jit) vs transformers (PyTorch), same weights.

    python benchmarks/forward_clap.py                          # clap-htsat-unfused, batch 1 and 8
    python benchmarks/forward_clap.py --batches 8 --rounds 9
    python benchmarks/forward_clap.py --preset larger-clap-general

Random weights for the preset are made once with transformers
(``ClapAudioModelWithProjection``) and saved as an HF folder with its
``preprocessor_config.json``; jaxspeech loads that folder with ``js.load``. Input:
10 s of 48 kHz audio per item (a harmonic sweep over a noise floor).

Timed per batch size:
- model: the audio tower on precomputed features ``[B, 1, 1001, 64]`` (HF's, fed to
  both). jaxspeech: ``m.apply`` (jitted) after a warm-up call, ``jax.block_until_ready``
  around each call; the first call's extra time is reported as compile time. PyTorch:
  ``torch.inference_mode`` after a warm-up call.
- end to end: waveform -> embedding (jaxspeech ``m(wave)``; PyTorch ``ClapFeatureExtractor``
  + model).

The two frameworks are timed in alternating rounds in one process and the median of
the rounds is reported, so that load from other processes on a shared machine hits
both alike. Ratio = jaxspeech utterances/s / PyTorch utterances/s (> 1: jaxspeech faster).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile

import numpy as np

from jaxspeech.data.reference_checkpoints import CLAP_SIZES, write_clap

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import header, timed  # noqa: E402


def make_wave(batch: int, seconds: float = 10.0, sr: int = 48000) -> np.ndarray:
    from jaxspeech.data import synth

    rng = np.random.default_rng(0)
    return np.stack([synth.harmonic_sweep(seconds, sr, seed=i)
                     + 1e-3 * rng.standard_normal(int(seconds * sr)).astype(np.float32)
                     for i in range(batch)]).astype(np.float32)


def bench(folder: str, batch: int, rounds: int) -> dict:
    import jax
    import torch
    from transformers import ClapAudioModelWithProjection, ClapFeatureExtractor

    import jaxspeech as js

    m = js.load(folder)
    reference = ClapAudioModelWithProjection.from_pretrained(folder).eval()
    extractor = ClapFeatureExtractor.from_pretrained(folder)
    wave = make_wave(batch)

    def hf_features():
        out = extractor(list(wave), sampling_rate=48000, return_tensors="np")
        return (torch.from_numpy(np.asarray(out["input_features"], np.float32)),
                torch.from_numpy(np.asarray(out["is_longer"])))

    feats_t, longer_t = hf_features()
    feats = jax.numpy.asarray(feats_t.numpy())
    longer = jax.numpy.asarray(longer_t.numpy().reshape(-1))

    def jax_model():
        jax.block_until_ready(m.apply(m.params, feats, is_longer=longer))

    def jax_e2e():
        jax.block_until_ready(m(wave))

    def torch_model():
        reference(input_features=feats_t, is_longer=longer_t)

    def torch_e2e():
        f, lg = hf_features()
        reference(input_features=f, is_longer=lg)

    first, _ = timed(jax_model, pause=0)
    timed(jax_e2e)  # compiles the front end
    rows = {"jax_model": [], "torch_model": [], "jax_e2e": [], "torch_e2e": []}
    with torch.inference_mode():
        torch_model()
        for _ in range(rounds):
            rows["jax_model"].append(timed(jax_model))
            rows["torch_model"].append(timed(torch_model))
        for _ in range(max(rounds // 2, 2)):
            rows["jax_e2e"].append(timed(jax_e2e))
            rows["torch_e2e"].append(timed(torch_e2e))
    med = {}
    for k, v in rows.items():  # (wall, CPU) medians
        med[k], med[k + "_cpu"] = (float(x) for x in np.median(v, axis=0))
    med["compile_s"] = first - med["jax_model"]
    return med


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="clap-htsat-unfused", choices=sorted(CLAP_SIZES))
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 8])
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args()

    print(header(f"CLAP forward ({args.preset}, 10 s clips)"))
    print("| batch | jaxspeech utt/s | PyTorch utt/s | ratio | CPU-time ratio | jaxspeech e2e utt/s | "
          "PyTorch e2e utt/s | e2e ratio | jax compile s |")
    print("|---|---|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as folder:
        write_clap(folder, args.preset)
        for batch in args.batches:
            r = bench(folder, batch, args.rounds)
            print(f"| {batch} | {batch / r['jax_model']:.2f} | {batch / r['torch_model']:.2f} | "
                  f"{r['torch_model'] / r['jax_model']:.2f} | "
                  f"{r['torch_model_cpu'] / r['jax_model_cpu']:.2f} | {batch / r['jax_e2e']:.2f} | "
                  f"{batch / r['torch_e2e']:.2f} | {r['torch_e2e'] / r['jax_e2e']:.2f} | "
                  f"{r['compile_s']:.1f} |", flush=True)


if __name__ == "__main__":
    main()
