"""Whisper checkpoints -> jaxspeech params.

Three formats users have:
- an HF folder of ``WhisperModel`` (tensors ``encoder.*``) or
  ``WhisperForConditionalGeneration`` (``model.encoder.*``), ``config.json`` plus
  ``model.safetensors`` / ``pytorch_model.bin`` or a sharded index, written by
  transformers 4 or 5;
- OpenAI's own ``.pt`` file: ``{"dims": {...}, "model_state_dict": {...}}`` with
  ``encoder.blocks.{i}.attn.query`` names.
Only the encoder is taken; decoder and head tensors are left alone.
"""

from __future__ import annotations

import json
import os
import re
import sys
from pathlib import Path

import numpy as np

from jaxspeech.convert import register_converter
from jaxspeech.convert.common import (
    CheckpointError,
    default_torch_key,
    find_weights,
    map_params,
    read_state_dict,
    read_torch_file,
)
from jaxspeech.model import Model, param_shapes
from jaxspeech.models.whisper import WhisperConfig

# Tensors of the full checkpoint that the encoder port does not use.
_NOT_ENCODER = [r"^(model\.)?decoder\.", r"^proj_out\.", r"^(projector|classifier)\.",
                r"^layer_weights$"]


def is_hf_folder(path: str) -> bool:
    cfg = Path(path) / "config.json"
    if not cfg.is_file():
        return False
    data = json.loads(cfg.read_text())
    return data.get("model_type") == "whisper"


def is_openai_file(path: str) -> bool:
    return os.path.isfile(path) and path.endswith(".pt") and _peek_openai(path)


def _peek_openai(path: str) -> bool:
    try:
        obj = read_torch_file(path)
    except Exception:
        return False
    return isinstance(obj, dict) and "dims" in obj and "model_state_dict" in obj


def _hf_prefix(state) -> str:
    if any(k.startswith("model.encoder.") for k in state):
        return "model.encoder."
    if any(k.startswith("encoder.") for k in state):
        return "encoder."
    raise CheckpointError("no Whisper encoder tensors found (expected names starting with "
                          "'encoder.' or 'model.encoder.')")


def load_hf(path: str) -> Model:
    """An HF Whisper folder -> :class:`Model` (encoder only)."""
    hf_config = json.loads((Path(path) / "config.json").read_text())
    config = WhisperConfig.from_hf_config(hf_config)
    weights = find_weights(path)
    if weights is None:
        raise CheckpointError(f"{path} has config.json but no model.safetensors / "
                              "pytorch_model.bin (or their .index.json)")
    state = read_state_dict(weights)
    prefix = _hf_prefix(state)

    def torch_key(p):
        if p == ("embed_positions",):
            return prefix + "embed_positions.weight"
        return prefix + default_torch_key(p)

    params = map_params(param_shapes(config), state, torch_key, ignore=_NOT_ENCODER,
                        source=weights)
    return Model(config, params, source=path, extras={"format": "hf"})


# OpenAI module names -> HF module names (inside one encoder block / the encoder).
_OPENAI_BLOCK = {"self_attn.q_proj": "attn.query", "self_attn.k_proj": "attn.key",
                 "self_attn.v_proj": "attn.value", "self_attn.out_proj": "attn.out",
                 "self_attn_layer_norm": "attn_ln", "fc1": "mlp.0", "fc2": "mlp.2",
                 "final_layer_norm": "mlp_ln"}


def openai_key(path: tuple[str, ...]) -> str:
    """Flax param path -> OpenAI ``model_state_dict`` name."""
    if path == ("embed_positions",):
        return "encoder.positional_embedding"
    key = default_torch_key(path)
    if key.startswith("layer_norm."):
        return "encoder.ln_post." + key.split(".", 1)[1]
    m = re.match(r"layers\.(\d+)\.(.+)\.(weight|bias)$", key)
    if m:
        return f"encoder.blocks.{m.group(1)}.{_OPENAI_BLOCK[m.group(2)]}.{m.group(3)}"
    return "encoder." + key


def config_from_dims(dims: dict) -> WhisperConfig:
    return WhisperConfig(
        n_mels=int(dims["n_mels"]), d_model=int(dims["n_audio_state"]),
        encoder_layers=int(dims["n_audio_layer"]),
        encoder_attention_heads=int(dims["n_audio_head"]),
        encoder_ffn_dim=4 * int(dims["n_audio_state"]),
        max_source_positions=int(dims["n_audio_ctx"]))


def load_openai(path: str) -> Model:
    """OpenAI's ``.pt`` (``dims`` + ``model_state_dict``) -> :class:`Model`."""
    obj = read_torch_file(path)
    config = config_from_dims(obj["dims"])
    state = obj["model_state_dict"]
    params = map_params(param_shapes(config), state, openai_key, ignore=[r"^decoder\."],
                        source=path)
    return Model(config, params, source=path, extras={"format": "openai"})


def detect(path: str) -> bool:
    return is_hf_folder(path) or is_openai_file(path)


def load(path: str) -> Model:
    return load_hf(path) if os.path.isdir(path) else load_openai(path)


# --- the PyTorch reference, for `jaxspeech compare` -------------------------------------

def reference(path: str):
    """The transformers reference for this checkpoint, as ``(features_fn, model_fn)``:
    ``features_fn(wave [B, samples] np, lengths [B] or None) -> (features np [B, n_mels, 3000], {})``
    (``WhisperFeatureExtractor``) and ``model_fn(features, **kwargs) -> np [B, 1500, d_model]``
    (``WhisperModel.encoder``). The kwargs are those ``Model.apply`` takes."""
    import torch
    from transformers import WhisperConfig as HFConfig
    from transformers import WhisperFeatureExtractor, WhisperModel
    from transformers.models.whisper.modeling_whisper import WhisperEncoder

    if os.path.isdir(path):
        encoder = WhisperModel.from_pretrained(path, attn_implementation="eager").encoder
        n_mels = encoder.config.num_mel_bins
    else:
        obj = read_torch_file(path)
        cfg = config_from_dims(obj["dims"])
        hf_cfg = HFConfig(num_mel_bins=cfg.n_mels, d_model=cfg.d_model,
                          encoder_layers=cfg.encoder_layers,
                          encoder_attention_heads=cfg.encoder_attention_heads,
                          encoder_ffn_dim=cfg.encoder_ffn_dim,
                          max_source_positions=cfg.max_source_positions)
        encoder = WhisperEncoder(hf_cfg)
        hf_state = {}
        shapes = param_shapes(cfg)
        from jaxspeech.convert.common import flatten

        for p in flatten(shapes):
            hf_state[default_torch_key(p) if p != ("embed_positions",) else
                     "embed_positions.weight"] = torch.from_numpy(
                np.array(obj["model_state_dict"][openai_key(p)], np.float32))
        encoder.load_state_dict(hf_state, strict=True)
        n_mels = cfg.n_mels
    encoder.eval()
    extractor = WhisperFeatureExtractor(feature_size=n_mels)

    def features_fn(wave, lengths=None):  # zero padding is what Whisper does anyway
        out = extractor(list(np.asarray(wave)), sampling_rate=16000, return_tensors="np")
        return out["input_features"], {}

    def model_fn(features):
        with torch.no_grad():
            return encoder(torch.from_numpy(np.asarray(features))).last_hidden_state.numpy()

    return features_fn, model_fn


register_converter("whisper", sys.modules[__name__])
