"""Parity of a checkpoint against its PyTorch reference: the numbers a paper can quote.

:func:`compare` loads the same checkpoint in jaxspeech and in the reference
(transformers / SpeechBrain), runs both front ends on the same waveforms and
both models on the *reference* features (so a front-end difference does not
hide or inflate the model difference), and once more end to end.
"""

from __future__ import annotations

import dataclasses
import platform
from collections.abc import Sequence

import jax
import numpy as np

from jaxspeech import audio
from jaxspeech.convert import converter_for, load, orbax_io

TOLERANCE = 1e-4  # max |diff| relative to max |reference|, float32 (DESIGN.md)


@dataclasses.dataclass(frozen=True)
class Row:
    stage: str
    shape: tuple[int, ...]
    max_abs: float
    mean_abs: float
    scale: float

    @property
    def max_rel(self) -> float:
        return self.max_abs / max(self.scale, 1e-30)

    @property
    def ok(self) -> bool:
        return self.max_rel <= TOLERANCE


@dataclasses.dataclass(frozen=True)
class Report:
    path: str
    kind: str
    n_clips: int
    sample_rate: int
    rows: tuple[Row, ...]
    versions: str

    @property
    def ok(self) -> bool:
        return all(r.ok for r in self.rows)

    def table(self, fmt: str = "text") -> str:
        head = ["stage", "shape", "max abs diff", "mean abs diff", "max abs ref", "max rel", "result"]
        body = [[r.stage, "x".join(map(str, r.shape)), f"{r.max_abs:.3e}", f"{r.mean_abs:.3e}",
                 f"{r.scale:.3e}", f"{r.max_rel:.3e}", "ok" if r.ok else "FAIL"]
                for r in self.rows]
        title = (f"jaxspeech vs PyTorch reference: {self.kind} checkpoint {self.path}, "
                 f"{self.n_clips} clips at {self.sample_rate} Hz, float32 "
                 f"(tolerance: max rel <= {TOLERANCE:g})")
        if fmt == "markdown":
            lines = [title, "", "| " + " | ".join(head) + " |",
                     "|" + "---|" * len(head)]
            lines += ["| " + " | ".join(row) + " |" for row in body]
            return "\n".join(lines + ["", self.versions])
        widths = [max(len(h), *(len(row[i]) for row in body)) for i, h in enumerate(head)]
        fmt_row = "  ".join(f"{{:<{w}}}" for w in widths).format
        lines = [title, fmt_row(*head), fmt_row(*("-" * w for w in widths))]
        lines += [fmt_row(*row) for row in body]
        return "\n".join(lines + [self.versions])


def _row(stage: str, ours, ref) -> Row:
    ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
    if ours.shape != ref.shape:
        raise ValueError(f"{stage}: jaxspeech gives shape {ours.shape}, reference {ref.shape}")
    diff = np.abs(ours - ref)
    return Row(stage, ours.shape, float(diff.max()), float(diff.mean()), float(np.abs(ref).max()))


def versions() -> str:
    import importlib.metadata as md

    parts = [f"python {platform.python_version()}"]
    for pkg in ("jaxspeech", "jax", "flax", "torch", "transformers", "speechbrain"):
        try:
            parts.append(f"{pkg} {md.version(pkg)}")
        except md.PackageNotFoundError:
            pass
    parts.append(f"device {jax.devices()[0].device_kind}")
    return "versions: " + ", ".join(parts)


def default_clips(sample_rate: int, seconds: float = 4.0) -> list[np.ndarray]:
    """Speech-like clips for a checkpoint with no audio given: a harmonic sweep, noise
    bursts, a clipped voiced sound and a shorter sweep (unequal lengths)."""
    from jaxspeech.data import synth

    return [synth.harmonic_sweep(seconds, sample_rate), synth.noise_bursts(seconds, sample_rate),
            synth.clipped(seconds, sample_rate), synth.harmonic_sweep(seconds / 2, sample_rate, seed=3)]


def compare(path: str, clips: Sequence[np.ndarray] | None = None) -> Report:
    """Run checkpoint ``path`` in jaxspeech and in its PyTorch reference on ``clips``."""
    if orbax_io.detect(path):
        raise ValueError(f"{path} is a converted jaxspeech checkpoint; compare the original "
                         "(HF / OpenAI / SpeechBrain) checkpoint it was converted from")
    kind, converter = converter_for(path)
    model = load(path)
    clips = list(clips) if clips is not None else default_clips(model.sample_rate)
    wave, lengths = audio.as_batch(clips, expected_rate=model.sample_rate, name=kind)
    wave = np.asarray(wave)
    ref_features_fn, ref_model_fn = converter.reference(path)
    ref_features, ref_kwargs = ref_features_fn(wave, lengths)
    ref_out = ref_model_fn(ref_features, **ref_kwargs)
    features, kwargs = model.prepare(wave, lengths=lengths)
    on_ref = model.apply(model.params, jax.numpy.asarray(ref_features),
                         **{k: jax.numpy.asarray(v) for k, v in ref_kwargs.items()})
    end_to_end = model.apply(model.params, features, **kwargs)
    rows = (_row("features", features, ref_features),
            _row("output (on reference features)", on_ref, ref_out),
            _row("output (end to end)", end_to_end, ref_out))
    return Report(path, kind, len(clips), model.sample_rate, rows, versions())
