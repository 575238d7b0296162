"""Word-aligned faithfulness of transcript attributions, on speech whose word spans are known.

    from jaxspeech.assets import speech_clips
    from jaxspeech.evaluate.words import word_faithfulness
    table = word_faithfulness(m, [c for c in speech_clips() if c.words])
    print(table.markdown())

Each clip is explained token by token (:func:`jaxspeech.attribute_transcript`, teacher-forced
on the clip's text) and each word's relevance is its tokens' relevance summed (the audio
part; the text prefix is left out). Per method and word:

* **share in span**: the share of the word's positive relevance (over every mel bin and
  frame of the 30 s input, padding included) that lies on the frames of the word's own span
  (10 ms per frame), beside the span's share of the clip's frames (chance level);
* **pointing game**: whether the word's most relevant frame (relevance summed over the
  mel bins) lies in its span;
* **MoRF / LeRF per token**: the clip's frames removed (set to the item's floor value, the
  log-mel of silence) most-relevant-first / least-relevant-first by the token's frame
  relevance, in ``steps`` steps; the token's log-probability after each; ABPC = AUC(LeRF) -
  AUC(MoRF) in nats (:func:`jaxspeech.evaluate.perturbation_curves`, one jitted run over
  the steps for a chunk of tokens).

And per word, independent of the method (it measures the *model*): **deletion** of the
word's span (set to silence) against deleting a span of the same length elsewhere in the
clip -> the drop of the word's teacher-forced log-probability. The other places are
deterministic: the same length centred on the other words' spans, nearest words first,
never overlapping the word's own span; their drops are averaged. Every edited copy of
every clip is scored in one jitted, chunked forward.

Every method runs through :func:`~jaxspeech.attribute_transcript`, the baselines too:
``alignment_heads`` (the alignment heads' cross-attention of :mod:`jaxspeech.timing`:
head-averaged, standardised, median-filtered; each token's row), ``rollout`` (attention
rollout through the encoder and decoder) and ``gradcam`` (the last encoder layer), whose
maps over the 20 ms encoder frames are spread over their two mel frames and the mel bins.

Methods are ``NAME[:REFERENCE]``: an :func:`~jaxspeech.attribute_transcript` method and its
``reference`` (``silence``, the default, or ``none`` for plain ``x · grad``), e.g.
``attnlrp:none``.

CLI: ``jaxspeech evaluate-words CHECKPOINT [AUDIO...] --spans clips.json --out DIR``.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxspeech.assets import SpeechClip
from jaxspeech.attribution import methods as _methods
from jaxspeech.attribution.targets import Target
from jaxspeech.attribution.transcript import TRANSCRIPT_METHODS, attribute_transcript, clip_frames
from jaxspeech.evaluate.common import _baseline, _mean, markdown_table, text_table
from jaxspeech.evaluate.localisation import mass_in_mask, pointing_game
from jaxspeech.evaluate.perturbation import perturbation_curves
from jaxspeech.frontends.whisper import HOP_LENGTH, SAMPLE_RATE
from jaxspeech.layers import KEEP_ATTENTION_MAPS
from jaxspeech.model import _module

__all__ = ["word_faithfulness", "WordTable", "WordRow", "read_spans", "ig_completeness",
           "WORD_METHODS", "ALIGNMENT_HEADS", "add_commands"]

ALIGNMENT_HEADS = "alignment_heads"
WORD_METHODS = ("attnlrp", "attnlrp:none", "cp_lrp", "gamma", "saliency", "gradient_x_input",
                "integrated_gradients", "smoothgrad", "gradcam", "rollout", ALIGNMENT_HEADS)
FRAMES_PER_SECOND = SAMPLE_RATE / HOP_LENGTH  # 100: one log-mel frame per 10 ms


# --- clips and spans ---------------------------------------------------------------------

def read_spans(path: str | Path) -> list[SpeechClip]:
    """The clips of a spans file: JSON ``{"clips": [{"file", "text", "words": [{"word",
    "start", "end"}, ...]}, ...]}`` (the layout of the shipped ``clips.json``), files relative
    to the spans file; times in seconds. Entries whose ``words`` is null (no spans) are
    left out. Spans are checked against the audio when the clips are evaluated."""
    path = Path(path)
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not JSON ({e})") from None
    if not isinstance(manifest, dict) or not isinstance(manifest.get("clips"), list):
        raise ValueError(f'{path}: expected {{"clips": [{{"file", "text", "words"}}, ...]}}')
    clips = []
    for i, entry in enumerate(manifest["clips"]):
        missing = sorted({"file", "text", "words"} - set(entry))
        if missing:
            raise ValueError(f"{path}: clip {entry.get('id', i)!r} lacks {missing}")
        if entry["words"] is None:
            continue
        try:
            words = tuple((str(w["word"]), float(w["start"]), float(w["end"]))
                          for w in entry["words"])
        except (KeyError, TypeError, ValueError):
            raise ValueError(f"{path}: clip {entry.get('id', i)!r}: each word needs 'word', "
                             "'start' and 'end' (seconds)") from None
        file = path.parent / entry["file"]
        clips.append(SpeechClip(id=str(entry.get("id", Path(entry["file"]).stem)),
                                text=str(entry["text"]), voice=str(entry.get("voice", "")),
                                path=file, sample_rate=SAMPLE_RATE, words=words))
    return clips


def _norm(text: str) -> str:
    return "".join(ch for ch in text.lower() if ch.isalnum())


@dataclasses.dataclass(frozen=True)
class _Item:
    """One clip ready to evaluate: features ``[n_mels, frames]``, the text tokens, and per
    spanned word its token indices and its frames ``[lo, hi)``."""

    id: str
    features: np.ndarray
    num_frames: int
    tokens: list[int]
    words: list[str]
    groups: list[tuple[int, ...]]
    spans: np.ndarray  # [W, 2] int


def _prepare(m, tok, clip, wave: np.ndarray, language: str | None) -> _Item:
    """Tokenize the clip's text as :func:`attribute_transcript` does, match its words to the
    spans (punctuation-only pieces have none) and turn the spans into frames."""
    words = list(clip.words or ())
    if not words:
        raise ValueError(f"clip {clip.id!r} has no word spans")
    said = [w for w in clip.text.split() if _norm(w)]
    if len(said) != len(words):
        raise ValueError(f"clip {clip.id!r}: {len(words)} word spans for a text of {len(said)} "
                         f"words ({clip.text!r})")
    duration = wave.shape[-1] / SAMPLE_RATE
    for word, start, end in words:
        if not 0 <= start < end <= duration + 0.5 / FRAMES_PER_SECOND:
            raise ValueError(f"clip {clip.id!r}: the span of {word!r} ({start:g}-{end:g} s) lies "
                             f"outside the clip (0-{duration:.3f} s) or is empty")
    tokens = tok.encode(" " + clip.text.lstrip())
    pieces, piece_tokens = tok.split_to_word_tokens(tokens, language=language)
    groups, i = [], 0
    starts = np.cumsum([0] + [len(t) for t in piece_tokens])
    for k, (word, _, _) in enumerate(words):
        target, got, idx = _norm(word), "", []
        while i < len(pieces) and not _norm(pieces[i]):
            i += 1  # punctuation between words
        while i < len(pieces) and len(got) < len(target):
            got += _norm(pieces[i])
            idx += range(starts[i], starts[i + 1])
            i += 1
        if got != target:
            raise ValueError(f"clip {clip.id!r}: span {k} is {word!r} but the text has {got!r} "
                             "there; the spans must name the text's words in order")
        groups.append(tuple(idx))
    frames = np.array([[round(s * FRAMES_PER_SECOND), round(e * FRAMES_PER_SECOND)]
                       for _, s, e in words])
    n = int(clip_frames(wave.shape[-1], m.config.n_frames))
    frames = np.clip(frames, 0, n)
    features = np.asarray(m.features(jnp.asarray(wave[None], jnp.float32)))[0]
    return _Item(clip.id, features, n, tokens, [w for w, _, _ in words], groups, frames)


def _span_masks(item: _Item, n_frames: int) -> np.ndarray:
    """``[W, frames]`` bool: each word's span."""
    t = np.arange(n_frames)
    return (t[None] >= item.spans[:, :1]) & (t[None] < item.spans[:, 1:])


def _controls(item: _Item, k: int, n: int) -> list[tuple[int, int]]:
    """Up to ``n`` spans of word ``k``'s length elsewhere in the clip: centred on the other
    words' spans, nearest words first, shifted to fit the clip, none overlapping word
    ``k``'s own span. Deterministic, so every method and model sees the same."""
    lo, hi = (int(v) for v in item.spans[k])
    length = hi - lo
    out = []
    order = sorted((j for j in range(len(item.spans)) if j != k), key=lambda j: (abs(j - k), j))
    for j in order:
        centre = (item.spans[j, 0] + item.spans[j, 1]) // 2
        start = int(np.clip(centre - length // 2, 0, item.num_frames - length))
        if start < hi and start + length > lo:
            continue
        out.append((start, start + length))
        if len(out) == n:
            break
    return out


# --- the model's side: teacher-forced log-probabilities of edited copies ------------------

def _sequences(items: Sequence[_Item], prompt: list[int], eot: int) -> np.ndarray:
    """``[items, S]`` int32: prompt + text, padded with <|endoftext|> to a multiple of 8
    (one compilation for many lengths; causal attention keeps the padding from the text)."""
    width = max(len(prompt) + len(it.tokens) for it in items)
    width = -(-width // 8) * 8
    seq = np.full((len(items), width), eot, np.int32)
    for b, it in enumerate(items):
        seq[b, :len(prompt) + len(it.tokens)] = prompt + it.tokens
    return seq


@functools.partial(jax.jit, static_argnames=("config", "batch_size"))
def _deleted_logprobs(config, params, features, clip, lo, hi, seq, *, batch_size):
    """Job ``j``: clip ``clip[j]``'s features with frames ``[lo[j], hi[j])`` set to the
    item's floor value, teacher-forced on ``seq[clip[j]]`` -> ``[J, S - 1]``, the
    log-probability of each next token (position i predicts ``seq[:, i + 1]``)."""
    module = _module(config, None, False)
    floor = _baseline(features, None)

    def one(job):
        c, a, b = job
        t = jnp.arange(features.shape[-1])
        x = jnp.where((t >= a) & (t < b), floor[c], features[c])
        logits = module.apply({"params": params}, x[None], tokens=seq[c][None])[0]
        logp = jax.nn.log_softmax(logits[:-1], axis=-1)
        return jnp.take_along_axis(logp, seq[c, 1:, None], axis=-1)[:, 0]

    return jax.lax.map(one, (clip, lo, hi), batch_size=batch_size)


def _token_logprob(logits, args, params, rules):
    """Target: ``log p(token[b] | prefix)`` at decoder position ``position[b]``."""
    row = jnp.take_along_axis(logits, args["position"][:, None, None], axis=1)[:, 0]
    logp = jax.nn.log_softmax(row, axis=-1)
    return jnp.take_along_axis(logp, args["token"][:, None], axis=-1)[:, 0]


def _deletion(m, items: Sequence[_Item], seq: np.ndarray, prompt_length: int, controls: int,
              batch_size: int) -> list[list[dict]]:
    """Per clip and word: the clean log-probability and its drop when the word's span or a
    span of the same length elsewhere is set to silence."""
    jobs = []  # (item, word or -1 for clean, control index or -1 for own, lo, hi)
    for b, it in enumerate(items):
        jobs.append((b, -1, -1, 0, 0))
        for k, (lo, hi) in enumerate(it.spans):
            jobs.append((b, k, -1, int(lo), int(hi)))
            jobs += [(b, k, c, a, e) for c, (a, e) in enumerate(_controls(it, k, controls))]
    padded = jobs + [jobs[0]] * (-len(jobs) % batch_size)  # whole chunks: one compilation
    cols = np.asarray([j[:1] + j[3:] for j in padded], np.int32).T
    logp = np.asarray(_deleted_logprobs(
        m.config, m.params, jnp.asarray(np.stack([it.features for it in items])),
        jnp.asarray(cols[0]), jnp.asarray(cols[1]), jnp.asarray(cols[2]), jnp.asarray(seq),
        batch_size=batch_size))[:len(jobs)]

    def word_score(row, it, k):  # text token t sits at position p + t, predicted at p + t - 1
        return float(sum(row[prompt_length + t - 1] for t in it.groups[k]))

    clean = {j[0]: logp[i] for i, j in enumerate(jobs) if j[1] < 0}
    out = [[{} for _ in it.spans] for it in items]
    for i, (b, k, c, lo, hi) in enumerate(jobs):
        if k < 0:
            continue
        it = items[b]
        rec = out[b][k]
        base = word_score(clean[b], it, k)
        drop = base - word_score(logp[i], it, k)
        if c < 0:
            rec.update(logp=base, drop_own=drop, elsewhere=[], drops_elsewhere=[])
        else:
            rec["elsewhere"].append([lo, hi])
            rec["drops_elsewhere"].append(drop)
    for recs in out:
        for rec in recs:
            rec["drop_elsewhere"] = (float(np.mean(rec["drops_elsewhere"]))
                                     if rec["drops_elsewhere"] else math.nan)
    return out


# --- the method's side ---------------------------------------------------------------------

def _parse_method(spec: str) -> tuple[str, str | None]:
    name, _, ref = spec.partition(":")
    if name not in TRANSCRIPT_METHODS:
        raise ValueError(f"unknown method {spec!r}; choose from {', '.join(TRANSCRIPT_METHODS)} "
                         "(NAME:none for reference=None)")
    if ref not in ("", "silence", "none"):
        raise ValueError(f"method {spec!r}: the reference after ':' is 'silence' or 'none'")
    return name, None if ref == "none" else "silence"


def _explain(m, items, spec, language, chunk, options):
    """``(relevance [B, n, n_mels, frames], shares {name: [B, n]}, extras)`` of
    :func:`attribute_transcript` teacher-forced on the items' texts."""
    name, reference = _parse_method(spec)
    with warnings.catch_warnings():  # the IG gap is reported in the table instead
        warnings.filterwarnings("ignore", message="integrated gradients: completeness gap")
        tr = attribute_transcript(
            m, features=np.stack([it.features for it in items]),
            num_frames=[it.num_frames for it in items], tokens=[it.tokens for it in items],
            method=name, reference=reference, language=language, chunk=chunk,
            **dict(options.get(name, {})))
    return np.asarray(tr.relevance), tr.shares, tr.extras


def _curves(m, items, relevance, seq, prompt_length, steps, chunk):
    """MoRF/LeRF over the clip's frames of every spanned word's tokens: ``(morf AUC, lerf
    AUC, ABPC)`` per token, in clip order. Tokens are run ``chunk`` at a time (the last
    chunk padded by repeating its first token), so one compilation serves them all."""
    jobs = [(b, t) for b, it in enumerate(items) for g in it.groups for t in g]
    out = []
    for s in range(0, len(jobs), chunk):
        part = jobs[s:s + chunk]
        part = part + [part[0]] * (chunk - len(part))
        b_idx = np.array([b for b, _ in part])
        t_idx = np.array([t for _, t in part])
        target = Target(_token_logprob, "token_log_probability", None, {
            "position": jnp.asarray(prompt_length + t_idx - 1, jnp.int32),
            "token": jnp.asarray(seq[b_idx, prompt_length + t_idx], jnp.int32)})
        c = perturbation_curves(
            m, np.stack([items[b].features for b in b_idx]), relevance[b_idx, t_idx],
            target, kwargs={"tokens": seq[b_idx]}, steps=steps, batch_size=2,
            valid_frames=np.array([items[b].num_frames for b in b_idx]))
        keep = min(chunk, len(jobs) - s)
        out += list(zip(c.morf_auc[:keep], c.lerf_auc[:keep], c.abpc[:keep], strict=True))
    return out


# --- the table ----------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class WordRow:
    """One method's numbers, means over words (localisation) or tokens (curves, shares)."""

    method: str
    share_in_span: float
    chance: float
    pointing_game: float
    abpc: float | None
    morf_auc: float | None
    lerf_auc: float | None
    padding_share: float | None
    prefix_share: float | None
    ig_gap: float | None
    words: int
    tokens: int


_COLUMNS = [("method", "method"), ("share in span", "share_in_span"), ("chance", "chance"),
            ("pointing game", "pointing_game"), ("ABPC (nats)", "abpc"),
            ("MoRF AUC", "morf_auc"), ("LeRF AUC", "lerf_auc"),
            ("|R| on padding", "padding_share"), ("|R| on prefix", "prefix_share"),
            ("IG gap (max)", "ig_gap"), ("words", "words"), ("tokens (curves)", "tokens")]


def _cell(v) -> str:
    if v is None:
        return "n/a"
    if isinstance(v, float):
        return "nan" if math.isnan(v) else f"{v:.3g}"
    return str(v)


@dataclasses.dataclass
class WordTable:
    """The result of :func:`word_faithfulness`.

    ``words``: one dict per spanned word (``clip``, ``word``, ``start``, ``end`` in s,
    ``span`` its frames ``[lo, hi)``, ``chance`` = span frames / clip frames, ``logp`` its
    clean log-probability, ``drop_own`` the drop of it when its span is silenced,
    ``elsewhere`` the equal-length spans silenced instead (frames), ``drops_elsewhere`` their
    drops and ``drop_elsewhere`` their mean).
    ``methods[name]``: per word ``share`` and ``pointing`` (in ``words`` order; NaN where the
    method was not run on that clip), per token ``morf``, ``lerf``, ``abpc`` (tokens of the
    spanned words, clip order) and ``padding``, ``prefix`` (shares of |R|), ``ig_gap``;
    ``errors[name]``: why a method could not run. ``info``: the settings.
    """

    words: list[dict]
    methods: dict[str, dict[str, list]]
    errors: dict[str, str]
    info: dict[str, Any]

    def rows(self) -> list[WordRow]:
        chance = np.array([w["chance"] for w in self.words])
        out = []
        for name, r in self.methods.items():
            share = np.asarray(r["share"], float)
            ran = ~np.isnan(share)

            def mean(key, r=r):
                return _mean(r[key]) if r.get(key) else None

            out.append(WordRow(
                method=name, share_in_span=_mean(share[ran]), chance=_mean(chance[ran]),
                pointing_game=_mean(np.asarray(r["pointing"], float)[ran]),
                abpc=mean("abpc"), morf_auc=mean("morf"), lerf_auc=mean("lerf"),
                padding_share=mean("padding"), prefix_share=mean("prefix"),
                ig_gap=float(np.nanmax(r["ig_gap"])) if r.get("ig_gap") else None,
                words=int(ran.sum()), tokens=len(r.get("abpc") or [])))
        return out

    def deletion(self) -> dict[str, float]:
        """The model's side: mean drop of a word's log-probability when its own span is
        silenced, when an equal-length span elsewhere is, and how often the first is larger."""
        own = np.array([w.get("drop_own", math.nan) for w in self.words])
        other = np.array([w.get("drop_elsewhere", math.nan) for w in self.words])
        ok = ~np.isnan(other)
        return {"words": int(ok.sum()), "drop_own": _mean(own[ok]),
                "drop_elsewhere": _mean(other[ok]),
                "own_larger": _mean((own[ok] > other[ok]).astype(float))}

    def _grid(self):
        head = [c for c, _ in _COLUMNS]
        body = [[_cell(getattr(r, f)) for _, f in _COLUMNS] for r in self.rows()]
        body += [[name, f"cannot run: {err}"] + [""] * (len(head) - 2)
                 for name, err in self.errors.items()]
        return head, body

    def caption(self) -> str:
        d = self.deletion()
        i = self.info
        return (f"{i['model']}, {i['clips']} clip(s), {d['words']} words. Deletion (the model): "
                f"silencing a word's own span lowers its log-probability by {d['drop_own']:.3g} "
                f"nats on average, an equal-length span elsewhere by {d['drop_elsewhere']:.3g} "
                f"(own larger for {d['own_larger']:.0%} of words). Share in span: of each word's "
                "positive relevance over the whole input (padding included), vs chance = span "
                "frames / clip frames; pointing game: top frame in the span; MoRF/LeRF: the "
                f"clip's frames set to silence in {i['steps']} steps by each token's frame "
                "relevance, ABPC = AUC(LeRF) - AUC(MoRF) of its log-probability; |R| shares "
                "per token (clip + padding + prefix = 1); means over words / tokens.")

    def markdown(self) -> str:
        return markdown_table(*self._grid(), self.caption())

    def text(self) -> str:
        return text_table(*self._grid(), self.caption())

    def to_dict(self) -> dict:
        return {"info": self.info, "words": self.words, "methods": self.methods,
                "errors": self.errors, "rows": [dataclasses.asdict(r) for r in self.rows()],
                "deletion": self.deletion()}

    @classmethod
    def from_dict(cls, d: Mapping) -> WordTable:
        return cls([dict(w) for w in d["words"]], {k: dict(v) for k, v in d["methods"].items()},
                   dict(d["errors"]), dict(d["info"]))

    @classmethod
    def merge(cls, tables: Sequence[WordTable]) -> WordTable:
        """Tables of the same model and clips run with different methods (e.g. the costly
        ones on their own) -> one table; the deletion numbers are the first run's that has
        them."""
        first = next((t for t in tables if any("drop_own" in w for w in t.words)), tables[0])
        for t in tables:
            if [(w["clip"], w["word"]) for w in t.words] != [(w["clip"], w["word"])
                                                            for w in first.words]:
                raise ValueError("merge: the tables cover different clips or words")
        methods, errors = {}, {}
        for t in tables:
            methods.update(t.methods)
            errors.update(t.errors)
        return cls(first.words, methods, errors, dict(first.info))


def word_faithfulness(
    m,
    clips: Sequence[SpeechClip],
    methods: Sequence[str] = WORD_METHODS,
    *,
    language: str | None = None,
    steps: int = 8,
    controls: int = 3,
    curves: bool = True,
    curve_clips: int | None = None,
    deletion: bool = True,
    method_clips: Mapping[str, int] | None = None,
    method_options: Mapping[str, Mapping] | None = None,
    chunk: int = 4,
    batch_size: int = 8,
) -> WordTable:
    """Word-aligned faithfulness of ``methods`` on a Whisper model with a decoder.

    ``clips``: :class:`~jaxspeech.assets.SpeechClip` with word spans (``read()`` -> 16 kHz
    wave, ``text``, ``words`` = ``(word, start_s, end_s)``; the spans name the text's words
    in order, punctuation aside). ``methods``: ``NAME[:none]`` (see the module doc).
    ``steps``: MoRF/LeRF steps (``curves=False`` skips the curves; ``curve_clips``: on the
    first N clips only, they cost ``2 steps`` forwards per token). ``controls``: how many
    equal-length spans elsewhere each word's deletion is compared with (``deletion=False``
    skips the deletion; :meth:`WordTable.merge` takes it from another run). ``method_clips``:
    run a costly method on the first N clips only (``{"integrated_gradients": 2}``);
    ``method_options``: keyword arguments of :func:`attribute_transcript` per method name
    (``{"integrated_gradients": {"steps": 64}}``). ``chunk``: tokens per vmapped backward
    and per perturbation run; ``batch_size``: edited copies per deletion forward.
    """
    from jaxspeech.tokenizer import WhisperTokenizer

    if m.kind != "whisper" or not m.config.has_decoder:
        raise ValueError("word faithfulness explains a Whisper decoder's tokens; this model has "
                         "no decoder")
    if not clips:
        raise ValueError("no clips with word spans given")
    specs = list(dict.fromkeys(methods))
    for spec in specs:
        _parse_method(spec)
    tok = WhisperTokenizer.from_model(m, language=language)
    items = [_prepare(m, tok, c, np.asarray(c.read(), np.float32), language) for c in clips]
    prompt = tok.sot_sequence(language=language) + [tok.no_timestamps]
    p = len(prompt)
    seq = _sequences(items, prompt, tok.eot)

    words = []
    deleted = (_deletion(m, items, seq, p, controls, batch_size) if deletion
               else [[{} for _ in it.spans] for it in items])
    for it, recs in zip(items, deleted, strict=True):
        for k, rec in enumerate(recs):
            lo, hi = it.spans[k]
            words.append({"clip": it.id, "word": it.words[k], "start": lo / FRAMES_PER_SECOND,
                          "end": hi / FRAMES_PER_SECOND, "span": [int(lo), int(hi)],
                          "chance": float((hi - lo) / it.num_frames), **rec})

    results, errors = {}, {}
    options = dict(method_options or {})
    for spec in specs:
        n_clips = dict(method_clips or {}).get(_parse_method(spec)[0], len(items))
        run = items[:max(1, n_clips)]
        try:
            relevance, shares, extras = _explain(m, run, spec, language, chunk, options)
        except (ValueError, KeyError, NotImplementedError) as e:
            errors[spec] = str(e)
            continue
        share, pointing = [], []
        for b, it in enumerate(items):
            if b >= len(run):
                share += [math.nan] * len(it.groups)
                pointing += [math.nan] * len(it.groups)
                continue
            word_rel = np.stack([relevance[b, list(g)].sum(axis=0) for g in it.groups])
            mask = _span_masks(it, word_rel.shape[-1])
            share += mass_in_mask(word_rel, mask).tolist()
            pointing += pointing_game(word_rel.sum(axis=1), mask).astype(float).tolist()
        tokens = [(b, t) for b, it in enumerate(run) for g in it.groups for t in g]
        rec = {"share": share, "pointing": pointing,
               "clips": [it.id for it in run]}
        if shares is not None:
            rec.update(padding=[float(shares["padding"][b, t]) for b, t in tokens],
                       prefix=[float(shares["prefix"][b, t]) for b, t in tokens])
        if "completeness_gap" in extras:
            rec["ig_gap"] = [float(extras["completeness_gap"][b, t]) for b, t in tokens]
        if curves and curve_clips != 0:
            c = _curves(m, run[:curve_clips], relevance, seq, p, steps, chunk)
            rec.update(morf=[float(v[0]) for v in c], lerf=[float(v[1]) for v in c],
                       abpc=[float(v[2]) for v in c])
        results[spec] = rec
    info = {"model": str(m.source or m.kind),
            "clips": len(items), "steps": steps, "controls": controls if deletion else None,
            "curve_clips": curve_clips,
            "method_clips": dict(method_clips or {}),
            "method_options": {k: dict(v) for k, v in options.items()}, "language": language}
    return WordTable(words, results, errors, info)


# --- IG's completeness, measured cheaply ----------------------------------------------------

@functools.partial(jax.jit, static_argnames=("config", "batch_size"))
def _path_slopes(config, params, seq, base, direction, alphas, *, batch_size):
    """``d/dα log p(token_j)`` at ``base + α · direction`` for every α and text token at once
    (one forward-mode jvp per α: the path derivative is what IG's relevance sums to), and
    the log-probabilities at both ends. ``seq [B, p + n]``: prompt + text."""
    module = _module(config, None, False)

    def logp(x):
        # With the maps' collection mutable, attention runs the plain tiled softmax, which
        # forward mode can go through (the fused core is a custom_vjp: reverse mode only).
        logits, _ = module.apply({"params": params}, x, tokens=seq, mutable=[KEEP_ATTENTION_MAPS])
        logits = logits[:, :-1]
        lp = jax.nn.log_softmax(logits, axis=-1)
        return jnp.take_along_axis(lp, seq[:, 1:, None], axis=-1)[..., 0]  # [B, n]

    def slope(a):
        return jax.jvp(logp, (base + a * direction,), (direction,))[1]

    slopes = jax.lax.map(slope, alphas, batch_size=batch_size)  # [A, B, S - 1]
    return slopes, logp(base + direction), logp(base)


def ig_completeness(m, features, tokens: Sequence[Sequence[int]], steps: Sequence[int] = (
        16, 32, 64, 128), *, language: str | None = None, batch_size: int = 4
                    ) -> dict[int, np.ndarray]:
    """``{steps: gap [B, n]}``: the per-token completeness gap that
    :func:`attribute_transcript` reports for ``method="integrated_gradients"`` with that many
    steps, ``|Σ R - (log p(x) - log p(silence))| / |log p(x) - log p(silence)|`` (NaN past an
    item's tokens), without the per-token backward passes.

    IG's relevance of token j sums to ``Σ_i w_i ∇f_j(b + α_i (x - b)) · (x - b)``, the
    Gauss-Legendre sum of the path derivative ``d f_j / dα``, so one jvp per node gives every
    token's sum at once: the cost is ``Σ steps`` jvps instead of ``Σ steps`` backward passes
    per token. ``features [B, n_mels, frames]``, ``tokens``: each item's text tokens."""
    from jaxspeech.tokenizer import WhisperTokenizer

    tok = WhisperTokenizer.from_model(m, language=language)
    prompt = tok.sot_sequence(language=language) + [tok.no_timestamps]
    p, n = len(prompt), max(len(t) for t in tokens)
    seq = np.full((len(tokens), p + n), tok.eot, np.int32)
    seq[:, :p] = prompt
    valid = np.zeros((len(tokens), n), bool)
    for b, row in enumerate(tokens):
        seq[b, p:p + len(row)] = row
        valid[b, :len(row)] = True
    x = jnp.asarray(features)
    base = _baseline(x, None)  # IG's baseline in attribute_transcript: each item's floor
    nodes = {s: _methods.ig_nodes(int(s)) for s in steps}
    alphas = np.concatenate([a for a, _ in nodes.values()])
    pad = -len(alphas) % batch_size
    slopes, end, start = _path_slopes(m.config, m.params, jnp.asarray(seq), base, x - base,
                                      jnp.asarray(np.pad(alphas, (0, pad))),
                                      batch_size=batch_size)
    slopes = np.asarray(slopes)[:len(alphas), :, p - 1:]
    delta = (np.asarray(end) - np.asarray(start))[:, p - 1:]
    out, i = {}, 0
    for s, (_, w) in nodes.items():
        total = np.tensordot(w, slopes[i:i + len(w)], axes=1)
        i += len(w)
        out[int(s)] = np.where(valid, np.abs(total - delta) / np.abs(delta), np.nan)
    return out


# --- command line ---------------------------------------------------------------------------

_CLI_HELP = """Word-aligned faithfulness of transcript attributions on speech with known word
spans: per method, the share of each word's positive relevance inside its own span
(vs chance), the pointing game, MoRF/LeRF per token (ABPC in nats), the |R| shares on the
padding and the text prefix; per word, the drop of its log-probability when its own span
is silenced vs an equal-length span elsewhere. Writes words.md and words.json to --out.

    jaxspeech evaluate-words MODEL_DIR --spans jaxspeech/assets/speech/clips.json --out ev/
    jaxspeech evaluate-words MODEL_DIR a.flac --spans spans.json --methods attnlrp attnlrp:none

--spans FILE: JSON {"clips": [{"file", "text", "words": [{"word", "start", "end"}]}]}
(seconds; files relative to FILE; the layout of the shipped clips.json). With audio files
given, only their entries are evaluated (matched by file name). Methods: NAME[:none]
(reference=None, plain x * grad), NAME an attribute_transcript method (the baselines
alignment_heads, rollout and gradcam among them).
"""


def add_commands(sub) -> None:
    """Register ``jaxspeech evaluate-words`` on the CLI's subparsers."""
    import argparse

    from jaxspeech.checkpoints import add_dtype_argument

    p = sub.add_parser("evaluate-words", help="word-aligned faithfulness of transcript "
                       "attributions (clips with word spans)", description=_CLI_HELP,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("inputs", nargs="+", metavar="CHECKPOINT [AUDIO]",
                   help="a Whisper checkpoint with a decoder, then optionally audio files")
    p.add_argument("--spans", required=True, help="JSON file of clips, texts and word spans")
    add_dtype_argument(p)
    p.add_argument("--methods", nargs="+", default=list(WORD_METHODS),
                   help="methods, NAME[:none] (space- or comma-separated)")
    p.add_argument("--steps", type=int, default=8, help="MoRF/LeRF steps (default 8)")
    p.add_argument("--no-curves", action="store_true", help="skip MoRF/LeRF")
    p.add_argument("--curve-clips", type=int, default=None,
                   help="MoRF/LeRF on the first N clips only (2 x steps forwards per token)")
    p.add_argument("--no-deletion", action="store_true", help="skip the span deletion")
    p.add_argument("--controls", type=int, default=3,
                   help="equal-length spans elsewhere per word's deletion (default 3)")
    p.add_argument("--clips", type=int, default=None, help="only the first N clips")
    p.add_argument("--method-clips", nargs="*", default=[], metavar="METHOD=N",
                   help="run METHOD on the first N clips only (e.g. integrated_gradients=2)")
    p.add_argument("--ig-steps", type=int, default=None, help="integrated gradients' steps")
    p.add_argument("--smoothgrad-samples", type=int, default=None, help="SmoothGrad's samples")
    p.add_argument("--language", default=None, help="language token of multilingual models (en)")
    p.add_argument("--format", choices=("text", "markdown"), default="text")
    p.add_argument("--out", required=True, help="output folder")
    p.set_defaults(fn=run)


def _pick_clips(clips: list[SpeechClip], files: Sequence[str], spans: str) -> list[SpeechClip]:
    if not files:
        return clips
    by_name = {c.path.name: c for c in clips}
    missing = [f for f in files if Path(f).name not in by_name]
    if missing:
        raise ValueError(f"{spans} has no word spans for {missing}")
    return [dataclasses.replace(by_name[Path(f).name], path=Path(f)) for f in files]


def run(args) -> int:
    """``jaxspeech evaluate-words``: print the table, write words.md and words.json."""
    from jaxspeech.checkpoints import resolve

    checkpoint, files = args.inputs[0], args.inputs[1:]
    clips = _pick_clips(read_spans(args.spans), files, args.spans)
    if args.clips is not None:
        clips = clips[:args.clips]
    if not clips:
        raise ValueError(f"{args.spans} lists no clip with word spans")
    for c in clips:
        if not c.path.is_file():
            raise FileNotFoundError(f"{c.path} (clip {c.id!r} of {args.spans}) does not exist")
    limits = {}
    for spec in args.method_clips:
        name, _, n = spec.partition("=")
        if not n.isdigit():
            raise ValueError(f"--method-clips takes METHOD=N, got {spec!r}")
        limits[name] = int(n)
    options = {}
    if args.ig_steps is not None:
        options["integrated_gradients"] = {"steps": args.ig_steps}
    if args.smoothgrad_samples is not None:
        options["smoothgrad"] = {"n_samples": args.smoothgrad_samples}
    methods_ = [m for spec in args.methods for m in spec.split(",") if m]
    model = resolve(checkpoint, dtype=args.compute_dtype).model
    table = word_faithfulness(model, clips, methods_, language=args.language, steps=args.steps,
                              controls=args.controls, curves=not args.no_curves,
                              curve_clips=args.curve_clips, deletion=not args.no_deletion,
                              method_clips=limits, method_options=options)
    table.info["model"] = checkpoint
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    print(table.markdown() if args.format == "markdown" else table.text())
    (out / "words.md").write_text(table.markdown() + "\n")
    (out / "words.json").write_text(json.dumps(table.to_dict(), indent=1))
    print(f"wrote {out / 'words.md'}, {out / 'words.json'}")
    return 0
