"""Activation patching and attribution patching, every site in one compiled call.

    res = js.patching(m, clean, corrupt, target, sites="heads")        # layer x head
    res.effect          # [B, sites]: target with the site patched - target on clean
    res.grid(res.effect)  # [B, layers, heads]
    sites = js.Sites.frames(m, block=50)                              # layer x frame block
    res = js.patching(m, clean, corrupt, target, sites, method="both")
    res.estimate        # [B, sites]: attribution patching, (corrupt - clean) . gradient
    res.comparison()    # how well the gradient estimate ranks the real effects

Patching runs the model on ``clean`` with one site's value (a layer's hidden state in a
block of frames, one head's context, ...) taken from the same site in the ``corrupt``
run, and records the target (Meng et al. 2022; Heimersheim & Nanda 2024 on practice).
Here every site is patched in one jitted call: the clean and corrupt forwards run once,
then the sites of each site name are ``vmap``-ped (``chunk`` at a time, so memory stays
bounded) over one forward with a :func:`jaxspeech.edits.patch` edit. In that forward the
sites the model reaches before the patched one take their clean values as given arrays
(:func:`jaxspeech.edits.replace`): they are what the clean run computed, so nothing
changes, but the compiled program no longer depends on the layers before the patched
site and does not run them again: a patch at layer 5 costs the layers after it only.

Attribution patching (Nanda 2023; Syed et al. 2023) estimates every effect at once from
one backward pass of the clean run: ``effect_s ≈ Σ_{s} (corrupt - clean) · ∂target/∂value``,
the first-order Taylor term, summed over the site's mask.

The direction is yours: patching corrupt values into the clean run measures what the
site carries for the clean behaviour ("noising"); swap the arguments to restore the clean
values into the corrupted run ("denoising").
"""

from __future__ import annotations

import dataclasses
import functools
import re
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxspeech import edits as E
from jaxspeech.attribution import targets
from jaxspeech.attribution.methods import score as _score

__all__ = ["patching", "Sites", "PatchingResult", "METHODS"]

METHODS = ("activation", "attribution", "both")


# --- which sites -----------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Sites:
    """Sites to patch, grouped by site name: group ``g`` patches ``names[g]`` where each of
    its ``masks[g]`` ``[k_g, ...]`` (bool, broadcasting to the site's value without its
    batch axis) is True; ``labels`` names every site, group by group."""

    names: tuple[str, ...]
    masks: tuple[np.ndarray, ...]
    labels: tuple[str, ...]

    def __post_init__(self):
        if len(self.names) != len(self.masks) or not self.names:
            raise ValueError("Sites need one mask array per site name, and at least one name")
        if sum(len(m) for m in self.masks) != len(self.labels):
            raise ValueError(f"{len(self.labels)} labels for {sum(len(m) for m in self.masks)} sites")

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def counts(self) -> tuple[int, ...]:
        """Sites per name."""
        return tuple(len(m) for m in self.masks)

    def __add__(self, other: Sites) -> Sites:
        """Both sets of sites, this one's first (one :func:`patching` call runs them all)."""
        if not isinstance(other, Sites):
            return NotImplemented
        return Sites(self.names + other.names, self.masks + other.masks,
                     self.labels + other.labels)

    @classmethod
    def of(cls, masks: Mapping[str, Any], labels: Sequence[str] | None = None) -> Sites:
        """``{site name: masks [k, ...]}`` (bool; each broadcasting to the value without its
        batch axis); ``labels``: one per site (default ``name[i]``)."""
        names = tuple(masks)
        arrays = tuple(np.asarray(masks[n], bool) for n in names)
        default = tuple(f"{n}[{i}]" for n, a in zip(names, arrays, strict=True) for i in range(len(a)))
        return cls(names, arrays, default if labels is None else tuple(labels))

    @classmethod
    def heads(cls, model, names: Sequence[str] | None = None, *, features=None, **kwargs) -> Sites:
        """Layer x head: every head of every attention's ``heads`` site (default: the
        encoder's self-attentions, ``layers.i.self_attn.heads``; CLAP's window attentions),
        each patched alone."""
        table = _table(model, features, kwargs)
        names = list(names) if names is not None else [
            n for n in table.names if n.endswith(".heads") and not n.startswith("decoder.")]
        if not names:
            raise ValueError(f"{model.kind} has no attention heads sites; its sites: "
                             f"{', '.join(table.names)}")
        masks, labels = [], []
        for n in _checked(names, table):
            shape = table.shape(n)
            if len(shape) < 4:
                raise ValueError(f"{n!r} has shape {shape}; a heads site is [batch, ..., heads, dim]")
            h = shape[-2]
            m = np.zeros((h,) + (1,) * (len(shape) - 3) + (h, 1), bool)
            m[np.arange(h), ..., np.arange(h), 0] = True
            masks.append(m)
            labels += [f"{n}[head {i}]" for i in range(h)]
        return cls(tuple(names), tuple(masks), tuple(labels))

    @classmethod
    def frames(cls, model, names: Sequence[str] | None = None, *, block: int | None = None,
               spans: Sequence[tuple[int, int]] | None = None, features=None, **kwargs) -> Sites:
        """Layer x frame block: each ``hidden_state`` site (default: every encoder layer's or
        ECAPA block's) patched in consecutive blocks of ``block`` frames (tokens) along its
        frame axis, or in the given ``spans`` ``[(start, stop), ...]`` (frames of that
        site: Whisper's encoder runs at 20 ms, ECAPA at 10 ms)."""
        table = _table(model, features, kwargs)
        names = list(names) if names is not None else _layer_outputs(table)
        if (block is None) == (spans is None):
            raise ValueError("give block= (frames per block) or spans= [(start, stop), ...]")
        masks, labels = [], []
        for n in _checked(names, table):
            shape = table.shape(n)
            if len(shape) < 3:
                raise ValueError(f"{n!r} has shape {shape}: no frame axis to cut into blocks")
            t = shape[1]
            pieces = [(a, min(a + block, t)) for a in range(0, t, block)] if spans is None \
                else [(int(a), int(b)) for a, b in spans]
            bad = [p for p in pieces if not 0 <= p[0] < p[1] <= t]
            if bad:
                raise ValueError(f"spans {bad} are outside {n!r}'s {t} frames")
            m = np.zeros((len(pieces), t) + (1,) * (len(shape) - 2), bool)
            for i, (a, b) in enumerate(pieces):
                m[i, a:b] = True
            masks.append(m)
            labels += [f"{n}[{a}:{b}]" for a, b in pieces]
        return cls(tuple(names), tuple(masks), tuple(labels))

    @classmethod
    def whole(cls, model, names: Sequence[str] | None = None, *, features=None, **kwargs) -> Sites:
        """Each site patched whole (default: every layer's or block's output)."""
        table = _table(model, features, kwargs)
        names = list(names) if names is not None else _layer_outputs(table)
        masks = tuple(np.ones((1,) + (1,) * (len(table.shape(n)) - 1), bool)
                      for n in _checked(names, table))
        return cls(tuple(names), masks, tuple(names))


def _table(model, features, kwargs):
    if features is None:
        spec, example = model.family.example_features(model.config, 1)
        features, kwargs = jnp.zeros(spec.shape, spec.dtype), {**example, **kwargs}
    return E.site_table(model.config, features, kwargs)


def _layer_outputs(table) -> list[str]:
    """The outputs of the encoder's layers / ECAPA's blocks / CLAP's blocks."""
    pattern = re.compile(r"(?:.*\.)?(?:layers|blocks)\.\d+\.hidden_state")
    return [n for n in table.names if pattern.fullmatch(n) and not n.startswith("decoder.")
            and "res2net_block" not in n]


def _checked(names, table) -> list[str]:
    unknown = [n for n in names if n not in dict(table.paths)]
    if unknown:
        raise ValueError(E.unknown_site_message(unknown, table))
    return list(names)


# --- the result --------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class PatchingResult:
    """What :func:`patching` measured: the target on ``clean`` and ``corrupt`` ``[B]``, and
    per site (``sites.labels`` order) the target with the site patched, ``patched
    [B, sites]`` (activation patching), and the gradient estimate of its effect,
    ``estimate [B, sites]`` (attribution patching); either is None when not computed."""

    sites: Sites
    clean: jnp.ndarray
    corrupt: jnp.ndarray
    patched: jnp.ndarray | None
    estimate: jnp.ndarray | None
    target: str

    @property
    def effect(self) -> jnp.ndarray:
        """``patched - clean`` ``[B, sites]``."""
        if self.patched is None:
            raise ValueError("activation patching was not run (method='attribution'); "
                             "use method='activation' or 'both'")
        return self.patched - self.clean[:, None]

    def normalized(self, values=None) -> jnp.ndarray:
        """``values`` (default :attr:`effect`) as a share of ``corrupt - clean`` (1: the site
        alone moves the target all the way to the corrupt run's)."""
        values = self.effect if values is None else values
        return values / (self.corrupt - self.clean)[:, None]

    def grid(self, values) -> jnp.ndarray:
        """``values [B, sites]`` as ``[B, site names, sites per name]`` (every name must have
        the same number of sites: layer x head, layer x block)."""
        counts = set(self.sites.counts)
        if len(counts) != 1:
            raise ValueError(f"site names have different numbers of sites {self.sites.counts}")
        values = jnp.asarray(values)
        return values.reshape(values.shape[0], len(self.sites.names), counts.pop())

    def comparison(self, top: int = 5) -> dict[str, np.ndarray]:
        """Attribution patching against activation patching, per item: Pearson correlation
        of the estimates with the effects, the share of sites where their signs agree
        (among effects above 1 % of the largest), the overlap of the ``top`` sites with the
        largest |effect| and |estimate|, and the largest |estimate - effect| relative to the
        largest |effect|."""
        if self.patched is None or self.estimate is None:
            raise ValueError("comparison needs method='both'")
        eff, est = np.asarray(self.effect, np.float64), np.asarray(self.estimate, np.float64)
        out = {"pearson": [], "sign_agreement": [], "top_overlap": [], "max_error": []}
        k = min(top, eff.shape[1])
        for a, b in zip(eff, est, strict=True):
            out["pearson"].append(np.corrcoef(a, b)[0, 1] if a.std() and b.std() else np.nan)
            big = np.abs(a) > 0.01 * np.abs(a).max()
            out["sign_agreement"].append(np.mean(np.sign(a[big]) == np.sign(b[big]))
                                         if big.any() else np.nan)
            out["top_overlap"].append(len(set(np.argsort(-np.abs(a))[:k])
                                          & set(np.argsort(-np.abs(b))[:k])) / k)
            out["max_error"].append(np.abs(a - b).max() / max(np.abs(a).max(), 1e-30))
        return {key: np.asarray(v) for key, v in out.items()}


# --- patching ----------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class _Plan:
    """The static part of one patching call: per site name, the sites reached before it
    (given their clean values), and what to compute."""

    names: tuple[str, ...]
    anchors: tuple[tuple[str, ...], ...]
    maps: bool
    activation: bool
    attribution: bool
    chunk: int


def patching(model, clean=None, corrupt=None, target=None, sites: Sites | str = "heads", *,
             method: str = "activation", clean_features=None, corrupt_features=None,
             tokens=None, params=None, edits=None, chunk: int = 8,
             sample_rate: int | None = None, **prepare_options) -> PatchingResult:
    """Patch every site of ``sites`` from the ``corrupt`` run into the ``clean`` run, one
    compiled call; see the module docstring.

    ``clean``, ``corrupt``: waveforms ``[B, samples]`` (or ``[samples]``) at
    ``model.sample_rate``, paired item by item, or precomputed ``clean_features`` /
    ``corrupt_features``; both must give every site the same shape (Whisper always does;
    ECAPA clips of equal length). ``target``: a :mod:`jaxspeech.targets` target or a
    function of the output (default :func:`jaxspeech.targets.default`); with ``tokens
    [B, L]`` a Whisper model's output is the decoder's logits ``[B, L, vocab]``, teacher
    forced on the same tokens in every run. ``sites``: a :class:`Sites`, ``"heads"``
    (:meth:`Sites.heads`) or ``"layers"`` (:meth:`Sites.whole`). ``method``:
    ``"activation"``, ``"attribution"`` or ``"both"``. ``edits``: applied in every run
    (patch an edited model). ``chunk``: sites of one name run together (memory: about
    ``chunk`` forwards' activations from the patched layer on).
    """
    if method not in METHODS:
        raise ValueError(f"unknown patching method {method!r}; choose from {', '.join(METHODS)}")
    if chunk < 1:
        raise ValueError(f"chunk must be >= 1, got {chunk}")
    params = model.params if params is None else params
    xc, kc = model.inputs(clean, clean_features, sample_rate=sample_rate, **prepare_options)
    xr, kr = model.inputs(corrupt, corrupt_features, sample_rate=sample_rate, **prepare_options)
    if tokens is not None:
        kc, kr = {**kc, "tokens": jnp.asarray(tokens)}, {**kr, "tokens": jnp.asarray(tokens)}
    if xc.shape != xr.shape:
        raise ValueError(f"clean features {tuple(xc.shape)} and corrupt features "
                         f"{tuple(xr.shape)} differ; patching needs inputs of one shape (cut "
                         "or pad the clips to one length)")
    target = targets.resolve(model, target)
    table = E.site_table(model.config, xc, kc)
    if isinstance(sites, str):
        makers = {"heads": Sites.heads, "layers": Sites.whole}
        if sites not in makers:
            raise ValueError(f"sites={sites!r}: give a js.Sites, 'heads' or 'layers'")
        sites = makers[sites](model, features=xc, **kc)
    _checked(sites.names, table)
    for n, m in zip(sites.names, sites.masks, strict=True):
        value = table.shape(n)[1:]
        try:
            np.broadcast_shapes(m.shape[1:], value)
        except ValueError:
            raise ValueError(f"masks for {n!r} have shape {m.shape[1:]}, which does not "
                             f"broadcast to its value {value} (without batch)") from None
    order = table.names
    plan = _Plan(names=sites.names,
                 anchors=tuple(tuple(a for a in order[:order.index(n)] if a in table.plain)
                               for n in sites.names),
                 maps=any(n not in table.plain for n in sites.names),
                 activation=method in ("activation", "both"),
                 attribution=method in ("attribution", "both"), chunk=chunk)
    base = E.bind(model.config, edits, xc, kc)
    s_clean, s_corrupt, patched, estimate = _patching(
        model.config, plan, params, xc, kc, xr, kr, target, base,
        tuple(jnp.asarray(m) for m in sites.masks))
    return PatchingResult(sites, s_clean, s_corrupt, patched, estimate, target.name)


def _run_score(config, params, x, kwargs, target, bound):
    s, _, _ = _score(config, params, x, kwargs, target, edits=bound)
    return s


@functools.partial(jax.jit, static_argnames=("config", "plan"))
def _patching(config, plan: _Plan, params, xc, kc, xr, kr, target, base, masks):
    s_clean, _, clean = _score(config, params, xc, kc, target, edits=base, maps=plan.maps)
    s_corrupt, _, corrupt = _score(config, params, xr, kr, target, edits=base, maps=plan.maps)
    patched = estimate = None
    if plan.activation:
        per_name = []
        for name, anchors, group in zip(plan.names, plan.anchors, masks, strict=True):
            given = E.bind(config, {a: E.replace(clean[a]) for a in anchors}, xc, kc)

            def one(mask, name=name, given=given):
                bound = E.merge(base, given, E.bind(config, {name: E.patch(corrupt[name], mask)},
                                                    xc, kc))
                return _run_score(config, params, xc, kc, target, bound)

            per_name.append(jax.lax.map(one, group, batch_size=min(plan.chunk, group.shape[0])))
        patched = jnp.concatenate(per_name, axis=0).T  # [B, sites]
    if plan.attribution:
        zeros = {n: jnp.zeros_like(clean[n]) for n in plan.names}

        def total(deltas):
            bound = E.merge(base, E.bind(config, {n: E.add(d) for n, d in deltas.items()}, xc, kc))
            return _run_score(config, params, xc, kc, target, bound).sum()

        grads = jax.grad(total)(zeros)  # items do not interact: one backward, every item
        per_name = []
        for name, group in zip(plan.names, masks, strict=True):
            change = (corrupt[name] - clean[name]) * grads[name]  # [B, ...]
            axes = tuple(range(1, change.ndim))

            def summed(mask, change=change, axes=axes):
                return jnp.where(jnp.broadcast_to(mask[None], change.shape), change, 0).sum(axes)

            per_name.append(jax.lax.map(summed, group))
        estimate = jnp.concatenate(per_name, axis=0).T
    return s_clean, s_corrupt, patched, estimate

