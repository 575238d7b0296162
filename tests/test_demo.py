"""The README's main job (`jaxspeech demo`) on the shipped model and clips, reduced to one
method per part (every method's own path is tested in the attribution and evaluation tests)."""

import json

from jaxspeech.assets import demo_clips
from jaxspeech.cli import main


def test_main_job_writes_heatmaps_and_the_evaluation_table(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), "--methods", "attnlrp", "--steps", "4",
                 "--no-mprt", "--speech-clips", "1", "--speech-methods", "attnlrp"]) == 0
    printed = capsys.readouterr().out
    files, labels, masks = demo_clips()
    assert f"labels {labels.tolist()}" in printed and "| attnlrp |" in printed
    for method in ("attnlrp",):
        for f in files:
            assert (out / method / f"{f.stem}.png").stat().st_size > 0
            assert (out / method / f"{f.stem}.npz").exists()
    rows = {r["method"]: r for r in json.loads((out / "results.json").read_text())["rows"]}
    # the shipped model's evidence is where the LRP relevance goes (measured: 0.40 in the mask,
    # which covers ~1% of the spectrogram; pointing game 7/8)
    assert rows["attnlrp"]["mass_in_mask"] > 0.2 and rows["attnlrp"]["pointing_game"] >= 0.5
    assert (out / "table.md").read_text().startswith("| method |")
    # the real-speech part: real tiny.en wrote the first clip's words, each explained
    assert "Whisper tiny.en wrote 'Stella bought seven red apples today" in printed
    speech = out / "speech"
    for name in ("stella_rp",):
        assert (speech / f"{name}.png").stat().st_size > 10_000
        assert (speech / f"{name}.npz").exists() and (speech / f"{name}_words").is_dir()
    assert "| attnlrp |" in (speech / "words.md").read_text()
