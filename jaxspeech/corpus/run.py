"""The corpus loop: read ahead on the host, attribute on the devices, write behind.

Three threads keep the devices busy:

- the **loader** lists this process's pending entries, reads them with a small thread pool
  (decoding and resampling release the GIL), cuts them into rows and packs full batches
  into a bounded queue (``prefetch`` batches ahead);
- the **main thread** puts each batch on the mesh (``device_put`` with the batch
  sharding), runs the front end and :func:`jaxspeech.attribute` on it (asynchronously
  dispatched), and only then waits for the *previous* batch's results, so the host's
  work on one batch overlaps the devices' work on the next;
- the **writer** stitches windows back into items, writes shards and the manifest, and
  advances the progress bar.

A file that cannot be read, is too short, or lacks what its target needs is logged with
its reason, recorded in the manifest, and skipped. A batch that fails on the device
fails its items the same way, unless no batch has succeeded yet: then the settings are
wrong, and the run stops with the error instead of failing the whole corpus item by item.

    from jaxspeech.corpus import attribute_corpus
    summary = attribute_corpus(m, "corpus/", "out/", method="attnlrp", target="output-norm")
"""

from __future__ import annotations

import concurrent.futures as cf
import dataclasses
import functools
import json
import logging
import os
import queue
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import jax
import numpy as np

from jaxspeech.corpus import batching, sharding, sources, store
from jaxspeech.corpus import targets as corpus_targets

__all__ = ["attribute_corpus", "Summary", "Attributor", "make_front_end", "run_config",
           "item_features"]

log = logging.getLogger("jaxspeech.corpus")


@dataclasses.dataclass
class Summary:
    """What one process did: counts, failures with reasons, throughput."""

    process_index: int
    process_count: int
    corpus: int  # entries in the whole source
    share: int  # this process's entries
    already_done: int  # skipped by --resume
    done: int = 0
    failures: dict[str, str] = dataclasses.field(default_factory=dict)
    seconds: float = 0.0
    audio_seconds: float = 0.0
    first_batch_seconds: float = 0.0  # compilation included
    batches: int = 0
    devices: int = 1

    @property
    def items_per_second(self) -> float:
        return self.done / self.seconds if self.seconds else 0.0

    def to_dict(self) -> dict:
        return {**dataclasses.asdict(self), "items_per_second": self.items_per_second}

    def text(self, max_failures: int = 20) -> str:
        who = f"process {self.process_index}/{self.process_count}: " if self.process_count > 1 else ""
        lines = [
            f"{who}{self.done} items attributed, {len(self.failures)} failed, "
            f"{self.already_done} already complete (of {self.share} in this share, "
            f"{self.corpus} in the corpus)",
            f"  {self.seconds:.1f} s on {self.devices} device(s): {self.items_per_second:.2f} items/s, "
            f"{self.audio_seconds / self.seconds if self.seconds else 0:.1f} s of audio/s; "
            f"first batch (with compilation) {self.first_batch_seconds:.1f} s, {self.batches} batches"]
        for ident, why in list(self.failures.items())[:max_failures]:
            lines.append(f"  failed {ident}: {why}")
        if len(self.failures) > max_failures:
            lines.append(f"  ... and {len(self.failures) - max_failures} more (see the manifest)")
        return "\n".join(lines)


def run_config(model, source: sources.Source, layout: batching.Layout, method: str,
               target: corpus_targets.TargetSpec, pool: str | None, dtype: str,
               method_options: dict) -> dict:
    """What identifies a run's results (checked on resume); not batch size or threads."""
    from jaxspeech.model import config_to_dict

    return {"model": model.source, "kind": model.kind, "config": config_to_dict(model.config),
            "method": method, "method_options": method_options, "target": target.describe(),
            "pool": pool, "dtype": dtype, "layout": layout.to_dict(),
            "source": source.describe()}


def make_front_end(model, layout: batching.Layout, batch_sharding):
    """``(wave [B, W] sharded, lengths [B] | None) -> (features, kwargs)``, batch-sharded.

    Jitted with the batch sharding on its outputs, so every device computes the features
    of its own rows only (run eagerly, some ops, e.g. the framing gather, would gather
    the batch onto every device). CLAP's front end picks each clip's path from its
    concrete length and so runs eagerly; its outputs are then resharded."""
    config, prepare = model.config, model.family.prepare
    if layout.family == "clap":
        def clap(wave, lengths):
            return jax.device_put(prepare(config, wave, lengths), batch_sharding)

        return clap
    jitted = _jitted_front_end(config, prepare, batch_sharding)
    return lambda wave, lengths: jitted(wave, None if lengths is None else
                                        jax.device_put(lengths, batch_sharding))


@functools.lru_cache(maxsize=16)
def _jitted_front_end(config, prepare, batch_sharding):
    # cached: runs in one process (tests, benchmarks, resumes) share the compiled program
    return jax.jit(lambda wave, lengths: prepare(config, wave, lengths),
                   out_shardings=batch_sharding)


def item_features(model, layout: batching.Layout, wave: np.ndarray) -> np.ndarray:
    """The features a run explains for one clip ``wave [samples]``, laid out as its stored
    relevance: each window padded to its bucket with its length, through the front end,
    its kept frames laid end to end (:func:`batching.take_row`); the features' layout of one
    item, time ``T`` frames long (what ``open_results(...)[id]["relevance"]`` has)."""
    windows = batching.split_windows(np.asarray(wave, np.float32), layout.window,
                                     layout.min_samples)
    kept = []
    for k, part in enumerate(windows):
        batch = batching.Batcher(layout, 1).add([batching.Row(0, k, len(windows), part)])[0]
        features, _ = model.family.prepare(model.config, jax.numpy.asarray(batch.wave),
                                           batch.lengths if layout.lengths else None)
        time_major = np.moveaxis(np.asarray(features[0]), layout.time_axis, 0)
        keep = batching.kept_frames(layout, part.shape[0], k == len(windows) - 1,
                                    time_major.shape[0])
        kept.append(time_major[:keep])
    return np.moveaxis(batching.stitch(kept), 0, layout.time_axis)


class Attributor:
    """One batch in, its attribution out, on ``mesh``: ``(relevance | None, frames [B, T],
    score [B])`` as device arrays, dispatched and not waited for.

    The params are replicated once; each batch's waveforms are put on the mesh split
    along ``"batch"`` and the front end runs there. The attribution itself runs under
    ``shard_map``: every device explains its own rows with the one-device program, and no
    data moves between devices. (Left to ``jit``'s sharding propagation, the LRP backward
    pass of Whisper kept some batch-sized intermediates whole on every device: 8 CPU
    devices needed 1.3 GB each for 2 rows, where one device needs 1.8 GB for 16.)
    ``pool``: ``"frames"`` returns no full relevance, only its per-frame sums."""

    def __init__(self, model, layout: batching.Layout, mesh: jax.sharding.Mesh, method: str,
                 target: corpus_targets.TargetSpec, rows_per_batch: int, *,
                 pool: str | None = None, **method_options):
        self.model, self.layout, self.target = model, layout, target
        self.rows = rows_per_batch
        self.params = sharding.replicate(model.params, mesh)
        self.sharding = sharding.batch_sharding(mesh)
        self.front_end = make_front_end(model, layout, self.sharding)
        self.step = _sharded_step(model, mesh, method, pool, target.per_item is not None,
                                  tuple(sorted(method_options.items())))

    def __call__(self, batch: batching.Batch):
        wave = jax.device_put(batch.wave, self.sharding)
        features, kwargs = self.front_end(wave, batch.lengths if self.layout.lengths else None)
        target = self.target.for_batch(self.model, self.layout, [r.fields for r in batch.rows],
                                       self.rows, self.params)
        return self.step(self.params, features, kwargs, target)


_STEPS: dict = {}


def _sharded_step(model, mesh, method: str, pool: str | None, per_item: bool, options: tuple):
    """``jit(shard_map(attribute))`` for one model config and method, cached so that runs in
    one process (tests, benchmarks) share compiled programs. Per-item target arrays are
    split along the batch with the rows; a fixed target's arrays go whole to every device."""
    from jax.sharding import PartitionSpec as P

    from jaxspeech.attribution import attribute

    key = (model.config, mesh, method, pool, per_item, options)
    if key not in _STEPS:
        def local(params, features, kwargs, target):
            res = attribute(model, features=features, target=target, method=method,
                            params=params, **kwargs, **dict(options))
            rel = res.relevance if pool is None else res.score  # a placeholder when pooled
            return rel, res.frames(), res.score

        def step(params, features, kwargs, target):
            target_spec = jax.tree.map(lambda _: P("batch") if per_item else P(), target)
            return jax.shard_map(local, mesh=mesh, in_specs=(P(), P("batch"), P("batch"), target_spec),
                                 out_specs=P("batch"), check_vma=False)(params, features, kwargs, target)

        jitted = jax.jit(step)

        def run(params, features, kwargs, target):
            rel, frames, score = jitted(params, features, kwargs, target)
            return None if pool else rel, frames, score

        _STEPS[key] = run
    return _STEPS[key]


def _ordered(pool: cf.Executor, fn, entries: Sequence, lookahead: int) -> Iterator:
    """``(entry, future)`` in order, at most ``lookahead`` in flight."""
    futures: list = []
    it = iter(entries)
    for entry in it:
        futures.append((entry, pool.submit(fn, entry)))
        if len(futures) >= lookahead:
            break
    while futures:
        yield futures.pop(0)
        nxt = next(it, None)
        if nxt is not None:
            futures.append((nxt, pool.submit(fn, nxt)))


def attribute_corpus(
    model,
    source: str | os.PathLike | sources.Source,
    out: str | os.PathLike,
    *,
    method: str = "attnlrp",
    target: Any = None,
    batch_size: int = 16,
    resume: bool = False,
    dtype: str = "float32",
    pool: str | None = None,
    items_per_shard: int | None = None,
    prefetch: int = 2,
    workers: int = 4,
    window_seconds: float | None = None,
    bucket_seconds: Sequence[float] | None = None,
    mesh: jax.sharding.Mesh | None = None,
    process_index: int | None = None,
    process_count: int | None = None,
    progress: bool = True,
    checkpoint: str | None = None,
    text_embeddings: str | None = None,
    source_options: dict | None = None,
    **method_options,
) -> Summary:
    """Attribute every item of ``source`` and write the results to ``out``.

    ``source``: a folder, a manifest or ``tfds:NAME`` (``source_options``: ``split``,
    ``data_dir``, feature keys). ``target``: a spec string (:mod:`jaxspeech.corpus.targets`)
    or a ``Target``. ``batch_size`` is rounded up to a multiple of the local devices.
    ``resume``: skip items already complete in ``out``. ``dtype`` / ``pool``: storage
    (``float16``; ``"frames"``). ``window_seconds`` / ``bucket_seconds``: see
    :mod:`jaxspeech.corpus.batching`. ``process_index`` / ``process_count``: this process's
    share (default: ``jax.process_index()`` / ``jax.process_count()``). Other keywords
    (``layer``, ``steps``, ``epsilon`` ...) go to :func:`jaxspeech.attribute`.
    Returns this process's :class:`Summary`.
    """
    from tqdm import tqdm

    from jaxspeech.attribution import METHODS

    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose from {', '.join(METHODS)}")
    src = sources.open_source(source, **(source_options or {}))
    layout = batching.layout_for(model, window_seconds=window_seconds, bucket_seconds=bucket_seconds)
    mesh = sharding.local_mesh() if mesh is None else mesh
    rows_per_batch = sharding.round_batch(batch_size, mesh)
    if process_index is None:
        process_index, process_count = sharding.process_info()
    spec = corpus_targets.parse(target, model, checkpoint=checkpoint, layout=layout,
                                text_embeddings=text_embeddings)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    store.check_run_config(out, run_config(model, src, layout, method, spec, pool, dtype,
                                           method_options), resume, process_index)

    entries = src.entries()
    mine = sharding.process_share(entries, process_index, process_count)
    done_before = store.read_manifests(out)[0] if resume else {}
    pending = [e for e in mine if e.id not in done_before]
    summary = Summary(process_index, process_count, len(entries), len(mine),
                      len(mine) - len(pending), devices=mesh.size)
    writer = store.ShardWriter(out, process_index, dtype=dtype, pool=pool,
                               items_per_shard=items_per_shard or max(64, rows_per_batch))
    rate = model.sample_rate

    batches: queue.Queue = queue.Queue(maxsize=max(1, prefetch))
    results: queue.Queue = queue.Queue()
    stop = threading.Event()
    errors: list[BaseException] = []

    # --- loader -------------------------------------------------------------------------
    def load_one(entry: sources.Entry) -> sources.Item:
        item = src.load(entry, rate)
        if item.wave.shape[0] < layout.min_samples:
            raise ValueError(f"{item.wave.shape[0]} samples; {model.kind} needs at least "
                             f"{layout.min_samples} ({1000 * layout.min_samples / rate:.0f} ms)")
        spec.check(item.fields, lambda path: sources.read_audio(path, rate))
        return item

    def put(q: queue.Queue, value) -> bool:
        while not stop.is_set():
            try:
                q.put(value, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def loader() -> None:
        batcher = batching.Batcher(layout, rows_per_batch)
        try:
            with cf.ThreadPoolExecutor(max(1, workers)) as pool_:
                for key, (entry, fut) in enumerate(
                        _ordered(pool_, load_one, pending, max(2 * rows_per_batch, workers))):
                    if stop.is_set():
                        return
                    try:
                        item = fut.result()
                    except (OSError, ValueError, RuntimeError, EOFError) as e:
                        results.put(("fail", entry.id, f"{type(e).__name__}: {e}"))
                        continue
                    waves = batching.split_windows(item.wave, layout.window, layout.min_samples)
                    meta = {**item.fields, "n_samples": int(item.wave.shape[0]),
                            "sample_rate": rate, "n_windows": len(waves)}
                    results.put(("item", key, item.id, meta, len(waves)))
                    rows = [batching.Row(key, k, len(waves), w, item.fields)
                            for k, w in enumerate(waves)]
                    for batch in batcher.add(rows):
                        if not put(batches, batch):
                            return
            for batch in batcher.flush():
                if not put(batches, batch):
                    return
        except BaseException as e:  # a bug, not a bad file: stop the run with it
            errors.append(e)
            stop.set()
        finally:
            put(batches, None)

    # --- writer -------------------------------------------------------------------------
    bar = tqdm(total=len(pending), unit="item", disable=not progress, dynamic_ncols=True,
               desc=method if process_count == 1 else f"{method} p{process_index}")

    def writer_loop() -> None:
        open_items: dict[int, dict] = {}
        try:
            while True:
                msg = results.get()
                if msg is None:
                    break
                kind = msg[0]
                if kind == "item":
                    _, key, ident, meta, n = msg
                    open_items[key] = {"id": ident, "meta": meta, "parts": {}, "n": n}
                elif kind == "fail":
                    _, ident, reason = msg
                    _fail(ident, reason)
                elif kind == "fail_rows":
                    _, keys, reason = msg
                    for key in dict.fromkeys(keys):
                        state = open_items.pop(key, None)
                        if state is not None:
                            _fail(state["id"], reason)
                else:
                    _, rows, rel, frames, score = msg
                    for i, (key, k, n_windows, n_samples) in enumerate(rows):
                        state = open_items.get(key)
                        if state is None:  # the item failed in another batch
                            continue
                        row = batching.Row(key, k, n_windows, np.empty(n_samples, np.float32))
                        state["parts"][k] = (*batching.take_row(
                            layout, None if rel is None else rel[i], frames[i], row), float(score[i]))
                        if len(state["parts"]) == state["n"]:
                            del open_items[key]
                            _finish(state)
            writer.close()
        except BaseException as e:
            errors.append(e)
            stop.set()

    def _fail(ident: str, reason: str) -> None:
        log.warning("skipped %s: %s", ident, reason)
        writer.fail(ident, reason)
        summary.failures[ident] = reason
        bar.update(1)

    def _finish(state: dict) -> None:
        parts = [state["parts"][k] for k in range(state["n"])]
        window_scores = np.asarray([p[4] for p in parts], np.float32)
        writer.add(store.ItemResult(
            id=state["id"],
            relevance=None if parts[0][0] is None else batching.stitch([p[0] for p in parts]),
            frames=batching.stitch([p[1] for p in parts]),
            score=float(window_scores.mean()), window_scores=window_scores,
            outside=float(sum(p[2] for p in parts)), meta=state["meta"],
            outside_abs=float(sum(p[3] for p in parts))))
        summary.done += 1
        summary.audio_seconds += state["meta"]["n_samples"] / rate
        bar.update(1)

    # --- devices ------------------------------------------------------------------------
    dispatch = Attributor(model, layout, mesh, method, spec, rows_per_batch, pool=pool,
                          **method_options)

    def collect(batch: batching.Batch, arrays) -> None:
        rel, frames, score = jax.device_get(arrays)
        rows = [(r.key, r.window, r.n_windows, r.n_samples) for r in batch.rows]
        results.put(("rows", rows, rel, frames, score))

    threads = [threading.Thread(target=loader, name="corpus-loader", daemon=True),
               threading.Thread(target=writer_loop, name="corpus-writer", daemon=True)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    in_flight = None
    succeeded = False

    def next_batch():
        while not stop.is_set():
            try:
                return batches.get(timeout=0.1)
            except queue.Empty:
                continue
        return None

    try:
        while (batch := next_batch()) is not None:
            t0 = time.perf_counter()
            try:
                current = (batch, dispatch(batch))
            except Exception as e:
                if not succeeded and in_flight is None:
                    raise  # the very first batch: the settings are wrong, say so
                results.put(("fail_rows", [r.key for r in batch.rows], f"attribution failed: {e}"))
                current = None
            if in_flight is not None:
                try:
                    collect(*in_flight)
                    succeeded = True
                except Exception as e:
                    if not succeeded:
                        raise
                    results.put(("fail_rows", [r.key for r in in_flight[0].rows],
                                 f"attribution failed: {e}"))
            if current is not None:
                if summary.batches == 0:
                    jax.block_until_ready(current[1])
                    summary.first_batch_seconds = time.perf_counter() - t0
                summary.batches += 1
            in_flight = current
        if in_flight is not None and not errors:
            collect(*in_flight)
    finally:
        stop.set()  # the loader stops reading if we leave early
        results.put(None)
        threads[1].join()
        threads[0].join(timeout=5)
        bar.close()
    if errors:
        raise errors[0]
    summary.seconds = time.perf_counter() - start
    data = json.dumps(summary.to_dict(), indent=2, sort_keys=True).encode()
    store.write_atomic(out / f"summary-p{process_index:05d}.json", data)
    sharding.barrier("jaxspeech-corpus-done")
    return summary
