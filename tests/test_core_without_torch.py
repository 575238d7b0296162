"""``pip install -e .`` (no extras) is a working library: with the PyTorch stack absent,
jaxspeech imports, makes and saves models, loads the checkpoints users have, explains,
evaluates and runs the main job.

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
    # the real-speech part too (real tiny.en through the CTranslate2 reader, the tokenizer,
    # transcription, word timestamps), on one clip and one method to keep the child short
    ("jaxspeech demo (one method, one speech clip)", """
        assert main(["demo", "--out", "demo", "--methods", "gradient_x_input", "--steps", "2",
                     "--no-mprt", "--speech-clips", "1", "--speech-methods",
                     "gradient_x_input"]) == 0
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


def test_the_blocker_blocks():
    """The child really cannot import the reference stack (else the test above proves nothing)."""
    code = BLOCKER + "\ntry:\n    import torch\nexcept ModuleNotFoundError as e:\n" \
        "    print('refused', e.name)\n"
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=120, check=True)
    assert run.stdout.strip() == "refused torch"
