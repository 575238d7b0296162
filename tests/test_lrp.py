"""The fused rule ops equal the literal definitions they replace.

``lrp.attention_core`` (tiled attention with a hand-written, recomputing backward) against
``bilinear`` -> ``attention_weights`` -> ``bilinear`` differentiated by JAX; the two-map γ
and z+ backward of ``lrp.linear`` against zennit's four-map definition written out.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxspeech import lrp

RULES = [None, "attnlrp", "cp_lrp", "epsilon", lrp.RULE_SETS["attnlrp"].override("x", attention="cp")]


def _arrays(*shapes, seed=0):
    rng = np.random.default_rng(seed)
    return [jnp.asarray(rng.standard_normal(s).astype(np.float32)) for s in shapes]


def _literal_attention(q, k, v, rules):
    probs = lrp.attention_weights(lrp.bilinear("nqd,nkd->nqk", q, k, rules), rules)
    return lrp.bilinear("nqk,nkd->nqd", probs, v, rules)


@pytest.mark.parametrize("rules", RULES, ids=lambda r: getattr(r, "name", str(r)))
@pytest.mark.parametrize("block", [40, 200])
def test_attention_core_equals_the_literal_ops(rules, block):
    q, k, v, w = _arrays(*[(3, 200, 8)] * 4)
    rules = lrp.get_rules(rules)
    if rules is not None and rules.overrides:
        rules = rules.at("x")  # the override: uniform products with constant probabilities

    def grads(fn):
        return jax.grad(lambda *a: (fn(*a) * w).sum(), argnums=(0, 1, 2))(q, k, v)

    # The same float32 products summed in another order (tiles of `block` queries, a
    # recomputing backward): sums of T = 200 terms, typically within √T·2⁻²⁴ = 8e-7 of the
    # scale; 2e-6 of it. Measured 5e-8 (outputs) and 4e-7 (gradients). The floor 1: the
    # gradients that are exactly 0 (CP-LRP's q and k).
    fused = lrp.attention_core(q, k, v, rules, block)
    literal = _literal_attention(q, k, v, rules)
    np.testing.assert_allclose(fused, literal, atol=2e-6 * float(jnp.abs(literal).max()))
    for a, b in zip(grads(lambda *x: lrp.attention_core(*x, rules, block)),
                    grads(lambda *x: _literal_attention(*x, rules)), strict=True):
        np.testing.assert_allclose(a, b, atol=2e-6 * max(float(jnp.abs(b).max()), 1.0))
    if rules is not None and rules.attention == "cp":
        assert not np.any(grads(lambda *x: lrp.attention_core(*x, rules, block))[0])


def test_attention_core_refuses_a_block_that_does_not_divide_the_queries():
    q = jnp.zeros((1, 30, 4))
    with pytest.raises(ValueError, match="does not divide"):
        lrp.attention_core(q, q, q, None, 7)


def _dense(x, w, b):
    return x @ w + (0 if b is None else b[None, :])


def _zennit_gamma(x, w, b, g, gamma, eps):
    """Relevance at ``x`` by zennit's Gamma/ZPlus definition, four modified maps."""
    pos, neg = (lambda t: jnp.maximum(t, 0)), (lambda t: jnp.minimum(t, 0))
    xp, xn = pos(x), neg(x)
    z = _dense(x, w, b)
    r = z * g
    stab = lrp._stabilize  # noqa: SLF001 - the same stabiliser on both sides
    if gamma is None:
        zp = _dense(xp, pos(w), pos(b)) + _dense(xn, neg(w), None)
        s = r / stab(zp, eps)
        return xp * (s @ pos(w).T) + xn * (s @ neg(w).T)
    wp, wn = w + gamma * pos(w), w + gamma * neg(w)
    up = _dense(xp, wp, b + gamma * pos(b)) + _dense(xn, wn, None)
    dn = _dense(xp, wn, b + gamma * neg(b)) + _dense(xn, wp, None)
    s_up = jnp.where(z > 0, r / stab(up, eps), 0)
    s_dn = jnp.where(z < 0, r / stab(dn, eps), 0)
    return xp * (s_up @ wp.T + s_dn @ wn.T) + xn * (s_up @ wn.T + s_dn @ wp.T)


@pytest.mark.parametrize("rule", ["gamma", "zplus"])
def test_two_map_gamma_backward_equals_the_four_map_definition(rule):
    x, w, b, g = _arrays((16, 24), (24, 12), (12,), (16, 12), seed=1)
    x = x.at[:, :3].set(0.0)  # zero inputs receive no relevance
    rules = lrp.RULE_SETS[rule].with_params(gamma=0.5, epsilon=1e-6)
    _, vjp = jax.vjp(lambda x_: lrp.linear(_dense, x_, w, b, rules), x)
    ours = x * vjp(g)[0]
    theirs = _zennit_gamma(x, w, b, g, 0.5 if rule == "gamma" else None, 1e-6)
    # the same rule in other float32 arithmetic (Gamma: z ± v cancel where the
    # four maps add positive parts): DESIGN's 1e-4; measured 1.3e-7 of the scale
    np.testing.assert_allclose(ours, theirs, rtol=1e-4, atol=1e-5 * float(jnp.abs(theirs).max()))
    assert not np.any(ours[:, :3])


def test_zplus_drops_exactly_the_outputs_without_a_positive_contribution():
    """An output whose contributions xᵢWᵢⱼ are all ≤ 0 has z⁺ = 0: its relevance has nowhere
    to go and is dropped; every other output's is conserved, even with ε -> 0. (A z⁺
    computed as (z + |W||x|)/2 cancels to float32 noise there, and R/(noise + ε) leaked to
    the inputs: ECAPA lost 1–8 % of its relevance, depending on the CPU.)"""
    x, w, g = _arrays((16, 24), (24, 12), (16, 12), seed=2)
    x = jnp.abs(x).at[:, :3].set(0.0)  # ≥ 0 with zeros, as after a ReLU
    w = w.at[:, 0].set(-jnp.abs(w[:, 0]))  # output 0: every weight ≤ 0
    w = w.at[3:, 1].set(-jnp.abs(w[3:, 1]))  # output 1: positive weights only on zero inputs
    assert np.all(w[:3, 1] != 0)
    rules = lrp.RULE_SETS["zplus"].with_params(epsilon=1e-9)

    def relevance(x_, w_):
        _, vjp = jax.vjp(lambda t: lrp.linear(_dense, t, w_, None, rules), x_)
        return np.asarray(x_ * vjp(g)[0], np.float64)

    for x_, w_ in ((x, w), (-x, -w)):  # and x⁻W⁻ for inputs ≤ 0: both signs flipped
        r_in = relevance(x_, w_)
        r_out = np.asarray(_dense(x_, w_, None) * g, np.float64)
        # what is dropped is far above the bound below: the test sees the drop
        assert np.all(np.abs(r_out[:, :2].sum(1)) > 1e-3 * np.abs(r_out).sum(1))
        # A float32 sum of n terms is within (n - 1)·2⁻²⁴ of the sum of their |values|
        # whatever the order (Higham's bound). z⁺ (24 terms ≥ 0), the transposed map (12)
        # and ΣR_in (24) stack to ≤ 60·2⁻²⁴ = 3.6e-6 of Σ|R_out|; ε = 1e-9 keeps another
        # ε/z⁺ < 1e-8 of it (z⁺ > 0.1 on the kept outputs): 1e-5 covers both.
        err = np.abs(r_in.sum(1) - r_out[:, 2:].sum(1)) / np.abs(r_out).sum(1)
        assert np.all(err < 1e-5), err
