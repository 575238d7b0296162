"""``benchmarks/accelerator.py`` runs end to end on CPU at its smallest setting and prints one
row per (size, method, batch) with finite, positive throughputs; a sweep stops only on an
out-of-memory error."""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "accelerator.py"


def _load():
    spec = importlib.util.spec_from_file_location("accelerator_benchmark", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_accelerator_benchmark_prints_every_method_at_the_smallest_setting(capsys):
    _load().main(["--sizes", "tiny", "--batch", "1", "--seconds", "1", "--rounds", "1",
                  "--layers", "1", "--corpus-hours", "0.004"])
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("# jax ") and "attention kernel" in lines[0]
    rows = [line.split("|")[1:-1] for line in lines[3:]]
    assert [(r[0].strip(), r[1].strip(), r[2].strip()) for r in rows[:3]] == [
        ("tiny", m, "1") for m in ("forward", "attnlrp", "ig32")]
    # 0.004 h = 14 s: 2 clips of make_corpus's 7 s mean, read from files at the attnlrp batch
    assert rows[3][0].strip() == "tiny" and rows[3][1].strip().startswith("corpus attnlrp, 2 clips")
    assert rows[3][2].strip() == "1" and lines[6].endswith(" s")
    for row in rows:
        numbers = [float(c) for c in row[3:]]
        assert all(math.isfinite(v) and v >= 0 for v in numbers) and all(numbers[1:]), row


def test_only_out_of_memory_errors_end_a_batch_sweep():
    bench = _load()
    assert bench._is_out_of_memory(RuntimeError("RESOURCE_EXHAUSTED: Out of memory allocating"))
    assert bench._is_out_of_memory(RuntimeError("CUDA out of memory. Tried to allocate 2 GiB"))
    assert not bench._is_out_of_memory(ValueError("features [1, 80, 200]: expected 3000 frames"))


def test_accelerator_benchmark_refuses_an_audio_length_whisper_cannot_take():
    with pytest.raises(SystemExit, match="--seconds 40"):
        _load().main(["--seconds", "40"])


def test_accelerator_benchmark_runs_the_attention_kernel_it_is_given(capsys, monkeypatch):
    from jaxspeech import lrp

    monkeypatch.setenv(lrp.ATTENTION_ENV, "tiled")  # restored after the test
    _load().main(["--sizes", "tiny", "--batch", "1", "--seconds", "1", "--rounds", "1",
                  "--layers", "1", "--methods", "forward", "--no-torch", "--corpus-hours", "0",
                  "--attention", "xla"])
    lines = capsys.readouterr().out.splitlines()
    assert "attention kernel xla" in lines[0]
    assert len(lines) == 4 and lines[3].startswith("| tiny | forward | 1 |")
