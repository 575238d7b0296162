"""The jaxspeech command: convert, info, compare (exit codes and output)."""

import json

import numpy as np
import pytest
import soundfile as sf

import jaxspeech.compare
from jaxspeech.cli import main
from jaxspeech.data import synth
from jaxspeech.data.reference_checkpoints import write_whisper


@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory):
    path = tmp_path_factory.mktemp("hf")
    write_whisper(path, (32, 1, 2), ffn_dim=64)
    return path


def test_convert_then_info_reports_kind_config_and_count(hf_folder, tmp_path, capsys):
    assert main(["convert", str(hf_folder), str(tmp_path / "out")]) == 0
    assert main(["info", str(tmp_path / "out"), "--json"]) == 0
    info = json.loads(capsys.readouterr().out.split("\n", 1)[1])
    assert info["kind"] == "whisper" and info["config"]["d_model"] == 32
    encoder = 32 * 80 * 3 + 32 + 32 * 32 * 3 + 32 + 1500 * 32 + (
        4 * 32 * 32 + 3 * 32 + 2 * 32 * 64 + 64 + 32 + 4 * 32) + 2 * 32
    # the folder's decoder: tokens (vocab 64) and 448 positions, one layer with self- and
    # cross-attention (k without bias), the MLP and 3 norms, then the final norm
    decoder = 64 * 32 + 448 * 32 + 2 * (4 * 32 * 32 + 3 * 32) + (2 * 32 * 64 + 64 + 32) + 3 * 64 + 64
    assert info["parameters"] == encoder + decoder
    # converting onto an existing folder is refused and leaves it intact
    assert main(["convert", str(hf_folder), str(tmp_path / "out")]) == 2
    assert (tmp_path / "out" / "jaxspeech.json").exists()


def test_compare_on_given_audio_passes_and_prints_a_table(hf_folder, tmp_path, capsys):
    sf.write(tmp_path / "a.wav", synth.harmonic_sweep(2.0, 16000), 16000)
    sf.write(tmp_path / "b.flac", synth.noise_bursts(3.0, 16000), 16000)
    code = main(["compare", str(hf_folder), str(tmp_path / "a.wav"), str(tmp_path / "b.flac"),
                 "--format", "markdown"])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "| features | 2x80x3000 |" in out and "| output (end to end) | 2x1500x32 |" in out
    assert "transformers" in out and "FAIL" not in out


def test_compare_exits_non_zero_above_tolerance(hf_folder, monkeypatch, capsys):
    monkeypatch.setattr(jaxspeech.compare, "TOLERANCE", 0.0)
    assert main(["compare", str(hf_folder)]) == 1
    assert "FAIL" in capsys.readouterr().out


def test_errors_are_one_line_not_a_traceback(tmp_path, capsys):
    assert main(["info", str(tmp_path / "missing")]) == 2
    assert "error: no such checkpoint" in capsys.readouterr().err


def test_generated_clips_are_speech_like_and_unequal():
    clips = jaxspeech.compare.default_clips(16000)
    assert len({c.shape[0] for c in clips}) == 2 and all(np.isfinite(c).all() for c in clips)


# --- checkpoint specs: default and init:PRESET everywhere -----------------------------------

def test_default_and_init_are_checkpoints_for_info_and_convert(tmp_path, capsys):
    import jax

    import jaxspeech as js

    assert main(["info", "default", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["kind"] == "whisper" and info["config"]["d_model"] == 64
    # convert default writes the shipped model as a jaxspeech folder, weights unchanged
    assert main(["convert", "default", str(tmp_path / "default")]) == 0
    shipped, saved = js.default_model()[0], js.load(tmp_path / "default")
    assert saved.config == shipped.config
    for a, b in zip(jax.tree.leaves(shipped.params), jax.tree.leaves(saved.params), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    # convert init:PRESET writes the preset with random weights
    assert main(["convert", "init:whisper-tiny", str(tmp_path / "tiny")]) == 0
    assert js.load(tmp_path / "tiny").config == js.presets()["whisper-tiny"]
    assert "init:whisper-tiny (whisper" in capsys.readouterr().out


def test_compare_refuses_checkpoints_without_a_pytorch_original(capsys):
    for spec in ("default", "init:whisper-tiny"):
        assert main(["compare", spec]) == 2
        assert "has no PyTorch original" in capsys.readouterr().err


def test_presets_are_listed_by_info_and_in_every_checkpoint_help(capsys):
    import jaxspeech as js

    names = list(js.presets())  # read at run time: new presets show up by themselves
    assert main(["info", "--presets"]) == 0
    listed = capsys.readouterr().out
    assert all(f"  {name} " in listed for name in names)
    for command in ("attribute", "attribute-corpus", "evaluate", "probe", "info", "convert"):
        with pytest.raises(SystemExit):
            main([command, "--help"])
        text = "".join(capsys.readouterr().out.split())  # argparse wraps lines, even at hyphens
        assert "init:PRESET" in text and "'default'" in text, command
        assert all(name in text for name in names), command


def test_wrong_checkpoint_specs_say_what_to_write(capsys):
    assert main(["info", "init:no-such-preset"]) == 2
    assert "unknown preset 'no-such-preset'" in capsys.readouterr().err
    assert main(["info", "whisper-tiny"]) == 2  # a preset name where a path is expected
    assert "write init:whisper-tiny" in capsys.readouterr().err
    assert main(["probe", "planted:8", "--model", "whisper-tiny"]) == 2
    assert "write init:whisper-tiny" in capsys.readouterr().err


# --- titles name the target as the user gave it ----------------------------------------------

def test_evaluate_names_the_target_as_given(tmp_path, capsys):
    sf.write(tmp_path / "a.wav", synth.harmonic_sweep(1.0, 16000), 16000)
    assert main(["evaluate", "default", str(tmp_path / "a.wav"), "--target", "output-norm",
                 "--methods", "gradient_x_input", "--no-mprt", "--steps", "2",
                 "--out", str(tmp_path / "ev")]) == 0
    capsys.readouterr()
    result = json.loads((tmp_path / "ev" / "results.json").read_text())
    assert result["info"]["target"] == "output-norm"  # not the Target's name, layer_norm
    assert "target output-norm" in (tmp_path / "ev" / "table.md").read_text()


def test_target_labels_spell_targets_as_the_command_line_does(hf_folder):
    from argparse import Namespace

    from jaxspeech.checkpoints import resolve
    from jaxspeech.corpus.cli import target_label

    whisper, shipped = resolve(str(hf_folder)), resolve("default")
    assert target_label(Namespace(target="output-norm"), whisper) == "output-norm"
    assert target_label(Namespace(target=None), whisper) == "default (output-norm)"
    assert target_label(Namespace(target="default"), shipped) == "default (linear_probe_predicted)"


# --- pictures a person can read ----------------------------------------------------------------

def _figure_parts(fig):
    """The relevance axes (RdBu image), its colour bar, and every text of the figure."""
    rel_ax = next(ax for ax in fig.axes if ax.images and ax.images[0].get_cmap().name == "RdBu_r"
                  and ax.get_ylabel() == "mel bin")
    bar_ax = next(ax for ax in fig.axes if "target units" in ax.get_ylabel())
    texts = [t.get_text() for ax in fig.axes for t in ax.texts] + [ax.get_title(loc="left")
                                                                  for ax in fig.axes]
    return rel_ax, bar_ax, texts


def test_heatmap_crops_to_the_clip_scales_robustly_and_draws_evidence():
    from matplotlib.patches import Rectangle

    from jaxspeech.attribution.plot import heatmap

    rng = np.random.default_rng(0)
    features = rng.standard_normal((80, 3000)).astype(np.float32)  # Whisper's 30 s window
    relevance = rng.standard_normal((80, 3000)).astype(np.float32)
    relevance[5, 7] = 1e4  # one extreme feature: it must not set the colour scale
    relevance[:, 200:] *= 0.5  # padding after the 2 s clip
    wave = rng.standard_normal(32000).astype(np.float32)
    fig = heatmap(None, wave, features, relevance, time_axis=2, sample_rate=16000, hop_length=160,
                  title="a.wav: attnlrp, target output-norm", seconds=2.0,
                  spans=[(0.1, 0.5, "quick"), (0.6, 1.1, "brown")], boxes=[(1.2, 1.4, 20, 32)])
    rel_ax, bar_ax, texts = _figure_parts(fig)
    image = rel_ax.images[0]
    assert image.get_array().shape == (80, 200) and rel_ax.get_xlim() == (0.0, 2.0)  # cropped
    bound = np.percentile(np.abs(relevance[:, :200]), 99)
    assert image.norm.vmax == pytest.approx(bound) and image.norm.vmin == pytest.approx(-bound)
    assert "relevance per feature (target units)" in bar_ax.get_ylabel()
    inside, outside = np.abs(relevance[:, :200]).sum(), np.abs(relevance[:, 200:]).sum()
    share = round(100 * outside / (inside + outside))
    assert any(f"{share} % of |R| fell outside the clip" in t for t in texts)
    assert any("target output-norm" in t for t in texts)
    assert {"quick", "brown"} <= set(texts)  # word spans, labelled
    boxes = [p for p in rel_ax.patches if isinstance(p, Rectangle)]
    assert [(b.get_x(), b.get_y(), b.get_width(), b.get_height()) for b in boxes] == \
        [(1.2, 20, pytest.approx(0.2), 12)]


def test_curve_legends_sit_beside_the_curves():
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    from jaxspeech.evaluate.perturbation import Curves
    from jaxspeech.evaluate.table import Table

    steps = np.linspace(0, 1, 6)[None]
    curves = {m: {"frames": Curves(1 - steps * k, 1 - steps / k, steps, np.array([10]), "frames")}
              for k, m in ((2, "attnlrp"), (3, "saliency"), (4, "gradient_x_input"))}
    fig = Table([], curves, {}, {"target": "output-norm"}).figures()["curves_frames.png"]
    FigureCanvasAgg(fig).draw()
    ax = fig.axes[0]
    legend, box = ax.get_legend().get_window_extent(), ax.get_window_extent()
    assert legend.x0 >= box.x1  # right of the axes: covers no curve
    assert ax.get_ylabel() == "target (output-norm)"
