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
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from jaxspeech.convert import register_converter
from jaxspeech.convert.common import (
    CheckpointError,
    default_torch_key,
    find_weights,
    flatten,
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

def hf_state_dict(params: Mapping, config: WhisperConfig,
                  prefix: str = "model.") -> dict[str, np.ndarray]:
    """jaxspeech Whisper ``params`` -> HF tensors in PyTorch layouts: the inverse of
    :func:`load_hf` (names from :func:`_hf_key`, Dense kernels ``[in, out]`` back to
    ``weight [out, in]``, conv kernels ``[k, in, out]`` back to ``[out, in, k]``).
    ``prefix="model."`` names ``WhisperForConditionalGeneration``'s tensors (plus the tied
    ``proj_out.weight`` when ``config`` has a decoder), ``""`` a ``WhisperModel``'s.
    Every leaf of ``param_shapes(config)`` must be in ``params`` with its shape."""
    flat = flatten(params)
    out = {}
    for path, spec in flatten(param_shapes(config)).items():
        if path not in flat:
            raise CheckpointError(f"params have no {'.'.join(path)}, which {config} needs")
        value = np.asarray(flat[path], np.float32)
        if value.shape != tuple(spec.shape):
            raise CheckpointError(f"params {'.'.join(path)} has shape {value.shape}, the config "
                                  f"needs {tuple(spec.shape)}")
        if path[-1] == "kernel":  # to_flax undone
            value = value.T if value.ndim == 2 else np.moveaxis(value, (-1, -2), (0, 1))
        out[_hf_key(prefix, path)] = np.array(value)  # a writable copy for torch
    if config.has_decoder and prefix == "model.":
        out["proj_out.weight"] = out["model.decoder.embed_tokens.weight"]
    return out


def hf_torch_model(params: Mapping, config: WhisperConfig, generation: Mapping | None = None):
    """A transformers model holding jaxspeech ``params`` (float32, eval mode):
    ``WhisperForConditionalGeneration`` for a config with a decoder, with ``generation``
    (``Model.extras["generation"]``) as its generation config; ``WhisperEncoder`` for an
    encoder-only one. The weights go through :func:`hf_state_dict`, loaded strictly."""
    import torch
    from transformers import GenerationConfig, WhisperForConditionalGeneration
    from transformers import WhisperConfig as HFConfig
    from transformers.models.whisper.modeling_whisper import WhisperEncoder

    gen = dict(generation or {})
    # Whisper pads and begins with <|endoftext|>; unknown ids stay None (transformers'
    # defaults are the real vocabulary's, out of range for a small one)
    eos = gen.get("eos_token_id")
    special = {"decoder_start_token_id": gen.get("decoder_start_token_id"), "eos_token_id": eos,
               "pad_token_id": eos, "bos_token_id": eos}
    hf_cfg = HFConfig(
        num_mel_bins=config.n_mels, d_model=config.d_model, encoder_layers=config.encoder_layers,
        encoder_attention_heads=config.encoder_attention_heads,
        encoder_ffn_dim=config.encoder_ffn_dim, max_source_positions=config.max_source_positions,
        vocab_size=max(config.vocab_size, 1), decoder_layers=config.decoder_layers,
        decoder_attention_heads=max(config.decoder_attention_heads, 1),
        decoder_ffn_dim=config.decoder_ffn_dim, max_target_positions=config.max_target_positions,
        attn_implementation="eager", **special)
    with torch.device("meta"):  # no random init: every tensor is assigned below
        model = WhisperForConditionalGeneration(hf_cfg) if config.has_decoder else \
            WhisperEncoder(hf_cfg)
    if config.has_decoder:
        state = hf_state_dict(params, config)
        keys = ["decoder_start_token_id", "eos_token_id", "pad_token_id", "bos_token_id",
                "no_timestamps_token_id", "is_multilingual", "suppress_tokens",
                "begin_suppress_tokens", "alignment_heads"]
        if gen.get("is_multilingual"):  # transformers detects the language when it has these
            keys += ["lang_to_id", "task_to_id"]
        model.generation_config = GenerationConfig(
            max_length=config.max_target_positions,
            **{k: v for k, v in {**gen, **special}.items() if k in keys})
    else:
        state = {k[len("encoder."):]: v for k, v in hf_state_dict(params, config, "").items()}
    model.load_state_dict({k: torch.from_numpy(v) for k, v in state.items()}, strict=True,
                          assign=True)
    return model.eval()


def _log_mel_float64(extractor, wave: np.ndarray) -> np.ndarray:
    """``WhisperFeatureExtractor``'s recipe (``_torch_extract_fbank_features``) in float64:
    its torch path casts to float32 and its NumPy path keeps the STFT in complex64, so
    neither runs in float64. Zero-pad / trim to the window, periodic Hann |STFT|^2 (last
    frame dropped), the extractor's own float64 Slaney filters, log10 of max(x, 1e-10),
    the per-item max-8 clamp, (x + 4) / 4. ``wave [B, samples]`` -> ``[B, n_mels, frames]``."""
    import torch

    wave = np.asarray(wave, np.float64)[:, : extractor.n_samples]
    padded = np.zeros((wave.shape[0], extractor.n_samples))
    padded[:, : wave.shape[1]] = wave
    window = torch.hann_window(extractor.n_fft, dtype=torch.float64)
    stft = torch.stft(torch.from_numpy(padded), extractor.n_fft, extractor.hop_length,
                      window=window, return_complex=True)
    power = stft[..., :-1].abs() ** 2
    mel = torch.from_numpy(np.asarray(extractor.mel_filters, np.float64)).T @ power
    log = torch.clamp(mel, min=1e-10).log10()
    log = torch.maximum(log, log.amax(dim=(1, 2), keepdim=True) - 8.0)
    return ((log + 4.0) / 4.0).numpy()


def hf_reference(model, n_mels: int, n_samples: int, dtype: str = "float32"):
    """``(features_fn, model_fn[, generate_fn])`` of a transformers Whisper ``model``
    (``WhisperForConditionalGeneration``, or ``WhisperEncoder`` for an encoder-only
    checkpoint), run in ``dtype`` ("float32" or "float64": ``model.double()``):

    - ``features_fn(wave [B, samples], lengths [B] or None) -> (features [B, n_mels, frames],
      {})``: ``WhisperFeatureExtractor`` in float32; its recipe in float64
      (:func:`_log_mel_float64`). Zero padding is what Whisper does anyway.
    - ``model_fn(features, tokens=None)``: the encoder output ``[B, frames / 2, d_model]``; with
      ``tokens [B, L]`` the teacher-forced logits ``[B, L, vocab]`` (as ``Model.apply``).
    - ``generate_fn(features, max_new_tokens, suppress_tokens=None) -> [B] lists of token
      ids``: greedy ``generate`` (the model's generation config, ``suppress_tokens`` in place
      of its list when given; no timestamps), each sequence from its start token through
      ``<|endoftext|>`` when reached; only with a decoder that knows its start and end tokens.
    """
    import torch
    from transformers import WhisperFeatureExtractor

    if dtype not in ("float32", "float64"):
        raise ValueError(f"reference dtype {dtype!r}: 'float32' or 'float64'")
    np_dtype = np.dtype(dtype)
    model = model.double() if dtype == "float64" else model.float()
    model.eval()
    decoder = hasattr(model, "generate")
    encoder = model.get_encoder() if decoder else model
    extractor = WhisperFeatureExtractor(feature_size=n_mels, chunk_length=n_samples // 16000)

    def features_fn(wave, lengths=None):
        if dtype == "float64":
            return _log_mel_float64(extractor, wave), {}
        out = extractor(list(np.asarray(wave)), sampling_rate=16000, return_tensors="np")
        return out["input_features"], {}

    def model_fn(features, tokens=None):
        x = torch.from_numpy(np.asarray(features, np_dtype))
        with torch.no_grad():
            if tokens is None:
                return encoder(x).last_hidden_state.numpy()
            if not decoder:
                raise ValueError("this Whisper checkpoint has no decoder; no logits to compare")
            ids = torch.from_numpy(np.asarray(tokens, np.int64))
            return model(input_features=x, decoder_input_ids=ids).logits.numpy()

    def generate_fn(features, max_new_tokens: int, suppress_tokens=None) -> list[list[int]]:
        eos = model.generation_config.eos_token_id
        options = {} if suppress_tokens is None else {"suppress_tokens": list(suppress_tokens)}
        if getattr(model.generation_config, "is_multilingual", False):
            # transformers puts a task token in the prompt only when told one (or a
            # language); the hub's configs do it through forced_decoder_ids
            options["task"] = "transcribe"
        with torch.no_grad():
            out = model.generate(input_features=torch.from_numpy(np.asarray(features, np_dtype)),
                                 max_new_tokens=max_new_tokens, do_sample=False, num_beams=1,
                                 return_timestamps=False, return_dict_in_generate=True,
                                 **options)
        sequences = []
        for row in out.sequences.tolist():
            sequences.append(row[: row.index(eos) + 1] if eos in row else row)
        return sequences

    gen = getattr(model, "generation_config", None)
    if decoder and gen is not None and gen.decoder_start_token_id is not None \
            and gen.eos_token_id is not None:
        return features_fn, model_fn, generate_fn
    return features_fn, model_fn


def reference(path: str, dtype: str = "float32"):
    """The transformers reference for this checkpoint in ``dtype`` ("float32" or "float64"),
    as :func:`hf_reference` gives it: ``(features_fn, model_fn)``, plus ``generate_fn``
    for a checkpoint with a decoder and generation settings. An HF folder is read by
    transformers itself (``WhisperForConditionalGeneration`` when it has decoder tensors, a
    ``WhisperModel`` folder's decoder tied to its embedding as transformers ties it; else
    ``WhisperModel``'s encoder); an OpenAI ``.pt`` becomes a transformers model holding
    its tensors (:func:`hf_torch_model`)."""
    from transformers import WhisperForConditionalGeneration, WhisperModel

    if os.path.isdir(path):
        hf = json.loads((Path(path) / "config.json").read_text())
        state = read_state_dict(find_weights(path))
        prefix = _hf_prefix(state)[: -len("encoder.")]
        if any(k.startswith(prefix + "decoder.") for k in state):
            model = WhisperForConditionalGeneration.from_pretrained(
                path, attn_implementation="eager")
        else:
            model = WhisperModel.from_pretrained(path, attn_implementation="eager").encoder
        n_mels = int(hf.get("num_mel_bins", 80))
        n_samples = 2 * int(hf.get("max_source_positions", 1500)) * 160
    else:
        m = load_openai(path)
        model = hf_torch_model(m.params, m.config, m.extras.get("generation"))
        n_mels, n_samples = m.config.n_mels, m.config.n_samples
    return hf_reference(model, n_mels, n_samples, dtype)


register_converter("whisper", sys.modules[__name__])
