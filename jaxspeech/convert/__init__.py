"""Loading what users have: each family's converters plus jaxspeech's own orbax folders."""

from __future__ import annotations

import os
from types import ModuleType

from jaxspeech.convert import orbax_io
from jaxspeech.convert.common import CheckpointError
from jaxspeech.model import Model

__all__ = ["load", "converters", "register_converter", "CheckpointError"]

_CONVERTERS: dict[str, ModuleType] = {}


def register_converter(family: str, module: ModuleType) -> None:
    """A converter module has ``detect(path) -> bool``, ``load(path) -> Model`` and
    ``reference(path, dtype="float32") -> (features_fn, model_fn[, generate_fn])``: the
    PyTorch reference run in ``dtype`` ("float32" or "float64"; :mod:`jaxspeech.compare`
    judges against the float64 run). ``features_fn(wave, lengths) -> (features, kwargs)``,
    ``model_fn(features, **kwargs)`` with the kwargs ``Model.apply`` takes (Whisper:
    ``tokens`` for the decoder's logits); ``generate_fn(features, max_new_tokens,
    suppress_tokens=None)`` (the greedy token sequences) only for a model that transcribes."""
    _CONVERTERS[family] = module


def converters() -> dict[str, ModuleType]:
    return dict(_CONVERTERS)


def converter_for(path: str) -> tuple[str, ModuleType]:
    for family, module in _CONVERTERS.items():
        if module.detect(path):
            return family, module
    raise CheckpointError(
        f"{path}: not a checkpoint jaxspeech recognises. Expected one of: a jaxspeech folder "
        f"(jaxspeech.json + params/), an HF Whisper or CLAP folder (config.json + "
        f"model.safetensors / pytorch_model.bin), OpenAI's Whisper .pt, a CTranslate2 / "
        f"faster-whisper Whisper folder (model.bin or model.bin.part1.. + config.json), or a "
        f"SpeechBrain folder (hyperparams.yaml + embedding_model.ckpt)")


def load(path: str | os.PathLike, dtype: str | None = None) -> Model:
    """Load any supported checkpoint; the kind is detected from the files. ``dtype``: the
    compute dtype (``"bfloat16"``, ``"float16"``; params stay float32, see
    :meth:`Model.astype`); ``None`` keeps the checkpoint's (float32 unless saved otherwise)."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"no such checkpoint: {path}")
    if orbax_io.detect(path):
        model = orbax_io.load(path)
    else:
        model = converter_for(path)[1].load(path)
    return model if dtype is None else model.astype(dtype)
