"""``jaxspeech explain-transcript CKPT AUDIO... --method attnlrp --out DIR``.

For each audio file: Whisper transcribes it (or ``--text`` is teacher-forced), every token
is explained in one call (:func:`jaxspeech.attribute_transcript`), word timestamps come
from the alignment heads, and the results are written:

  DIR/<name>.npz            relevance [tokens, n_mels, clip frames] (cropped to the clip),
                            prefix_relevance [tokens, positions], score [tokens], tokens,
                            shares (clip / padding / prefix per token), words (JSON), config
  DIR/<name>.png            the clip's log-mel with the words' spans, one relevance row per word
  DIR/<name>_words/NN_word.png   each word's relevance over time x frequency

Audio longer than Whisper's 30 s window is cut into 30 s windows, each explained on its
own (``<name>.w0``, ``<name>.w1``, ...). Files are converted to 16 kHz mono as they are
read (and the log says so). Exit status 0 only if every file was explained.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import numpy as np


def add_commands(sub) -> None:
    from jaxspeech.attribution.transcript import TRANSCRIPT_METHODS
    from jaxspeech.checkpoints import add_dtype_argument

    p = sub.add_parser("explain-transcript", help="explain every word Whisper wrote; .npz + .png",
                       description=__doc__)
    p.add_argument("checkpoint", help="a Whisper checkpoint with a decoder (HF / OpenAI .pt / "
                                      "CTranslate2 / jaxspeech folder)")
    p.add_argument("audio", nargs="+", help="audio files")
    add_dtype_argument(p)
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--method", default="attnlrp", choices=TRANSCRIPT_METHODS,
                   help="an LRP rule set (default attnlrp), a gradient method, or a map over the "
                        "encoder's frames (gradcam, rollout, gradient_rollout, alignment_heads)")
    p.add_argument("--layer", default=None,
                   help="gradcam's encoder layer (default: the last layer's hidden_state)")
    p.add_argument("--text", default=None,
                   help="explain this text instead of the model's own transcript (one file)")
    p.add_argument("--reference", choices=("silence", "none"), default="silence",
                   help="relevance of x - silence (default; nothing on the 30 s padding) or x")
    p.add_argument("--target", choices=("logprob", "logit"), default="logprob")
    p.add_argument("--language", default=None, help="language code (multilingual models)")
    p.add_argument("--steps", type=int, default=None, help="integrated-gradients steps")
    p.add_argument("--no-png", action="store_true", help="write .npz only")
    p.set_defaults(fn=run)


def explain_clip(m, wave: np.ndarray, *, text: str | None = None, method: str = "attnlrp",
                 reference: str | None = "silence", target: str = "logprob",
                 language: str | None = None, **options):
    """One clip (<= 30 s, 16 kHz) -> ``(TranscriptAttribution, features [n_mels, 3000],
    words: [(word, start_s, end_s, token indices)])``: explained, with word timestamps."""
    import jaxspeech as js
    from jaxspeech import timing
    from jaxspeech.tokenizer import WhisperTokenizer

    tr = js.attribute_transcript(m, wave[None], text=text, method=method, reference=reference,
                                 target=target, language=language, **options)
    features = m.features(wave[None])
    tok = WhisperTokenizer.from_model(m)
    prompt = tok.sot_sequence(language=language)
    words = []
    if tr.tokens[0]:
        frames = np.minimum(np.asarray([len(wave)]) // 160, m.config.n_frames)
        timed = timing.word_timestamps(m, features, tr.tokens, prompt, frames,
                                       tok.split_to_word_tokens)[0]
        pos = 0  # timing merges punctuation into words: follow its token counts
        for w in timed:
            words.append((w.word, w.start, w.end, tuple(range(pos, pos + len(w.tokens)))))
            pos += len(w.tokens)
    return tr, np.asarray(features)[0], words


def write_clip(out: Path, name: str, tr, features: np.ndarray, wave: np.ndarray, words,
               config: dict, png: bool = True, spans=None) -> None:
    """The ``.npz`` (written atomically) and the pictures of one explained clip; ``spans``
    (``(start_s, end_s, word)``, one per word) are drawn instead of the word timestamps
    (a clip's known spans)."""
    from jaxspeech.attribution.plot import heatmap
    from jaxspeech.attribution.transcript_plot import transcript_figure

    n = int(tr.valid[0].sum())
    frames = int(tr.num_frames[0])
    rel = np.asarray(tr.relevance[0, :n, :, :frames])
    arrays = {"relevance": rel, "score": np.asarray(tr.score[0, :n]),
              "tokens": np.asarray(tr.tokens[0], np.int64),
              **{f"share_{k}": v[0, :n] for k, v in tr.shares.items()}}
    if tr.prefix_relevance is not None:
        arrays["prefix_relevance"] = np.asarray(tr.prefix_relevance[0, :n])
    meta = {**config, "token_text": tr.token_text[0], "prompt_length": tr.prompt_length,
            "clip_frames": frames,
            "words": [{"word": w, "start": s, "end": e, "tokens": list(i)} for w, s, e, i in words]}
    tmp = out / f"{name}.tmp.npz"
    np.savez(tmp, **arrays, meta=json.dumps(meta))
    os.replace(tmp, out / f"{name}.npz")
    if not png:
        return
    if spans is None or len(spans) != len(words):
        spans = [(s, e, w) for w, s, e, _ in words]
    title = f"{name}: {tr.method}, target {tr.target}, reference {tr.reference or 'none'}"
    transcript_figure(str(out / f"{name}.png"), tr, 0, features=features, wave=wave,
                      spans=spans, title=title, words=[(w, i) for w, _, _, i in words])
    word_dir = out / f"{name}_words"
    word_dir.mkdir(exist_ok=True)
    for k, (word, _, _, idx) in enumerate(words):
        label = "".join(c for c in word.strip() if c.isalnum()) or "punct"
        heatmap(str(word_dir / f"{k:02d}_{label}.png"), wave, features[:, :frames],
                rel[list(idx)].sum(axis=0), time_axis=2, sample_rate=16000, hop_length=160,
                seconds=len(wave) / 16000, spans=[spans[k]],
                title=f"{name}: '{word.strip()}' (log p {float(tr.score[0, list(idx)].sum()):.2f}),"
                      f" {tr.method}", outside=float(np.nanmean(tr.shares["padding"][0, list(idx)])))


def run(args) -> int:
    from tqdm import tqdm

    import jaxspeech as js
    from jaxspeech import audio
    from jaxspeech.checkpoints import resolve

    if args.text is not None and len(args.audio) > 1:
        raise ValueError("--text explains one file; give one audio file with it")
    m = resolve(args.checkpoint, dtype=args.compute_dtype).model
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    options = {} if args.steps is None else {"steps": args.steps}
    if args.layer is not None:
        options["layer"] = args.layer
    reference = None if args.reference == "none" else "silence"
    config = {"checkpoint": args.checkpoint, "method": args.method, "reference": args.reference,
              "target": args.target, "compute_dtype": m.dtype, "jaxspeech": js.__version__}
    window = m.config.n_samples
    failures, done = [], 0
    for path in tqdm(args.audio, unit="file", desc=f"explain-transcript {args.method}"):
        try:
            wave = audio.read(path, m.sample_rate)
            pieces = [wave[k:k + window] for k in range(0, max(len(wave), 1), window)]
            for k, piece in enumerate(pieces):
                name = Path(path).stem + (f".w{k}" if len(pieces) > 1 else "")
                tr, features, words = explain_clip(
                    m, piece, text=args.text, method=args.method, reference=reference,
                    target=args.target, language=args.language, **options)
                write_clip(out, name, tr, features, piece, words,
                           {**config, "audio": os.path.abspath(path), "window": k,
                            "window_start_s": k * window / m.sample_rate},
                           png=not args.no_png)
            done += 1
        except (OSError, ValueError) as e:
            failures.append((path, str(e)))
    print(f"explained {done} of {len(args.audio)} files -> {out}")
    for path, why in failures:
        print(f"  failed {path}: {why}", file=sys.stderr)
    return 0 if not failures else 1
