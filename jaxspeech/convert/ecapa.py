"""SpeechBrain ECAPA-TDNN model folders -> jaxspeech params.

A folder as ``speechbrain/spkrec-ecapa-voxceleb`` ships it:
``hyperparams.yaml`` (HyperPyYAML), ``embedding_model.ckpt`` (the ``ECAPA_TDNN``
state dict), optionally ``classifier.ckpt`` (``Classifier``: ``weight``
``[out_neurons, lin_neurons]``). Other files (``mean_var_norm_emb.ckpt``,
``label_encoder.txt``) are not needed: ``verify_batch`` / ``classify_batch`` do not
use the embedding normalisation by default.

The hyper-parameters are read from the yaml with plain PyYAML, tolerant of
HyperPyYAML's tags: ``!new:`` / ``!name:`` / ``!apply:`` objects become their
arguments, ``!ref <key>`` references (with string interpolation and simple
arithmetic) are resolved. The blocks read are the ``!new:...ECAPA_TDNN``
(``embedding_model``), the ``!new:...Classifier`` (``classifier``), the
``!new:...Fbank`` (``compute_features``) and the ``!new:...InputNormalization``
(``mean_var_norm``). Settings the port does not implement (deltas, context,
non-triangular filters, non-ReLU activations, classifier ``lin_blocks``,
non-sentence normalisation) are refused, naming them.
"""

from __future__ import annotations

import ast
import operator
import os
import re
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from jaxspeech.convert import register_converter
from jaxspeech.convert.common import CheckpointError, map_params, read_state_dict
from jaxspeech.model import Model, param_shapes
from jaxspeech.models.ecapa import EcapaConfig

HYPERPARAMS = "hyperparams.yaml"
EMBEDDING_CKPT = "embedding_model.ckpt"
CLASSIFIER_CKPT = "classifier.ckpt"


# --- HyperPyYAML, read as plain data ----------------------------------------------------

class Tagged(dict):
    """A ``!new:`` / ``!name:`` / ``!apply:`` node: its arguments, and ``tag`` (the
    target, e.g. ``"new:speechbrain.lobes.features.Fbank"``)."""

    def __init__(self, tag: str, args: Mapping | None = None, positional: list | None = None):
        super().__init__(args or {})
        self.tag = tag
        self.positional = positional or []

    @property
    def target(self) -> str:
        return self.tag.split(":", 1)[1] if ":" in self.tag else self.tag


class _Ref(str):
    """An unresolved ``!ref`` expression."""


class _Loader(yaml.SafeLoader):
    pass


def _construct_tagged(loader, tag_suffix, node):
    tag = tag_suffix.lstrip("!")
    if tag == "ref":
        return _Ref(loader.construct_scalar(node))
    if tag == "copy":  # a deep copy of the referenced object: same arguments
        return _Ref(loader.construct_scalar(node))
    if tag == "tuple":  # `!tuple (1, 2)` (a scalar) or `!tuple [1, 2]`
        if isinstance(node, yaml.SequenceNode):
            return tuple(loader.construct_sequence(node, deep=True))
        return tuple(ast.literal_eval(loader.construct_scalar(node)))
    if isinstance(node, yaml.MappingNode):
        return Tagged(tag, loader.construct_mapping(node, deep=True))
    if isinstance(node, yaml.SequenceNode):
        return Tagged(tag, positional=loader.construct_sequence(node, deep=True))
    value = loader.construct_scalar(node)
    return Tagged(tag, positional=[value] if value not in ("", None) else [])


_Loader.add_multi_constructor("!", _construct_tagged)

_REF = re.compile(r"<([^<>]+)>")
_OPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul,
        ast.Div: operator.truediv, ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod,
        ast.Pow: operator.pow, ast.USub: operator.neg, ast.UAdd: operator.pos}


def _arith(expr: str):
    """Evaluate a numeric expression of literals and + - * / // % ** (no names)."""
    def ev(node):
        if isinstance(node, ast.Expression):
            return ev(node.body)
        if isinstance(node, ast.Constant) and isinstance(node.value, (int, float)):
            return node.value
        if isinstance(node, ast.BinOp) and type(node.op) in _OPS:
            return _OPS[type(node.op)](ev(node.left), ev(node.right))
        if isinstance(node, ast.UnaryOp) and type(node.op) in _OPS:
            return _OPS[type(node.op)](ev(node.operand))
        raise ValueError(expr)

    return ev(ast.parse(expr, mode="eval"))


def _lookup(root: Mapping, key: str, seen: tuple[str, ...]):
    node: Any = root
    for part in re.findall(r"[^.\[\]]+", key):
        if not isinstance(node, Mapping) or part not in node:
            raise KeyError(key)
        node = node[part]
    return _resolve(node, root, seen + (key,))


def _resolve(value, root: Mapping, seen: tuple[str, ...] = ()):
    if isinstance(value, _Ref):
        text = str(value).strip()
        keys = _REF.findall(text)
        if any(k in seen for k in keys):
            raise ValueError(f"circular !ref {text!r} in {HYPERPARAMS}")
        whole = _REF.fullmatch(text)
        if whole:
            return _lookup(root, whole.group(1), seen)
        out = _REF.sub(lambda m: str(_lookup(root, m.group(1), seen)), text)
        try:
            return _arith(out)
        except (ValueError, SyntaxError):
            return out
    if isinstance(value, Tagged):
        return Tagged(value.tag, {k: _resolve(v, root, seen) for k, v in value.items()},
                      [_resolve(v, root, seen) for v in value.positional])
    if isinstance(value, Mapping):
        return {k: _resolve(v, root, seen) for k, v in value.items()}
    if isinstance(value, list):
        return [_resolve(v, root, seen) for v in value]
    return value


def read_hyperparams(path: str | os.PathLike) -> dict:
    """A HyperPyYAML file as plain data: tagged objects as :class:`Tagged` dicts of their
    (resolved) arguments. References that cannot be resolved are left as strings."""
    text = Path(path).read_text()
    raw = yaml.load(text, Loader=_Loader) or {}
    if not isinstance(raw, Mapping):
        raise CheckpointError(f"{path} is not a HyperPyYAML mapping")
    out = {}
    for key, value in raw.items():
        try:
            out[key] = _resolve(value, raw)
        except KeyError as e:
            out[key] = value if not isinstance(value, _Ref) else str(value)
            if key in ("embedding_model", "classifier", "compute_features", "mean_var_norm"):
                raise CheckpointError(f"{path}: {key} refers to undefined key <{e.args[0]}>") from None
    return out


def _find(hparams: Mapping, key: str, target_suffix: str) -> Tagged | None:
    """The node under ``key`` if it is a ``...target_suffix`` object, else the first
    top-level object of that class."""
    node = hparams.get(key)
    if isinstance(node, Tagged) and node.target.endswith(target_suffix):
        return node
    for value in hparams.values():
        if isinstance(value, Tagged) and value.target.endswith(target_suffix):
            return value
    return None


def _check_unsupported(block: str, node: Mapping, allowed: dict[str, Any]) -> None:
    bad = [f"{k}={node[k]!r}" for k, ok in allowed.items() if k in node and not ok(node[k])]
    if bad:
        raise CheckpointError(f"{HYPERPARAMS}: {block} settings not supported by the jaxspeech "
                              f"port: {', '.join(bad)}")


def _is_relu(v) -> bool:
    target = v.target if isinstance(v, Tagged) else str(v)
    return target.split(".")[-1] == "ReLU"


def config_from_hyperparams(hparams: Mapping, *, with_classifier: bool = True) -> EcapaConfig:
    """:class:`EcapaConfig` from :func:`read_hyperparams` output."""
    emb = _find(hparams, "embedding_model", "ECAPA_TDNN")
    if emb is None:
        raise CheckpointError(f"{HYPERPARAMS} has no `!new:speechbrain.lobes.models.ECAPA_TDNN."
                              "ECAPA_TDNN` block (embedding_model)")
    _check_unsupported("ECAPA_TDNN", emb, {"activation": _is_relu})
    kw: dict[str, Any] = {}
    if "input_size" not in emb:
        raise CheckpointError(f"{HYPERPARAMS}: ECAPA_TDNN has no input_size")
    kw["n_mels"] = int(emb["input_size"])
    for name in ("channels", "kernel_sizes", "dilations", "groups"):
        if name in emb:
            kw[name] = tuple(int(v) for v in emb[name])
    for name in ("attention_channels", "res2net_scale", "se_channels", "lin_neurons"):
        if name in emb:
            kw[name] = int(emb[name])
    if "global_context" in emb:
        kw["global_context"] = bool(emb["global_context"])
    if "channels" in kw and "groups" not in kw:
        kw["groups"] = (1,) * len(kw["channels"])

    clf = _find(hparams, "classifier", "ECAPA_TDNN.Classifier")
    if with_classifier and clf is not None:
        _check_unsupported("Classifier", clf, {"lin_blocks": lambda v: int(v) == 0})
        kw["out_neurons"] = int(clf.get("out_neurons", 1211))

    feats = _find(hparams, "compute_features", "Fbank")
    if feats is not None:
        _check_unsupported("Fbank", feats, {
            "deltas": lambda v: not v, "context": lambda v: not v,
            "filter_shape": lambda v: v == "triangular"})
        if "n_mels" in feats and int(feats["n_mels"]) != kw["n_mels"]:
            raise CheckpointError(f"{HYPERPARAMS}: Fbank n_mels={feats['n_mels']} but ECAPA_TDNN "
                                  f"input_size={kw['n_mels']}")
        for src, dst, cast in (("sample_rate", "sample_rate", int), ("n_fft", "n_fft", int),
                               ("win_length", "win_length_ms", float),
                               ("hop_length", "hop_length_ms", float),
                               ("f_min", "f_min", float), ("f_max", "f_max", float)):
            if feats.get(src) is not None:
                kw[dst] = cast(feats[src])
    norm = _find(hparams, "mean_var_norm", "InputNormalization")
    if norm is not None:
        _check_unsupported("mean_var_norm (InputNormalization)", norm, {
            "norm_type": lambda v: v == "sentence", "avoid_padding_norm": lambda v: not v})
        kw["std_norm"] = bool(norm.get("std_norm", True))
    try:
        return EcapaConfig(**kw)
    except ValueError as e:
        raise CheckpointError(f"{HYPERPARAMS}: {e}") from None


# --- weights --------------------------------------------------------------------------

_NORMS = {"norm", "asp_bn"}
_LEAVES = {"kernel": "weight", "bias": "bias", "scale": "weight", "mean": "running_mean",
           "var": "running_var", "weight": "weight"}


def torch_key(path: tuple[str, ...]) -> str:
    """Flax param path -> SpeechBrain state-dict name (prefixed by its file's module).

    SpeechBrain wraps every ``nn.Conv1d`` in ``Conv1d(...).conv`` and every
    ``nn.BatchNorm1d`` in ``BatchNorm1d(...).norm``: a Flax conv ``...tdnn1.conv`` is
    ``...tdnn1.conv.conv``, ``...se_block.conv1`` is ``...se_block.conv1.conv``, a norm
    ``...norm`` / ``asp_bn`` is ``...norm.norm`` / ``asp_bn.norm``.
    ``("classifier", "weight")`` is ``classifier.weight`` (the raw ``[out, in]`` matrix).
    """
    *modules, leaf = path
    if modules[0] == "embedding_model":
        owner = modules[-1]
        modules = modules + (["norm"] if owner in _NORMS else ["conv"])
    return ".".join([*modules, _LEAVES[leaf]])


def detect(path: str) -> bool:
    p = Path(path)
    return p.is_dir() and (p / HYPERPARAMS).is_file() and (p / EMBEDDING_CKPT).is_file()


def load(path: str) -> Model:
    """A SpeechBrain ECAPA folder -> :class:`Model` (with the classifier when
    ``classifier.ckpt`` is there)."""
    folder = Path(path)
    hparams = read_hyperparams(folder / HYPERPARAMS)
    has_classifier = (folder / CLASSIFIER_CKPT).is_file()
    config = config_from_hyperparams(hparams, with_classifier=has_classifier)
    state = {f"embedding_model.{k}": v
             for k, v in read_state_dict(folder / EMBEDDING_CKPT).items()}
    sources = [str(folder / EMBEDDING_CKPT)]
    if config.out_neurons:
        state.update({f"classifier.{k}": v
                      for k, v in read_state_dict(folder / CLASSIFIER_CKPT).items()})
        sources.append(str(folder / CLASSIFIER_CKPT))
    try:
        params = map_params(param_shapes(config), state, torch_key,
                            source=" + ".join(sources))
    except CheckpointError as e:
        raise CheckpointError(
            f"{e}\n(the model was built from {folder / HYPERPARAMS}: {config}; a mis-shaped "
            "tensor means the yaml's hyper-parameters do not match the checkpoint)") from None
    return Model(config, params, source=str(folder), extras={"format": "speechbrain"})


# --- the PyTorch reference, for `jaxspeech compare` -------------------------------------

def reference(path: str, dtype: str = "float32"):
    """SpeechBrain's own modules for this folder, run in ``dtype`` ("float32" or "float64"),
    as ``(features_fn, model_fn)``.

    ``features_fn(wave [B, samples] np, lengths [B] relative samples or None) ->
    (features np [B, T, n_mels], {"lengths": relative frame lengths})``: ``Fbank`` then
    ``InputNormalization`` as instantiated by HyperPyYAML from ``hyperparams.yaml``, on
    the padded batch, with the lengths converted to frames as ``prepare`` does.
    ``model_fn(features, lengths=None) -> np [B, lin_neurons]``: ``ECAPA_TDNN`` with
    ``embedding_model.ckpt`` loaded, run on each item's valid frames alone (what
    jaxspeech's masked forward equals; SpeechBrain's batched forward lets the padding
    leak into short items through reflect padding, see :mod:`jaxspeech.models.ecapa`).
    In float64 every module's parameters and buffers are promoted (``.double()``), and so
    are the plain tensor attributes ``Fbank`` keeps outside them (the STFT window, the
    filter bank's centres and bands), computed in float32 and promoted as the weights are.
    """
    import torch
    from hyperpyyaml import load_hyperpyyaml

    from jaxspeech.frontends import fbank as fb

    if dtype not in ("float32", "float64"):
        raise ValueError(f"reference dtype {dtype!r}: 'float32' or 'float64'")
    np_dtype = np.dtype(dtype)
    folder = Path(path)
    # the folder stands in for a hub id in pretrained_path, so nothing is ever fetched
    overrides = {"pretrained_path": str(folder)} \
        if "pretrained_path" in read_hyperparams(folder / HYPERPARAMS) else None
    with open(folder / HYPERPARAMS) as f:
        hp = load_hyperpyyaml(f, overrides=overrides)
    compute_features, mean_var_norm, model = hp["compute_features"], hp["mean_var_norm"], \
        hp["embedding_model"]
    state = torch.load(folder / EMBEDDING_CKPT, map_location="cpu", weights_only=True)
    model.load_state_dict(state, strict=True)
    for module in (compute_features, mean_var_norm, model):
        module.eval()
        if dtype == "float64":
            module.double()
            for sub in module.modules():
                for name, value in list(vars(sub).items()):
                    if torch.is_tensor(value) and value.is_floating_point():
                        setattr(sub, name, value.double())
    hop = compute_features.compute_STFT.hop_length

    def features_fn(wave, lengths=None):
        wave = np.array(wave, np_dtype)  # a writable copy for torch
        rel = np.array(fb.frame_lengths(lengths, wave.shape[-1], wave.shape[0], hop))
        with torch.no_grad():
            feats = compute_features(torch.from_numpy(wave))
            feats = mean_var_norm(feats, torch.from_numpy(rel.astype(np_dtype)))
        return feats.numpy(), {"lengths": rel}

    def model_fn(features, lengths=None):
        features = torch.from_numpy(np.array(features, np_dtype))
        b, t = features.shape[:2]
        rel = np.ones(b, np.float32) if lengths is None else np.asarray(lengths, np.float32)
        n_valid = (np.arange(t, dtype=np.float32)[None] < (rel * np.float32(t))[:, None]).sum(1)
        out = []
        with torch.no_grad():
            for i in range(b):
                out.append(model(features[i:i + 1, : n_valid[i]])[:, 0].numpy())
        return np.concatenate(out)

    return features_fn, model_fn


register_converter("ecapa", sys.modules[__name__])
