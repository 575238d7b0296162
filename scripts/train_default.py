"""Train the shipped default model: a small Whisper encoder and a linear head on
planted-evidence clips, from scratch, with optax. Writes
``jaxspeech/assets/planted_whisper/{model,head}.npz``.

    python scripts/train_default.py                 # a few minutes on 2 CPU cores
    python scripts/train_default.py --out /tmp/pw   # somewhere else

Data: :func:`jaxspeech.assets.default_planted` (train seed 1, validation seed 2; the
test evaluates on yet another seed). Log-mel features are computed once; each epoch
draws a random circular time shift per clip (the class does not depend on *when*
the evidence sounds). The head is a linear layer on the mean-pooled final hidden
states (exactly :func:`jaxspeech.targets.linear_probe` on the output), trained
jointly with the encoder and saved as a probe npz.
"""

from __future__ import annotations

import argparse
import functools
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

import jaxspeech as js
from jaxspeech import assets
from jaxspeech.probe import Probe

TRAIN_SEED, VAL_SEED = 1, 2


def features(model, waves: np.ndarray, batch: int = 100) -> np.ndarray:
    """Log-mel features of ``waves [N, samples]`` -> ``[N, n_mels, frames]``, in batches."""
    prepare = jax.jit(lambda w: model.prepare(w)[0])
    return np.concatenate([np.asarray(prepare(jnp.asarray(waves[i:i + batch])))
                           for i in range(0, len(waves), batch)])


def logits(model, params, x):
    """The model's head on the mean-pooled output: ``[B, classes]``."""
    h = model.apply(params["encoder"], x).mean(axis=1)
    return h @ params["head"]["w"] + params["head"]["b"][None, :]


def loss_fn(model, params, x, y):
    return optax.softmax_cross_entropy_with_integer_labels(logits(model, params, x), y).mean()


@functools.partial(jax.jit, static_argnames=("model", "optimizer"))
def train_step(model, optimizer, params, opt_state, x, y):
    loss, grads = jax.value_and_grad(functools.partial(loss_fn, model))(params, x, y)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss


@functools.partial(jax.jit, static_argnames=("model",))
def predict(model, params, x):
    return jnp.argmax(logits(model, params, x), axis=-1)


def accuracy(model, params, x, y, batch: int = 100) -> float:
    pred = np.concatenate([np.asarray(predict(model, params, jnp.asarray(x[i:i + batch])))
                           for i in range(0, len(x), batch)])
    return float(np.mean(pred == y))


def shift(key, x):
    """Roll each item of ``x [B, n_mels, frames]`` by its own random number of frames."""
    offsets = jax.random.randint(key, (x.shape[0],), 0, x.shape[-1])
    return jax.vmap(lambda a, o: jnp.roll(a, o, axis=-1))(x, offsets)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(assets.DEFAULT_DIR))
    parser.add_argument("--n-train", type=int, default=3000)
    parser.add_argument("--n-val", type=int, default=400)
    parser.add_argument("--epochs", type=int, default=14)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    t0 = time.time()
    train = assets.default_planted(args.n_train, TRAIN_SEED)
    val = assets.default_planted(args.n_val, VAL_SEED)
    model = js.init("whisper-tiny", seed=args.seed, **assets.DEFAULT_CONFIG)
    x_train, x_val = features(model, train.waves), features(model, val.waves)
    print(f"data: {len(train)} train / {len(val)} val clips, features {x_train.shape[1:]}, "
          f"{time.time() - t0:.0f} s", flush=True)

    key = jax.random.key(args.seed)
    key, k_head = jax.random.split(key)
    d, c = model.config.d_model, train.n_classes
    params = {"encoder": model.params,
              "head": {"w": 0.02 * jax.random.normal(k_head, (d, c)), "b": jnp.zeros(c)}}
    steps_per_epoch = len(train) // args.batch_size
    total = args.epochs * steps_per_epoch
    schedule = optax.warmup_cosine_decay_schedule(0.0, args.lr, min(100, total // 4), total,
                                                  end_value=args.lr / 20)
    optimizer = optax.chain(optax.clip_by_global_norm(1.0),
                            optax.adamw(schedule, weight_decay=1e-4))
    opt_state = optimizer.init(params)
    rng = np.random.default_rng(args.seed)
    t1 = time.time()
    for epoch in range(args.epochs):
        order = rng.permutation(len(train))
        losses = []
        for s in range(steps_per_epoch):
            idx = order[s * args.batch_size:(s + 1) * args.batch_size]
            key, k = jax.random.split(key)
            xb = shift(k, jnp.asarray(x_train[idx]))
            params, opt_state, loss = train_step(model, optimizer, params, opt_state, xb,
                                                 jnp.asarray(train.labels[idx]))
            losses.append(loss)
        val_acc = accuracy(model, params, x_val, val.labels)
        print(f"epoch {epoch + 1:2d}: loss {np.mean(jax.device_get(losses)):.4f}, val accuracy "
              f"{val_acc:.4f} ({time.time() - t1:.0f} s)", flush=True)
    train_time = time.time() - t1

    trained = js.Model(model.config, jax.tree.map(np.asarray, params["encoder"]),
                       source="jaxspeech:planted_whisper")
    meta = {"planted": assets.PLANTED, "train_seed": TRAIN_SEED, "val_seed": VAL_SEED,
            "n_train": len(train), "val_accuracy": val_acc, "train_seconds": round(train_time)}
    assets.save_model_npz(trained, f"{args.out}/model.npz", meta)
    head = Probe(np.asarray(params["head"]["w"]), np.asarray(params["head"]["b"]), None,
                 tuple(f"class{k}" for k in range(c)))
    head.save(f"{args.out}/head.npz")
    print(f"saved {args.out} (val accuracy {val_acc:.4f}, training {train_time:.0f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
