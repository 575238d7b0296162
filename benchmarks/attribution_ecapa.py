"""ECAPA-TDNN LRP speed: jaxspeech (jax.grad with rules, jit) vs zennit on SpeechBrain, same weights.

    python benchmarks/attribution_ecapa.py                      # ε and γ; 3 s and 10 s; batch 1 and 16
    python benchmarks/attribution_ecapa.py --seconds 3 --batches 16 --rules gamma --rounds 5

Random weights (and random BatchNorm statistics) at the spkrec-ecapa-voxceleb size
(channels 1024, 7205-speaker classifier) are made once with SpeechBrain and saved as a
SpeechBrain folder; jaxspeech loads it with ``js.load``, the reference with HyperPyYAML
(:func:`jaxspeech.attribution.references.speechbrain_ecapa`). Input: speech-like audio
(harmonic sweeps) through jaxspeech's front end, all items of equal length; both sides
explain the logit of speaker 0 on the same features.

Timed per (rule, duration, batch), median over the rounds:
- jaxspeech: :func:`jaxspeech.attribution.methods.gradient` with the rule set (jitted;
  relevance = features x grad), ``jax.block_until_ready``; the first call's extra time
  is reported as compile time. Also one jitted forward (``m.apply``) on the same batch:
  the cost of one attribution in forwards.
- zennit: :func:`jaxspeech.attribution.references.zennit_relevance` (the composite that
  reproduces the rule set: zennit's ``Epsilon`` / ``Gamma`` on every conv and the
  classifier) on :class:`~jaxspeech.attribution.references.EcapaForZennit`, after a
  short warm-up call per rule; the last round's relevances of the two sides are compared
  (max relative difference).
The frameworks run in alternating rounds in one process, with torch's intra-op threads
set to the cores XLA uses, so that load from other processes hits both alike.
Reported: utterances per second and the ratio zennit time / jaxspeech time (> 1: jaxspeech
faster), in wall time and in CPU time (all threads; steadier on a shared machine).
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


def bench(m, zmodel, rule: str, seconds: float, batch: int, rounds: int) -> dict:
    import jax
    import torch

    import jaxspeech as js
    from jaxspeech.attribution import methods
    from jaxspeech.attribution import references as ref
    from jaxspeech.data import synth

    wave = np.stack([synth.harmonic_sweep(seconds, 16000, seed=i) for i in range(batch)])
    feats, kwargs = jax.block_until_ready(m.prepare(wave))
    target = js.targets.class_logit(np.zeros(batch, np.int32))
    rules = js.lrp.get_rules(rule)

    composite = ref.ecapa_composite(rule, rules.epsilon, rules.gamma)
    tfeats = torch.from_numpy(np.array(feats))  # a writable copy for torch
    relevance = {}

    def theirs():
        relevance["zennit"] = ref.zennit_relevance(zmodel, composite, tfeats, 0)[0]

    def ours():
        g, _ = jax.block_until_ready(methods.gradient(m.config, m.params, feats, kwargs, target,
                                                      rules=rules))
        relevance["jax"] = g

    def forward():
        jax.block_until_ready(m.apply(m.params, feats, **kwargs))

    first, _ = timed(ours)
    forward()
    out = {"jax": [], "zennit": [], "forward": []}
    for _ in range(rounds):
        out["zennit"].append(timed(theirs))
        out["jax"].append(timed(ours))
        out["forward"].append(timed(forward))
    res = {}
    for k, v in out.items():  # (wall, CPU) medians
        res[k], res[k + "_cpu"] = (float(x) for x in np.median(v, axis=0))
    res["compile_s"] = first - res["jax"]
    r_ours, r_theirs = np.asarray(feats * relevance["jax"]), relevance["zennit"].numpy()
    res["max_rel_diff"] = float(np.abs(r_ours - r_theirs).max() / np.abs(r_theirs).max())
    return res


def warm_up_torch(zmodel, rule: str) -> None:
    """One short call, so that the first timed zennit call does not pay torch's one-off
    costs (allocator, kernel selection)."""
    import torch

    from jaxspeech.attribution import references as ref

    ref.zennit_relevance(zmodel, ref.ecapa_composite(rule), torch.randn(1, 100, 80), 0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", nargs="+", type=float, default=[3.0, 10.0])
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 16])
    parser.add_argument("--rules", nargs="+", default=["epsilon", "gamma"],
                        choices=["epsilon", "gamma", "zplus"])
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()

    import jax
    import torch

    import jaxspeech as js
    from jaxspeech.attribution import references as ref

    jax.config.update("jax_default_matmul_precision", "highest")  # float32 on both sides
    cores = len(os.sched_getaffinity(0))  # XLA:CPU's thread pool spans the usable cores
    torch.set_num_threads(cores)
    print(header("ECAPA-TDNN LRP (spkrec-ecapa-voxceleb size + 7205-speaker classifier)"),
          flush=True)
    print("| rule | audio | batch | jaxspeech utt/s | zennit utt/s | ratio | CPU-time ratio | "
          "attribution / forward (CPU) | jax compile s | max rel diff |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as folder:
        write_ecapa(folder, ECAPA_FULL)  # spkrec size, 7205-speaker classifier
        m = js.load(folder)
        emb, clf = ref.speechbrain_ecapa(folder)
        zmodel = ref.EcapaForZennit(emb, clf)
        for rule in args.rules:
            warm_up_torch(zmodel, rule)
            for seconds in args.seconds:
                for batch in args.batches:
                    r = bench(m, zmodel, rule, seconds, batch, args.rounds)
                    print(f"| {rule} | {seconds:g} s | {batch} | {batch / r['jax']:.2f} | "
                          f"{batch / r['zennit']:.2f} | {r['zennit'] / r['jax']:.2f} | "
                          f"{r['zennit_cpu'] / r['jax_cpu']:.2f} | {r['jax'] / r['forward']:.1f} "
                          f"({r['jax_cpu'] / r['forward_cpu']:.1f}) | {r['compile_s']:.1f} | "
                          f"{r['max_rel_diff']:.1e} |", flush=True)


if __name__ == "__main__":
    main()
