"""``jaxspeech.attribute``: explain a batch of waveforms with one compiled call.

    res = js.attribute(m, wave, target=js.targets.predicted_class(), method="attnlrp")
    res.relevance      # same layout as m.features(wave)
    res.score          # [B] target value per item
    res.frames()       # [B, frames] relevance pooled over frequency
    res.to_waveform()  # [B, samples] relevance spread back over the samples of each frame

Methods: the LRP rule sets (``attnlrp``, ``cp_lrp``, ``epsilon``, ``gamma``, ``zplus``)
and ``saliency``, ``gradient_x_input``, ``integrated_gradients``, ``smoothgrad``,
``gradcam``, ``rollout``, ``gradient_rollout``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxspeech import lrp
from jaxspeech.attribution import methods, targets
from jaxspeech.attribution.targets import Target

__all__ = ["attribute", "Attribution", "METHODS", "LRP_METHODS", "targets", "methods"]

LRP_METHODS = tuple(lrp.RULE_SETS)
GRADIENT_METHODS = ("saliency", "gradient_x_input", "integrated_gradients", "smoothgrad")
LAYER_METHODS = ("gradcam", "rollout", "gradient_rollout")
METHODS = LRP_METHODS + GRADIENT_METHODS + LAYER_METHODS


@dataclasses.dataclass(frozen=True)
class Attribution:
    """The relevance of every input feature for one target, per item.

    ``relevance`` has the features' layout (Whisper ``[B, n_mels, 3000]``, ECAPA
    ``[B, frames, n_mels]``, CLAP ``[B, channels, frames, 64]``); ``score`` is the
    target per item; ``extras`` holds method diagnostics (IG's completeness gap,
    LRP's conservation ratio, Grad-CAM's per-token map).
    """

    relevance: jnp.ndarray
    score: jnp.ndarray
    features: jnp.ndarray
    method: str
    target: str
    model: Any = dataclasses.field(repr=False)
    wave: Any = dataclasses.field(default=None, repr=False)
    extras: dict = dataclasses.field(default_factory=dict)

    @property
    def time_axis(self) -> int:
        return self.model.family.time_axis % self.relevance.ndim

    def frames(self) -> jnp.ndarray:
        """``[B, frames]``: relevance summed over every axis but batch and time."""
        axes = tuple(a for a in range(1, self.relevance.ndim) if a != self.time_axis)
        return self.relevance.sum(axis=axes)

    def to_waveform(self, n_samples: int | None = None) -> jnp.ndarray:
        """``[B, samples]``: each frame's relevance spread evenly over the ``hop_length``
        samples it stands for (frames past the audio are dropped). Where a front end does
        not lay frames end to end over the clip (CLAP's repeat padding, crops and fusion),
        the family's ``waveform_relevance`` traces them back to the clip's own samples."""
        family = self.model.family
        if family.waveform_relevance is not None:
            sizes = n_samples if n_samples is not None else self.extras.get("n_samples")
            if sizes is None and self.wave is not None:
                sizes = np.shape(self.wave)[-1]
            if sizes is None:
                raise ValueError(f"{self.model.kind} needs n_samples= (each clip's length) to "
                                 "pull relevance back to the waveform")
            return family.waveform_relevance(self.model.config, self.relevance, sizes,
                                             crops=self.extras.get("crops"))
        hop = family.hop_length(self.model.config)
        per_frame = self.frames() / hop
        wave = jnp.repeat(per_frame, hop, axis=-1)
        if n_samples is None and self.wave is not None:
            n_samples = self.wave.shape[-1]
        if n_samples is None:
            return wave
        if wave.shape[-1] >= n_samples:
            return wave[:, :n_samples]
        return jnp.pad(wave, ((0, 0), (0, n_samples - wave.shape[-1])))

    def conservation(self) -> jnp.ndarray:
        """``[B]``: total relevance / target value (1 where a rule conserves exactly)."""
        axes = tuple(range(1, self.relevance.ndim))
        return self.relevance.sum(axis=axes) / self.score

    def numpy(self) -> dict[str, np.ndarray]:
        return {"relevance": np.asarray(self.relevance), "score": np.asarray(self.score),
                "features": np.asarray(self.features)}


def attribute(
    model,
    wave=None,
    target: Target | Callable | None = None,
    method: str = "attnlrp",
    *,
    features=None,
    sample_rate: int | None = None,
    params=None,
    layer: str | None = None,
    steps: int = 32,
    baseline: float | np.ndarray | None = None,
    integration: str = "gausslegendre",
    n_samples: int = 16,
    noise_level: float = 0.1,
    key: jax.Array | None = None,
    epsilon: float | None = None,
    gamma: float | None = None,
    rules: lrp.RuleSet | None = None,
    batch_size: int = 4,
    remat: bool = False,
    edits=None,
    **prepare_options,
) -> Attribution:
    """Explain ``target`` for each item of ``wave`` (or of precomputed ``features``).

    ``method``: an LRP rule set name (``rules=`` overrides it with a custom
    :class:`~jaxspeech.lrp.RuleSet`, ``epsilon=``/``gamma=`` set its parameters), or a
    gradient / layer method. ``layer``: Grad-CAM's layer (a name from
    ``m.forward``'s intermediates). ``steps``, ``baseline`` (default: the features'
    minimum per item — silence in log-mel terms), ``integration``: integrated
    gradients. ``n_samples``, ``noise_level``, ``key``: SmoothGrad. ``batch_size``:
    IG steps / SmoothGrad samples computed at once. ``params``: explain another
    params tree (a randomised copy, say) with the same model.
    Keyword options of the front end (``lengths``, CLAP's ``key``) pass through.

    ``target``: a :mod:`jaxspeech.targets` target, or a plain function ``fn(y) -> [B]`` of
    the output ``y = m.apply(params, x)`` (wrapped as ``js.targets.custom(fn)``); default
    :func:`jaxspeech.targets.default`.

    ``edits``: ``{site: edit}`` (:mod:`jaxspeech.edits`): explain the edited model (every
    method's forward and backward run through the edits; the model's own ops keep their
    rules).
    """
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose from {', '.join(METHODS)}")
    params = model.params if params is None else params
    features, kwargs = model.inputs(wave, features, sample_rate=sample_rate, **prepare_options)
    target = targets.resolve(model, target)  # None: the default; a function: custom
    config = model.config
    from jaxspeech.edits import bind

    edits = bind(config, edits, features, kwargs)
    extras: dict[str, Any] = {}

    if method in LRP_METHODS or rules is not None:
        rule_set = rules if rules is not None else methods.rules_for(method, epsilon, gamma)
        g, score = methods.gradient(config, params, features, kwargs, target, rules=rule_set,
                                    remat=remat, edits=edits)
        relevance = features * g
    elif method in ("saliency", "gradient_x_input"):
        g, score = methods.gradient(config, params, features, kwargs, target, remat=remat,
                                    edits=edits)
        relevance = jnp.abs(g) if method == "saliency" else features * g
    elif method == "integrated_gradients":
        base = _baseline(features, baseline)
        relevance, score, base_score = methods.integrated_gradients(
            config, params, features, kwargs, target, base, steps=steps, method=integration,
            batch_size=batch_size, remat=remat, edits=edits)
        total = relevance.sum(axis=tuple(range(1, relevance.ndim)))
        extras.update(baseline_score=base_score,
                      completeness_gap=(total - (score - base_score)) / jnp.abs(score - base_score))
    elif method == "smoothgrad":
        key = jax.random.key(0) if key is None else key
        relevance, score = methods.smoothgrad(config, params, features, kwargs, target, key,
                                              noise_level=noise_level, n_samples=n_samples,
                                              batch_size=batch_size, remat=remat, edits=edits)
    else:
        if method == "gradcam":
            if layer is None:
                names = [n for n in methods.layer_names(config, features, kwargs)
                         if n.endswith("hidden_state")]
                raise ValueError(f"gradcam needs layer=...; this model has: {', '.join(names)}")
            tokens, score = methods.gradcam(config, params, features, kwargs, target, layer, remat,
                                            edits)
        elif method == "rollout":
            tokens, score = methods.rollout(config, params, features, kwargs, target, remat, edits)
        else:
            tokens, score = methods.gradient_rollout(config, params, features, kwargs, target,
                                                     remat, edits)
        to_features = model.family.tokens_to_features
        if to_features is None:
            raise ValueError(f"{model.kind} cannot lay a per-token map over its features")
        extras["tokens"] = tokens
        relevance = to_features(config, layer, tokens, features.shape)
    if method in LRP_METHODS:
        extras["conservation"] = relevance.sum(axis=tuple(range(1, relevance.ndim))) / score
    if wave is not None:  # each clip's own length, for to_waveform
        extras["n_samples"] = np.asarray([np.shape(c)[-1] for c in wave]) \
            if isinstance(wave, (list, tuple)) else np.full(len(_as_array(wave)), np.shape(wave)[-1])
    if prepare_options.get("crops") is not None:
        extras["crops"] = prepare_options["crops"]
    return Attribution(relevance, score, features, method, target.name, model,
                       wave=None if wave is None else jnp.asarray(_as_array(wave)), extras=extras)


def _baseline(features, baseline):
    if baseline is None:
        axes = tuple(range(1, features.ndim))
        return jnp.broadcast_to(features.min(axis=axes, keepdims=True), features.shape)
    return jnp.broadcast_to(jnp.asarray(baseline, features.dtype), features.shape)


def _as_array(wave):
    if isinstance(wave, (list, tuple)):
        from jaxspeech.audio import stack_clips

        return stack_clips(wave)[0]
    wave = np.asarray(wave)
    return wave[None] if wave.ndim == 1 else wave
