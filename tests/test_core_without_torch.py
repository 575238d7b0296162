"""``pip install -e .`` (no extras) is a working library: with the PyTorch stack absent,
jaxspeech imports, makes and saves models, loads the checkpoints users have, explains,
evaluates and runs the main job (``jaxspeech demo``, whose outputs are checked here).

The checkpoints are written here by the reference libraries (this process has the test
extra); a child interpreter then runs the core with every reference package made
unimportable, as on a machine where they were never installed, and reports which
steps ran and which blocked modules it imported (none may be). To cover a new entry
point, add a step to ``STEPS``.
"""

import subprocess
import sys
import textwrap

import pytest

BLOCKED = ("torch", "torchaudio", "torchvision", "transformers", "speechbrain", "lxt", "zennit",
           "captum", "ctranslate2", "whisper")

# Installed first in the child: any import of a blocked package (or a submodule) fails as a
# missing package does, ModuleNotFoundError naming it.
BLOCKER = f"""
import importlib.abc, sys
BLOCKED = {set(BLOCKED)!r}
class _NotInstalled(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in BLOCKED:
            raise ModuleNotFoundError(f"No module named {{name!r}} (blocked: not in the core)",
                                      name=name)
        return None
sys.meta_path.insert(0, _NotInstalled())
"""

# (name, code) run in order in one child; the checkpoint folders are in the working directory.
STEPS = [
    ("import", """
        import numpy as np
        import jaxspeech as js
        import jaxspeech.evaluate
        from jaxspeech.cli import main
        rng = np.random.default_rng(0)
        wave = (0.1 * rng.standard_normal((2, 16000))).astype(np.float32)  # 1 s, 16 kHz
    """),
    ("init, save and load a jaxspeech folder", """
        m = js.init("whisper-tiny", encoder_layers=1, decoder_layers=0, max_source_positions=100)
        m.save("js_folder")
        back = js.load("js_folder")
        assert back.config == m.config and back.extras["format"] == "jaxspeech"
        np.testing.assert_array_equal(np.asarray(back(wave)), np.asarray(m(wave)))
    """),
    ("load an HF Whisper folder (safetensors)", """
        hf = js.load("hf_safetensors")
        assert hf.kind == "whisper" and hf.extras["format"] == "hf"
    """),
    ("load an HF Whisper folder (pytorch_model.bin, read without torch)", """
        np.testing.assert_array_equal(np.asarray(js.load("hf_bin")(wave)), np.asarray(hf(wave)))
    """),
    ("load a SpeechBrain ECAPA folder (.ckpt, read without torch)", """
        assert js.load("speechbrain").kind == "ecapa"
    """),
    ("attribute", """
        res = js.attribute(hf, wave, target=js.targets.output_norm(), method="attnlrp")
        assert res.relevance.shape == hf.features(wave).shape
        assert np.isfinite(np.asarray(res.relevance)).all()
    """),
    ("evaluate the shipped default model", """
        from jaxspeech.assets import demo_clips
        model, target = js.default_model()
        files, labels, masks = demo_clips()
        clips = np.stack([js.audio.read(f, model.sample_rate) for f in files[:2]])
        table = jaxspeech.evaluate.evaluate(model, clips, target, ["gradient_x_input"],
                                            masks=masks[:2], steps=2, mprt=False)
        assert "gradient_x_input" in table.markdown()
    """),
    # CLAP's text side: the RoBERTa tower and its tokenizer.json run in JAX and tokenizers
    ("CLAP text embeddings, zero-shot and a text target (ClapModel folder)", """
        clap = js.load("clap")
        text = js.clap_text_embeddings(clap, ["a dog barking", "rain on a roof"])
        assert text.shape == (2, 512) and np.isfinite(text).all()
        wave48 = (0.1 * rng.standard_normal((1, 48000))).astype(np.float32)
        probs = np.asarray(js.zero_shot(clap, wave48, ["a dog barking", "rain on a roof"]))
        assert probs.shape == (1, 2) and abs(probs.sum() - 1) < 1e-5
        target = js.targets.text_similarity(["a dog barking"], model=clap)
        from jaxspeech.corpus.targets import parse
        assert parse("text:rain on a roof", clap).fixed.name == "text_similarity"
    """),
    ("jaxspeech demo --help", """
        try:
            main(["demo", "--help"])
        except SystemExit as e:
            assert e.code == 0, e.code
    """),
    # The README's main job, here rather than in a test of its own (it ran twice per CI run),
    # reduced to one method per part and one speech clip: the toy part's heatmaps and table,
    # and the real-speech part (real tiny.en through the CTranslate2 reader, the tokenizer,
    # transcription, word timestamps, every word explained, the word table).
    ("jaxspeech demo (one method per part, one speech clip)", """
        import json
        from pathlib import Path
        assert main(["demo", "--out", "demo", "--methods", "attnlrp", "--steps", "4",
                     "--no-mprt", "--speech-clips", "1", "--speech-methods", "attnlrp"]) == 0
        out = Path("demo")
        for f in files:
            assert (out / "attnlrp" / f"{f.stem}.png").stat().st_size > 0
            assert (out / "attnlrp" / f"{f.stem}.npz").exists()
        rows = {r["method"]: r for r in json.loads((out / "results.json").read_text())["rows"]}
        # the shipped model's evidence is where the LRP relevance goes (measured: 0.40 in the
        # mask, which covers ~1% of the spectrogram; pointing game 7/8)
        assert rows["attnlrp"]["mass_in_mask"] > 0.2 and rows["attnlrp"]["pointing_game"] >= 0.5
        assert (out / "table.md").read_text().startswith("| method |")
        speech = out / "speech"
        assert (speech / "stella_rp.png").stat().st_size > 10_000
        assert (speech / "stella_rp.npz").exists() and (speech / "stella_rp_words").is_dir()
        assert "| attnlrp |" in (speech / "words.md").read_text()
    """),
]

REPORT = """
leaked = sorted(m for m in sys.modules if m.partition(".")[0] in BLOCKED)
print("blocked modules imported:", leaked)
"""


def _child_script() -> str:
    parts = [BLOCKER]
    for name, code in STEPS:
        parts += [textwrap.dedent(code), f"print('step done:', {name!r}, flush=True)\n"]
    return "\n".join(parts + [REPORT])


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """Folders written by transformers and SpeechBrain themselves (reference_checkpoints)."""
    from jaxspeech.data.reference_checkpoints import (
        ECAPA_SMALL,
        write_clap,
        write_ecapa,
        write_whisper,
    )

    folder = tmp_path_factory.mktemp("core")
    small = dict(size=(64, 1, 2), max_source_positions=100)  # d_model, layers, heads; 2 s window
    write_whisper(folder / "hf_safetensors", **small, safe_serialization=True)
    write_whisper(folder / "hf_bin", **small, safe_serialization=False)
    write_ecapa(folder / "speechbrain", ECAPA_SMALL)
    # a small ClapModel with its text tower and tokenizer.json (test_clap_text's geometry)
    write_clap(folder / "clap", dict(patch_embeds_hidden_size=16, depths=[2, 1, 1],
                                     num_attention_heads=[2, 2, 4], hidden_size=64, patch_size=8,
                                     patch_stride=[8, 8], window_size=8), text_tower=True)
    return folder


def test_the_core_runs_with_no_torch_installed(checkpoints):
    run = subprocess.run([sys.executable, "-c", _child_script()], cwd=checkpoints,
                         capture_output=True, text=True, timeout=900)
    done = [line.removeprefix("step done: ") for line in run.stdout.splitlines()
            if line.startswith("step done: ")]
    missing = [name for name, _ in STEPS if name not in done]
    assert run.returncode == 0 and not missing, (
        f"steps not done: {missing}\n--- stderr ---\n{run.stderr[-4000:]}")
    assert "blocked modules imported: []" in run.stdout, run.stdout[-2000:]
    # the main job's printout: the toy clips' labels, the table, what real tiny.en wrote
    assert "| attnlrp |" in run.stdout and "labels [" in run.stdout
    assert "Whisper tiny.en wrote 'Stella bought seven red apples today" in run.stdout


def test_the_blocker_blocks():
    """The child really cannot import the reference stack (else the test above proves nothing)."""
    code = BLOCKER + "\ntry:\n    import torch\nexcept ModuleNotFoundError as e:\n" \
        "    print('refused', e.name)\n"
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=120, check=True)
    assert run.stdout.strip() == "refused torch"
