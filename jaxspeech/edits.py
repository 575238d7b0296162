"""Edits: change what flows through a model, as data, without touching its source.

    y = m.apply(m.params, x, edits={"layers.3.hidden_state": js.edits.zero})
    y, inter = m.forward(m.params, x, edits=js.edits.ablate_heads(2, [0, 5]))
    res = js.attribute(m, wave, target=t, method="attnlrp", edits={"layers.1.hidden_state":
                       js.edits.project_out(probe)})      # explain the edited model
    out = js.transcribe(m, wave, edits={"layers.2.self_attn.heads": js.edits.scale(0.5)})

An edit is applied where the model exposes an intermediate (every name ``m.forward``
returns: ``layers.3.hidden_state``, ``layers.3.self_attn.attention`` (the map),
``layers.3.self_attn.heads`` (each head's context ``[B, T, heads, head_dim]`` before the
output projection), ``embedding_model.blocks.2.hidden_state`` (an ECAPA block), a CLAP
stage's ``...layers.1.blocks.0.hidden_state``). It is called as
``fn(value, **context) -> value`` of the same shape, where ``value`` is the whole batch's
array and ``context`` holds ``site`` (the name), ``layer`` (the first index after
``layers.`` or ``blocks.`` in it, or None) and ``offset`` (the position of ``value[:, 0]``
along its second axis: 0 except for decoder sites during cached decoding in
:func:`jaxspeech.transcribe`, where each step sees one token). The edited value is what
flows on, what ``m.forward`` reports and what attribution methods differentiate.

An :class:`Edit` is a pytree: its function is static and its ``args`` are traced arrays,
so one compiled forward serves every value of them and a batch of edits vmaps
(``jax.vmap(lambda s: m.apply(p, x, edits={site: js.edits.scale(s)}))(scales)``). A plain
function is an edit too (``lambda v, **_: 2 * v``); arrays it closes over are constants of
its compilation, so pass them as ``Edit(fn, args)`` to reuse it. A list or tuple of edits
at one site applies them in order (:func:`compose`).

Helpers: :data:`zero`, :data:`identity`, :func:`mean` (each item's mean over frames, or a
dataset statistic from :func:`site_mean`), :func:`scale`, :func:`replace`, :func:`add`,
:func:`keep_frames`, :func:`project_out` (e.g. a probe's directions),
:func:`ablate_heads` (a mapping: the heads site of one attention), :func:`patch`
(activation patching's ``where(mask, other, value)``). :func:`upto` runs a model up to a
site (truncation); :func:`submodule` gives one module's pure function.

Edits are bound to the model's module tree by :func:`bind` (every entry point does it):
an unknown site raises ``ValueError`` listing the ones the model has. They travel in the
Flax variable collection :data:`jaxspeech.layers.EDITS`, nested by module path as the
params are, so they pass through ``nn.remat`` and ``jax.lax`` control flow like params.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxspeech import layers
from jaxspeech.convert.common import unflatten

__all__ = ["Edit", "Bound", "zero", "identity", "mean", "scale", "replace", "add", "keep_frames",
           "project_out", "ablate_heads", "patch", "compose", "as_edit", "bind", "site_table",
           "SiteTable", "site_names", "site_mean", "upto", "submodule", "Submodule",
           "decoder_step_edits"]


# --- the edit object ---------------------------------------------------------------------

@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Edit:
    """``fn(value, args, **context) -> value``: ``fn`` and ``name`` are static, ``args`` (a
    pytree of arrays) is traced. Called as ``edit(value, **context)``."""

    fn: Callable = dataclasses.field(metadata=dict(static=True))
    args: Any = dataclasses.field(default_factory=dict)
    name: str = dataclasses.field(default="edit", metadata=dict(static=True))

    def __call__(self, value: jnp.ndarray, **context) -> jnp.ndarray:
        return self.fn(value, self.args, **context)

    def then(self, other) -> Edit:
        """This edit, then ``other`` (:func:`compose`)."""
        return compose(self, other)


@dataclasses.dataclass(frozen=True)
class _Plain:
    """A user's ``fn(value, **context)`` in an Edit's ``(value, args, **context)`` form, given
    only the context keywords it accepts (so ``lambda v: -v`` works). Equal for the same
    ``fn``: jit keys its cache on it and compiles once per function object."""

    fn: Callable
    accepts: tuple[str, ...] | None  # None: **kwargs, every key

    def __call__(self, value, args, **context):
        if self.accepts is not None:
            context = {k: v for k, v in context.items() if k in self.accepts}
        return self.fn(value, **context)


def _accepted(fn: Callable) -> tuple[str, ...] | None:
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):  # builtins without a signature: value only
        return ()
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
        return None
    return tuple(p.name for p in params if p.kind in (inspect.Parameter.KEYWORD_ONLY,
                                                      inspect.Parameter.POSITIONAL_OR_KEYWORD))[1:]


def as_edit(edit) -> Edit:
    """``edit`` as an :class:`Edit`: an Edit passes through, a function ``fn(value, **context)``
    is wrapped, a list or tuple is composed in order; anything else raises ``TypeError``."""
    if isinstance(edit, Edit):
        return edit
    if isinstance(edit, (list, tuple)):
        return compose(*edit)
    if callable(edit):
        name = getattr(edit, "__name__", "")
        return Edit(_Plain(edit, _accepted(edit)), {}, name if name.isidentifier() else "custom")
    raise TypeError(f"an edit is a js.edits.Edit (js.edits.zero, js.edits.scale(0.5), ...), a "
                    f"function fn(value, **context) -> value, or a list of them (applied in "
                    f"order); got {type(edit).__name__} {edit!r:.60}")


def _composed(value, args, **context):
    for e in args:
        value = e(value, **context)
    return value


def compose(*edits) -> Edit:
    """The edits applied in order (the first sees the model's value, each next one the
    previous one's result)."""
    parts = tuple(as_edit(e) for e in edits)
    if not parts:
        raise ValueError("compose() needs at least one edit")
    return parts[0] if len(parts) == 1 else Edit(_composed, parts, "+".join(p.name for p in parts))


# --- helpers -------------------------------------------------------------------------------

def _fit(array: jnp.ndarray, value: jnp.ndarray, what: str) -> jnp.ndarray:
    """``array`` broadcast to ``value``'s shape and dtype, or a message saying what fits."""
    array = jnp.asarray(array)
    try:
        return jnp.broadcast_to(array.astype(value.dtype), value.shape)
    except ValueError:
        raise ValueError(f"{what} of shape {tuple(array.shape)} does not broadcast to the site's "
                         f"value {tuple(value.shape)}") from None


def _at_offset(array: jnp.ndarray, value: jnp.ndarray, offset, axis: int) -> jnp.ndarray:
    """``array``'s positions ``offset .. offset + n`` along ``axis`` where it spans more
    positions than ``value`` has there (decoder sites during cached decoding), else
    ``array``."""
    ax = axis % value.ndim
    lead = value.ndim - array.ndim  # array may lack leading (batch) axes
    a_ax = ax - lead
    if a_ax < 0 or array.shape[a_ax] in (1, value.shape[ax]):
        return array
    return jax.lax.dynamic_slice_in_dim(array, jnp.asarray(offset, jnp.int32), value.shape[ax],
                                        axis=a_ax)


def _identity(value, args, **context):
    return value


def _zero(value, args, **context):
    return jnp.zeros_like(value)


identity = Edit(_identity, {}, "identity")
"""The value unchanged (the model computes exactly what it computes without edits)."""

zero = Edit(_zero, {}, "zero")
"""Zero ablation: the value replaced by zeros."""


def _scale(value, args, **context):
    return value * _fit(args["factor"], value, "scale factor")


def scale(factor) -> Edit:
    """``value * factor``; ``factor`` a scalar or an array broadcasting to the value
    (``[D]`` per channel, ``[heads, 1]`` per head of a ``heads`` site)."""
    return Edit(_scale, {"factor": jnp.asarray(factor, jnp.float32)}, "scale")


def _add(value, args, offset=0, **context):
    delta = _at_offset(jnp.asarray(args["delta"]), value, offset, 1)
    return value + _fit(delta, value, "added array")


def add(delta) -> Edit:
    """``value + delta`` (a steering vector ``[D]``, or a whole ``[B, T, D]`` array; at zero
    its gradient is the gradient at the site: attribution patching)."""
    return Edit(_add, {"delta": jnp.asarray(delta)}, "add")


def _replace(value, args, offset=0, **context):
    return _fit(_at_offset(jnp.asarray(args["value"]), value, offset, 1), value, "replacement")


def replace(new) -> Edit:
    """The value replaced by ``new`` (broadcast to it: a ``[D]`` vector, a ``[T, D]`` or a
    whole ``[B, T, D]`` array, e.g. another input's value from ``m.forward``)."""
    return Edit(_replace, {"value": jnp.asarray(new)}, "replace")


def _mean(value, args, **context):
    if "statistic" in args:
        return _fit(args["statistic"], value, "mean statistic")
    if value.ndim < 3:
        raise ValueError(f"mean over frames needs a [batch, frames, ...] value, got shape "
                         f"{tuple(value.shape)}; give a statistic (js.edits.site_mean)")
    return jnp.broadcast_to(value.mean(axis=1, keepdims=True), value.shape)


def mean(statistic=None) -> Edit:
    """Mean ablation. Without ``statistic``: every frame (token) of an item replaced by that
    item's mean over frames (axis 1, all frames: a padded ECAPA item's padding included; on
    an attention map ``[B, heads, T, T]`` axis 1 is the heads). With it: the value replaced
    by ``statistic`` broadcast (a dataset mean, :func:`site_mean`: ``[D]``, or ``[T, D]``)."""
    args = {} if statistic is None else {"statistic": jnp.asarray(statistic, jnp.float32)}
    return Edit(_mean, args, "mean")


def _keep(value, args, offset=0, **context):
    mask = jnp.asarray(args["mask"])
    if value.ndim < 2:
        raise ValueError(f"keep_frames needs a [batch, frames, ...] value, got {tuple(value.shape)}")
    mask = mask if mask.ndim == 2 else mask[None]  # [B | 1, frames]
    mask = _at_offset(mask, value[..., 0] if value.ndim > 2 else value, offset, 1)
    mask = mask.reshape(mask.shape + (1,) * (value.ndim - 2))
    fill = jnp.zeros_like(value)
    if "fill" in args:
        fill = _fit(args["fill"], value, "fill")
    return jnp.where(_fit(mask, value, "frame mask").astype(bool), value, fill)


def keep_frames(mask, fill=None) -> Edit:
    """Keep the frames (tokens) where ``mask [frames]`` (or ``[B, frames]``, bool) is True;
    the others become ``fill`` (default 0; an array broadcasting to the value, e.g. a
    :func:`site_mean` statistic)."""
    mask = jnp.asarray(mask)  # may be traced (a batch of masks under vmap)
    if mask.dtype != jnp.bool_ or mask.ndim not in (1, 2):
        raise ValueError(f"keep_frames needs a boolean [frames] or [batch, frames] mask, got "
                         f"{mask.dtype} {mask.shape}")
    args = {"mask": mask}
    if fill is not None:
        args["fill"] = jnp.asarray(fill, jnp.float32)
    return Edit(_keep, args, "keep_frames")


def _project(value, args, **context):
    basis = args["basis"].astype(value.dtype)  # [k, D], orthonormal rows
    if basis.shape[-1] != value.shape[-1]:
        raise ValueError(f"project_out directions have {basis.shape[-1]} dims; the site's "
                         f"value has {value.shape[-1]} on its last axis")
    coords = jnp.einsum("...d,kd->...k", value, basis, precision=jax.lax.Precision.HIGHEST)
    return value - jnp.einsum("...k,kd->...d", coords, basis, precision=jax.lax.Precision.HIGHEST)


def project_out(direction) -> Edit:
    """Remove the component along ``direction`` (``[D]``), or the span of several
    (``[k, D]``), from every vector of the value's last axis: ``v - (v·u) u``. A
    :class:`~jaxspeech.probe.Probe` gives its weight's columns (the directions its logits
    read), so ``project_out(probe)`` blinds the probe at its layer."""
    weight = getattr(direction, "weight", None)
    d = jnp.asarray(direction if weight is None else jnp.asarray(weight).T)
    d = d[None] if d.ndim == 1 else d
    if d.ndim != 2:
        raise ValueError(f"project_out needs a [D] or [k, D] direction, got shape {d.shape}")
    if isinstance(d, jax.core.Tracer):  # traced (vmapped directions): independent ones assumed
        q, _ = jnp.linalg.qr(d.T.astype(jnp.float32))
        return Edit(_project, {"basis": q.T}, "project_out")
    d = np.asarray(d, np.float64)
    if not np.isfinite(d).all() or not np.abs(d).sum():
        raise ValueError(f"project_out needs a finite, non-zero direction, got {d.shape} values")
    q, r = np.linalg.qr(d.T)  # orthonormal basis of the span, dropping dependent directions
    keep = np.abs(np.diag(r)) > 1e-10 * np.abs(r).max()
    return Edit(_project, {"basis": jnp.asarray(q[:, keep].T, jnp.float32)}, "project_out")


def _heads(value, args, *, fill_mean: bool):
    if value.ndim < 3:
        raise ValueError(f"ablate_heads acts on a heads site [..., heads, head_dim], got shape "
                         f"{tuple(value.shape)}")
    mask = jnp.zeros(value.shape[-2], bool).at[args["heads"]].set(True)[:, None]
    fill = jnp.broadcast_to(value.mean(axis=1, keepdims=True), value.shape) if fill_mean \
        else jnp.zeros_like(value)
    return jnp.where(jnp.broadcast_to(mask, value.shape), fill, value)


def _heads_zero(value, args, **context):
    return _heads(value, args, fill_mean=False)


def _heads_mean(value, args, **context):
    return _heads(value, args, fill_mean=True)


def ablate_heads(layer: int | str, heads: int | Sequence[int], *, value: str = "zero"
                 ) -> dict[str, Edit]:
    """``{site: edit}`` ablating ``heads`` of one attention: ``layer`` an encoder layer index
    (``layers.{layer}.self_attn.heads``) or an attention's path
    (``"decoder.layers.0.encoder_attn"``; CLAP ``".../layers.1.blocks.0.attention"``).
    The heads' contexts (before the output projection, so the others are untouched) become
    0 (``value="zero"``, what transformers' ``head_mask`` does) or their mean over frames
    (``"mean"``). Merge it with other edits: ``{**ablate_heads(3, [1]), site: edit}``."""
    if value not in ("zero", "mean"):
        raise ValueError(f"ablate_heads value={value!r}: expected 'zero' or 'mean'")
    site = f"layers.{layer}.self_attn.heads" if isinstance(layer, (int, np.integer)) else str(layer)
    if not site.endswith(".heads"):
        site = f"{site}.heads"
    idx = np.atleast_1d(np.asarray(heads))
    if not np.issubdtype(idx.dtype, np.integer) or idx.ndim != 1:
        raise ValueError(f"heads must be an index or a list of indices, got {heads!r}")
    fn = _heads_mean if value == "mean" else _heads_zero
    return {site: Edit(fn, {"heads": jnp.asarray(idx, jnp.int32)}, f"ablate_heads_{value}")}


def _patch(value, args, offset=0, **context):
    other = _at_offset(jnp.asarray(args["other"]), value, offset, 1)
    mask = args.get("mask")
    if mask is None:
        return _fit(other, value, "patched value")
    mask = jnp.asarray(mask)
    if mask.ndim < value.ndim:  # a mask over the value without its batch axis
        mask = mask[None]
    return jnp.where(_fit(mask, value, "patch mask").astype(bool), _fit(other, value, "patched value"),
                     value)


def patch(other, mask=None) -> Edit:
    """Activation patching: the value where ``mask`` is True taken from ``other`` (the same
    site in another run, ``[B, ...]`` as the value); ``mask`` broadcasts to the value
    without its batch axis (``[T, 1]`` a block of frames, ``[1, heads, 1]`` one head) or
    with it; None: all of it."""
    args = {"other": jnp.asarray(other)}
    if mask is not None:
        args["mask"] = jnp.asarray(mask)
    return Edit(_patch, args, "patch")


# --- binding edits to a model's module tree ---------------------------------------------------

@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class _Site:
    """An edit bound to its site: what the model's tap calls. Checks the shape it returns."""

    edit: Edit
    site: str = dataclasses.field(metadata=dict(static=True))
    layer: int | None = dataclasses.field(default=None, metadata=dict(static=True))
    offset: Any = None

    def __call__(self, value: jnp.ndarray) -> jnp.ndarray:
        out = self.edit(value, site=self.site, layer=self.layer,
                        offset=0 if self.offset is None else self.offset)
        out = jnp.asarray(out)
        if out.shape != value.shape:
            raise ValueError(f"the edit {self.edit.name!r} at {self.site!r} returned shape "
                             f"{tuple(out.shape)}; an edit must keep the value's shape "
                             f"{tuple(value.shape)}")
        return out.astype(value.dtype)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Bound:
    """Edits bound to a model: ``tree`` nests :class:`_Site` entries by module path, as the
    params; the module's variables take it as the :data:`jaxspeech.layers.EDITS` collection."""

    tree: Mapping[str, Any]

    def variables(self, params) -> dict:
        return {"params": params, layers.EDITS: self.tree}


def _layer_index(site: str) -> int | None:
    found = re.search(r"(?:^|\.)(?:layers|blocks)\.(\d+)", site)
    return None if found is None else int(found.group(1))


@dataclasses.dataclass(frozen=True)
class SiteTable:
    """Every site of a model on inputs of one shape: ``paths[name]`` (the module path and the
    tap's name, as the collections nest them) and ``shapes[name]`` (its value's
    ``ShapeDtypeStruct`` at batch 1), in forward order. ``plain``: the sites a forward
    sows without keeping attention maps (all but the encoder's fused attention maps, which
    exist only when kept, edited or perturbed)."""

    paths: tuple[tuple[str, tuple[str, ...]], ...]
    shapes: tuple[tuple[str, jax.ShapeDtypeStruct], ...]
    plain: frozenset[str] = frozenset()

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(n for n, _ in self.paths)

    def path(self, name: str) -> tuple[str, ...]:
        return dict(self.paths)[name]

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(dict(self.shapes)[name].shape)


def _spec(tree):
    """A hashable key for the shapes of a pytree of arrays, at batch 1."""
    leaves, treedef = jax.tree.flatten(tree)
    return treedef, tuple((tuple(np.shape(a))[1:], str(jnp.result_type(a))) for a in leaves)


def site_table(config, features, kwargs=None) -> SiteTable:
    """The :class:`SiteTable` of ``config``'s model on inputs shaped like ``features`` (and the
    keyword inputs ``kwargs``: ECAPA ``lengths``, Whisper ``tokens``); cached per shape."""
    kwargs = dict(kwargs or {})
    return _site_table(config, _spec(features), _spec(kwargs))


def site_names(model, features=None, **kwargs) -> list[str]:
    """Every site name of ``model`` (in forward order) on its example input, or on
    ``features`` (with keyword inputs such as Whisper's ``tokens``, which add the
    decoder's sites)."""
    if features is None:
        spec, example = model.family.example_features(model.config, 1)
        features, kwargs = jnp.zeros(spec.shape, spec.dtype), {**example, **kwargs}
    return list(site_table(model.config, features, kwargs).names)


def _example(spec):
    treedef, leaves = spec
    return jax.tree.unflatten(treedef, [jax.ShapeDtypeStruct((1,) + s, d) for s, d in leaves])


@functools.lru_cache(maxsize=64)
def _site_table(config, features_spec, kwargs_spec) -> SiteTable:
    from jaxspeech.model import _module, param_shapes

    module = _module(config, None, False)
    x, kw = _example(features_spec), _example(kwargs_spec)
    params = param_shapes(config)

    def sown(variables, mutable):
        def run(v, x_, kw_):
            return module.apply(v, x_, **kw_, mutable=mutable)[1].get("intermediates", {})
        return jax.eval_shape(run, variables, x, kw)

    tree = sown({"params": params}, ["intermediates", layers.KEEP_ATTENTION_MAPS])
    paths, shapes = {}, {}

    def walk(node, path):
        for key, value in node.items():
            if isinstance(value, Mapping):
                walk(value, path + (key,))
            else:
                name = ".".join(path + (key,))
                paths[name], shapes[name] = path + (key,), value[0]

    walk(tree, ())
    plain = _flat_names(sown({"params": params}, ["intermediates"]))
    # Forward order: run once more with an edit at every site that notes its name when the
    # trace reaches it (the sown tree is nested by module, not ordered by execution). Every
    # intermediate goes through ``layers.tap`` or the attention functions, so each is met.
    order: list[str] = []

    def note(value, args, site, **context):
        order.append(site)
        return value

    recorder = Edit(note, {}, "record")
    nested = _nest({n: _Site(recorder, n) for n in paths}, paths)
    sown({"params": params, layers.EDITS: nested}, ["intermediates"])
    missed = sorted(set(paths) - set(order))
    if missed:  # a family sowing without layers.tap: its sites could not be edited
        raise RuntimeError(f"{type(config).__name__}: intermediates {missed} are sown without "
                           "jaxspeech.layers.tap, so edits cannot reach them")
    ranked = list(dict.fromkeys(order))
    return SiteTable(tuple((n, paths[n]) for n in ranked), tuple((n, shapes[n]) for n in ranked),
                     plain)


def _flat_names(tree) -> frozenset[str]:
    names = set()

    def walk(node, prefix):
        for key, value in node.items():
            name = f"{prefix}.{key}" if prefix else str(key)
            if isinstance(value, Mapping):
                walk(value, name)
            else:
                names.add(name)

    walk(tree, "")
    return frozenset(names)


def _nest(entries: Mapping[str, Any], paths: Mapping[str, tuple[str, ...]]) -> dict:
    return unflatten({paths[name]: entry for name, entry in entries.items()})


def unknown_site_message(names, table: SiteTable, kwargs=None) -> str:
    known = table.names
    hints = ""
    if any(n.startswith("decoder.") for n in names) and not any(k.startswith("decoder.")
                                                                for k in known):
        hints = " (decoder sites exist when the decoder runs: give tokens=...)"
    return (f"unknown edit site(s) {sorted(names)}{hints}; this model has: {', '.join(known)}")


def bind(config, edits, features, kwargs=None) -> Bound | None:
    """``{site: edit}`` (or an already :class:`Bound` tree, passed through; ``None`` or empty:
    ``None``) bound to ``config``'s module tree for inputs shaped like ``features``. Raises
    ``ValueError`` naming the unknown sites and listing the model's."""
    if edits is None or isinstance(edits, Bound):
        return edits
    if not isinstance(edits, Mapping):
        raise TypeError(f"edits must be a mapping {{site name: edit}}, got {type(edits).__name__}"
                        f"; e.g. edits={{'layers.1.hidden_state': js.edits.zero}}")
    if not edits:
        return None
    table = site_table(config, features, kwargs)
    unknown = [n for n in edits if n not in dict(table.paths)]
    if unknown:
        raise ValueError(unknown_site_message(unknown, table, kwargs))
    entries = {n: _Site(as_edit(e), n, _layer_index(n)) for n, e in edits.items()}
    return Bound(_nest(entries, dict(table.paths)))


def merge(*bounds: Bound | None) -> Bound | None:
    """Bound edit trees merged; where two give the same site, the earlier one's edit runs
    first, then the later one's."""
    out: dict = {}

    def put(node, tree):
        for key, value in tree.items():
            if isinstance(value, Mapping):
                put(node.setdefault(key, {}), value)
            elif key in node:
                first = node[key]
                node[key] = dataclasses.replace(first, edit=compose(first.edit, value.edit))
            else:
                node[key] = value

    for b in bounds:
        if b is not None:
            put(out, b.tree)
    return Bound(out) if out else None


def decoder_step_edits(bound: Bound | None, offset) -> dict | None:
    """The decoder's part of ``bound`` for a cached decoding step at ``offset`` (the position
    of the step's first token), for :func:`jaxspeech.models.whisper.decode_step`."""
    if bound is None or "decoder" not in bound.tree:
        return None
    return jax.tree.map(lambda s: dataclasses.replace(s, offset=offset), bound.tree["decoder"],
                        is_leaf=lambda n: isinstance(n, _Site))


# --- statistics, truncation, submodules -------------------------------------------------------

def site_mean(model, wave=None, site: str = "", *, features=None, params=None,
              frames: bool = True, edits=None, **options) -> jnp.ndarray:
    """The mean of ``site``'s value over a dataset's items (``wave [N, samples]`` or
    ``features``) and, with ``frames``, over its frames too: ``[D]`` (or the value's shape
    without batch, ``[T, D]``, when ``frames=False``), for :func:`mean` and :func:`keep_frames`'
    ``fill``. Padded ECAPA items count only their valid frames."""
    x, kwargs = model.inputs(wave, features, **options)
    _, inter = model.forward(model.params if params is None else params, x, edits=edits, **kwargs)
    if site not in inter:
        raise ValueError(unknown_site_message([site], site_table(model.config, x, kwargs)))
    value = inter[site]
    if not frames:
        return value.mean(axis=0)
    if value.ndim < 3:
        raise ValueError(f"{site!r} has no frame axis (shape {tuple(value.shape)}); "
                         "use frames=False")
    weight = jnp.ones(value.shape[:2], value.dtype)
    if kwargs.get("lengths") is not None:  # SpeechBrain's relative lengths: valid frames only
        t = value.shape[1]
        weight = (jnp.arange(t, dtype=jnp.float32)[None] < kwargs["lengths"][:, None]
                  * jnp.float32(t)).astype(value.dtype)
    w = weight.reshape(weight.shape + (1,) * (value.ndim - 2))
    return (value * w).sum(axis=(0, 1)) / w.sum(axis=(0, 1))


@functools.partial(jax.jit, static_argnames=("config", "site", "path", "rules"))
def _upto(config, params, features, kwargs, edits, site, path, rules=None):
    from jaxspeech.model import _module

    variables = {"params": params} if edits is None else edits.variables(params)
    _, state = _module(config, rules, False).apply(
        variables, features, **kwargs, mutable=["intermediates"])
    node = state["intermediates"]
    for key in path:
        node = node[key]
    return node[0]  # only this value is returned: XLA drops every op after the site


def upto(model, params, features, site: str, *, edits=None, rules=None, **kwargs) -> jnp.ndarray:
    """Run ``model`` up to ``site`` and return its value there (e.g. ``"layers.2.hidden_state"``
    ``[B, T, D]``): the computation after it is not run (the compiled program ends at the
    site), so this is the model truncated at a layer. ``edits`` apply on the way."""
    table = site_table(model.config, features, kwargs)
    if site not in dict(table.paths):
        raise ValueError(unknown_site_message([site], table, kwargs))
    edits = bind(model.config, edits, features, kwargs)
    if site not in table.plain:  # a fused attention map: an identity edit makes it kept
        edits = merge(edits, bind(model.config, {site: identity}, features, kwargs))
    from jaxspeech import lrp

    return _upto(model.config, params, jnp.asarray(features), kwargs, edits, site,
                 table.path(site), rules=lrp.get_rules(rules))


@dataclasses.dataclass(frozen=True)
class Submodule:
    """One module of a model as a pure function: ``apply(params, *args, edits=None)`` with
    ``params`` its own subtree (``params_of(m.params)``) and ``args`` what the model passes
    it (``example_args``: their shapes in the model's forward on its example input).
    ``module``: the Flax module, standalone; ``module_path``: where its params sit."""

    path: str
    module: nn.Module
    module_path: tuple[str, ...]
    example_args: tuple
    example_kwargs: Mapping

    def params_of(self, params) -> dict:
        """This module's subtree of the model's ``params``."""
        node = params
        for key in self.module_path:
            if key not in node:
                raise ValueError(f"{self.path!r} has no params (a parameter-free module)")
            node = node[key]
        return node

    def apply(self, params, *args, edits: Mapping | None = None, **kwargs):
        """The module's forward on its own ``params``; ``edits`` are named relative to it
        (``{"hidden_state": js.edits.zero}`` on an encoder layer, ``{"self_attn.heads":
        ...}``)."""
        variables = {"params": params}
        if edits:
            entries = {n: _Site(as_edit(e), f"{self.path}.{n}", _layer_index(f"{self.path}.{n}"))
                       for n, e in edits.items()}
            paths = _relative_paths(self.module, args, kwargs, params)
            unknown = sorted(set(entries) - set(paths))
            if unknown:
                raise ValueError(f"unknown edit site(s) {unknown} in {self.path!r}; it has: "
                                 f"{', '.join(paths)}")
            variables[layers.EDITS] = _nest(entries, paths)
        return self.module.apply(variables, *args, **kwargs)


def _relative_paths(module, args, kwargs, params) -> dict[str, tuple[str, ...]]:
    def run(p, a, kw):
        return module.apply({"params": p}, *a, **kw,
                            mutable=["intermediates", layers.KEEP_ATTENTION_MAPS])[1]

    from jaxspeech.model import intermediate_paths

    tree = jax.eval_shape(run, params, args, kwargs).get("intermediates", {})
    return {name: path for name, (path, _) in intermediate_paths(tree).items()}


def submodule(model, path: str) -> Submodule:
    """The module at ``path`` (``"layers.3"``, ``"decoder.layers.0.encoder_attn"``,
    ``"embedding_model.blocks.2"``) as a :class:`Submodule`, found by running the model's
    forward once on its example input (shapes only) and catching the call."""
    from jaxspeech.model import _init_example, _module

    spec, kwargs = _init_example(model.config)
    root = _module(model.config, None, False)
    found: dict = {}

    def catch(next_fun, args, kw, context):
        m = context.module
        if context.method_name == "__call__" and ".".join(str(p) for p in m.path) == path \
                and "module" not in found:
            def spec(tree):  # shapes only: the values are tracers of this trace
                return jax.tree.map(lambda a: jax.ShapeDtypeStruct(jnp.shape(a), jnp.result_type(a))
                                    if hasattr(a, "shape") else a, tree)

            found.update(module=m.clone(parent=None, name=None), path=tuple(str(p) for p in m.path),
                         args=spec(args), kwargs=spec(dict(kw)))
        return next_fun(*args, **kw)

    def run(p, x):
        with nn.intercept_methods(catch):
            return root.apply({"params": p}, x, **kwargs)

    from jaxspeech.model import param_shapes

    jax.eval_shape(run, param_shapes(model.config), spec)
    if "module" not in found:
        names = sorted({".".join(p[:-1]) for p in dict(site_table(
            model.config, jnp.zeros(spec.shape, spec.dtype), kwargs).paths).values()} - {""})
        raise ValueError(f"no module at {path!r}; modules with sites: {', '.join(names)}")
    return Submodule(path, found["module"], found["path"], found["args"], found["kwargs"])
