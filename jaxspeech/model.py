"""A loaded model: config + params + the family's pure functions, jitted.

A *family* (whisper, ecapa, clap) is registered once by its model file with
:func:`register_family`; it says how to build the Linen module for a config,
how to turn waveforms into the module's input (the front end), and what an
example input looks like. :class:`Model` binds a config and params to it.

    m = jaxspeech.init("whisper-tiny")
    x = m.features(wave)            # [B, n_mels, 3000], differentiable in wave
    y = m.apply(m.params, x)        # [B, 1500, d_model], pure and jitted
    y, inter = m.forward(m.params, x)  # plus every layer's hidden state / attention
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import json
import os
import warnings
from collections.abc import Callable, Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxspeech import audio, layers, lrp

__all__ = ["Family", "Model", "register_family", "families", "family_of", "init", "presets"]


@dataclasses.dataclass(frozen=True)
class Family:
    """What jaxspeech needs to know about one model family.

    ``module(config, rules, remat)``: the Linen module; its ``__call__`` takes the
    features and the keyword inputs that ``prepare`` returns.
    ``prepare(config, wave [B, samples] float32, lengths, **options)``: the front end;
    returns ``(features, apply_kwargs)`` (e.g. ``{"lengths": ...}`` for ECAPA).
    ``example_features(config, batch)``: a ``ShapeDtypeStruct`` of the features
    (with the matching example kwargs) for init and ``eval_shape``.
    ``max_samples(config)``: the longest waveform accepted (``None``: any, the front
    end trims or chunks and says so in its docs).
    ``tokens_to_features(config, layer, token_map [B, tokens], features_shape)``: a
    per-token map of a layer laid over the features' layout.
    """

    name: str
    config_type: type
    presets: Mapping[str, Any]
    module: Callable[..., nn.Module]
    prepare: Callable[..., tuple[jnp.ndarray, dict]]
    example_features: Callable[[Any, int], tuple[jax.ShapeDtypeStruct, dict]]
    sample_rate: Callable[[Any], int]
    max_samples: Callable[[Any], int | None] = lambda config: None
    # Where time runs in the features (pooling relevance to frames), the hop between
    # frames in samples (pulling it back to the waveform), and how a per-token map of a
    # layer ([B, tokens]) is laid over the features (Grad-CAM, rollout).
    time_axis: int = -1
    hop_length: Callable[[Any], int] = lambda config: 160
    tokens_to_features: Callable[..., jnp.ndarray] | None = None
    # Where each attention map's rows and columns sit among the tokens, for rollout:
    # ``attention_geometry(config)`` -> one ``(map name, block output name, windows [W, n],
    # sources [T, k] | None)`` per map in forward order (windows: the token in each
    # query/key slot of each window, -1 = padding; sources: the previous map's tokens each
    # token was merged from). None: every map is full attention [B, heads, T, T] over one
    # token sequence (Whisper); see ``jaxspeech.models.clap.AttentionGeometry``.
    attention_geometry: Callable[[Any], tuple] | None = None
    # ``waveform_relevance(config, relevance [features' layout], n_samples [B])`` ->
    # ``[B, samples]``: relevance pulled back to each clip's samples where frames are not
    # simply consecutive hops of the clip (CLAP's repeat padding, crops, fusion's
    # channels). None: each frame's relevance spread over its hop.
    waveform_relevance: Callable[..., jnp.ndarray] | None = None
    # ``init_inputs(config, batch)`` -> extra keyword inputs for init only, so that every
    # param is made (Whisper's decoder needs a token prefix); the forward takes them too.
    init_inputs: Callable[[Any, int], dict] = lambda config, batch: {}


_FAMILIES: dict[str, Family] = {}


def register_family(family: Family) -> Family:
    _FAMILIES[family.name] = family
    return family


def families() -> dict[str, Family]:
    """All registered families (importing :mod:`jaxspeech` registers the built-in three)."""
    return dict(_FAMILIES)


def family_of(config: Any) -> Family:
    for fam in _FAMILIES.values():
        if isinstance(config, fam.config_type):
            return fam
    raise TypeError(f"no model family for config of type {type(config).__name__}")


def presets() -> dict[str, Any]:
    """Every named preset of every family: ``{"whisper-tiny": WhisperConfig(...), ...}``."""
    return {name: cfg for fam in _FAMILIES.values() for name, cfg in fam.presets.items()}


# --- jitted entry points (config and rules are static, params/features traced) ---------

def _module(config, rules, remat) -> nn.Module:
    return family_of(config).module(config, rules=lrp.get_rules(rules), remat=remat)


def variables(params, edits=None) -> dict:
    """The module's variables: ``params``, and a bound edit tree (:func:`jaxspeech.edits.bind`)
    as the :data:`jaxspeech.layers.EDITS` collection."""
    return {"params": params} if edits is None else edits.variables(params)


@functools.partial(jax.jit, static_argnames=("config", "rules", "remat"))
def _apply(config, params, features, kwargs, rules=None, remat=False, edits=None):
    return _module(config, rules, remat).apply(variables(params, edits), features, **kwargs)


@functools.partial(jax.jit, static_argnames=("config", "rules", "remat"))
def _forward(config, params, features, kwargs, rules=None, remat=False, edits=None):
    out, state = _module(config, rules, remat).apply(
        variables(params, edits), features, **kwargs,
        mutable=["intermediates", layers.KEEP_ATTENTION_MAPS])
    return out, flatten_intermediates(state.get("intermediates", {}))


def flatten_intermediates(tree: Mapping) -> dict[str, jnp.ndarray]:
    """Linen's nested ``sow`` collection -> ``{"layers.0.hidden_state": array, ...}``."""
    flat = {}

    def walk(node, prefix):
        for key, value in node.items():
            name = f"{prefix}.{key}" if prefix else str(key)
            if isinstance(value, Mapping):
                walk(value, name)
            else:  # sow stores a tuple of every value sown under the name
                flat[name] = value[0] if len(value) == 1 else jnp.stack(value)

    walk(tree, "")
    return flat


def intermediate_paths(tree: Mapping) -> dict[str, tuple[tuple[str, ...], Any]]:
    """A nested ``sow`` collection -> ``{"layers.0.hidden_state": (("layers.0",
    "hidden_state"), what was sown), ...}``: each name with its key path in the tree."""
    out = {}

    def walk(node, path):
        for key, value in node.items():
            if isinstance(value, Mapping):
                walk(value, path + (key,))
            else:
                out[".".join(path + (key,))] = (path + (key,), value)

    walk(tree, ())
    return out


def _init_example(config):
    family = family_of(config)
    spec, kwargs = family.example_features(config, 1)
    return spec, {**kwargs, **family.init_inputs(config, 1)}


def init_params(config, seed: int = 0) -> dict:
    """Random params for ``config`` (the families' initialisers), as a plain nested dict."""
    spec, kwargs = _init_example(config)
    x = jnp.zeros(spec.shape, spec.dtype)
    module = _module(config, None, False)
    variables = jax.jit(module.init)(jax.random.key(seed), x, **kwargs)
    return _to_plain(variables["params"])


def param_shapes(config) -> dict:
    """``ShapeDtypeStruct`` tree of the params, without allocating them (``jax.eval_shape``)."""
    spec, kwargs = _init_example(config)
    module = _module(config, None, False)
    return jax.eval_shape(lambda k, x: module.init(k, x, **kwargs), jax.random.key(0), spec)[
        "params"]


def count_params(tree) -> int:
    return int(sum(np.prod(leaf.shape) for leaf in jax.tree.leaves(tree)))


def _to_plain(tree):
    if isinstance(tree, Mapping):
        return {k: _to_plain(v) for k, v in tree.items()}
    return tree


class Model:
    """A config, its params and its family's front end and forward, all pure.

    ``m.apply(params, features, **kw)`` and ``m.forward(...)`` are jitted with the
    config (and rule set) static; pass any params tree of the same structure
    (a fine-tuned copy, a randomised one) — the model object holds no state.
    ``m.text``: a CLAP ``ClapModel``'s text tower (:class:`jaxspeech.clap_text.TextTower`),
    ``None`` for every other model.
    """

    def __init__(self, config, params: dict, *, source: str | None = None,
                 extras: Mapping[str, Any] | None = None, text: Any = None):
        self.config = config
        self.params = params
        self.family = family_of(config)
        self.source = source
        self.extras = dict(extras or {})
        # CLAP: the checkpoint's text tower (jaxspeech.clap_text.TextTower), kept beside the
        # audio params so that every audio entry point sees the same params tree as before
        self.text = text

    # --- properties
    @property
    def kind(self) -> str:
        return self.family.name

    @property
    def sample_rate(self) -> int:
        return self.family.sample_rate(self.config)

    @property
    def n_params(self) -> int:
        return count_params(self.params)

    @property
    def dtype(self) -> str:
        """The compute dtype (``config.dtype``); params are float32 whatever it is."""
        return self.config.dtype

    def astype(self, dtype: str) -> Model:
        """The same model computing in ``dtype`` (``"float32"``, ``"bfloat16"``,
        ``"float16"``): mixed precision, with params, inputs, outputs, LayerNorm
        statistics and softmax in float32, every linear map and product in ``dtype``; the
        relevance of every method (x·∂y/∂x at the float32 input) stays float32. A CLAP
        text tower follows."""
        dtype = jnp.dtype(dtype).name if not isinstance(dtype, str) else dtype
        layers.check_dtype(dtype)
        text = self.text
        if text is not None:
            text = copy.copy(text)
            text.config = dataclasses.replace(text.config, dtype=dtype)
        return Model(dataclasses.replace(self.config, dtype=dtype), self.params,
                     source=self.source, extras=self.extras, text=text)

    def __repr__(self) -> str:
        return (f"Model({self.kind}, {self.n_params:,} params, {self.sample_rate} Hz, "
                f"config={self.config})")

    # --- pure functions
    def module(self, rules: str | lrp.RuleSet | None = None, remat: bool = False) -> nn.Module:
        """The Linen module (for users composing it into their own Flax code)."""
        return _module(self.config, lrp.get_rules(rules), remat)

    def apply(self, params, features, *, rules=None, remat: bool = False, edits=None, **kwargs):
        """Pure forward: ``features`` (as :meth:`features` returns) -> the model output.
        ``edits``: ``{site: edit}`` interventions (:mod:`jaxspeech.edits`)."""
        from jaxspeech.edits import bind

        return _apply(self.config, params, features, kwargs, rules=lrp.get_rules(rules),
                      remat=remat, edits=bind(self.config, edits, features, kwargs))

    def forward(self, params, features, *, rules=None, remat: bool = False, edits=None,
                **kwargs):
        """``(output, intermediates)``: intermediates maps layer paths to arrays, e.g.
        ``"layers.3.hidden_state"``, ``"layers.3.self_attn.attention"``, as they flow
        (after any ``edits``, :mod:`jaxspeech.edits`)."""
        from jaxspeech.edits import bind

        return _forward(self.config, params, features, kwargs, rules=lrp.get_rules(rules),
                        remat=remat, edits=bind(self.config, edits, features, kwargs))

    # --- waveforms in
    def prepare(self, wave, *, sample_rate: int | None = None, **options):
        """Validate ``wave`` and run the front end: ``(features, apply_kwargs)``."""
        batch, lengths = audio.as_batch(
            wave, expected_rate=self.sample_rate, sample_rate=sample_rate,
            max_samples=self.family.max_samples(self.config), name=self.kind)
        if "lengths" in options and options["lengths"] is not None:
            lengths = options.pop("lengths")
        else:
            options.pop("lengths", None)
        return self.family.prepare(self.config, batch, lengths, **options)

    def inputs(self, wave=None, features=None, *, sample_rate: int | None = None, **options):
        """``(features, apply_kwargs)`` from a waveform (validated, then the front end) or
        from precomputed ``features`` (front-end options become the apply kwargs)."""
        if features is not None:
            return jnp.asarray(features), {k: jnp.asarray(v) for k, v in options.items()
                                           if v is not None}
        if wave is None:
            raise ValueError("give a waveform (wave=...) or precomputed features (features=...)")
        return self.prepare(wave, sample_rate=sample_rate, **options)

    def features(self, wave, *, sample_rate: int | None = None, **options):
        """``wave [B, samples]`` (or ``[samples]``, or a list of clips) -> model input."""
        return self.prepare(wave, sample_rate=sample_rate, **options)[0]

    def __call__(self, wave, *, sample_rate: int | None = None, rules=None, **options):
        features, kwargs = self.prepare(wave, sample_rate=sample_rate, **options)
        return self.apply(self.params, features, rules=rules, **kwargs)

    # --- persistence
    def save(self, path: str | os.PathLike) -> str:
        """Write params (orbax) and config (JSON) to ``path``; ``jaxspeech.load`` reads it."""
        from jaxspeech.convert import orbax_io

        return orbax_io.save(self, path)


def init(name: str, seed: int = 0, **overrides) -> Model:
    """A named preset with random weights: ``init("whisper-base")``; fields may be overridden
    (``init("whisper-tiny", encoder_layers=2)``; ``dtype="bfloat16"`` computes in bfloat16,
    :meth:`Model.astype`)."""
    table = presets()
    if name not in table:
        raise ValueError(f"unknown preset {name!r}; known presets: {', '.join(sorted(table))}")
    config = dataclasses.replace(table[name], **overrides) if overrides else table[name]
    if hasattr(config, "normalised"):  # e.g. Whisper with decoder_layers=0: encoder only
        config = config.normalised()
    return Model(config, init_params(config, seed), source=f"init:{name}")


def config_to_dict(config) -> dict:
    return {"family": family_of(config).name, **dataclasses.asdict(config)}


def config_from_dict(data: Mapping) -> Any:
    data = dict(data)
    name = data.pop("family", None)
    if name not in _FAMILIES:
        raise ValueError(f"unknown model family {name!r}; known: {sorted(_FAMILIES)}")
    cls = _FAMILIES[name].config_type
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ValueError(f"{name} config has unknown fields {unknown}")
    return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in data.items()})


def warn_once(message: str) -> None:
    warnings.warn(message, stacklevel=3)


def dumps_config(config) -> str:
    return json.dumps(config_to_dict(config), indent=2, sort_keys=True)
