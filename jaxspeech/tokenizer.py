"""Whisper's tokenizer, read from a checkpoint's ``tokenizer.json`` with the ``tokenizers``
library (no ``transformers`` at run time).

    tok = WhisperTokenizer.from_model(m)         # m.extras["tokenizer_json"], ["generation"]
    tok.encode(" Hello world")                   # [18435, 995]: text tokens, no specials
    tok.decode(ids)                              # text; special tokens and timestamps skipped
    tok.sot_sequence("de", "transcribe")         # [<|startoftranscript|>, <|de|>, <|transcribe|>]
    words, word_tokens = tok.split_to_word_tokens(ids + [tok.eot])

Ids, as in every Whisper vocabulary: the byte-level BPE text tokens come first and end just
before ``<|endoftext|>`` (``eot``), so a token is text exactly when its id is below ``eot``;
then the special tokens (``<|startoftranscript|>``, the languages of a multilingual model,
``<|translate|>``, ``<|transcribe|>``, ... ``<|notimestamps|>``), then the 1501 timestamp
tokens ``<|0.00|>`` .. ``<|30.00|>`` from ``timestamp_begin = no_timestamps + 1`` in steps
of 20 ms. A checkpoint's ``tokenizer.json`` may stop before the timestamps (faster-whisper's
do); they are rendered here from their ids.
"""

from __future__ import annotations

import json
import string
from collections.abc import Mapping, Sequence

__all__ = ["WhisperTokenizer", "TokenizerError", "NO_SPACE_LANGUAGES"]

# Languages written without spaces between words: split_to_word_tokens splits them at every
# point where the tokens so far decode to whole characters (openai-whisper's rule).
NO_SPACE_LANGUAGES = frozenset({"zh", "ja", "th", "lo", "my", "yue"})
TIME_PRECISION = 0.02  # seconds per timestamp token (one encoder frame)
_REPLACEMENT = "\ufffd"  # what a byte-level decode makes of an incomplete UTF-8 sequence


class TokenizerError(ValueError):
    """The model has no usable tokenizer, or a language / task it does not know."""


class WhisperTokenizer:
    """Text <-> token ids of one Whisper checkpoint, and its special ids.

    ``tokenizer_json``: the text of ``tokenizer.json``; ``generation``: the model's
    generation settings (``Model.extras["generation"]``: ``eos_token_id``,
    ``decoder_start_token_id``, ``no_timestamps_token_id``, ``lang_to_id``, ``task_to_id``,
    ``is_multilingual``); ids it lacks are read from the tokenizer's added tokens.
    ``language``: the default language of :meth:`split_to_word_tokens` (a code, ``"en"``).

    A BPE merge missing from the file is restored (``restored_merges`` lists them): a
    Whisper vocabulary is tiktoken's, where every text token from id 256 on is the merge of
    two lower-id tokens and merges apply in id order. faster-whisper's multilingual
    ``tokenizer.json`` (the base package) lacks the very first, ``"Ġ t"``, so without it
    every word beginning " t" encodes differently from OpenAI's tokenizer.
    """

    def __init__(self, tokenizer_json: str, generation: Mapping | None = None, *,
                 language: str | None = None):
        from tokenizers import Tokenizer

        data = json.loads(tokenizer_json)
        self.restored_merges = _restore_merges(data)
        self._tok = Tokenizer.from_str(json.dumps(data) if self.restored_merges else tokenizer_json)
        generation = dict(generation or {})
        added = {t["content"]: int(t["id"]) for t in data.get("added_tokens", [])}

        def special(key: str, token: str) -> int:
            if generation.get(key) is not None:
                return int(generation[key])
            if token in added:
                return added[token]
            raise TokenizerError(f"the tokenizer has no {token} and the generation settings no "
                                 f"{key}; not a Whisper tokenizer")

        self.eot = special("eos_token_id", "<|endoftext|>")
        self.sot = special("decoder_start_token_id", "<|startoftranscript|>")
        self.no_timestamps = special("no_timestamps_token_id", "<|notimestamps|>")
        self.timestamp_begin = self.no_timestamps + 1
        # the token whose probability after <|startoftranscript|> says "no speech" (v3 renamed it)
        self.no_speech = added.get("<|nospeech|>", added.get("<|nocaptions|>"))
        self.is_multilingual = bool(generation.get("is_multilingual", len(added) > 10))
        langs = generation.get("lang_to_id")
        if langs is None:  # every <|xx|> between <|startoftranscript|> and <|translate|>
            hi = added.get("<|translate|>", self.sot)
            langs = {t: i for t, i in added.items() if self.sot < i < hi}
        tasks = generation.get("task_to_id") or {
            k: added[f"<|{k}|>"] for k in ("transcribe", "translate") if f"<|{k}|>" in added}
        # .en models have no language tokens and take no task token
        self.lang_to_id = {_code(t): int(i) for t, i in langs.items()} if self.is_multilingual else {}
        self.task_to_id = {k: int(v) for k, v in tasks.items()} if self.is_multilingual else {}
        self.language = None if language is None else self.language_code(language)

    @classmethod
    def from_model(cls, m, *, language: str | None = None) -> WhisperTokenizer:
        """The tokenizer a loaded model carries (``m.extras["tokenizer_json"]`` and
        ``m.extras["generation"]``); a clear error when it has none."""
        extras = getattr(m, "extras", {}) or {}
        missing = [k for k in ("tokenizer_json", "generation") if not extras.get(k)]
        if missing:
            raise TokenizerError(
                f"the model loaded from {getattr(m, 'source', None) or 'memory'} has no "
                f"{' and no '.join(missing)} in m.extras, so it cannot turn tokens into text. "
                "Load a folder that ships tokenizer.json (a Hugging Face "
                "WhisperForConditionalGeneration or a faster-whisper / CTranslate2 folder), or "
                "pass tokenizer=WhisperTokenizer.from_file('tokenizer.json', m.extras"
                "['generation'])")
        return cls(extras["tokenizer_json"], extras["generation"], language=language)

    @classmethod
    def from_file(cls, path, generation: Mapping | None = None, *,
                  language: str | None = None) -> WhisperTokenizer:
        """From a ``tokenizer.json`` file (e.g. for an OpenAI ``.pt``, which holds none)."""
        with open(path, encoding="utf-8") as f:
            return cls(f.read(), generation, language=language)

    # --- text
    def encode(self, text: str) -> list[int]:
        """Text -> its text tokens (no special tokens; a leading space is a token's own)."""
        return list(self._tok.encode(text, add_special_tokens=False).ids)

    def decode(self, ids: Sequence[int]) -> str:
        """Token ids -> text; special tokens and timestamps (ids >= ``eot``) are skipped."""
        return self._tok.decode([int(i) for i in ids if int(i) < self.eot],
                                skip_special_tokens=False)

    def decode_each(self, ids: Sequence[int]) -> list[str]:
        """Each token on its own (``<|...|>`` for special and timestamp tokens); a character
        split across tokens shows as U+FFFD in each of its pieces."""
        return [self.decode_with_specials([i]) for i in ids]

    def decode_with_specials(self, ids: Sequence[int]) -> str:
        """Token ids -> text with special tokens written out (``<|endoftext|>``) and
        timestamps as ``<|1.24|>``; consecutive text tokens are decoded together, so a
        character spread over several tokens comes out whole."""
        out, run = [], []
        for i in map(int, ids):
            if i < self.eot:
                run.append(i)
                continue
            if run:
                out.append(self._tok.decode(run, skip_special_tokens=False))
                run = []
            out.append(self.special_text(i))
        if run:
            out.append(self._tok.decode(run, skip_special_tokens=False))
        return "".join(out)

    def special_text(self, i: int) -> str:
        if i >= self.timestamp_begin:
            return f"<|{(i - self.timestamp_begin) * TIME_PRECISION:.2f}|>"
        token = self._tok.id_to_token(i)
        return token if token is not None else f"<|{i}|>"

    # --- prompts
    def language_code(self, language: str) -> str:
        """``"en"`` / ``"<|en|>"`` -> ``"en"``, checked against the model's languages."""
        code = _code(language.strip().lower())
        if self.is_multilingual and code not in self.lang_to_id:
            raise TokenizerError(f"language {language!r} is not one of this model's "
                                 f"{len(self.lang_to_id)} languages: "
                                 f"{', '.join(sorted(self.lang_to_id))}")
        if not self.is_multilingual and code != "en":
            raise TokenizerError(f"this model is English-only (.en); it cannot take language "
                                 f"{language!r}")
        return code

    def language_token(self, language: str) -> int:
        if not self.is_multilingual:
            raise TokenizerError("an English-only (.en) model has no language tokens")
        return self.lang_to_id[self.language_code(language)]

    def sot_sequence(self, language: str | None = None, task: str = "transcribe") -> list[int]:
        """The prompt before the text: ``<|startoftranscript|>``, then on multilingual
        models ``<|lang|>`` (when given) and ``<|task|>``. English-only models take
        ``language`` None or ``"en"`` and ``task="transcribe"`` only. The decoder appends
        ``<|notimestamps|>``."""
        if not self.is_multilingual:
            if task != "transcribe":
                raise TokenizerError(f"an English-only (.en) model only transcribes; task "
                                     f"{task!r} needs a multilingual model")
            if language is not None:
                self.language_code(language)
            return [self.sot]
        if task not in self.task_to_id:
            raise TokenizerError(f"unknown task {task!r}; this model knows "
                                 f"{', '.join(sorted(self.task_to_id))}")
        seq = [self.sot]
        if language is not None:
            seq.append(self.language_token(language))
        return seq + [self.task_to_id[task]]

    def language_of(self, token: int) -> str:
        """A language token id -> its code (``50259`` -> ``"en"`` on multilingual models)."""
        for code, i in self.lang_to_id.items():
            if i == int(token):
                return code
        raise TokenizerError(f"token {token} is not a language token")

    # --- words
    def split_to_word_tokens(self, tokens: Sequence[int], language: str | None = None
                             ) -> tuple[list[str], list[list[int]]]:
        """Tokens -> ``(words, word_tokens)``, as openai-whisper's tokenizer splits them.

        Languages with spaces: a word starts at a token whose text begins with a space, at
        punctuation, or at a special token (e.g. the final ``<|endoftext|>``); each word
        keeps its leading space (``" world"``). Languages without spaces (zh, ja, th, lo, my,
        yue): a word ends wherever the tokens so far decode to whole characters.
        ``language``: a code; default the tokenizer's own (``language=`` at construction),
        else the space rule.
        """
        lang = self.language if language is None else _code(language.strip().lower())
        if lang in NO_SPACE_LANGUAGES:
            return self._split_on_unicode(tokens)
        return self._split_on_spaces(tokens)

    def _split_on_unicode(self, tokens: Sequence[int]) -> tuple[list[str], list[list[int]]]:
        # Cut after a token when the text so far has no broken character, or when the
        # broken character is broken in the whole decode too (a token sequence that never
        # becomes valid UTF-8 must still be cut somewhere).
        full = self.decode_with_specials(tokens)
        words, word_tokens, current, offset = [], [], [], 0
        for token in tokens:
            current.append(int(token))
            decoded = self.decode_with_specials(current)
            broken = decoded.find(_REPLACEMENT)
            if broken < 0 or (offset + broken < len(full) and full[offset + broken] == _REPLACEMENT):
                words.append(decoded)
                word_tokens.append(current)
                current = []
                offset += len(decoded)
        return words, word_tokens

    def _split_on_spaces(self, tokens: Sequence[int]) -> tuple[list[str], list[list[int]]]:
        words, word_tokens = [], []
        for piece, piece_tokens in zip(*self._split_on_unicode(tokens), strict=True):
            starts_word = (piece_tokens[0] >= self.eot or piece.startswith(" ")
                           or piece.strip() in string.punctuation or not words)
            if starts_word:
                words.append(piece)
                word_tokens.append(piece_tokens)
            else:
                words[-1] += piece
                word_tokens[-1].extend(piece_tokens)
        return words, word_tokens

    def __repr__(self) -> str:
        kind = f"multilingual, {len(self.lang_to_id)} languages" if self.is_multilingual else "English-only"
        return f"WhisperTokenizer({kind}, eot={self.eot}, sot={self.sot})"


def _restore_merges(data: dict) -> list[str]:
    """Put back, in place, the merges of a byte-level BPE ``tokenizer.json`` (``data``, parsed)
    that no listed merge produces although the vocabulary has their token; returns them as
    ``"a b"``. Merges are kept in the order of the ids they produce (tiktoken's ranks)."""
    model = data.get("model") or {}
    if model.get("type") != "BPE" or not model.get("merges"):
        return []
    vocab, merges = model["vocab"], model["merges"]
    pairs = [m.split(" ", 1) if isinstance(m, str) else list(m) for m in merges]
    produced = {vocab.get(a + b) for a, b in pairs}
    text_end = min((t["id"] for t in data.get("added_tokens", [])), default=len(vocab))
    restored = []
    for token, i in vocab.items():
        if not 256 <= i < text_end or i in produced or len(token) < 2:
            continue
        split = next(((token[:k], token[k:]) for k in range(1, len(token))
                      if vocab.get(token[:k], i) < i and vocab.get(token[k:], i) < i), None)
        if split is not None:
            pairs.append(list(split))
            restored.append(" ".join(split))
    if restored:
        pairs.sort(key=lambda ab: vocab.get(ab[0] + ab[1], len(vocab)))
        string_form = isinstance(merges[0], str)
        model["merges"] = [" ".join(ab) if string_form else ab for ab in pairs]
    return restored


def _code(token: str) -> str:
    """``"<|en|>"`` -> ``"en"``; a code passes through."""
    return token[2:-2] if token.startswith("<|") and token.endswith("|>") else token
