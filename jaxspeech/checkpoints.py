"""Checkpoint specs: the one place a command's checkpoint argument becomes a model.

Every command that takes a checkpoint (``attribute``, ``attribute-corpus --model``,
``evaluate``, ``probe --model``, ``info``, ``convert``, ``compare``) resolves it here:

    default          the shipped planted-evidence Whisper encoder (:mod:`jaxspeech.assets`);
                     its own target is its head's decision
    init:PRESET      a preset with random weights (:func:`jaxspeech.init`), e.g. init:whisper-tiny
    PATH             a checkpoint folder or file (Hugging Face, OpenAI ``.pt``, SpeechBrain,
                     jaxspeech), the kind detected from the files (:func:`jaxspeech.load`)

    ckpt = resolve("init:whisper-tiny")
    ckpt.model, ckpt.target          # target: None unless the checkpoint names its own

The preset names are read from :func:`jaxspeech.presets` when asked (:func:`preset_names`),
so a family that adds presets adds them to every command's ``--help`` too.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

__all__ = ["Checkpoint", "resolve", "require_original", "preset_names", "help_text",
           "add_dtype_argument", "DEFAULT", "INIT"]

DEFAULT = "default"
INIT = "init:"


@dataclasses.dataclass(frozen=True)
class Checkpoint:
    """A resolved checkpoint spec: ``model`` and the ``target`` the checkpoint itself names
    (the shipped model's head decision; ``None``: the family's default target)."""

    spec: str
    model: Any
    target: Any = None


def preset_names() -> list[str]:
    """Every preset :func:`jaxspeech.init` knows, in the families' order."""
    import jaxspeech as js

    return list(js.presets())


def resolve(spec: str | os.PathLike, *, seed: int = 0, dtype: str | None = None) -> Checkpoint:
    """``default``, ``init:PRESET`` (random weights from ``seed``) or a checkpoint path ->
    :class:`Checkpoint`, computing in ``dtype`` (``"bfloat16"``, ``"float16"``; None: as the
    checkpoint says, float32 unless it was saved otherwise; :meth:`jaxspeech.Model.astype`).
    Unknown presets and missing paths raise with what to write instead."""
    import jaxspeech as js
    from jaxspeech import layers

    spec = os.fspath(spec)
    if dtype is not None:
        layers.check_dtype(dtype)  # before minutes of loading
    if spec == DEFAULT:
        model, target = js.default_model()
        return Checkpoint(spec, model if dtype is None else model.astype(dtype), target)
    if spec.startswith(INIT):
        name = spec[len(INIT):]
        if name not in js.presets():
            raise ValueError(f"unknown preset {name!r} in {spec!r}; presets: "
                             f"{', '.join(preset_names())} (jaxspeech info --presets)")
        model = js.init(name, seed=seed)
        return Checkpoint(spec, model if dtype is None else model.astype(dtype))
    if not os.path.exists(spec) and spec in js.presets():
        raise FileNotFoundError(f"no such checkpoint: {spec}; for the preset {spec!r} with "
                                f"random weights write {INIT}{spec}")
    return Checkpoint(spec, js.load(spec, dtype=dtype))


def add_dtype_argument(parser) -> None:
    """``--compute-dtype`` on a command that runs a model (argparse; ``args.compute_dtype``,
    for :func:`resolve`). Not ``--dtype``: ``attribute-corpus --dtype`` is the storage dtype
    of the relevance it writes."""
    from jaxspeech.layers import COMPUTE_DTYPES

    parser.add_argument("--compute-dtype", choices=COMPUTE_DTYPES, default=None,
                        help="compute dtype: mixed precision with float32 params, softmax, "
                             "norms and relevance (default: the checkpoint's, float32)")


def require_original(spec: str, command: str) -> None:
    """Refuse ``default`` and ``init:`` where a command needs the PyTorch original."""
    spec = os.fspath(spec)
    if spec == DEFAULT or spec.startswith(INIT):
        raise ValueError(
            f"{command} checks a checkpoint against the PyTorch original it came from; "
            f"{spec!r} is made by jaxspeech and has no PyTorch original. Give a Hugging Face, "
            "OpenAI or SpeechBrain checkpoint (random weights in those formats: "
            "jaxspeech.data.reference_checkpoints, or `jaxspeech demo --parity`)")


def help_text(what: str = "the checkpoint") -> str:
    """The ``--help`` line of a checkpoint argument, listing the presets."""
    return (f"{what}: a checkpoint folder or file (HF, OpenAI .pt, SpeechBrain, jaxspeech), "
            f"'{DEFAULT}' (the shipped planted-evidence model) or {INIT}PRESET (random weights); "
            f"PRESET: {', '.join(preset_names())}")
