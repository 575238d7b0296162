"""Corpora in: a folder of audio files, a manifest (CSV / JSONL), a TensorFlow Dataset, or
a list of files (``jaxspeech attribute a.wav b.flac``).

A source is listed first and read later. :meth:`Source.entries` is cheap (names and
fields, no audio) and comes in a stable order with stable ids, so the runner can take
each process's share and skip what a previous run completed *before* any audio is
decoded; :meth:`Source.load` then reads one entry as an :class:`Item`.

    src = open_source("corpus/")                       # every wav/flac/mp3/ogg below it
    src = open_source("trials.csv")                    # path[,id,label,reference,text,start,end]
    src = open_source("tfds:speech_commands", split="test", data_dir="~/tensorflow_datasets")
    src = open_source(["a.wav", "b.flac"])             # the files, in this order
    for item in src.items(16000):                      # bad files are logged and skipped
        item.id, item.wave, item.label

Ids: the folder source uses the path relative to the folder (``spk1/utt3.flac``); the
manifest its ``id`` column, else the path as written plus ``@start-end`` for a segment;
TFDS ``SPLIT/INDEX`` (the index in the prepared split: TFDS orders examples by a hash of
their keys, so it is stable across preparations of the same data; the example's own ``id``
feature, if any, is kept as the field ``key``); a list of files the paths as given.
Duplicate ids are refused.

TFDS without TensorFlow: datasets prepared in the ``array_record`` format are read by
random access through ``tfds.data_source`` and need no TensorFlow, as long as their
features do not (``Tensor``, ``Text``, ``ClassLabel``, ``Scalar``: the L2-ARCTIC builder in
:mod:`jaxspeech.corpus.l2arctic` is such a dataset). Catalog datasets whose audio is a
``tfds.features.Audio`` feature, or that were prepared as ``tfrecord``, need TensorFlow
(``pip install tensorflow-cpu``); they are then read with ``tfds.load(..., download=False)``.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import logging
import math
import os
import threading
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from jaxspeech import audio

__all__ = ["Entry", "Item", "Source", "FolderSource", "ManifestSource", "TfdsSource",
           "FilesSource", "open_source", "AUDIO_EXTENSIONS"]

log = logging.getLogger("jaxspeech.corpus")

AUDIO_EXTENSIONS = (".wav", ".flac", ".mp3", ".ogg")
FIELDS = ("label", "reference", "text")


@dataclasses.dataclass(frozen=True)
class Entry:
    """One input before it is read: its id, where it is (``ref``) and its fields
    (``label``, ``reference``, ``text``, ``start``/``end`` in seconds, ...)."""

    id: str
    ref: Any
    fields: Mapping[str, Any] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class Item:
    """One input read: ``wave [samples]`` float32 mono at ``sample_rate``."""

    id: str
    wave: np.ndarray
    sample_rate: int
    fields: dict = dataclasses.field(default_factory=dict)

    @property
    def label(self):
        return self.fields.get("label")

    @property
    def reference(self):
        return self.fields.get("reference")

    @property
    def text(self):
        return self.fields.get("text")

    @property
    def duration(self) -> float:
        return self.wave.shape[0] / self.sample_rate


class Source:
    """Base class: ``entries()`` (stable order, unique ids) and ``load(entry, rate)``."""

    name = "source"

    def entries(self) -> list[Entry]:
        raise NotImplementedError

    def load(self, entry: Entry, sample_rate: int) -> Item:
        """Read ``entry`` as mono float32 at ``sample_rate``; raises ``AudioError`` /
        ``OSError`` / ``ValueError`` for input that cannot be used."""
        raise NotImplementedError

    def items(self, sample_rate: int) -> Iterator[Item]:
        """Every readable item in order; unreadable ones are logged and skipped."""
        for entry in self.entries():
            try:
                yield self.load(entry, sample_rate)
            except (OSError, ValueError, RuntimeError) as e:
                log.warning("skipped %s: %s", entry.id, e)

    def describe(self) -> dict:
        return {"kind": self.name}


def _unique(entries: list[Entry], where: str) -> list[Entry]:
    seen: dict[str, int] = {}
    for i, e in enumerate(entries):
        if e.id in seen:
            raise ValueError(f"{where}: id {e.id!r} appears twice (entries {seen[e.id]} and {i}); "
                             "ids must be unique so results can be resumed and merged")
        seen[e.id] = i
    return entries


def _check_wave(wave: np.ndarray, what: str) -> np.ndarray:
    wave = np.asarray(wave, np.float32)
    if wave.ndim != 1 or wave.shape[0] == 0:
        raise audio.AudioError(f"{what}: no samples")
    if not np.isfinite(wave).all():
        raise audio.AudioError(f"{what}: NaN or inf samples")
    return wave


def read_audio(path: str | os.PathLike, sample_rate: int, start: float | None = None,
               end: float | None = None) -> np.ndarray:
    """``[samples]`` float32 mono at ``sample_rate`` of ``path``, or of its segment
    ``[start, end)`` seconds (read without decoding the rest where the format allows)."""
    path = os.fspath(path)
    if start is None and end is None:
        return _check_wave(audio.read(path, sample_rate), path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"no such audio file: {path}")
    start = float(start or 0.0)
    try:
        import soundfile as sf

        rate = sf.info(path).samplerate
        data, rate = sf.read(path, start=int(round(start * rate)),
                             stop=None if end is None else int(round(float(end) * rate)),
                             dtype="float32", always_2d=True)
        data = data.mean(axis=1)
    except Exception as sf_error:  # mp3 on an old libsndfile, m4a: librosa seeks by time
        try:
            import warnings

            import librosa

            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                data, rate = librosa.load(path, sr=None, mono=True, offset=start,
                                          duration=None if end is None else float(end) - start)
        except Exception:
            raise audio.AudioError(f"cannot read {path}: {sf_error}") from sf_error
    what = f"{path}@{start:g}-{'' if end is None else f'{float(end):g}'}"
    return _check_wave(audio.resample(data, rate, sample_rate), what)


# --- a folder ------------------------------------------------------------------------------

class FolderSource(Source):
    """Every audio file (``AUDIO_EXTENSIONS``) below ``root``, recursively, sorted by
    relative path; hidden files and folders are skipped."""

    name = "folder"

    def __init__(self, root: str | os.PathLike, extensions: Sequence[str] = AUDIO_EXTENSIONS):
        self.root = Path(root)
        if not self.root.is_dir():
            raise FileNotFoundError(f"no such folder: {self.root}")
        self.extensions = tuple(e.lower() for e in extensions)

    def entries(self) -> list[Entry]:
        found = []
        for dirpath, dirnames, filenames in os.walk(self.root):
            dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
            for f in filenames:
                if not f.startswith(".") and f.lower().endswith(self.extensions):
                    path = Path(dirpath) / f
                    found.append(Entry(path.relative_to(self.root).as_posix(), str(path),
                                       {"source": str(path)}))
        return _unique(sorted(found, key=lambda e: e.id), str(self.root))

    def load(self, entry: Entry, sample_rate: int) -> Item:
        return Item(entry.id, read_audio(entry.ref, sample_rate), sample_rate, dict(entry.fields))

    def describe(self) -> dict:
        return {"kind": self.name, "root": str(self.root.resolve())}


# --- files named one by one ---------------------------------------------------------------

class FilesSource(Source):
    """Audio files named one by one, in the order given; each id is the path as given. A
    file that is missing or unreadable is listed like the others and fails when it is
    read, so the run reports it with its reason. ``describe`` leaves the paths out: a
    resumed run may name more files."""

    name = "files"

    def __init__(self, paths: Sequence[str | os.PathLike]):
        self.paths = [os.fspath(p) for p in paths]
        if not self.paths:
            raise ValueError("no audio files given")

    def entries(self) -> list[Entry]:
        return _unique([Entry(p, p, {"source": os.path.abspath(p)}) for p in self.paths],
                       "the audio files")

    def load(self, entry: Entry, sample_rate: int) -> Item:
        return Item(entry.id, read_audio(entry.ref, sample_rate), sample_rate, dict(entry.fields))


# --- a manifest ----------------------------------------------------------------------------

class ManifestSource(Source):
    """A CSV (header row) or JSONL manifest: ``path`` (relative to the manifest's folder or
    absolute) and optional ``id``, ``label``, ``reference`` (an audio path, resolved like
    ``path``), ``text``, ``start`` / ``end`` (seconds). Other columns are kept as fields."""

    name = "manifest"

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"no such manifest: {self.path}")

    def _rows(self) -> list[dict]:
        text = self.path.read_text()
        if self.path.suffix.lower() in (".jsonl", ".json", ".ndjson"):
            rows = []
            for n, line in enumerate(text.splitlines(), 1):
                if line.strip():
                    try:
                        rows.append(json.loads(line))
                    except json.JSONDecodeError as e:
                        raise ValueError(f"{self.path}:{n}: not JSON ({e})") from None
            return rows
        return [dict(r) for r in csv.DictReader(text.splitlines())]

    def _resolve(self, p: str) -> str:
        p = os.path.expanduser(str(p))
        return p if os.path.isabs(p) else str(self.path.parent / p)

    def entries(self) -> list[Entry]:
        out = []
        for n, row in enumerate(self._rows(), 1):
            if not row.get("path"):
                raise ValueError(f"{self.path}: row {n} has no 'path' (columns: {sorted(row)})")
            fields = {k: v for k, v in row.items() if v not in (None, "") and k not in ("id", "path")}
            for key in ("start", "end"):
                if key in fields:
                    fields[key] = float(fields[key])
            if "label" in fields:
                fields["label"] = _maybe_int(fields["label"])
            if "reference" in fields:
                fields["reference"] = self._resolve(fields["reference"])
            fields["source"] = self._resolve(row["path"])
            ident = row.get("id") or str(row["path"])
            if not row.get("id") and ("start" in fields or "end" in fields):
                ident += f"@{fields.get('start', 0.0):g}-{fields.get('end', '')}"
            out.append(Entry(str(ident), fields["source"], fields))
        return _unique(out, str(self.path))

    def load(self, entry: Entry, sample_rate: int) -> Item:
        f = entry.fields
        wave = read_audio(entry.ref, sample_rate, f.get("start"), f.get("end"))
        return Item(entry.id, wave, sample_rate, dict(f))

    def describe(self) -> dict:
        return {"kind": self.name, "path": str(self.path.resolve())}


def _maybe_int(value):
    if isinstance(value, str) and value.strip().lstrip("-").isdigit():
        return int(value)
    return value


# --- TensorFlow Datasets -------------------------------------------------------------------

class TfdsSource(Source):
    """A prepared TFDS split read from ``data_dir`` (never downloaded here).

    ``audio_key`` (default: ``audio``, else ``speech``), ``label_key`` (``label``, else
    ``speaker_id``, else the supervised label), ``text_key`` (``text``, else ``caption``) and
    ``id_key`` (``id``) name the features (``id_key``'s value is kept as the field ``key``).
    ``sample_rate`` is the Audio feature's, else the dataset's metadata ``sample_rate``, else
    ``sample_rate=`` given here. Integer PCM is scaled to [-1, 1).
    """

    name = "tfds"

    def __init__(self, name: str, split: str = "train", data_dir: str | os.PathLike | None = None,
                 *, audio_key: str | None = None, label_key: str | None = None,
                 text_key: str | None = None, id_key: str = "id", sample_rate: int | None = None):
        import tensorflow_datasets as tfds

        self.dataset, self.split = name, split
        self.data_dir = None if data_dir is None else os.path.expanduser(os.fspath(data_dir))
        if name.split("/")[0].split(":")[0] == "l2_arctic":
            from jaxspeech.corpus import l2arctic  # noqa: F401  (registers the builder)
        builder = tfds.builder(name, data_dir=self.data_dir)
        if not builder.data_path.exists() or not builder.info.splits:
            raise FileNotFoundError(
                f"TFDS dataset {name!r} is not prepared in {builder.data_path}; build it first "
                "(e.g. `tfds build` or builder.download_and_prepare()); nothing is downloaded here")
        self._builder = builder
        features = builder.info.features
        self.audio_key = audio_key or _first(features, ("audio", "speech"), "audio feature")
        supervised = builder.info.supervised_keys
        label_names = ("label", "speaker_id") + ((supervised[1],) if supervised and
                                                 isinstance(supervised[1], str) else ())
        self.label_key = label_key or _first(features, label_names, None)
        self.text_key = text_key or _first(features, ("text", "caption"), None)
        self.id_key = id_key if id_key in features else None
        rate = getattr(features[self.audio_key], "sample_rate", None)
        if not rate and builder.info.metadata:
            rate = builder.info.metadata.get("sample_rate")
        self.sample_rate = int(sample_rate or rate or 0)
        if not self.sample_rate:
            raise ValueError(f"TFDS {name}: no sample rate in its Audio feature or metadata; "
                             "pass sample_rate=")
        file_format = getattr(builder.info, "file_format", None)
        self._random_access = str(getattr(file_format, "value", file_format)) == "array_record"
        self._data, self._position, self._lock = None, -1, threading.Lock()

    def _example(self, index: int) -> Mapping[str, Any]:
        import tensorflow_datasets as tfds

        with self._lock:
            if self._random_access:
                if self._data is None:
                    self._data = tfds.data_source(self.dataset, split=self.split,
                                                  data_dir=self.data_dir)
                return self._data[index]
            # tfrecord is sequential: walk forward (the runner asks in index order), restart
            # when asked for an earlier one.
            if self._data is None or index < self._position:
                try:
                    import tensorflow  # noqa: F401
                except ImportError:
                    raise ImportError(
                        f"TFDS {self.dataset} is stored as tfrecord, which needs TensorFlow: "
                        "pip install tensorflow-cpu, or rebuild it with "
                        "file_format='array_record' to read it without TensorFlow") from None
                ds = tfds.load(self.dataset, split=self.split, data_dir=self.data_dir,
                               download=False)
                self._data, self._position = iter(tfds.as_numpy(ds)), -1
            while self._position < index:
                example, self._position = next(self._data), self._position + 1
            return example

    def __len__(self) -> int:
        return int(self._builder.info.splits[self.split].num_examples)

    def entries(self) -> list[Entry]:
        # Ids by index: listing needs no decoding (reading an ``id`` feature would decode
        # every example); the order of a prepared split is fixed by TFDS's key hashing.
        return [Entry(f"{self.split}/{i:08d}", i) for i in range(len(self))]

    def load(self, entry: Entry, sample_rate: int) -> Item:
        example = self._example(entry.ref)
        wave = audio.pcm_to_float(np.asarray(example[self.audio_key]))
        if wave.ndim == 2:  # [samples, channels]
            wave = wave.mean(axis=1)
        wave = _check_wave(audio.resample(wave, self.sample_rate, sample_rate), entry.id)
        fields: dict[str, Any] = {"source": f"tfds:{self.dataset}/{self.split}[{entry.ref}]"}
        if self.id_key:
            fields["key"] = _text(example[self.id_key])
        if self.label_key:
            fields["label"] = _plain(example[self.label_key])
        if self.text_key:
            fields["text"] = _text(example[self.text_key])
        for key, value in example.items():
            if key not in (self.audio_key, self.label_key, self.text_key, self.id_key) and \
                    np.ndim(value) == 0:
                fields.setdefault(key, _plain(value))
        return Item(entry.id, wave, sample_rate, fields)

    def describe(self) -> dict:
        return {"kind": self.name, "dataset": self.dataset, "split": self.split,
                "data_dir": self.data_dir}


def _first(features, names, what):
    for n in names:
        if n in features:
            return n
    if what is None:
        return None
    raise ValueError(f"no {what} among {sorted(features)}; name it (audio_key=...)")


def _text(value) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _plain(value):
    value = np.asarray(value)
    if value.dtype.kind in "SO":
        return _text(value.item())
    if value.dtype.kind in "iu":
        return int(value)
    if value.dtype.kind == "f":
        v = float(value)
        return v if math.isfinite(v) else None
    return value.item()


# --- dispatch --------------------------------------------------------------------------------

def open_source(spec: str | os.PathLike | Source | Sequence[str | os.PathLike],
                **options) -> Source:
    """``tfds:NAME`` (``split=``, ``data_dir=``, feature keys), a folder, a ``.csv`` /
    ``.jsonl`` manifest, or a list of audio files."""
    if isinstance(spec, Source):
        return spec
    if isinstance(spec, (list, tuple)):
        if options:
            raise ValueError(f"options {sorted(options)} apply to tfds: sources only")
        return FilesSource(spec)
    spec = os.fspath(spec)
    if spec.startswith("tfds:"):
        return TfdsSource(spec[len("tfds:"):], **options)
    if options:
        raise ValueError(f"options {sorted(options)} apply to tfds: sources only")
    if os.path.isdir(spec):
        return FolderSource(spec)
    if spec.lower().endswith((".csv", ".jsonl", ".json", ".ndjson")):
        return ManifestSource(spec)
    if not os.path.exists(spec):
        raise FileNotFoundError(f"no such folder or manifest: {spec}")
    raise ValueError(f"{spec}: give a folder of audio, a .csv/.jsonl manifest or tfds:NAME")
