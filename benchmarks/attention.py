"""The attention core alone: jaxspeech's tiled kernel, XLA's fused attention under the rules,
a plain einsum-softmax-einsum and torch's ``scaled_dot_product_attention``, one process.

    taskset -c 0 python benchmarks/attention.py                  # whisper-tiny's shape
    taskset -c 0 python benchmarks/attention.py --heads 8 --batch 1 --repeats 5   # base

Each kernel runs the forward alone and the forward + AttnLRP backward (relevance: the
cotangents of q, k, v), jitted, compile time apart. The kernels are timed in alternation,
round after round, so that a shared machine's load falls on all of them alike; the median
of the rounds is printed. ``lrp.attention_implementation`` reads these numbers (the CPU
default stays "tiled" while XLA's is slower here).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import header, timed  # noqa: E402


def jax_kernels(q, k, v):
    import jax
    import jax.numpy as jnp

    from jaxspeech import lrp

    rules = lrp.RULE_SETS["attnlrp"]
    b, t, h, d = q.shape

    def heads_first(x):
        return x.transpose(0, 2, 1, 3).reshape(b * h, t, d)

    def tiled(q, k, v, r):
        out = lrp.attention_core(heads_first(q), heads_first(k), heads_first(v), r, 300)
        return out.reshape(b, h, t, d).transpose(0, 2, 1, 3)

    def xla(q, k, v, r):
        return lrp.fused_attention(q, k, v, r, implementation="xla")

    def einsum(q, k, v, r):
        p = jax.nn.softmax(jnp.einsum("bqhd,bkhd->bhqk", q, k), axis=-1)
        return jnp.einsum("bhqk,bkhd->bqhd", p, v)

    kernels = {}
    for name, fn in (("tiled", tiled), ("xla", xla), ("einsum", einsum)):
        fwd = jax.jit(lambda q, k, v, fn=fn: fn(q, k, v, None))
        bwd = jax.jit(jax.grad(lambda q, k, v, fn=fn: (fn(q, k, v, rules) * v).sum(),
                               argnums=(0, 1, 2)))
        kernels[name] = (fwd, bwd)
    args = tuple(jnp.asarray(a) for a in (q, k, v))
    timed_kernels = {}
    for name, (fwd, bwd) in kernels.items():
        t0 = time.perf_counter()
        jax.block_until_ready(fwd(*args))
        jax.block_until_ready(bwd(*args))
        compile_s = time.perf_counter() - t0
        timed_kernels[name] = (compile_s,
                               lambda f=fwd: jax.block_until_ready(f(*args)),
                               lambda f=bwd: jax.block_until_ready(f(*args)))
    return timed_kernels


def torch_kernels(q, k, v):
    import torch

    tq, tk, tv = (torch.from_numpy(a).permute(0, 2, 1, 3).contiguous() for a in (q, k, v))

    def fwd():
        with torch.inference_mode():
            torch.nn.functional.scaled_dot_product_attention(tq, tk, tv, scale=1.0)

    gq, gk, gv = (x.clone().requires_grad_(True) for x in (tq, tk, tv))

    def bwd():  # LXT's efficient AttnLRP on SDPA: the same call, gradients rescaled
        out = torch.nn.functional.scaled_dot_product_attention(gq, gk, gv, scale=1.0)
        dq, dk, dv = torch.autograd.grad((out * gv.detach()).sum(), (gq, gk, gv))
        return dq * 0.25, dk * 0.25, dv * 0.5

    return {"torch_sdpa": (0.0, fwd, bwd)}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--heads", type=int, default=6)
    ap.add_argument("--tokens", type=int, default=1500)
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3, help="rounds of alternation")
    ap.add_argument("--no-torch", action="store_true")
    args = ap.parse_args(argv)

    rng = np.random.default_rng(0)
    shape = (args.batch, args.tokens, args.heads, args.head_dim)
    q, k, v = (rng.standard_normal(shape).astype(np.float32) for _ in range(3))
    q *= args.head_dim ** -0.5
    kernels = jax_kernels(q, k, v)
    if not args.no_torch:
        kernels.update(torch_kernels(q, k, v))
    print(header(f"attention core B {args.batch}, H {args.heads}, T {args.tokens}, "
                 f"D {args.head_dim}"))
    rounds = {name: ([], []) for name in kernels}
    for _ in range(args.repeats):
        for name, (_, fwd, bwd) in kernels.items():
            rounds[name][0].append(timed(fwd, pause=0.2)[0])
            rounds[name][1].append(timed(bwd, pause=0.2)[0])
    print(f"{'kernel':<11} {'compile s':>9} {'forward s':>9} {'fwd+AttnLRP bwd s':>17}")
    for name, (compile_s, _, _) in kernels.items():
        f, b = (float(np.median(x)) for x in rounds[name])
        print(f"{name:<11} {compile_s:>9.2f} {f:>9.3f} {b:>17.3f}")


if __name__ == "__main__":
    main()
