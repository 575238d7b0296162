"""The cascading model-parameter randomisation test (Adebayo et al. 2018)."""

from __future__ import annotations

import dataclasses
import re
import zlib
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxspeech.attribution.targets import Target
from jaxspeech.evaluate.common import Method, _axes, _relevance, _resolve_valid, fixed_target

_INDEXED = re.compile(r"\.\d+$")


def _is_leaf(node) -> bool:
    return not isinstance(node, Mapping)


def _group_nodes(params: Mapping) -> list[str]:
    """Parameter groups as ``/``-joined paths: descend from the root until a node is a leaf,
    a numbered block (``layers.3``, ``blocks.1``) or has no numbered children (``conv1``,
    ``layer_norm``, ``asp``); containers of numbered blocks are opened."""
    groups = []

    def walk(node, path):
        for key, child in node.items():
            p = path + (str(key),)
            if (_is_leaf(child) or _INDEXED.search(str(key))
                    or not any(_INDEXED.search(str(k)) for k in child)):
                groups.append("/".join(p))
            else:
                walk(child, p)

    walk(params, ())
    return groups


def _path_str(path) -> str:
    return "/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path)


def _subjaxprs(eqn):
    for value in eqn.params.values():
        for item in value if isinstance(value, (tuple, list)) else (value,):
            if hasattr(item, "jaxpr") and hasattr(item, "consts"):  # ClosedJaxpr
                yield item.jaxpr
            elif hasattr(item, "eqns") and hasattr(item, "invars"):  # Jaxpr
                yield item


def _first_use(model, params) -> dict[str, int]:
    """Parameter path -> the position (in forward order) of the first operation reading it,
    from the jaxpr of the model's forward; parameters never read are absent."""
    shapes = jax.tree.map(lambda a: jax.ShapeDtypeStruct(jnp.shape(a), jnp.result_type(a)), params)
    spec, kwargs = model.family.example_features(model.config, 1)
    closed = jax.make_jaxpr(lambda p, x, kw: model.apply(p, x, **kw))(shapes, spec, kwargs)
    leaves = jax.tree_util.tree_flatten_with_path(shapes)[0]
    env = {v: _path_str(path) for v, (path, _) in zip(closed.jaxpr.invars, leaves, strict=False)}
    first: dict[str, int] = {}
    counter = [0]

    def walk(jaxpr, env):
        for eqn in jaxpr.eqns:
            read = [(i, env[v]) for i, v in enumerate(eqn.invars)
                    if not hasattr(v, "val") and v in env]
            entered = False
            for inner in _subjaxprs(eqn):
                if len(inner.invars) == len(eqn.invars):  # jit, custom_vjp, remat, scan
                    walk(inner, {inner.invars[i]: name for i, name in read})
                    entered = True
            if not entered:
                for _, name in read:
                    first.setdefault(name, counter[0])
            counter[0] += 1

    walk(closed.jaxpr, env)
    return first


def _in_group(path: str, prefix: str) -> bool:
    return path == prefix or path.startswith(prefix + "/")


def parameter_groups(model, params=None) -> list[str]:
    """The MPRT cascade for ``model``: parameter groups ordered from the output back to the
    input, as ``/``-joined paths (a prefix of the parameter paths).

    Groups come from the params tree (numbered blocks and the layers beside them, see
    :func:`_group_nodes`); their order is the order in which the forward reads them
    (traced, not guessed), reversed. Whisper: ``layer_norm``, ``layers.{L-1..0}``,
    ``embed_positions``, ``conv2``, ``conv1``. Groups the forward never reads are left
    out (randomising them changes nothing).
    """
    params = model.params if params is None else params
    first = _first_use(model, params)
    order = []
    for group in _group_nodes(params):
        used = [pos for name, pos in first.items() if _in_group(name, group)]
        if used:
            order.append((min(used), group))
    return [g for _, g in sorted(order, reverse=True)]


def randomize(params, group: str | Sequence[str], key: jax.Array | int) -> dict:
    """A copy of ``params`` with every floating-point leaf under ``group`` (path prefixes,
    ``/``-joined: ``"layers.3"``, ``"embedding_model/blocks.1/tdnn1"``) replaced by random
    values of the same root-mean-square: ``rms · N(0, 1)``, or ``rms · |N(0, 1)|`` for a
    leaf with no negative value (BatchNorm variances must stay >= 0). ``key``: a jax PRNG
    key or an int. Each leaf's draw depends only on ``key`` and its own path, so it is the
    same at every cascade step and for every method."""
    prefixes = [group] if isinstance(group, str) else list(group)
    flat, treedef = jax.tree_util.tree_flatten_with_path(params)
    names = [_path_str(path) for path, _ in flat]
    for prefix in prefixes:
        if not any(_in_group(n, prefix) for n in names):
            tops = sorted({n.split("/")[0] for n in names})
            raise ValueError(f"parameter group {prefix!r} matches no parameter; top-level "
                             f"names: {', '.join(tops)}")
    base = _seed_words(key)
    leaves = []
    for name, (_, leaf) in zip(names, flat, strict=True):
        if any(_in_group(name, p) for p in prefixes) and jnp.issubdtype(jnp.result_type(leaf),
                                                                        jnp.floating):
            # numpy's generator, seeded by (key, path): XLA's threefry would compile once
            # per leaf shape, seconds each on a CPU, for a few random numbers.
            a = np.asarray(leaf)
            rng = np.random.default_rng([*base, zlib.crc32(name.encode())])
            noise = rng.standard_normal(a.shape)
            rms = np.sqrt(np.mean(np.square(a, dtype=np.float64)))
            leaf = jnp.asarray(rms * (np.abs(noise) if (a >= 0).all() else noise), a.dtype)
        leaves.append(leaf)
    return jax.tree_util.tree_unflatten(treedef, leaves)


def _seed_words(key) -> list[int]:
    """A jax PRNG key (typed or raw ``uint32``) or an int -> words to seed numpy with."""
    if isinstance(key, (int, np.integer)):
        return [int(key)]
    data = jax.random.key_data(key) if jnp.issubdtype(key.dtype, jax.dtypes.prng_key) else key
    return [int(w) for w in np.asarray(data).ravel()]


def _average_ranks(a: np.ndarray) -> np.ndarray:
    s = np.sort(a)
    return (np.searchsorted(s, a, "left") + np.searchsorted(s, a, "right") - 1) / 2.0


def spearman(a, b) -> float:
    """Spearman rank correlation of two arrays (flattened; tied values share their average
    rank). Two constant arrays give 1 (same ranking), one constant gives 0."""
    a = np.asarray(a, np.float64).ravel()
    b = np.asarray(b, np.float64).ravel()
    if not (np.isfinite(a).all() and np.isfinite(b).all()):
        return float("nan")
    ra, rb = _average_ranks(a), _average_ranks(b)
    ra, rb = ra - ra.mean(), rb - rb.mean()
    den = np.sqrt((ra @ ra) * (rb @ rb))
    if den == 0:
        return 1.0 if (ra @ ra) == (rb @ rb) == 0 else 0.0
    return float(ra @ rb / den)


def _box(x: np.ndarray, w: int) -> np.ndarray:
    """Mean over every ``w x w`` window of the last two axes (valid windows only)."""
    c = np.pad(x, [(0, 0)] * (x.ndim - 2) + [(1, 0), (1, 0)]).cumsum(-2).cumsum(-1)
    return (c[..., w:, w:] - c[..., :-w, w:] - c[..., w:, :-w] + c[..., :-w, :-w]) / (w * w)


def ssim(a, b, window: int = 7) -> float:
    """Structural similarity of two maps ``[..., H, W]`` (leading axes averaged), each first
    scaled to [0, 1] by its own min and max, with a uniform ``window`` (skimage's
    defaults: K1 = 0.01, K2 = 0.03, sample covariance, mean over valid windows)."""
    a = np.asarray(a, np.float64)
    b = np.asarray(b, np.float64)
    w = min(window, a.shape[-2], a.shape[-1])
    if w < 2:
        return float("nan")

    def unit(x):
        lo, hi = x.min(), x.max()
        return (x - lo) / (hi - lo) if hi > lo else np.zeros_like(x)

    a, b = unit(a), unit(b)
    c1, c2, n = 0.01 ** 2, 0.03 ** 2, w * w
    ma, mb = _box(a, w), _box(b, w)
    va = n / (n - 1) * (_box(a * a, w) - ma * ma)
    vb = n / (n - 1) * (_box(b * b, w) - mb * mb)
    cov = n / (n - 1) * (_box(a * b, w) - ma * mb)
    s = ((2 * ma * mb + c1) * (2 * cov + c2)) / ((ma ** 2 + mb ** 2 + c1) * (va + vb + c2))
    return float(s.mean())


@dataclasses.dataclass(frozen=True)
class MPRTResult:
    """The cascade of one method. ``groups``: the groups randomised at each step (output
    first; step i has groups ``0..i`` random). ``rho``: ``[steps, B]`` Spearman between
    the original and the randomised relevance per item; ``ssim``: ``[steps, B]`` or
    ``None``. ``passed``: the mean ρ after the last step is ``<= threshold``."""

    groups: tuple[str, ...]
    rho: np.ndarray
    ssim: np.ndarray | None
    threshold: float

    @property
    def mean_rho(self) -> np.ndarray:
        """``[steps]``: ρ averaged over items."""
        return np.nanmean(self.rho, axis=1)

    @property
    def final_rho(self) -> float:
        return float(self.mean_rho[-1])

    @property
    def passed(self) -> bool:
        return bool(self.final_rho <= self.threshold)


def _item_maps(relevance: np.ndarray, time_axis: int, valid: np.ndarray) -> list[np.ndarray]:
    """Each item's relevance over its valid frames, as ``[..., freq, time]``."""
    t, f = _axes(relevance.ndim, time_axis)
    maps = []
    for i, r in enumerate(relevance):
        r = np.take(r, np.arange(int(valid[i])), axis=t - 1)
        if f is not None:
            r = np.moveaxis(r, (f - 1, t - 1), (-2, -1))
        maps.append(r)
    return maps


def _cascade(params, groups: Sequence[str | Sequence[str]], key) -> Iterator[dict]:
    for group in groups:
        params = randomize(params, group, key)
        yield params


def _label(group: str | Sequence[str]) -> str:
    return group if isinstance(group, str) else "+".join(group)


def _mprt(model, features, kwargs, target, runs: Mapping[str, tuple[Method, Mapping, Any]], params,
          groups, key, threshold, with_ssim, absolute, valid) -> dict[str, MPRTResult]:
    """Cascade once, explaining every method at each step (one randomised copy alive)."""
    time_axis = model.family.time_axis % features.ndim
    prep = (lambda r: np.abs(r)) if absolute else (lambda r: r)
    originals = {name: _item_maps(prep(np.asarray(r)), time_axis, valid)
                 for name, (_, _, r) in runs.items()}
    rho = {name: [] for name in runs}
    sim = {name: [] for name in runs}
    for random_params in _cascade(params, groups, key):
        for name, (method, options, _) in runs.items():
            r = _relevance(model, method, features, kwargs, target, random_params, options)
            maps = _item_maps(prep(np.asarray(r)), time_axis, valid)
            rho[name].append([spearman(a, b) for a, b in zip(originals[name], maps, strict=True)])
            if with_ssim:
                sim[name].append([ssim(a, b) for a, b in zip(originals[name], maps, strict=True)])
    labels = tuple(_label(g) for g in groups)
    return {name: MPRTResult(labels, np.asarray(rho[name]),
                             np.asarray(sim[name]) if with_ssim else None, threshold)
            for name in runs}


def mprt(
    model,
    features,
    target: Target,
    method: Method,
    *,
    kwargs: Mapping | None = None,
    params=None,
    groups: Sequence[str | Sequence[str]] | None = None,
    key: jax.Array | int | None = None,
    threshold: float = 0.5,
    ssim: bool = False,
    absolute: bool = False,
    valid_frames=None,
    options: Mapping | None = None,
) -> MPRTResult:
    """Cascading model-parameter randomisation test (Adebayo et al. 2018) of one method.

    ``groups``: the cascade, output first (default :func:`parameter_groups`); each entry
    a path prefix or a list of them, randomised by :func:`randomize` with ``key`` (a jax
    key or an int; default ``jax.random.key(0)``) and kept random for the later steps. At each step the
    method (same ``options``, same frozen ``target``) explains ``features`` with the
    randomised params; ρ is the Spearman correlation with the original relevance per
    item over its ``valid_frames`` (``absolute``: of ``|relevance|``, Adebayo's second
    variant), SSIM optional. ``features`` ``[B, ...]`` in the model's layout.
    """
    x = jnp.asarray(features)
    params = model.params if params is None else params
    kwargs = {k: jnp.asarray(v) for k, v in dict(kwargs or {}).items()}
    target = fixed_target(model, x, target, kwargs, params)
    groups = parameter_groups(model, params) if groups is None else list(groups)
    key = jax.random.key(0) if key is None else key
    original = _relevance(model, method, x, kwargs, target, params, options)
    valid = np.asarray(_resolve_valid(valid_frames, x, model.family.time_axis % x.ndim))
    return _mprt(model, x, kwargs, target, {"m": (method, options or {}, original)}, params,
                 groups, key, threshold, ssim, absolute, valid)["m"]
