"""attribute_match: relevance of CLAP's audio-text similarity over both inputs, against LXT on
transformers' ClapModel, its conservation on a bias-free copy, words, pairs and the picture.

The ClapModel is test_clap_text's small one (HTSAT's geometry at a small width, a 2-layer
RoBERTa), saved by transformers and loaded with js.load. Two clips, three texts (B != N,
so the pair axes cannot be mixed up silently).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxspeech as js
from jaxspeech.attribution.lxt import lxt_clap_match_relevance
from jaxspeech.attribution.match_plot import match_figure
from jaxspeech.data.reference_checkpoints import write_clap
from jaxspeech.lrp import RULE_SETS

pytestmark = pytest.mark.xdist_group("clap_text")

AUDIO = dict(patch_embeds_hidden_size=16, depths=[2, 1, 1], num_attention_heads=[2, 2, 4],
             hidden_size=64, patch_size=8, patch_stride=[8, 8], window_size=8)
TEXTS = ["a dog barking", "rain on the roof, and the dog", "the roof  "]
CHUNK = {"attnlrp": 1, "cp_lrp": 2}  # both ways of running the backwards


def rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / np.abs(b).max())


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    path = tmp_path_factory.mktemp("match") / "clap"
    write_clap(path, AUDIO, text_tower=True, seed=11)
    return path


@pytest.fixture(scope="module")
def model(folder):
    return js.load(folder)


@pytest.fixture(scope="module")
def features():
    """Log-mel-like features [2, 1, 1001, 64] (the tower's batch norm expects dB)."""
    rng = np.random.default_rng(1)
    return (-40 + 12 * rng.standard_normal((2, 1, 1001, 64))).astype(np.float32)


@pytest.fixture(scope="module")
def results(model, features):
    cache = {}

    def get(method):
        if method not in cache:
            cache[method] = js.attribute_match(model, features=features, texts=TEXTS,
                                               method=method, chunk=CHUNK[method])
        return cache[method]

    return get


@pytest.mark.parametrize("method", ["attnlrp", "cp_lrp"])
def test_both_sides_match_lxt_on_transformers(folder, features, results, method):
    """Every pair (clip b, text n): the audio relevance [B, N, 1, 1001, 64] and the text
    relevance [B, N, L] against LXT's rules patched into transformers' ClapModel, one
    backward per text there (module lxt_clap_match_relevance)."""
    res = results(method)
    tokens = res.tokens
    ref_audio, ref_text, ref_score = lxt_clap_match_relevance(
        folder, features, tokens.input_ids, tokens.attention_mask, cp=method == "cp_lrp")
    assert res.score.shape == (2, 3) and res.audio_relevance.shape == (2, 3, 1, 1001, 64)
    assert res.text_relevance.shape == (2, 3, tokens.input_ids.shape[1])
    np.testing.assert_allclose(np.asarray(res.score), ref_score, atol=1e-5)  # cosines: rounding
    audio, text = rel(res.audio_relevance, ref_audio), rel(res.text_relevance, ref_text)
    print(f"{method} vs LXT: audio {audio:.2e}, text {text:.2e}")
    # DESIGN's 1e-3 for relevance; measured 1.3e-6 (audio) and 2.1e-6 (text)
    assert audio <= 1e-3 and text <= 1e-3


def test_the_rules_change_both_sides(results):
    """AttnLRP and CP-LRP differ on both sides (their q·k and product rules differ), so the
    agreement above tells them apart."""
    a, c = results("attnlrp"), results("cp_lrp")
    assert rel(a.audio_relevance, c.audio_relevance) > 0.1
    assert rel(a.text_relevance, c.text_relevance) > 0.1


def test_words_are_the_sums_of_their_tokens(results):
    res = results("attnlrp")
    text = np.asarray(res.text_relevance)
    mask = res.tokens.attention_mask
    # padding never reaches <s>: its keys get no attention, so exactly no relevance
    assert np.all(text[:, mask == 0] == 0) and (mask == 0).any()
    total = res.word_relevance.sum(-1) + res.special_relevance
    np.testing.assert_allclose(total, text.sum(-1), rtol=1e-5, atol=1e-7)
    words = res.words(1, 1)
    assert [w for w, _ in words] == ["rain", "on", "the", "roof,", "and", "the", "dog"]
    index = res.tokens.word_index[1]
    expect = [text[1, 1][index == k].sum() for k in range(len(words))]
    np.testing.assert_allclose([v for _, v in words], expect, rtol=1e-5, atol=1e-8)
    side = res.audio(2)  # every clip for text 2, as an Attribution
    np.testing.assert_array_equal(np.asarray(side.relevance),
                                  np.asarray(res.audio_relevance[:, 2]))
    assert side.frames().shape == (2, 1001)


def bias_free(params):
    """Biases, batch-norm shifts, relative position biases, position and token-type
    embeddings zeroed: everything that adds a constant."""
    zero = ("bias", "mean", "self.relative_position_bias_table")
    embeddings = ("text_model.embeddings.position_embeddings",
                  "text_model.embeddings.token_type_embeddings")

    def fix(path, v):
        keys = [p.key for p in path]
        return jnp.zeros_like(v) if keys[-1] in zero or keys[0] in embeddings else v

    return jax.tree_util.tree_map_with_path(fix, params)


def test_conservation_on_a_bias_free_model(model, features, results):
    """Bias-free, CP-LRP conserves in each tower, and the similarity â·t̂ is a product of the
    two: its plain gradient (CP-LRP's product rule) gives each side all of s (the other
    held constant), the uniform rule (AttnLRP's, put on the similarity here) half each, so
    that audio and text together hold s. Ratios to float32 precision; bound DESIGN's 1e-4."""
    audio_params, text_params = bias_free(model.params), bias_free(model.text.params)
    full = js.attribute_match(model, features=features, texts=TEXTS, method="cp_lrp",
                              params=audio_params, text_params=text_params, chunk=CHUNK["cp_lrp"])
    ratios = full.conservation()
    print("cp_lrp, plain product:", {k: v.round(7).tolist() for k, v in ratios.items()})
    assert np.all(np.abs(np.asarray(full.score)) > 1e-3)  # measured 0.01 - 0.1
    np.testing.assert_allclose(ratios["audio"], 1.0, atol=1e-4)
    np.testing.assert_allclose(ratios["text"], 1.0, atol=1e-4)
    split = RULE_SETS["cp_lrp"].override("^similarity$", bilinear="uniform")
    pairs = js.attribute_match(model, features=features, texts=TEXTS[:2], rules=split, pairs=True,
                               params=audio_params, text_params=text_params)
    ratios = pairs.conservation()
    print("cp_lrp, uniform product:", {k: v.round(7).tolist() for k, v in ratios.items()})
    np.testing.assert_allclose(ratios["audio"], 0.5, atol=1e-4)
    np.testing.assert_allclose(ratios["text"], 0.5, atol=1e-4)
    np.testing.assert_allclose(ratios["total"], 1.0, atol=1e-4)
    # the matching pairs are the diagonal of all pairs: clip b's relevance for text b
    for b in range(2):
        np.testing.assert_allclose(2 * pairs.audio_relevance[b], full.audio_relevance[b, b],
                                   rtol=1e-4, atol=1e-4 * float(np.abs(full.audio_relevance).max()))
        np.testing.assert_allclose(2 * pairs.text_relevance[b], full.text_relevance[b, b],
                                   rtol=1e-4, atol=1e-4 * float(np.abs(full.text_relevance).max()))


def test_the_picture(results, tmp_path):
    res = results("attnlrp")
    path = tmp_path / "match.png"
    fig = match_figure(str(path), res, 1, 1)
    assert path.stat().st_size > 20_000
    texts = [t.get_text() for ax in fig.axes for t in ax.texts]
    assert all(w in texts for w, _ in res.words(1, 1)) and "<s> </s>" in texts
    with pytest.raises(ValueError, match="text index"):
        match_figure(None, res, 0)


def test_bad_requests_are_refused(model, features):
    with pytest.raises(ValueError, match="attribute_match explains with"):
        js.attribute_match(model, features=features, texts=TEXTS, method="integrated_gradients")
    with pytest.raises(ValueError, match="2 clips and 3 texts"):
        js.attribute_match(model, features=features, texts=TEXTS, pairs=True)
    with pytest.raises(ValueError, match="text 0 is empty"):
        js.attribute_match(model, features=features, texts=[""])
    with pytest.raises(ValueError, match="chunk"):
        js.attribute_match(model, features=features, texts=TEXTS, chunk=0)
