"""Mixed precision (``Model.astype``, ``js.load(..., dtype=)``, ``js.init(..., dtype=)``): params
stay float32, the layers compute in bfloat16 / float16, outputs and relevance come back in
float32; outputs agree with float32 within the rounding bound below and every method's
relevance correlates >= 0.99 with its float32 relevance (the issue's target), on Whisper
(encoder and decoder), ECAPA and CLAP (audio and text towers)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_attribution_clap import corr, rel

import jaxspeech as js
from jaxspeech.assets import whisper_folder

# bfloat16 keeps 8 significant bits: unit roundoff u = 2^-8 (float16: 11 bits, 2^-11). Each
# linear map rounds its input and its weights to the compute dtype and its output back to
# it (XLA accumulates the products in float32), so to first order each map adds <= 3u to
# the relative error of what flows, and errors of N maps in sequence add: <= 3·N·u. N counts
# the maps on the longest path of each test model (listed at each model). The 0 < checks
# make sure the model really ran in the low dtype.
U = {"bfloat16": 2.0 ** -8, "float16": 2.0 ** -11}


@pytest.fixture(scope="module")
def whisper():
    """2 + 2 layers of width 64 over a 2 s window, with tiny.en's vocabulary and tokenizer."""
    real = js.load(whisper_folder("tiny.en"))
    m = js.init("whisper-tiny.en", d_model=64, encoder_layers=2, decoder_layers=2,
                encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=128,
                decoder_ffn_dim=128, max_source_positions=100)
    m.extras.update(generation=real.extras["generation"], tokenizer_json=real.extras["tokenizer_json"])
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 80, 200)).astype(np.float32)
    tokens = rng.integers(0, 1000, (2, 5)).astype(np.int32)
    return m, x, tokens


# Whisper, 2 + 2 layers: conv1, conv2, then per encoder layer q/k (scores), v·p, out, fc1,
# fc2 (5), per decoder layer self (5 as the encoder's), cross (q, k, v·p, out: 4), fc1, fc2,
# and the tied projection: 2 + 2·5 + 2·(5 + 4 + 2) + 1 = 35 maps.
WHISPER_MAPS = 35


def test_whisper_computes_in_dtype_and_stays_within_the_rounding_bound(whisper):
    m, x, tokens = whisper
    low = m.astype("bfloat16")
    assert low.params is m.params and low.dtype == "bfloat16" and m.dtype == "float32"
    logits, (logits_low, inter) = m.apply(m.params, x, tokens=tokens), \
        low.forward(low.params, x, tokens=tokens)
    assert logits_low.dtype == jnp.float32  # outputs come back in float32
    for site in ("layers.0.hidden_state", "layers.1.self_attn.attention",
                 "decoder.layers.1.hidden_state"):
        assert inter[site].dtype == jnp.bfloat16, site  # the layers really run in bfloat16
    assert 0 < rel(logits_low, logits) <= 3 * WHISPER_MAPS * U["bfloat16"]
    half = m.astype("float16")
    assert 0 < rel(half.apply(half.params, x, tokens=tokens), logits) \
        <= 3 * WHISPER_MAPS * U["float16"]


@pytest.mark.parametrize("method", ["attnlrp", "integrated_gradients"])
def test_whisper_relevance_in_bfloat16_correlates_with_float32(whisper, method):
    m, x, _ = whisper
    low = m.astype("bfloat16")
    target = js.targets.output_norm()
    kw = {"steps": 4} if method == "integrated_gradients" else {}
    ref = js.attribute(m, features=x, target=target, method=method, **kw)
    res = js.attribute(low, features=x, target=target, method=method, **kw)
    assert res.relevance.dtype == jnp.float32
    assert corr(res.relevance, ref.relevance) >= 0.99
    # conservation: the relevance's total follows the float32 one as the scores do
    total, ref_total = (np.asarray(r.relevance).sum(axis=(1, 2)) for r in (res, ref))
    assert rel(total, ref_total) <= 3 * WHISPER_MAPS * U["bfloat16"]


def test_transcript_relevance_in_bfloat16_correlates_with_float32(whisper):
    m, x, tokens = whisper
    ref = js.attribute_transcript(m, features=x[:1], tokens=tokens[:1, 1:], method="attnlrp")
    res = js.attribute_transcript(m.astype("bfloat16"), features=x[:1], tokens=tokens[:1, 1:],
                                  method="attnlrp")
    assert corr(res.relevance, ref.relevance) >= 0.99
    assert corr(res.prefix_relevance, ref.prefix_relevance) >= 0.99


def test_ecapa_computes_and_explains_in_bfloat16():
    from test_corpus import TINY_ECAPA

    m = js.init("ecapa-voxceleb", **TINY_ECAPA)
    wave = 0.1 * np.random.default_rng(1).standard_normal((2, 16000)).astype(np.float32)
    features, kwargs = m.prepare(wave)
    low = m.astype("bfloat16")
    y, y_low = m.apply(m.params, features, **kwargs), low.apply(low.params, features, **kwargs)
    assert y_low.dtype == jnp.float32
    # 3 blocks: the TDNN, Res2Net's 2 convs and SE's 2, the pooling's 2, fc: 8 maps
    assert 0 < rel(y_low, y) <= 3 * 8 * U["bfloat16"]
    target = js.targets.output_norm()
    ref = js.attribute(m, wave, target=target, method="epsilon")
    res = js.attribute(low, wave, target=target, method="epsilon")
    assert corr(res.relevance, ref.relevance) >= 0.99


def test_clap_audio_and_text_towers_compute_in_bfloat16():
    from test_corpus import TINY_CLAP

    from jaxspeech.clap_text import init_text

    m = js.init("clap-htsat-unfused", **TINY_CLAP)
    m.text = init_text(js.models.clap_text.ClapTextConfig(
        vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=64, max_position_embeddings=20, projection_dim=16))
    low = m.astype("bfloat16")
    assert low.text.config.dtype == "bfloat16" and m.text.config.dtype == "float32"
    wave = 0.1 * np.random.default_rng(2).standard_normal((2, 96000)).astype(np.float32)
    features, kwargs = m.prepare(wave)
    y, y_low = m.apply(m.params, features, **kwargs), low.apply(low.params, features, **kwargs)
    assert y_low.dtype == jnp.float32
    # patch embed, 2 Swin blocks of q/k, v·p, out, fc1, fc2, the merge, 2 projections: 14 maps
    assert 0 < rel(y_low, y) <= 3 * 14 * U["bfloat16"]
    ids = np.array([[0, 5, 7, 9, 2], [0, 11, 2, 1, 1]], np.int32)
    mask = (ids != 1).astype(np.int32)
    e, e_low = m.text.apply(m.text.params, ids, mask), low.text.apply(low.text.params, ids, mask)
    # 2 layers of q/k, v·p, out, fc1, fc2, the pooler, 2 projections: 13 maps
    assert 0 < rel(e_low, e) <= 3 * 13 * U["bfloat16"]


def test_load_takes_a_dtype_and_a_saved_model_keeps_it(whisper, tmp_path):
    m, x, _ = whisper
    m.astype("bfloat16").save(tmp_path / "bf16")
    again = js.load(tmp_path / "bf16")
    assert again.dtype == "bfloat16"
    assert js.load(tmp_path / "bf16", dtype="float32").dtype == "float32"
    np.testing.assert_array_equal(
        np.asarray(again.apply(again.params, x)),
        np.asarray(m.astype("bfloat16").apply(m.params, x)))
    assert jax.tree.leaves(again.params)[0].dtype == jnp.float32  # params stay float32


def test_unknown_dtype_is_refused_with_the_choices(whisper):
    m, _, _ = whisper
    with pytest.raises(ValueError, match="bfloat16, float16"):
        m.astype("int8")
    with pytest.raises(ValueError, match="expected one of float32"):
        js.init("whisper-tiny", encoder_layers=1, dtype="float64")
