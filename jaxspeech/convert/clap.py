"""CLAP checkpoints -> jaxspeech params.

An HF folder (``config.json`` + ``model.safetensors`` / ``pytorch_model.bin`` or a
sharded index; ``preprocessor_config.json`` when the ``ClapFeatureExtractor`` was
saved with it) of either

- ``ClapModel`` (``model_type: "clap"``): the audio tower and its projection are
  ``Model.params``; the embedding is L2-normalised as ``get_audio_features`` does. The
  RoBERTa text tower (``text_model.*``, ``text_projection.*``) becomes ``Model.text``
  (:class:`jaxspeech.clap_text.TextTower`) with the folder's ``tokenizer.json`` (a folder
  without one loads, and says what is missing when text is asked for). ``logit_scale_a``
  and ``logit_scale_t`` are kept in ``Model.extras`` for zero-shot use. The buffers
  ``text_model.embeddings.position_ids`` / ``token_type_ids`` (saved by transformers 4,
  not by 5) follow from the config and are not loaded.
- ``ClapAudioModelWithProjection`` (``model_type: "clap_audio_model"``): the same
  tensors; ``audio_embeds`` are not normalised.

Both name the audio tensors ``audio_model.audio_encoder.*`` and ``audio_projection.*``.
Without ``preprocessor_config.json`` the hub's front-end values are used (fmin 50 Hz,
fmax 14 kHz, ``repeatpad``, truncation ``fusion`` for fused and ``rand_trunc`` for
unfused models).
"""

from __future__ import annotations

import contextlib
import itertools
import json
import sys
import warnings
from pathlib import Path
from unittest import mock

import jax
import jax.numpy as jnp
import numpy as np

from jaxspeech.convert import register_converter
from jaxspeech.convert.common import CheckpointError, find_weights, map_params, read_state_dict
from jaxspeech.model import Model, param_shapes
from jaxspeech.models.clap import ClapConfig, relative_position_index

# Tensors of a ClapModel checkpoint that the audio port does not use. The relative
# position indices are buffers that follow from window_size; they are checked, not loaded.
_NOT_AUDIO = [r"^text_model\.", r"^text_projection\.", r"^logit_scale_[at]$",
              r"\.relative_position_index$"]
_TEXT_PREFIXES = ("text_model.", "text_projection.")
_TEXT_BUFFERS = [r"^text_model\.embeddings\.(position_ids|token_type_ids)$"]
_MODEL_TYPES = ("clap", "clap_audio_model")


def _read_json(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.is_file() else None


def detect(path: str) -> bool:
    cfg = _read_json(Path(path) / "config.json") if Path(path).is_dir() else None
    return cfg is not None and cfg.get("model_type") in _MODEL_TYPES


def read_config(path: str) -> tuple[ClapConfig, dict]:
    """``(config, hf_config_json)`` of an HF CLAP folder (no weights read)."""
    hf = _read_json(Path(path) / "config.json")
    if hf is None or hf.get("model_type") not in _MODEL_TYPES:
        raise CheckpointError(f"{path}: no config.json of a CLAP model (model_type 'clap' or "
                              "'clap_audio_model')")
    archs = hf.get("architectures") or []
    if hf["model_type"] == "clap_audio_model" and archs and \
            "ClapAudioModelWithProjection" not in archs:
        raise CheckpointError(
            f"{path} holds a {archs[0]} (no audio_projection); jaxspeech ports the projected "
            "embedding: save a ClapAudioModelWithProjection or a ClapModel")
    pre = _read_json(Path(path) / "preprocessor_config.json")
    fused = bool(hf.get("audio_config", hf).get("enable_fusion", False))
    want = "fusion" if fused else "rand_trunc"
    if pre is not None and pre.get("truncation", want) != want:
        # HF would crash (unfused conv on 4 channels) or skip the fusion branch: use what
        # the model can take.
        warnings.warn(f"{path}: preprocessor truncation={pre['truncation']!r} does not fit a "
                      f"{'fused' if fused else 'unfused'} model; using {want!r}", stacklevel=3)
        pre = {**pre, "truncation": want}
    try:
        config = ClapConfig.from_hf_config(hf, pre, normalize=hf["model_type"] == "clap")
    except ValueError as e:
        raise CheckpointError(f"{path}: {e}") from None
    return config, hf


def load(path: str) -> Model:
    """An HF ``ClapModel`` / ``ClapAudioModelWithProjection`` folder -> :class:`Model`."""
    config, hf = read_config(path)
    weights = find_weights(path)
    if weights is None:
        raise CheckpointError(f"{path} has config.json but no model.safetensors / "
                              "pytorch_model.bin (or their .index.json)")
    state = read_state_dict(weights)
    bad = [k for k, v in state.items() if k.endswith(".relative_position_index")
           and not np.array_equal(np.asarray(v), relative_position_index(config.window_size))]
    if bad:
        raise CheckpointError(f"{weights}: relative_position_index buffers differ from "
                              f"window_size={config.window_size}'s: {bad[:5]}")
    params = map_params(param_shapes(config), state, ignore=_NOT_AUDIO, source=weights)
    # On the device once, not on every call (jit would copy NumPy leaves each time).
    params = jax.tree.map(jnp.asarray, params)
    extras = {"format": "hf", "architecture": (hf.get("architectures") or [hf["model_type"]])[0]}
    for key in ("logit_scale_a", "logit_scale_t"):
        if key in state:
            extras[key] = float(np.asarray(state[key]))
    text = load_text(path, hf, state, weights) if hf["model_type"] == "clap" else None
    return Model(config, params, source=str(path), extras=extras, text=text)


def load_text(path: str, hf: dict, state: dict, weights: str):
    """The text tower of a ``ClapModel`` folder (its ``config.json`` as ``hf``, its weights
    as ``state``), with the folder's tokenizer when it has one."""
    from jaxspeech.clap_text import TextTower
    from jaxspeech.models import clap_text
    from jaxspeech.roberta_tokenizer import RobertaTokenizer, TokenizerError

    try:
        config = clap_text.ClapTextConfig.from_hf_config(hf)
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{path}: {e}") from None
    text_state = {k: v for k, v in state.items() if k.startswith(_TEXT_PREFIXES)}
    if not text_state:
        raise CheckpointError(f"{weights}: a ClapModel without text_model.* tensors; save the "
                              "whole ClapModel (or a ClapAudioModelWithProjection for audio only)")
    for key in ("text_model.embeddings.position_ids", "text_model.embeddings.token_type_ids"):
        if key in text_state and text_state[key].shape[-1] != config.max_position_embeddings:
            raise CheckpointError(f"{weights}: {key} has {text_state[key].shape[-1]} positions, "
                                  f"the config {config.max_position_embeddings}")
    params = map_params(clap_text.param_shapes(config), text_state, ignore=_TEXT_BUFFERS,
                        source=weights)
    params = jax.tree.map(jnp.asarray, params)
    try:
        tokenizer, problem = RobertaTokenizer.from_folder(path, config.max_length), None
    except TokenizerError as e:
        tokenizer, problem = None, str(e)
    scale = state.get("logit_scale_t")
    return TextTower(config, params, tokenizer, tokenizer_problem=problem,
                     logit_scale_t=None if scale is None else float(np.asarray(scale)))


# --- the PyTorch reference, for `jaxspeech compare` and the parity tests ----------------

@contextlib.contextmanager
def deterministic_hf_crops():
    """Make ``ClapFeatureExtractor``'s random choices equal to jaxspeech's key-less ones.

    The extractor draws from NumPy's global RNG: ``np.random.randint`` for the
    rand_trunc offset and for the item HF forces to ``is_longer`` (both -> 0: the start,
    the first item) and ``np.random.choice`` three times per fused long clip, for the
    front / middle / back crop (-> first / middle / last element of its range). Both are
    patched on the ``numpy.random`` module for the duration of the block (not
    thread-safe: the patch is process-wide).
    """
    picks = itertools.cycle([lambda r: r[0], lambda r: r[len(r) // 2], lambda r: r[-1]])

    def choice(a, *args, **kwargs):
        return np.asarray(a)[0] if args or kwargs else next(picks)(np.asarray(a))

    def randint(low, high=None, *args, **kwargs):
        return 0 if high is None else low

    with mock.patch.object(np.random, "choice", choice), \
            mock.patch.object(np.random, "randint", randint):
        yield


def hf_features(extractor, wave, *, truncation: str, padding: str,
                per_clip: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """HF features of ``wave`` (``[B, samples]`` or a list of 1-D clips) with deterministic
    crops: ``(input_features [B, C, 1001, 64] float32, is_longer [B] bool)``. ``per_clip``
    runs the extractor on each clip alone (jaxspeech's default ``longer="per_clip"``);
    otherwise on the batch (``longer="per_batch"``)."""
    clips = [np.asarray(w, np.float32) for w in wave]
    calls = [[c] for c in clips] if per_clip else [clips]
    feats, longer = [], []
    with deterministic_hf_crops():
        for batch in calls:
            out = extractor(batch, sampling_rate=extractor.sampling_rate, truncation=truncation,
                            padding=padding, return_tensors="np")
            feats.append(np.asarray(out["input_features"], np.float32))
            longer.append(np.asarray(out["is_longer"]).reshape(-1))
    return np.concatenate(feats), np.concatenate(longer).astype(bool)


def reference(path: str, dtype: str = "float32"):
    """The transformers reference for this checkpoint, run in ``dtype`` ("float32" or
    "float64"), as ``(features_fn, model_fn)``:
    ``features_fn(wave [B, samples] np, lengths [B] relative or None) -> (features
    [B, C, 1001, 64], {"is_longer": [B]})`` (``ClapFeatureExtractor`` on each clip alone,
    cut to its length, crops fixed by :func:`deterministic_hf_crops`, i.e. jaxspeech's
    ``prepare`` without a key) and
    ``model_fn(features, is_longer=None) -> np [B, projection_dim]``
    (``ClapModel.get_audio_features`` or ``ClapAudioModelWithProjection(...).audio_embeds``).
    In float64 the model runs in float64 (``model.double()``); the features stay the
    extractor's, in float32 whatever is asked: transformers' ``spectrogram`` stores the STFT
    in complex64 and returns float32, so this reference has no float64 front end."""
    import torch
    from transformers import ClapAudioModelWithProjection, ClapFeatureExtractor, ClapModel

    if dtype not in ("float32", "float64"):
        raise ValueError(f"reference dtype {dtype!r}: 'float32' or 'float64'")
    torch_dtype = getattr(torch, dtype)
    config, hf = read_config(path)
    if (Path(path) / "preprocessor_config.json").is_file():
        extractor = ClapFeatureExtractor.from_pretrained(path)
    else:
        extractor = ClapFeatureExtractor(frequency_min=config.fmin, frequency_max=config.fmax,
                                         truncation=config.truncation, padding=config.padding)
    if hf["model_type"] == "clap":
        model = ClapModel.from_pretrained(path).eval().to(torch_dtype)
        embed = lambda x, longer: model.get_audio_features(input_features=x, is_longer=longer)  # noqa: E731
    else:
        model = ClapAudioModelWithProjection.from_pretrained(path).eval().to(torch_dtype)
        embed = lambda x, longer: model(input_features=x, is_longer=longer).audio_embeds  # noqa: E731

    def features_fn(wave, lengths=None):
        wave = np.asarray(wave, np.float32)
        if lengths is not None:  # the clips of a zero-padded batch, as prepare cuts them
            width = wave.shape[-1]
            sizes = np.clip(np.rint(np.asarray(lengths, np.float64) * width), 1, width).astype(int)
            wave = [w[:n] for w, n in zip(wave, sizes, strict=True)]
        feats, longer = hf_features(extractor, wave, truncation=config.truncation,
                                    padding=config.padding)
        return feats, {"is_longer": longer}

    def model_fn(features, is_longer=None):
        x = torch.from_numpy(np.asarray(features, dtype))
        longer = None if is_longer is None else torch.from_numpy(
            np.asarray(is_longer, bool).reshape(-1, 1))
        with torch.no_grad():
            return embed(x, longer).numpy()

    return features_fn, model_fn


register_converter("clap", sys.modules[__name__])
