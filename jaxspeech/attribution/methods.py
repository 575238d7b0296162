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
from jaxspeech.model import _module, family_of, flatten_intermediates, param_shapes

__all__ = ["gradient", "integrated_gradients", "smoothgrad", "gradcam", "rollout",
           "gradient_rollout", "layer_names", "ig_nodes"]


def _variables(params, perturb):
    return {"params": params} if not perturb else {"params": params, "perturbations": perturb}


def score(config, params, x, kwargs, target: Target, *, rules=None, remat=False, perturb=None):
    """``(target [B], output, intermediates)`` of one forward."""
    y, state = _module(config, rules, remat).apply(
        _variables(params, perturb), x, **kwargs, mutable=["intermediates"])
    inter = flatten_intermediates(state.get("intermediates", {}))
    return target(y, inter, params), y, inter


def _grad(config, params, x, kwargs, target, rules, remat):
    def f(x_):
        s, _, _ = score(config, params, x_, kwargs, target, rules=rules, remat=remat)
        return s.sum(), s

    return jax.grad(f, has_aux=True)(x)


@functools.partial(jax.jit, static_argnames=("config", "rules", "remat"))
def gradient(config, params, x, kwargs, target, rules=None, remat=False):
    """``(grad [x.shape], score [B])``; under ``rules`` the grad is LRP's (relevance = x·grad)."""
    return _grad(config, params, x, kwargs, target, rules, remat)


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
                         method="gausslegendre", batch_size=4, remat=False):
    """Sundararajan et al. 2017: ``(x - baseline) · ∫ ∇f(baseline + α(x - baseline)) dα``.

    Returns ``(relevance, score [B], score at the baseline [B])``; completeness means
    ``relevance.sum() ≈ score - baseline_score`` per item.
    """
    alphas, weights = ig_nodes(steps, method)
    delta = x - baseline

    def step(aw):
        a, w = aw
        g, _ = _grad(config, params, baseline + a * delta, kwargs, target, None, remat)
        return g * w

    grads = jax.lax.map(step, (jnp.asarray(alphas, x.dtype), jnp.asarray(weights, x.dtype)),
                        batch_size=min(batch_size, steps))
    s, _, _ = score(config, params, x, kwargs, target)
    s0, _, _ = score(config, params, baseline, kwargs, target)
    return delta * grads.sum(0), s, s0


@functools.partial(jax.jit, static_argnames=("config", "n_samples", "batch_size", "remat"))
def smoothgrad(config, params, x, kwargs, target, key, noise_level=0.1, n_samples=16,
               batch_size=4, remat=False):
    """Smilkov et al. 2017: the gradient averaged over ``x + N(0, σ²)``, σ = noise_level ·
    (max - min of each item's features). Returns ``(mean gradient, score [B])``."""
    axes = tuple(range(1, x.ndim))
    span = x.max(axis=axes, keepdims=True) - x.min(axis=axes, keepdims=True)
    sigma = noise_level * span

    def step(k):
        g, _ = _grad(config, params, x + sigma * jax.random.normal(k, x.shape, x.dtype), kwargs,
                     target, None, remat)
        return g

    grads = jax.lax.map(step, jax.random.split(key, n_samples), batch_size=min(batch_size, n_samples))
    s, _, _ = score(config, params, x, kwargs, target)
    return grads.mean(0), s


# --- layers: names, perturbations, Grad-CAM ----------------------------------------------

def _intermediate_tree(config, x, kwargs):
    def run(params, x_, kwargs_):
        return _module(config, None, False).apply(
            {"params": params}, x_, **kwargs_, mutable=["intermediates"])[1]

    return jax.eval_shape(run, param_shapes(config), x, kwargs)


def layer_paths(config, x, kwargs) -> dict[str, tuple[tuple[str, ...], jax.ShapeDtypeStruct]]:
    """``{"layers.3.hidden_state": (("layers.3", "hidden_state"), spec), ...}`` for every
    intermediate of the model on inputs shaped like ``x``."""
    tree = _intermediate_tree(config, x, kwargs).get("intermediates", {})
    out = {}

    def walk(node, path):
        for key, value in node.items():
            if isinstance(value, Mapping):
                walk(value, path + (key,))
            else:
                out[".".join(path + (key,))] = (path + (key,), value[0])

    walk(tree, ())
    return out


def layer_names(config, x, kwargs=None) -> list[str]:
    """Names of every intermediate (layer output / attention map) the model exposes."""
    return sorted(layer_paths(config, x, kwargs or {}))


def _nest(path, value):
    for key in reversed(path):
        value = {key: value}
    return value


@functools.partial(jax.jit, static_argnames=("config", "layer", "path", "remat"))
def _gradcam(config, params, x, kwargs, target, layer, path, zeros, remat=False):
    def f(z):
        s, _, inter = score(config, params, x, kwargs, target, remat=remat,
                            perturb=_nest(path, z))
        return s.sum(), (s, inter[layer])

    g, (s, acts) = jax.grad(f, has_aux=True)(zeros)
    weights = g.mean(axis=1, keepdims=True)  # [B, 1, C]: mean gradient per channel
    cam = jax.nn.relu((acts * weights).sum(-1))  # [B, T]
    return cam, s


def gradcam(config, params, x, kwargs, target, layer: str, remat=False):
    """Selvaraju et al. 2017 on a ``[B, T, C]`` layer output: ``relu(Σ_c mean_t(∂f/∂A_c) A_c)``.
    Returns ``(cam [B, T], score [B])``."""
    paths = layer_paths(config, x, kwargs)
    if layer not in paths:
        raise ValueError(unknown_layer_message(layer, [n for n in paths
                                                       if paths[n][1].ndim == 3]))
    path, spec = paths[layer]
    if len(spec.shape) != 3:
        raise ValueError(f"Grad-CAM needs a [batch, frames, channels] layer output; {layer!r} "
                         f"has shape {tuple(spec.shape)}")
    return _gradcam(config, params, x, kwargs, target, layer, path,
                    jnp.zeros(spec.shape, spec.dtype), remat)


# --- attention rollout ---------------------------------------------------------------------

def attention_layers(config, x, kwargs) -> list[str]:
    """The attention maps of the model in layer order (``"layers.3.self_attn.attention"``)."""
    names = [n for n in layer_paths(config, x, kwargs) if n.endswith(".attention")]

    def order(name):
        return [int(t) if t.isdigit() else t for t in re.split(r"[.]", name)]

    return sorted(names, key=order)


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


@functools.partial(jax.jit, static_argnames=("config", "names", "remat"))
def _rollout(config, params, x, kwargs, target, names, remat=False):
    s, _, inter = score(config, params, x, kwargs, target, remat=remat)
    maps = [inter[n] for n in names]
    b, _, t, _ = maps[0].shape
    # rows · Â_L ⋯ Â_1, multiplied from the left: vector-matrix products, never T x T x T
    v = _rows(target, t, b)
    for a in reversed(maps):
        a = 0.5 * a.mean(axis=1) + 0.5 * jnp.eye(t)[None]
        a = a / a.sum(axis=-1, keepdims=True)
        v = jnp.einsum("bi,bij->bj", v, a)
    return v, s


def rollout(config, params, x, kwargs, target, remat=False):
    """Abnar & Zuidema 2020: head-averaged attention with the residual (0.5·A + 0.5·I),
    row-normalised and multiplied through the layers. Returns ``(tokens [B, T], score)``."""
    names = tuple(attention_layers(config, x, kwargs))
    _require_attention(config, names)
    return _rollout(config, params, x, kwargs, target, names, remat)


@functools.partial(jax.jit, static_argnames=("config", "names", "paths", "remat"))
def _gradient_rollout(config, params, x, kwargs, target, names, paths, zeros, remat=False):
    perturb: dict = {}
    for path, z in zip(paths, zeros, strict=True):
        node = perturb
        for key in path[:-1]:
            node = node.setdefault(key, {})
        node[path[-1]] = z

    def f(p):
        s, _, inter = score(config, params, x, kwargs, target, remat=remat, perturb=p)
        return s.sum(), (s, [inter[n] for n in names])

    grads, (s, maps) = jax.grad(f, has_aux=True)(perturb)
    flat_grads = [functools.reduce(lambda node, k: node[k], path, grads) for path in paths]
    b, _, t, _ = maps[0].shape
    # R = (I + Ā_L) ⋯ (I + Ā_1); rows · R from the left, as vector-matrix products
    v = _rows(target, t, b)
    for a, g in reversed(list(zip(maps, flat_grads, strict=True))):
        cam = jax.nn.relu(g * a).mean(axis=1)
        v = v + jnp.einsum("bi,bij->bj", v, cam)
    return v, s


def gradient_rollout(config, params, x, kwargs, target, remat=False):
    """Chefer et al. 2021 (generic attention explainability): ``R ← R + E_h[(∇A ⊙ A)⁺] R``
    from ``R = I`` through the layers. Returns ``(tokens [B, T], score)``."""
    paths = layer_paths(config, x, kwargs)
    names = tuple(attention_layers(config, x, kwargs))
    _require_attention(config, names)
    specs = [paths[n] for n in names]
    return _gradient_rollout(config, params, x, kwargs, target, names,
                             tuple(p for p, _ in specs),
                             [jnp.zeros(spec.shape, spec.dtype) for _, spec in specs], remat)


def _require_attention(config, names):
    if not names:
        raise ValueError(f"{family_of(config).name} has no self-attention layers; rollout and "
                         "gradient_rollout need a transformer (Whisper or CLAP)")


def rules_for(method: str, epsilon: float | None = None, gamma: float | None = None):
    """The rule set an LRP method name stands for, with ε / γ applied."""
    rules = lrp.get_rules(method)
    return rules.with_params(epsilon=epsilon, gamma=gamma)
