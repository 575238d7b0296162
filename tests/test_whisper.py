"""Whisper encoder: parity with transformers on identical weights, every checkpoint format."""

import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from transformers import WhisperConfig as HFWhisperConfig
from transformers import WhisperForConditionalGeneration, WhisperModel

import jaxspeech as js
from jaxspeech.convert.common import CheckpointError
from jaxspeech.models.whisper import PRESETS, WhisperConfig, sinusoids

TOL = 1e-4  # max |diff| relative to max |reference|, float32 (DESIGN.md); measured ≤ 6e-7


def hf_config(n_mels=80, d_model=64, layers=2, heads=4, ffn=128):
    return HFWhisperConfig(
        num_mel_bins=n_mels, d_model=d_model, encoder_layers=layers,
        encoder_attention_heads=heads, encoder_ffn_dim=ffn, decoder_layers=1,
        decoder_attention_heads=heads, decoder_ffn_dim=ffn, vocab_size=64, pad_token_id=0,
        bos_token_id=1, eos_token_id=2, decoder_start_token_id=1)


def random_hf(cls, config, seed):
    torch.manual_seed(seed)
    model = cls(config).eval()
    with torch.no_grad():  # random LayerNorm affines and biases too, not the 1/0 defaults
        for name, p in model.named_parameters():
            if name.endswith("bias") or "layer_norm" in name:
                p.add_(0.1 * torch.randn_like(p))
    return model


def rel_diff(ours, ref):
    ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
    return np.abs(ours - ref).max() / np.abs(ref).max()


def reference_encoder_output(model, features):
    encoder = model.get_encoder() if hasattr(model, "get_encoder") else model.encoder
    with torch.no_grad():
        return encoder(torch.from_numpy(np.asarray(features))).last_hidden_state.numpy()


@pytest.fixture(scope="module")
def features_80():
    rng = np.random.default_rng(0)
    return rng.standard_normal((2, 80, 3000)).astype(np.float32)


@pytest.fixture(scope="module")
def features_128():
    rng = np.random.default_rng(1)
    return rng.standard_normal((2, 128, 3000)).astype(np.float32)


@pytest.mark.parametrize("safe", [True, False], ids=["safetensors", "pytorch_model.bin"])
def test_whisper_model_folder_matches_transformers(tmp_path, features_80, safe):
    hf = random_hf(WhisperModel, hf_config(), seed=0)
    hf.save_pretrained(tmp_path, safe_serialization=safe)
    m = js.load(tmp_path)
    assert m.config.encoder_only() == WhisperConfig(80, 64, 2, 4, 128)
    assert m.config.decoder_layers == 1 and m.config.vocab_size == 64
    assert rel_diff(m.apply(m.params, features_80), reference_encoder_output(hf, features_80)) < TOL


def test_128_mel_conditional_generation_sharded_matches_transformers(tmp_path, features_128):
    hf = random_hf(WhisperForConditionalGeneration,
                   hf_config(n_mels=128, d_model=96, layers=3, heads=6, ffn=192), seed=1)
    hf.save_pretrained(tmp_path, max_shard_size="200KB")
    assert (tmp_path / "model.safetensors.index.json").exists()
    m = js.load(tmp_path)
    assert m.config.n_mels == 128 and m.config.encoder_layers == 3
    ref = reference_encoder_output(hf.model, features_128)
    assert rel_diff(m.apply(m.params, features_128), ref) < TOL


def test_folder_written_by_transformers_5_loads(tmp_path, features_80):
    """transformers 5 writes ``dtype`` (not ``torch_dtype``) and its own version into
    config.json; the tensors keep their names. Both must load."""
    hf = random_hf(WhisperModel, hf_config(), seed=2)
    hf.save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["dtype"] = cfg.pop("torch_dtype", "float32")
    cfg["transformers_version"] = "5.0.0"
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    m = js.load(tmp_path)
    assert rel_diff(m.apply(m.params, features_80), reference_encoder_output(hf, features_80)) < TOL


# --- OpenAI's own .pt layout, written here from an HF model by the published name map ----

_HF_TO_OPENAI = {"self_attn.q_proj": "attn.query", "self_attn.k_proj": "attn.key",
                 "self_attn.v_proj": "attn.value", "self_attn.out_proj": "attn.out",
                 "self_attn_layer_norm": "attn_ln", "fc1": "mlp.0", "fc2": "mlp.2",
                 "final_layer_norm": "mlp_ln", "encoder_attn.q_proj": "cross_attn.query",
                 "encoder_attn.k_proj": "cross_attn.key", "encoder_attn.v_proj": "cross_attn.value",
                 "encoder_attn.out_proj": "cross_attn.out", "encoder_attn_layer_norm": "cross_attn_ln"}


def to_openai_state(hf_model):
    """OpenAI's names (whisper/model.py) for an HF ``WhisperModel``'s tensors."""
    out = {}
    for name, tensor in hf_model.state_dict().items():
        part, rest = name.split(".", 1)
        if rest in ("embed_positions.weight",):
            rest = "positional_embedding"
        elif rest == "embed_tokens.weight":
            rest = "token_embedding.weight"
        elif rest.startswith("layer_norm."):
            rest = ("ln_post." if part == "encoder" else "ln.") + rest.split(".", 1)[1]
        elif rest.startswith("layers."):
            _, i, tail = rest.split(".", 2)
            module, leaf = tail.rsplit(".", 1)
            rest = f"blocks.{i}.{_HF_TO_OPENAI[module]}.{leaf}"
        out[f"{part}.{rest}"] = tensor
    return out


def test_openai_pt_file_matches_transformers(tmp_path, features_128):
    config = hf_config(n_mels=128, d_model=64, layers=2, heads=4, ffn=256)
    hf = random_hf(WhisperModel, config, seed=3)
    dims = {"n_mels": 128, "n_audio_ctx": 1500, "n_audio_state": 64, "n_audio_head": 4,
            "n_audio_layer": 2, "n_vocab": 64, "n_text_ctx": 448, "n_text_state": 64,
            "n_text_head": 4, "n_text_layer": 1}
    path = tmp_path / "tiny.pt"
    torch.save({"dims": dims, "model_state_dict": to_openai_state(hf)}, path)
    m = js.load(path)
    assert m.extras["format"] == "openai"
    ref = reference_encoder_output(hf, features_128)
    assert rel_diff(m.apply(m.params, features_128), ref) < TOL


# --- checkpoint errors --------------------------------------------------------------------

def test_missing_and_misshaped_tensors_are_listed_in_one_error(tmp_path):
    hf = random_hf(WhisperModel, hf_config(), seed=4)
    state = {k: v for k, v in hf.state_dict().items() if k != "encoder.layers.1.fc2.weight"}
    state["encoder.conv1.bias"] = torch.zeros(65)
    state["encoder.extra_head.weight"] = torch.zeros(3)
    hf.config.save_pretrained(tmp_path)
    torch.save(state, tmp_path / "pytorch_model.bin")
    with pytest.raises(CheckpointError) as err:
        js.load(tmp_path)
    msg = str(err.value)
    assert "1 missing" in msg and "encoder.layers.1.fc2.weight" in msg
    assert "1 mis-shaped" in msg and "encoder.conv1.bias" in msg and "(65,)" in msg
    assert "1 unexpected" in msg and "encoder.extra_head.weight" in msg


def test_config_that_does_not_match_weights_names_the_layer(tmp_path):
    hf = random_hf(WhisperModel, hf_config(), seed=5)
    hf.save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["encoder_ffn_dim"] = 256
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=r"encoder\.layers\.0\.fc1\.weight"):
        js.load(tmp_path)


def test_unknown_folder_says_what_is_expected(tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(CheckpointError, match="hyperparams.yaml"):
        js.load(tmp_path)
    with pytest.raises(FileNotFoundError):
        js.load(tmp_path / "nope")


# --- the jaxspeech format ------------------------------------------------------------------

def test_orbax_round_trip_keeps_params_and_config(tmp_path, features_80):
    m = js.init("whisper-tiny", seed=3, encoder_layers=1)
    m.save(tmp_path / "ckpt")
    back = js.load(tmp_path / "ckpt")
    assert back.config == m.config
    jax.tree.map(np.testing.assert_array_equal, back.params, m.params)
    with pytest.raises(FileExistsError):
        m.save(tmp_path / "ckpt")  # never overwrites what is there


def test_orbax_checkpoint_with_edited_config_is_refused(tmp_path):
    m = js.init("whisper-tiny", encoder_layers=1)
    m.save(tmp_path / "ckpt")
    meta = json.loads((tmp_path / "ckpt" / "jaxspeech.json").read_text())
    meta["config"]["encoder_layers"] = 2
    (tmp_path / "ckpt" / "jaxspeech.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="missing layers.1"):
        js.load(tmp_path / "ckpt")


# --- model behaviour -----------------------------------------------------------------------

def test_presets_have_transformers_parameter_counts():
    """Every released size (OpenAI's dims): d_model, layers, heads, mels, decoder layers, vocab;
    counted as transformers' WhisperModel (proj_out is tied to the token embedding)."""
    sizes = {"whisper-tiny": (384, 4, 6, 80, 4, 51865), "whisper-tiny.en": (384, 4, 6, 80, 4, 51864),
             "whisper-base": (512, 6, 8, 80, 6, 51865), "whisper-base.en": (512, 6, 8, 80, 6, 51864),
             "whisper-small": (768, 12, 12, 80, 12, 51865),
             "whisper-small.en": (768, 12, 12, 80, 12, 51864),
             "whisper-medium": (1024, 24, 16, 80, 24, 51865),
             "whisper-medium.en": (1024, 24, 16, 80, 24, 51864),
             "whisper-large-v2": (1280, 32, 20, 80, 32, 51865),
             "whisper-large-v3": (1280, 32, 20, 128, 32, 51866),
             "whisper-large-v3-turbo": (1280, 32, 20, 128, 4, 51866)}
    assert set(PRESETS) == set(sizes)
    from jaxspeech.model import count_params, param_shapes

    for name, (d, n, h, mels, dec, vocab) in sizes.items():
        cfg = HFWhisperConfig(num_mel_bins=mels, d_model=d, encoder_layers=n,
                              encoder_attention_heads=h, encoder_ffn_dim=4 * d,
                              decoder_layers=dec, decoder_attention_heads=h,
                              decoder_ffn_dim=4 * d, vocab_size=vocab)
        with torch.device("meta"):
            model = WhisperModel(cfg)
        assert count_params(param_shapes(PRESETS[name])) == sum(
            p.numel() for p in model.parameters()), name
        assert count_params(param_shapes(PRESETS[name].encoder_only())) == sum(
            p.numel() for p in model.encoder.parameters()), name


def test_intermediates_have_every_layer_and_attention_map():
    m = js.init("whisper-tiny", encoder_layers=2)
    x = jnp.zeros((1, 80, 3000))
    y, inter = m.forward(m.params, x)
    assert y.shape == (1, 1500, 384)
    assert inter["layers.1.self_attn.attention"].shape == (1, 6, 1500, 1500)
    # rows of 1500 probabilities: float32 sums within ~√1500·2⁻²⁴ = 2e-6 (measured 2.4e-7)
    np.testing.assert_allclose(inter["layers.1.self_attn.attention"].sum(-1), 1.0, atol=1e-5)
    assert inter["layers.1.hidden_state"].shape == (1, 1500, 384)
    np.testing.assert_array_equal(y, m.apply(m.params, x))


def test_remat_gives_the_same_output_and_gradient():
    m = js.init("whisper-tiny", encoder_layers=2)
    x = jnp.asarray(np.random.default_rng(0).standard_normal((1, 80, 3000)), jnp.float32)
    # the same ops, recomputed: float32 order at most (measured equal). 1e-5 at |y| ≤ 4.9
    # (was 1e-6, 2 ulp there): 2e-6 of the scale
    np.testing.assert_allclose(m.apply(m.params, x, remat=True), m.apply(m.params, x), atol=1e-5)
    # A random read-out: the plain sum of the outputs has a zero gradient (the last
    # LayerNorm's outputs sum to d·bias = 0 whatever x), so it compared float noise to
    # float noise (|g| ≤ 4e-7, with a 2x margin to atol)
    w = jnp.asarray(np.random.default_rng(1).standard_normal((1, 1500, 384)), jnp.float32)

    def loss(x, remat):
        return (m.apply(m.params, x, remat=remat) * w).sum()

    g1 = jax.grad(loss)(x, False)
    g2 = jax.grad(loss)(x, True)
    # DESIGN's float32 bound, relative to the gradient's scale
    np.testing.assert_allclose(g2, g1, rtol=1e-4, atol=1e-4 * float(jnp.abs(g1).max()))


def test_positional_table_is_whisper_sinusoids():
    t = sinusoids(1500, 384)
    assert t.shape == (1500, 384)
    np.testing.assert_allclose(t[0, :192], 0.0)
    np.testing.assert_allclose(t[0, 192:], 1.0)
    inc = np.log(10000) / (192 - 1)
    # float32 vs float64: 2⁻²⁴ = 6e-8 relative rounding of the argument and the sine (2e-8)
    np.testing.assert_allclose(t[7, 5], np.sin(7 * np.exp(-inc * 5)), rtol=1e-6)


def test_wrong_feature_length_is_refused():
    m = js.init("whisper-tiny", encoder_layers=1)
    with pytest.raises(ValueError, match="3000"):
        m.apply(m.params, jnp.zeros((1, 80, 1000)))
    with pytest.raises(ValueError, match="80"):
        m.apply(m.params, jnp.zeros((1, 128, 3000)))


def test_unknown_preset_lists_the_known_ones():
    with pytest.raises(ValueError, match="whisper-base"):
        js.init("whisper-huge")


@pytest.mark.slow
def test_whisper_base_full_size_end_to_end(tmp_path):
    """The real whisper-base size: HF folder -> js.load -> waveform -> encoder output."""
    from transformers import WhisperFeatureExtractor

    from jaxspeech.data import synth

    config = HFWhisperConfig(num_mel_bins=80, d_model=512, encoder_layers=6,
                             encoder_attention_heads=8, encoder_ffn_dim=2048, decoder_layers=1,
                             decoder_attention_heads=8, decoder_ffn_dim=2048,
                             pad_token_id=50257, bos_token_id=50257, eos_token_id=50257,
                             decoder_start_token_id=50258)
    hf = random_hf(WhisperModel, config, seed=6)
    hf.save_pretrained(tmp_path)
    m = js.load(tmp_path)
    assert m.config.encoder_only() == PRESETS["whisper-base"].encoder_only()
    wave = synth.harmonic_sweep(30.0, 16000)[None]
    features = WhisperFeatureExtractor(feature_size=80)(
        list(wave), sampling_rate=16000, return_tensors="np")["input_features"]
    ref = reference_encoder_output(hf, features)
    assert rel_diff(m(wave), ref) < TOL
    shutil.rmtree(tmp_path)
