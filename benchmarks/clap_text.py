"""CLAP's text side: jaxspeech (JAX) vs transformers (PyTorch) and LXT, same weights, same CPU, one run.

    python benchmarks/clap_text.py                                 # both parts, default sizes
    python benchmarks/clap_text.py --texts 64 --text-batch 32 --rounds 5
    python benchmarks/clap_text.py --skip-match                    # text embedding only
    python benchmarks/clap_text.py --clips 2 --match-texts 2 --rounds 3

Random weights of the real sizes are made once with transformers and saved as a ClapModel
folder (clap-htsat-unfused's HTSAT audio tower, the RoBERTa-base text tower of every
released CLAP, the offline byte-level BPE tokenizer of ``reference_checkpoints``, whose
small vocabulary makes ~4 tokens per word where RoBERTa's makes ~1.3); jaxspeech loads
it with ``js.load``.

1. Text embedding: ``--texts`` synthetic captions (5 to 25 words) embedded in batches of
   ``--text-batch``: ``js.clap_text_embeddings(m, texts)`` (the ``tokenizers`` library,
   then the jitted tower on batches of texts sorted by length; rows padded to a power of
   two, tokens to a multiple of 16) vs the folder's ``RobertaTokenizerFast`` +
   ``ClapModel.get_text_features`` under ``torch.inference_mode`` on the batches as given
   (padded to each batch's longest), as it is usually called, and on the same texts sorted
   by length first (what jaxspeech does, done for transformers by hand). Texts per second.
2. Audio-text attribution, both sides: AttnLRP relevance of the similarity of each of
   ``--clips`` 10 s clips with each of ``--match-texts`` captions, over the audio features
   and the text tokens. jaxspeech: ``js.attribute_match`` (one compiled call: each tower's
   forward once, one audio backward per text, one text backward per clip). Reference:
   :func:`jaxspeech.attribution.lxt.lxt_clap_match_relevance`, LXT's rules patched into
   transformers' ClapModel, one forward and backward per text over all clips (with that
   text repeated per clip), the patched model built once outside the clock. Both take the
   same features. Pairs per second; agreement printed.

Each part warms up both sides first (jaxspeech's first call's extra time is its compile
time, reported apart), then times them in alternating rounds and reports the median wall
and CPU time, so that load from other processes hits both alike. Ratio = jaxspeech speed /
reference speed (> 1: jaxspeech faster).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import header, timed  # noqa: E402

WORDS = ("a dog barking in the rain on a roof while cars pass by and birds sing loudly near "
         "the old wooden door of a small house with children playing music outside").split()


def captions(n: int, seed: int = 0) -> list[str]:
    rng = np.random.default_rng(seed)
    return [" ".join(rng.choice(WORDS, size=int(rng.integers(5, 26)))) for _ in range(n)]


def medians(rows: dict) -> dict:
    out = {}
    for k, v in rows.items():
        out[k], out[k + "_cpu"] = (float(x) for x in np.median(v, axis=0))
    return out


def bench_text(folder: str, n_texts: int, batch: int, rounds: int) -> dict:
    import torch
    from transformers import AutoTokenizer, ClapModel

    import jaxspeech as js

    m = js.load(folder)
    clap, tok = ClapModel.from_pretrained(folder).eval(), AutoTokenizer.from_pretrained(folder)
    texts = captions(n_texts)

    def jax_embed():
        return js.clap_text_embeddings(m, texts, batch_size=batch)  # numpy: already blocked

    as_given = np.arange(len(texts))

    def torch_embed(order=as_given):
        out = []
        for i in range(0, len(texts), batch):
            b = tok([texts[k] for k in order[i:i + batch]], padding=True, truncation=True,
                    return_tensors="pt")
            out.append(clap.get_text_features(**b).numpy())
        embeddings = np.empty((len(texts), out[0].shape[1]), np.float32)
        embeddings[order] = np.concatenate(out)
        return embeddings

    by_length = np.argsort([len(t) for t in tok(texts)["input_ids"]], kind="stable")
    with torch.inference_mode():
        first, _ = timed(jax_embed, pause=0)
        ref = torch_embed()
        err = float(np.abs(jax_embed() - ref).max() / np.abs(ref).max())
        rows = {"jax": [], "torch": [], "torch_sorted": []}
        for _ in range(rounds):
            rows["jax"].append(timed(jax_embed))
            rows["torch"].append(timed(torch_embed))
            rows["torch_sorted"].append(timed(lambda: torch_embed(by_length)))
    med = medians(rows)
    med["compile_s"] = first - med["jax"]
    med["err"] = err
    tokens = tok(texts)["input_ids"]
    med["tokens"] = float(np.mean([len(t) for t in tokens]))
    return med


def bench_match(folder: str, clips: int, n_texts: int, rounds: int) -> dict:
    import jax

    import jaxspeech as js
    from jaxspeech.attribution.lxt import lxt_clap, lxt_clap_match_relevance
    from jaxspeech.data import synth

    m = js.load(folder)
    rng = np.random.default_rng(1)
    wave = np.stack([synth.harmonic_sweep(10.0, 48000, seed=i)
                     + 1e-3 * rng.standard_normal(480000).astype(np.float32)
                     for i in range(clips)]).astype(np.float32)
    features = np.asarray(m.features(wave))
    texts = captions(n_texts, seed=1)
    tokens = m.text.tokenize(texts)

    def jax_match():
        res = js.attribute_match(m, features=features, texts=tokens, method="attnlrp")
        return jax.block_until_ready((res.audio_relevance, res.text_relevance))

    with lxt_clap(folder) as clap:
        def lxt_match():
            return lxt_clap_match_relevance(folder, features, tokens.input_ids,
                                            tokens.attention_mask, model=clap)

        first, _ = timed(jax_match, pause=0)
        audio, text = (np.asarray(x) for x in jax_match())
        ref_audio, ref_text, _ = lxt_match()
        errs = (float(np.abs(audio - ref_audio).max() / np.abs(ref_audio).max()),
                float(np.abs(text - ref_text).max() / np.abs(ref_text).max()))
        rows = {"jax": [], "lxt": []}
        for _ in range(rounds):
            rows["jax"].append(timed(jax_match))
            rows["lxt"].append(timed(lxt_match))
    med = medians(rows)
    med["compile_s"] = first - med["jax"]
    med["audio_err"], med["text_err"] = errs
    return med


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--texts", type=int, default=64, help="captions to embed (part 1)")
    parser.add_argument("--text-batch", type=int, default=32)
    parser.add_argument("--clips", type=int, default=2, help="10 s clips (part 2)")
    parser.add_argument("--match-texts", type=int, default=2, help="captions per clip (part 2)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--skip-match", action="store_true")
    args = parser.parse_args()

    from jaxspeech.data.reference_checkpoints import write_clap

    print(header("CLAP text tower (RoBERTa-base) and audio-text attribution"))
    with tempfile.TemporaryDirectory() as folder:
        write_clap(folder, "clap-htsat-unfused", text_tower=True, text={})
        r = bench_text(folder, args.texts, args.text_batch, args.rounds)
        print(f"\n## text embedding: {args.texts} captions ({r['tokens']:.0f} tokens on average), "
              f"batches of {args.text_batch}; max rel diff {r['err']:.1e}")
        print("| jaxspeech texts/s | transformers texts/s | ratio | CPU-time ratio | "
              "transformers sorted texts/s | ratio to sorted | CPU-time ratio | jax compile s |")
        print("|---|---|---|---|---|---|---|---|")
        print(f"| {args.texts / r['jax']:.1f} | {args.texts / r['torch']:.1f} | "
              f"{r['torch'] / r['jax']:.2f} | {r['torch_cpu'] / r['jax_cpu']:.2f} | "
              f"{args.texts / r['torch_sorted']:.1f} | {r['torch_sorted'] / r['jax']:.2f} | "
              f"{r['torch_sorted_cpu'] / r['jax_cpu']:.2f} | {r['compile_s']:.1f} |", flush=True)
        if args.skip_match:
            return
        r = bench_match(folder, args.clips, args.match_texts, args.rounds)
        pairs = args.clips * args.match_texts
        print(f"\n## audio-text AttnLRP, both sides: {args.clips} clips x {args.match_texts} "
              f"captions; max rel diff audio {r['audio_err']:.1e}, text {r['text_err']:.1e}")
        print("| jaxspeech pairs/s | transformers + LXT pairs/s | ratio | CPU-time ratio | "
              "jax compile s |")
        print("|---|---|---|---|---|")
        print(f"| {pairs / r['jax']:.2f} | {pairs / r['lxt']:.2f} | {r['lxt'] / r['jax']:.2f} | "
              f"{r['lxt_cpu'] / r['jax_cpu']:.2f} | {r['compile_s']:.1f} |", flush=True)


if __name__ == "__main__":
    main()
