"""Whisper decoder: teacher-forced logits vs transformers on identical weights (HF folders and
OpenAI .pt), the KV-cache step, rules that leave the forward unchanged, and checkpoint errors."""

import json

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from test_whisper import hf_config, random_hf, rel_diff, to_openai_state
from transformers import WhisperForConditionalGeneration, WhisperModel

import jaxspeech as js
from jaxspeech.convert.common import CheckpointError
from jaxspeech.models.whisper import decode_step, decoder_cache

# DESIGN.md's parity principle: max |diff| <= 1e-4 of the output's scale in float32.
TOL = 1e-4


def _features(n_mels, seed=0):
    return np.random.default_rng(seed).standard_normal((2, n_mels, 3000)).astype(np.float32)


def _tokens(vocab, length=9, seed=0):
    return np.random.default_rng(seed).integers(0, vocab, (2, length)).astype(np.int32)


def hf_logits(model, features, tokens):
    with torch.no_grad():
        return model(input_features=torch.from_numpy(features),
                     decoder_input_ids=torch.from_numpy(tokens).long()).logits.numpy()


def tied_logits(model, features, tokens):
    """A ``WhisperModel``'s decoder state times its token embedding (the tied projection)."""
    with torch.no_grad():
        state = model(input_features=torch.from_numpy(features),
                      decoder_input_ids=torch.from_numpy(tokens).long()).last_hidden_state
        return (state @ model.decoder.embed_tokens.weight.T).numpy()


def conditional(n_mels=80, d_model=64, layers=2, heads=4, ffn=128, decoder_layers=2, seed=0):
    cfg = hf_config(n_mels, d_model, layers, heads, ffn)
    cfg.decoder_layers = decoder_layers
    return random_hf(WhisperForConditionalGeneration, cfg, seed)


@pytest.mark.parametrize("n_mels", [80, 128])
def test_teacher_forced_logits_match_transformers(tmp_path, n_mels):
    hf = conditional(n_mels=n_mels, seed=n_mels)
    hf.save_pretrained(tmp_path)
    m = js.load(tmp_path)
    assert m.config.has_decoder and m.config.decoder_layers == 2 and m.config.vocab_size == 64
    x, t = _features(n_mels), _tokens(64)
    assert rel_diff(m.apply(m.params, x, tokens=t), hf_logits(hf, x, t)) < TOL


def test_whisper_model_folder_decodes_with_the_tied_embedding(tmp_path):
    """A ``WhisperModel`` folder has no ``proj_out``: logits are the decoder state times the
    token embedding, as ``WhisperForConditionalGeneration`` ties them."""
    hf = random_hf(WhisperModel, hf_config(), seed=3)
    hf.save_pretrained(tmp_path)
    m = js.load(tmp_path)
    x, t = _features(80), _tokens(64)
    assert rel_diff(m.apply(m.params, x, tokens=t), tied_logits(hf, x, t)) < TOL


def test_openai_pt_decoder_matches_transformers(tmp_path):
    hf = random_hf(WhisperModel, hf_config(n_mels=80, d_model=64, layers=2, heads=4, ffn=256), 4)
    dims = {"n_mels": 80, "n_audio_ctx": 1500, "n_audio_state": 64, "n_audio_head": 4,
            "n_audio_layer": 2, "n_vocab": 64, "n_text_ctx": 448, "n_text_state": 64,
            "n_text_head": 4, "n_text_layer": 1}
    torch.save({"dims": dims, "model_state_dict": to_openai_state(hf)}, tmp_path / "m.pt")
    m = js.load(tmp_path / "m.pt")
    assert m.config.decoder_layers == 1 and m.config.max_target_positions == 448
    x, t = _features(80), _tokens(64)
    assert rel_diff(m.apply(m.params, x, tokens=t), tied_logits(hf, x, t)) < TOL


def test_cached_steps_give_the_teacher_forced_logits():
    """Prompt in one step, then one token at a time on the KV cache: the same logits as one
    causal pass. The two paths sum the same products over key buffers of different lengths
    (masked slots contribute exact zeros), so they agree to float32 rounding of the
    attention sums: well inside the parity tolerance."""
    m = js.init("whisper-tiny", encoder_layers=1, decoder_layers=2, vocab_size=300)
    x = jnp.asarray(_features(80))
    t = _tokens(300, length=7)
    full = m.apply(m.params, x, tokens=t)
    cache = decoder_cache(m.config, m.params, m.apply(m.params, x), max_length=12)
    steps, cache = decode_step(m.config, m.params, t[:, :4], cache, 0)
    pieces = [steps]
    for i in range(4, 7):
        step, cache = decode_step(m.config, m.params, t[:, i:i + 1], cache, i)
        pieces.append(step)
    assert rel_diff(jnp.concatenate(pieces, axis=1), full) < TOL


def test_rules_leave_the_decoder_forward_bitwise_equal():
    m = js.init("whisper-tiny", encoder_layers=1, decoder_layers=1, vocab_size=200)
    x, t = jnp.asarray(_features(80)[:1]), _tokens(200, 5)[:1]
    plain = np.asarray(m.apply(m.params, x, tokens=t))
    for rules in ("attnlrp", "cp_lrp", "epsilon", "gamma", "zplus"):
        np.testing.assert_array_equal(m.apply(m.params, x, tokens=t, rules=rules), plain)


def test_decoder_intermediates_are_named_and_shaped():
    m = js.init("whisper-tiny", encoder_layers=1, decoder_layers=2, vocab_size=100)
    x, t = jnp.asarray(_features(80)[:1]), _tokens(100, 6)[:1]
    logits, inter = m.forward(m.params, x, tokens=t)
    assert logits.shape == (1, 6, 100)
    assert inter["decoder.embeddings"].shape == (1, 6, 384)
    assert inter["decoder.layers.1.hidden_state"].shape == (1, 6, 384)
    self_attn = np.asarray(inter["decoder.layers.0.self_attn.attention"])
    cross = np.asarray(inter["decoder.layers.1.encoder_attn.attention"])
    assert self_attn.shape == (1, 6, 6, 6) and cross.shape == (1, 6, 6, 1500)
    assert np.all(np.triu(self_attn[0, 0], k=1) == 0)  # causal: no weight on later tokens
    # softmax rows sum to 1 up to float32 rounding of a 1500-term sum
    np.testing.assert_allclose(cross.sum(-1), 1.0, atol=1e-5)


def test_encoder_only_checkpoint_says_it_cannot_decode(tmp_path):
    hf = random_hf(WhisperModel, hf_config(), seed=5)
    state = {k: v for k, v in hf.state_dict().items() if k.startswith("encoder.")}
    hf.config.save_pretrained(tmp_path)
    torch.save(state, tmp_path / "pytorch_model.bin")
    m = js.load(tmp_path)
    assert not m.config.has_decoder and "decoder" not in m.params
    with pytest.raises(ValueError, match="no decoder"):
        m.apply(m.params, _features(80), tokens=_tokens(64))


def test_untied_output_projection_is_refused(tmp_path):
    hf = conditional(seed=6)
    with torch.no_grad():
        hf.proj_out.weight = torch.nn.Parameter(hf.proj_out.weight.detach().clone() + 1.0)
    hf.config.tie_word_embeddings = False
    hf.save_pretrained(tmp_path)
    with pytest.raises(CheckpointError, match="ties its output projection"):
        js.load(tmp_path)


def test_too_many_tokens_are_refused():
    m = js.init("whisper-tiny", encoder_layers=1, decoder_layers=1, vocab_size=50,
                max_target_positions=8)
    with pytest.raises(ValueError, match="at most 8"):
        m.apply(m.params, _features(80)[:1], tokens=np.zeros((1, 9), np.int32))


def test_jaxspeech_folder_keeps_decoder_generation_settings_and_tokenizer(tmp_path):
    hf = conditional(seed=7)
    hf.save_pretrained(tmp_path / "hf")
    added = [{"id": 60 + i, "content": c, "special": True} for i, c in enumerate(
        ["<|endoftext|>", "<|startoftranscript|>", "<|transcribe|>", "<|notimestamps|>"])]
    (tmp_path / "hf" / "tokenizer.json").write_text(json.dumps({"added_tokens": added}))
    (tmp_path / "hf" / "generation_config.json").write_text(json.dumps(
        {"alignment_heads": [[1, 0], [1, 3]], "suppress_tokens": [5, 6],
         "begin_suppress_tokens": [7]}))
    m = js.load(tmp_path / "hf")
    gen = m.extras["generation"]
    assert gen["decoder_start_token_id"] == 61 and gen["eos_token_id"] == 60
    assert gen["no_timestamps_token_id"] == 63 and gen["alignment_heads"] == [[1, 0], [1, 3]]
    assert gen["suppress_tokens"] == [5, 6] and gen["begin_suppress_tokens"] == [7]
    m.save(tmp_path / "js")
    back = js.load(tmp_path / "js")
    assert back.config == m.config
    assert back.extras["generation"] == gen
    assert back.extras["tokenizer_json"] == m.extras["tokenizer_json"]
    x, t = _features(80), _tokens(64)
    np.testing.assert_array_equal(back.apply(back.params, x, tokens=t),
                                  m.apply(m.params, x, tokens=t))
