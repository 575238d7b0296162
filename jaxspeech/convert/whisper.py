"""Whisper checkpoints -> jaxspeech params.

Three formats users have:
- an HF folder of ``WhisperModel`` (tensors ``encoder.*``) or
  ``WhisperForConditionalGeneration`` (``model.encoder.*``), ``config.json`` plus
  ``model.safetensors`` / ``pytorch_model.bin`` or a sharded index, written by
  transformers 4 or 5;
- OpenAI's own ``.pt`` file: ``{"dims": {...}, "model_state_dict": {...}}`` with
  ``encoder.blocks.{i}.attn.query`` names.
- a CTranslate2 / faster-whisper folder (``model.bin``): :mod:`jaxspeech.convert.ctranslate2`.
The decoder is taken when the checkpoint has one (its output projection is tied to the
token embedding); encoder-only checkpoints load as encoder-only models. The generation
settings (``generation_config.json``: start/end tokens, suppressed tokens, alignment
heads, languages) and ``tokenizer.json`` go into ``Model.extras`` (:func:`generation_config`).
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

# Tensors of an HF checkpoint that the port does not use: the output projection is tied to
# the token embedding (checked), audio-classification heads are not ported.
_NOT_PORTED = [r"^proj_out\.", r"^(projector|classifier)\.", r"^layer_weights$"]
_SPECIAL = ("<|endoftext|>", "<|startoftranscript|>", "<|notimestamps|>", "<|transcribe|>",
            "<|translate|>")


def generation_config(tokenizer_json: str | None, vocab_size: int, *,
                      alignment_heads=None, suppress_tokens=(), begin_suppress_tokens=(),
                      lang_ids=None, **given) -> dict:
    """The settings greedy decoding and word timestamps need, as a JSON-able dict:
    ``decoder_start_token_id``, ``eos_token_id``, ``no_timestamps_token_id``, ``task_to_id``,
    ``lang_to_id``, ``is_multilingual`` (OpenAI's rule: vocab >= 51865), ``suppress_tokens``,
    ``begin_suppress_tokens``, ``alignment_heads`` (``[[layer, head], ...]``).

    Special-token ids come from ``tokenizer_json`` (the text of ``tokenizer.json``); ``given``
    values (an HF ``generation_config.json``) take precedence. ``lang_ids``: the language
    token ids (a CTranslate2 ``config.json``); by default every ``<|xx|>`` token between
    ``<|startoftranscript|>`` and ``<|translate|>``.
    """
    ids: dict[str, int] = {}
    if tokenizer_json:
        added = json.loads(tokenizer_json).get("added_tokens", [])
        ids = {t["content"]: int(t["id"]) for t in added}
    names = {v: k for k, v in ids.items()}
    out = {"is_multilingual": vocab_size >= 51865,
           "suppress_tokens": [int(t) for t in suppress_tokens],
           "begin_suppress_tokens": [int(t) for t in begin_suppress_tokens],
           "alignment_heads": [[int(a), int(b)] for a, b in alignment_heads or ()]}
    for key, token in (("eos_token_id", "<|endoftext|>"),
                       ("decoder_start_token_id", "<|startoftranscript|>"),
                       ("no_timestamps_token_id", "<|notimestamps|>")):
        if token in ids:
            out[key] = ids[token]
    out["task_to_id"] = {task: ids[f"<|{task}|>"] for task in ("transcribe", "translate")
                         if f"<|{task}|>" in ids}
    if lang_ids is not None:
        out["lang_to_id"] = {names[i]: int(i) for i in lang_ids if i in names}
    elif "<|startoftranscript|>" in ids and "<|translate|>" in ids:
        lo, hi = ids["<|startoftranscript|>"], ids["<|translate|>"]
        out["lang_to_id"] = {names[i]: i for i in range(lo + 1, hi) if i in names}
    else:
        out["lang_to_id"] = {}
    if not out["is_multilingual"]:
        out["lang_to_id"], out["task_to_id"] = {}, {}
    out.update({k: v for k, v in given.items() if v is not None})
    return out


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


def _hf_key(prefix: str, path: tuple[str, ...]) -> str:
    """Flax param path -> HF tensor name (``prefix``: ``"model."`` or ``""``)."""
    if path[0] == "decoder":
        if path[1:] == ("embed_tokens", "embedding"):
            return prefix + "decoder.embed_tokens.weight"
        if path[1:] == ("embed_positions",):
            return prefix + "decoder.embed_positions.weight"
        return prefix + default_torch_key(path)
    if path == ("embed_positions",):
        return prefix + "encoder.embed_positions.weight"
    return prefix + "encoder." + default_torch_key(path)


def check_tied(state, embedding_key: str, projection_key: str, source: str) -> None:
    """Whisper's output projection is its token embedding; refuse a checkpoint where not."""
    if projection_key in state and embedding_key in state and not np.array_equal(
            np.asarray(state[projection_key]), np.asarray(state[embedding_key])):
        raise CheckpointError(f"{source}: {projection_key} differs from {embedding_key}; "
                              "Whisper ties its output projection to the token embedding")


def load_hf(path: str) -> Model:
    """An HF Whisper folder -> :class:`Model` (with the decoder when the folder has one)."""
    folder = Path(path)
    hf_config = json.loads((folder / "config.json").read_text())
    weights = find_weights(path)
    if weights is None:
        raise CheckpointError(f"{path} has config.json but no model.safetensors / "
                              "pytorch_model.bin (or their .index.json)")
    state = read_state_dict(weights)
    prefix = _hf_prefix(state)[: -len("encoder.")]
    config = WhisperConfig.from_hf_config(
        hf_config, decoder=any(k.startswith(prefix + "decoder.") for k in state))
    check_tied(state, prefix + "decoder.embed_tokens.weight", "proj_out.weight", weights)
    params = map_params(param_shapes(config), state, lambda p: _hf_key(prefix, p),
                        ignore=_NOT_PORTED, source=weights)
    extras = {"format": "hf"}
    if config.has_decoder:
        extras.update(_hf_text_extras(folder, config))
    return Model(config, params, source=path, extras=extras)


def _hf_text_extras(folder: Path, config: WhisperConfig) -> dict:
    tokenizer = folder / "tokenizer.json"
    text = tokenizer.read_text() if tokenizer.is_file() else None
    gen_file = folder / "generation_config.json"
    gen = json.loads(gen_file.read_text()) if gen_file.is_file() else {}
    keys = ("decoder_start_token_id", "eos_token_id", "no_timestamps_token_id", "lang_to_id",
            "task_to_id", "is_multilingual")
    extras = {"generation": generation_config(
        text, config.vocab_size, alignment_heads=gen.get("alignment_heads"),
        suppress_tokens=gen.get("suppress_tokens") or (),
        begin_suppress_tokens=gen.get("begin_suppress_tokens") or (),
        **{k: gen.get(k) for k in keys})}
    if text is not None:
        extras["tokenizer_json"] = text
    return extras


# OpenAI module names -> HF module names (inside one encoder block / the encoder).
_OPENAI_BLOCK = {"self_attn.q_proj": "attn.query", "self_attn.k_proj": "attn.key",
                 "self_attn.v_proj": "attn.value", "self_attn.out_proj": "attn.out",
                 "self_attn_layer_norm": "attn_ln", "fc1": "mlp.0", "fc2": "mlp.2",
                 "final_layer_norm": "mlp_ln"}


_OPENAI_BLOCK.update({"encoder_attn.q_proj": "cross_attn.query",
                      "encoder_attn.k_proj": "cross_attn.key",
                      "encoder_attn.v_proj": "cross_attn.value",
                      "encoder_attn.out_proj": "cross_attn.out",
                      "encoder_attn_layer_norm": "cross_attn_ln"})


def openai_key(path: tuple[str, ...]) -> str:
    """Flax param path -> OpenAI ``model_state_dict`` name."""
    part, path = ("decoder", path[1:]) if path[0] == "decoder" else ("encoder", path)
    if path == ("embed_positions",):
        return f"{part}.positional_embedding"
    if path == ("embed_tokens", "embedding"):
        return "decoder.token_embedding.weight"
    key = default_torch_key(path)
    if key.startswith("layer_norm."):
        return f"{part}.{'ln_post' if part == 'encoder' else 'ln'}." + key.split(".", 1)[1]
    m = re.match(r"layers\.(\d+)\.(.+)\.(weight|bias)$", key)
    if m:
        return f"{part}.blocks.{m.group(1)}.{_OPENAI_BLOCK[m.group(2)]}.{m.group(3)}"
    return f"{part}.{key}"


def config_from_dims(dims: dict, decoder: bool = True) -> WhisperConfig:
    if dims.get("n_text_state", dims["n_audio_state"]) != dims["n_audio_state"]:
        raise CheckpointError(f"OpenAI dims n_text_state={dims['n_text_state']} differs from "
                              f"n_audio_state={dims['n_audio_state']}; Whisper shares d_model")
    config = WhisperConfig(
        n_mels=int(dims["n_mels"]), d_model=int(dims["n_audio_state"]),
        encoder_layers=int(dims["n_audio_layer"]),
        encoder_attention_heads=int(dims["n_audio_head"]),
        encoder_ffn_dim=4 * int(dims["n_audio_state"]),
        max_source_positions=int(dims["n_audio_ctx"]),
        vocab_size=int(dims.get("n_vocab", 0)), decoder_layers=int(dims.get("n_text_layer", 0)),
        decoder_attention_heads=int(dims.get("n_text_head", 0)),
        decoder_ffn_dim=4 * int(dims.get("n_text_state", dims["n_audio_state"])),
        max_target_positions=int(dims.get("n_text_ctx", 448)))
    return config if decoder and config.has_decoder else config.encoder_only()


def load_openai(path: str) -> Model:
    """OpenAI's ``.pt`` (``dims`` + ``model_state_dict``) -> :class:`Model`."""
    obj = read_torch_file(path)
    state = obj["model_state_dict"]
    config = config_from_dims(obj["dims"], decoder=any(k.startswith("decoder.") for k in state))
    # OpenAI keeps the alignment heads as a (sparse) buffer, not a parameter
    params = map_params(param_shapes(config), state, openai_key, ignore=[r"^alignment_heads$"],
                        source=path)
    extras = {"format": "openai"}
    if config.has_decoder:  # the .pt holds no tokenizer; OpenAI's code knows the ids
        extras["generation"] = generation_config(None, config.vocab_size)
    return Model(config, params, source=path, extras=extras)


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
        cfg = config_from_dims(obj["dims"], decoder=False)
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
