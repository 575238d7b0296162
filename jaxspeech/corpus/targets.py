"""What a corpus run explains: one target for all items, or one built from each item's fields.

Fixed targets (the same for every item), as ``jaxspeech attribute`` has them:
``default``, ``output-norm``, ``predicted``, ``class:N``, ``layer-norm:LAYER``,
``cosine:AUDIO`` (similarity to AUDIO's embedding), ``text:LABEL`` (CLAP, similarity to
LABEL's text embedding).

Per-item targets, read from the source's fields (a manifest's columns, a TFDS feature):
``label`` (the logit of the item's integer ``label``: ECAPA's classifier),
``reference`` (cosine similarity to the embedding of the item's ``reference`` audio:
speaker-verification trials; each reference is embedded once), ``text`` (CLAP similarity
to the item's ``text``, e.g. an AudioCaps caption).

Each batch gets a :class:`~jaxspeech.attribution.targets.Target` whose arrays have the
batch's size (one row per item, so they are split over the devices with the items), and
all batches share one compiled attribution. A per-item ``text`` target is the cosine of
the audio embedding and the item's text embedding, which is CLAP's audio-text similarity.
Embeddings are pooled to one vector per clip (Whisper: the mean over its encoder frames, as the cosine target
pools the explained output); text embeddings come from ``--text-embeddings`` (an ``.npz``
with ``texts [N]`` and ``embeddings [N, D]``) or the CLAP checkpoint's text tower, run in JAX.
"""

from __future__ import annotations

import dataclasses
import os
import threading
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxspeech.attribution import targets as T
from jaxspeech.corpus import batching

__all__ = ["TargetSpec", "parse", "embed", "TextTable"]

PER_ITEM = ("label", "reference", "text")


def logits_layer(model) -> str:
    """The name the model sows its classifier logits under (``classifier.logits`` or
    ``logits``, whichever this version of the model uses)."""
    from jaxspeech.attribution.methods import layer_names

    spec, kwargs = model.family.example_features(model.config, 1)
    names = layer_names(model.config, spec, kwargs)
    for name in ("classifier.logits", "logits"):
        if name in names:
            return name
    raise ValueError(f"{model.kind} has no classifier logits (layers: {', '.join(names)}); "
                     "label/predicted/class targets need a classifier head")


def _on_logits(target: T.Target, model) -> T.Target:
    if target.layer is not None and target.layer.endswith("logits"):
        return dataclasses.replace(target, layer=logits_layer(model))
    return target


@jax.jit
def _pool_embedding(y):
    return y.mean(axis=1) if y.ndim == 3 else y


def embed(model, waves: Sequence[np.ndarray], layout: batching.Layout, params=None,
          batch_size: int = 8) -> np.ndarray:
    """``[N, D]`` embeddings of clips (each ``[samples]`` at the model's rate), computed in the
    run's fixed shapes: padded to their bucket with their lengths, ``batch_size`` rows per
    call. Clips longer than the window use its first window (the model's own view)."""
    params = model.params if params is None else params
    batcher = batching.Batcher(layout, batch_size)
    rows = [batching.Row(i, 0, 1, w if layout.window is None else w[: layout.window])
            for i, w in enumerate(waves)]
    out: dict[int, np.ndarray] = {}
    for batch in batcher.add(rows) + batcher.flush():
        features, kwargs = model.family.prepare(model.config, jnp.asarray(batch.wave),
                                                batch.lengths if layout.lengths else None)
        y = np.asarray(_pool_embedding(model.apply(params, features, **kwargs)))
        for i, row in enumerate(batch.rows):
            out[row.key] = y[i]
    return np.stack([out[i] for i in range(len(waves))])


class TextTable:
    """Text embeddings: from an ``.npz`` (``texts``, ``embeddings``) or a CLAP text tower
    (``tower``: a :class:`~jaxspeech.clap_text.TextTower`, a CLAP model holding one, or a
    checkpoint folder; run in JAX on first use, then cached)."""

    def __init__(self, path: str | os.PathLike | None = None, tower=None):
        self._table: dict[str, np.ndarray] = {}
        self.tower = tower
        if path is not None:
            with np.load(path) as z:
                texts, emb = [str(t) for t in z["texts"]], np.asarray(z["embeddings"], np.float32)
            if len(texts) != emb.shape[0]:
                raise ValueError(f"{path}: {len(texts)} texts but {emb.shape[0]} embeddings")
            self._table.update(zip(texts, emb, strict=True))

    def __call__(self, texts: Sequence[str]) -> np.ndarray:
        missing = sorted({t for t in texts if t not in self._table})
        if missing:
            if self.tower is None:
                raise KeyError(f"no text embedding for {missing[:3]} (give --text-embeddings "
                               "with these texts, or a CLAP checkpoint with its text tower)")
            from jaxspeech.clap_text import clap_text_embeddings

            self._table.update(zip(missing, clap_text_embeddings(self.tower, missing),
                                   strict=True))
        return np.stack([self._table[t] for t in texts])

    def has(self, text: str) -> bool:
        return text in self._table or self.tower is not None


@dataclasses.dataclass
class TargetSpec:
    """A target for a whole corpus: ``fixed`` for all items, or ``per_item`` (``label``,
    ``reference``, ``text``) built per batch by :meth:`for_batch`."""

    spec: str
    fixed: T.Target | None = None
    per_item: str | None = None
    logits: str | None = None
    texts: TextTable | None = None
    _references: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)
    _pending: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)
    _lock: threading.Lock = dataclasses.field(default_factory=threading.Lock)

    # --- loader side (any thread): check an item, read what its target needs
    def check(self, fields: dict, read: Callable[[str], np.ndarray]) -> None:
        """Raise ``ValueError`` when an item cannot get this target; read its reference."""
        if self.per_item is None:
            return
        value = fields.get(self.per_item)
        if value is None or value == "":
            raise ValueError(f"target {self.spec!r} needs a {self.per_item!r} for this item")
        if self.per_item == "label" and not isinstance(value, (int, np.integer)):
            raise ValueError(f"label {value!r} is not a class index (target 'label' takes "
                             "integer labels)")
        if self.per_item == "text" and not self.texts.has(str(value)):
            raise ValueError(f"no text embedding for {value!r}")
        if self.per_item == "reference":
            with self._lock:
                known = value in self._references or value in self._pending
            if not known:
                try:
                    wave = read(value)
                except (OSError, ValueError) as e:
                    raise ValueError(f"reference {value}: {e}") from e
                with self._lock:
                    self._pending[value] = wave

    # --- device side (the main thread)
    def for_batch(self, model, layout: batching.Layout, fields: Sequence[dict], batch_size: int,
                  params=None) -> T.Target:
        """The target of a batch whose first ``len(fields)`` rows are real (the rest repeat
        row 0)."""
        if self.per_item is None:
            return self.fixed
        values = [fields[i if i < len(fields) else 0][self.per_item] for i in range(batch_size)]
        if self.per_item == "label":
            return dataclasses.replace(T.class_logit(np.asarray(values, np.int32)), layer=self.logits)
        if self.per_item == "text":
            # CLAP's audio-text similarity is the cosine of the two embeddings; as a cosine
            # with one text row per item, the target's arrays follow the batch's rows
            return T.cosine_similarity(self.texts([str(v) for v in values]))
        with self._lock:
            pending, self._pending = self._pending, {}
        if pending:
            paths = sorted(pending)
            emb = embed(model, [pending[p] for p in paths], layout, params, batch_size)
            self._references.update(zip(paths, emb, strict=True))
        return T.cosine_similarity(np.stack([self._references[v] for v in values]))

    def describe(self) -> str:
        return self.spec


def parse(spec: str | T.Target | None, model, *, checkpoint: str | None = None,
          layout: batching.Layout | None = None, text_embeddings: str | None = None) -> TargetSpec:
    """A :class:`TargetSpec` from a string (module docs) or a ready ``Target``."""
    if isinstance(spec, T.Target):
        return TargetSpec(spec.name, fixed=spec)
    spec = spec or "default"
    kind, _, arg = spec.partition(":")
    # the model's own text tower (a ClapModel checkpoint), else the checkpoint folder's
    text_tower = getattr(model, "text", None)
    if text_tower is None and model.kind == "clap" and checkpoint and os.path.isdir(checkpoint):
        text_tower = checkpoint
    if kind in PER_ITEM and not arg:
        out = TargetSpec(spec, per_item=kind)
        if kind == "label":
            out.logits = logits_layer(model)
        if kind == "text":
            out.texts = TextTable(text_embeddings, text_tower)
        return out
    fixed: Any
    if kind == "default":
        fixed = _on_logits(T.default(model), model)
    elif kind == "output-norm":
        fixed = T.output_norm()
    elif kind == "predicted":
        fixed = T.predicted_class(logits_layer(model))
    elif kind == "class":
        fixed = dataclasses.replace(T.class_logit(int(arg)), layer=logits_layer(model))
    elif kind == "layer-norm":
        fixed = T.layer_norm(arg)
    elif kind == "cosine":
        from jaxspeech.corpus.sources import read_audio

        layout = layout or batching.layout_for(model)
        fixed = T.cosine_similarity(embed(model, [read_audio(arg, model.sample_rate)], layout)[0])
    elif kind == "text":
        fixed = T.text_similarity(TextTable(text_embeddings, text_tower)([arg]), 0)
    else:
        raise ValueError(f"unknown target {spec!r}; one of default, output-norm, predicted, "
                         "class:N, layer-norm:LAYER, cosine:AUDIO, text:LABEL, label, reference, "
                         "text")
    return TargetSpec(spec, fixed=fixed)
