"""CLAP's text tower in JAX vs transformers' ClapModel on random weights saved with save_pretrained.

The tokenizer is a real byte-level BPE RoBERTa tokenizer built offline with the
``tokenizers`` library and saved by transformers' RobertaTokenizerFast
(reference_checkpoints.save_roberta_tokenizer): transformers reads the folder with
AutoTokenizer, jaxspeech reads its tokenizer.json with ``tokenizers`` alone. The small
ClapModel has HTSAT's geometry at a small width (as test_attribution_clap) and a 2-layer
text tower of 64 positions (62 tokens); one slow test runs the real RoBERTa-base text
tower of clap-htsat-unfused / larger_clap_general (their text configs are the same).
"""

import json
import shutil
from pathlib import Path

import jax
import numpy as np
import pytest
import torch
from safetensors.numpy import load_file, save_file
from transformers import AutoTokenizer, ClapAudioModelWithProjection, ClapModel, ClapTextConfig

import jaxspeech as js
from jaxspeech.data.reference_checkpoints import write_clap
from jaxspeech.models.clap_text import PRESETS
from jaxspeech.models.clap_text import ClapTextConfig as JsTextConfig
from jaxspeech.roberta_tokenizer import RobertaTokenizer, TokenizerError

pytestmark = pytest.mark.xdist_group("clap_text")

AUDIO = dict(patch_embeds_hidden_size=16, depths=[2, 1, 1], num_attention_heads=[2, 2, 4],
             hidden_size=64, patch_size=8, patch_stride=[8, 8], window_size=8)
TOL = 1e-4  # DESIGN's bound: max |diff| relative to max |reference|, float32

TEXTS = ["a dog barking", "rain on a roof", "  the dog, in the rain!  ", "Ünïcode dög 🐕 and\nnew lines",
         "the roof " * 12]


def rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / np.abs(b).max())


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("clap_text") / "clap"
    write_clap(path, AUDIO, text_tower=True, seed=11)
    return path


@pytest.fixture(scope="module")
def model(folder):
    return js.load(folder)


@pytest.fixture(scope="module")
def hf(folder):
    return ClapModel.from_pretrained(folder).eval(), AutoTokenizer.from_pretrained(folder)


def hf_text_features(clap, tok, texts, **kw):
    batch = tok(texts, padding=True, truncation=True, return_tensors="pt", **kw)
    with torch.no_grad():
        return clap.get_text_features(**batch).numpy(), batch


# --- the tokenizer ------------------------------------------------------------------------------

def test_tokenizer_json_gives_transformers_ids(folder, hf):
    """jaxspeech's reader of tokenizer.json and transformers' RobertaTokenizerFast of the same
    folder give the same ids and masks: padding, unicode, repeated spaces, newlines, and
    truncation at model_max_length (62 = 64 positions - padding_idx - 1) keeping </s>."""
    _, tok = hf
    assert type(tok).__name__ == "RobertaTokenizerFast" and tok.model_max_length == 62
    ours = RobertaTokenizer.from_folder(folder)
    long_text = "a dog barking " * 30  # ~100 tokens
    with pytest.warns(UserWarning, match="truncated to 62"):
        got = ours.encode(TEXTS + [long_text])
    ref = tok(TEXTS + [long_text], padding=True, truncation=True, return_tensors="np")
    width = ref["input_ids"].shape[1]
    assert width == 62 and got.input_ids.shape == (6, 62)  # the longest, cut at the limit
    np.testing.assert_array_equal(got.input_ids, ref["input_ids"])
    np.testing.assert_array_equal(got.attention_mask, ref["attention_mask"])
    assert got.truncated.tolist() == [False] * 5 + [True]
    assert got.input_ids[5, -1] == ours.eos_id and got.input_ids[0, 0] == ours.bos_id


def test_tokens_merge_into_the_texts_words(folder):
    """Each token belongs to the whitespace word its characters come from: byte-level BPE
    splits "barking" into several tokens and a lone "Ġ" may stand before a word."""
    tokens = RobertaTokenizer.from_folder(folder).encode(TEXTS[:4])
    assert tokens.words[0] == ("a", "dog", "barking")
    assert tokens.words[2] == ("the", "dog,", "in", "the", "rain!")
    assert tokens.words[3] == ("Ünïcode", "dög", "🐕", "and", "new", "lines")
    for n in range(4):
        index, k = tokens.word_index[n], tokens.lengths[n]
        assert index[0] == -1 and index[k - 1] == -1 and (index[k:] == -1).all()  # <s>, </s>, pad
        inner = index[1:k - 1]
        assert (np.diff(inner) >= 0).all() and set(inner) == set(range(len(tokens.words[n])))
    barking = [t for t, w in zip(tokens.tokens[0], tokens.word_index[0], strict=False) if w == 2]
    assert barking == ["Ġbar", "k", "ing"]


# --- the tower ----------------------------------------------------------------------------------

def test_configs_read_from_the_folders(model):
    assert model.text.config == JsTextConfig(vocab_size=model.text.tokenizer.vocab_size,
                                             hidden_size=32, num_hidden_layers=2,
                                             num_attention_heads=2, intermediate_size=48,
                                             max_position_embeddings=64)
    assert model.text.max_length == 62
    # clap-htsat-unfused and larger_clap_general: ClapConfig's default text config,
    # RoBERTa-base sizes, which are ClapTextConfig's defaults and the presets'
    hub_like = {"model_type": "clap", "projection_dim": 512,
                "text_config": ClapTextConfig().to_dict()}
    assert JsTextConfig.from_hf_config(hub_like) == JsTextConfig()
    for name in ("clap-htsat-unfused", "larger-clap-general"):
        assert PRESETS[name] == JsTextConfig() and PRESETS[name].max_length == 512
    assert model.text.logit_scale_t == model.extras["logit_scale_t"]


def test_text_embeddings_match_get_text_features(model, hf):
    """Padding (texts of 5 to 38 tokens in one batch), RoBERTa's position ids, the pooler,
    projection and normalisation: ClapModel.get_text_features on the same folder."""
    clap, tok = hf
    ref, batch = hf_text_features(clap, tok, TEXTS)
    ours = js.clap_text_embeddings(model, TEXTS)
    err = rel(ours, ref)
    print(f"small text tower vs transformers: {err:.2e} ({batch['input_ids'].shape[1]} tokens)")
    assert ours.shape == (5, 512) and err < TOL  # measured 3e-7
    # alone or padded into a longer batch: the same embedding (padded keys get no attention)
    alone = js.clap_text_embeddings(model, TEXTS[:1])
    np.testing.assert_allclose(alone[0], ours[0], rtol=0, atol=1e-6)  # |e| <= 1: rounding
    # a folder gives the same as the loaded model
    np.testing.assert_array_equal(js.clap_text_embeddings(model.source, TEXTS), ours)


def test_truncation_at_the_maximum_length(model, hf):
    """A text longer than 62 tokens is cut as transformers' truncation=True cuts it, with a
    warning, and embeds as transformers embeds the cut text."""
    clap, tok = hf
    long_text = "rain on the roof " * 20
    ref, batch = hf_text_features(clap, tok, [long_text, "a dog"])
    assert batch["input_ids"].shape[1] == 62
    with pytest.warns(UserWarning, match="truncated"):
        ours = js.clap_text_embeddings(model, [long_text, "a dog"])
    assert rel(ours, ref) < TOL


def test_zero_shot_equals_logits_per_audio_softmax(model, hf):
    """js.zero_shot on waveforms = ClapModel(...).logits_per_audio.softmax(-1) on the same
    features, label strings embedded by the JAX text tower; also with the embeddings given."""
    clap, tok = hf
    rng = np.random.default_rng(5)
    wave = (0.1 * rng.standard_normal((2, 3 * 48000))).astype(np.float32)
    labels = ["a dog", "rain on a roof", "the dog in the rain"]
    feats = np.asarray(model.features(wave))
    with torch.no_grad():
        out = clap(**tok(labels, padding=True, return_tensors="pt"),
                   input_features=torch.from_numpy(feats.copy()))
    ref = out.logits_per_audio.softmax(-1).numpy()
    probs = np.asarray(js.zero_shot(model, wave, labels))
    print(f"zero-shot vs transformers: {np.abs(probs - ref).max():.2e}")
    assert probs.shape == (2, 3) and np.abs(probs - ref).max() < TOL  # probabilities <= 1
    assert not np.allclose(ref, ref[:, ::-1], atol=1e-3)  # the labels are told apart
    again = js.zero_shot(model, wave, js.clap_text_embeddings(model, labels))
    np.testing.assert_allclose(np.asarray(again), probs, atol=1e-6)
    target = js.targets.text_similarity(labels, index=1, model=model)
    np.testing.assert_allclose(target.args["text"], out.text_embeds.numpy(), atol=1e-5)


@pytest.mark.slow
def test_full_size_text_tower_matches_transformers(tmp_path):
    """The real RoBERTa-base text tower of clap-htsat-unfused and larger_clap_general (768
    wide, 12 layers, 50265 tokens, 514 positions, projection 512) on random weights: a batch
    padded from 6 tokens to the 512-token limit, one text truncated there. The bound is
    DESIGN's 1e-4; transformers' own float32 error (vs itself in float64) is printed beside
    it: the port's error is of that size."""
    folder = tmp_path / "full"
    write_clap(folder, AUDIO, text_tower=True, text={}, seed=12)
    m = js.load(folder)
    assert m.text.config == JsTextConfig() and m.text.max_length == 512
    clap, tok = ClapModel.from_pretrained(folder).eval(), AutoTokenizer.from_pretrained(folder)
    texts = ["a dog barking", "the roof in the rain " * 150, TEXTS[3]]  # 2nd: ~600 tokens
    ref, batch = hf_text_features(clap, tok, texts)
    assert batch["input_ids"].shape[1] == 512
    with pytest.warns(UserWarning, match="truncated to 512"):
        ours = js.clap_text_embeddings(m, texts)
    with torch.no_grad():
        ref64 = clap.double().get_text_features(**batch).numpy()
    ours_err, ref_err = rel(ours, ref64), rel(ref, ref64)
    print(f"full-size text tower vs float64 transformers: jaxspeech {ours_err:.2e}, "
          f"transformers float32 {ref_err:.2e}; vs float32 transformers {rel(ours, ref):.2e}")
    assert rel(ours, ref) < TOL and ours_err < TOL


# --- checkpoints -----------------------------------------------------------------------------

def test_save_and_load_keep_the_text_tower(model, tmp_path):
    path = model.save(tmp_path / "saved")
    assert (Path(path) / "tokenizer.json").is_file() and (Path(path) / "text_params").is_dir()
    back = js.load(path)
    assert back.text.config == model.text.config
    assert back.text.logit_scale_t == model.text.logit_scale_t
    assert back.text.max_length == model.text.max_length
    assert "tokenizer_json" not in back.extras  # the RoBERTa tokenizer belongs to the tower
    for a, b in zip(jax.tree.leaves(model.text.params), jax.tree.leaves(back.text.params),
                    strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    np.testing.assert_array_equal(js.clap_text_embeddings(back, TEXTS),
                                  js.clap_text_embeddings(model, TEXTS))
    # and the audio side as before
    assert back.extras["logit_scale_a"] == model.extras["logit_scale_a"]


def test_a_transformers_5_folder_loads_the_same(model, folder, tmp_path):
    """transformers 5 saves no position_ids / token_type_ids buffers: the same weights
    without them load to the same tower. A missing or extra text tensor is named."""
    v5 = tmp_path / "v5"
    shutil.copytree(folder, v5)
    state = load_file(str(v5 / "model.safetensors"))
    assert "text_model.embeddings.position_ids" in state  # transformers 4 wrote it
    for key in ("text_model.embeddings.position_ids", "text_model.embeddings.token_type_ids"):
        del state[key]
    save_file(state, str(v5 / "model.safetensors"), metadata={"format": "pt"})
    np.testing.assert_array_equal(js.clap_text_embeddings(js.load(v5), TEXTS),
                                  js.clap_text_embeddings(model, TEXTS))
    del state["text_model.encoder.layer.1.attention.self.key.weight"]
    state["text_model.encoder.layer.9.output.dense.weight"] = np.zeros((2, 2), np.float32)
    save_file(state, str(v5 / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(js.CheckpointError) as err:
        js.load(v5)
    assert "text_model.encoder.layer.1.attention.self.key.weight" in str(err.value)
    assert "text_model.encoder.layer.9.output.dense.weight" in str(err.value)


# --- clear errors ----------------------------------------------------------------------------

def test_empty_and_non_string_texts_are_refused(model):
    with pytest.raises(ValueError, match="text 1 is empty"):
        js.clap_text_embeddings(model, ["a dog", "  "])
    with pytest.raises(ValueError, match="no texts"):
        js.clap_text_embeddings(model, [])
    with pytest.raises(TypeError, match="text 0 is a int"):
        js.clap_text_embeddings(model, [3])
    with pytest.raises(ValueError, match="model="):
        js.targets.text_similarity(["a dog"])


def test_a_folder_without_a_tokenizer_says_so(tmp_path):
    path = tmp_path / "no_tokenizer"
    write_clap(path, AUDIO, text_tower=True, tokenizer=False, seed=13)
    m = js.load(path)  # the audio tower and the text weights load
    assert m.text is not None and m.text.tokenizer is None
    with pytest.raises(TokenizerError, match="no tokenizer.json.*save CLAP's tokenizer"):
        js.clap_text_embeddings(m, ["a dog"])
    with pytest.raises(ValueError, match="tokenizer.json"):
        js.zero_shot(m, np.zeros(48000, np.float32), ["a dog"])
    (path / "vocab.json").write_text(json.dumps({"<s>": 0}))  # a slow tokenizer's files only
    with pytest.raises(TokenizerError, match="vocab.json / merges.txt"):
        RobertaTokenizer.from_folder(path)


def test_an_audio_only_checkpoint_asked_for_text(model, folder, tmp_path):
    path = tmp_path / "tower"
    audio = ClapAudioModelWithProjection(ClapModel.from_pretrained(folder).config.audio_config)
    audio.save_pretrained(path)
    m = js.load(path)
    assert m.text is None
    for call in (lambda: js.clap_text_embeddings(m, ["a dog"]),
                 lambda: js.zero_shot(m, np.zeros(48000, np.float32), ["a dog"], logit_scale=10.0),
                 lambda: js.targets.text_similarity(["a dog"], model=m),
                 lambda: js.attribute_match(m, np.zeros(48000, np.float32), ["a dog"])):
        with pytest.raises(ValueError, match="no text tower.*ClapModel"):
            call()
    # a text tower from another folder still serves it
    p = js.zero_shot(m, np.zeros(48000, np.float32), ["a dog", "rain"], checkpoint_dir=folder,
                     logit_scale=10.0)
    assert p.shape == (1, 2)
