"""Linear probes on any layer of a frozen model, trained functionally with optax.

    feats = pooled_features(m, waves, ["layers.0.hidden_state", "output"])   # once
    results = train_probes(m, waves, labels, layers="all", classes=("a", "b"))
    results[0].probe.save("probes/layers.0.hidden_state.npz")
    target = load_probe("probes/layers.0.hidden_state.npz", index=1)  # an attribution target
    js.attribute(m, waves, target=target, method="attnlrp")

A probe is ``logits = pool(h) @ weight + bias`` on a layer's hidden states ``h [B, T, D]``
(or ``[B, D]``), ``pool`` the mean over all frames (a padded clip's padding included,
as the target pools), exactly what
:func:`jaxspeech.targets.linear_probe` computes, so a saved probe *is* a target. The
model stays frozen: its pooled features are computed once for every requested layer
in a single pass over the data (one forward per batch, all layers at once); the
probe's params are a small pytree trained beside them with a pure, jitted step.

    jaxspeech probe DATA --model M --layers all --label speaker --out probes/

``DATA``: ``planted:N[:SEED]`` (:mod:`jaxspeech.data.planted` clips), a CSV manifest
(``path,label`` rows, or a header naming the columns; paths relative to the CSV), or a
folder with one sub-folder of audio files per class. ``--model``: a checkpoint folder
(:func:`jaxspeech.load`), ``default`` (the shipped planted-evidence model) or
``init:PRESET`` (random weights), as every command takes it (:mod:`jaxspeech.checkpoints`).
Prints train and held-out accuracy per layer and saves each probe as
``<out>/<layer>.npz`` (``w``, ``b``, ``layer``, ``classes``, ``pooling``).
"""

from __future__ import annotations

import csv
import dataclasses
import functools
import os
from collections.abc import Sequence
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxspeech.attribution.targets import Target, linear_probe
from jaxspeech.model import _forward

__all__ = ["Probe", "ProbeResult", "save_probe", "read_probe", "load_probe", "probe_layers",
           "pooled_features", "fit_linear", "train_step", "train_probes", "read_dataset",
           "split", "add_commands", "OUTPUT"]

OUTPUT = "output"  # the name a probe uses for the model's own output (layer=None)
POOLINGS = ("mean",)


@dataclasses.dataclass(frozen=True)
class Probe:
    """``weight [D, C]``, ``bias [C]`` on ``layer`` (``None``: the model output), pooled
    by ``pooling`` over frames; ``classes`` names the C outputs."""

    weight: np.ndarray = dataclasses.field(repr=False)
    bias: np.ndarray = dataclasses.field(repr=False)
    layer: str | None
    classes: tuple[str, ...]
    pooling: str = "mean"

    def logits(self, hidden) -> jnp.ndarray:
        """``hidden [B, T, D]`` or ``[B, D]`` -> ``[B, C]``."""
        return _pool(jnp.asarray(hidden)) @ self.weight + self.bias[None, :]

    def target(self, index) -> Target:
        """The logit of class ``index`` (scalar or ``[B]``), as ``js.targets.linear_probe``."""
        return linear_probe(self.weight, self.bias, index, layer=self.layer)

    def predicted_target(self) -> Target:
        """Each item's highest probe logit (the probe's own decision)."""
        return Target(_probe_predicted, "linear_probe_predicted", self.layer,
                      {"weight": np.asarray(self.weight, np.float32),
                       "bias": np.asarray(self.bias, np.float32)})

    def predict(self, model, wave=None, *, features=None, batch_size: int = 32) -> np.ndarray:
        """``[B]`` predicted class indices for ``wave [B, samples]`` (or ``features``)."""
        name = OUTPUT if self.layer is None else self.layer
        x = pooled_features(model, wave, [name], features=features, batch_size=batch_size)[name]
        return np.argmax(x @ self.weight + self.bias[None, :], axis=-1)

    def save(self, path: str | os.PathLike) -> str:
        return save_probe(self, path)


def _pool(h: jnp.ndarray) -> jnp.ndarray:
    """``[B, T, D]`` -> ``[B, D]`` (mean over frames, as the linear_probe target pools)."""
    return h if h.ndim == 2 else h.mean(axis=1)


def _probe_predicted(source, args, params, rules):
    logits = _pool(source) @ args["weight"] + args["bias"][None, :]
    idx = jax.lax.stop_gradient(jnp.argmax(logits, axis=-1))
    return jnp.take_along_axis(logits, idx[:, None], axis=1)[:, 0]


def save_probe(probe: Probe, path: str | os.PathLike) -> str:
    """Write ``probe`` as npz: ``w [D, C]``, ``b [C]``, ``layer``, ``classes [C]``, ``pooling``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:  # a file object: numpy would otherwise append ".npz"
        np.savez(f, w=np.asarray(probe.weight, np.float32), b=np.asarray(probe.bias, np.float32),
                 layer=np.array(OUTPUT if probe.layer is None else probe.layer),
                 classes=np.array([str(c) for c in probe.classes]), pooling=np.array(probe.pooling))
    return str(path)


def read_probe(path: str | os.PathLike) -> Probe:
    """A :class:`Probe` from :func:`save_probe`'s npz; refuses a malformed file, naming why."""
    with np.load(path, allow_pickle=False) as z:
        missing = sorted({"w", "b", "layer", "classes", "pooling"} - set(z.files))
        if missing:
            raise ValueError(f"{path} is not a jaxspeech probe: missing {missing}")
        w, b, layer = z["w"], z["b"], str(z["layer"])
        classes, pooling = tuple(str(c) for c in z["classes"]), str(z["pooling"])
    if w.ndim != 2 or b.shape != (w.shape[1],) or len(classes) != w.shape[1]:
        raise ValueError(f"{path}: w {w.shape}, b {b.shape} and {len(classes)} classes disagree")
    if pooling not in POOLINGS:
        raise ValueError(f"{path}: pooling {pooling!r} is not one of {POOLINGS}")
    return Probe(w, b, None if layer == OUTPUT else layer, classes, pooling)


def load_probe(path: str | os.PathLike, index=None) -> Target:
    """A saved probe as an attribution target: the logit of class ``index`` (scalar or
    ``[B]``; ``js.targets.linear_probe``), or each item's top probe logit when ``None``."""
    probe = read_probe(path)
    return probe.predicted_target() if index is None else probe.target(index)


# --- features of the frozen model ------------------------------------------------------------

def probe_layers(model, layers: str | Sequence[str] = "all") -> list[str]:
    """The layer names ``layers`` stands for: ``"all"`` is every hidden state the model's
    forward exposes (``[B, T, D]`` or ``[B, D]``; attention maps excluded) plus
    ``"output"``; a comma-separated string or a list is checked against those."""
    spec, kwargs = model.family.example_features(model.config, 1)
    _, inter = jax.eval_shape(lambda x: model.forward(model.params, x, **kwargs), spec)
    available = [n for n, s in inter.items() if len(s.shape) in (2, 3)
                 and not n.endswith("attention")] + [OUTPUT]
    if layers == "all":
        return available
    names = [n.strip() for n in layers.split(",")] if isinstance(layers, str) else list(layers)
    unknown = [n for n in names if n not in available]
    if unknown:
        raise ValueError(f"unknown layer(s) {unknown}; this model has: {', '.join(available)}")
    return names


@functools.partial(jax.jit, static_argnames=("config", "names"))
def _pooled(config, params, x, kwargs, names):
    out, inter = _forward(config, params, x, kwargs)
    return {n: _pool(out if n == OUTPUT else inter[n]) for n in names}


def pooled_features(model, wave, layers: Sequence[str], *, features=None, lengths=None,
                    batch_size: int = 32) -> dict[str, np.ndarray]:
    """``{layer: [N, D]}``: each layer's hidden states mean-pooled over frames, for
    ``wave [N, samples]`` (or precomputed ``features [N, ...]``), computed in one
    frozen forward per batch of ``batch_size`` (the last batch padded, so one compile)."""
    names = tuple(layers)
    n = len(features) if features is not None else len(wave)
    chunks: dict[str, list[np.ndarray]] = {name: [] for name in names}
    for start in range(0, n, batch_size):
        idx = np.minimum(np.arange(start, start + batch_size), n - 1)  # pad with the last item
        if features is not None:
            x, kwargs = jnp.asarray(np.asarray(features)[idx]), {}
        else:
            opts = {} if lengths is None else {"lengths": np.asarray(lengths)[idx]}
            x, kwargs = model.prepare(np.asarray(wave)[idx], **opts)
        pooled = _pooled(model.config, model.params, x, kwargs, names)
        keep = min(batch_size, n - start)
        for name in names:
            chunks[name].append(np.asarray(pooled[name])[:keep])
    return {name: np.concatenate(chunks[name]) for name in names}


# --- the probe itself: a pure train step ----------------------------------------------------

def _loss(params, x, y, l2):
    logits = x @ params["w"] + params["b"][None, :]
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
    return ce + l2 * jnp.sum(params["w"] ** 2)


@functools.partial(jax.jit, static_argnames=("optimizer",))
def train_step(params, opt_state, x, y, l2, optimizer):
    """One pure optax step on ``x [N, D]``, ``y [N]``: ``(params, opt_state, loss)``."""
    loss, grads = jax.value_and_grad(_loss)(params, x, y, l2)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss


@functools.lru_cache(maxsize=8)
def _adam(learning_rate: float) -> optax.GradientTransformation:
    # one object per rate: the optimizer is a static jit argument, a new one would recompile
    return optax.adam(learning_rate)


@functools.partial(jax.jit, static_argnames=("n_classes", "steps", "optimizer"))
def _fit(x, y, l2, n_classes, steps, optimizer):
    params = {"w": jnp.zeros((x.shape[1], n_classes)), "b": jnp.zeros(n_classes)}

    def body(carry, _):
        p, s = carry
        p, s, loss = train_step(p, s, x, y, l2, optimizer)
        return (p, s), loss

    (params, _), losses = jax.lax.scan(body, (params, optimizer.init(params)), length=steps)
    return params, losses


def fit_linear(x: np.ndarray, y: np.ndarray, n_classes: int, *, steps: int = 500,
               learning_rate: float = 0.05, l2: float = 1e-3) -> tuple[np.ndarray, np.ndarray]:
    """Multinomial logistic regression on ``x [N, D]`` -> ``(weight [D, C], bias [C])``.

    Full-batch Adam for ``steps`` (one ``lax.scan`` of :func:`train_step`) on standardised
    features; the standardisation is folded back into the returned weights so they act
    on the raw pooled features, as the target needs."""
    x = np.asarray(x, np.float32)
    mu, sigma = x.mean(0), x.std(0) + 1e-6
    optimizer = _adam(learning_rate)
    params, _ = _fit(jnp.asarray((x - mu) / sigma), jnp.asarray(y, jnp.int32), jnp.float32(l2),
                     n_classes, steps, optimizer)
    w = np.asarray(params["w"]) / sigma[:, None]
    return w.astype(np.float32), (np.asarray(params["b"]) - mu @ w).astype(np.float32)


def split(labels: np.ndarray, held_out: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """``(train, test)`` indices, stratified: ``held_out`` of every class is held out."""
    rng = np.random.default_rng(seed)
    train, test = [], []
    for c in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == c))
        k = max(1, int(round(held_out * idx.size))) if idx.size > 1 else 0
        test.append(idx[:k])
        train.append(idx[k:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(test))


@dataclasses.dataclass(frozen=True)
class ProbeResult:
    probe: Probe
    train_accuracy: float
    test_accuracy: float
    dim: int


def train_probes(model, wave, labels, layers: str | Sequence[str] = "all", *,
                 classes: Sequence[str] | None = None, held_out: float = 0.25, seed: int = 0,
                 lengths=None, batch_size: int = 32, steps: int = 500, l2: float = 1e-3,
                 features: dict[str, np.ndarray] | None = None) -> list[ProbeResult]:
    """A probe per layer on ``wave [N, samples]`` with integer ``labels [N]``; accuracy on a
    stratified held-out part (``held_out``, split by ``seed``). ``features``: pooled
    features already computed (:func:`pooled_features`) to reuse."""
    labels = np.asarray(labels)
    names = probe_layers(model, layers)
    n_classes = int(labels.max()) + 1 if classes is None else len(classes)
    classes = tuple(str(c) for c in (range(n_classes) if classes is None else classes))
    if features is None:
        features = pooled_features(model, wave, names, lengths=lengths, batch_size=batch_size)
    train, test = split(labels, held_out, seed)
    results = []
    for name in names:
        x = features[name]
        w, b = fit_linear(x[train], labels[train], n_classes, steps=steps, l2=l2)
        acc = [float(np.mean(np.argmax(x[i] @ w + b, -1) == labels[i])) if i.size else float("nan")
               for i in (train, test)]
        probe = Probe(w, b, None if name == OUTPUT else name, classes)
        results.append(ProbeResult(probe, acc[0], acc[1], x.shape[1]))
    return results


# --- data ------------------------------------------------------------------------------------

AUDIO_SUFFIXES = (".wav", ".flac", ".ogg", ".mp3", ".m4a")


def read_dataset(data: str, sample_rate: int, label: str = "label", *, seconds: float = 2.0):
    """``(waves [N, samples] float32, lengths [N] relative or None, labels [N], classes)``.

    ``data``: ``planted:N[:SEED]`` (label ``label``/``class``: the planted class), a CSV
    manifest or a folder of per-class sub-folders (see the module doc). Clips of unequal
    length are zero-padded to the longest, with relative ``lengths``.
    """
    if data.startswith("planted:"):
        from jaxspeech.data import planted

        parts = data.split(":")
        n, seed = int(parts[1]), int(parts[2]) if len(parts) > 2 else 0
        if label not in ("label", "class"):
            raise ValueError(f"planted data has one label, 'class'; got --label {label!r}")
        clips = planted.generate(n, seed, seconds=seconds, sample_rate=sample_rate)
        return clips.waves, None, clips.labels, tuple(f"class{k}" for k in range(clips.n_classes))
    path = Path(data)
    if path.is_dir():
        items = [(f, d.name) for d in sorted(path.iterdir()) if d.is_dir()
                 for f in sorted(d.iterdir()) if f.suffix.lower() in AUDIO_SUFFIXES]
        if not items:
            raise ValueError(f"{data}: expected one sub-folder of audio files per class")
    elif path.is_file():
        items = _read_manifest(path, label)
    else:
        raise FileNotFoundError(f"no such dataset: {data} (a CSV, a folder or planted:N)")
    from jaxspeech import audio

    names = [lab for _, lab in items]
    classes = tuple(sorted(set(names)))
    clips = [audio.read(f, sample_rate) for f, _ in items]
    waves, lengths = audio.stack_clips(clips)
    return waves, lengths, np.array([classes.index(n) for n in names]), classes


def _read_manifest(path: Path, label: str) -> list[tuple[Path, str]]:
    with open(path, newline="") as f:
        rows = [r for r in csv.reader(f) if r and not r[0].startswith("#")]
    if not rows:
        raise ValueError(f"{path}: empty manifest")
    header = [c.strip() for c in rows[0]]
    if "path" in header:  # named columns: path plus any label columns
        if label not in header:
            raise ValueError(f"{path}: no column {label!r}; columns are {header}")
        col_path, col_label, rows = header.index("path"), header.index(label), rows[1:]
    else:
        col_path, col_label = 0, 1
    items = []
    for i, r in enumerate(rows):
        if len(r) <= max(col_path, col_label):
            raise ValueError(f"{path}: row {i + 1} has {len(r)} columns: {r}")
        items.append((path.parent / r[col_path].strip(), r[col_label].strip()))
    return items


# --- command line ----------------------------------------------------------------------------

def _cmd_probe(args) -> int:
    from jaxspeech.checkpoints import resolve

    model = resolve(args.model, dtype=args.compute_dtype).model
    seconds = getattr(model.config, "n_samples", 2 * model.sample_rate) / model.sample_rate
    waves, lengths, labels, classes = read_dataset(args.data, model.sample_rate, args.label,
                                                   seconds=min(seconds, 2.0))
    results = train_probes(model, waves, labels, args.layers, classes=classes,
                           held_out=args.held_out, seed=args.seed, lengths=lengths,
                           batch_size=args.batch_size)
    width = max(len(r.probe.layer or OUTPUT) for r in results)
    print(f"{len(labels)} clips, {len(classes)} classes, chance {1 / len(classes):.3f}")
    print(f"{'layer':<{width}}  {'dim':>5}  {'train':>6}  {'held-out':>8}")
    out = Path(args.out)
    for r in results:
        name = r.probe.layer or OUTPUT
        print(f"{name:<{width}}  {r.dim:>5}  {r.train_accuracy:>6.3f}  {r.test_accuracy:>8.3f}")
        r.probe.save(out / f"{name}.npz")
    print(f"saved {len(results)} probes to {out}/")
    return 0


def add_commands(sub) -> None:
    p = sub.add_parser("probe", help="linear probes on every layer; held-out accuracy per layer")
    p.add_argument("data", help="planted:N[:SEED], a CSV manifest (path,label) or a folder of "
                                "per-class sub-folders")
    from jaxspeech.checkpoints import add_dtype_argument
    from jaxspeech.cli import checkpoint_help

    p.add_argument("--model", default="default", help=checkpoint_help("MODEL") + " (default: default)")
    add_dtype_argument(p)
    p.add_argument("--layers", default="all", help="'all' or comma-separated layer names")
    p.add_argument("--label", default="label", help="the manifest column holding the label")
    p.add_argument("--out", default="probes", help="folder for <layer>.npz probes")
    p.add_argument("--held-out", type=float, default=0.25, help="fraction held out per class")
    p.add_argument("--seed", type=int, default=0, help="seed of the train/held-out split")
    p.add_argument("--batch-size", type=int, default=32)
    p.set_defaults(fn=_cmd_probe)
