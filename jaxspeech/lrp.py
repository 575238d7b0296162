"""Rule-aware ops: the only place where relevance-propagation rules live.

Every attribution method is a backward pass over the *same* forward. The models
call the ops below for every operation that LRP treats specially; with
``rules=None`` (or a rule set whose fields are all ``"gradient"``) each op is the
plain JAX op, and with a :class:`RuleSet` its backward pass is replaced by a
``jax.custom_vjp`` or ``stop_gradient``. Relevance is then ``input * grad``.
No rule ever changes a forward value: every forward below is computed by the
same expression with and without rules, so outputs are bitwise equal.

The flowing cotangent ``g`` at a tensor ``z`` is relevance divided by ``z``
(``R_z = z * g``), the convention of LXT's efficient implementation.

| op | rule name | backward |
|---|---|---|
| :func:`linear` (dense, conv) | ``epsilon`` | ``g_in = Wᵀ (g · z / (z + ε·sign z))`` |
| | ``gamma`` / ``zplus`` | zennit's Gamma / ZPlus (positive and negative parts) |
| :func:`activation` | ``identity`` | ``g_in = g · f(x) / x``, ``f'(0)`` at 0 (LXT's identity rule) |
| :func:`norm_std` | ``identity`` | std treated as a constant (``stop_gradient``) |
| :func:`bilinear` | ``uniform`` | each operand's gradient halved (LXT ``divide_gradient``) |
| :func:`attention_weights` | ``cp`` | probabilities treated as constants (CP-LRP) |
| :func:`gate` | ``constant`` | the gate is a constant scale |
| :func:`softmax` | — | its ordinary gradient is the AttnLRP softmax rule |
| :func:`attention_core` | both above | softmax(q kᵀ) v fused: q, k get ¼ (uniform) or 0 (cp), v ½ |
| :func:`fused_attention` | both above | the same shares on a fused kernel's VJP (XLA, cuDNN, splash) |
"""

from __future__ import annotations

import dataclasses
import functools
import os
import re
from collections.abc import Callable

import jax
import jax.numpy as jnp

__all__ = [
    "RuleSet", "RULE_SETS", "get_rules", "linear", "activation", "norm_std", "bilinear",
    "softmax", "attention_weights", "attention_core", "fused_attention",
    "attention_implementation", "ATTENTION_IMPLEMENTATIONS", "gate", "divide_gradient", "identity_rule",
]

_CHOICES = {
    "linear": ("gradient", "epsilon", "gamma", "zplus"),
    "activation": ("gradient", "identity"),
    "norm": ("gradient", "identity"),
    "bilinear": ("gradient", "uniform"),
    "attention": ("gradient", "cp"),
    "gate": ("gradient", "constant"),
}


@dataclasses.dataclass(frozen=True)
class RuleSet:
    """How each kind of op propagates relevance. Frozen and hashable: a static jit argument.

    ``overrides`` maps regular expressions over layer paths (``"layers.0.fc1"``,
    searched with ``re.search``) to rule sets; the first match wins, so
    ``RULE_SETS["attnlrp"].override(r"conv", linear="gamma")`` puts γ on the
    convolutions only.
    """

    name: str = "gradient"
    linear: str = "gradient"
    activation: str = "gradient"
    norm: str = "gradient"
    bilinear: str = "gradient"
    attention: str = "gradient"
    gate: str = "gradient"
    epsilon: float = 1e-6
    gamma: float = 0.25
    overrides: tuple[tuple[str, RuleSet], ...] = ()

    def __post_init__(self):
        for field, allowed in _CHOICES.items():
            if getattr(self, field) not in allowed:
                raise ValueError(f"rule {field}={getattr(self, field)!r} is not one of {allowed}")

    def at(self, path: str) -> RuleSet:
        """The rule set in force for the layer at ``path``."""
        for pattern, rules in self.overrides:
            if re.search(pattern, path):
                return rules
        return self

    def override(self, pattern: str, **changes) -> RuleSet:
        """A copy whose layers matching ``pattern`` use this rule set with ``changes``."""
        base = dataclasses.replace(self, overrides=())
        new = dataclasses.replace(base, name=f"{self.name}+{pattern}", **changes)
        return dataclasses.replace(self, overrides=self.overrides + ((pattern, new),))

    def with_params(self, *, epsilon: float | None = None, gamma: float | None = None) -> RuleSet:
        """Same rules with another ε / γ (overrides included)."""
        changes = {k: v for k, v in (("epsilon", epsilon), ("gamma", gamma)) if v is not None}
        return dataclasses.replace(
            self, **changes,
            overrides=tuple((p, r.with_params(epsilon=epsilon, gamma=gamma))
                            for p, r in self.overrides))

    @property
    def is_gradient(self) -> bool:
        return all(getattr(self, f) == "gradient" for f in _CHOICES) and not self.overrides


_ATTN = dict(activation="identity", norm="identity", bilinear="uniform", gate="constant")

RULE_SETS: dict[str, RuleSet] = {
    # Achtibat et al. 2024 as LXT's efficient implementation runs it: identity on
    # activations and norms, uniform split of bilinear products (q and k get 1/4, v 1/2),
    # and linear layers by their plain gradient (x·grad then gives the z-rule).
    "attnlrp": RuleSet("attnlrp", **_ATTN),
    # Ali et al. 2022: attention probabilities are constants; relevance flows through v.
    "cp_lrp": RuleSet("cp_lrp", activation="identity", norm="identity", attention="cp",
                      gate="constant"),
    "epsilon": RuleSet("epsilon", linear="epsilon", **_ATTN),
    "gamma": RuleSet("gamma", linear="gamma", **_ATTN),
    "zplus": RuleSet("zplus", linear="zplus", **_ATTN),
}


def get_rules(rules: str | RuleSet | None) -> RuleSet | None:
    """Name or rule set -> rule set (``None`` stays ``None``: plain gradients)."""
    if rules is None or isinstance(rules, RuleSet):
        return rules
    if rules not in RULE_SETS:
        raise ValueError(f"unknown rule set {rules!r}; known: {sorted(RULE_SETS)}")
    return RULE_SETS[rules]


def _field(rules: RuleSet | None, name: str) -> str:
    return "gradient" if rules is None else getattr(rules, name)


def _stabilize(x: jnp.ndarray, eps: float) -> jnp.ndarray:
    """x + ε·sign(x), with sign(0) = +1 (LXT and zennit's stabiliser)."""
    return x + eps * jnp.where(x >= 0, 1.0, -1.0).astype(x.dtype)


# --- gradient modifiers ---------------------------------------------------------------

@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def divide_gradient(x: jnp.ndarray, factor: float) -> jnp.ndarray:
    """Identity forward; gradient divided by ``factor`` (LXT ``divide_gradient``)."""
    return x


def _divide_fwd(x, factor):
    return x, None


def _divide_bwd(factor, _, g):
    return (g / factor,)


divide_gradient.defvjp(_divide_fwd, _divide_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 2))
def identity_rule(fn: Callable, x: jnp.ndarray, eps: float = 0.0) -> jnp.ndarray:
    """``fn(x)`` forward; backward ``g · fn(x) / (x + ε)``, and ``g · f'(0)`` where the
    denominator is 0 (0 where ``f'(0)`` is not finite, as for ``sqrt``).

    ``ε = 0`` is the exact ratio of ATTRIBUTION_NOTES. LXT's ``identity_rule_implicit``
    adds 1e-10, which changes nothing for inputs of order one (GELU in a transformer)
    but biases the ratio where |x| is not far above 1e-10 — e.g. the std pooling of
    ECAPA, whose per-channel variances reach 1e-9 (zennit's exact ``Pass`` rule differed
    from LXT's ratio by 6 % there).
    """
    return fn(x)


def _identity_fwd(fn, x, eps):
    y = fn(x)
    den = x + eps if eps else x
    slope = jax.grad(fn)(jnp.zeros((), x.dtype))
    slope = jnp.where(jnp.isfinite(slope), slope, 0.0).astype(y.dtype)
    return y, jnp.where(den == 0, slope, y / jnp.where(den == 0, 1.0, den))


def _identity_bwd(fn, eps, ratio, g):
    return (g * ratio,)


identity_rule.defvjp(_identity_fwd, _identity_bwd)


# --- the ops the models call ----------------------------------------------------------

def activation(fn: Callable[[jnp.ndarray], jnp.ndarray], x: jnp.ndarray,
               rules: RuleSet | None = None) -> jnp.ndarray:
    """An element-wise non-linearity (GELU, ReLU, tanh, ...)."""
    if _field(rules, "activation") == "identity":
        return identity_rule(fn, x)
    return fn(x)


def norm_std(std: jnp.ndarray, rules: RuleSet | None = None) -> jnp.ndarray:
    """A normalising scale (LayerNorm's σ, a pooling std) as the norm rule sees it."""
    return jax.lax.stop_gradient(std) if _field(rules, "norm") == "identity" else std


def sqrt(x: jnp.ndarray, rules: RuleSet | None = None) -> jnp.ndarray:
    """``sqrt`` inside a statistic (std pooling): identity rule under LRP."""
    return activation(jnp.sqrt, x, rules)


def bilinear(equation: str, a: jnp.ndarray, b: jnp.ndarray,
             rules: RuleSet | None = None) -> jnp.ndarray:
    """A product of two activations (q·kᵀ, attention·v) as an einsum."""
    if _field(rules, "bilinear") == "uniform":
        a, b = divide_gradient(a, 2.0), divide_gradient(b, 2.0)
    return jnp.einsum(equation, a, b, precision="highest")


def softmax(x: jnp.ndarray, axis: int = -1, where: jnp.ndarray | None = None) -> jnp.ndarray:
    """Softmax; entries where ``where`` is False get probability 0 (and no relevance).
    Computed in float32 whatever ``x``'s dtype (a bfloat16 running sum of 1500 exponentials
    drops each term below half an ulp of the sum, 2⁻⁹ of it), returned in ``x``'s dtype."""
    if where is not None:
        x = jnp.where(where, x, -jnp.inf)
    return jax.nn.softmax(x.astype(jnp.float32), axis=axis).astype(x.dtype)


def attention_weights(scores: jnp.ndarray, rules: RuleSet | None = None,
                      where: jnp.ndarray | None = None, axis: int = -1) -> jnp.ndarray:
    """Softmax over ``axis`` (the last by default) of attention scores; CP-LRP makes it
    a constant."""
    probs = softmax(scores, axis=axis, where=where)
    if _field(rules, "attention") == "cp":
        probs = jax.lax.stop_gradient(probs)
    return probs


def attention_core(q: jnp.ndarray, k: jnp.ndarray, v: jnp.ndarray, rules: RuleSet | None = None,
                   block: int = 300) -> jnp.ndarray:
    """``softmax(q kᵀ) v`` per head: ``q, k, v [N, T, D]`` (N = batch x heads, ``q`` already
    scaled) -> ``[N, T, D]``, under the bilinear and attention rules, in ``block``-query tiles.

    The same values and gradients as ``bilinear`` -> ``attention_weights`` -> ``bilinear``,
    with a hand-written backward: it recomputes each ``[block, T]`` probability tile
    instead of keeping ``[N, T, T]`` for the backward (memory O(N·T·D), as flash attention),
    and runs the four products of the backward per tile. On CPU this took ~25 % less time
    than differentiating the tiled forward (whisper-base, 8 x 30 s, one layer). The rules
    enter as constant shares of the plain gradient: the uniform product rule halves each
    operand's share in both products (q, k: 1/4, v: 1/2, as LXT); CP-LRP's constant
    probabilities send nothing to q and k.
    """
    if q.shape[1] % block:
        raise ValueError(f"block {block} does not divide the {q.shape[1]} queries")
    return _attention_core(block, _attention_shares(rules), q, k, v)


def _attention_shares(rules: RuleSet | None) -> tuple[float, float]:
    """``(q and k share, v share)`` of the plain attention gradient under ``rules``: the
    uniform product rule halves each operand's share in both products (q, k: 1/4, v: 1/2);
    CP-LRP's constant probabilities send nothing to q and k."""
    share = 0.5 if _field(rules, "bilinear") == "uniform" else 1.0
    qk_share = 0.0 if _field(rules, "attention") == "cp" else share * share
    return qk_share, share


def _tile_probs(qi, kh):
    return softmax(jnp.einsum("qd,kd->qk", qi, kh, precision="highest"))


def _tiles(x, block):
    return x.reshape(x.shape[0] // block, block, x.shape[-1])


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _attention_core(block, shares, q, k, v):
    def one_head(args):
        qh, kh, vh = args
        out = jax.lax.map(lambda qi: jnp.einsum("qk,kd->qd", _tile_probs(qi, kh), vh,
                                                precision="highest"), _tiles(qh, block))
        return out.reshape(qh.shape)

    return jax.lax.map(one_head, (q, k, v))


def _attention_core_fwd(block, shares, q, k, v):
    out = _attention_core(block, shares, q, k, v)
    return out, (q, k, v, out)


def _attention_core_bwd(block, shares, res, g):
    qk_share, v_share = shares
    hi = "highest"

    def one_head(args):
        qh, kh, vh, oh, gh = args

        def tile(carry, x):
            dk, dv = carry
            qi, oi, gi = x
            p = _tile_probs(qi, kh)
            dv = dv + jnp.einsum("qk,qd->kd", p, gi, precision=hi)
            # softmax backward: p ⊙ (dp − Σ p·dp), with Σ p·dp = Σ g·o per query
            dp = jnp.einsum("qd,kd->qk", gi, vh, precision=hi)
            ds = p * (dp - (gi * oi).sum(-1, keepdims=True))
            return (dk + jnp.einsum("qk,qd->kd", ds, qi, precision=hi), dv), \
                jnp.einsum("qk,kd->qd", ds, kh, precision=hi)

        zeros = jnp.zeros_like(kh)
        (dk, dv), dq = jax.lax.scan(tile, (zeros, zeros),
                                    (_tiles(qh, block), _tiles(oh, block), _tiles(gh, block)))
        return dq.reshape(qh.shape), dk, dv

    q, k, v, out = res
    if qk_share == 0.0:  # constant probabilities: only v receives anything
        def v_only(args):
            qh, kh, gh = args
            dv = jax.lax.map(lambda x: jnp.einsum("qk,qd->kd", _tile_probs(x[0], kh), x[1],
                                                  precision=hi),
                             (_tiles(qh, block), _tiles(gh, block))).sum(0)
            return dv

        dv = jax.lax.map(v_only, (q, k, g))
        return jnp.zeros_like(q), jnp.zeros_like(k), v_share * dv
    dq, dk, dv = jax.lax.map(one_head, (q, k, v, out, g))
    return qk_share * dq, qk_share * dk, v_share * dv


_attention_core.defvjp(_attention_core_fwd, _attention_core_bwd)


ATTENTION_IMPLEMENTATIONS = ("tiled", "xla", "cudnn", "splash")
ATTENTION_ENV = "JAXSPEECH_ATTENTION"


def attention_implementation(dtype=jnp.float32, head_dim: int = 64) -> str:
    """Which attention kernel the models run: ``"tiled"`` (:func:`attention_core`),
    ``"xla"``, ``"cudnn"`` or ``"splash"`` (:func:`fused_attention`).

    The environment variable ``JAXSPEECH_ATTENTION`` overrides the choice (benchmarks,
    tests). Otherwise by platform: on CPU the tiled kernel (single thread, whisper-tiny's
    shape B 4, H 6, T 1500, D 64, forward + AttnLRP backward, measured in
    ``benchmarks/attention.py``: XLA's fused attention is slower there); on GPU cuDNN's
    flash attention where it applies (float16 / bfloat16, head dim <= 256), XLA's
    otherwise; XLA's elsewhere (TPU). ``"splash"`` (Pallas' TPU flash attention,
    :mod:`jaxspeech.splash`) is chosen only through the variable until a TPU has measured
    it against XLA's (``benchmarks/accelerator.py --attention splash``); it runs the
    unmasked self-attention (Whisper's encoder), and XLA's runs the masked and biased ones.
    """
    chosen = os.environ.get(ATTENTION_ENV, "").strip().lower()
    if chosen:
        if chosen not in ATTENTION_IMPLEMENTATIONS:
            raise ValueError(f"{ATTENTION_ENV}={chosen!r}: expected one of "
                             f"{ATTENTION_IMPLEMENTATIONS} (or unset, to choose by platform)")
        return chosen
    platform = jax.default_backend()
    if platform == "cpu":
        return "tiled"
    if platform == "gpu" and jnp.dtype(dtype) in (jnp.float16, jnp.bfloat16) and head_dim <= 256:
        return "cudnn"
    return "xla"


def fused_attention(q: jnp.ndarray, k: jnp.ndarray, v: jnp.ndarray, rules: RuleSet | None = None,
                    mask: jnp.ndarray | None = None, bias: jnp.ndarray | None = None,
                    implementation: str | None = None) -> jnp.ndarray:
    """``softmax(q kᵀ + bias) v`` per head through ``jax.nn.dot_product_attention``: ``q [B,
    Tq, H, D]`` (already scaled), ``k, v [B, Tk, H, D]``, ``mask`` (bool, True: attended)
    and ``bias`` (added to the scores: CLAP's relative positions and shifted-window mask)
    broadcastable to ``[B, H, Tq, Tk]`` -> ``[B, Tq, H, D]``, under the bilinear and
    attention rules.

    The rules are constant shares of the plain attention gradient (:func:`attention_core`),
    so the backward is the platform's own VJP of the same fused call with the cotangents of
    q, k and v scaled (as LXT's efficient implementation does on PyTorch's kernels); the
    forward is that call whatever the rules, so it is bitwise the plain forward. The bias
    sits beside ``q kᵀ`` in the sum the softmax takes, so it receives the scores' share
    (1/2 under the uniform rule, as ``bilinear`` -> ``+ bias`` -> ``attention_weights``
    gives it; 0 under CP-LRP).
    ``implementation``: ``"xla"``, ``"cudnn"`` or ``"splash"`` (self-attention without mask
    or bias; other calls run ``"xla"``), None for :func:`attention_implementation`'s choice
    (the tiled kernel maps to ``"xla"`` here).
    """
    if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
        raise ValueError(f"fused_attention takes q, k, v as [B, T, heads, head_dim]; got "
                         f"{q.shape}, {k.shape}, {v.shape}")
    if implementation is None:
        implementation = attention_implementation(q.dtype, q.shape[-1])
        implementation = "xla" if implementation == "tiled" else implementation
    if implementation not in FUSED_IMPLEMENTATIONS:
        raise ValueError(f"implementation {implementation!r}: fused_attention runs one of "
                         f"{FUSED_IMPLEMENTATIONS} (the tiled kernel is attention_core)")
    if implementation == "splash" and (mask is not None or bias is not None
                                       or not q.shape == k.shape == v.shape):
        implementation = "xla"
    if mask is not None:
        mask = jnp.asarray(mask, bool)
    if bias is not None:
        bias = jnp.asarray(bias, q.dtype)
    return _fused_attention(implementation, _attention_shares(rules), q, k, v, mask, bias)


FUSED_IMPLEMENTATIONS = ("xla", "cudnn", "splash")


def _platform_attention(implementation, q, k, v, mask, bias=None):
    if implementation == "splash":
        from jaxspeech.splash import splash_attention

        return splash_attention(q, k, v)
    return jax.nn.dot_product_attention(q, k, v, bias=bias, mask=mask, scale=1.0,
                                        implementation=implementation)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _fused_attention(implementation, shares, q, k, v, mask, bias):
    return _platform_attention(implementation, q, k, v, mask, bias)


def _of_qkv_bias(implementation, mask):
    """The platform's attention as a function of ``(q, k, v, bias)`` (bias None: none)."""
    return lambda q, k, v, bias: _platform_attention(implementation, q, k, v, mask, bias)


def _fused_attention_fwd(implementation, shares, q, k, v, mask, bias):
    if implementation in ("cudnn", "splash"):
        # Flash kernels' residuals are O(T·D) (output and softmax statistics): keep them.
        out, vjp = jax.vjp(_of_qkv_bias(implementation, mask), q, k, v, bias)
        return out, (vjp, None)
    # XLA's would be the [B, H, Tq, Tk] probabilities: recompute them in the backward
    # instead, as the tiled kernel does, so that memory stays O(T·D) per layer.
    return _platform_attention(implementation, q, k, v, mask, bias), (None, (q, k, v, mask, bias))


def _fused_attention_bwd(implementation, shares, res, g):
    """Cotangents of ``(q, k, v, mask, bias)``: the platform's, times the rules' shares (q, k:
    ``qk_share``; v and the bias beside the scores: ``v_share``, 0 under CP-LRP)."""
    qk_share, v_share = shares
    vjp, inputs = res
    if vjp is None:
        q, k, v, mask, bias = inputs
        attend = _of_qkv_bias(implementation, mask)
        if qk_share == 0.0:  # constant probabilities: only v receives anything
            _, vjp_v = jax.vjp(lambda v_: attend(q, k, v_, bias), v)
            (dv,) = vjp_v(g)
            return (jnp.zeros_like(q), jnp.zeros_like(k), v_share * dv, None,
                    None if bias is None else jnp.zeros_like(bias))
        _, vjp = jax.vjp(attend, q, k, v, bias)
    dq, dk, dv, dbias = vjp(g)
    bias_share = v_share if qk_share else 0.0
    return (qk_share * dq, qk_share * dk, v_share * dv, None,
            None if dbias is None else bias_share * dbias)


_fused_attention.defvjp(_fused_attention_fwd, _fused_attention_bwd)


def gate(x: jnp.ndarray, g: jnp.ndarray, rules: RuleSet | None = None) -> jnp.ndarray:
    """``x * g`` for a gate ``g`` (squeeze-excitation, GLU); the gate is a constant under LRP."""
    if _field(rules, "gate") == "constant":
        g = jax.lax.stop_gradient(g)
    return x * g


# --- linear layers --------------------------------------------------------------------

LinearFn = Callable[[jnp.ndarray, jnp.ndarray, jnp.ndarray | None], jnp.ndarray]


def linear(fn: LinearFn, x: jnp.ndarray, w: jnp.ndarray, b: jnp.ndarray | None = None,
           rules: RuleSet | None = None) -> jnp.ndarray:
    """An affine map ``fn(x, w, b)`` (dense or convolution) under the linear rule.

    Rules define the relevance of the *input*; the cotangents of ``w`` and ``b``
    under ε/γ/z+ are zero (attribution never trains).
    """
    # mixed precision: params are stored in float32 and the map runs in the activation's
    # dtype (bfloat16 / float16 when the model computes in it; a no-op in float32)
    w = w.astype(x.dtype)
    b = None if b is None else b.astype(x.dtype)
    kind = _field(rules, "linear")
    if kind == "gradient":
        return fn(x, w, b)
    if kind == "epsilon":
        return _epsilon_linear(fn, rules.epsilon, x, w, b)
    gamma = rules.gamma if kind == "gamma" else None
    return _gamma_linear(fn, gamma, rules.epsilon, x, w, b)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _epsilon_linear(fn, eps, x, w, b):
    return fn(x, w, b)


def _epsilon_fwd(fn, eps, x, w, b):
    z = fn(x, w, b)
    return z, (x, w, b, z)


def _epsilon_bwd(fn, eps, res, g):
    x, w, b, z = res
    _, vjp = jax.vjp(lambda x_: fn(x_, w, b), x)
    (gx,) = vjp(g * z / _stabilize(z, eps))
    return gx, jnp.zeros_like(w), None if b is None else jnp.zeros_like(b)


_epsilon_linear.defvjp(_epsilon_fwd, _epsilon_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2))
def _gamma_linear(fn, gamma, eps, x, w, b):
    return fn(x, w, b)


def _gamma_fwd(fn, gamma, eps, x, w, b):
    z = fn(x, w, b)
    return z, (x, w, b, z)


def _gamma_bwd(fn, gamma, eps, res, g):
    """zennit's Gamma (``gamma``) or ZPlus (``gamma=None``).

    Gamma: outputs with z > 0 are explained by the contributions that push them up
    (x⁺ with W + γW⁺ and x⁻ with W + γW⁻), outputs with z < 0 by those that push
    them down. Written out literally that is four modified maps forward and four back.
    With W± = (W ± |W|)/2 and x± = (x ± |x|)/2 every one of them is a combination of
    two maps, ``W`` and ``|W|`` (on ``x`` and ``|x|``), so the backward costs one forward
    map (``|W||x|``; ``Wx`` is the saved z) and two transposed ones:

        up/down denominators  z_± = (1 + γ/2) z ± (γ/2) v,      v = |W||x| + |b|
        relevance             (1 + γ/2) x·Wᵀ(s₊ + s₋) + (γ/2) |x|·|W|ᵀ(s₊ − s₋)

    ZPlus keeps only the positive contributions x⁺W⁺ + x⁻W⁻ (:func:`_zplus_input`).
    """
    x, w, b, z = res
    zeros_b = None if b is None else jnp.zeros_like(b)
    if gamma is None:
        return _zplus_input(fn, eps, x, w, b, z * g), jnp.zeros_like(w), zeros_b
    ax, aw = jnp.abs(x), jnp.abs(w)
    v = fn(ax, aw, None if b is None else jnp.abs(b))
    back_w = jax.vjp(lambda x_: fn(x_, w, zeros_b), x)[1]
    back_aw = jax.vjp(lambda x_: fn(x_, aw, zeros_b), x)[1]
    r_out = z * g
    sign = jnp.sign(x)  # relevance / x: the cotangent; 0 where x = 0 (no relevance there)
    s_up = jnp.where(z > 0, r_out / _stabilize((1 + gamma / 2) * z + (gamma / 2) * v, eps), 0)
    s_dn = jnp.where(z < 0, r_out / _stabilize((1 + gamma / 2) * z - (gamma / 2) * v, eps), 0)
    gx = (1 + gamma / 2) * back_w(s_up + s_dn)[0] + (gamma / 2) * sign * back_aw(s_up - s_dn)[0]
    return jnp.where(x == 0, 0.0, gx), jnp.zeros_like(w), zeros_b


def _zplus_input(fn, eps, x, w, b, r_out):
    """ZPlus: the cotangent at ``x`` for output relevance ``r_out``, as zennit computes it:
    z⁺ = x⁺W⁺ + b⁺ + x⁻W⁻ forward and each part's transpose back, two maps each way.

    Not the two-map form of Gamma (z⁺ = (z + v)/2 and ½(x·Wᵀs + |x|·|W|ᵀs)): at an output
    with no positive contribution z⁺ is 0 in exact arithmetic, but z + v cancels to
    float32 noise, s = R/(z⁺ + ε) becomes ~R/ε, and x·Wᵀs + |x|·|W|ᵀs, which cancels
    exactly only in exact arithmetic, hands that noise times 1/ε to the inputs (on the
    ECAPA test model 0.4–1 % of the relevance on one CPU, up to 6 % on another). Here
    every term of z⁺ is ≥ 0, so z⁺ = 0 exactly where there is no positive contribution;
    such an output's relevance has nowhere to go and is dropped, by definition, and
    every other output's is conserved to float32 rounding.
    """
    xp, xn = jnp.maximum(x, 0), jnp.minimum(x, 0)
    zeros_b = None if b is None else jnp.zeros_like(b)
    zp, back_p = jax.vjp(lambda x_: fn(x_, jnp.maximum(w, 0), None if b is None
                                       else jnp.maximum(b, 0)), xp)
    zn, back_n = jax.vjp(lambda x_: fn(x_, jnp.minimum(w, 0), zeros_b), xn)
    total = zp + zn
    # 0 where z⁺ = 0: such an output sends 0·R/ε (and with ε = 0 it would be 0·inf = NaN)
    s = jnp.where(total == 0, 0.0, r_out / _stabilize(total, eps))
    return jnp.where(x > 0, back_p(s)[0], jnp.where(x < 0, back_n(s)[0], 0.0))


def _safe_div(rel, x):
    """Relevance -> cotangent (rel / x), 0 where x = 0 (then rel = 0 too)."""
    return jnp.where(x == 0, 0.0, rel / jnp.where(x == 0, 1.0, x))


_gamma_linear.defvjp(_gamma_fwd, _gamma_bwd)
