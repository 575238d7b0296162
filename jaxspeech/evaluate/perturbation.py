"""MoRF / LeRF perturbation curves and the area between them (ABPC), one jitted call each."""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np

from jaxspeech.attribution import methods as _methods
from jaxspeech.attribution.targets import Target
from jaxspeech.evaluate.common import _axes, _baseline, _resolve_valid, fixed_target


def _units(shape: tuple[int, ...], time_axis: int, patch: tuple[int, int] | None):
    """``(ids [shape[1:]], start [U], time [shape[1:]], U)``: each feature's unit, the first
    frame of each unit, each feature's frame. ``patch=(bins, frames)``; ``None``: frames."""
    t_ax, f_ax = _axes(len(shape), time_axis)
    grid = np.indices(shape[1:], dtype=np.int32)
    time = grid[t_ax - 1]
    n_t = shape[t_ax]
    if patch is None:
        return time, np.arange(n_t, dtype=np.int32), time, n_t
    if f_ax is None:
        raise ValueError(f"features of shape {shape} have no frequency axis for patches")
    pf, pt = (int(p) for p in patch)
    if pf < 1 or pt < 1:
        raise ValueError(f"patch sizes must be >= 1, got {patch}")
    n_fb, n_tb = -(-shape[f_ax] // pf), -(-n_t // pt)  # edge patches are smaller
    ids = (time // pt) * n_fb + grid[f_ax - 1] // pf
    start = (np.arange(n_tb * n_fb, dtype=np.int32) // n_fb) * pt
    return ids.astype(np.int32), start, time, n_tb * n_fb


def _ranks(key: jnp.ndarray) -> jnp.ndarray:
    """``[B, U]`` -> the position of each unit in ascending order of ``key`` (0 first);
    ties keep index order, so a constant relevance removes the same units both ways."""
    return jnp.argsort(jnp.argsort(key, axis=-1, stable=True), axis=-1)


@functools.partial(jax.jit, static_argnames=("n_units",))
def _feature_ranks(relevance, ids, start, time, valid, *, n_units):
    """Each feature's place in the MoRF and the LeRF removal order ``[B, *features]`` (the
    rank of its unit; ``n_units``, i.e. never, outside the valid frames) and ``[B]``
    valid units per item. Kept apart from the model so that frames and patches share
    one compiled perturbation run."""
    b = relevance.shape[0]
    unit_rel = jax.vmap(lambda r: jax.ops.segment_sum(r.reshape(-1), ids.reshape(-1), n_units))(
        relevance)                                                    # [B, U]
    valid_unit = start[None, :] < valid[:, None]                      # [B, U]
    in_valid = time[None] < valid.reshape((b,) + (1,) * time.ndim)     # [B, *features]
    # Padding goes last in both orders and is never reached: n_removed <= n_valid.
    never = jnp.asarray(n_units, jnp.int32)
    morf = _ranks(jnp.where(valid_unit, -unit_rel, jnp.inf))[:, ids]
    lerf = _ranks(jnp.where(valid_unit, unit_rel, jnp.inf))[:, ids]
    return (jnp.where(in_valid, morf, never), jnp.where(in_valid, lerf, never),
            valid_unit.sum(axis=1).astype(jnp.int32))


@functools.partial(jax.jit, static_argnames=("config", "steps", "batch_size"))
def _curves(config, params, x, kwargs, target, baseline, rank_morf, rank_lerf, n_valid, *, steps,
            batch_size):
    b = x.shape[0]
    per_item = (b,) + (1,) * (x.ndim - 1)

    def run(job):
        lerf, k = job
        rank = jnp.where(lerf, rank_lerf, rank_morf)
        n_removed = (2 * k * n_valid + steps) // (2 * steps)           # round(k / S · n_valid)
        gone = rank < n_removed.reshape(per_item)
        s, _, _ = _methods.score(config, params, jnp.where(gone, baseline, x), kwargs, target)
        return s

    # MoRF k = 0..S and LeRF k = 1..S-1: the clean input (k = 0) and the fully removed
    # one (k = S) are the same for both curves and run once.
    ks = np.concatenate([np.arange(steps + 1), np.arange(1, steps)]).astype(np.int32)
    is_lerf = np.arange(ks.size) > steps
    scores = jax.lax.map(run, (jnp.asarray(is_lerf), jnp.asarray(ks)),
                         batch_size=min(batch_size, ks.size))        # [jobs, B]
    morf = scores[:steps + 1]
    lerf = jnp.concatenate([scores[:1], scores[steps + 1:], scores[steps:steps + 1]])
    fraction = ((2 * jnp.arange(steps + 1)[:, None] * n_valid[None] + steps) // (2 * steps)
                / n_valid[None])
    return morf.T, lerf.T, fraction.T


def _auc(curve: np.ndarray) -> np.ndarray:
    """``[B, S+1]`` -> ``[B]``: trapezoidal area over the step fraction k/S ∈ [0, 1]."""
    return (curve.sum(-1) - 0.5 * (curve[:, 0] + curve[:, -1])) / (curve.shape[-1] - 1)


@dataclasses.dataclass(frozen=True)
class Curves:
    """MoRF and LeRF curves of one method on one batch.

    ``morf``, ``lerf``: ``[B, S+1]`` target after ``k = 0..S`` steps (k = 0: the clean
    input; k = S: every valid unit removed). ``removed``: ``[B, S+1]`` share of each
    item's valid units removed after step k (``round(k/S · units) / units``).
    ``units``: ``[B]`` valid units per item. ``unit``: ``"frames"`` or ``"patches FxT"``.
    """

    morf: np.ndarray
    lerf: np.ndarray
    removed: np.ndarray
    units: np.ndarray
    unit: str

    @property
    def morf_auc(self) -> np.ndarray:
        """``[B]``: area under MoRF over k/S ∈ [0, 1] (trapezoid; i.e. normalised by S)."""
        return _auc(self.morf)

    @property
    def lerf_auc(self) -> np.ndarray:
        return _auc(self.lerf)

    @property
    def abpc(self) -> np.ndarray:
        """``[B]``: ``AUC(LeRF) − AUC(MoRF)``, in the target's units (see :func:`abpc`)."""
        return self.lerf_auc - self.morf_auc


def abpc(curves: Curves) -> np.ndarray:
    """Area between the perturbation curves (AttnLRP protocol), ``[B]``.

    ``ABPC = AUC(LeRF) − AUC(MoRF)`` where each AUC is the trapezoidal area under the
    curve over the removal fraction ``k/S ∈ [0, 1]`` with ``S`` steps — the sum over
    steps normalised by the number of steps, ``(Σ_k f_k − (f_0 + f_S)/2) / S``. It is in
    the target's units (a logit, a cosine), not divided by the clean score. Positive:
    removing what the method calls relevant hurts the target more than removing what
    it calls irrelevant. A relevance that ranks nothing (a constant) gives 0 exactly.
    """
    return curves.abpc


def perturbation_curves(
    model,
    features,
    relevance,
    target: Target,
    *,
    kwargs: Mapping | None = None,
    params=None,
    unit: str = "frames",
    patch: tuple[int, int] = (8, 10),
    steps: int = 20,
    baseline=None,
    valid_frames=None,
    batch_size: int = 4,
) -> Curves:
    """MoRF / LeRF curves of ``target`` when units of ``features`` are replaced by a baseline.

    ``features``: the model input (Whisper ``[B, n_mels, T]``, ECAPA ``[B, T, n_mels]``,
    CLAP ``[B, ch, T, 64]``); ``relevance``: the same shape. ``unit``: ``"frames"``
    (every feature of a frame; the time axis is ``model.family.time_axis``) or
    ``"patches"`` of ``patch = (frequency bins, frames)`` (edge patches smaller; CLAP's
    channels share a patch). A unit's relevance is the sum over its features; units
    are ranked per item and ``round(k/S · units)`` of them are removed at step ``k``.
    ``baseline``: what removed features become — ``None``: each item's minimum (silence
    in log-mel terms), a number, an array broadcastable to ``features``, or
    ``fn(features) -> array``. ``valid_frames`` ``[B]`` (or a number): only frames
    ``< valid_frames`` are ranked and removed, so Whisper's padded region neither
    dominates LeRF nor counts as a step. ``kwargs``: the model's extra inputs
    (``{"lengths": ...}`` for ECAPA). ``batch_size``: steps run at once (memory).
    ``predicted_class`` targets are frozen to the clean decision (:func:`fixed_target`).
    All ``2S`` forwards are one jitted ``lax.map``. The AUCs and ABPC (:func:`abpc`) are
    areas over the removed fraction k/S ∈ [0, 1]: sums over steps divided by S.
    """
    if unit not in ("frames", "patches"):
        raise ValueError(f"unit must be 'frames' or 'patches', got {unit!r}")
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    x = jnp.asarray(features)
    relevance = jnp.asarray(relevance, x.dtype)
    if relevance.shape != x.shape:
        raise ValueError(f"relevance has shape {tuple(relevance.shape)}; the features have "
                         f"{tuple(x.shape)}")
    params = model.params if params is None else params
    kwargs = {k: jnp.asarray(v) for k, v in dict(kwargs or {}).items()}
    target = fixed_target(model, x, target, kwargs, params)
    time_axis = model.family.time_axis % x.ndim
    ids, start, time, n_units = _units(x.shape, time_axis, patch if unit == "patches" else None)
    rank_morf, rank_lerf, n_valid = _feature_ranks(
        relevance, jnp.asarray(ids), jnp.asarray(start), jnp.asarray(time),
        _resolve_valid(valid_frames, x, time_axis), n_units=n_units)
    morf, lerf, removed = _curves(model.config, params, x, kwargs, target, _baseline(x, baseline),
                                  rank_morf, rank_lerf, n_valid, steps=int(steps),
                                  batch_size=int(batch_size))
    name = "frames" if unit == "frames" else f"patches {int(patch[0])}x{int(patch[1])}"
    return Curves(np.asarray(morf), np.asarray(lerf), np.asarray(removed), np.asarray(n_valid),
                  name)
