"""CLAP's RoBERTa tokenizer, read from a checkpoint's ``tokenizer.json`` with the ``tokenizers``
library (no ``transformers`` at run time): the byte-level BPE that ``RobertaTokenizerFast``
runs, so both give the same ids.

    tok = RobertaTokenizer.from_folder("path/to/clap")   # tokenizer.json (+ tokenizer_config.json)
    batch = tok.encode(["a dog barking", "rain on a roof"])
    batch.input_ids, batch.attention_mask                # [2, L] int32, right-padded with <pad>
    batch.words[0], batch.word_index[0]                  # ("a", "dog", "barking"), token -> word

Each text becomes ``<s> tokens </s>``; texts longer than ``max_length`` tokens (specials
included: 512 for the real checkpoints, ``tokenizer_config.json``'s ``model_max_length``
and the position table's limit, whichever is smaller) are cut there, keeping the closing
``</s>``, as ``tokenizer(texts, truncation=True)`` does, with a warning. Words are the
text's whitespace-separated pieces; each token belongs to the word its characters come
from (byte-level BPE marks a word's start with ``Ġ``, a space that may stand alone: it
goes with the word after it, trailing spaces with the last word).
"""

from __future__ import annotations

import dataclasses
import json
import re
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np

__all__ = ["RobertaTokenizer", "TextTokens", "TokenizerError", "TOKENIZER_FILE"]

TOKENIZER_FILE = "tokenizer.json"
# transformers writes int(1e30) as model_max_length when the tokenizer was saved without one
_UNSET_MAX_LENGTH = 10**12


class TokenizerError(ValueError):
    """No usable tokenizer, or text it cannot take."""


@dataclasses.dataclass(frozen=True)
class TextTokens:
    """A tokenized batch of ``N`` texts, padded to ``L`` tokens.

    ``input_ids`` / ``attention_mask`` ``[N, L]`` int32; ``lengths [N]`` real tokens per
    text (with ``<s>`` and ``</s>``); ``tokens[n]`` those tokens as strings; ``words[n]``
    the text's words (the part kept after truncation); ``word_index [N, L]`` the word of
    each token, -1 for ``<s>``, ``</s>`` and padding; ``truncated [N]`` which were cut.
    """

    texts: tuple[str, ...]
    input_ids: np.ndarray
    attention_mask: np.ndarray
    lengths: np.ndarray
    tokens: tuple[tuple[str, ...], ...]
    words: tuple[tuple[str, ...], ...]
    word_index: np.ndarray
    truncated: np.ndarray

    def __len__(self) -> int:
        return len(self.texts)

    def take(self, index) -> TextTokens:
        """The texts at ``index`` (an int array), padding kept."""
        index = np.asarray(index).reshape(-1)
        return TextTokens(tuple(self.texts[i] for i in index), self.input_ids[index],
                          self.attention_mask[index], self.lengths[index],
                          tuple(self.tokens[i] for i in index), tuple(self.words[i] for i in index),
                          self.word_index[index], self.truncated[index])


class RobertaTokenizer:
    """Text -> RoBERTa token ids with ``<s>`` / ``</s>``, from a ``tokenizer.json``.

    ``tokenizer_json``: the file's text; ``max_length``: the most tokens per text
    (specials included; ``None``: no limit here, the model's applies).
    """

    def __init__(self, tokenizer_json: str, max_length: int | None = None):
        from tokenizers import Tokenizer

        self.tokenizer_json = tokenizer_json
        try:
            self._tok = Tokenizer.from_str(tokenizer_json)
        except Exception as e:  # the Rust side raises its own Exception type
            raise TokenizerError(f"tokenizer.json cannot be read by the tokenizers library: {e}") \
                from None
        self._tok.no_truncation()
        self._tok.no_padding()
        self.max_length = max_length
        ids = {name: self._tok.token_to_id(name) for name in ("<s>", "</s>", "<pad>")}
        missing = [name for name, i in ids.items() if i is None]
        if missing:
            raise TokenizerError(f"tokenizer.json has no {', '.join(missing)}: not a RoBERTa "
                                 "tokenizer (CLAP's text tower uses RoBERTa's)")
        self.bos_id, self.eos_id, self.pad_id = ids["<s>"], ids["</s>"], ids["<pad>"]
        probe = self._tok.encode("a").ids
        if probe[:1] != [self.bos_id] or probe[-1:] != [self.eos_id]:
            raise TokenizerError("tokenizer.json does not wrap texts in <s> ... </s> (its "
                                 "post_processor is not RoBERTa's); CLAP's pooler reads <s>")

    @classmethod
    def from_folder(cls, folder: str | Path, max_length: int | None = None) -> RobertaTokenizer:
        """The tokenizer of a checkpoint folder: ``tokenizer.json``, limited to the smaller of
        ``max_length`` and ``tokenizer_config.json``'s ``model_max_length``."""
        folder = Path(folder)
        path = folder / TOKENIZER_FILE
        if not path.is_file():
            slow = " (it has vocab.json / merges.txt: re-save them with RobertaTokenizerFast)" \
                if (folder / "vocab.json").is_file() else ""
            raise TokenizerError(
                f"{folder} has no {TOKENIZER_FILE}{slow}; save CLAP's tokenizer into the "
                "checkpoint folder (ClapProcessor.save_pretrained, or AutoTokenizer.from_pretrained"
                "(...).save_pretrained) to embed text")
        config_path = folder / "tokenizer_config.json"
        if config_path.is_file():
            stored = json.loads(config_path.read_text()).get("model_max_length")
            if isinstance(stored, (int, float)) and 0 < stored < _UNSET_MAX_LENGTH:
                max_length = int(stored) if max_length is None else min(max_length, int(stored))
        return cls(path.read_text(), max_length)

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size()

    def encode(self, texts: str | Sequence[str], *, max_length: int | None = None,
               pad_to_multiple_of: int = 16) -> TextTokens:
        """Tokenize ``texts``: ``max_length`` (default :attr:`max_length`) tokens at most per
        text, longer ones cut with a warning; padded to the longest, rounded up to a
        multiple of ``pad_to_multiple_of`` (so a jitted tower compiles once per bucket;
        padding changes no embedding: padded keys get no attention). Empty texts raise."""
        texts = [texts] if isinstance(texts, str) else list(texts)
        if not texts:
            raise TokenizerError("no texts given: pass a non-empty list of strings")
        for i, t in enumerate(texts):
            if not isinstance(t, str):
                raise TypeError(f"text {i} is a {type(t).__name__}, not a string")
            if not t.strip():
                raise TokenizerError(f"text {i} is empty; CLAP embeds a caption or label, give "
                                     "it at least one word")
        limit = max_length if max_length is not None else self.max_length
        if limit is not None and limit < 3:
            raise TokenizerError(f"max_length={limit}: room for <s>, </s> and a token needs 3")
        if limit is not None:
            self._tok.enable_truncation(limit)
        try:
            encodings = self._tok.encode_batch(texts)
        finally:
            self._tok.no_truncation()
        truncated = np.array([bool(e.overflowing) for e in encodings])
        if truncated.any():
            cut = np.flatnonzero(truncated)
            warnings.warn(f"{len(cut)} text(s) longer than {limit} tokens were truncated to "
                          f"{limit} (texts {cut[:10].tolist()}{' ...' if len(cut) > 10 else ''}): "
                          "the rest of each is not seen by the model", stacklevel=2)
        lengths = np.array([len(e.ids) for e in encodings])
        width = int(-(-lengths.max() // pad_to_multiple_of) * pad_to_multiple_of)
        if limit is not None:
            width = min(width, max(limit, int(lengths.max())))
        ids = np.full((len(texts), width), self.pad_id, np.int32)
        mask = np.zeros((len(texts), width), np.int32)
        word_index = np.full((len(texts), width), -1, np.int32)
        tokens, words = [], []
        for n, (text, enc) in enumerate(zip(texts, encodings, strict=True)):
            k = len(enc.ids)
            ids[n, :k], mask[n, :k] = enc.ids, 1
            spans = [m.span() for m in re.finditer(r"\S+", text)]
            ends = np.array([e for _, e in spans])
            starts = np.array([s for s, _ in enc.offsets])
            # the word whose characters the token starts in; a lone space token (offsets
            # empty, at the whitespace before a word) belongs to the word after it, spaces
            # after the last word to the last word
            index = np.minimum(np.searchsorted(ends, starts, side="right"), len(spans) - 1)
            index = np.where(np.asarray(enc.special_tokens_mask, bool), -1, index)
            word_index[n, :k] = index
            used = int(index.max()) + 1 if (index >= 0).any() else 0
            words.append(tuple(text[s:e] for s, e in spans[:used]))
            tokens.append(tuple(enc.tokens))
        return TextTokens(tuple(texts), ids, mask, lengths, tuple(tokens), tuple(words),
                          word_index, truncated)
