"""``lrp.fused_attention`` (``jax.nn.dot_product_attention`` with the rules as rescaled
cotangents) equals the tiled kernel and the literal ops, rule set by rule set; its forward
does not depend on the rules; ``JAXSPEECH_ATTENTION`` routes the Whisper encoder and decoder
through it with the same outputs and relevance."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxspeech as js
from jaxspeech import lrp
from jaxspeech.model import _module

RULES = [None, "attnlrp", "cp_lrp", "epsilon", lrp.RULE_SETS["attnlrp"].override("x", attention="cp")]


def _rules(rules):
    rules = lrp.get_rules(rules)
    return rules.at("x") if rules is not None and rules.overrides else rules


def _arrays(*shapes, seed=0):
    rng = np.random.default_rng(seed)
    return [jnp.asarray(rng.standard_normal(s).astype(np.float32)) for s in shapes]


def _grads(fn, w, *args):
    return jax.grad(lambda *a: (fn(*a) * w).sum(), argnums=(0, 1, 2))(*args)


def _tiled(q, k, v, rules, block=40):
    """``attention_core`` on ``[B, T, H, D]``."""
    b, t, h, d = q.shape

    def heads_first(x):
        return x.transpose(0, 2, 1, 3).reshape(b * h, t, d)

    out = lrp.attention_core(heads_first(q), heads_first(k), heads_first(v), rules, block)
    return out.reshape(b, h, t, d).transpose(0, 2, 1, 3)


def _literal_masked(q, k, v, rules, where):
    probs = lrp.attention_weights(lrp.bilinear("bqhd,bkhd->bhqk", q, k, rules), rules, where=where)
    return lrp.bilinear("bhqk,bkhd->bqhd", probs, v, rules)


# Both kernels sum the same float32 products in another order (XLA's whole-row softmax and
# its autodiff backward vs query tiles and a hand-written recomputing backward): sums of
# T = 200 terms, typically within √T·2⁻²⁴ = 8e-7 of the scale; 2e-6 of it, as the tiled
# kernel's own test. The floor 1: gradients that are exactly 0 (CP-LRP's q and k).
CORE_TOL = 2e-6


@pytest.mark.parametrize("rules", RULES, ids=lambda r: getattr(r, "name", str(r)))
def test_fused_attention_equals_the_tiled_kernel_under_every_rule_set(rules):
    q, k, v, w = _arrays(*[(2, 200, 3, 8)] * 4)
    rules = _rules(rules)
    fused = lrp.fused_attention(q, k, v, rules, implementation="xla")
    tiled = _tiled(q, k, v, rules)
    np.testing.assert_allclose(fused, tiled, atol=CORE_TOL * float(jnp.abs(tiled).max()))
    fused_g = _grads(lambda *x: lrp.fused_attention(*x, rules, implementation="xla"), w, q, k, v)
    for a, b in zip(fused_g, _grads(lambda *x: _tiled(*x, rules), w, q, k, v), strict=True):
        np.testing.assert_allclose(a, b, atol=CORE_TOL * max(float(jnp.abs(b).max()), 1.0))
    if rules is not None and rules.attention == "cp":
        assert not np.any(fused_g[0]) and not np.any(fused_g[1])


def test_fused_attention_forward_is_bitwise_the_plain_forward_under_every_rule_set():
    q, k, v = _arrays(*[(2, 64, 3, 8)] * 3)
    causal = jnp.tril(jnp.ones((64, 64), bool))[None, None]
    for rules in [None] + RULES[1:]:
        forward = jax.jit(functools.partial(lrp.fused_attention, rules=_rules(rules)))
        if rules is None:
            plain = [np.asarray(forward(q, k, v)), np.asarray(forward(q, k, v, mask=causal))]
        np.testing.assert_array_equal(forward(q, k, v), plain[0])
        np.testing.assert_array_equal(forward(q, k, v, mask=causal), plain[1])


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "cross"])
@pytest.mark.parametrize("rules", [None, "attnlrp", "cp_lrp"], ids=str)
def test_masked_fused_attention_equals_the_literal_masked_ops(rules, causal):
    """The decoder's case: causal self-attention (over a longer key buffer, as the KV cache
    has) and unmasked cross-attention, Lq != Lk."""
    rules = _rules(rules)
    q, w = _arrays((2, 24, 3, 8), (2, 24, 3, 8), seed=1)
    k, v = _arrays((2, 40, 3, 8), (2, 40, 3, 8), seed=2)
    where = (jnp.arange(40)[None, :] <= jnp.arange(24)[:, None])[None, None] if causal else None
    fused = functools.partial(lrp.fused_attention, rules=rules, mask=where, implementation="xla")
    literal = functools.partial(_literal_masked, rules=rules, where=where)
    want = literal(q, k, v)
    np.testing.assert_allclose(fused(q, k, v), want, atol=CORE_TOL * float(jnp.abs(want).max()))
    for a, b in zip(_grads(fused, w, q, k, v), _grads(literal, w, q, k, v), strict=True):
        np.testing.assert_allclose(a, b, atol=CORE_TOL * max(float(jnp.abs(b).max()), 1.0))


def test_attention_implementation_is_chosen_by_platform_and_overridden_by_the_environment(
        monkeypatch):
    monkeypatch.delenv(lrp.ATTENTION_ENV, raising=False)
    expected = {"cpu": "tiled", "gpu": "xla", "tpu": "xla"}.get(jax.default_backend(), "xla")
    assert lrp.attention_implementation(jnp.float32) == expected
    monkeypatch.setenv(lrp.ATTENTION_ENV, "XLA")
    assert lrp.attention_implementation() == "xla"
    monkeypatch.setenv(lrp.ATTENTION_ENV, "flash")
    with pytest.raises(ValueError, match="JAXSPEECH_ATTENTION='flash'"):
        lrp.attention_implementation()


def test_fused_attention_refuses_the_tiled_kernel_and_wrong_ranks():
    q = jnp.zeros((1, 8, 2, 4))
    with pytest.raises(ValueError, match="attention_core"):
        lrp.fused_attention(q, q, q, implementation="tiled")
    with pytest.raises(ValueError, match=r"\[B, T, heads, head_dim\]"):
        lrp.fused_attention(q[0], q[0], q[0])


def _whisper_relevance(model, features, tokens, rules):
    """Encoder output and decoder logits, and input x gradient of a fixed projection of the
    logits, traced afresh (the implementation is read when the function is traced)."""
    module = _module(model.config, rules, False)
    w = jnp.asarray(np.random.default_rng(3).standard_normal((1, tokens.shape[1], 200)),
                    jnp.float32)

    @jax.jit
    def run(params, x):
        def target(x_):
            return (module.apply({"params": params}, x_, tokens=tokens) * w).sum()

        encoded = module.apply({"params": params}, x)
        logits = module.apply({"params": params}, x, tokens=tokens)
        return encoded, logits, x * jax.grad(target)(x)

    return run(model.params, features)


@pytest.mark.slow
@pytest.mark.parametrize("implementation", ["xla", "splash"])
def test_whisper_through_the_fused_path_gives_the_tiled_outputs_and_relevance(monkeypatch,
                                                                               implementation):
    """whisper-tiny's real widths (384, 6 heads, 1500 frames), one layer each side (splash:
    the encoder's 1500 frames padded to 1536; the decoder's masked calls run XLA's)."""
    m = js.init("whisper-tiny", encoder_layers=1, decoder_layers=1, vocab_size=200)
    x = jnp.asarray(np.random.default_rng(0).standard_normal((1, 80, 3000)).astype(np.float32))
    t = np.random.default_rng(1).integers(0, 200, (1, 6)).astype(np.int32)
    plain = None
    for rules in (None, "attnlrp", "cp_lrp"):
        monkeypatch.setenv(lrp.ATTENTION_ENV, "tiled")
        ref = _whisper_relevance(m, x, t, rules)
        monkeypatch.setenv(lrp.ATTENTION_ENV, implementation)
        fused = _whisper_relevance(m, x, t, rules)
        # Outputs: DESIGN's port tolerance (1e-4 of the scale); the attention sums differ
        # only in order (~√T·2⁻²⁴ ≈ 2e-7 relative), far inside it. Relevance: DESIGN's 1e-3.
        for got, want, tol in zip(fused, ref, (1e-4, 1e-4, 1e-3), strict=True):
            got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
            assert np.abs(got - want).max() <= tol * np.abs(want).max(), rules
        if rules is None:
            plain = fused
        else:  # the rules leave the fused forward bitwise the plain one
            np.testing.assert_array_equal(fused[0], plain[0])
            np.testing.assert_array_equal(fused[1], plain[1])


@pytest.mark.parametrize("rules", [None, "attnlrp", "cp_lrp"], ids=str)
def test_biased_fused_attention_equals_the_literal_ops_in_every_operand(rules):
    """CLAP's case: an additive bias (relative positions + the shifted-window mask) per
    window, broadcast over the items; the bias receives the scores' share of the gradient."""
    rules = _rules(rules)
    q, k, v, w = _arrays(*[(6, 16, 2, 8)] * 4, seed=4)
    (bias,) = _arrays((3, 2, 16, 16), seed=5)
    bias = jnp.tile(bias, (2, 1, 1, 1))  # [items x windows, heads, n, n]

    def literal(q, k, v, bias):
        probs = lrp.attention_weights(lrp.bilinear("bqhd,bkhd->bhqk", q, k, rules) + bias, rules)
        return lrp.bilinear("bhqk,bkhd->bqhd", probs, v, rules)

    def fused(q, k, v, bias):
        return lrp.fused_attention(q, k, v, rules, bias=bias, implementation="xla")

    want = literal(q, k, v, bias)
    np.testing.assert_allclose(fused(q, k, v, bias), want, atol=CORE_TOL * float(jnp.abs(want).max()))
    grads = [jax.grad(lambda *a, f=f: (f(*a) * w).sum(), argnums=(0, 1, 2, 3))(q, k, v, bias)
             for f in (fused, literal)]
    for a, b in zip(*grads, strict=True):
        np.testing.assert_allclose(a, b, atol=CORE_TOL * max(float(jnp.abs(b).max()), 1.0))


def _clap_relevance(model, features, rules):
    """Audio embedding and its input x gradient along a fixed direction, traced afresh."""
    module = _module(model.config, rules, False)
    w = jnp.asarray(np.random.default_rng(6).standard_normal(model.config.projection_dim),
                    jnp.float32)

    @jax.jit
    def run(params, x):
        def target(x_):
            return (module.apply({"params": params}, x_) * w[None]).sum()

        return module.apply({"params": params}, x), x * jax.grad(target)(x)

    return run(model.params, features)


@pytest.mark.slow
def test_clap_windows_through_the_fused_path_give_the_literal_outputs_and_relevance(monkeypatch):
    """Two blocks per stage, so that the odd ones shift their windows (the -100 mask across
    the wrap rides in the bias); 64 and 16 windows of 64 tokens."""
    m = js.init("clap-htsat-unfused", depths=(2, 2), num_attention_heads=(2, 4),
                patch_embeds_hidden_size=32, hidden_size=64, projection_dim=16)
    wave = 0.1 * np.random.default_rng(7).standard_normal((2, 96000)).astype(np.float32)
    features, _ = m.prepare(wave)
    plain = None
    for rules in (None, "attnlrp", "cp_lrp"):
        monkeypatch.setenv(lrp.ATTENTION_ENV, "tiled")  # CLAP's literal window attention
        ref = _clap_relevance(m, features, rules)
        monkeypatch.setenv(lrp.ATTENTION_ENV, "xla")
        fused = _clap_relevance(m, features, rules)
        # As the Whisper case: outputs to DESIGN's 1e-4 (the two differ in summation order
        # only, sums of 64 terms), relevance to DESIGN's 1e-3.
        for got, want, tol in zip(fused, ref, (1e-4, 1e-3), strict=True):
            got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
            assert np.abs(got - want).max() <= tol * np.abs(want).max(), rules
        if rules is None:
            plain = fused
        else:
            np.testing.assert_array_equal(fused[0], plain[0])


@pytest.mark.slow
@pytest.mark.parametrize("rules", [None, "attnlrp", "cp_lrp"], ids=str)
def test_splash_kernel_equals_the_tiled_kernel_under_the_rules(rules):
    """Pallas' TPU kernel, interpreted off TPU: 200 tokens padded to 256 (their own segment),
    two blocks of 128 each way, so the padding and the block loop are both exercised."""
    rules = _rules(rules)
    q, k, v, w = _arrays(*[(2, 200, 2, 64)] * 4, seed=8)
    q = q / 8.0  # scaled by head_dim^-1/2, as the models pass it: scores of order 1
    splash = functools.partial(lrp.fused_attention, rules=rules, implementation="splash")
    tiled = _tiled(q, k, v, rules)
    # The tiled kernel's tolerance. Flash attention's running maximum adds a rounding of
    # exp(m_old - m_new) per block; its error in exp(s - m) grows with |s|·2⁻²⁴, so at
    # unscaled scores (|s| ~ 30 here) it would reach ~2e-6 relative by itself.
    np.testing.assert_allclose(splash(q, k, v), tiled, atol=CORE_TOL * float(jnp.abs(tiled).max()))
    for a, b in zip(_grads(splash, w, q, k, v), _grads(lambda *x: _tiled(*x, rules), w, q, k, v),
                    strict=True):
        np.testing.assert_allclose(a, b, atol=CORE_TOL * max(float(jnp.abs(b).max()), 1.0))


def test_splash_hands_masked_and_biased_calls_to_xla():
    """The decoder's masks change with the cache position and CLAP's bias is per window:
    those run XLA's kernel when splash is asked for, with the same result."""
    q, k, v = _arrays(*[(1, 16, 2, 8)] * 3, seed=9)
    causal = jnp.tril(jnp.ones((16, 16), bool))[None, None]
    (bias,) = _arrays((1, 2, 16, 16), seed=10)
    for extra in ({"mask": causal}, {"bias": bias}):
        np.testing.assert_array_equal(
            lrp.fused_attention(q, k, v, implementation="splash", **extra),
            lrp.fused_attention(q, k, v, implementation="xla", **extra))
