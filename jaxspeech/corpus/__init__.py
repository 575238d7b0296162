"""Attribution at corpus scale: datasets in, sharded over devices and hosts, resumable results out.

    from jaxspeech.corpus import attribute_corpus, open_results
    summary = attribute_corpus(m, "librispeech/", "out/", method="attnlrp", batch_size=16)
    for r in open_results("out/"):
        r["id"], r["relevance"], r["score"]

or ``jaxspeech attribute-corpus SOURCE --model M --method attnlrp --out DIR``. Modules:
:mod:`~jaxspeech.corpus.sources` (folder / manifest / TFDS), :mod:`~jaxspeech.corpus.l2arctic`
(a TFDS builder for a local L2-ARCTIC), :mod:`~jaxspeech.corpus.batching` (windows, buckets,
stitching), :mod:`~jaxspeech.corpus.sharding` (mesh, process shares, ``jax.distributed``),
:mod:`~jaxspeech.corpus.store` (shards, manifest, resume, reader),
:mod:`~jaxspeech.corpus.targets` (per-item targets), :mod:`~jaxspeech.corpus.run` (the loop).
"""

from jaxspeech.corpus.batching import Layout, layout_for
from jaxspeech.corpus.run import Summary, attribute_corpus
from jaxspeech.corpus.sources import Item, Source, open_source
from jaxspeech.corpus.store import Results, open_results

__all__ = ["attribute_corpus", "Summary", "open_results", "Results", "open_source", "Source",
           "Item", "Layout", "layout_for"]
