"""Speaker verification with an embedding model: cosine similarity and a threshold.

    res = jaxspeech.verify(m, wave_a, wave_b)        # batched, item i of a vs item i of b
    res.score     # [B] cosine similarity of the embeddings, in [-1, 1]
    res.decision  # [B] bool, score > threshold (SpeechBrain's verify_batch: 0.25)

As SpeechBrain's ``SpeakerRecognition.verify_batch``: embeddings without the
``mean_var_norm_emb`` normalisation, ``CosineSimilarity(eps=1e-6)``, strict ``>``.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp

__all__ = ["VerificationResult", "verify", "cosine_similarity"]


@dataclasses.dataclass(frozen=True)
class VerificationResult:
    score: jnp.ndarray  # [B] float32
    decision: jnp.ndarray  # [B] bool


def cosine_similarity(a: jnp.ndarray, b: jnp.ndarray, eps: float = 1e-6) -> jnp.ndarray:
    """``a, b [B, D]`` -> ``[B]``: ``a·b / max(|a| |b|, eps)`` (torch's ``CosineSimilarity``)."""
    dot = jnp.sum(a * b, axis=-1)
    norms = jnp.sqrt(jnp.sum(a * a, axis=-1) * jnp.sum(b * b, axis=-1))
    return dot / jnp.maximum(norms, eps)


def verify(model, wave_a, wave_b, *, threshold: float = 0.25, lengths_a=None, lengths_b=None,
           sample_rate: int | None = None) -> VerificationResult:
    """Does item ``i`` of ``wave_a`` come from the same speaker as item ``i`` of ``wave_b``?

    ``wave_a``, ``wave_b``: ``[B, samples]`` (or ``[samples]``, or lists of clips), each
    batch with its own optional relative ``lengths``; ``B`` must agree (or one side
    has a single item, compared with every item of the other).
    """
    emb_a = model(wave_a, lengths=lengths_a, sample_rate=sample_rate)
    emb_b = model(wave_b, lengths=lengths_b, sample_rate=sample_rate)
    if emb_a.ndim != 2 or emb_b.ndim != 2:
        raise ValueError(f"verify needs a model with [B, D] embeddings, got {emb_a.shape}")
    na, nb = emb_a.shape[0], emb_b.shape[0]
    if na != nb and 1 not in (na, nb):
        raise ValueError(f"verify: {na} clips in wave_a but {nb} in wave_b; pass equal batches "
                         "(pairs) or a single reference clip on one side")
    n = max(na, nb)
    emb_a = jnp.broadcast_to(emb_a, (n, emb_a.shape[1]))
    emb_b = jnp.broadcast_to(emb_b, (n, emb_b.shape[1]))
    score = cosine_similarity(emb_a, emb_b)
    return VerificationResult(score=score, decision=score > threshold)
