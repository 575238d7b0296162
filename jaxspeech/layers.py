"""The Linen layers all three models are built from, each routed through :mod:`jaxspeech.lrp`.

Parameters keep PyTorch's meaning with Flax's layout: ``Dense.kernel`` is
``[in, out]``, ``Conv.kernel`` is ``[*window, in, out]``, norms have ``scale``
and ``bias``, and :class:`BatchNorm` keeps its running ``mean`` and ``var`` in
the same params tree (inference only; nothing is ever updated).

Every layer has a ``rules`` field (``None`` for plain gradients) and resolves
per-layer overrides by its own path, so a model never holds rule logic.
"""

from __future__ import annotations

from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxspeech import lrp

Rules = lrp.RuleSet | None
_PREC = jax.lax.Precision.HIGHEST


def layer_path(module: nn.Module) -> str:
    """``('layers.0', 'fc1')`` -> ``'layers.0.fc1'``."""
    return ".".join(str(p) for p in module.path)


def rules_at(module: nn.Module, rules: Rules) -> Rules:
    """The rule set in force for ``module`` (per-layer overrides resolved)."""
    return None if rules is None else rules.at(layer_path(module))


COMPUTE_DTYPES = ("float32", "bfloat16", "float16")


def check_dtype(dtype: str) -> str:
    """A config's ``dtype`` field, validated: the dtype the model computes in."""
    if dtype not in COMPUTE_DTYPES:
        raise ValueError(f"dtype {dtype!r}: expected one of {', '.join(COMPUTE_DTYPES)} (the "
                         f"compute dtype; params stay float32)")
    return dtype


def to_compute(config, x: jnp.ndarray) -> jnp.ndarray:
    """A model's input in its config's compute ``dtype`` (mixed precision: params stay
    float32 and each linear map casts them to the activation's dtype; LayerNorm
    statistics and softmax run in float32)."""
    return x.astype(getattr(config, "dtype", "float32"))


def to_output(x: jnp.ndarray) -> jnp.ndarray:
    """A model's output (and the values targets read) back in float32."""
    return x.astype(jnp.float32)


def per_channel(v: jnp.ndarray, like: jnp.ndarray) -> jnp.ndarray:
    """A ``[C]`` vector shaped to broadcast over ``like [..., C]`` (explicit ranks: the
    tests run with rank promotion set to raise)."""
    return v.reshape((1,) * (like.ndim - 1) + (-1,))


def dense(x: jnp.ndarray, w: jnp.ndarray, b: jnp.ndarray | None) -> jnp.ndarray:
    """``x [..., in] @ w [in, out] (+ b)``: the map :class:`Dense` puts under the linear rule."""
    y = jnp.einsum("...i,io->...o", x, w, precision=_PREC)
    return y if b is None else y + per_channel(b, y)


class Dense(nn.Module):
    """``x [..., in] -> [..., features]``, under the linear rule."""

    features: int
    use_bias: bool = True
    rules: Rules = None

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        w = self.param("kernel", nn.initializers.lecun_normal(), (x.shape[-1], self.features))
        b = self.param("bias", nn.initializers.normal(0.02), (self.features,)) \
            if self.use_bias else None
        return lrp.linear(dense, x, w, b, rules_at(self, self.rules))


class Conv(nn.Module):
    """N-d convolution over ``x [B, *spatial, in]``, channels last, PyTorch semantics.

    ``padding`` is per spatial dim ``(lo, hi)`` pairs or ``"SAME"``-style strings;
    ``padding_mode`` ``"zeros"`` or ``"reflect"`` (SpeechBrain's 'same' padding).
    """

    features: int
    kernel_size: Sequence[int]
    strides: Sequence[int] | None = None
    padding: Sequence[tuple[int, int]] | str = "VALID"
    dilation: Sequence[int] | None = None
    padding_mode: str = "zeros"
    use_bias: bool = True
    groups: int = 1
    rules: Rules = None

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        k = tuple(self.kernel_size)
        nd = len(k)
        w = self.param("kernel", nn.initializers.lecun_normal(),
                       k + (x.shape[-1] // self.groups, self.features))
        b = self.param("bias", nn.initializers.normal(0.02), (self.features,)) \
            if self.use_bias else None
        padding = self.padding
        if self.padding_mode == "reflect" and not isinstance(padding, str):
            x = jnp.pad(x, [(0, 0)] + [tuple(p) for p in padding] + [(0, 0)], mode="reflect")
            padding = [(0, 0)] * nd
        elif self.padding_mode != "zeros":
            raise ValueError(f"padding_mode {self.padding_mode!r}: expected 'zeros' or 'reflect'")
        strides = tuple(self.strides or (1,) * nd)
        dilation = tuple(self.dilation or (1,) * nd)
        spatial = "".join("DHW"[-nd:]) if nd <= 3 else None
        dn = (f"N{spatial}C", f"{spatial}IO", f"N{spatial}C")
        groups = self.groups

        def conv(x_, w_, b_):
            y = jax.lax.conv_general_dilated(
                x_, w_, strides, padding, rhs_dilation=dilation, dimension_numbers=dn,
                feature_group_count=groups, precision=_PREC)
            return y if b_ is None else y + per_channel(b_, y)

        return lrp.linear(conv, x, w, b, rules_at(self, self.rules))


class LayerNorm(nn.Module):
    """LayerNorm over the last axis; under LRP its σ is a constant (identity rule)."""

    epsilon: float = 1e-5
    use_scale: bool = True
    rules: Rules = None

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        d, dtype = x.shape[-1], x.dtype
        x = x.astype(jnp.float32)  # the statistics in float32 under mixed precision
        mean = jnp.mean(x, axis=-1, keepdims=True)
        centred = x - mean
        var = jnp.mean(jnp.square(centred), axis=-1, keepdims=True)
        std = lrp.norm_std(jnp.sqrt(var + self.epsilon), rules_at(self, self.rules))
        y = centred / std
        if self.use_scale:
            y = y * per_channel(self.param("scale", nn.initializers.ones, (d,)), y)
        return (y + per_channel(self.param("bias", nn.initializers.zeros, (d,)), y)).astype(dtype)


class BatchNorm(nn.Module):
    """Inference-mode BatchNorm over the last (channel) axis from stored statistics.

    An affine map per channel: ``(x - mean) * scale / sqrt(var + eps) + bias``.
    """

    epsilon: float = 1e-5
    rules: Rules = None

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        c = x.shape[-1]
        scale = self.param("scale", nn.initializers.ones, (c,))
        bias = self.param("bias", nn.initializers.zeros, (c,))
        mean = self.param("mean", nn.initializers.zeros, (c,))
        var = self.param("var", nn.initializers.ones, (c,))
        scale, mean, bias = (p.astype(x.dtype) for p in (scale / jnp.sqrt(var + self.epsilon),
                                                          mean, bias))
        return (x - per_channel(mean, x)) * per_channel(scale, x) + per_channel(bias, x)


# A collection nothing is stored in: when it is mutable (``Model.forward``, rollout, layer
# listings) ``attention`` keeps and sows its full ``[B, heads, T, T]`` maps; otherwise (a
# plain forward, an attribution whose target reads no map) it runs the fused core, whose
# backward never holds them.
KEEP_ATTENTION_MAPS = "attention_maps"


# Edits (:mod:`jaxspeech.edits`) live in this collection, nested by module path like the
# params: at a tap ``name`` of a module, the entry ``name`` (if any) is called on the value.
EDITS = "edits"


def edit(module: nn.Module, name: str, x: jnp.ndarray) -> jnp.ndarray:
    """``x`` changed by the edit given for ``<module path>.<name>``, if any (else ``x``
    itself, the same array: an unedited model traces exactly as before)."""
    if module.has_variable(EDITS, name):
        return module.get_variable(EDITS, name)(x)
    return x


def tap(module: nn.Module, name: str, x: jnp.ndarray) -> jnp.ndarray:
    """Expose ``x`` as the intermediate ``<module path>.<name>``: an edit given for it
    (:mod:`jaxspeech.edits`) is applied first; the result is sown into the
    ``intermediates`` collection (``Model.forward`` returns it), and if a
    ``perturbations`` entry of that name is given it is added to ``x`` — the gradient
    with respect to that zero entry is the gradient with respect to the layer output
    (Grad-CAM, gradient rollout). Unlike ``Module.perturb``, only the taps needed have
    to be given, so a full set of attention-sized zeros is never allocated.
    """
    x = edit(module, name, x)
    if module.has_variable("perturbations", name):
        x = x + module.get_variable("perturbations", name)
    module.sow("intermediates", name, x)
    return x


def map_needed(module: nn.Module, name: str = "attention") -> bool:
    """Whether attention probabilities ``name`` must exist as an array: the caller keeps the
    maps (:data:`KEEP_ATTENTION_MAPS` mutable), edits them or perturbs them. Otherwise a
    fused kernel (:func:`jaxspeech.lrp.fused_attention`) may run without them."""
    return (module.has_variable("perturbations", name) or module.has_variable(EDITS, name)
            or module.is_mutable_collection(KEEP_ATTENTION_MAPS))


def attention(module: nn.Module, q: jnp.ndarray, k: jnp.ndarray, v: jnp.ndarray,
              rules: Rules = None, *, name: str = "attention", block: int = 300) -> jnp.ndarray:
    """Softmax attention ``q, k, v [B, T, heads, head_dim]`` (``q`` already scaled) ->
    context ``[B, T, heads, head_dim]``, under the bilinear and attention rules.

    Computed one (item, head, block of ``block`` queries) at a time, so that a
    ``[block, T]`` score tile stays in cache: on CPU this took 35% less CPU time than
    materialising ``[B, heads, T, T]`` (attention core, 8 x 6 heads x 1500 tokens), and
    the backward (:func:`jaxspeech.lrp.attention_core`) recomputes the tiles instead of
    keeping ``[B, heads, T, T]``. The probabilities are tapped as ``name``
    (``[B, heads, T, T]``; an edit of that name is applied and any ``perturbations``
    entry added before they weight ``v``) only when the caller makes
    :data:`KEEP_ATTENTION_MAPS` mutable (``Model.forward``, rollout), edits them or
    perturbs them; that path differentiates the tiled forward as written. The values
    are the same either way, row by row. Where
    :func:`jaxspeech.lrp.attention_implementation` picks a fused kernel ("xla", "cudnn"),
    the untapped path runs :func:`jaxspeech.lrp.fused_attention` instead.
    """
    b, t, h, d = q.shape
    qb = _divisor_at_most(t, block)
    delta = module.get_variable("perturbations", name) \
        if module.has_variable("perturbations", name) else None
    edited = module.has_variable(EDITS, name)
    keep = map_needed(module, name)

    def heads_first(x):  # [B, T, H, D] -> [B*H, T, D]
        return x.transpose(0, 2, 1, 3).reshape(b * h, t, x.shape[-1])

    if not keep:
        implementation = lrp.attention_implementation(q.dtype, d)
        if implementation != "tiled":
            return lrp.fused_attention(q, k, v, rules, implementation=implementation)
        context = lrp.attention_core(heads_first(q), heads_first(k), heads_first(v), rules, qb)
        return context.reshape(b, h, t, d).transpose(0, 2, 1, 3)
    q_blocks = heads_first(q).reshape(b * h, t // qb, qb, d)

    def head_probs(args):
        qh, kh = args
        return jax.lax.map(
            lambda qi: lrp.attention_weights(lrp.bilinear("qd,kd->qk", qi, kh, rules), rules), qh)

    probs = jax.lax.map(head_probs, (q_blocks, heads_first(k)))  # [B*H, T/qb, qb, T]
    if edited or delta is not None:
        full = edit(module, name, probs.reshape(b, h, t, t))
        if delta is not None:
            full = full + delta
        probs = full.reshape(b * h, t // qb, qb, t)

    def head_context(args):
        ph, vh = args
        return jax.lax.map(lambda pi: lrp.bilinear("qk,kd->qd", pi, vh, rules), ph)

    context = jax.lax.map(head_context, (probs, heads_first(v)))
    module.sow("intermediates", name, probs.reshape(b, h, t, t))
    return context.reshape(b, h, t, d).transpose(0, 2, 1, 3)


def masked_attention(module: nn.Module, q: jnp.ndarray, k: jnp.ndarray, v: jnp.ndarray,
                     rules: Rules = None, *, where: jnp.ndarray | None = None,
                     name: str = "attention") -> jnp.ndarray:
    """Softmax attention with a mask, the map materialised: ``q [B, Lq, heads, D]`` (already
    scaled), ``k, v [B, Lk, heads, D]``, ``where`` broadcastable to ``[B, heads, Lq, Lk]``
    (False: masked, no probability and no relevance) -> context ``[B, Lq, heads, D]``.

    For the decoder's causal self-attention and its cross-attention (Lq <= 448 tokens, so
    ``[B, heads, Lq, Lk]`` is small). The probabilities are tapped as ``name`` when
    :data:`KEEP_ATTENTION_MAPS` is mutable; an edit of that name is applied to them and a
    ``perturbations`` entry of that name added (Grad-CAM, gradient rollout), as
    :func:`attention` does. Untapped and unedited, it runs :func:`jaxspeech.lrp.fused_attention`
    where :func:`jaxspeech.lrp.attention_implementation` picks a fused kernel.
    """
    if not map_needed(module, name):
        implementation = lrp.attention_implementation(q.dtype, q.shape[-1])
        if implementation != "tiled":
            return lrp.fused_attention(q, k, v, rules, mask=where, implementation=implementation)
    probs = lrp.attention_weights(lrp.bilinear("bqhd,bkhd->bhqk", q, k, rules), rules,
                                  where=where)
    probs = edit(module, name, probs)
    if module.has_variable("perturbations", name):
        probs = probs + module.get_variable("perturbations", name)
    if module.is_mutable_collection(KEEP_ATTENTION_MAPS):
        module.sow("intermediates", name, probs)
    return lrp.bilinear("bhqk,bkhd->bqhd", probs, v, rules)


def _divisor_at_most(n: int, cap: int) -> int:
    """The largest divisor of ``n`` not above ``cap`` (``n`` itself when ``n <= cap`` or when
    the only such divisors are too small to be worth a loop step)."""
    q = next(q for q in range(min(n, cap), 0, -1) if n % q == 0)
    return q if q >= 32 else n


def gelu(x: jnp.ndarray, rules: Rules = None) -> jnp.ndarray:
    """Exact (erf) GELU, as PyTorch's ``nn.GELU()``."""
    return lrp.activation(lambda t: jax.nn.gelu(t, approximate=False), x, rules)


def relu(x: jnp.ndarray, rules: Rules = None) -> jnp.ndarray:
    return lrp.activation(jax.nn.relu, x, rules)


def tanh(x: jnp.ndarray, rules: Rules = None) -> jnp.ndarray:
    return lrp.activation(jnp.tanh, x, rules)


def sigmoid(x: jnp.ndarray, rules: Rules = None) -> jnp.ndarray:
    return lrp.activation(jax.nn.sigmoid, x, rules)
