"""CLAP audio tower vs transformers on random weights saved with save_pretrained.

The unfused model is the real clap-htsat-unfused size (a ClapModel with a tiny text
tower and tokenizer, for zero-shot); the fused one is a ClapAudioModelWithProjection
reduced to depths 2-2-1-1 (plain and shifted blocks in the first two stages; the 8x8
last stage never shifts). Batches of 2 throughout, so each model compiles once per
program.
"""

import json
import shutil
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from safetensors.numpy import load_file, save_file
from test_clap_frontend import clip, recorded_hf_random, rel_err
from transformers import (
    ClapAudioConfig,
    ClapAudioModelWithProjection,
    ClapFeatureExtractor,
    ClapModel,
)

import jaxspeech as js
from jaxspeech.convert import clap as convert
from jaxspeech.data.reference_checkpoints import write_clap
from jaxspeech.models.clap import ClapConfig as JsClapConfig

SR = 48000
TOL = 1e-4  # max |diff| relative to max |reference|, float32 (DESIGN.md); measured ≤ 7e-7
# One xdist worker for the module under --dist loadgroup: the models are built and
# compiled once (module fixtures are per worker).
pytestmark = pytest.mark.xdist_group("clap")


@pytest.fixture(scope="module")
def unfused_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("clap_unfused")
    write_clap(folder, text_tower=True, seed=0)  # real clap-htsat-unfused audio size
    return folder


@pytest.fixture(scope="module")
def fused_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("clap_fused")
    write_clap(folder, dict(depths=[2, 2, 1, 1]), fusion=True, seed=1)
    return folder


@pytest.fixture(scope="module")
def unfused(unfused_dir):
    return js.load(unfused_dir), ClapModel.from_pretrained(unfused_dir).eval()


@pytest.fixture(scope="module")
def fused(fused_dir):
    return js.load(fused_dir), ClapAudioModelWithProjection.from_pretrained(fused_dir).eval()


def hf_clip(extractor, wave: np.ndarray, seed: int):
    """HF features of one clip with NumPy's RNG seeded, plus the crops it drew."""
    with recorded_hf_random(seed) as drawn:
        out = extractor([wave], sampling_rate=SR, return_tensors="np")
    feats = np.asarray(out["input_features"], np.float32)[0]
    longer = bool(np.asarray(out["is_longer"]).reshape(-1)[0])
    if wave.size <= 480000:
        crop = [0] * (3 if extractor.truncation == "fusion" else 1)
    elif extractor.truncation == "rand_trunc":
        crop = drawn["randint"][:1]
    else:
        crop = drawn["choice"] or [0, 0, 0]
    return feats, longer, crop


def torch_embed(model, feats, longer) -> np.ndarray:
    x = torch.from_numpy(np.asarray(feats, np.float32))
    flag = torch.from_numpy(np.asarray(longer, bool).reshape(-1, 1))
    with torch.no_grad():
        if isinstance(model, ClapModel):
            return model.get_audio_features(input_features=x, is_longer=flag).numpy()
        return model(input_features=x, is_longer=flag).audio_embeds.numpy()


def check_parity(m, model, clips, extractor, seed):
    """HF per clip (random crops recorded) vs jaxspeech fed the same crops: features, the
    model on HF's features, and waveform -> embedding end to end. Returns the errors."""
    ref = [hf_clip(extractor, c, seed + i) for i, c in enumerate(clips)]
    ref_feats = np.stack([r[0] for r in ref])
    ref_longer = np.array([r[1] for r in ref])
    ref_out = torch_embed(model, ref_feats, ref_longer)
    feats, kw = m.prepare(clips, sample_rate=SR, crops=[r[2] for r in ref])
    np.testing.assert_array_equal(np.asarray(kw["is_longer"]), ref_longer)
    out = m.apply(m.params, jnp.asarray(ref_feats), is_longer=jnp.asarray(ref_longer))
    e2e = m.apply(m.params, feats, **kw)
    errs = {"features": rel_err(feats, ref_feats), "model": rel_err(out, ref_out),
            "end_to_end": rel_err(e2e, ref_out),
            "model_abs": float(np.abs(np.asarray(out) - ref_out).max())}
    assert errs["features"] < TOL and errs["model"] < TOL and errs["end_to_end"] < TOL, errs
    return errs


def test_configs_read_from_the_folders(unfused, fused):
    m, _ = unfused
    assert m.kind == "clap" and m.sample_rate == SR
    assert m.config == JsClapConfig(normalize=True)  # clap-htsat-unfused, get_audio_features
    assert m.config == js.presets()["clap-htsat-unfused"]
    assert "logit_scale_a" in m.extras and m.extras["architecture"] == "ClapModel"
    larger = ClapAudioConfig(patch_embeds_hidden_size=128, depths=[2, 2, 12, 2], hidden_size=1024)
    assert JsClapConfig.from_hf_config(larger.to_dict()) == js.presets()["larger-clap-general"]
    f, _ = fused
    assert (f.config.enable_fusion, f.config.truncation, f.config.padding, f.config.fmin,
            f.config.fmax, f.config.depths, f.config.normalize) == (
        True, "fusion", "repeat", 30.0, 15000.0, (2, 2, 1, 1), False)


@pytest.mark.slow
def test_parity_unfused_full_size(unfused, unfused_dir):
    """clap-htsat-unfused at its real size: a 3 s clip (repeatpad) and a 14 s clip (random crop)."""
    m, model = unfused
    extractor = ClapFeatureExtractor.from_pretrained(unfused_dir)
    errs = check_parity(m, model, [clip(3.0, 20), clip(14.0, 21)], extractor, seed=5)
    print("unfused full size:", errs)


def test_parity_fused(fused, fused_dir):
    """Fused (AFF) model: a short clip (4 copies, is_longer forced as HF does for a clip
    alone) and a long one (whole clip shrunk + 3 random crops)."""
    m, model = fused
    extractor = ClapFeatureExtractor.from_pretrained(fused_dir)
    errs = check_parity(m, model, [clip(4.0, 22), clip(25.0, 23)], extractor, seed=9)
    print("fused:", errs)


def test_fused_batch_rule_runs_both_paths(fused, fused_dir):
    """HF's batch rule flags one of two short clips: one item through the AFF branch, one not."""
    m, model = fused
    extractor = ClapFeatureExtractor.from_pretrained(fused_dir)
    wave = np.stack([clip(3.0, 25), clip(3.0, 26)])
    ref, ref_longer = convert.hf_features(extractor, wave, truncation="fusion", padding="repeat",
                                          per_clip=False)
    feats, kw = m.prepare(wave, longer="per_batch")
    assert np.asarray(kw["is_longer"]).tolist() == ref_longer.tolist() == [True, False]
    out = m.apply(m.params, feats, **kw)
    assert rel_err(out, torch_embed(model, ref, ref_longer)) < TOL
    other = m.apply(m.params, feats, is_longer=jnp.asarray([False, True]))
    assert rel_err(other, torch_embed(model, ref, np.array([False, True]))) < TOL
    assert not np.allclose(out, other, atol=1e-3)  # the flag matters: O(1) apart, not noise


def test_reference_protocol(fused, fused_dir):
    """convert.clap.reference: HF with jaxspeech's key-less crops, is_longer per clip."""
    m, _ = fused
    features_fn, model_fn = convert.reference(str(fused_dir))
    wave = np.stack([clip(11.5, 27), clip(11.5, 28)])
    ref, ref_kw = features_fn(wave)
    feats, kw = m.prepare(wave)
    assert rel_err(feats, ref) < TOL
    np.testing.assert_array_equal(np.asarray(kw["is_longer"]), ref_kw["is_longer"])
    assert rel_err(m.apply(m.params, feats, **kw), model_fn(ref, **ref_kw)) < TOL


@pytest.mark.slow
def test_zero_shot_matches_clap_model(unfused, unfused_dir):
    m, model = unfused
    from transformers import AutoTokenizer

    labels = ["a dog", "rain on a roof", "a dog in the rain"]
    clips = [clip(3.0, 30), clip(3.0, 31)]
    tok = AutoTokenizer.from_pretrained(unfused_dir)
    extractor = ClapFeatureExtractor.from_pretrained(unfused_dir)
    feats = np.stack([hf_clip(extractor, c, 0)[0] for c in clips])
    with torch.no_grad():
        out = model(**tok(labels, padding=True, return_tensors="pt"),
                    input_features=torch.from_numpy(feats))
    ref = out.logits_per_audio.softmax(-1).numpy()
    probs = np.asarray(js.zero_shot(m, np.stack(clips), labels))
    assert probs.shape == (2, 3) and np.abs(probs - ref).max() < TOL
    text = js.clap_text_embeddings(unfused_dir, labels)
    # |embedding| ≤ 0.17: 6e-5 of the scale, DESIGN's bound (measured equal)
    np.testing.assert_allclose(text, out.text_embeds.numpy(), atol=1e-5)
    scale = float(model.logit_scale_a.detach().exp())
    again = js.zero_shot(m, np.stack(clips), text * 3.0, logit_scale=scale)  # re-normalised
    assert np.abs(np.asarray(again) - ref).max() < TOL
    assert not np.allclose(ref, ref[:, ::-1])  # the random model does tell the labels apart


def test_zero_shot_needs_a_scale_and_a_text_tower(fused):
    m, _ = fused
    with pytest.raises(ValueError, match="logit_scale"):
        js.zero_shot(m, clip(1.0, 32), np.ones((2, 512), np.float32))
    with pytest.raises(ValueError, match="ClapModel folder"):
        js.zero_shot(m, clip(1.0, 32), ["a dog"], logit_scale=10.0)


def test_intermediates_and_rules(fused):
    m, _ = fused
    feats, kw = m.prepare([clip(2.0, 33), clip(12.0, 34)])
    out, inter = m.forward(m.params, feats, **kw)
    enc = "audio_model.audio_encoder."
    assert inter[enc + "layers.0.blocks.1.hidden_state"].shape == (2, 64 * 64, 96)
    assert inter[enc + "layers.3.blocks.0.hidden_state"].shape == (2, 8 * 8, 768)
    assert inter[enc + "layers.0.blocks.1.attention.attention"].shape == (2, 64, 4, 64, 64)
    assert inter[enc + "last_hidden_state"].shape == (2, 64, 768)
    probs = inter[enc + "layers.1.blocks.1.attention.attention"]  # shifted: masked windows
    np.testing.assert_allclose(np.asarray(probs).sum(-1), 1.0, rtol=1e-5)  # 64 terms: ~2e-7
    plain = m.apply(m.params, feats, **kw)  # another program (no intermediates): rounding only
    # |out| ≤ 2: 5e-6 of the scale (measured 4.8e-7, 20x below)
    np.testing.assert_allclose(np.asarray(out), np.asarray(plain), rtol=0, atol=1e-5)
    lrp_out = m.apply(m.params, feats, rules="attnlrp", **kw)
    np.testing.assert_array_equal(np.asarray(lrp_out), np.asarray(plain))  # rules never change values
    tokens = inter[enc + "layers.2.blocks.0.hidden_state"][..., 0]
    cam = m.family.tokens_to_features(m.config, "layers.2.blocks.0.hidden_state", tokens, feats.shape)
    assert cam.shape == feats.shape


def test_gradient_reaches_the_waveform(fused):
    m, _ = fused
    wave = jnp.asarray(clip(1.5, 34)[None])

    def embed_sum(w):
        feats, kw = m.prepare(w)
        return m.apply(m.params, feats, **kw)[0, :8].sum()

    grad = np.asarray(jax.grad(embed_sum)(wave))
    assert np.isfinite(grad).all() and np.abs(grad).max() > 0


def test_bad_checkpoints_are_refused(fused_dir, tmp_path):
    bad = tmp_path / "missing"
    shutil.copytree(fused_dir, bad)
    state = load_file(str(bad / "model.safetensors"))
    del state["audio_model.audio_encoder.layers.1.blocks.0.attention.self.key.weight"]
    state["audio_model.audio_encoder.extra.weight"] = np.zeros(3, np.float32)
    save_file(state, str(bad / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(js.CheckpointError) as err:
        js.load(bad)
    assert "layers.1.blocks.0.attention.self.key.weight" in str(err.value)
    assert "audio_model.audio_encoder.extra.weight" in str(err.value)

    no_proj = tmp_path / "no_projection"
    shutil.copytree(fused_dir, no_proj)
    cfg = json.loads((no_proj / "config.json").read_text())
    (no_proj / "config.json").write_text(json.dumps({**cfg, "architectures": ["ClapAudioModel"]}))
    with pytest.raises(js.CheckpointError, match="audio_projection"):
        js.load(no_proj)

    unsupported = tmp_path / "channel_map"
    shutil.copytree(fused_dir, unsupported)
    (unsupported / "config.json").write_text(json.dumps({**cfg, "fusion_type": "channel_map"}))
    with pytest.raises(js.CheckpointError, match="fusion_type"):
        js.load(unsupported)


def test_orbax_round_trip(unfused, tmp_path):
    m, _ = unfused
    path = m.save(tmp_path / "clap")
    back = js.load(path)
    assert back.config == m.config and back.extras["logit_scale_a"] == m.extras["logit_scale_a"]
    for a, b in zip(jax.tree.leaves(m.params), jax.tree.leaves(back.params), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    wave = np.stack([clip(3.0, 35), clip(3.0, 36)])
    np.testing.assert_array_equal(np.asarray(back(wave)), np.asarray(m(wave)))
