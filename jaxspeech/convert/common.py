"""Checkpoint reading and strict PyTorch -> Flax param mapping, shared by every family.

Reading: ``safetensors`` files, PyTorch ``torch.save`` zip archives (``.bin``,
``.pt``, ``.ckpt``) through a restricted unpickler that needs no torch and runs
no code from the file, and HF sharded index files.

Mapping: the expected param tree comes from ``jax.eval_shape`` of the Linen
module, so the checkpoint is checked against the model, not against a hand list.
Each expected leaf names its source tensor (``torch_key``) and layout change
(:func:`to_flax`); missing, unexpected and mis-shaped tensors are collected and
reported in one :class:`CheckpointError`.
"""

from __future__ import annotations

import collections
import json
import os
import pickle
import re
import zipfile
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path

import numpy as np

__all__ = ["CheckpointError", "read_state_dict", "read_torch_file", "to_flax",
           "default_torch_key", "map_params", "flatten", "unflatten"]


class CheckpointError(ValueError):
    """A checkpoint does not fit the model; the message lists every offending tensor."""


# --- reading --------------------------------------------------------------------------

_STORAGE_DTYPES = {
    "FloatStorage": np.float32, "DoubleStorage": np.float64, "HalfStorage": np.float16,
    "LongStorage": np.int64, "IntStorage": np.int32, "ShortStorage": np.int16,
    "CharStorage": np.int8, "ByteStorage": np.uint8, "BoolStorage": np.bool_,
}


def _bfloat16():
    import ml_dtypes

    return ml_dtypes.bfloat16


class _StorageType:
    def __init__(self, name: str):
        self.name = name

    @property
    def dtype(self):
        return _bfloat16() if self.name == "BFloat16Storage" else _STORAGE_DTYPES[self.name]


def _rebuild_tensor(storage, offset, size, stride, *args):
    if not size:
        return storage[offset:offset + 1].reshape(()).copy()
    itemsize = storage.dtype.itemsize
    view = np.lib.stride_tricks.as_strided(
        storage[offset:], shape=tuple(size), strides=tuple(s * itemsize for s in stride))
    return np.ascontiguousarray(view)


def _rebuild_parameter(data, *args):
    return data


class _TorchUnpickler(pickle.Unpickler):
    """Rebuilds tensors as NumPy arrays; refuses any class it does not know."""

    _ALLOWED = {
        ("collections", "OrderedDict"): collections.OrderedDict,
        ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
        ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
        ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
        ("torch.nn.parameter", "Parameter"): _rebuild_parameter,
        ("builtins", "set"): set,
        ("builtins", "frozenset"): frozenset,
        ("builtins", "slice"): slice,
    }

    def __init__(self, file, archive: zipfile.ZipFile, prefix: str):
        super().__init__(file)
        self.archive, self.prefix, self.cache = archive, prefix, {}

    def find_class(self, module, name):
        module = {"__builtin__": "builtins"}.get(module, module)  # pickle protocol 2 names
        if (module, name) in self._ALLOWED:
            return self._ALLOWED[(module, name)]
        if module == "torch" and name.endswith("Storage"):
            return _StorageType(name)
        if module == "torch" and name in ("float32", "float16", "bfloat16", "int64", "float64"):
            return name
        raise pickle.UnpicklingError(
            f"checkpoint refers to {module}.{name}, which a weights file should not contain "
            "(jaxspeech reads tensors and plain containers only)")

    def persistent_load(self, pid):
        kind, storage_type, key, _location, numel = pid[:5]
        if kind != "storage":
            raise pickle.UnpicklingError(f"unknown persistent id {kind!r}")
        if key not in self.cache:
            dtype = storage_type.dtype if isinstance(storage_type, _StorageType) else np.uint8
            raw = self.archive.read(f"{self.prefix}/data/{key}")
            self.cache[key] = np.frombuffer(raw, dtype=dtype)[:numel] if numel else \
                np.frombuffer(raw, dtype=dtype)
        return self.cache[key]


def read_torch_file(path: str | os.PathLike):
    """The object a ``torch.save`` zip archive holds, tensors as NumPy arrays."""
    path = os.fspath(path)
    if not zipfile.is_zipfile(path):
        try:
            import torch
        except ImportError:
            raise CheckpointError(
                f"{path} is a legacy (pre-1.6, non-zip) torch file; install torch to read it "
                "or re-save it with torch.save") from None
        obj = torch.load(path, map_location="cpu", weights_only=True)
        return _tensors_to_numpy(obj)
    with zipfile.ZipFile(path) as archive:
        pkl = [n for n in archive.namelist() if n.endswith("data.pkl")]
        if not pkl:
            raise CheckpointError(f"{path} is a zip file but not a torch checkpoint (no data.pkl)")
        prefix = pkl[0][: -len("/data.pkl")]
        with archive.open(pkl[0]) as f:
            try:
                return _TorchUnpickler(f, archive, prefix).load()
            except pickle.UnpicklingError as e:
                raise CheckpointError(f"{path}: {e}") from None


def _tensors_to_numpy(obj):
    if hasattr(obj, "detach") and hasattr(obj, "numpy"):
        t = obj.detach().cpu()
        return t.float().numpy() if str(t.dtype) == "torch.bfloat16" else t.numpy()
    if isinstance(obj, Mapping):
        return type(obj)((k, _tensors_to_numpy(v)) for k, v in obj.items()) \
            if isinstance(obj, collections.OrderedDict) else {k: _tensors_to_numpy(v)
                                                               for k, v in obj.items()}
    return obj


def _read_safetensors(path: str) -> dict[str, np.ndarray]:
    from safetensors import safe_open

    out = {}
    try:
        with safe_open(path, framework="numpy") as f:
            for key in f.keys():
                out[key] = f.get_tensor(key)
    except (TypeError, ValueError):  # bf16 tensors: numpy framework cannot hold them
        from safetensors.flax import load_file

        out = {k: np.asarray(v) for k, v in load_file(path).items()}
    return out


def read_state_dict(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """A flat ``{name: array}`` from a weights file or a sharded index file."""
    path = os.fspath(path)
    if path.endswith(".index.json"):
        index = json.loads(Path(path).read_text())
        folder = os.path.dirname(path)
        out = {}
        for shard in sorted(set(index["weight_map"].values())):
            out.update(read_state_dict(os.path.join(folder, shard)))
        return out
    if path.endswith(".safetensors"):
        return _read_safetensors(path)
    obj = read_torch_file(path)
    if isinstance(obj, Mapping) and "state_dict" in obj and isinstance(obj["state_dict"], Mapping):
        obj = obj["state_dict"]
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"{path} does not hold a state dict (got {type(obj).__name__})")
    return dict(obj)


def find_weights(folder: str | os.PathLike) -> str | None:
    """The weights file of an HF model folder (safetensors preferred, then bin; sharded too)."""
    folder = Path(folder)
    for name in ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                 "pytorch_model.bin.index.json"):
        if (folder / name).exists():
            return str(folder / name)
    return None


# --- layout ---------------------------------------------------------------------------

def to_flax(leaf: str, array: np.ndarray) -> np.ndarray:
    """PyTorch layout -> Flax layout for a param named ``leaf`` in the Flax tree.

    ``kernel``: Linear (out, in) -> (in, out); ConvNd (out, in, *k) -> (*k, in, out).
    Everything else is copied as is.
    """
    array = np.asarray(array)
    if leaf == "kernel":
        if array.ndim == 2:
            return array.T
        return np.moveaxis(array, (0, 1), (-1, -2))
    return array


_LEAF_NAMES = {"kernel": "weight", "scale": "weight", "bias": "bias",
               "mean": "running_mean", "var": "running_var"}
_BUFFERS_NOT_PARAMS = re.compile(r"(^|\.)num_batches_tracked$")


def default_torch_key(path: tuple[str, ...]) -> str:
    """``('layers.0', 'fc1', 'kernel')`` -> ``'layers.0.fc1.weight'``."""
    *modules, leaf = path
    return ".".join([*modules, _LEAF_NAMES.get(leaf, leaf)])


def flatten(tree: Mapping, prefix: tuple = ()) -> dict[tuple[str, ...], object]:
    out = {}
    for k, v in tree.items():
        if isinstance(v, Mapping):
            out.update(flatten(v, prefix + (k,)))
        else:
            out[prefix + (k,)] = v
    return out


def unflatten(flat: Mapping[tuple[str, ...], object]) -> dict:
    tree: dict = {}
    for path, v in flat.items():
        node = tree
        for k in path[:-1]:
            node = node.setdefault(k, {})
        node[path[-1]] = v
    return tree


def map_params(
    expected: Mapping,
    state: Mapping[str, np.ndarray],
    torch_key: Callable[[tuple[str, ...]], str] = default_torch_key,
    *,
    ignore: Iterable[str] = (),
    source: str = "checkpoint",
    convert: Callable[[tuple[str, ...], np.ndarray], np.ndarray] | None = None,
) -> dict:
    """Build the params tree for ``expected`` (a tree of shapes) from a torch ``state``.

    ``torch_key(path)`` names the source tensor of each Flax leaf; ``convert`` changes
    its layout (default :func:`to_flax`). Tensors whose names match an ``ignore``
    regex (or ``num_batches_tracked``) may be left unused. Any missing, mis-shaped
    or unexpected tensor raises one :class:`CheckpointError` listing all of them.
    """
    convert = convert or (lambda path, a: to_flax(path[-1], a))
    ignore_re = [re.compile(p) for p in ignore]
    flat_expected = flatten(expected)
    missing, misshaped, used, out = [], [], set(), {}
    for path, spec in flat_expected.items():
        key = torch_key(path)
        if key not in state:
            missing.append(key)
            continue
        used.add(key)
        value = convert(path, state[key])
        if tuple(value.shape) != tuple(spec.shape):
            misshaped.append(f"{key}: checkpoint {tuple(np.shape(state[key]))} -> "
                             f"{tuple(value.shape)}, model expects {tuple(spec.shape)} "
                             f"(param {'.'.join(path)})")
            continue
        out[path] = np.asarray(value, dtype=np.float32)
    unexpected = sorted(
        k for k in state if k not in used and not _BUFFERS_NOT_PARAMS.search(k)
        and not any(r.search(k) for r in ignore_re))
    if missing or misshaped or unexpected:
        lines = [f"{source} does not match the model:"]
        for title, items in (("missing", missing), ("mis-shaped", misshaped),
                             ("unexpected", unexpected)):
            if items:
                shown = items[:20] + ([f"... and {len(items) - 20} more"] if len(items) > 20
                                      else [])
                lines.append(f"  {len(items)} {title} tensor(s):")
                lines.extend(f"    {s}" for s in shown)
        raise CheckpointError("\n".join(lines))
    return unflatten(out)
