"""ECAPA-TDNN forward speed: jaxspeech (jit) vs SpeechBrain (PyTorch), same weights.

    python benchmarks/forward_ecapa.py                         # 3 s and 10 s, batch 1 and 16
    python benchmarks/forward_ecapa.py --seconds 3 --batches 16 --rounds 9

Random weights (and random BatchNorm statistics) at the spkrec-ecapa-voxceleb size
are made once with SpeechBrain and saved as a SpeechBrain folder
(``hyperparams.yaml`` + ``embedding_model.ckpt``); jaxspeech loads it with
``js.load``, SpeechBrain with HyperPyYAML + ``load_state_dict``. Input: speech-like
audio (harmonic sweeps), all items of equal length, relative lengths all ones.

Timed per (duration, batch):
- model: the embedding model on precomputed features ``[B, frames, 80]``
  (jaxspeech ``m.apply`` jitted, ``jax.block_until_ready`` around each call, after a
  warm-up call whose extra time is reported as compile time; SpeechBrain
  ``ECAPA_TDNN(feats, lengths)`` under ``torch.no_grad`` after a warm-up call);
- end to end: waveform -> embedding (jaxspeech ``m(wave)``; SpeechBrain ``Fbank`` ->
  ``InputNormalization`` -> ``ECAPA_TDNN``, as ``EncoderClassifier.encode_batch``).
The two frameworks are timed in alternating rounds in one process and the median of
the rounds is reported, so that load from other processes on a shared machine hits
both alike. Reported: utterances per second and the ratio PyTorch time / jaxspeech time
(> 1: jaxspeech faster), for the model also in CPU time (all threads).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile

import numpy as np

from jaxspeech.data.reference_checkpoints import ECAPA_FULL, write_ecapa

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import header, timed  # noqa: E402


def waves(seconds: float, batch: int) -> np.ndarray:
    from jaxspeech.data import synth

    return np.stack([synth.harmonic_sweep(seconds, 16000, seed=i) for i in range(batch)])


def bench(folder: str, seconds: float, batch: int, rounds: int) -> dict:
    import jax
    import torch
    from hyperpyyaml import load_hyperpyyaml

    import jaxspeech as js

    wave_np = waves(seconds, batch)

    # jaxspeech
    m = js.load(folder)
    feats, kwargs = jax.block_until_ready(m.prepare(wave_np))
    first, _ = timed(lambda: jax.block_until_ready(m.apply(m.params, feats, **kwargs)))
    jax.block_until_ready(m(wave_np))  # compile the front end

    # SpeechBrain, as EncoderClassifier.encode_batch runs it
    with open(os.path.join(folder, "hyperparams.yaml")) as f:
        hp = load_hyperpyyaml(f)
    fbank, norm, model = hp["compute_features"], hp["mean_var_norm"], hp["embedding_model"]
    model.load_state_dict(torch.load(os.path.join(folder, "embedding_model.ckpt"),
                                     weights_only=True))
    model.eval()
    wave = torch.from_numpy(wave_np)
    lengths = torch.ones(batch)
    out = {k: [] for k in ("jax_model", "torch_model", "jax_e2e", "torch_e2e")}
    with torch.no_grad():
        tfeats = norm(fbank(wave), lengths)
        model(tfeats, lengths)  # warm-up
        for _ in range(rounds):
            out["torch_model"].append(timed(lambda: model(tfeats, lengths)))
            out["jax_model"].append(timed(
                lambda: jax.block_until_ready(m.apply(m.params, feats, **kwargs))))
        for _ in range(rounds):
            out["torch_e2e"].append(timed(lambda: model(norm(fbank(wave), lengths), lengths)))
            out["jax_e2e"].append(timed(lambda: jax.block_until_ready(m(wave_np))))
    res = {}
    for k, v in out.items():  # (wall, CPU) medians
        res[k], res[k + "_cpu"] = (float(x) for x in np.median(v, axis=0))
    res["compile_s"] = first - res["jax_model"]
    return res


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", nargs="+", type=float, default=[3.0, 10.0])
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 16])
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()

    print(header("ECAPA-TDNN forward (spkrec-ecapa-voxceleb size)"))
    print("| audio | batch | jaxspeech utt/s | SpeechBrain utt/s | ratio | CPU-time ratio | "
          "jaxspeech e2e utt/s | SpeechBrain e2e utt/s | e2e ratio | jax compile s |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as folder:
        write_ecapa(folder, ECAPA_FULL, classifier=False)
        for seconds in args.seconds:
            for batch in args.batches:
                r = bench(folder, seconds, batch, args.rounds)
                print(f"| {seconds:g} s | {batch} | {batch / r['jax_model']:.2f} | "
                      f"{batch / r['torch_model']:.2f} | {r['torch_model'] / r['jax_model']:.2f} | "
                      f"{r['torch_model_cpu'] / r['jax_model_cpu']:.2f} | "
                      f"{batch / r['jax_e2e']:.2f} | {batch / r['torch_e2e']:.2f} | "
                      f"{r['torch_e2e'] / r['jax_e2e']:.2f} | {r['compile_s']:.1f} |", flush=True)


if __name__ == "__main__":
    main()
