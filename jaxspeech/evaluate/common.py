"""What the three checks share: frozen targets, baselines, valid frames, running a method."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax.numpy as jnp
import numpy as np

from jaxspeech.attribution import attribute
from jaxspeech.attribution import targets as _targets
from jaxspeech.attribution.targets import Target

# A method is a name ``jaxspeech.attribute`` knows, or a function
# ``fn(model, features, target, params, kwargs) -> relevance [features.shape]``.
Method = str | Callable[..., Any]

DEFAULT_METHODS = ("saliency", "gradient_x_input", "integrated_gradients", "smoothgrad",
                   "attnlrp", "cp_lrp", "rollout", "gradient_rollout")

# What jaxspeech.attribute raises when a method does not apply to a model (rollout on a
# model without attention, Grad-CAM without a layer, an unknown name): the row says so.
CANNOT_RUN = (ValueError, TypeError, KeyError, NotImplementedError)


def fixed_target(model, features, target: Target, kwargs: Mapping | None = None,
                 params=None) -> Target:
    """``target`` with each item's decision frozen: ``predicted_class`` picks the top class
    anew on every input, so on perturbed inputs (or a randomised model) it would explain
    a different class; it becomes ``class_logit`` of the class chosen on ``features``.
    Any other target is returned unchanged."""
    if target.name != "predicted_class":
        return target
    params = model.params if params is None else params
    output, inter = model.forward(params, jnp.asarray(features), **dict(kwargs or {}))
    logits = output if target.layer is None else inter[target.layer]
    index = np.asarray(jnp.argmax(logits, axis=-1))
    return dataclasses.replace(_targets.class_logit(index), layer=target.layer)


def _baseline(x: jnp.ndarray, baseline) -> jnp.ndarray:
    """The removal value per feature: ``None`` the item's minimum (silence in log-mel terms),
    a number or array (broadcast to ``x``), or ``fn(x) -> array``."""
    if baseline is None:
        axes = tuple(range(1, x.ndim))
        return jnp.broadcast_to(x.min(axis=axes, keepdims=True), x.shape)
    value = baseline(x) if callable(baseline) else baseline
    return jnp.broadcast_to(jnp.asarray(value, x.dtype), x.shape)


def valid_frames_of(model, sizes: Sequence[int] | np.ndarray, n_frames: int) -> np.ndarray | None:
    """``[B]`` feature frames that hold audio for clips of ``sizes`` samples
    (``samples // hop + 1``, capped at ``n_frames``); the rest is padding (Whisper's 30 s
    window, a batch of unequal ECAPA clips). ``None`` for front ends that repeat short
    clips to fill their window (CLAP's ``repeatpad``): every frame holds audio."""
    if getattr(model.config, "padding", None) == "repeatpad":
        return None
    hop = model.family.hop_length(model.config)
    return np.minimum(np.asarray(sizes, np.int64) // hop + 1, n_frames).astype(np.int32)


def _resolve_valid(valid_frames, x: jnp.ndarray, time_axis: int) -> jnp.ndarray:
    n_t = x.shape[time_axis]
    if valid_frames is None:
        return jnp.full((x.shape[0],), n_t, jnp.int32)
    v = np.broadcast_to(np.asarray(valid_frames, np.int64), (x.shape[0],))
    return jnp.asarray(np.clip(v, 1, n_t), jnp.int32)


def _sizes(wave) -> np.ndarray:
    if isinstance(wave, (list, tuple)):
        return np.array([np.asarray(w).shape[-1] for w in wave])
    wave = np.asarray(wave)
    return np.full(1 if wave.ndim == 1 else wave.shape[0], wave.shape[-1])


def _axes(ndim: int, time_axis: int) -> tuple[int, int | None]:
    """(time axis, frequency axis) of ``[B, ...]`` features; frequency is the last axis that
    is not time (Whisper ``[B, mels, T]``: 1; ECAPA ``[B, T, mels]``: 2; CLAP
    ``[B, ch, T, 64]``: 3 — CLAP's channels share their patches)."""
    t = time_axis % ndim
    if ndim < 3:
        return t, None
    return t, ndim - 1 if t != ndim - 1 else ndim - 2


def _relevance(model, method: Method, features, kwargs, target, params, options) -> jnp.ndarray:
    if callable(method):
        return jnp.asarray(method(model, features, target, params, kwargs))
    return attribute(model, features=features, target=target, method=method, params=params,
                     **dict(options or {}), **kwargs).relevance


def _mean(a) -> float:
    a = np.asarray(a, np.float64)
    return float(np.nanmean(a)) if np.isfinite(a).any() else float("nan")


def markdown_table(head: Sequence[str], body: Sequence[Sequence[str]], caption: str) -> str:
    """A markdown table with its caption under it (the evaluation tables' ``markdown()``)."""
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in body]
    return "\n".join(lines + ["", caption])


def text_table(head: Sequence[str], body: Sequence[Sequence[str]], caption: str) -> str:
    """The same table as aligned plain-text columns (the evaluation tables' ``text()``)."""
    widths = [max(len(row[j]) for row in [head, *body]) for j in range(len(head))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip()
             for row in [head, *body]]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines + ["", caption])
