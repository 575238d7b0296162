"""Activation patching of every layer x head site of real whisper-base for one utterance: one
``js.patching`` call vs a loop of single patches in jaxspeech vs the same loop with torch
forward hooks on transformers (same weights), same CPU, same run.

    python benchmarks/patching.py                       # real base, 6 layers x 8 heads = 48 sites
    python benchmarks/patching.py --model tiny.en       # 4 x 6 = 24 sites
    python benchmarks/patching.py --layers 2            # the first 2 layers' heads only (quick)

The utterance: a shipped espeak-ng clip ("Please call Taylor after the meeting.", clean) and
another voice's sentence (corrupt), both padded to Whisper's 30 s window. The target: the
log-probability of one token of the clean transcript (greedy, then teacher forced on the
prompt and the transcript in every run), so each patched run is the encoder from the
patched layer on plus the whole decoder. A site is one head's context (before
``out_proj``) in one encoder layer, all 1500 frames, taken from the corrupt run.

1. ``one call``: ``js.patching(m, clean, corrupt, target, sites="heads", tokens=...)``:
   the clean and corrupt forwards, then per layer its 8 sites ``vmap``-ped (``--chunk`` at
   a time) over one forward that starts from the clean run's values at the layer.
2. ``jax loop``: ``m.apply(m.params, x, tokens=..., edits={site: js.edits.patch(corrupt, mask)})``
   per site (compiled once per layer, the mask traced), plus the corrupt forward.
3. ``torch loop``: transformers' ``WhisperForConditionalGeneration`` holding the same weights
   (:func:`jaxspeech.convert.whisper.hf_torch_model`, SDPA attention), a forward pre-hook on the layer's
   ``self_attn.out_proj`` putting the corrupt run's head context in place, one forward per
   site under ``torch.inference_mode``, plus the corrupt forward that records the contexts.

Each contender runs in its own process on ``--threads`` cores: a warm-up (jaxspeech's
compiles; their time is reported apart), then ``--repeats`` timed runs (median wall and CPU
time; on a shared machine CPU time is the steady number). Every contender computes the clean
and corrupt targets too. The multiply-adds of the loop and of the one call, counted from the
config (:func:`macs`), give the best ratio arithmetic allows on hardware that runs both at the
same speed per MAC (a CPU, where a batch-1 forward already keeps the cores busy); it is
printed beside the measured one.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import header, peak_rss_mb, timed  # noqa: E402

CLEAN, CORRUPT = "taylor_en_gb", "brother_en_us"
WORD = 2  # the target: the third text token of the clean transcript


def _setup(model: str):
    import jax.numpy as jnp

    import jaxspeech as js
    from jaxspeech.assets import speech_clips, whisper_folder
    from jaxspeech.transcribe import generate

    m = js.load(whisper_folder(model))
    clips = {c.id: c for c in speech_clips()}
    x = m.features(clips[CLEAN].read()[None])
    xr = m.features(clips[CORRUPT].read()[None])
    out = generate(m, x)
    tokens = np.asarray([out.prompts[0] + out.tokens[0]], np.int32)
    position = len(out.prompts[0]) - 1 + WORD  # logits there predict text token WORD
    return m, jnp.asarray(x), jnp.asarray(xr), tokens, position, int(tokens[0, position + 1])


def _target(position: int, token: int):
    import jax

    import jaxspeech as js

    def logprob(logits, args, params, rules):
        return jax.nn.log_softmax(logits[:, args["position"]], axis=-1)[:, args["token"]]

    return js.targets.Target(logprob, "token_logprob", None,
                             {"position": np.int32(position), "token": np.int32(token)})


def macs(config, layers: int, tokens: int) -> dict[str, float]:
    """Multiply-adds of the programs, counted from the config (XLA's cost analysis counts a
    ``lax.map`` body once, so it misses most of the tiled attention): a forward ``F``, and the
    one call = the clean and corrupt forwards + per patched layer l its attention once and, per
    head, the rest of layer l from ``out_proj`` on, the layers after it and the decoder."""
    t, d, f, n = config.max_source_positions, config.d_model, config.encoder_ffn_dim, tokens
    qkv, core, out, ffn = 3 * t * d * d, 2 * t * t * d, t * d * d, 2 * t * d * f
    layer = qkv + core + out + ffn
    conv = 2 * t * 3 * config.n_mels * d + t * 3 * d * d
    dec_layer = (4 * n * d * d + 2 * n * n * d + 2 * n * d * d + 2 * t * d * d + 2 * n * t * d
                 + 2 * n * d * config.decoder_ffn_dim)
    dec = config.decoder_layers * dec_layer + n * d * config.vocab_size
    forward = conv + config.encoder_layers * layer + dec
    heads = config.encoder_attention_heads
    one = 2 * forward + sum(qkv + core + heads * (out + ffn + (config.encoder_layers - 1 - i)
                                                  * layer + dec) for i in range(layers))
    return {"forward": forward, "one_call": one, "loop": (2 + heads * layers) * forward,
            "decoder": dec}


def _sites(m, layers: int):
    import jaxspeech as js

    return js.Sites.heads(m, [f"layers.{i}.self_attn.heads" for i in range(layers)])


def run_one_call(args) -> dict:
    import jax

    import jaxspeech as js

    m, x, xr, tokens, position, token = _setup(args.model)
    target, sites = _target(position, token), _sites(m, args.layers)

    def call():
        res = js.patching(m, clean_features=x, corrupt_features=xr, target=target, sites=sites,
                          tokens=tokens, chunk=args.chunk)
        return jax.block_until_ready(res.patched), res

    first, _ = timed(call, pause=0)
    wall, cpu = timed(call, args.repeats)
    (patched, res) = call()
    return {"compile_s": first - wall, "wall_s": wall, "cpu_s": cpu,
            "patched": np.asarray(patched)[0].tolist(), "clean": float(res.clean[0]),
            "corrupt": float(res.corrupt[0]), "peak_mb": peak_rss_mb(),
            "labels": list(sites.labels), "tokens": int(tokens.shape[1])}


def run_jax_loop(args) -> dict:
    import jax
    import jax.numpy as jnp

    import jaxspeech as js

    m, x, xr, tokens, position, token = _setup(args.model)
    target, sites = _target(position, token), _sites(m, args.layers)

    def call():
        clean = target(m.apply(m.params, x, tokens=tokens), {})
        _, inter = m.forward(m.params, xr, tokens=tokens)
        out = []
        for name, masks in zip(sites.names, sites.masks, strict=True):
            for mask in masks:
                y = m.apply(m.params, x, tokens=tokens,
                            edits={name: js.edits.patch(inter[name], mask)})
                out.append(target(y, {}))
        return jax.block_until_ready((clean, jnp.stack(out, axis=1)))[1]

    first, _ = timed(call, pause=0)
    wall, cpu = timed(call, args.repeats)
    return {"compile_s": first - wall, "wall_s": wall, "cpu_s": cpu,
            "patched": np.asarray(call())[0].tolist(), "peak_mb": peak_rss_mb()}


def run_torch_loop(args) -> dict:
    import torch

    from jaxspeech.convert.whisper import hf_torch_model

    m, x, xr, tokens, position, token = _setup(args.model)
    hf = hf_torch_model(m.params, m.config, m.extras.get("generation"))
    hf.config._attn_implementation = "sdpa"  # torch's fused attention, its fastest CPU path
    layers, heads = args.layers, m.config.encoder_attention_heads
    x_t, xr_t = (torch.from_numpy(np.asarray(a)) for a in (x, xr))
    ids = torch.from_numpy(tokens).long()

    def call():
        with torch.inference_mode():
            recorded, handles = {}, []
            for i in range(layers):
                out_proj = hf.model.encoder.layers[i].self_attn.out_proj
                handles.append(out_proj.register_forward_pre_hook(
                    lambda mod, a, i=i: recorded.__setitem__(i, a[0].clone())))
            hf(input_features=xr_t, decoder_input_ids=ids)
            for h in handles:
                h.remove()
            hf(input_features=x_t, decoder_input_ids=ids)  # the clean run, for the effects
            out = []
            for i in range(layers):
                out_proj = hf.model.encoder.layers[i].self_attn.out_proj
                for h in range(heads):
                    def patch(mod, a, i=i, h=h):
                        c = a[0].reshape(*a[0].shape[:2], heads, -1).clone()
                        c[:, :, h] = recorded[i].reshape(c.shape)[:, :, h]
                        return (c.reshape(a[0].shape),)
                    handle = out_proj.register_forward_pre_hook(patch)
                    logits = hf(input_features=x_t, decoder_input_ids=ids).logits
                    handle.remove()
                    out.append(torch.log_softmax(logits[0, position], -1)[token].item())
            return out

    call()
    wall, cpu = timed(call, args.repeats)
    return {"wall_s": wall, "cpu_s": cpu, "patched": call(), "peak_mb": peak_rss_mb(),
            "threads": torch.get_num_threads()}


CONTENDERS = {"one call": run_one_call, "jax loop": run_jax_loop, "torch loop": run_torch_loop}


def child(args) -> None:
    cores = sorted(os.sched_getaffinity(0))
    if args.threads < len(cores):  # before jax / torch start their thread pools
        os.sched_setaffinity(0, cores[:args.threads])
    import torch

    torch.set_num_threads(args.threads)
    print(json.dumps(CONTENDERS[args.contender](args)))


def spawn(args, contender: str) -> dict:
    cmd = [sys.executable, __file__, "--child", "--contender", contender, "--model", args.model,
           "--layers", str(args.layers), "--chunk", str(args.chunk), "--repeats",
           str(args.repeats), "--threads", str(args.threads)]
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode:
        raise RuntimeError(f"{contender} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="base", choices=("base", "tiny.en"))
    parser.add_argument("--layers", type=int, default=0, help="patch the first N layers (0: all)")
    parser.add_argument("--chunk", type=int, default=8, help="sites run together in one call")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1,
                        help="cores per contender (the process's CPU affinity, torch's threads)")
    parser.add_argument("--only", nargs="*", choices=tuple(CONTENDERS), default=None)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--contender", choices=tuple(CONTENDERS), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if not args.layers:
        args.layers = {"base": 6, "tiny.en": 4}[args.model]
    if args.child:
        child(args)
        return
    print(header(f"activation patching, whisper {args.model}, {args.layers} layers x heads") +
          f"; each contender in a fresh process on {args.threads} core(s)")
    results = {c: spawn(args, c) for c in (args.only or CONTENDERS)}
    one = results.get("one call")
    n = len(one["labels"]) if one else None
    print("| contender | wall s | CPU s | CPU ratio to one call | compile s | "
          "max |diff| to one call | peak MB |")
    print("|---|---|---|---|---|---|---|")
    for name, r in results.items():
        diff = np.abs(np.asarray(r["patched"]) - np.asarray(one["patched"])).max() if one else np.nan
        ratio = r["cpu_s"] / one["cpu_s"] if one else np.nan
        print(f"| {name} | {r['wall_s']:.1f} | {r['cpu_s']:.1f} | {ratio:.2f} | "
              f"{r.get('compile_s', 0):.1f} | {diff:.1e} | {r['peak_mb']:.0f} |")
    if one:
        from jaxspeech.models.whisper import PRESETS

        config = PRESETS["whisper-base" if args.model == "base" else "whisper-tiny.en"]
        c = macs(config, args.layers, one["tokens"])
        print(f"\n{n} sites. Arithmetic: a forward is {c['forward'] / 1e9:.1f} GMAC (the decoder "
              f"{c['decoder'] / 1e9:.1f} of it, mostly the cross-attention keys and values of "
              f"1500 frames); the loop runs {n} + 2 of them, {c['loop'] / 1e9:.0f} GMAC; the one "
              f"call {c['one_call'] / 1e9:.0f} GMAC. Bound on the ratio of the two at equal "
              f"speed per MAC: {c['loop'] / c['one_call']:.2f}x")
    if one:
        eff = np.asarray(one["patched"]) - one["clean"]
        top = np.argsort(eff)[:5]
        print(f"clean log p = {one['clean']:.3f}, corrupt = {one['corrupt']:.3f}; largest drops: "
              + ", ".join(f"{one['labels'][i]} {eff[i]:+.3f}" for i in top))


if __name__ == "__main__":
    main()
