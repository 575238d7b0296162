"""Splash attention (Pallas' TPU flash-attention kernel) for unmasked self-attention.

    q, k, v [B, T, heads, head_dim]  (q already scaled)
      -> padded to T' = the next multiple of 128 (the TPU's lane width), heads first
      -> per item: splash kernel over [heads, T', head_dim], padded tokens in a segment of
         their own (real queries never attend them; padded queries only each other)
      -> [B, T, heads, head_dim]

The kernel has its own forward and backward (flash attention: the ``[T, T]`` scores exist
one block at a time, in VMEM), so :func:`jaxspeech.lrp.fused_attention` takes its VJP and
rescales the cotangents as it does cuDNN's. Whisper's 1500 frames become 1536 = 3 blocks
of 512. Off TPU the same kernel runs in Pallas' interpret mode: slow, exact, for tests.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

__all__ = ["splash_attention", "LANES"]

LANES = 128


def _block(length: int) -> int:
    return next(b for b in (512, 256, 128) if length % b == 0)


@functools.cache
def _kernel(heads: int, length: int, interpret: bool):
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as sm

    b = _block(length)
    sizes = sk.BlockSizes(block_q=b, block_kv=b, block_kv_compute=b, block_q_dkv=b,
                          block_kv_dkv=b, block_kv_dkv_compute=b, block_q_dq=b, block_kv_dq=b)
    mask = sm.MultiHeadMask([sm.FullMask((length, length))] * heads)
    # The kernel holds its block-sparsity tables as arrays: made concrete here, not as
    # tracers of whichever jit first asked for them (the kernel is cached across traces).
    with jax.ensure_compile_time_eval():
        return sk.make_splash_mha(mask, block_sizes=sizes, head_shards=1, q_seq_shards=1,
                                  interpret=interpret)


def splash_attention(q: jnp.ndarray, k: jnp.ndarray, v: jnp.ndarray) -> jnp.ndarray:
    """``softmax(q kᵀ) v`` per head: ``q, k, v [B, T, heads, head_dim]`` (``q`` already
    scaled, one length for all three) -> ``[B, T, heads, head_dim]``."""
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk

    if not q.shape == k.shape == v.shape:
        raise ValueError(f"splash_attention is self-attention: q, k, v of one shape; got "
                         f"{q.shape}, {k.shape}, {v.shape}")
    _, t, heads, _ = q.shape
    length = -(-t // LANES) * LANES
    kernel = _kernel(heads, length, jax.default_backend() != "tpu")

    def heads_first(x):  # [B, T, H, D] -> [B, H, T', D]
        return jnp.pad(x, [(0, 0), (0, length - t), (0, 0), (0, 0)]).transpose(0, 2, 1, 3)

    ids = None
    if length != t:
        segment = (jnp.arange(length) >= t).astype(jnp.int32)
        ids = sk.SegmentIds(q=segment, kv=segment)
    out = jax.vmap(lambda qi, ki, vi: kernel(qi, ki, vi, segment_ids=ids))(
        heads_first(q), heads_first(k), heads_first(v))
    return out.transpose(0, 2, 1, 3)[:, :t]
