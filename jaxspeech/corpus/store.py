"""Results out: shards of relevance, scores and metadata, a manifest, resume, and a reader.

Layout of a results folder::

    run.json                      the run's configuration (checked again on --resume)
    shards/p00000-000000.npz      items of process 0, first shard
    manifest-p00000.jsonl         process 0's commits: {"shard": ..., "ids": [...]} per shard,
                                  {"failed": id, "reason": ...} per failure
    summary-p00000.json           the last run's counts and throughput

Writing is crash-safe by construction. A shard is written to a temporary name, flushed to
disk and renamed (atomic); only then is its manifest line appended (one ``write`` of one
line, flushed). The manifest line is the commit: a shard whose line is missing (the
process died in between) is an orphan, and a torn last line is ignored, so on
``--resume`` its items are simply done again and the orphan deleted. Each process writes
its own files, so processes never contend, and the ids of a corpus run are unique, so the
union over processes has every completed item exactly once.

Stored per item: ``relevance`` laid end to end along time (time-major on disk, back in the
features' layout when read), or only its sum over everything but time with
``pool="frames"``; ``float16`` storage halves it. Scores are float32 always.

    res = open_results("out/")
    res["spk1/utt3.flac"]["relevance"]       # [n_mels, T] for Whisper, float32
    for r in res: r["id"], r["frames"], r["score"]
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
import re
from collections import OrderedDict
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["ItemResult", "ShardWriter", "Results", "open_results", "read_manifests",
           "check_run_config", "write_atomic"]

RUN_FILE = "run.json"
SHARD_DIR = "shards"
_SHARD = re.compile(r"^p(\d{5})-(\d{6})\.npz$")


@dataclasses.dataclass
class ItemResult:
    """One item's result: ``relevance [T, ...]`` time-major (``None`` when pooled),
    ``frames [T]``, ``score`` (mean over windows), ``window_scores [W]``, the relevance
    that fell on padding (``outside``: summed; ``outside_abs``: its ``|R|`` summed, see
    :mod:`jaxspeech.corpus.batching`)."""

    id: str
    relevance: np.ndarray | None
    frames: np.ndarray
    score: float
    window_scores: np.ndarray
    outside: float
    meta: dict
    outside_abs: float = float("nan")


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # not every platform opens folders
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: Path, data: bytes) -> None:
    """Write ``data`` to a temporary sibling, flush it to disk and rename it to ``path``: a
    reader sees the old file or the new one, never a part."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def _manifest_lines(path: Path) -> tuple[list[dict], int]:
    """Parsed lines and the byte length of the intact part (a torn last line is left out)."""
    raw = path.read_bytes()
    records, good = [], 0
    for line in raw.splitlines(keepends=True):
        if not line.endswith(b"\n"):
            break  # torn by a kill mid-write: never committed
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            break
        good += len(line)
    return records, good


def read_manifests(out: str | os.PathLike) -> tuple[dict[str, str], dict[str, str], list[str]]:
    """``(done {id: shard}, failed {id: reason}, duplicates)`` over every process's manifest.
    An id that failed once and later succeeded counts as done."""
    done: dict[str, str] = {}
    failed: dict[str, str] = {}
    duplicates: list[str] = []
    for path in sorted(Path(out).glob("manifest-p*.jsonl")):
        for rec in _manifest_lines(path)[0]:
            if "shard" in rec:
                for ident in rec["ids"]:
                    if ident in done:
                        duplicates.append(ident)
                    else:
                        done[ident] = rec["shard"]
            elif "failed" in rec:
                failed[rec["failed"]] = rec["reason"]
    return done, {k: v for k, v in failed.items() if k not in done}, duplicates


def _flat(config: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested settings as ``{"config.dtype": ...}``, so that a mismatch names the one that differs."""
    flat = {}
    for key, value in config.items():
        if isinstance(value, Mapping) and value:
            flat.update(_flat(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def check_run_config(out: Path, config: Mapping[str, Any], resume: bool,
                     process_index: int = 0) -> None:
    """Write ``run.json``, or, where results exist, check that this run is the same one
    (never mix two configurations in one folder) and that ``resume`` was asked for when
    this process has results there already. Processes of one run write the same file."""
    path = out / RUN_FILE
    config = json.loads(json.dumps(dict(config), sort_keys=True, default=str))  # as stored
    if path.exists() and any(out.glob("manifest-p*.jsonl")):
        before, now = _flat(json.loads(path.read_text())), _flat(config)
        keys = sorted(k for k in set(now) | set(before) if now.get(k) != before.get(k))
        if keys:
            diff = ", ".join(f"{k}: {before.get(k)!r} -> {now.get(k)!r}" for k in keys)
            raise ValueError(f"{out} holds results of another configuration ({diff}); "
                             "resume with the same settings or choose another --out")
        if not resume and (out / f"manifest-p{process_index:05d}.jsonl").exists():
            raise FileExistsError(f"{out} already holds results; pass --resume to complete "
                                  "them, or choose another --out")
        return
    write_atomic(path, (json.dumps(dict(config), indent=2, sort_keys=True) + "\n").encode())


class ShardWriter:
    """Buffers :class:`ItemResult`s and writes them ``items_per_shard`` at a time.

    ``dtype``: storage dtype of relevance (``float32`` / ``float16``); ``pool``: ``None`` (keep
    the relevance) or ``"frames"`` (keep its per-frame sums only). Not thread-safe: one
    writer per process, used from one thread.
    """

    def __init__(self, out: str | os.PathLike, process_index: int = 0, *, items_per_shard: int = 64,
                 dtype: str = "float32", pool: str | None = None):
        if dtype not in ("float32", "float16"):
            raise ValueError(f"dtype {dtype!r}: float32 or float16")
        if pool not in (None, "frames"):
            raise ValueError(f"pool {pool!r}: None or 'frames'")
        self.out = Path(out)
        self.shards = self.out / SHARD_DIR
        self.shards.mkdir(parents=True, exist_ok=True)
        self.process = int(process_index)
        self.items_per_shard, self.dtype, self.pool = int(items_per_shard), np.dtype(dtype), pool
        self.manifest = self.out / f"manifest-p{self.process:05d}.jsonl"
        self._buffer: list[ItemResult] = []
        self.written = 0
        self.failed = 0
        self._seq = self._recover()

    def _recover(self) -> int:
        """Drop what a killed run of this process left uncommitted; the next shard number."""
        referenced = set()
        if self.manifest.exists():
            records, good = _manifest_lines(self.manifest)
            if good != self.manifest.stat().st_size:  # cut the torn tail before appending
                with open(self.manifest, "r+b") as f:
                    f.truncate(good)
                    f.flush()
                    os.fsync(f.fileno())
            referenced = {r["shard"] for r in records if "shard" in r}
        prefix = f"p{self.process:05d}-"
        seq = 0
        for f in self.shards.iterdir():
            if f.name.startswith(f".{prefix}"):  # a temporary file of a killed write
                f.unlink()
            elif f.name.startswith(prefix) and _SHARD.match(f.name):
                seq = max(seq, int(_SHARD.match(f.name).group(2)) + 1)
                if f.name not in referenced:  # written, never committed: an orphan
                    f.unlink()
        return seq

    def _append(self, record: dict) -> None:
        line = (json.dumps(record) + "\n").encode()
        with open(self.manifest, "ab") as f:
            f.write(line)
            f.flush()
            os.fsync(f.fileno())

    def add(self, result: ItemResult) -> None:
        self._buffer.append(result)
        if len(self._buffer) >= self.items_per_shard:
            self.flush()

    def fail(self, ident: str, reason: str) -> None:
        self._append({"failed": ident, "reason": reason})
        self.failed += 1

    def flush(self) -> None:
        if not self._buffer:
            return
        items, self._buffer = self._buffer, []
        name = f"p{self.process:05d}-{self._seq:06d}.npz"
        self._seq += 1
        buf = io.BytesIO()
        np.savez(buf, **self._arrays(items))
        write_atomic(self.shards / name, buf.getvalue())
        self._append({"shard": name, "ids": [r.id for r in items]})
        self.written += len(items)

    def _arrays(self, items: list[ItemResult]) -> dict[str, np.ndarray]:
        lengths = [r.frames.shape[0] for r in items]
        windows = [r.window_scores.shape[0] for r in items]
        if self.pool == "frames":
            relevance = np.concatenate([r.frames for r in items])
        else:
            relevance = np.concatenate([r.relevance for r in items], axis=0)
        arrays = {
            "ids": np.asarray([r.id for r in items], dtype=str),
            "relevance": relevance.astype(self.dtype),
            "frame_offsets": np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64),
            "score": np.asarray([r.score for r in items], np.float32),
            "window_scores": np.concatenate([r.window_scores for r in items]).astype(np.float32),
            "window_offsets": np.concatenate([[0], np.cumsum(windows)]).astype(np.int64),
            "relevance_outside": np.asarray([r.outside for r in items], np.float32),
            "relevance_outside_abs": np.asarray([r.outside_abs for r in items], np.float32),
            "meta": np.asarray([json.dumps(r.meta, sort_keys=True, default=str) for r in items],
                               dtype=str),
        }
        if self.pool is None:  # per-frame sums in float32 beside the full relevance (1/F of it)
            arrays["frames"] = np.concatenate([r.frames for r in items]).astype(np.float32)
        return arrays

    def close(self) -> None:
        self.flush()


class Results(Mapping):
    """Read a results folder: a mapping ``id -> result dict`` in commit order.

    A result dict holds ``id``, ``relevance`` (float32, the features' layout with time
    ``T`` frames long; ``[T]`` when the run pooled to frames), ``frames [T]``, ``score``,
    ``window_scores [W]``, ``relevance_outside``, ``relevance_outside_abs`` (``nan`` in
    shards written before it was stored) and the item's metadata (``n_samples``,
    ``sample_rate``, ``label`` ...). Only committed shards are read. ``failures``: ``{id:
    reason}``; ``duplicates``: ids committed twice (empty unless the folder was tampered with).
    """

    def __init__(self, out: str | os.PathLike):
        self.out = Path(out)
        if not (self.out / RUN_FILE).exists():
            raise FileNotFoundError(f"{self.out}: no {RUN_FILE}; not a corpus results folder")
        self.config = json.loads((self.out / RUN_FILE).read_text())
        self._where, self.failures, self.duplicates = read_manifests(self.out)
        self._cache: OrderedDict[str, dict] = OrderedDict()
        self.pooled = self.config.get("pool") == "frames"
        self.time_axis = int(self.config.get("layout", {}).get("time_axis", 0))

    @property
    def ids(self) -> list[str]:
        return list(self._where)

    def __len__(self) -> int:
        return len(self._where)

    def __iter__(self) -> Iterator[str]:
        return iter(self._where)

    def __getitem__(self, ident: str) -> dict:
        shard = self._shard(self._where[ident])
        return self._item(shard, shard["index"][ident])

    def values(self) -> Iterator[dict]:  # shard by shard: each file read once
        by_shard: dict[str, list[str]] = {}
        for ident, name in self._where.items():
            by_shard.setdefault(name, []).append(ident)
        for name, idents in by_shard.items():
            shard = self._shard(name)
            for ident in idents:
                yield self._item(shard, shard["index"][ident])

    def items(self) -> Iterator[tuple[str, dict]]:
        for r in self.values():
            yield r["id"], r

    def _shard(self, name: str) -> dict:
        if name not in self._cache:
            with np.load(self.out / SHARD_DIR / name) as z:
                data = {k: z[k] for k in z.files}
            data["index"] = {str(i): n for n, i in enumerate(data["ids"])}
            self._cache[name] = data
            while len(self._cache) > 2:
                self._cache.popitem(last=False)
        return self._cache[name]

    def _item(self, s: dict, n: int) -> dict:
        f0, f1 = s["frame_offsets"][n], s["frame_offsets"][n + 1]
        w0, w1 = s["window_offsets"][n], s["window_offsets"][n + 1]
        rel = s["relevance"][f0:f1].astype(np.float32)
        frames = rel if self.pooled else s["frames"][f0:f1]
        if not self.pooled:
            rel = np.moveaxis(rel, 0, self.time_axis)
        return {**json.loads(str(s["meta"][n])), "id": str(s["ids"][n]), "relevance": rel,
                "frames": frames, "score": float(s["score"][n]),
                "window_scores": s["window_scores"][w0:w1],
                "relevance_outside": float(s["relevance_outside"][n]),
                "relevance_outside_abs": float(s["relevance_outside_abs"][n])
                if "relevance_outside_abs" in s else float("nan")}


def open_results(out: str | os.PathLike) -> Results:
    """The results of a corpus run (complete or not) as a :class:`Results` mapping."""
    return Results(out)
