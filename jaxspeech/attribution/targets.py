"""What to explain: a target maps a model's batched outputs to one value per item.

A :class:`Target` is a pytree (its arrays are traced, its function and layer are
static), so one compiled attribution serves a whole corpus of reference
embeddings, class indices or text embeddings. It is called as
``target(output, intermediates, params, rules) -> [B]`` where ``output`` is what
``m.apply`` returns, ``intermediates`` what ``m.forward`` returns and ``rules`` the
LRP rule set in force (``None`` for gradient methods): targets that normalise
(cosine and text similarity) hold their norms constant under LRP, as LayerNorm's σ
is held, so that relevance sums to the similarity rather than to zero (a cosine is
scale-invariant: its plain ``x · grad`` is 0).

    js.targets.class_logit(7)                                # ECAPA speaker 7 (its classifier)
    js.targets.predicted_class()                             # each item's top class
    js.targets.linear_probe(w, b, 3, layer="layers.2.hidden_state")
    js.targets.cosine_similarity(reference_embedding)        # speaker verification
    js.targets.text_similarity(text_embeddings, index=0)     # CLAP audio-text
    js.targets.text_similarity(["a dog"], model=m)           # label strings: m's text tower
    js.targets.layer_norm("layers.3.hidden_state", frames=np.arange(100, 200))
    js.targets.layer_direction("layers.3.hidden_state", direction, frames=mask)
    js.targets.custom(lambda y: y[:, 0, 5])                  # any function of the output
    js.attribute(m, wave, target=lambda y: y[:, 0, 5])       # the same: wrapped as custom
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from .. import lrp

__all__ = ["Target", "class_logit", "predicted_class", "linear_probe", "cosine_similarity",
           "text_similarity", "layer_norm", "layer_direction", "output_norm", "custom", "as_target",
           "resolve", "default"]


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Target:
    """``fn(source, args, params, rules) -> [B]`` on ``source`` = the output or
    ``intermediates[layer]``."""

    fn: Callable = dataclasses.field(metadata=dict(static=True))
    name: str = dataclasses.field(metadata=dict(static=True))
    layer: str | None = dataclasses.field(default=None, metadata=dict(static=True))
    args: Mapping[str, Any] = dataclasses.field(default_factory=dict)

    def __call__(self, output, intermediates: Mapping[str, jnp.ndarray], params=None,
                 rules: lrp.RuleSet | None = None) -> jnp.ndarray:
        if self.layer is None:
            source = output
        else:
            if self.layer not in intermediates:
                raise KeyError(unknown_layer_message(self.layer, intermediates))
            source = intermediates[self.layer]
        value = self.fn(source, self.args, params, rules)
        if value.ndim != 1:
            raise ValueError(f"target {self.name!r} gave shape {tuple(value.shape)}; a target must "
                             "give one value per item ([batch])")
        return value


def unknown_layer_message(layer: str, available) -> str:
    names = sorted(available)
    hint = " (class targets read the classifier's logits: load ECAPA with its classifier.ckpt)" \
        if layer == "logits" else ""
    return f"unknown layer {layer!r}{hint}; this model has: {', '.join(names)}"


def _per_item(value, batch: int, name: str) -> jnp.ndarray:
    """A scalar or ``[B]`` index -> ``[B]`` int array."""
    value = jnp.asarray(value)
    if value.ndim == 0:
        return jnp.broadcast_to(value, (batch,))
    if value.shape != (batch,):
        raise ValueError(f"{name} has shape {tuple(value.shape)}; expected a scalar or [{batch}]")
    return value


def _pick(logits: jnp.ndarray, index) -> jnp.ndarray:
    idx = _per_item(index, logits.shape[0], "class index")
    if not jnp.issubdtype(idx.dtype, jnp.integer):
        raise ValueError("class index must be an integer")
    return jnp.take_along_axis(logits, idx[:, None].astype(jnp.int32), axis=1)[:, 0]


def _pool(h: jnp.ndarray, frames) -> jnp.ndarray:
    """``[B, T, D]`` -> ``[B, D]``: mean over the chosen frames (a ``[T]``/``[B, T]`` mask or
    index array; all frames when ``None``). ``[B, D]`` passes through."""
    if h.ndim == 2:
        return h
    if h.ndim != 3:
        raise ValueError(f"layer output of shape {tuple(h.shape)}: expected [batch, frames, dim]")
    if frames is None:
        return h.mean(axis=1)
    mask = jnp.asarray(frames)
    if mask.dtype != jnp.bool_:
        mask = jnp.zeros(h.shape[1], bool).at[mask].set(True)
    mask = jnp.broadcast_to(mask.reshape((-1, h.shape[1]))[..., None], h.shape)
    return (h * mask).sum(axis=1) / jnp.maximum(mask.sum(axis=1), 1)


# --- factories ---------------------------------------------------------------------------

def class_logit(index) -> Target:
    """The logit of class ``index`` (scalar or ``[B]``) of the model's own classifier
    (ECAPA's AAM-softmax head: cosine logits); reads ``intermediates["logits"]``."""
    return Target(_class_logit_from_intermediates, "class_logit", "logits",
                  {"index": np.asarray(index)})


def _class_logit_from_intermediates(logits, args, params, rules):
    return _pick(logits, args["index"])


def _predicted(logits, args, params, rules):
    idx = jax.lax.stop_gradient(jnp.argmax(logits, axis=-1))
    return _pick(logits, idx)


def predicted_class(layer: str = "logits") -> Target:
    """Each item's highest logit (the decision the model made)."""
    return Target(_predicted, "predicted_class", layer)


def _probe(source, args, params, rules):
    x = _pool(source, args.get("frames"))
    logits = x @ args["weight"] + args["bias"][None, :]
    return _pick(logits, args["index"])


def linear_probe(weight, bias, index, *, layer: str | None = None, frames=None) -> Target:
    """Logit ``index`` of a linear probe ``pool(h) @ weight + bias`` on ``layer`` (the output
    when ``None``), pooled over ``frames``. ``weight [D, classes]``, ``bias [classes]``."""
    weight = np.asarray(weight, np.float32)
    bias = np.zeros(weight.shape[1], np.float32) if bias is None else np.asarray(bias, np.float32)
    args = {"weight": weight, "bias": bias, "index": np.asarray(index)}
    if frames is not None:
        args["frames"] = np.asarray(frames)
    return Target(_probe, "linear_probe", layer, args)


def _unit(x: jnp.ndarray, rules) -> jnp.ndarray:
    """``x / |x|`` along the last axis; under LRP ``|x|`` is a constant scale."""
    return x / (lrp.norm_std(jnp.linalg.norm(x, axis=-1, keepdims=True), rules) + 1e-8)


def _cosine(source, args, params, rules):
    x = _pool(source, args.get("frames"))
    ref = jnp.broadcast_to(args["reference"].reshape((-1, x.shape[-1])), x.shape)
    return (_unit(x, rules) * _unit(ref, None)).sum(-1)


def cosine_similarity(reference, *, layer: str | None = None, frames=None) -> Target:
    """Cosine similarity of the output (or ``layer``, pooled) to ``reference [D]`` or per-item
    ``[B, D]``: speaker verification — explain each side of a trial against the other."""
    args = {"reference": np.asarray(reference, np.float32)}
    if frames is not None:
        args["frames"] = np.asarray(frames)
    return Target(_cosine, "cosine_similarity", layer, args)


def _text(source, args, params, rules):
    return _pick(_unit(source, rules) @ _unit(args["text"], None).T, args["index"])


def text_similarity(text_embeddings, index=0, *, model=None) -> Target:
    """CLAP audio–text cosine similarity to text ``index`` (scalar or ``[B]``) of
    ``text_embeddings``: ``[N, D]`` embeddings (from :func:`jaxspeech.clap_text_embeddings`
    or your own), or N strings (labels, captions) embedded here by ``model``'s text tower
    (a CLAP model loaded from a ClapModel checkpoint, its ``m.text``, or a checkpoint
    folder), in JAX. The text side is the fixed target; to explain both sides use
    :func:`jaxspeech.attribute_match`."""
    texts = [text_embeddings] if isinstance(text_embeddings, str) else text_embeddings
    if isinstance(texts, (list, tuple)) and texts and all(isinstance(t, str) for t in texts):
        if model is None:
            raise ValueError("text strings need model= (a CLAP model with its text tower, or a "
                             "ClapModel checkpoint folder) to embed them")
        from jaxspeech.clap_text import clap_text_embeddings

        text_embeddings = clap_text_embeddings(model, texts)
    return Target(_text, "text_similarity", None,
                  {"text": np.atleast_2d(np.asarray(text_embeddings, np.float32)),
                   "index": np.asarray(index)})


def _norm(source, args, params, rules):
    return jnp.linalg.norm(_pool(source, args.get("frames")), axis=-1)


def layer_norm(layer: str | None, frames=None) -> Target:
    """L2 norm of ``layer``'s output (mean over ``frames``); the output when ``layer`` is None."""
    args = {} if frames is None else {"frames": np.asarray(frames)}
    return Target(_norm, "layer_norm", layer, args)


def output_norm() -> Target:
    """L2 norm of the model output (averaged over frames for Whisper)."""
    return layer_norm(None)


def _direction(source, args, params, rules):
    return _pool(source, args.get("frames")) @ args["direction"]


def layer_direction(layer: str | None, direction, frames=None) -> Target:
    """Projection of ``layer``'s output (mean over ``frames``) on ``direction [D]``."""
    args = {"direction": np.asarray(direction, np.float32)}
    if frames is not None:
        args["frames"] = np.asarray(frames)
    return Target(_direction, "layer_direction", layer, args)


def custom(fn: Callable[[jnp.ndarray], jnp.ndarray], *, layer: str | None = None,
           name: str | None = None) -> Target:
    """Any function ``fn(y) -> [B]`` (one value per item) of the output ``y`` — what
    ``m.apply`` returns: Whisper ``[B, frames, d_model]``, ECAPA ``[B, 192]``, CLAP
    ``[B, 512]`` — or, with ``layer``, of that intermediate (``m.forward``'s names).
    ``fn`` must be traceable by JAX (``jnp`` ops, no ``float()`` of its input).

    ``name`` (reports, plot titles): default ``fn.__name__``, ``"custom"`` for a lambda.
    A plain function passed as ``target=`` to :func:`jaxspeech.attribute` is wrapped
    here. The compiled attribution is reused for the same function object: define the
    function once, not a new lambda per call."""
    if not callable(fn):
        raise TypeError(f"custom(fn) needs a function fn(output) -> [batch], got {type(fn).__name__}")
    if name is None:
        name = getattr(fn, "__name__", "")
        name = name if name.isidentifier() else "custom"  # "<lambda>", partials
    return Target(_OfSource(fn), name, layer)


@dataclasses.dataclass(frozen=True)
class _OfSource:
    """``fn(source)`` in the ``(source, args, params, rules)`` signature of a Target's
    function. Equal (and hashing alike) for the same ``fn``, so jit, which keys its cache on
    the static function, reuses one compilation per user function."""

    fn: Callable

    def __call__(self, source, args, params, rules):
        return self.fn(source)


def as_target(target) -> Target:
    """``target`` as a :class:`Target`: a Target passes through, a plain function of the
    output is wrapped by :func:`custom`; anything else raises ``TypeError``."""
    if isinstance(target, Target):
        return target
    if callable(target):
        return custom(target)
    raise TypeError(
        f"target must be a jaxspeech.targets.Target (js.targets.output_norm(), "
        f"js.targets.class_logit(3), ...) or a function of the output, fn(y) -> [batch], which "
        f"js.targets.custom(fn) wraps; got {type(target).__name__} {target!r:.60}")


def resolve(model, target) -> Target:
    """The target an entry point explains: :func:`default` for ``None``, else
    :func:`as_target`."""
    return default(model) if target is None else as_target(target)


def default(model) -> Target:
    """The target used when none is given: the top class of a model with a classifier
    head (ECAPA with ``classifier.ckpt``), else the output's norm."""
    if model.extras.get("has_classifier") or "classifier" in model.params:
        return predicted_class()
    return output_norm()
