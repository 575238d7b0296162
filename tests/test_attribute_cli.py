"""``jaxspeech attribute``: the corpus runner on a list of files.

The same files through ``attribute`` and ``attribute-corpus`` give the same stored result
(windows for a 45 s clip, a 0.2 s clip cropped to its own frames, true lengths recorded),
the per-file ``.npz`` holds exactly what the store holds, and the exit status tells a
script whether every file was done.
"""

import json

import numpy as np
import pytest
import soundfile as sf

from jaxspeech.cli import main
from jaxspeech.corpus import open_results
from jaxspeech.data import synth
from jaxspeech.data.reference_checkpoints import ECAPA_SMALL, write_ecapa, write_whisper

RATE = 16000
HOP = 160  # Whisper's and ECAPA's frame hop at 16 kHz
# ECAPA_SMALL cut to one SE-Res2Net block of scale 2: a few times faster to compile
ECAPA_TINY = dict(ECAPA_SMALL, channels=[16, 16, 48], kernel_sizes=[5, 3, 1], dilations=[1, 2, 1],
                  attention_channels=8, res2net_scale=2, se_channels=8, lin_neurons=8)


@pytest.fixture(scope="module")
def clips(tmp_path_factory):
    """A 45 s clip (two Whisper windows) and a 0.2 s clip, as absolute paths."""
    root = tmp_path_factory.mktemp("clips")
    paths = {"long": root / "long.wav", "short": root / "short.wav"}
    sf.write(paths["long"], synth.harmonic_sweep(45.0, RATE), RATE)
    sf.write(paths["short"], synth.noise_bursts(0.2, RATE), RATE)
    return {k: str(v) for k, v in paths.items()}


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("ckpt")
    write_whisper(root / "whisper", (32, 1, 2), ffn_dim=64)  # d_model 32, 1 layer, 2 heads
    write_ecapa(root / "ecapa", ECAPA_TINY)
    return {"whisper": str(root / "whisper"), "ecapa": str(root / "ecapa")}


# frames of the clip's own audio (jaxspeech.corpus.batching.kept_frames): Whisper keeps the
# frames centred inside the clip, ceil(n / hop); ECAPA the frames its mask keeps, 1 + n // hop
OWN_FRAMES = {"whisper": lambda n: -(-n // HOP), "ecapa": lambda n: 1 + n // HOP}


@pytest.mark.parametrize("family", ["whisper", "ecapa"])
def test_attribute_stores_what_attribute_corpus_stores(family, clips, checkpoints, tmp_path, capsys):
    files = [clips["long"], clips["short"]]
    common = ["--method", "attnlrp", "--batch-size", "2", "--no-progress"]
    assert main(["attribute", checkpoints[family], *files, "--out", str(tmp_path / "a"),
                 *common]) == 0
    manifest = tmp_path / "files.csv"
    manifest.write_text("id,path\n" + "".join(f"{p},{p}\n" for p in files))
    assert main(["attribute-corpus", str(manifest), "--model", checkpoints[family],
                 "--out", str(tmp_path / "b"), *common]) == 0
    capsys.readouterr()
    a, b = open_results(tmp_path / "a"), open_results(tmp_path / "b")
    assert a.ids == b.ids and sorted(a.ids) == sorted(files)  # in commit order
    # one machinery: the run configurations differ in how the files were named, nothing else
    assert {k: v for k, v in a.config.items() if k != "source"} == \
        {k: v for k, v in b.config.items() if k != "source"}
    for path in files:
        ra, rb = a[path], b[path]
        # the same batches through the same compiled program: bit for bit
        np.testing.assert_array_equal(ra["relevance"], rb["relevance"])
        np.testing.assert_array_equal(ra["window_scores"], rb["window_scores"])
        assert ra["relevance_outside"] == rb["relevance_outside"]
        n = sf.info(path).frames
        assert ra["n_samples"] == n and ra["sample_rate"] == RATE  # the true length, recorded
        time_axis = 1 if family == "whisper" else 0  # Whisper [mels, T], ECAPA [T, mels]
        assert ra["relevance"].shape[time_axis] == OWN_FRAMES[family](n)  # cropped to the clip
        # the per-file npz holds the stored result and the features over the same frames
        with np.load(tmp_path / "a" / f"{path.rsplit('/', 1)[1][:-4]}.npz") as z:
            np.testing.assert_array_equal(z["relevance"], ra["relevance"])
            assert z["features"].shape == ra["relevance"].shape
            assert int(z["n_samples"]) == n and float(z["score"]) == pytest.approx(ra["score"])
            assert json.loads(str(z["config"]))["method"] == "attnlrp"
        assert (tmp_path / "a" / f"{path.rsplit('/', 1)[1][:-4]}.png").read_bytes()[:4] == b"\x89PNG"
    # Whisper: 45 s is two 30 s windows; the 0.2 s clip sits in one 30 s window whose
    # padding takes relevance (the output norm pools every encoder frame, padding
    # included), reported beside the cropped relevance. ECAPA masks its padding: one
    # window each and nothing outside (a masked frame gets exactly zero).
    long, short = a[clips["long"]], a[clips["short"]]
    if family == "whisper":
        assert long["n_windows"] == 2 and len(long["window_scores"]) == 2
        assert short["relevance_outside_abs"] > 0
    else:
        assert long["n_windows"] == 1 and short["relevance_outside_abs"] == 0.0


@pytest.fixture
def three_files(tmp_path):
    """One good clip, one unreadable file, one missing path."""
    root = tmp_path / "in"
    root.mkdir()
    sf.write(root / "good.wav", synth.harmonic_sweep(1.0, RATE), RATE)
    (root / "broken.wav").write_bytes(b"RIFF\x00\x00garbage")
    return root, [str(root / "good.wav"), str(root / "broken.wav"), str(root / "missing.wav")]


def test_attribute_exit_status_is_non_zero_unless_every_file_was_done(three_files, tmp_path, capsys):
    root, files = three_files
    out = tmp_path / "out"
    assert main(["attribute", "default", *files, "--out", str(out), "--no-progress"]) == 1
    captured = capsys.readouterr()
    assert "attributed 1 of 3 files" in captured.out
    assert "failed " + files[1] + ": AudioError" in captured.err
    assert "failed " + files[2] + ": FileNotFoundError" in captured.err
    assert sorted(p.name for p in out.glob("*.np[z]")) == ["good.npz"]  # what was done is kept
    assert (out / "good.png").exists()
    # --allow-failures: 0 when at least one file was done, the failures still reported
    assert main(["attribute", "default", *files, "--out", str(tmp_path / "lenient"),
                 "--no-progress", "--allow-failures"]) == 0
    assert "failed " + files[2] in capsys.readouterr().err
    assert main(["attribute", "default", *files[1:], "--out", str(tmp_path / "none"),
                 "--no-progress", "--allow-failures"]) == 1  # nothing done
    # fixing the inputs and resuming completes the run; nothing written before is lost
    sf.write(root / "broken.wav", synth.noise_bursts(0.5, RATE), RATE)
    assert main(["attribute", "default", *files[:2], "--out", str(out), "--no-progress",
                 "--resume"]) == 0
    assert sorted(p.name for p in out.glob("*.npz")) == ["broken.npz", "good.npz"]
    assert "1 items attributed, 0 failed, 1 already complete" in capsys.readouterr().err


def test_attribute_corpus_exit_status_counts_failed_items(three_files, tmp_path, capsys):
    root, files = three_files
    manifest = tmp_path / "m.csv"
    manifest.write_text("path\n" + "\n".join(files) + "\n")
    args = ["attribute-corpus", str(manifest), "--model", "default", "--no-progress"]
    assert main([*args, "--out", str(tmp_path / "strict")]) == 1
    assert "1 items attributed, 2 failed" in capsys.readouterr().err
    assert main([*args, "--out", str(tmp_path / "lenient"), "--allow-failures"]) == 0


def test_attribute_refuses_two_inputs_writing_one_name(tmp_path, capsys):
    (tmp_path / "x").mkdir()
    (tmp_path / "y").mkdir()
    for d in ("x", "y"):
        sf.write(tmp_path / d / "a.wav", synth.harmonic_sweep(0.5, RATE), RATE)
    assert main(["attribute", "default", str(tmp_path / "x" / "a.wav"), str(tmp_path / "y" / "a.wav"),
                 "--out", str(tmp_path / "out")]) == 2
    assert "would both write a.npz" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()  # refused before anything ran


MODEL_COMMANDS = ("attribute", "attribute-corpus", "evaluate", "evaluate-words", "explain-transcript",
                  "probe", "transcribe")


def test_every_command_that_runs_a_model_takes_a_compute_dtype(capsys):
    from jaxspeech.cli import build_parser

    parser = build_parser()
    commands = next(a for a in parser._actions if a.dest == "command").choices
    for name in MODEL_COMMANDS:
        options = {o for a in commands[name]._actions for o in a.option_strings}
        assert "--compute-dtype" in options, name
    with pytest.raises(SystemExit) as exit_:
        main(["attribute", "default", "x.wav", "--out", "o", "--compute-dtype", "float64"])
    assert exit_.value.code == 2
    assert "invalid choice: 'float64'" in capsys.readouterr().err


def test_compute_dtype_runs_the_model_in_it_and_is_part_of_the_run(three_files, tmp_path, capsys):
    _, files = three_files
    runs = {}
    for dtype in ("float32", "bfloat16"):
        out = tmp_path / dtype
        assert main(["attribute", "default", files[0], "--out", str(out), "--no-progress",
                     "--compute-dtype", dtype]) == 0
        runs[dtype] = open_results(out)
    assert runs["bfloat16"].config["config"]["dtype"] == "bfloat16"
    low, ref = (np.asarray(runs[d][files[0]]["relevance"], np.float64) for d in ("bfloat16", "float32"))
    assert low.dtype == ref.dtype and low.shape == ref.shape
    # the threshold tests/test_mixed_precision.py states for bfloat16 relevance
    assert np.corrcoef(low.ravel(), ref.ravel())[0, 1] >= 0.99
    # one folder never mixes two: resuming the bfloat16 run in float32 is refused
    capsys.readouterr()
    assert main(["attribute", "default", files[0], "--out", str(tmp_path / "bfloat16"),
                 "--no-progress", "--resume"]) == 2
    assert "(config.dtype: 'bfloat16' -> 'float32')" in capsys.readouterr().err
