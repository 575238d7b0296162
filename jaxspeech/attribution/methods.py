"""Attribution methods: each a backward pass (or several) over the same jitted forward.

Every method takes the whole batch in one compiled call. Items never interact in
any of the three models (BatchNorm runs from stored statistics), so the gradient
of ``sum_b target_b`` with respect to the batch is every item's own gradient:
one backward pass explains the batch. Integrated gradients and SmoothGrad map
that batched gradient over their steps with ``jax.lax.map`` (``batch_size`` steps
at once), never a Python loop.

All functions here are pure and jitted; :func:`jaxspeech.attribute` is the
convenient front door.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np

from jaxspeech import lrp
from jaxspeech.attribution.targets import Target, unknown_layer_message
from jaxspeech.convert.common import unflatten
from jaxspeech.layers import KEEP_ATTENTION_MAPS
from jaxspeech.model import _module, family_of, flatten_intermediates, intermediate_paths, param_shapes

__all__ = ["gradient", "integrated_gradients", "smoothgrad", "gradcam", "gradcam_map", "rollout",
           "gradient_rollout", "layer_names", "ig_nodes"]


def _variables(params, perturb, edits=None):
    variables = {"params": params} if edits is None else edits.variables(params)
    return variables if not perturb else {**variables, "perturbations": perturb}


def score(config, params, x, kwargs, target: Target, *, rules=None, remat=False, perturb=None,
          maps: bool = False, edits=None):
    """``(target [B], output, intermediates)`` of one forward. Attention maps are among the
    intermediates only with ``maps`` (or when the target reads one): without them the
    attention runs fused and its backward never holds ``[B, heads, T, T]``. ``edits``: a
    bound edit tree (:func:`jaxspeech.edits.bind`), applied in the forward."""
    maps = maps or (target.layer or "").endswith(".attention")
    collections = ["intermediates"] + ([KEEP_ATTENTION_MAPS] if maps else [])
    y, state = _module(config, rules, remat).apply(
        _variables(params, perturb, edits), x, **kwargs, mutable=collections)
    inter = flatten_intermediates(state.get("intermediates", {}))
    return target(y, inter, params, lrp.get_rules(rules)), y, inter


def _grad(config, params, x, kwargs, target, rules, remat, edits=None):
    def f(x_):
        s, _, _ = score(config, params, x_, kwargs, target, rules=rules, remat=remat, edits=edits)
        return s.sum(), s

    return jax.grad(f, has_aux=True)(x)


@functools.partial(jax.jit, static_argnames=("config", "rules", "remat"))
def gradient(config, params, x, kwargs, target, rules=None, remat=False, edits=None):
    """``(grad [x.shape], score [B])``; under ``rules`` the grad is LRP's (relevance = x·grad)."""
    return _grad(config, params, x, kwargs, target, rules, remat, edits)


def ig_nodes(steps: int, method: str = "gausslegendre") -> tuple[np.ndarray, np.ndarray]:
    """Path points α ∈ [0, 1] and their weights, as captum's ``approximation_parameters``."""
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    if method == "gausslegendre":
        nodes, weights = np.polynomial.legendre.leggauss(steps)
        return 0.5 * (nodes + 1), 0.5 * weights
    if method == "riemann_trapezoid":
        if steps < 2:
            raise ValueError("riemann_trapezoid needs at least 2 steps")
        w = np.full(steps, 1.0 / (steps - 1))
        w[[0, -1]] *= 0.5
        return np.linspace(0, 1, steps), w
    if method in ("riemann_left", "riemann_right", "riemann_middle"):
        offset = {"riemann_left": 0.0, "riemann_right": 1.0, "riemann_middle": 0.5}[method]
        return (np.arange(steps) + offset) / steps, np.full(steps, 1.0 / steps)
    raise ValueError(f"unknown integration method {method!r}")


@functools.partial(jax.jit, static_argnames=("config", "steps", "method", "batch_size", "remat"))
def integrated_gradients(config, params, x, kwargs, target, baseline, steps=32,
                         method="gausslegendre", batch_size=4, remat=False, edits=None):
    """Sundararajan et al. 2017: ``(x - baseline) · ∫ ∇f(baseline + α(x - baseline)) dα``.

    Returns ``(relevance, score [B], score at the baseline [B])``; completeness means
    ``relevance.sum() ≈ score - baseline_score`` per item.
    """
    alphas, weights = ig_nodes(steps, method)
    delta = x - baseline

    def step(aw):
        a, w = aw
        g, _ = _grad(config, params, baseline + a * delta, kwargs, target, None, remat, edits)
        return g * w

    grads = jax.lax.map(step, (jnp.asarray(alphas, x.dtype), jnp.asarray(weights, x.dtype)),
                        batch_size=min(batch_size, steps))
    s, _, _ = score(config, params, x, kwargs, target, edits=edits)
    s0, _, _ = score(config, params, baseline, kwargs, target, edits=edits)
    return delta * grads.sum(0), s, s0


@functools.partial(jax.jit, static_argnames=("config", "n_samples", "batch_size", "remat"))
def smoothgrad(config, params, x, kwargs, target, key, noise_level=0.1, n_samples=16,
               batch_size=4, remat=False, edits=None):
    """Smilkov et al. 2017: the gradient averaged over ``x + N(0, σ²)``, σ = noise_level ·
    (max - min of each item's features). Returns ``(mean gradient, score [B])``."""
    axes = tuple(range(1, x.ndim))
    span = x.max(axis=axes, keepdims=True) - x.min(axis=axes, keepdims=True)
    sigma = noise_level * span

    def step(k):
        g, _ = _grad(config, params, x + sigma * jax.random.normal(k, x.shape, x.dtype), kwargs,
                     target, None, remat, edits)
        return g

    grads = jax.lax.map(step, jax.random.split(key, n_samples), batch_size=min(batch_size, n_samples))
    s, _, _ = score(config, params, x, kwargs, target, edits=edits)
    return grads.mean(0), s


# --- layers: names, perturbations, Grad-CAM ----------------------------------------------

def _intermediate_tree(config, x, kwargs):
    def run(params, x_, kwargs_):
        return _module(config, None, False).apply(
            {"params": params}, x_, **kwargs_, mutable=["intermediates", KEEP_ATTENTION_MAPS])[1]

    return jax.eval_shape(run, param_shapes(config), x, kwargs)


def layer_paths(config, x, kwargs) -> dict[str, tuple[tuple[str, ...], jax.ShapeDtypeStruct]]:
    """``{"layers.3.hidden_state": (("layers.3", "hidden_state"), spec), ...}`` for every
    intermediate of the model on inputs shaped like ``x``."""
    tree = _intermediate_tree(config, x, kwargs).get("intermediates", {})
    return {name: (path, sown[0]) for name, (path, sown) in intermediate_paths(tree).items()}


def layer_names(config, x, kwargs=None) -> list[str]:
    """Names of every intermediate (layer output / attention map) the model exposes."""
    return sorted(layer_paths(config, x, kwargs or {}))


def _nest(path, value):
    for key in reversed(path):
        value = {key: value}
    return value


@functools.partial(jax.jit, static_argnames=("config", "layer", "path", "remat"))
def _gradcam(config, params, x, kwargs, target, layer, path, zeros, remat=False, edits=None):
    def f(z):
        s, _, inter = score(config, params, x, kwargs, target, remat=remat,
                            perturb=_nest(path, z), edits=edits)
        return s.sum(), (s, inter[layer])

    g, (s, acts) = jax.grad(f, has_aux=True)(zeros)
    if kwargs.get("lengths") is None:
        return gradcam_map(g, acts), s
    valid = (jnp.arange(acts.shape[1], dtype=jnp.float32)[None, :]
             < kwargs["lengths"].astype(jnp.float32)[:, None] * jnp.float32(acts.shape[1]))
    return gradcam_map(g, acts, valid), s


def gradcam_map(g: jnp.ndarray, acts: jnp.ndarray, valid: jnp.ndarray | None = None
                ) -> jnp.ndarray:
    """``relu(Σ_c mean_t(g_c) A_c)`` from a layer output ``acts [B, T, C]`` and the target's
    gradient ``g`` with respect to it -> ``[B, T]``. With ``valid [B, T]`` (bool) the mean
    runs over each item's valid frames and the others get no map, so a padded item gives
    the map it gives alone (the frames keep the layer's rate)."""
    if valid is None:
        weights = g.mean(axis=1, keepdims=True)  # [B, 1, C]: mean gradient per channel
        return jax.nn.relu((acts * weights).sum(-1))
    m = valid[:, :, None].astype(g.dtype)
    weights = (g * m).sum(axis=1, keepdims=True) / jnp.maximum(m.sum(axis=1, keepdims=True), 1)
    return jax.nn.relu((acts * weights).sum(-1)) * m[:, :, 0]


def gradcam(config, params, x, kwargs, target, layer: str, remat=False, edits=None):
    """Selvaraju et al. 2017 on a ``[B, T, C]`` layer output: ``relu(Σ_c mean_t(∂f/∂A_c) A_c)``.
    Returns ``(cam [B, T], score [B])``. With relative ``lengths [B]`` in ``kwargs``
    (ECAPA; SpeechBrain's convention, frame ``t`` valid when ``t < lengths * T``) the mean
    is over each item's valid frames and the padding's map is 0."""
    paths = layer_paths(config, x, kwargs)
    if layer not in paths:
        raise ValueError(unknown_layer_message(layer, [n for n in paths
                                                       if paths[n][1].ndim == 3]))
    path, spec = paths[layer]
    if len(spec.shape) != 3:
        raise ValueError(f"Grad-CAM needs a [batch, frames, channels] layer output; {layer!r} "
                         f"has shape {tuple(spec.shape)}")
    return _gradcam(config, params, x, kwargs, target, layer, path,
                    jnp.zeros(spec.shape, spec.dtype), remat, edits)


# --- attention rollout ---------------------------------------------------------------------
#
# Rollout multiplies per-layer token-to-token matrices. They are never built: a row vector
# over the explained output tokens is carried back through the layers with vector-matrix
# products. The family says where each map's rows and columns sit among the tokens
# (``Family.attention_geometry``): full attention over one sequence (Whisper), or windows
# of a grid with cyclic shifts and patch merging between stages (CLAP's Swin).

def attention_layers(config, x, kwargs) -> list[str]:
    """The self-attention maps of the model in layer order (``"layers.3.self_attn.attention"``):
    intermediates named ``*.attention`` that are square over their last two axes
    (``[B, heads, T, T]`` or windowed ``[B, W, heads, n, n]``)."""
    return _attention_names(layer_paths(config, x, kwargs))


def _attention_names(paths) -> list[str]:
    def square(name):
        shape = paths[name][1].shape
        return len(shape) in (4, 5) and shape[-1] == shape[-2]

    def order(name):
        return [int(t) if t.isdigit() else t for t in re.split(r"[.]", name)]

    return sorted((n for n in paths if n.endswith(".attention") and square(n)), key=order)


def _rows(target: Target, tokens: int, batch: int) -> jnp.ndarray:
    """Which output positions to explain: the target's frames if it names some, else all."""
    frames = target.args.get("frames") if isinstance(target.args, Mapping) else None
    if frames is None:
        return jnp.ones((batch, tokens)) / tokens
    mask = jnp.asarray(frames)
    if mask.dtype != jnp.bool_:
        mask = jnp.zeros(tokens, bool).at[mask].set(True)
    mask = jnp.broadcast_to(mask.reshape((-1, tokens)), (batch, tokens)).astype(jnp.float32)
    return mask / jnp.maximum(mask.sum(-1, keepdims=True), 1)


def _rollout_layers(config, paths, target: Target) -> tuple[str, ...]:
    """The maps rollout goes through, in forward order: all of them, or with a family
    geometry those up to the block whose output the target reads (later blocks cannot
    change it, and the explained rows live on that block's tokens). ``paths``: as
    :func:`layer_paths` gives them."""
    names = _attention_names(paths)
    _require_attention(config, names)
    hook = family_of(config).attention_geometry
    if hook is None:
        return tuple(names)
    geometry = hook(config)
    ordered = [g[0] for g in geometry]
    if sorted(ordered) != sorted(names):
        raise ValueError(f"{family_of(config).name}'s attention geometry names {ordered} but the "
                         f"model sows {names}")
    outputs = [g[1] for g in geometry]
    if target.layer in outputs:
        ordered = ordered[:outputs.index(target.layer) + 1]
    return tuple(ordered)


def _geometry(config, names) -> list[tuple[np.ndarray | None, np.ndarray | None]]:
    """``(windows [W, n] | None, sources [T, k] | None)`` of each map (None: full attention)."""
    hook = family_of(config).attention_geometry
    if hook is None:
        return [(None, None)] * len(names)
    table = {g[0]: (np.asarray(g[2]), None if g[3] is None else np.asarray(g[3]))
             for g in hook(config)}
    return [table[n] for n in names]


def _windowed(a: jnp.ndarray) -> jnp.ndarray:
    """A map as ``[B, W, heads, n, n]`` (full attention is one window)."""
    return a[:, None] if a.ndim == 4 else a


def _n_tokens(a: jnp.ndarray, windows: np.ndarray | None) -> int:
    return a.shape[-1] if windows is None else int((windows >= 0).sum())


def _times_windows(v: jnp.ndarray, m: jnp.ndarray, windows: np.ndarray | None) -> jnp.ndarray:
    """``v [B, T]`` times the ``T x T`` block matrix whose blocks are the windows' ``m
    [B, W, n, n]`` placed at the tokens ``windows [W, n]`` (rows and columns): gather the
    tokens into their window slots, multiply each window, read each token back from its
    slot. Weight that reaches a padding slot is dropped (it belongs to no token)."""
    if windows is None:
        return jnp.einsum("bi,bij->bj", v, m[:, 0])
    t, flat = v.shape[1], windows.reshape(-1)
    slots = np.where(flat < 0, t, flat)  # padding slots read a zero appended to v
    vw = jnp.pad(v, ((0, 0), (0, 1)))[:, slots].reshape((v.shape[0],) + windows.shape)
    out = jnp.einsum("bwi,bwij->bwj", vw, m).reshape(v.shape[0], -1)
    slot_of = np.empty(t, np.int64)  # every token sits in exactly one slot
    slot_of[flat[flat >= 0]] = np.flatnonzero(flat >= 0)
    return out[:, slot_of]


def _unmerge(v: jnp.ndarray, sources: np.ndarray | None, previous: int) -> jnp.ndarray:
    """``v [B, T]`` over merged tokens -> ``[B, previous]``: each merged token's weight spread
    evenly over the tokens it was made of (``sources [T, k]``, -1 = padding), so the
    total is kept."""
    if sources is None:
        return v
    valid = sources >= 0
    share = v / jnp.asarray(valid.sum(-1), v.dtype)[None, :]
    index = np.where(valid, sources, previous).reshape(-1)
    spread = jnp.repeat(share, sources.shape[1], axis=1) * jnp.asarray(valid.reshape(-1), v.dtype)[None]
    return jnp.zeros((v.shape[0], previous + 1), v.dtype).at[:, index].add(spread)[:, :previous]


def _roll_back(v, mats, geometry, step):
    """Carry ``v`` (over the last map's tokens) back to the first map's tokens:
    ``v ← step(v, mat, windows)`` at each map, un-merging between stages."""
    for i in reversed(range(len(mats))):
        windows, sources = geometry[i]
        v = step(v, mats[i], windows)
        if i:
            v = _unmerge(v, sources, _n_tokens(mats[i - 1], geometry[i - 1][0]))
    return v


@functools.partial(jax.jit, static_argnames=("config", "names", "remat"))
def _rollout(config, params, x, kwargs, target, names, remat=False, edits=None):
    s, _, inter = score(config, params, x, kwargs, target, remat=remat, maps=True, edits=edits)
    geometry = _geometry(config, names)
    mats = []
    for n in names:
        a = _windowed(inter[n]).mean(axis=2)  # [B, W, n, n], heads averaged
        size = a.shape[-1]
        a = 0.5 * a + 0.5 * jnp.eye(size)[None, None]
        mats.append(a / a.sum(axis=-1, keepdims=True))
    # rows · Â_L ⋯ Â_1, multiplied from the left: vector-matrix products, never T x T x T
    v = _rows(target, _n_tokens(mats[-1], geometry[-1][0]), x.shape[0])
    return _roll_back(v, mats, geometry, _times_windows), s


def rollout(config, params, x, kwargs, target, remat=False, edits=None):
    """Abnar & Zuidema 2020: head-averaged attention with the residual (0.5·A + 0.5·I),
    row-normalised and multiplied through the layers (window by window for windowed
    attention; patch merging spreads a token's weight evenly over its sources).
    Returns ``(tokens [B, T], score)``, T the first attention layer's tokens."""
    names = _rollout_layers(config, layer_paths(config, x, kwargs), target)
    return _rollout(config, params, x, kwargs, target, names, remat, edits)


@functools.partial(jax.jit, static_argnames=("config", "names", "paths", "remat"))
def _gradient_rollout(config, params, x, kwargs, target, names, paths, zeros, remat=False,
                      edits=None):
    perturb = unflatten(dict(zip(paths, zeros, strict=True)))

    def f(p):
        s, _, inter = score(config, params, x, kwargs, target, remat=remat, perturb=p, maps=True,
                            edits=edits)
        return s.sum(), (s, [inter[n] for n in names])

    grads, (s, maps) = jax.grad(f, has_aux=True)(perturb)
    flat_grads = [functools.reduce(lambda node, k: node[k], path, grads) for path in paths]
    geometry = _geometry(config, names)
    cams = [jax.nn.relu(_windowed(g) * _windowed(a)).mean(axis=2)
            for a, g in zip(maps, flat_grads, strict=True)]
    # R = (I + Ā_L) ⋯ (I + Ā_1); rows · R from the left, as vector-matrix products
    v = _rows(target, _n_tokens(cams[-1], geometry[-1][0]), x.shape[0])
    return _roll_back(v, cams, geometry, lambda v_, c, w: v_ + _times_windows(v_, c, w)), s


def gradient_rollout(config, params, x, kwargs, target, remat=False, edits=None):
    """Chefer et al. 2021 (generic attention explainability): ``R ← R + E_h[(∇A ⊙ A)⁺] R``
    from ``R = I`` through the layers (per window for windowed attention; patch merging
    spreads a token's weight evenly over its sources). Returns ``(tokens [B, T], score)``."""
    paths = layer_paths(config, x, kwargs)
    names = _rollout_layers(config, paths, target)
    specs = [paths[n] for n in names]
    return _gradient_rollout(config, params, x, kwargs, target, names,
                             tuple(p for p, _ in specs),
                             [jnp.zeros(spec.shape, spec.dtype) for _, spec in specs], remat,
                             edits)


def _require_attention(config, names):
    if not names:
        raise ValueError(f"{family_of(config).name} has no self-attention layers; rollout and "
                         "gradient_rollout need a transformer (Whisper or CLAP)")


def rules_for(method: str, epsilon: float | None = None, gamma: float | None = None):
    """The rule set an LRP method name stands for, with ε / γ applied."""
    rules = lrp.get_rules(method)
    return rules.with_params(epsilon=epsilon, gamma=gamma)
