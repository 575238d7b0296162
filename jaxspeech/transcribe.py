"""Speech to text with a Whisper checkpoint: greedy decoding, compiled once.

    m = js.load("faster-whisper-tiny.en/")          # any Whisper checkpoint with a decoder
    out = js.transcribe(m, wave)                     # [samples] or [B, samples] at 16 kHz
    out[0].text, out[0].tokens, out[0].language
    out = js.transcribe(m, wave, word_timestamps=True)
    [(w.word, w.start, w.end) for w in out[0].words]     # seconds from the clip's start

Decoding is greedy (openai-whisper's ``temperature=0`` without fallback, transformers'
``num_beams=1, do_sample=False``, CTranslate2's ``beam_size=1``) and without timestamps:
the prompt is ``<|startoftranscript|>`` [``<|lang|>`` ``<|task|>``] ``<|notimestamps|>``.
At every step the generation settings' ``suppress_tokens`` and every timestamp token are
suppressed, at the first step also ``begin_suppress_tokens`` (a blank and ``<|endoftext|>``).
The whole of it — encoder, cross-attention keys and values, the prompt, then a
``lax.while_loop`` of one-token :func:`~jaxspeech.models.whisper.decode_step` calls on the KV
cache — is one jitted function per (config, batch size, prompt length, token budget): a
batch decodes together, finished items keep emitting ``<|endoftext|>``, and the loop stops
when every item has finished or the budget (openai-whisper's: half the 448-token context)
is spent.

Language: on a multilingual model with ``language=None`` it is detected as openai-whisper's
``detect_language`` does — one decoder step after ``<|startoftranscript|>``, the most
likely language token — on each clip's first 30 s, and used for all of the clip.

Long audio is cut into consecutive 30 s windows, transcribed (batched together), and the
windows' tokens are joined; word times are offset by their window's start. openai-whisper
instead seeks to the last timestamp token a window produced and conditions each window on
the previous text; decoding without timestamps there is no such token, so the windows are
plain and independent: a word cut by a window edge may be lost or doubled.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxspeech import audio
from jaxspeech.model import Model
from jaxspeech.models.whisper import Whisper, WhisperConfig, decode_step, decoder_cache
from jaxspeech.timing import Word  # word, start, end (s), probability, tokens
from jaxspeech.tokenizer import WhisperTokenizer

__all__ = ["Word", "Transcript", "transcribe", "generate", "Generation", "suppress_masks",
           "require_decoder", "add_commands", "transformers_reference",
           "ctranslate2_reference", "DEFAULT_BATCH"]

DEFAULT_BATCH = 8  # windows decoded together; more are decoded in further batches of this size


@dataclasses.dataclass(frozen=True)
class Transcript:
    """One clip's transcription: ``text`` (stripped), ``tokens`` (its text tokens, ids below
    ``<|endoftext|>``, all windows in order), ``language`` (code) and ``words`` when asked."""

    text: str
    tokens: list[int]
    language: str | None
    words: list[Word] | None = None


@dataclasses.dataclass(frozen=True)
class Generation:
    """What :func:`generate` returns, per row: ``tokens`` (text tokens, up to the first
    ``<|endoftext|>``), the ``prompts`` decoded after (language filled in), the ``language``
    code, ``avg_logprobs`` (mean log-probability of the tokens and the ``<|endoftext|>``
    after them, openai-whisper's ``avg_logprob``) and ``no_speech_probs`` (the probability of
    ``<|nocaptions|>`` right after ``<|startoftranscript|>``, openai-whisper's ``no_speech_prob``)."""

    tokens: list[list[int]]
    prompts: list[list[int]]
    languages: list[str]
    avg_logprobs: list[float]
    no_speech_probs: list[float]


def require_decoder(m: Model) -> WhisperConfig:
    """The model's config, or a clear error when it cannot produce text."""
    config = m.config
    if not isinstance(config, WhisperConfig):
        raise ValueError(f"transcription needs a Whisper model; this is a {m.kind} model")
    if not config.has_decoder:
        raise ValueError(f"the Whisper model from {m.source or 'memory'} is encoder only (no "
                         "decoder), so it cannot transcribe; load a full checkpoint "
                         "(WhisperForConditionalGeneration, OpenAI .pt or a faster-whisper / "
                         "CTranslate2 folder)")
    return config


def transcribe(m: Model, wave, language: str | None = None, task: str = "transcribe",
               word_timestamps: bool = False, max_new_tokens: int | None = None,
               sample_rate: int | None = None, *, tokenizer: WhisperTokenizer | None = None,
               batch_size: int = DEFAULT_BATCH, no_speech_threshold: float | None = 0.6,
               logprob_threshold: float | None = -1.0, edits=None) -> list[Transcript]:
    """Transcribe (or translate, ``task="translate"``) audio; one :class:`Transcript` per item.

    ``wave``: ``[samples]``, ``[B, samples]`` or a list of 1-D clips at ``m.sample_rate``
    (16 kHz), validated as every entry point does (:func:`jaxspeech.audio.as_batch`: a wrong
    ``sample_rate``, stereo, NaN and empty audio raise ``AudioError``); any length, cut into
    30 s windows. ``language``: a code (``"de"``), or None to detect it per clip (English
    on ``.en`` models). ``max_new_tokens``: per window, at most 448 minus the prompt
    (default 224, openai-whisper's). ``tokenizer``: default the model's own
    (:meth:`WhisperTokenizer.from_model`). ``batch_size``: windows decoded together.
    ``word_timestamps``: ``.words`` from the alignment heads' cross-attention and DTW
    (:mod:`jaxspeech.timing`). A window is taken as silent, and gives no text, when its
    no-speech probability exceeds ``no_speech_threshold`` unless its mean token
    log-probability exceeds ``logprob_threshold`` (openai-whisper's rule and defaults;
    ``None`` turns either off): Whisper, asked to transcribe silence, tends to say " you".
    ``edits``: ``{site: edit}`` (:mod:`jaxspeech.edits`) applied to the encoder and to every
    decoding step (decoder sites see one token per step, at its position ``offset``), and
    to the word-timestamp pass.
    """
    config = require_decoder(m)
    tok = tokenizer or WhisperTokenizer.from_model(m)
    batch, lengths = audio.as_batch(wave, expected_rate=m.sample_rate, sample_rate=sample_rate,
                                    name="Whisper")
    batch = np.asarray(batch)
    sizes = [batch.shape[1]] * batch.shape[0] if lengths is None else \
        [round(float(r) * batch.shape[1]) for r in lengths]
    windows, owners, starts, samples = _windows(batch, sizes, config.n_samples, m.sample_rate)
    features = m.features(windows)
    out = generate(m, features, tokenizer=tok, language=language, task=task,
                   max_new_tokens=max_new_tokens, first_window=owners, batch_size=batch_size,
                   edits=edits)
    for r in range(len(owners)):
        if _silent(out.no_speech_probs[r], out.avg_logprobs[r], no_speech_threshold,
                   logprob_threshold):
            out.tokens[r] = []
    words = None
    if word_timestamps:
        words = _word_timestamps(m, tok, features, out, starts, samples, owners, edits)
    results = []
    for first in sorted(set(owners)):  # one clip per first window, in order
        rows = [r for r, o in enumerate(owners) if o == first]
        tokens = [t for r in rows for t in out.tokens[r]]
        results.append(Transcript(
            text=tok.decode(tokens).strip(), tokens=tokens, language=out.languages[rows[0]],
            words=None if words is None else [w for r in rows for w in words[r]]))
    return results


def _silent(no_speech_prob: float, avg_logprob: float, no_speech_threshold, logprob_threshold):
    """openai-whisper's ``transcribe``: skip a segment the model finds speechless, unless its
    text is confident."""
    if no_speech_threshold is None or no_speech_prob <= no_speech_threshold:
        return False
    return logprob_threshold is None or avg_logprob <= logprob_threshold


def _windows(batch: np.ndarray, sizes: Sequence[int], window: int, rate: int):
    """``[B, samples]`` with true ``sizes`` -> (windows ``[N, window]``, the row of each
    window's clip's first window ``[N]``, each window's start in seconds and its length in
    samples ``[N]``)."""
    rows, owners, starts = [], [], []
    for item, size in enumerate(sizes):
        first = len(rows)
        for k in range(max(1, math.ceil(size / window))):
            rows.append(batch[item, k * window: min((k + 1) * window, size)])
            owners.append(first)
            starts.append(k * window / rate)
    # every window padded to the full window (the front end pads with zeros to it anyway):
    # one shape, so the jitted front end compiles once for any audio length
    out = np.zeros((len(rows), window), np.float32)
    for i, r in enumerate(rows):
        out[i, : len(r)] = r
    return out, owners, starts, [len(r) for r in rows]


def suppress_masks(config: WhisperConfig, generation: dict, tok: WhisperTokenizer):
    """``(every step [vocab] bool, first step [vocab] bool)``: the generation settings'
    ``suppress_tokens`` plus every timestamp token (decoding runs after ``<|notimestamps|>``),
    and ``begin_suppress_tokens``."""
    every = np.zeros(config.vocab_size, bool)
    every[[t for t in generation.get("suppress_tokens") or () if 0 <= t < config.vocab_size]] = True
    every[tok.timestamp_begin:] = True
    first = np.zeros(config.vocab_size, bool)
    first[[t for t in generation.get("begin_suppress_tokens") or () if 0 <= t < config.vocab_size]] = True
    return every, first


def generate(m: Model, features, *, tokenizer: WhisperTokenizer | None = None, language: str | None = None,
             task: str = "transcribe", max_new_tokens: int | None = None,
             first_window: Sequence[int] | None = None, batch_size: int | None = None,
             edits=None) -> Generation:
    """Greedy tokens for log-mel ``features [N, n_mels, 3000]`` (as ``m.features`` gives).

    ``first_window[i]``: the row whose detected language row ``i`` takes (a long clip's first
    window; default each row its own). Rows are decoded ``batch_size`` at a time (default
    all together); a short last batch is filled with copies of its last row, so one
    compilation serves every batch. ``edits``: as :func:`transcribe` takes them.
    """
    config = require_decoder(m)
    tok = tokenizer or WhisperTokenizer.from_model(m)
    features = jnp.asarray(features)
    n = features.shape[0]
    owners = list(range(n)) if first_window is None else [int(o) for o in first_window]
    lang = None if language is None else tok.language_code(language)
    detect = tok.is_multilingual and lang is None
    if tok.is_multilingual:  # the language slot is filled by detection when not given
        prompt = tok.sot_sequence(lang or next(iter(tok.lang_to_id)), task) + [tok.no_timestamps]
    else:
        prompt = tok.sot_sequence(lang, task) + [tok.no_timestamps]
    limit = config.max_target_positions - len(prompt)
    budget = min(config.max_target_positions // 2, limit) if max_new_tokens is None else max_new_tokens
    if not 1 <= budget <= limit:
        raise ValueError(f"max_new_tokens={max_new_tokens}: Whisper's decoder holds "
                         f"{config.max_target_positions} tokens, {len(prompt)} of them the prompt, "
                         f"so 1 .. {limit}")
    every, first = suppress_masks(config, m.extras.get("generation") or {}, tok)
    language_ids = np.array(sorted(tok.lang_to_id.values()) or [0], np.int32)
    size = n if not batch_size else min(batch_size, n)
    from jaxspeech.edits import bind

    bound = bind(config, edits, features[:size], {"tokens": jnp.zeros((size, 1), jnp.int32)})
    # once on the device: a loaded checkpoint's params are NumPy arrays, which every jitted
    # call would otherwise copy over again (the whole model, per batch)
    params = jax.device_put(m.params)
    tokens, prompts, avg_logprobs, no_speech_probs = [], [], [], []
    for lo in range(0, n, size):
        rows = list(range(lo, min(lo + size, n)))
        pad = [rows[-1]] * (size - len(rows))
        # a row takes its own detection when its first window is in this batch, else the
        # language an earlier batch found for it
        local = [rows.index(owners[r]) if owners[r] in rows else -1 for r in rows + pad]
        given = [-1 if owners[r] in rows else prompts[owners[r]][1] for r in rows + pad]
        out, used, total, no_speech = jax.device_get(_greedy(
            config, budget, detect, params, features[np.array(rows + pad)],
            jnp.asarray([prompt] * size, jnp.int32), jnp.asarray(every), jnp.asarray(first),
            jnp.asarray(language_ids), jnp.asarray(np.maximum(local, 0), jnp.int32),
            jnp.asarray(given, jnp.int32), tok.eot, tok.no_speech or 0, bound))
        for i in range(len(rows)):
            row = out[i].tolist()
            tokens.append(row[: row.index(tok.eot)] if tok.eot in row else row)
            prompts.append(used[i].tolist())
            # openai-whisper's avg_logprob: the text tokens and the <|endoftext|> after them
            avg_logprobs.append(float(total[i]) / (len(tokens[-1]) + 1))
            no_speech_probs.append(float(no_speech[i]) if tok.no_speech is not None else 0.0)
    languages = [tok.language_of(p[1]) if tok.is_multilingual else "en" for p in prompts]
    return Generation(tokens, prompts, languages, avg_logprobs, no_speech_probs)


@functools.partial(jax.jit, static_argnums=(0, 1, 2))
def _greedy(config: WhisperConfig, budget: int, detect: bool, params, features, prompt, every,
            first, language_ids, owner, given, eot, no_speech, edits=None):
    """``features [N, n_mels, frames]``, ``prompt [N, P]`` -> (tokens ``[N, budget]`` padded
    with ``eot``, the prompts used ``[N, P]``, the sum of the chosen tokens' log-probabilities
    ``[N]`` (up to and with the first ``eot``), the no-speech probability ``[N]``).

    One loop of one-token decoder steps over the positions: position ``i`` reads token ``i``
    and gives token ``i + 1``, forced from the prompt while ``i + 1 < P``, the greedy choice
    after (so the decoder is compiled once, not once more for a prompt pass). ``every`` /
    ``first``: ids suppressed at every / the first chosen step ``[vocab]``. With ``detect``,
    the prompt's slot 1 becomes, at step 0 (openai-whisper's ``detect_language``: the most
    likely language token after ``<|startoftranscript|>``), the language detected on row
    ``owner[i]`` where ``given[i] < 0``, else ``given[i]``. ``edits``: a bound edit tree
    (:func:`jaxspeech.edits.bind`), applied in the encoder and in every step."""
    from jaxspeech.edits import decoder_step_edits

    memory = Whisper(config).apply(
        {"params": params} if edits is None else edits.variables(params), features)
    n, p = prompt.shape
    cache = decoder_cache(config, params, memory, p + budget)
    seq = jnp.full((n, p + budget), eot, jnp.int32).at[:, :p].set(prompt)

    def cond(state):
        i, _, done, _, _, _ = state
        return (i < p + budget - 1) & ~jnp.all(done)

    def body(state):
        i, seq, done, total, no_speech_prob, cache = state
        logits, cache = decode_step(config, params, jax.lax.dynamic_slice_in_dim(seq, i, 1, 1),
                                    cache, i, decoder_step_edits(edits, i))
        logits = logits[:, 0]
        # openai-whisper's no_speech_prob: the unfiltered distribution after <|startoftranscript|>
        no_speech_prob = jnp.where(i == 0, jax.nn.softmax(logits, axis=-1)[:, no_speech],
                                   no_speech_prob)
        logp = jax.nn.log_softmax(
            jnp.where((every | (first & (i == p - 1)))[None, :], -jnp.inf, logits), axis=-1)
        chosen = jnp.argmax(logp, axis=-1).astype(jnp.int32)
        forced = jax.lax.dynamic_slice_in_dim(seq, i + 1, 1, 1)[:, 0]
        if detect:
            best = language_ids[jnp.argmax(logits[:, language_ids], axis=-1)]
            forced = jnp.where(i == 0, jnp.where(given >= 0, given, best[owner]), forced)
        generating = i >= p - 1
        token = jnp.where(generating, jnp.where(done, eot, chosen), forced)
        logp_token = jnp.take_along_axis(logp, chosen[:, None], axis=-1)[:, 0]
        total = total + jnp.where(generating & ~done, logp_token, 0.0)
        seq = jax.lax.dynamic_update_slice_in_dim(seq, token[:, None], i + 1, axis=1)
        return i + 1, seq, done | (generating & (token == eot)), total, no_speech_prob, cache

    zeros = jnp.zeros(n, jnp.float32)
    _, seq, _, total, no_speech_prob, _ = jax.lax.while_loop(
        cond, body, (jnp.int32(0), seq, jnp.zeros(n, bool), zeros, zeros, cache))
    return seq[:, p:], seq[:, :p], total, no_speech_prob


def _word_timestamps(m: Model, tok: WhisperTokenizer, features, out: Generation, starts, samples,
                     owners, edits=None) -> list[list[Word]]:
    """Each window's words (:func:`jaxspeech.timing.word_timestamps`), times from the clip's
    start. The k-th windows of all clips are aligned together, after the (k-1)-th: openai
    shortens a first word that follows a long pause, measured from the previous window's
    last word."""
    from jaxspeech.timing import word_timestamps

    rank = [r - owners[r] for r in range(len(owners))]  # each window's index in its clip
    words: list[list[Word]] = [[] for _ in owners]
    hop = m.config.n_samples // m.config.n_frames  # samples per 10 ms mel frame
    for k in range(max(rank) + 1):
        rows = [r for r in range(len(owners)) if rank[r] == k]
        last = [words[r - 1][-1].end - starts[r] if k and words[r - 1] else 0.0 for r in rows]
        found = word_timestamps(
            m, features[np.array(rows)], [out.tokens[r] for r in rows],
            [out.prompts[r][:-1] for r in rows],  # the prompt before <|notimestamps|>
            np.array([min(max(samples[r] // hop, 2), m.config.n_frames) for r in rows]),
            [functools.partial(tok.split_to_word_tokens, language=out.languages[r]) for r in rows],
            last_speech_timestamp=np.array(last), edits=edits)
        for r, ws in zip(rows, found, strict=True):
            words[r] = [dataclasses.replace(w, start=w.start + starts[r], end=w.end + starts[r])
                        for w in ws]
    return words


# --- the command line -------------------------------------------------------------------

def add_commands(sub) -> None:  # sub: argparse's subparsers
    """``jaxspeech transcribe CKPT AUDIO... [--language] [--task] [--word-timestamps] [--json OUT]``."""
    from jaxspeech.checkpoints import add_dtype_argument
    from jaxspeech.cli import checkpoint_help

    p = sub.add_parser(
        "transcribe", help="speech to text with a Whisper checkpoint (greedy, no timestamps)",
        description="Transcribe audio files, one line per file. Exit status 1 when any file "
                    "failed (the others are still transcribed and written).")
    p.add_argument("checkpoint", help=checkpoint_help("CHECKPOINT"))
    add_dtype_argument(p)
    p.add_argument("audio", nargs="+", help="audio files (any rate and channels: converted to "
                                            "16 kHz mono by jaxspeech.audio.read)")
    p.add_argument("--language", help="language code, e.g. de (default: detected per file)")
    p.add_argument("--task", choices=("transcribe", "translate"), default="transcribe")
    p.add_argument("--word-timestamps", action="store_true", help="print each word's times")
    p.add_argument("--json", metavar="OUT", help="write every result (and failure) to OUT")
    p.add_argument("--batch-size", type=int, default=DEFAULT_BATCH, help="30 s windows decoded together")
    p.set_defaults(fn=_cmd_transcribe)


def _cmd_transcribe(args) -> int:
    import json
    import sys
    from pathlib import Path

    from jaxspeech.checkpoints import resolve
    from jaxspeech.corpus.store import write_atomic

    m = resolve(args.checkpoint, dtype=args.compute_dtype).model
    require_decoder(m)
    tok = WhisperTokenizer.from_model(m)  # fail before reading any audio
    waves, records = {}, {}
    for path in args.audio:
        try:
            waves[path] = audio.read(path, m.sample_rate)
        except (OSError, ValueError) as e:  # missing, unreadable, empty
            records[path] = {"file": path, "error": str(e)}
            print(f"{path}: error: {e}", file=sys.stderr)
    if waves:
        results = transcribe(m, list(waves.values()), language=args.language, task=args.task,
                             word_timestamps=args.word_timestamps, tokenizer=tok,
                             batch_size=args.batch_size)
        for path, r in zip(waves, results, strict=True):
            records[path] = {"file": path, "text": r.text, "language": r.language,
                             "tokens": r.tokens, "seconds": len(waves[path]) / m.sample_rate}
            print(f"{path}: {r.text}")
            if r.words is not None:
                records[path]["words"] = [{"word": w.word, "start": w.start, "end": w.end,
                                           "probability": w.probability} for w in r.words]
                for w in r.words:
                    print(f"  [{w.start:7.2f} -> {w.end:7.2f}] {w.word.strip()}")
    if args.json:
        out = Path(args.json)
        out.parent.mkdir(parents=True, exist_ok=True)
        body = {"checkpoint": args.checkpoint, "task": args.task,
                "results": [records[p] for p in args.audio]}
        write_atomic(out, (json.dumps(body, indent=1, ensure_ascii=False) + "\n").encode())
    return 1 if any("error" in r for r in records.values()) else 0


# --- the references, for tests, benchmarks and compare (torch / ctranslate2 imported here) ---

def _reference_settings(m, max_new_tokens):
    tok = WhisperTokenizer.from_model(m)
    every, _ = suppress_masks(m.config, m.extras.get("generation") or {}, tok)
    prompt_length = 4 if tok.is_multilingual else 2
    budget = max_new_tokens or min(m.config.max_target_positions // 2,
                                   m.config.max_target_positions - prompt_length)
    return tok, np.flatnonzero(every).tolist(), budget


def transformers_reference(m: Model, max_new_tokens: int | None = None):
    """transformers' greedy ``generate`` on ``m``'s weights
    (:func:`jaxspeech.convert.whisper.hf_torch_model`) as
    ``fn(features [N, n_mels, 3000] np, language=None, task="transcribe") -> text tokens per
    row``: ``num_beams=1``, ``do_sample=False``, no timestamps, the same suppressed tokens
    (the generation settings' and every timestamp) and token budget as :func:`generate`;
    transformers detects the language itself when it is None."""
    import torch

    from jaxspeech.convert.whisper import hf_torch_model

    hf = hf_torch_model(m.params, require_decoder(m), m.extras.get("generation"))
    tok, suppress, budget = _reference_settings(m, max_new_tokens)
    hf.generation_config.suppress_tokens = suppress

    def fn(features, language=None, task="transcribe"):
        options = {"language": language, "task": task} if tok.is_multilingual else {}
        with torch.inference_mode():
            out = hf.generate(torch.from_numpy(np.ascontiguousarray(features, np.float32)),
                              num_beams=1, do_sample=False, return_timestamps=False,
                              max_new_tokens=budget, **options)
        return [[t for t in row if t < tok.eot] for row in out.tolist()]

    return fn


def ctranslate2_reference(path: str, m: Model, compute_type: str = "float32",
                          max_new_tokens: int | None = None):
    """CTranslate2's engine on the folder ``path`` (``m``: the same folder loaded) as
    ``fn(features, language=None, task="transcribe") -> text tokens per row``:
    ``generate(beam_size=1)`` after the same prompt, ``suppress_blank`` (the folder's
    ``suppress_ids_begin``) and the same suppressed tokens as :func:`generate`; the language,
    when None, from the engine's ``detect_language``. ``compute_type``: ``"float32"``
    (parity), ``"int8"`` (its fast path). CTranslate2 caps new tokens at half its
    ``max_length``, so it is given twice the budget."""
    import ctranslate2

    from jaxspeech.convert.ctranslate2 import engine as ct2_engine

    engine = ct2_engine(path, compute_type)
    tok, suppress, budget = _reference_settings(m, max_new_tokens)

    def fn(features, language=None, task="transcribe"):
        x = ctranslate2.StorageView.from_array(np.ascontiguousarray(features, np.float32))
        if not tok.is_multilingual:
            prompts = [tok.sot_sequence(None, task) + [tok.no_timestamps]] * len(features)
        else:
            codes = ([_code_of(r[0][0]) for r in engine.detect_language(x)] if language is None
                     else [language] * len(features))
            prompts = [tok.sot_sequence(c, task) + [tok.no_timestamps] for c in codes]
        out = engine.generate(x, prompts, beam_size=1, suppress_blank=True,
                              suppress_tokens=suppress, max_length=2 * budget)
        return [[t for t in r.sequences_ids[0] if t < tok.eot] for r in out]

    return fn


def _code_of(token: str) -> str:
    return token[2:-2]
