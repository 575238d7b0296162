"""The example notebooks: generated from notebooks/build.py, committed without outputs, and
executed here end to end (nbclient, a fresh python3 kernel, cwd a temporary folder) with
their key outputs checked: parity says ok, relevance sums and tables come out, figures are
drawn."""

import importlib.util
import re
import time
from datetime import datetime
from pathlib import Path

import nbformat
import pytest

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"
NAMES = ["01_quickstart.ipynb", "02_speaker_verification.ipynb", "03_clap_audio_text.ipynb",
         "04_faithfulness.ipynb", "05_interventions.ipynb"]


def _build_module():
    spec = importlib.util.spec_from_file_location("notebooks_build", NOTEBOOKS / "build.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_notebooks_are_generated_and_have_no_outputs():
    build = _build_module()
    assert sorted(build.NOTEBOOKS) == NAMES
    assert build.main(["--check"]) == 0, "run python notebooks/build.py"
    for name in NAMES:
        nb = nbformat.read(NOTEBOOKS / name, as_version=4)
        nbformat.validate(nb)
        assert nb.metadata.kernelspec.name == "python3"
        code = [c for c in nb.cells if c.cell_type == "code"]
        assert code and all(not c.outputs and c.execution_count is None for c in code), name
    assert all(name in (NOTEBOOKS / "README.md").read_text() for name in NAMES)


def _outputs(nb) -> tuple[str, int]:
    """All text the notebook printed or displayed (streams, markdown, plain), and the number
    of PNG images it displayed."""
    texts, images = [], 0
    for cell in nb.cells:
        for out in cell.get("outputs", []):
            if out.output_type == "stream":
                texts.append(out.text)
            elif out.output_type in ("display_data", "execute_result"):
                data = out.get("data", {})
                images += "image/png" in data
                texts.append(data.get("text/markdown", data.get("text/plain", "")))
    return "\n".join(texts), images


def _check_quickstart(text: str, images: int) -> None:
    assert "parity: ok" in text
    table = [line for line in text.splitlines() if line.startswith("| ")]
    stages = [line for line in table if line.startswith(("| features", "| output"))]
    assert len(stages) == 3 and all(line.rstrip().endswith("| ok |") for line in stages), table
    assert "FAIL" not in text
    gap = float(re.search(r"relative gap (\S+)", text).group(1))
    assert abs(gap) < 0.05, gap
    for method in ("attnlrp", "integrated_gradients"):
        assert re.search(rf"{method}\s+frames \(3000,\), waveform \(48000,\)", text), method
    assert images >= 3  # two heatmaps and the frames/waveform figure


def _check_speaker(text: str, images: int) -> None:
    sides = re.search(r"target per side \[(\S+)\s+(\S+)\] trial score (\S+)", text)
    assert sides and float(sides.group(1)) == pytest.approx(float(sides.group(3)), abs=1e-3)
    assert float(sides.group(2)) == pytest.approx(float(sides.group(3)), abs=1e-3)
    held = re.search(r"epsilon: conservation ratio (\S+) \+- (\S+) over 12 trials", text)
    mean, std = float(held.group(1)), float(held.group(2))
    assert 0.3 < mean < 0.55 and std < 0.1, (mean, std)  # about half: the pooling's product rule
    fit = re.search(r"all 20 items: summed relevance = (\S+) x score, correlation (\S+)", text)
    slope, corr = float(fit.group(1)), float(fit.group(2))
    assert 0.3 < slope < 0.55 and corr > 0.99, (slope, corr)  # tracks the score over [-1, 1]
    summed = re.search(r"summed relevance per side, gradient x input: \[(\S+)\s+(\S+)\]", text)
    assert all(abs(float(v)) < 0.05 for v in summed.groups())  # plain cosine: scale-invariant
    assert images >= 3  # both sides of the trial and the score vs relevance scatter


def _check_clap(text: str, images: int) -> None:
    assert "| clip | a dog barking | rain on a roof | a person speaking | a siren wailing |" in text
    assert text.count("top label") >= 2
    assert "relevance (2, 1, 1001, 64)" in text
    assert images >= 3  # a heatmap per clip and the per-frame curves


def _check_faithfulness(text: str, images: int) -> None:
    for method in ("gradient_x_input", "integrated_gradients", "attnlrp", "rollout"):
        row = next(line for line in text.splitlines() if line.startswith(f"| {method} |"))
        assert "cannot run" not in row and "nan" not in row, row
    assert "most mass in the planted region" in text
    for name in ("curves_frames.png", "curves_patches.png", "mprt.png"):
        assert name in text
    assert images >= 4  # the planted-evidence overlay and the three evaluation figures


def _check_interventions(text: str, images: int) -> None:
    assert "clean:     Stella bought seven red apples today" in text
    clean, corrupt = (float(v) for v in re.search(
        r"log p\(seven\): clean (\S+), corrupted (\S+)", text).groups())
    assert corrupt < clean - 2  # the spliced word changes what the model hears
    assert re.search(r"one call: 32 sites in \d+ s", text)
    rows = re.findall(r"\| layers\.(\d)\.hidden_state \| (seven|red) \| (\S+) \| (\S+) \|", text)
    assert len(rows) == 8, rows
    for _, which, effect, _ in rows:  # the word's frames carry it at every layer; red's do not
        if which == "seven":
            assert float(effect) < 0.5 * (corrupt - clean), rows
        else:
            assert abs(float(effect)) < 0.05 * (clean - corrupt), rows
    assert "attribution patching vs activation patching: pearson" in text
    assert "share of |relevance| in the frames of 'seven'" in text
    # ECAPA: patching block 0 or mfa whole gives the other voice's score exactly
    for site in ("blocks.0.hidden_state", "mfa.hidden_state"):
        assert re.search(rf"\| {re.escape(site)} \| \S+ \| 1\.00 \|", text), site
    assert images >= 1  # the layer x head map


def _seconds(cell) -> float:
    timing = cell.metadata.get("execution", {})
    if "iopub.execute_input" not in timing or "shell.execute_reply" not in timing:
        return float("nan")
    begin, end = (datetime.fromisoformat(timing[k].replace("Z", "+00:00"))
                  for k in ("iopub.execute_input", "shell.execute_reply"))
    return (end - begin).total_seconds()


CHECKS = {"01_quickstart.ipynb": _check_quickstart,
          "02_speaker_verification.ipynb": _check_speaker,
          "03_clap_audio_text.ipynb": _check_clap,
          "04_faithfulness.ipynb": _check_faithfulness,
          "05_interventions.ipynb": _check_interventions}


@pytest.mark.slow
@pytest.mark.parametrize("name", NAMES)
def test_notebook_executes(name, tmp_path):
    from nbclient import NotebookClient

    nb = nbformat.read(NOTEBOOKS / name, as_version=4)
    client = NotebookClient(nb, timeout=600, kernel_name="python3",
                            resources={"metadata": {"path": str(tmp_path)}})
    start = time.perf_counter()
    client.execute()  # raises CellExecutionError, with the cell and its traceback, on an error
    print(f"{name}: executed in {time.perf_counter() - start:.0f} s; per code cell (s):",
          [round(_seconds(c), 1) for c in nb.cells if c.cell_type == "code"])
    text, images = _outputs(nb)
    CHECKS[name](text, images)
