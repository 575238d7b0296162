"""CTranslate2 (faster-whisper) Whisper folders: the model.bin reader, the WhisperSpec
mapping for every stored dtype, the split layout, the refusals, and parity with
transformers and with CTranslate2's own engine, on random weights converted by
CTranslate2's converter and on the real tiny.en and base packages."""

import json
import os
import struct

import numpy as np
import pytest
import torch

import jaxspeech as js
from jaxspeech.assets import speech_clips, whisper_folder
from jaxspeech.cli import main
from jaxspeech.compare import FACTOR, TOLERANCE
from jaxspeech.convert import ctranslate2 as ct
from jaxspeech.convert.common import CheckpointError, default_torch_key, flatten, to_flax
from jaxspeech.data.reference_checkpoints import write_whisper
from jaxspeech.models.whisper import sinusoids

DTYPES = ["float32", "float16", "bfloat16", "int8", "int16"]
# The random model: d 64, 2 encoder layers, 4 heads, a 2 s window (100 positions), and
# write_whisper's one decoder layer over 64 tokens: 40 text tokens, Whisper's special
# tokens, and the timestamps CTranslate2's converter adds up to the vocabulary size.
D, HEADS, POSITIONS = 64, 4, 100
SPECIAL = ["<|endoftext|>", "<|startoftranscript|>", "<|en|>", "<|de|>", "<|translate|>",
           "<|transcribe|>", "<|startoflm|>", "<|startofprev|>", "<|nocaptions|>",
           "<|notimestamps|>"]
N_TEXT = 40


def rel_diff(ours, ref) -> float:
    """The parity measure of DESIGN.md: max |diff| / max |reference|."""
    ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
    return float(np.abs(ours - ref).max() / np.abs(ref).max())


def save_tokenizer(folder):
    """A word-level tokenizer.json with Whisper's special tokens, saved as transformers does
    (CTranslate2's converter reads the vocabulary through AutoTokenizer)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {f"w{i}": i for i in range(N_TEXT)}
    vocab.update({t: N_TEXT + i for i, t in enumerate(SPECIAL)})
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<|endoftext|>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, additional_special_tokens=SPECIAL) \
        .save_pretrained(folder)


@pytest.fixture(scope="module")
def random_hf(tmp_path_factory):
    """``(folder, torch model)``: a random HF WhisperForConditionalGeneration folder with a
    tokenizer; biases and norms perturbed so that each one matters."""
    folder = tmp_path_factory.mktemp("hf")
    model = write_whisper(folder, (D, 2, HEADS), max_source_positions=POSITIONS, perturb=0.1,
                          conditional=True)
    save_tokenizer(folder)
    return folder, model


@pytest.fixture(scope="module")
def ct2_folders(random_hf, tmp_path_factory):
    """dtype -> the random model converted by CTranslate2's own converter, as
    faster-whisper's folders are (tokenizer.json copied along)."""
    import ctranslate2

    root = tmp_path_factory.mktemp("ct2")
    out = {}
    for dtype in DTYPES:
        converter = ctranslate2.converters.TransformersConverter(
            str(random_hf[0]), copy_files=["tokenizer.json"])
        out[dtype] = converter.convert(str(root / dtype), quantization=dtype)
    return out


@pytest.fixture(scope="module")
def features():
    """Two 2 s clips through transformers' extractor (the reference's front end)."""
    from transformers import WhisperFeatureExtractor

    rng = np.random.default_rng(0)
    wave = 0.1 * rng.standard_normal((2, 2 * 16000)).astype(np.float32)
    extractor = WhisperFeatureExtractor(feature_size=80, chunk_length=2)
    return extractor(list(wave), sampling_rate=16000, return_tensors="np")["input_features"]


def hf_name(path: tuple[str, ...]) -> str:
    """jaxspeech param path -> the transformers WhisperForConditionalGeneration name, written
    here from transformers' own names (not the loader's table)."""
    side, path = ("decoder", path[1:]) if path[0] == "decoder" else ("encoder", path)
    if path[0] in ("embed_positions", "embed_tokens"):
        return f"model.{side}.{path[0]}.weight"
    return f"model.{side}.{default_torch_key(path)}"


def torch_state(hf_model) -> dict[str, np.ndarray]:
    return {k: v.detach().numpy() for k, v in hf_model.state_dict().items()}


# --- each dtype, against the weights it was converted from ----------------------------------

def fused_with(path: tuple[str, ...]) -> list[tuple[str, ...]]:
    """The params CTranslate2 stores in one tensor with ``path``: self-attention's [q; k; v]
    and cross-attention's [k; v] (``path`` alone otherwise)."""
    *module, attn, proj, leaf = path if len(path) >= 3 else (None, None, *path)
    if attn == "self_attn" and proj in ("q_proj", "k_proj", "v_proj"):
        return [(*module, attn, p, leaf) for p in ("q_proj", "k_proj", "v_proj")]
    if attn == "encoder_attn" and proj in ("k_proj", "v_proj"):
        return [(*module, attn, p, leaf) for p in ("k_proj", "v_proj")]
    return [path]


def weight_bound(dtype: str, leaf: str, ref_torch: np.ndarray, tensor_max: float) -> np.ndarray:
    """How far a stored-and-read weight may be from the float32 original, in PyTorch layout;
    ``tensor_max`` is max |w| over the CT2 tensor it was stored in (fused q/k/v included).

    float16 / bfloat16: round to nearest, so 2^-11 / 2^-8 of |w| (unit roundoff), plus half
    the smallest subnormal spacing below float16's normal range (2^-25). int8: CTranslate2
    multiplies each output row by scale = 127 / max|row| and rounds, so half a step,
    max|row| / 254; int16: one scale 2^10 / max|w| per tensor, half a step max|w| / 2048. The
    0.501 allows float32's rounding of w * scale (< 127 * 2^-24 of a step). Only kernels and
    the token embedding are quantised; biases, norms and position tables stay float32.
    """
    quantised = leaf in ("kernel", "embedding")
    if dtype == "float32" or (dtype in ("int8", "int16") and not quantised):
        return np.zeros_like(ref_torch)
    if dtype == "float16":
        return 2.0**-11 * np.abs(ref_torch) + 2.0**-25
    if dtype == "bfloat16":
        return 2.0**-8 * np.abs(ref_torch)
    if dtype == "int8":
        rows = np.abs(ref_torch).reshape(len(ref_torch), -1).max(axis=1)
        return np.broadcast_to((0.501 * rows / 127).reshape((-1,) + (1,) * (ref_torch.ndim - 1)),
                               ref_torch.shape)
    return np.full_like(ref_torch, 0.501 * tensor_max / 2**10)


@pytest.mark.parametrize("dtype", DTYPES)
def test_every_param_is_the_converted_weight_within_its_dtype(dtype, random_hf, ct2_folders):
    model = js.load(ct2_folders[dtype])
    state = torch_state(random_hf[1])
    flat = flatten(model.params)
    assert flat, "no params"
    for path, ours in flat.items():
        ref = state[hf_name(path)]
        tensor_max = max(np.abs(state[hf_name(p)]).max() for p in fused_with(path)
                         if hf_name(p) in state)  # k has no bias
        bound = to_flax(path[-1], weight_bound(dtype, path[-1], ref, tensor_max))
        err = np.abs(np.asarray(ours, np.float64) - to_flax(path[-1], ref))
        assert np.all(err <= bound), (path, float(err.max()), float(bound.max()))
    # every tensor of the checkpoint became a param: encoder, decoder, the tied projection
    used = {hf_name(p) for p in flat} | {"proj_out.weight"}
    assert used == set(state)
    assert model.extras["format"] == "ctranslate2"


def test_the_projection_is_stored_once_as_an_alias(ct2_folders):
    mb = ct.read_model_bin(ct2_folders["int8"] + "/model.bin")
    assert mb.aliases == {"decoder/projection/weight": "decoder/embeddings/weight"}
    assert mb.variables["decoder/embeddings/weight"].dtype == np.int8
    assert "decoder/embeddings/weight_scale" in mb.variables
    tensors, _ = ct.dequantize(mb)  # the alias takes its target's scale too
    np.testing.assert_array_equal(tensors["decoder/projection/weight"],
                                  tensors["decoder/embeddings/weight"])


def test_config_and_generation_metadata_come_from_the_folder(ct2_folders):
    m = js.load(ct2_folders["float16"])
    c = m.config
    assert (c.n_mels, c.d_model, c.encoder_layers, c.encoder_attention_heads, c.encoder_ffn_dim,
            c.max_source_positions) == (80, D, 2, HEADS, 4 * D, POSITIONS)
    assert (c.vocab_size, c.decoder_layers, c.decoder_attention_heads, c.decoder_ffn_dim,
            c.max_target_positions) == (64, 1, HEADS, 4 * D, 448)
    g = m.extras["generation"]
    ids = {t: N_TEXT + i for i, t in enumerate(SPECIAL)}
    assert g["decoder_start_token_id"] == ids["<|startoftranscript|>"]
    assert g["eos_token_id"] == ids["<|endoftext|>"]
    assert g["no_timestamps_token_id"] == ids["<|notimestamps|>"]
    assert g["task_to_id"] == {"transcribe": ids["<|transcribe|>"],
                               "translate": ids["<|translate|>"]}
    # a 64-token vocabulary is not multilingual (openai: vocab >= 51865)
    assert g["is_multilingual"] is False and g["lang_to_id"] == {}
    ct2_config = json.loads(open(ct2_folders["float16"] + "/config.json").read())
    assert g["alignment_heads"] == ct2_config["alignment_heads"]
    assert g["begin_suppress_tokens"] == ct2_config["suppress_ids_begin"]
    assert m.extras["tokenizer_json"] == open(ct2_folders["float16"] + "/tokenizer.json").read()
    json.dumps(g)  # JSON-able, as the spec asks


# --- forward parity on random weights -------------------------------------------------------

def test_encoder_and_decoder_match_transformers(random_hf, ct2_folders, features):
    """float32 holds the torch weights exactly, so the whole model must agree with
    transformers to DESIGN.md's float32 tolerance."""
    hf_model = random_hf[1]
    m = js.load(ct2_folders["float32"])
    tokens = np.array([[41, 49, 3, 5, 7, 9], [41, 49, 10, 11, 12, 13]], np.int32)
    with torch.no_grad():
        ref_enc = hf_model.model.encoder(torch.from_numpy(features)).last_hidden_state.numpy()
        ref_logits = hf_model(input_features=torch.from_numpy(features),
                              decoder_input_ids=torch.from_numpy(tokens.astype(np.int64))).logits
    assert rel_diff(m.apply(m.params, features), ref_enc) <= TOLERANCE
    assert rel_diff(m.apply(m.params, features, tokens=tokens), ref_logits.numpy()) <= TOLERANCE


def text_tokens(gen: dict) -> np.ndarray:
    """Two teacher-forcing rows: the task prompt (start, no timestamps), text tokens, the end
    token, padded with it (as compare pads the reference's sequences)."""
    sot, no_ts, eos = (gen[k] for k in ("decoder_start_token_id", "no_timestamps_token_id",
                                        "eos_token_id"))
    return np.array([[sot, no_ts, 3, 5, 7, 9, eos, eos], [sot, no_ts, 10, 11, 12, eos, eos, eos]],
                    np.int32)


def scored(ref_logits: np.ndarray) -> np.ndarray:
    """The positions CTranslate2's engine scores: from <|notimestamps|> on (NaN before)."""
    rows = ~np.isnan(ref_logits).any(axis=-1)
    assert rows.any(axis=1).all()
    return rows


@pytest.mark.parametrize("dtype", DTYPES)
def test_every_dtype_matches_the_ctranslate2_engine(dtype, ct2_folders, features):
    """Both run float32 arithmetic on the same dequantised weights (the engine is asked for
    float32), so DESIGN.md's float32 tolerance applies to every stored dtype."""
    m = js.load(ct2_folders[dtype])
    _, model_fn, _ = ct.reference(ct2_folders[dtype])
    assert rel_diff(m.apply(m.params, features), model_fn(features)) <= TOLERANCE
    tokens = text_tokens(m.extras["generation"])
    ref = model_fn(features, tokens=tokens)
    rows = scored(ref)
    assert not rows[:, 0].any() and rows[:, 1:].all()  # all but the start token's position
    assert rel_diff(np.asarray(m.apply(m.params, features, tokens=tokens))[rows], ref[rows]) \
        <= TOLERANCE


def test_engine_scores_only_after_the_task_prompt(ct2_folders, features):
    m = js.load(ct2_folders["float32"])
    gen = m.extras["generation"]
    _, model_fn, _ = ct.reference(ct2_folders["float32"])
    with pytest.raises(ValueError, match="only after <.notimestamps.>"):
        model_fn(features, tokens=np.array([[gen["decoder_start_token_id"], 3, 5]] * 2))


def test_reference_features_are_the_models_window(ct2_folders, features):
    rng = np.random.default_rng(0)
    wave = 0.1 * rng.standard_normal((2, 2 * 16000)).astype(np.float32)
    ref_features, kwargs = ct.reference(ct2_folders["float32"])[0](wave)
    np.testing.assert_array_equal(ref_features, features)
    assert kwargs == {}


def test_128_mel_model_takes_its_mel_count_from_conv1(tmp_path):
    import ctranslate2

    write_whisper(tmp_path / "hf", (D, 1, HEADS), n_mels=128, max_source_positions=POSITIONS,
                  perturb=0.1, conditional=True)
    save_tokenizer(tmp_path / "hf")
    out = ctranslate2.converters.TransformersConverter(
        str(tmp_path / "hf"), copy_files=["tokenizer.json"]).convert(str(tmp_path / "ct2"),
                                                                      quantization="float16")
    m = js.load(out)
    assert m.config.n_mels == 128
    features_fn, model_fn, _ = ct.reference(out)
    x, _ = features_fn(0.1 * np.random.default_rng(1).standard_normal((1, 16000)))
    assert x.shape == (1, 128, 2 * POSITIONS)
    assert rel_diff(m.apply(m.params, x), model_fn(x)) <= TOLERANCE


# --- folders, the registry, the CLI ---------------------------------------------------------

def split(folder, out, cuts):
    """``folder`` with its model.bin cut at byte offsets ``cuts`` into part1, part2, ..."""
    out.mkdir()
    data = open(f"{folder}/model.bin", "rb").read()
    bounds = [0, *cuts, len(data)]
    for i in range(len(bounds) - 1):
        (out / f"model.bin.part{i + 1}").write_bytes(data[bounds[i]:bounds[i + 1]])
    for name in ("config.json", "tokenizer.json", "vocabulary.json"):
        (out / name).write_bytes(open(f"{folder}/{name}", "rb").read())
    return out


def test_split_model_bin_reads_as_one_stream(ct2_folders, tmp_path, features):
    whole = js.load(ct2_folders["float16"])
    mb = ct.read_model_bin(ct2_folders["float16"] + "/model.bin")
    # cut inside the header, inside a variable's data, and one byte before the end
    inside = mb.offsets["encoder/conv2/weight"] + 7
    parts = split(ct2_folders["float16"], tmp_path / "parts", [5, inside, os.path.getsize(mb.source) - 1])
    assert ct.detect(str(parts))
    loaded = js.load(parts)
    for path, value in flatten(whole.params).items():
        np.testing.assert_array_equal(flatten(loaded.params)[path], value)
    # the engine needs one model.bin: reference() joins the parts in a temporary folder
    assert rel_diff(loaded.apply(loaded.params, features),
                    ct.reference(str(parts))[1](features)) <= TOLERANCE
    (parts / "model.bin.part3").unlink()
    with pytest.raises(CheckpointError, match=r"parts \[1, 2, 4\]"):
        js.load(parts)


def test_load_and_cli_convert_take_a_ctranslate2_folder(ct2_folders, tmp_path, capsys):
    m = js.load(ct2_folders["int8"])
    assert main(["convert", ct2_folders["int8"], str(tmp_path / "out")]) == 0
    assert "converted" in capsys.readouterr().out
    back = js.load(tmp_path / "out")
    assert back.config == m.config
    for path, value in flatten(m.params).items():
        np.testing.assert_array_equal(flatten(back.params)[path], value)


def test_folder_that_is_no_checkpoint_lists_the_ctranslate2_format(tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(CheckpointError, match="CTranslate2"):
        js.load(tmp_path)


# --- refusals -------------------------------------------------------------------------------

def patched(folder, out, edit):
    """A copy of the CT2 ``folder`` whose model.bin bytes went through ``edit(bytearray,
    ModelBin)``."""
    mb = ct.read_model_bin(f"{folder}/model.bin")
    data = bytearray(open(f"{folder}/model.bin", "rb").read())
    edit(data, mb)
    out.mkdir()
    (out / "model.bin").write_bytes(bytes(data))
    for name in ("config.json", "tokenizer.json", "vocabulary.json"):
        (out / name).write_bytes(open(f"{folder}/{name}", "rb").read())
    return out


def rename(old: str, new: str):
    assert len(old) == len(new)

    def edit(data, mb):
        at = data.index(old.encode() + b"\0")
        data[at:at + len(old)] = new.encode()
    return edit


def set_scalar(name: str, value: int):
    def edit(data, mb):
        data[mb.offsets[name]] = value
    return edit


def nonzero_k_bias(data, mb):
    # the fused [q; k; v] bias: the first k entry (float32) becomes 0.5
    at = mb.offsets["encoder/layer_1/self_attention/linear_0/bias"] + D * 4
    data[at:at + 4] = struct.pack("<f", 0.5)


def nonzero_cross_k_bias(data, mb):
    at = mb.offsets["decoder/layer_0/attention/linear_1/bias"] + 4 * 3
    data[at:at + 4] = struct.pack("<f", -2.0)


def wrong_size(data, mb):
    at = mb.offsets["encoder/conv1/bias"] - 4  # the uint32 byte count before the data
    data[at:at + 4] = struct.pack("<I", 4 * D + 4)


def wrong_dtype(data, mb):
    data[mb.offsets["encoder/conv1/bias"] - 5] = 9


REFUSALS = {
    "truncated": (lambda data, mb: data.__delitem__(slice(len(data) // 2, None)),
                  r"truncated: .* needs \d+ bytes at byte \d+, only \d+ left"),
    # 22 header bytes before the data of 'decoder/alibi' (variable 1): cut 5 bytes into them,
    # inside its name
    "cut in a name": (lambda data, mb: data.__delitem__(slice(mb.offsets["decoder/alibi"] - 17,
                                                              None)),
                      r"truncated: the name of variable 1 needs 14 bytes at byte \d+, only 3 left"),
    "binary version": (lambda data, mb: data.__setitem__(slice(0, 4), struct.pack("<I", 7)),
                       "binary version 6 .read 7 at byte 0"),
    "spec revision": (lambda data, mb: data.__setitem__(
        slice(4 + 2 + len("WhisperSpec") + 1, 4 + 2 + len("WhisperSpec") + 5),
        struct.pack("<I", 2)), "WhisperSpec revision 2"),
    "bytes after the aliases": (lambda data, mb: data.extend(b"\0\0\0"),
                                "3 unexpected bytes after the aliases"),
    "size that does not add up": (wrong_size, "'encoder/conv1/bias' at byte \\d+ says 260 bytes, "
                                              "but its shape \\[64\\] of float32 needs 256"),
    "unknown dtype": (wrong_dtype, "'encoder/conv1/bias' at byte \\d+ has dtype id 9"),
    "unknown variable": (rename("encoder/layer_norm/beta", "encoder/layer_norm/bota"),
                         "(?s)missing variable.*encoder/layer_norm/beta.*unknown variable.*"
                         "encoder/layer_norm/bota"),
    "unknown scalar": (rename("decoder/scale_alibi", "decoder/scale_alibo"),
                       "unknown WhisperSpec scalar.*decoder/scale_alibo"),
    "activation other than GELU": (set_scalar("decoder/activation", 1),
                                   "decoder/activation = 1 .the feed-forward activation"),
    "scale_embeddings set": (set_scalar("decoder/scale_embeddings", 1),
                             r"decoder/scale_embeddings = 1 .token embeddings multiplied"),
    "pre_norm false": (set_scalar("decoder/pre_norm", 0), "decoder/pre_norm = 0"),
    "non-zero self-attention k bias": (nonzero_k_bias,
                                       "encoder/layer_1/self_attention/linear_0/bias holds a "
                                       "non-zero k bias .max .b. 0.5"),
    "non-zero cross-attention k bias": (nonzero_cross_k_bias,
                                        "decoder/layer_0/attention/linear_1/bias holds a non-zero "
                                        "k bias .max .b. 2"),
}


@pytest.mark.parametrize("case", list(REFUSALS))
def test_bad_model_bin_is_refused_saying_what_and_where(case, ct2_folders, tmp_path):
    edit, message = REFUSALS[case]
    folder = patched(ct2_folders["float32"], tmp_path / "bad", edit)
    with pytest.raises(CheckpointError, match=message):
        js.load(folder)


def ct2_string(text: str) -> bytes:
    return struct.pack("<H", len(text) + 1) + text.encode() + b"\0"


def untie_projection(data, mb):
    # rewrite the alias table (after the last variable's data): the projection now names
    # another [64, 64] tensor instead of the token embedding
    end = max(mb.offsets[n] + mb.variables[n].nbytes for n in mb.variables)
    data[end:] = struct.pack("<I", 1) + ct2_string("decoder/projection/weight") + \
        ct2_string("decoder/layer_0/self_attention/linear_1/weight")


def test_untied_projection_is_refused(ct2_folders, tmp_path):
    folder = patched(ct2_folders["float32"], tmp_path / "untied", untie_projection)
    with pytest.raises(CheckpointError, match="projection/weight differs from decoder/embeddings"):
        js.load(folder)


def test_a_ctranslate2_model_of_another_spec_is_refused_by_name(tmp_path):
    import ctranslate2
    from transformers import GPT2Config, GPT2LMHeadModel

    GPT2LMHeadModel(GPT2Config(vocab_size=50, n_embd=16, n_layer=1, n_head=2,
                               n_positions=32)).save_pretrained(tmp_path / "gpt2")
    save_tokenizer(tmp_path / "gpt2")
    out = ctranslate2.converters.TransformersConverter(str(tmp_path / "gpt2")).convert(
        str(tmp_path / "gpt2-ct2"))
    with pytest.raises(CheckpointError, match="a CTranslate2 'TransformerDecoderSpec' model; "
                                              "jaxspeech reads WhisperSpec models only"):
        js.load(out)


# --- the real packages: OpenAI's tiny.en and base, float16 ----------------------------------

def transformers_greedy(model, features, max_new_tokens: int) -> list[list[int]]:
    """transformers' greedy ``generate`` in float64 on jaxspeech's weights, each sequence from
    its start token through <|endoftext|> when reached. The task is given: without it
    transformers detects the language but leaves out <|transcribe|>."""
    from jaxspeech.convert.whisper import hf_torch_model

    gen = model.extras["generation"]
    hf = hf_torch_model(model.params, model.config, gen).double()
    task = {"task": "transcribe"} if gen["is_multilingual"] else {}
    with torch.no_grad():
        out = hf.generate(input_features=torch.from_numpy(np.asarray(features, np.float64)),
                          max_new_tokens=max_new_tokens, do_sample=False, num_beams=1,
                          return_timestamps=False, return_dict_in_generate=True, **task)
    eos = gen["eos_token_id"]
    return [row[:row.index(eos) + 1] if eos in row else row for row in out.sequences.tolist()]


REAL = {  # d_model, encoder + decoder layers, heads, vocab, multilingual
    "tiny.en": (384, 4, 6, 51864, False),
    "base": (512, 6, 8, 51865, True),
}


@pytest.mark.slow
@pytest.mark.parametrize("name", list(REAL))
def test_real_weights_load_and_match_ctranslate2(name, tmp_path):
    path = str(whisper_folder(name, cache=tmp_path))  # base: its two packages linked together
    if name == "base":
        assert [os.path.basename(p) for p in ct.model_bin_parts(path)] == \
            ["model.bin.part1", "model.bin.part2"]
    m = js.load(path)
    d, n_layers, heads, vocab, multilingual = REAL[name]
    c = m.config
    assert (c.d_model, c.encoder_layers, c.decoder_layers, c.encoder_attention_heads,
            c.decoder_attention_heads, c.vocab_size, c.n_mels) == \
        (d, n_layers, n_layers, heads, heads, vocab, 80)
    g = m.extras["generation"]
    assert g["is_multilingual"] is multilingual
    if multilingual:
        assert g["lang_to_id"]["<|en|>"] == 50259 and len(g["lang_to_id"]) == 99
        assert g["task_to_id"] == {"transcribe": 50359, "translate": 50358}
    else:  # its config.json's lang_ids are the multilingual ids, meaningless in .en
        assert g["lang_to_id"] == {}

    # the sinusoids are used as stored (float16, so not the exact table)
    mb = ct.read_model_bin(ct.model_bin_parts(path))
    stored = mb.variables["encoder/position_encodings/encodings"]
    np.testing.assert_array_equal(m.params["embed_positions"], stored.astype(np.float32))
    assert np.abs(stored - sinusoids(1500, d)).max() > 1e-4

    # two espeak-ng sentences; both engines and the float64 yardstick on the same features
    wave = [clip.read() for clip in speech_clips() if clip.words is None][:2]
    engine32, engine64 = ct.reference(path), ct.reference(path, "float64")
    x, _ = engine32[0](np.stack([np.pad(w, (0, max(map(len, wave)) - len(w))) for w in wave]))

    def check(stage, ours, ref32, ref64):
        # Mapping: a misplaced weight moves outputs by O(1). Each float32 engine on real
        # weights is up to ~1.7e-4 from float64 (PORTING_NOTES: transformers, a 30 s clip), so
        # two of them stay within 1e-3 of each other (3x their summed error).
        # Precision: jaxspeech's error vs float64 within compare's FACTOR of the engine's own.
        ours_err, ref_err = rel_diff(ours, ref64), rel_diff(ref32, ref64)
        print(f"{name} {stage}: jaxspeech vs ctranslate2 {rel_diff(ours, ref32):.2e}, vs "
              f"float64 {ours_err:.2e}; ctranslate2 vs float64 {ref_err:.2e}")
        assert rel_diff(ours, ref32) <= 1e-3
        assert ours_err <= max(TOLERANCE, FACTOR * ref_err)

    check("encoder", m.apply(m.params, x), engine32[1](x), engine64[1](x))
    # the engine's greedy tokens are transformers' generate (float64, same weights, same
    # features, openai's prompt: start, language and transcribe on a multilingual model)
    sequences = engine32[2](x, 32)
    assert sequences == transformers_greedy(m, x, 32)
    assert all(len(seq) > 6 for seq in sequences), sequences  # whole sentences, not a token
    longest = max(map(len, sequences))
    tokens = np.array([seq + [g["eos_token_id"]] * (longest - len(seq)) for seq in sequences])
    ref32 = engine32[1](x, tokens=tokens)
    rows = scored(ref32)
    check("decoder logits", np.asarray(m.apply(m.params, x, tokens=tokens))[rows], ref32[rows],
          engine64[1](x, tokens=tokens)[rows])
