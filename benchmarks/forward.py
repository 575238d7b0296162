"""Forward speed and memory: jaxspeech (jit) vs the PyTorch reference, same weights, same run.

    python benchmarks/forward.py                      # whisper-tiny and whisper-base, batch 1 and 8
    python benchmarks/forward.py --configs whisper-tiny --batches 8 --repeats 5

Each (framework, config, batch) runs in its own subprocess so that peak memory is
that framework's alone. Random weights are made once per config and saved as an
HF folder; both frameworks load that folder. The input is 30 s of speech-like
audio per item. Timed: the encoder on precomputed log-mel features (the model
forward), and separately the end-to-end waveform -> output call. jaxspeech is timed
after a warm-up call (compile time reported apart) with ``jax.block_until_ready``;
PyTorch under ``torch.inference_mode`` after a warm-up. Wall time and CPU time (all
threads) are both reported; on a shared machine the CPU-time ratio is the steadier.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

import numpy as np

from jaxspeech.data.reference_checkpoints import write_whisper

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import header, peak_rss_mb, timed  # noqa: E402


def run_jax(folder: str, batch: int, repeats: int) -> dict:
    import jax

    import jaxspeech as js
    from jaxspeech.data import synth

    base = peak_rss_mb()
    m = js.load(folder)
    wave = np.stack([synth.harmonic_sweep(30.0, 16000, seed=i) for i in range(batch)])
    feats = jax.block_until_ready(m.features(wave))
    compile_s, _ = timed(lambda: jax.block_until_ready(m.apply(m.params, feats)), pause=0)
    model_s, model_cpu = timed(lambda: jax.block_until_ready(m.apply(m.params, feats)), repeats)
    m(wave)  # compile the front end too
    e2e_s, _ = timed(lambda: jax.block_until_ready(m(wave)), repeats)
    return {"compile_s": compile_s - model_s, "model_s": model_s, "model_cpu": model_cpu,
            "e2e_s": e2e_s,
            "peak_mb": peak_rss_mb(), "delta_mb": peak_rss_mb() - base}


def run_torch(folder: str, batch: int, repeats: int) -> dict:
    import torch
    from transformers import WhisperFeatureExtractor, WhisperModel

    from jaxspeech.data import synth

    base = peak_rss_mb()
    encoder = WhisperModel.from_pretrained(folder).encoder.eval()
    extractor = WhisperFeatureExtractor(feature_size=80)
    wave = np.stack([synth.harmonic_sweep(30.0, 16000, seed=i) for i in range(batch)])

    def features():
        return torch.from_numpy(extractor(list(wave), sampling_rate=16000,
                                          return_tensors="np")["input_features"])

    feats = features()
    with torch.inference_mode():
        encoder(feats)
        model_s, model_cpu = timed(lambda: encoder(feats), repeats)
        e2e_s, _ = timed(lambda: encoder(features()), repeats)
    return {"compile_s": 0.0, "model_s": model_s, "model_cpu": model_cpu, "e2e_s": e2e_s,
            "peak_mb": peak_rss_mb(), "delta_mb": peak_rss_mb() - base,
            "attn": encoder.config._attn_implementation}


def child(args) -> None:
    fn = run_jax if args.framework == "jaxspeech" else run_torch
    print(json.dumps(fn(args.folder, args.batch, args.repeats)))


def run_child(framework: str, folder: str, batch: int, repeats: int) -> dict:
    cmd = [sys.executable, __file__, "--child", framework, "--folder", folder,
           "--batch", str(batch), "--repeats", str(repeats)]
    # idle OpenMP workers would otherwise spin and count as PyTorch CPU time
    env = dict(os.environ, OMP_WAIT_POLICY="PASSIVE")
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, env=env)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", nargs="+", default=["whisper-tiny", "whisper-base"])
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 8])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--child", choices=["jaxspeech", "torch"])
    parser.add_argument("--folder")
    parser.add_argument("--batch", type=int)
    args = parser.parse_args()
    if args.child:
        args.framework = args.child
        return child(args)

    print(header("Whisper encoder forward vs transformers"))
    print("| model | batch | jaxspeech utt/s | PyTorch utt/s | ratio | CPU-time ratio | "
          "jaxspeech e2e utt/s | PyTorch e2e utt/s | e2e ratio | jax compile s | peak MB jax / torch |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for name in args.configs:
        with tempfile.TemporaryDirectory() as folder:
            write_whisper(folder, name)
            for batch in args.batches:
                j = run_child("jaxspeech", folder, batch, args.repeats)
                t = run_child("torch", folder, batch, args.repeats)
                print(f"| {name} | {batch} | {batch / j['model_s']:.2f} | {batch / t['model_s']:.2f} | "
                      f"{t['model_s'] / j['model_s']:.2f} | {t['model_cpu'] / j['model_cpu']:.2f} | "
                      f"{batch / j['e2e_s']:.2f} | "
                      f"{batch / t['e2e_s']:.2f} | {t['e2e_s'] / j['e2e_s']:.2f} | "
                      f"{j['compile_s']:.1f} | {j['peak_mb']:.0f} / {t['peak_mb']:.0f} |",
                      flush=True)


if __name__ == "__main__":
    main()
