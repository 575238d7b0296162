"""Corpus runs for real across devices, processes and a kill: each compared with one
in-process, one-device run of the same corpus.

- 8 simulated CPU devices (``--xla_force_host_platform_device_count=8``, set before JAX
  starts, hence a subprocess) give the relevance of 1 device;
- 2 processes on localhost (``jax.distributed`` with gloo CPU collectives), each reading
  its own share, together write exactly the 1-process results;
- a run killed with SIGKILL after its first commit and then resumed loses nothing and
  duplicates nothing.
"""

import json
import os
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
import soundfile as sf

import jaxspeech as js
from jaxspeech.corpus import attribute_corpus, open_results

# Whisper with 30 s windows (every row one shape), made tiny so a CPU run is quick.
TINY = dict(d_model=32, encoder_layers=1, encoder_attention_heads=1, encoder_ffn_dim=64,
            decoder_layers=0)
DURATIONS = [(1.0, 16000), (2.5, 22050), (0.7, 16000), (3.0, 8000), (34.0, 16000), (1.2, 44100),
             (0.4, 16000)]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpus_dist")
    corpus = root / "corpus"
    (corpus / "spk").mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i, (seconds, rate) in enumerate(DURATIONS):
        t = np.arange(int(seconds * rate)) / rate
        wave = 0.3 * np.sin(2 * np.pi * (150 + 40 * i) * t) + 0.05 * rng.standard_normal(t.shape)
        sub = corpus / "spk" if i % 2 else corpus
        sf.write(sub / f"utt{i}.{'flac' if i == 3 else 'wav'}", wave.astype(np.float32), rate)
    (corpus / "broken.wav").write_bytes(b"RIFF....not a wav")
    model = js.init("whisper-tiny", **TINY)
    model.save(root / "model")
    # The reference: this process, one device, batch 8.
    ref = attribute_corpus(model, corpus, root / "ref", method="attnlrp", target="output-norm",
                           batch_size=8, progress=False)
    assert ref.done == len(DURATIONS) and list(ref.failures) == ["broken.wav"]
    return root, open_results(root / "ref")


def _env(devices: int = 1, cache=None) -> dict:
    env = dict(os.environ)
    env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") +
                        f" --xla_force_host_platform_device_count={devices}").strip()
    env["JAX_PLATFORMS"] = "cpu"
    env["JAX_DEFAULT_MATMUL_PRECISION"] = "highest"  # as tests/conftest.py sets in-process
    if cache is not None:  # later subprocesses reuse what earlier ones compiled
        env["JAX_COMPILATION_CACHE_DIR"] = str(cache)
        env["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
        env["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "0"
    return env


def _cli(root, out, *extra) -> list[str]:
    return [sys.executable, "-m", "jaxspeech.cli", "attribute-corpus", str(root / "corpus"),
            "--model", str(root / "model"), "--method", "attnlrp", "--target", "output-norm",
            "--out", str(out), "--no-progress", "--allow-failures", *extra]  # broken.wav fails


def _same(a, b, exact: bool) -> None:
    """Same ids, each once, same scores, relevance and metadata."""
    assert a.ids and sorted(a.ids) == sorted(b.ids)
    assert a.duplicates == [] and b.duplicates == []
    assert a.failures == b.failures
    for ident in a.ids:
        x, y = a[ident], b[ident]
        assert x["relevance"].shape == y["relevance"].shape, ident
        assert {k: v for k, v in x.items() if not isinstance(v, np.ndarray | float)} == \
            {k: v for k, v in y.items() if not isinstance(v, np.ndarray | float)}
        if exact:
            np.testing.assert_array_equal(x["relevance"], y["relevance"], err_msg=ident)
            assert x["score"] == y["score"]
        else:  # other batch compositions, other programs: float32 order only (measured
            # 3e-7 of the max, 30x below; scores equal)
            scale = np.abs(x["relevance"]).max()
            np.testing.assert_allclose(x["relevance"], y["relevance"], rtol=0, atol=1e-5 * scale,
                                       err_msg=ident)
            np.testing.assert_allclose(x["window_scores"], y["window_scores"], rtol=1e-5)


def test_eight_devices_give_the_relevance_of_one(setup):
    root, ref = setup
    out = root / "eight"
    proc = subprocess.run(_cli(root, out, "--batch-size", "8"), env=_env(8), capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "on 8 device(s)" in proc.stderr  # the summary: really sharded over 8
    _same(ref, open_results(out), exact=False)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def test_two_processes_write_exactly_the_results_of_one(setup):
    root, ref = setup
    out = root / "two"
    port = _free_port()
    procs = [subprocess.Popen(
        _cli(root, out, "--batch-size", "8", "--coordinator", f"localhost:{port}",
             "--num-processes", "2", "--process-id", str(i)),
        env=_env(1), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(2)]
    logs = [p.communicate(timeout=300) for p in procs]
    for p, (_, err) in zip(procs, logs, strict=True):
        assert p.returncode == 0, err[-3000:]
    # each process read only its share and wrote only its own files
    for i in range(2):
        summary = json.loads((out / f"summary-p{i:05d}.json").read_text())
        assert summary["process_count"] == 2 and summary["share"] == 4  # 8 files, round robin
        lines = (out / f"manifest-p{i:05d}.jsonl").read_text().splitlines()
        committed = [ident for rec in map(json.loads, lines) for ident in rec.get("ids", [])]
        assert len(committed) == summary["done"] > 0
    _same(ref, open_results(out), exact=True)


def test_sigkill_then_resume_loses_and_duplicates_nothing(setup):
    root, ref = setup
    out = root / "killed"
    # one row per batch and one item per shard: many commits, so the kill lands mid-run
    cmd = _cli(root, out, "--batch-size", "1", "--shard-size", "1", "--prefetch", "1")
    env = _env(1, cache=root / "jax-cache")
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True)
    manifest = out / "manifest-p00000.jsonl"
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        if manifest.exists() and '"shard"' in manifest.read_text():
            break
        time.sleep(0.02)
    assert proc.poll() is None, "the run ended before it could be killed: " + proc.stderr.read()[-2000:]
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    partial = open_results(out)
    assert 0 < len(partial) < len(ref), "the kill must leave the run incomplete"

    again = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert again.returncode != 0 and "--resume" in again.stderr  # never mixes runs silently
    resumed = subprocess.run(cmd + ["--resume"], env=env, capture_output=True, text=True,
                             timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    summary = json.loads((out / "summary-p00000.json").read_text())
    assert summary["already_done"] == len(partial)
    assert summary["done"] + summary["already_done"] == len(ref)
    final = open_results(out)
    _same(ref, final, exact=False)
    # every committed shard is referenced once; nothing uncommitted is left behind
    shards = {p.name for p in (out / "shards").iterdir()}
    lines = [json.loads(x) for x in (out / "manifest-p00000.jsonl").read_text().splitlines()]
    referenced = [rec["shard"] for rec in lines if "shard" in rec]
    assert sorted(referenced) == sorted(shards) and len(set(referenced)) == len(referenced)
