"""CLAP's text side and zero-shot classification.

jaxspeech ports CLAP's audio tower only; text embeddings come from the checkpoint's
own RoBERTa tower run by ``transformers`` in PyTorch (text needs no attribution
here: it is the fixed target). The checkpoint folder must be a ``ClapModel`` saved
with its tokenizer (``ClapProcessor.save_pretrained`` or the tokenizer's own).

    texts = ["a dog barking", "rain on a roof"]
    t = js.clap_text_embeddings("path/to/clap", texts)      # [2, 512], L2-normalised
    p = js.zero_shot(m, wave, texts)                         # [B, 2] probabilities
    p = js.zero_shot(m, wave, t, logit_scale=33.37)          # with precomputed embeddings

``zero_shot`` reproduces ``ClapModel(...).logits_per_audio.softmax(-1)``:
``exp(logit_scale_a) · normalise(audio) · normalise(text)ᵀ``, softmax over the texts.
(HF's zero-shot *pipeline* first writes each label into "This is a sound of {}.";
pass ``template="This is a sound of {}."`` to do the same.)
"""

from __future__ import annotations

import functools
import json
import os
from collections.abc import Sequence
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["clap_text_embeddings", "zero_shot", "clap_logit_scale"]


@functools.lru_cache(maxsize=4)
def _text_tower(path: str):
    from transformers import AutoTokenizer, ClapModel

    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError, TypeError) as e:
        raise ValueError(
            f"{path}: no usable tokenizer ({e}); save the CLAP tokenizer (or ClapProcessor) "
            "into the checkpoint folder") from None
    model = ClapModel.from_pretrained(path).eval()
    return tokenizer, model


def _clap_model_dir(path) -> str:
    path = os.fspath(path)
    cfg = Path(path) / "config.json"
    model_type = json.loads(cfg.read_text()).get("model_type") if cfg.is_file() else None
    if model_type != "clap":
        raise ValueError(f"{path} is not an HF ClapModel folder (config.json model_type "
                         f"{model_type!r}); the text tower lives in a full ClapModel checkpoint")
    return str(Path(path).resolve())


def clap_text_embeddings(checkpoint_dir: str | os.PathLike, texts: str | Sequence[str],
                         *, batch_size: int = 64) -> np.ndarray:
    """``texts`` (N strings) -> L2-normalised embeddings ``[N, projection_dim]`` float32
    (``ClapModel.get_text_features`` with the folder's tokenizer, padded per batch)."""
    import torch

    tokenizer, model = _text_tower(_clap_model_dir(checkpoint_dir))
    texts = [texts] if isinstance(texts, str) else list(texts)
    if not texts or not all(isinstance(t, str) for t in texts):
        raise ValueError("texts must be a non-empty list of strings")
    out = []
    with torch.no_grad():
        for i in range(0, len(texts), batch_size):
            tokens = tokenizer(texts[i:i + batch_size], padding=True, return_tensors="pt")
            out.append(model.get_text_features(input_ids=tokens["input_ids"],
                                               attention_mask=tokens["attention_mask"]).numpy())
    return np.concatenate(out).astype(np.float32)


def clap_logit_scale(m, checkpoint_dir: str | os.PathLike | None = None) -> float:
    """``exp(logit_scale_a)`` of ``m``'s checkpoint: from ``m.extras`` (kept by the HF
    loader and by ``m.save``), else read from ``checkpoint_dir``'s weights."""
    if "logit_scale_a" in m.extras:
        return float(np.exp(m.extras["logit_scale_a"]))
    if checkpoint_dir is not None:
        from jaxspeech.convert.common import find_weights, read_state_dict

        weights = find_weights(checkpoint_dir)
        state = read_state_dict(weights) if weights else {}
        if "logit_scale_a" in state:
            return float(np.exp(np.asarray(state["logit_scale_a"])))
    raise ValueError("no logit_scale_a known for this model (a ClapAudioModelWithProjection has "
                     "none); pass logit_scale= (the multiplier, exp of ClapModel.logit_scale_a)")


def _normalise(x: jnp.ndarray) -> jnp.ndarray:
    return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def zero_shot(m, wave, labels_or_text_embeddings, *, checkpoint_dir: str | os.PathLike | None = None,
              logit_scale: float | None = None, template: str = "{}",
              sample_rate: int | None = None, **prepare_options) -> jax.Array:
    """Audio-text zero-shot probabilities ``[B, N]`` for ``wave`` (as ``m(wave)`` takes it).

    ``labels_or_text_embeddings``: N label strings (embedded with the text tower of
    ``checkpoint_dir``, default ``m.source``, each written into ``template``) or an
    ``[N, D]`` array of text embeddings (normalised here, as ClapModel does).
    ``logit_scale``: the multiplier ``exp(logit_scale_a)``; ``None`` reads it from the
    checkpoint (:func:`clap_logit_scale`). ``prepare_options`` go to the front end
    (``key``, ``crops``, ``longer``)."""
    labels = labels_or_text_embeddings
    if isinstance(labels, str):
        labels = [labels]
    text_dir = checkpoint_dir if checkpoint_dir is not None else m.source
    if isinstance(labels, (list, tuple)) and labels and all(isinstance(t, str) for t in labels):
        if text_dir is None or not os.path.isdir(text_dir):
            raise ValueError("label strings need checkpoint_dir= (an HF ClapModel folder with its "
                             "tokenizer) to embed them")
        text = clap_text_embeddings(text_dir, [template.format(t) for t in labels])
    else:
        text = np.asarray(labels, np.float32)
        if text.ndim != 2:
            raise ValueError(f"text embeddings must be [N, D], got shape {text.shape}")
    if logit_scale is None:
        source = m.source if m.source and os.path.isdir(m.source) else None
        logit_scale = clap_logit_scale(m, checkpoint_dir if checkpoint_dir is not None else source)
    audio = m(wave, sample_rate=sample_rate, **prepare_options)
    if audio.shape[-1] != text.shape[-1]:
        raise ValueError(f"audio embeddings have {audio.shape[-1]} dims, text embeddings "
                         f"{text.shape[-1]}")
    logits = float(logit_scale) * jnp.einsum("bd,nd->bn", _normalise(audio),
                                              _normalise(jnp.asarray(text)), precision="highest")
    return jax.nn.softmax(logits, axis=-1)
