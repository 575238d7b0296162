"""A plain function of the output is a target (wrapped as ``js.targets.custom``); anything
else that is not a Target is refused with an error naming ``js.targets.custom``."""

import jax.numpy as jnp
import numpy as np
import pytest

import jaxspeech as js
from jaxspeech import audio
from jaxspeech.assets import demo_clips
from jaxspeech.attribution import methods


@pytest.fixture(scope="module")
def model_and_clips():
    model, _ = js.default_model()  # the shipped Whisper encoder: output [B, 100 frames, 64]
    files, _, _ = demo_clips()
    return model, np.stack([audio.read(f, model.sample_rate) for f in files[:2]])


def mean_frame_norm(y):
    """What ``targets.output_norm()`` computes on a Whisper output: the L2 norm of the
    output averaged over frames (``targets._pool`` then ``jnp.linalg.norm``)."""
    return jnp.linalg.norm(y.mean(axis=1), axis=-1)


@pytest.mark.parametrize("method", ["attnlrp", "integrated_gradients"])
def test_a_plain_function_explains_like_the_library_target(model_and_clips, method):
    model, clips = model_and_clips
    library = js.attribute(model, clips, target=js.targets.output_norm(), method=method, steps=4)
    plain = js.attribute(model, clips, target=lambda y: jnp.linalg.norm(y.mean(axis=1), axis=-1),
                         method=method, steps=4)
    # The lambda is the library target's own ops in the same order, so both trace to the
    # same program: equal bit for bit, not merely close.
    np.testing.assert_array_equal(np.asarray(plain.relevance), np.asarray(library.relevance))
    np.testing.assert_array_equal(np.asarray(plain.score), np.asarray(library.score))
    assert plain.target == "custom"


def test_a_named_function_names_the_attribution(model_and_clips):
    model, clips = model_and_clips
    res = js.attribute(model, clips, target=mean_frame_norm, method="gradient_x_input")
    assert res.target == "mean_frame_norm"
    assert js.targets.custom(mean_frame_norm, name="norm").name == "norm"


def test_the_same_function_compiles_once(model_and_clips):
    model, clips = model_and_clips

    def first_frame_sum(y):
        return y[:, 0].sum(-1)

    js.attribute(model, clips, target=first_frame_sum, method="saliency")
    compiled = methods.gradient._cache_size()
    js.attribute(model, clips, target=first_frame_sum, method="saliency")
    js.attribute(model, clips, target=js.targets.custom(first_frame_sum), method="saliency")
    assert methods.gradient._cache_size() == compiled


@pytest.mark.parametrize("bad", ["output-norm", 3, np.ones(2)])
def test_what_is_neither_a_target_nor_a_function_is_refused(model_and_clips, bad):
    model, clips = model_and_clips
    with pytest.raises(TypeError, match=r"js\.targets\.custom\(fn\)"):
        js.attribute(model, clips, target=bad, method="saliency")
    with pytest.raises(TypeError, match="needs a function"):
        js.targets.custom(bad)


def test_evaluate_takes_a_plain_function_as_target():
    """js.evaluate resolves targets as js.attribute does (a function becomes custom)."""
    import jaxspeech.evaluate as ev

    m = js.init("whisper-tiny", d_model=16, encoder_layers=1, encoder_attention_heads=2,
                encoder_ffn_dim=32, max_source_positions=50, decoder_layers=0)
    wave = np.random.default_rng(0).standard_normal((1, 16000)).astype(np.float32) * 0.1

    def energy(y):
        return jnp.square(y).mean(axis=(1, 2))

    table = ev.evaluate(m, wave, energy, ["saliency"], steps=2, mprt=False)
    assert "energy" in table.markdown() and "| saliency |" in table.markdown()
