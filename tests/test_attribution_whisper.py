"""Attribution on Whisper: forward identity, conservation, LXT and captum agreement, batching."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from transformers import WhisperModel

import jaxspeech as js
from jaxspeech.attribution.lxt import lxt_whisper_relevance
from jaxspeech.data.reference_checkpoints import write_whisper
from jaxspeech.lrp import RULE_SETS

D = 64


@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory):
    path = tmp_path_factory.mktemp("whisper")
    write_whisper(path, (D, 2, 4), ffn_dim=128, perturb=0.1)
    return path


@pytest.fixture(scope="module")
def model(hf_folder):
    return js.load(hf_folder)


@pytest.fixture(scope="module")
def features():
    return np.random.default_rng(1).standard_normal((2, 80, 3000)).astype(np.float32)


@pytest.fixture(scope="module")
def direction():
    return np.random.default_rng(2).standard_normal(D).astype(np.float32)


FRAMES = np.arange(100, 200)


def rel(a, b):
    return float(np.abs(np.asarray(a) - b).max() / np.abs(b).max())


# --- the forward never changes ---------------------------------------------------------------

@pytest.mark.parametrize("rules", list(RULE_SETS))
def test_forward_with_rules_is_bitwise_the_plain_forward(model, features, rules):
    x = jnp.asarray(features)
    plain = np.asarray(model.apply(model.params, x))
    np.testing.assert_array_equal(np.asarray(model.apply(model.params, x, rules=rules)), plain)


# --- conservation on a bias-free model ------------------------------------------------------

def bias_free(params):
    def zero(path, v):
        leaf = path[-1].key
        return jnp.zeros_like(v) if leaf in ("bias", "embed_positions") else v

    return jax.tree_util.tree_map_with_path(zero, params)


@pytest.mark.parametrize("rules", list(RULE_SETS))
def test_conservation_on_a_bias_free_model(model, features, direction, rules):
    """With biases and positions zeroed, every linear rule conserves exactly once attention
    is held constant (CP) and ε -> 0; the full AttnLRP-style sets lose relevance in the
    softmax, whose rule Σᵢ xᵢ(Rᵢ − sᵢΣR) ≠ ΣR (Achtibat et al. 2024) — reported, bounded
    in (0, 1)."""
    params = bias_free(model.params)
    target = js.targets.layer_direction(None, direction, frames=FRAMES)
    rule_set = RULE_SETS[rules]
    held = dataclasses.replace(rule_set, attention="cp", bilinear="gradient").with_params(
        epsilon=1e-9)
    res = js.attribute(model, features=features, params=params, target=target, rules=held)
    # DESIGN's float32 bound. It was 2e-3 with the default ε = 1e-6, whose stabiliser keeps
    # ε/(z + ε) of each output's relevance: 1.4e-4 (ε), 5e-5 (γ, z+) of the total, analytic
    # but not the conservation this test states. With ε = 1e-9: ≤ 1e-6 (float32 rounding).
    np.testing.assert_allclose(np.asarray(res.conservation()), 1.0, atol=1e-4)
    full = js.attribute(model, features=features, params=params, target=target, method=rules)
    ratio = np.asarray(full.extras["conservation"])
    print(f"{rules}: conservation {ratio} (attention held constant: {np.asarray(res.conservation())})")
    if rules == "cp_lrp":  # linears by their gradient: exact; DESIGN's bound (measured 4e-7)
        np.testing.assert_allclose(ratio, 1.0, atol=1e-4)
    else:
        assert np.all((ratio > 0) & (ratio < 1)), ratio


# --- agreement with LXT on the transformers encoder -----------------------------------------

def lxt_relevance(folder, features, direction, cp: bool):
    """AttnLRP / CP-LRP relevance of the transformers encoder with LXT's rule functions
    patched in (as LXT's own model patches do): identity rule on every GELU, LayerNorm with
    a constant std, LXT's attention wrappers (q, k ÷ 4 and v ÷ 2, or q, k detached)."""
    d = torch.from_numpy(direction)
    return lxt_whisper_relevance(
        folder, features, lambda h: h[:, FRAMES[0]:FRAMES[-1] + 1].mean(1) @ d, cp=cp)


@pytest.mark.parametrize("method", ["attnlrp", "cp_lrp"])
def test_lrp_matches_lxt_on_the_transformers_encoder(hf_folder, model, features, direction, method):
    ref, ref_score = lxt_relevance(hf_folder, features, direction, cp=method == "cp_lrp")
    target = js.targets.layer_direction(None, direction, frames=FRAMES)
    res = js.attribute(model, features=features, target=target, method=method)
    np.testing.assert_allclose(np.asarray(res.score), ref_score, rtol=1e-4)  # DESIGN's bound
    r = np.asarray(res.relevance)
    corr = np.corrcoef(r.ravel(), ref.ravel())[0, 1]
    print(f"{method} vs LXT: max rel diff {rel(r, ref):.2e}, correlation {corr:.8f}")
    # DESIGN's 1e-4 (was 1e-3, no origin given); measured 8e-7
    assert rel(r, ref) <= 1e-4 and corr > 0.9999
    # and the rules matter: plain gradient x input is far from LXT's relevance (measured
    # 0.28: O(1), not a tolerance)
    gxi = js.attribute(model, features=features, target=target, method="gradient_x_input")
    assert rel(gxi.relevance, ref) > 1e-2


# --- captum: integrated gradients --------------------------------------------------------------

def test_integrated_gradients_match_captum_and_are_complete(hf_folder, model, features, direction):
    from captum.attr import IntegratedGradients

    encoder = WhisperModel.from_pretrained(hf_folder, attn_implementation="eager").encoder.eval()
    d = torch.from_numpy(direction)

    def forward(x):
        return encoder(x).last_hidden_state[:, FRAMES[0]:FRAMES[-1] + 1].mean(1) @ d

    x = torch.from_numpy(features[:1])
    baseline = torch.full_like(x, float(x.min()))
    ref = IntegratedGradients(forward).attribute(x, baselines=baseline, n_steps=32,
                                                 method="gausslegendre").detach().numpy()
    target = js.targets.layer_direction(None, direction, frames=FRAMES)
    res = js.attribute(model, features=features[:1], target=target,
                       method="integrated_gradients")  # defaults: 32 steps, min baseline
    print(f"IG vs captum: max rel diff {rel(res.relevance, ref):.2e}, completeness gap "
          f"{np.asarray(res.extras['completeness_gap'])}")
    # DESIGN's 1e-4 (was 1e-3, no origin given); measured 2e-7
    assert rel(res.relevance, ref) <= 1e-4
    # (ΣR - Δscore)/|Δscore|: 32 Gauss-Legendre nodes on a smooth (GELU) path: measured
    # 6e-7. 1 %: what 32 steps promise (ECAPA's ReLU kinks need most of it)
    assert np.all(np.abs(np.asarray(res.extras["completeness_gap"])) < 0.01)


# --- batching, methods, errors ----------------------------------------------------------------

@pytest.mark.parametrize("method", ["attnlrp", "gradcam", "gradient_rollout"])
def test_batch_of_8_equals_8_single_calls(model, method):
    x = np.random.default_rng(3).standard_normal((8, 80, 3000)).astype(np.float32)
    kw = {"layer": "layers.0.hidden_state"} if method == "gradcam" else {}
    target = js.targets.output_norm()
    batched = js.attribute(model, features=x, target=target, method=method, **kw)
    for i in range(8):
        single = js.attribute(model, features=x[i:i + 1], target=target, method=method, **kw)
        # batch 8 and batch 1 compile to other summation orders: float32 noise, measured
        # 1.7e-7 of the max (usage ≤ 1 % of these bounds)
        np.testing.assert_allclose(batched.relevance[i], single.relevance[0], rtol=2e-4,
                                   atol=2e-5 * float(np.abs(single.relevance).max()))


def test_every_method_gives_relevance_over_the_features(model, features):
    target = js.targets.layer_norm("layers.1.hidden_state", frames=FRAMES)
    for method in js.METHODS:
        kw = {"layer": "layers.1.hidden_state"} if method == "gradcam" else {}
        kw.update({"steps": 4} if method == "integrated_gradients" else {})
        kw.update({"n_samples": 2} if method == "smoothgrad" else {})
        res = js.attribute(model, features=features, target=target, method=method, **kw)
        assert res.relevance.shape == features.shape, method
        assert np.isfinite(np.asarray(res.relevance)).all(), method
        assert res.frames().shape == (2, 3000)


def test_rollout_equals_its_definition(model, features):
    """Abnar & Zuidema, literally: Â = normalise(0.5·mean_h A + 0.5·I), rollout = Â_L ⋯ Â_1,
    averaged over the explained rows; A from the forward's own attention maps."""
    target = js.targets.layer_norm(None, frames=FRAMES)
    res = js.attribute(model, features=features, target=target, method="rollout")
    _, inter = model.forward(model.params, jnp.asarray(features))
    joint = np.eye(1500)[None]
    for i in range(2):
        a = np.asarray(inter[f"layers.{i}.self_attn.attention"], np.float64).mean(1)
        a = 0.5 * a + 0.5 * np.eye(1500)[None]
        joint = (a / a.sum(-1, keepdims=True)) @ joint
    expected = joint[:, FRAMES].mean(1)
    # DESIGN's bound against the float64 product (atol: 3e-6 of the max, 3e-3; measured
    # 2.5 % of the bound)
    np.testing.assert_allclose(np.asarray(res.extras["tokens"]), expected, rtol=1e-4, atol=1e-8)


def test_gradient_rollout_equals_chefer_on_transformers_attention(hf_folder, model, features,
                                                                   direction):
    """Chefer et al. 2021, literally, with attention maps and their gradients taken by
    torch autograd from the transformers encoder: R ← R + E_h[(∇A ⊙ A)⁺]·R from R = I."""
    encoder = WhisperModel.from_pretrained(hf_folder, attn_implementation="eager").encoder.eval()
    out = encoder(torch.from_numpy(features), output_attentions=True)
    for a in out.attentions:
        a.retain_grad()
    hidden = out.last_hidden_state[:, FRAMES[0]:FRAMES[-1] + 1].mean(1)
    (hidden @ torch.from_numpy(direction)).sum().backward()
    joint = np.eye(1500)[None]
    for a in out.attentions:
        cam = np.maximum(a.grad.numpy() * a.detach().numpy(), 0).mean(1).astype(np.float64)
        joint = joint + cam @ joint
    expected = joint[:, FRAMES].mean(1)
    target = js.targets.layer_direction(None, direction, frames=FRAMES)
    res = js.attribute(model, features=features, target=target, method="gradient_rollout")
    assert rel(res.extras["tokens"], expected) < 1e-4  # DESIGN's bound; measured 1.1e-7


def test_waveform_in_pooling_and_pull_back(model):
    from jaxspeech.data import synth

    wave = np.stack([synth.harmonic_sweep(2.0, 16000), synth.noise_bursts(2.0, 16000)])
    res = js.attribute(model, wave, target=js.targets.output_norm(), method="attnlrp")
    assert res.relevance.shape == (2, 80, 3000)
    back = res.to_waveform()
    assert back.shape == wave.shape
    frames = np.asarray(res.frames())
    # the pulled-back relevance keeps what the clip's frames hold: a linear map, float32
    # sums only (measured equal; DESIGN's bound)
    np.testing.assert_allclose(np.asarray(back).sum(1), frames[:, :200].sum(1), rtol=1e-4,
                               atol=1e-6)


def test_bad_requests_get_clear_errors(model, features):
    with pytest.raises(ValueError, match="unknown method 'lrp'"):
        js.attribute(model, features=features, method="lrp")
    with pytest.raises(ValueError, match=r"unknown layer 'layers.9.hidden_state'.*layers.1"):
        js.attribute(model, features=features, method="gradcam", layer="layers.9.hidden_state",
                     target=js.targets.output_norm())
    with pytest.raises(ValueError, match="gradcam needs layer"):
        js.attribute(model, features=features, method="gradcam", target=js.targets.output_norm())
    with pytest.raises(ValueError, match=r"one value per item"):
        js.attribute(model, features=features, target=js.targets.custom(lambda y: y.sum()))
    with pytest.raises(ValueError, match=r"class index has shape \(3,\); expected a scalar or \[2\]"):
        js.attribute(model, features=features,
                     target=js.targets.linear_probe(np.ones((D, 4)), None, [0, 1, 2]))
