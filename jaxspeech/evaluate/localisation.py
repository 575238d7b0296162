"""Localisation on planted evidence: relevance mass in a mask, and the pointing game."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np


def _expand_mask(mask, shape: tuple[int, ...], time_axis: int) -> jnp.ndarray:
    """A mask in the features' layout, or ``[B, frames]`` spread over every other axis."""
    mask = jnp.asarray(mask).astype(bool)
    if mask.shape == tuple(shape):
        return mask
    t = time_axis % len(shape)
    if mask.shape == (shape[0], shape[t]):
        view = [shape[0]] + [1] * (len(shape) - 1)
        view[t] = shape[t]
        return jnp.broadcast_to(mask.reshape(view), shape)
    raise ValueError(f"mask of shape {tuple(mask.shape)} fits neither the features {tuple(shape)} "
                     f"nor [batch, frames] = {(shape[0], shape[t])}")


def mass_in_mask(relevance, mask, *, time_axis: int = -1) -> np.ndarray:
    """``[B]``: relevance mass accuracy (Arras et al. 2022) — the share of each item's
    positive relevance that falls inside ``mask``: ``Σ_mask R⁺ / Σ R⁺`` (NaN where an item
    has no positive relevance). ``mask``: bool in the relevance's layout, or ``[B, frames]``
    (frames along ``time_axis``, counted with the batch axis)."""
    r = jnp.asarray(relevance)
    m = _expand_mask(mask, r.shape, time_axis)
    pos = jnp.maximum(r, 0).reshape(r.shape[0], -1)
    inside = jnp.where(m.reshape(r.shape[0], -1), pos, 0).sum(-1)
    total = pos.sum(-1)
    return np.asarray(jnp.where(total > 0, inside / jnp.where(total > 0, total, 1), jnp.nan))


def pointing_game(relevance, mask, *, time_axis: int = -1) -> np.ndarray:
    """``[B]`` bool: whether each item's most relevant feature (the first on ties) lies in
    ``mask`` (Zhang et al. 2018). ``mask`` as in :func:`mass_in_mask`."""
    r = jnp.asarray(relevance)
    m = _expand_mask(mask, r.shape, time_axis).reshape(r.shape[0], -1)
    top = jnp.argmax(r.reshape(r.shape[0], -1), axis=-1)
    return np.asarray(jnp.take_along_axis(m, top[:, None], axis=1)[:, 0])
