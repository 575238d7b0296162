"""CTranslate2 (faster-whisper) Whisper folders -> jaxspeech params.

A CTranslate2 model folder holds ``model.bin`` (every weight, in CTranslate2's own
binary format), ``config.json`` (generation metadata: ``alignment_heads``,
``lang_ids``, ``suppress_ids``, ``suppress_ids_begin``), ``vocabulary.txt`` or
``vocabulary.json`` and, in faster-whisper's folders, the ``tokenizer.json``. A large
``model.bin`` may be shipped in consecutive parts ``model.bin.part1``,
``model.bin.part2``, ... in the folder; they are read as one stream, in order.

``model.bin``, binary version 6 (little-endian, packed; written by
``ctranslate2/specs/model_spec.py``)::

    uint32 version | str spec name | uint32 spec revision | uint32 n
    n x (str name | uint8 rank | rank x uint32 dim | uint8 dtype | uint32 nbytes | data)
    uint32 m | m x (str alias | str target)

with ``str`` = uint16 length (counting a final NUL) | utf-8 bytes | NUL and ``dtype`` an
index into (float32, int8, int16, int32, float16, bfloat16). Rank-0 variables are
flags and hyper-parameters (``num_heads``, ``activation``, ...). A quantised weight
(int8 / int16) comes with ``<name>_scale``, the factor the float weight was multiplied
by before rounding: one per output row for int8, one per tensor for int16. An alias
(``decoder/projection/weight`` -> ``decoder/embeddings/weight``) names a variable
stored once; its ``_scale`` is aliased with it, as CTranslate2's loader does.

``WhisperSpec`` (revision 3) -> jaxspeech's Whisper params (PyTorch layouts, so the
mapping is renames and splits, then :func:`~jaxspeech.convert.common.to_flax`):

    encoder/conv{1,2}/{weight,bias}                  conv{1,2}  ([d, n_mels | d, 3])
    encoder/position_encodings/encodings             embed_positions (sinusoids, as stored)
    {encoder,decoder}/layer_i/self_attention/linear_0   [q; k; v] ([3d, d]) -> q/k/v_proj
                                  .../linear_1        self_attn.out_proj
    decoder/layer_i/attention/linear_0               encoder_attn.q_proj
                           .../linear_1              [k; v] ([2d, d]) -> encoder_attn.k/v_proj
                           .../linear_2              encoder_attn.out_proj
    .../ffn/linear_{0,1}                             fc1, fc2
    .../{self_attention,attention,ffn}/layer_norm    self_attn_ / encoder_attn_ / final_layer_norm
    {encoder,decoder}/layer_norm                     layer_norm
    decoder/embeddings/weight                        decoder.embed_tokens (also the output projection)
    decoder/position_encodings/encodings             decoder.embed_positions (learned)

k has no bias in Whisper; CTranslate2 fuses a zero one, which is checked to be zero.
Every variable is mapped or known; anything else is refused by name.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import json
import os
import re
import shutil
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from jaxspeech.convert import register_converter
from jaxspeech.convert.common import CheckpointError, map_params
from jaxspeech.model import Model, param_shapes
from jaxspeech.models.whisper import WhisperConfig

__all__ = ["ModelBin", "read_model_bin", "model_bin_parts", "dequantize", "whisper_config",
           "whisper_state", "generation_config", "detect", "load", "engine", "reference"]

BINARY_VERSION = 6  # every CTranslate2 Whisper model: Whisper support came after version 6
SPEC, SPEC_REVISION = "WhisperSpec", 3  # revision 3 (CTranslate2 >= 3.5): activation 3 = GELU
# CTranslate2's DataType enum (include/ctranslate2/types.h), in order.
_DTYPE_NAMES = ("float32", "int8", "int16", "int32", "float16", "bfloat16")
GELU = 3  # common_spec.Activation.GELU (exact, erf)


# --- model.bin ---------------------------------------------------------------------------

@dataclasses.dataclass
class ModelBin:
    """What a ``model.bin`` holds: ``variables`` as stored (NumPy arrays in their stored
    dtype, rank-0 arrays for scalars), ``aliases`` (alias -> stored name) and ``offsets``
    (name -> byte offset of its data in the stream, for error messages and tests)."""

    source: str
    version: int
    spec: str
    revision: int
    variables: dict[str, np.ndarray]
    aliases: dict[str, str]
    offsets: dict[str, int]


class _Stream:
    """Consecutive files read as one byte stream; every read says what it was for, so a
    short file fails with the byte offset and the field it ends in."""

    def __init__(self, paths: Sequence[str], stack: contextlib.ExitStack):
        self.name = paths[0] if len(paths) == 1 else f"{paths[0]} (+{len(paths) - 1} parts)"
        self.size = sum(os.path.getsize(p) for p in paths)
        self.offset = 0
        self._files = [stack.enter_context(open(p, "rb")) for p in paths]

    def read(self, n: int, what: str) -> bytes:
        if n > self.size - self.offset:
            raise CheckpointError(
                f"{self.name}: truncated: {what} needs {n} bytes at byte {self.offset}, only "
                f"{self.size - self.offset} left (file size {self.size})")
        chunks, need = [], n
        while need:
            chunk = self._files[0].read(need)
            if not chunk:  # this part is done; the size check above guarantees a next one
                self._files.pop(0)
                continue
            chunks.append(chunk)
            need -= len(chunk)
        self.offset += n
        return chunks[0] if len(chunks) == 1 else b"".join(chunks)

    def uint(self, width: int, what: str) -> int:
        return int.from_bytes(self.read(width, what), "little")

    def string(self, what: str) -> str:
        start = self.offset
        length = self.uint(2, f"the length of {what}")
        raw = self.read(length, what)
        if length == 0 or raw[-1] != 0:
            raise CheckpointError(f"{self.name}: corrupt {what} at byte {start}: not a "
                                  "NUL-terminated string")
        try:
            return raw[:-1].decode("utf-8")
        except UnicodeDecodeError:
            raise CheckpointError(f"{self.name}: corrupt {what} at byte {start}: not utf-8") \
                from None


def _dtype(type_id: int) -> np.dtype:
    name = _DTYPE_NAMES[type_id]
    if name == "bfloat16":
        import ml_dtypes

        return np.dtype(ml_dtypes.bfloat16)
    return np.dtype(name)


def read_model_bin(paths: str | os.PathLike | Sequence[str | os.PathLike], *,
                   spec: str | None = SPEC, revision: int | None = SPEC_REVISION) -> ModelBin:
    """Read a CTranslate2 ``model.bin`` (or its parts, in order, as one stream).

    ``spec`` / ``revision``: the model specification expected (``None``: any); another
    is refused right after the header, before any weight is read.
    """
    paths = [os.fspath(paths)] if isinstance(paths, (str, os.PathLike)) else \
        [os.fspath(p) for p in paths]
    with contextlib.ExitStack() as stack:
        s = _Stream(paths, stack)
        version = s.uint(4, "the binary version")
        if version != BINARY_VERSION:
            raise CheckpointError(
                f"{s.name}: not a CTranslate2 model.bin of binary version {BINARY_VERSION} (read "
                f"{version} at byte 0); jaxspeech reads version {BINARY_VERSION}, which every "
                "CTranslate2 release since 2.x writes")
        name = s.string("the spec name")
        rev = s.uint(4, "the spec revision")
        if spec is not None and name != spec:
            raise CheckpointError(
                f"{s.name}: a CTranslate2 {name!r} model; jaxspeech reads {spec} models only "
                "(faster-whisper / ctranslate2 Whisper conversions)")
        if revision is not None and rev != revision:
            raise CheckpointError(
                f"{s.name}: {name} revision {rev}; jaxspeech reads revision {revision} (written "
                "by CTranslate2 >= 3.5; re-convert the model with a current ctranslate2)")
        variables, offsets = {}, {}
        for i in range(s.uint(4, "the number of variables")):
            var = s.string(f"the name of variable {i}")
            rank = s.uint(1, f"the rank of {var!r}")
            shape = tuple(s.uint(4, f"dimension {j} of {var!r}") for j in range(rank))
            type_id = s.uint(1, f"the dtype of {var!r}")
            if type_id >= len(_DTYPE_NAMES):
                raise CheckpointError(f"{s.name}: variable {var!r} at byte {s.offset - 1} has "
                                      f"dtype id {type_id}, not one of CTranslate2's "
                                      f"{len(_DTYPE_NAMES)} ({', '.join(_DTYPE_NAMES)})")
            dtype = _dtype(type_id)
            nbytes = s.uint(4, f"the size of {var!r}")
            expected = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
            if nbytes != expected:
                raise CheckpointError(
                    f"{s.name}: variable {var!r} at byte {s.offset - 4} says {nbytes} bytes, but "
                    f"its shape {list(shape)} of {dtype.name} needs {expected}")
            if var in variables:
                raise CheckpointError(f"{s.name}: variable {var!r} is stored twice")
            offsets[var] = s.offset
            variables[var] = np.frombuffer(s.read(nbytes, f"the data of {var!r}"),
                                           dtype=dtype).reshape(shape)
        aliases = {}
        for i in range(s.uint(4, "the number of aliases")):
            alias = s.string(f"alias {i}")
            aliases[alias] = s.string(f"the target of alias {alias!r}")
        if s.offset != s.size:
            raise CheckpointError(f"{s.name}: {s.size - s.offset} unexpected bytes after the "
                                  f"aliases, at byte {s.offset} (a corrupt or concatenated file?)")
    return ModelBin(s.name, version, name, rev, variables, aliases, offsets)


def dequantize(mb: ModelBin) -> tuple[dict[str, np.ndarray], dict[str, float | int]]:
    """``(tensors, scalars)``: every tensor in float32 with aliases resolved (an alias gets its
    target's value), int8 / int16 weights divided by their ``<name>_scale`` (which are
    consumed); rank-0 variables as Python numbers."""
    stored = dict(mb.variables)
    for alias, target in mb.aliases.items():
        if target not in mb.variables:
            raise CheckpointError(f"{mb.source}: alias {alias!r} -> {target!r}: no such variable")
        if alias in stored:
            raise CheckpointError(f"{mb.source}: {alias!r} is both a variable and an alias")
        stored[alias] = mb.variables[target]
        if target + "_scale" in mb.variables:
            stored[alias + "_scale"] = mb.variables[target + "_scale"]
    tensors, scalars = {}, {}
    for name, value in stored.items():
        if name.endswith("_scale") and name[:-len("_scale")] in stored:
            continue  # consumed with its weight below
        scale = stored.get(name + "_scale")
        if value.ndim == 0:
            if scale is not None:
                raise CheckpointError(f"{mb.source}: scalar {name!r} has a {name}_scale")
            scalars[name] = value.item() if value.dtype.kind in "iu" else float(value)
        elif value.dtype in (np.int8, np.int16):
            tensors[name] = _dequantize(mb.source, name, value, scale)
        elif scale is not None:
            raise CheckpointError(f"{mb.source}: {name!r} is {value.dtype.name} but has a "
                                  f"{name}_scale (only int8 / int16 weights are scaled)")
        elif value.dtype.kind == "f" or value.dtype.name == "bfloat16":
            tensors[name] = value.astype(np.float32)
        else:
            raise CheckpointError(f"{mb.source}: {name!r} is a {value.dtype.name} tensor; "
                                  "Whisper weights are float or int8 / int16 with a scale")
    return tensors, scalars


def _dequantize(source: str, name: str, value: np.ndarray, scale: np.ndarray | None) -> np.ndarray:
    """``value / scale``: int8 has one scale per output row (a conv weight's rows are its
    output channels), int16 one for the tensor (``specs/model_spec.py::_quantize``)."""
    if scale is None:
        raise CheckpointError(f"{source}: {name!r} is {value.dtype.name} without {name}_scale")
    scale = np.asarray(scale, np.float32)
    if scale.ndim == 0:
        return value.astype(np.float32) / scale
    if scale.shape != value.shape[:1]:
        raise CheckpointError(f"{source}: {name}_scale has shape {list(scale.shape)}; "
                              f"{name} {list(value.shape)} needs one per row ({value.shape[0]})")
    rows = value.reshape(value.shape[0], -1).astype(np.float32) / scale[:, None]
    return rows.reshape(value.shape)


# --- WhisperSpec -> jaxspeech names ------------------------------------------------------

_LEAVES = {"weight": "weight", "bias": "bias"}
_NORM_LEAVES = {"gamma": "weight", "beta": "bias"}

# CT2 module inside one layer -> the jaxspeech (PyTorch-named) module(s) its rows hold, in
# order; a tuple is a fused weight split in equal parts along its rows.
_ENCODER_LAYER = {
    "self_attention/layer_norm": "self_attn_layer_norm",
    "self_attention/linear_0": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    "self_attention/linear_1": "self_attn.out_proj",
    "ffn/layer_norm": "final_layer_norm",
    "ffn/linear_0": "fc1",
    "ffn/linear_1": "fc2",
}
_DECODER_LAYER = {
    **_ENCODER_LAYER,
    "attention/layer_norm": "encoder_attn_layer_norm",
    "attention/linear_0": "encoder_attn.q_proj",
    "attention/linear_1": ("encoder_attn.k_proj", "encoder_attn.v_proj"),
    "attention/linear_2": "encoder_attn.out_proj",
}
_TOP = {"encoder/conv1": "conv1", "encoder/conv2": "conv2", "encoder/layer_norm": "layer_norm",
        "decoder/layer_norm": "decoder.layer_norm"}
_TABLES = {"encoder/position_encodings/encodings": "embed_positions",
           "decoder/position_encodings/encodings": "decoder.embed_positions",
           "decoder/embeddings/weight": "decoder.embed_tokens.embedding"}
_PROJECTION = "decoder/projection/weight"  # tied to decoder/embeddings/weight

# Scalars: name -> (value when absent as CTranslate2's loader defaults it, the values the
# port runs, what it means). ``None`` as accepted: any value (it does not change the forward).
_SCALARS = {
    "encoder/num_heads": (None, None, "encoder attention heads"),
    "decoder/num_heads": (None, None, "decoder attention heads"),
    "decoder/activation": (None, {GELU}, "the feed-forward activation (3 = exact GELU)"),
    "decoder/pre_norm": (1, {1}, "pre-LayerNorm blocks"),
    "decoder/scale_embeddings": (1, {0}, "token embeddings multiplied by sqrt(d_model)"),
    "decoder/alibi": (0, {0}, "ALiBi attention biases"),
    "decoder/alibi_use_positive_positions": (1, None, "an ALiBi option"),
    "decoder/scale_alibi": (0, None, "an ALiBi option"),
    "decoder/start_from_zero_embedding": (0, {0}, "a zero embedding for the first step"),
    "decoder/sliding_window": (0, {0}, "sliding-window attention"),
    "decoder/alignment_layer": (-1, None, "the layer CTranslate2 returns attention from"),
    "decoder/alignment_heads": (1, None, "how many heads CTranslate2 returns"),
}


def _check_scalars(source: str, scalars: dict[str, float | int]) -> tuple[int, int]:
    """``(encoder heads, decoder heads)``; refuses a scalar the port cannot honour, naming it."""
    unknown = sorted(set(scalars) - set(_SCALARS))
    if unknown:
        raise CheckpointError(f"{source}: unknown WhisperSpec scalar(s) {unknown}; jaxspeech "
                              "does not know what they change, so it will not guess")
    for name, (default, accepted, meaning) in _SCALARS.items():
        value = scalars.get(name, default)
        if value is None:
            raise CheckpointError(f"{source}: WhisperSpec scalar {name!r} ({meaning}) is missing")
        if accepted is not None and value not in accepted:
            raise CheckpointError(
                f"{source}: {name} = {value} ({meaning}); the Whisper port runs only "
                f"{sorted(accepted)}")
    heads = int(scalars["encoder/num_heads"]), int(scalars["decoder/num_heads"])
    if min(heads) < 1:
        raise CheckpointError(f"{source}: num_heads {heads} (encoder, decoder) must be positive")
    return heads


def _layer_count(tensors: dict[str, np.ndarray], side: str) -> int:
    found = {int(m.group(1)) for n in tensors if (m := re.match(rf"{side}/layer_(\d+)/", n))}
    return max(found) + 1 if found else 0


def _shape(source: str, tensors: dict[str, np.ndarray], name: str, rank: int) -> tuple[int, ...]:
    if name not in tensors:
        raise CheckpointError(f"{source}: no {name!r}; not a complete Whisper model")
    shape = tensors[name].shape
    if len(shape) != rank:
        raise CheckpointError(f"{source}: {name} has shape {list(shape)}, expected rank {rank}")
    return shape


def whisper_config(source: str, tensors: dict[str, np.ndarray],
                   scalars: dict[str, float | int]) -> WhisperConfig:
    """The :class:`WhisperConfig` a WhisperSpec's shapes and ``num_heads`` describe."""
    enc_heads, dec_heads = _check_scalars(source, scalars)
    d, n_mels, _ = _shape(source, tensors, "encoder/conv1/weight", 3)
    for side, heads in (("encoder", enc_heads), ("decoder", dec_heads)):
        if d % heads:
            raise CheckpointError(f"{source}: d_model {d} is not divisible by {side}/num_heads "
                                  f"{heads}")
    return WhisperConfig(
        n_mels=n_mels, d_model=d, encoder_layers=_layer_count(tensors, "encoder"),
        encoder_attention_heads=enc_heads,
        encoder_ffn_dim=_shape(source, tensors, "encoder/layer_0/ffn/linear_0/weight", 2)[0],
        max_source_positions=_shape(source, tensors, "encoder/position_encodings/encodings", 2)[0],
        vocab_size=_shape(source, tensors, "decoder/embeddings/weight", 2)[0],
        decoder_layers=_layer_count(tensors, "decoder"), decoder_attention_heads=dec_heads,
        decoder_ffn_dim=_shape(source, tensors, "decoder/layer_0/ffn/linear_0/weight", 2)[0],
        max_target_positions=_shape(source, tensors, "decoder/position_encodings/encodings", 2)[0])


def _expected(config: WhisperConfig) -> dict[str, tuple[str, ...] | str]:
    """Every tensor a WhisperSpec of ``config`` holds -> the jaxspeech name(s) it feeds."""
    names: dict[str, tuple[str, ...] | str] = dict(_TABLES)
    layers = [("encoder", config.encoder_layers, "", _ENCODER_LAYER),
              ("decoder", config.decoder_layers, "decoder.", _DECODER_LAYER)]
    modules = list(_TOP.items())
    for side, count, prefix, table in layers:
        for i in range(count):
            modules += [(f"{side}/layer_{i}/{ct2}",
                         tuple(f"{prefix}layers.{i}.{m}" for m in ours) if isinstance(ours, tuple)
                         else f"{prefix}layers.{i}.{ours}") for ct2, ours in table.items()]
    for ct2, ours in modules:
        leaves = _NORM_LEAVES if ct2.endswith("layer_norm") else _LEAVES
        for ct2_leaf, leaf in leaves.items():
            names[f"{ct2}/{ct2_leaf}"] = tuple(f"{m}.{leaf}" for m in ours) \
                if isinstance(ours, tuple) else f"{ours}.{leaf}"
    return names


def whisper_state(source: str, tensors: dict[str, np.ndarray],
                  config: WhisperConfig) -> dict[str, np.ndarray]:
    """A flat ``{jaxspeech name: float32 array}`` in PyTorch layouts (the names
    :func:`~jaxspeech.convert.common.default_torch_key` gives the Flax paths), fused
    weights split, the zero k biases checked and dropped, the tied projection checked."""
    expected = _expected(config)
    missing = sorted(set(expected) - set(tensors))
    unknown = sorted(set(tensors) - set(expected) - {_PROJECTION})
    if missing or unknown:
        lines = [f"{source} is not a Whisper model jaxspeech can run:"]
        for title, items in (("missing", missing), ("unknown", unknown)):
            if items:
                lines.append(f"  {len(items)} {title} variable(s):")
                lines.extend(f"    {n}" for n in items[:20])
                if len(items) > 20:
                    lines.append(f"    ... and {len(items) - 20} more")
        raise CheckpointError("\n".join(lines))
    embeddings = tensors["decoder/embeddings/weight"]
    if _PROJECTION in tensors and not np.array_equal(tensors[_PROJECTION], embeddings):
        raise CheckpointError(f"{source}: {_PROJECTION} differs from decoder/embeddings/weight; "
                              "Whisper ties its output projection to the token embedding")
    state = {}
    for ct2, ours in expected.items():
        value = tensors[ct2]
        if isinstance(ours, str):
            state[ours] = value
            continue
        if value.shape[0] % len(ours):
            raise CheckpointError(f"{source}: {ct2} has {value.shape[0]} rows, not {len(ours)} "
                                  f"equal parts ({', '.join(ours)})")
        for name, part in zip(ours, np.split(value, len(ours)), strict=True):
            if name.endswith("k_proj.bias"):  # Whisper's k has no bias; CT2 fuses zeros
                if np.any(part != 0):
                    raise CheckpointError(
                        f"{source}: {ct2} holds a non-zero k bias (max |b| "
                        f"{np.abs(part).max():.3g}); Whisper's k projection has no bias")
                continue
            state[name] = part
    return state


# --- folders -----------------------------------------------------------------------------

def model_bin_parts(folder: str | os.PathLike) -> list[str]:
    """``[folder/model.bin]``, or the consecutive ``model.bin.part1, part2, ...`` of a split
    one; ``[]`` when there is neither."""
    folder = Path(folder)
    if (folder / "model.bin").is_file():
        return [str(folder / "model.bin")]
    parts = sorted((p for p in folder.glob("model.bin.part*") if p.suffix[5:].isdigit()),
                   key=lambda p: int(p.suffix[5:]))
    numbers = [int(p.suffix[5:]) for p in parts]
    if parts and numbers != list(range(1, len(parts) + 1)):
        raise CheckpointError(f"{folder}: model.bin parts {numbers}; expected part1 .. "
                              f"part{len(parts)} with none missing")
    return [str(p) for p in parts]


def detect(path: str) -> bool:
    return os.path.isdir(path) and bool(model_bin_parts(path))


def _read_json(path: Path) -> dict | list | None:
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None


def _token_ids(folder: Path) -> dict[str, int]:
    """Token name -> id from ``tokenizer.json`` (BPE vocab + added tokens), or else from
    CTranslate2's own ``vocabulary.json`` / ``vocabulary.txt`` (one token per id)."""
    tok = _read_json(folder / "tokenizer.json")
    if tok is not None:
        ids = dict(tok["model"]["vocab"])
        ids.update({t["content"]: t["id"] for t in tok.get("added_tokens", [])})
        return ids
    tokens = _read_json(folder / "vocabulary.json")
    if tokens is None and (folder / "vocabulary.txt").is_file():
        tokens = (folder / "vocabulary.txt").read_text(encoding="utf-8").split("\n")
    return {t: i for i, t in enumerate(tokens or [])}


_LANGUAGE_TOKEN = re.compile(r"^<\|[a-z]{2,3}\|>$")


def generation_config(folder: str | os.PathLike, config: WhisperConfig) -> dict:
    """``Model.extras["generation"]`` from the folder's ``config.json`` and token names."""
    folder = Path(folder)
    ct2 = _read_json(folder / "config.json") or {}
    ids = _token_ids(folder)
    names = {i: t for t, i in ids.items()}
    special = {"decoder_start_token_id": "<|startoftranscript|>", "eos_token_id": "<|endoftext|>",
               "no_timestamps_token_id": "<|notimestamps|>"}
    absent = [t for t in special.values() if t not in ids]
    if absent:
        raise CheckpointError(f"{folder}: the tokenizer / vocabulary has no {absent}; not a "
                              "Whisper vocabulary")
    # openai-whisper's rule; CT2's config.json of tiny.en lists the multilingual models'
    # language ids (which name other tokens in the .en vocabulary), so only a multilingual
    # model takes them.
    multilingual = config.vocab_size >= 51865
    lang_to_id = {}
    if multilingual:
        for i in ct2.get("lang_ids") or []:
            if not _LANGUAGE_TOKEN.match(names.get(i, "")):
                raise CheckpointError(f"{folder}/config.json: lang_ids has {i}, which is "
                                      f"{names.get(i)!r}, not a language token")
            lang_to_id[names[i]] = i
    heads = ct2.get("alignment_heads")
    layers, n_heads = config.decoder_layers, config.decoder_attention_heads
    if heads is None:  # what CTranslate2's converter defaults to: the last half of the layers
        heads = list(itertools.product(range(layers // 2, layers), range(n_heads)))
    bad = [h for h in heads if not (0 <= h[0] < layers and 0 <= h[1] < n_heads)]
    if bad:
        raise CheckpointError(f"{folder}/config.json: alignment_heads {bad} outside the decoder "
                              f"({layers} layers x {n_heads} heads)")
    return {
        **{key: ids[token] for key, token in special.items()},
        "is_multilingual": multilingual,
        "lang_to_id": lang_to_id,
        "task_to_id": {task: ids[f"<|{task}|>"] for task in ("transcribe", "translate")
                       if f"<|{task}|>" in ids},
        "suppress_tokens": [int(i) for i in ct2.get("suppress_ids") or []],
        "begin_suppress_tokens": [int(i) for i in ct2.get("suppress_ids_begin") or []],
        "alignment_heads": [[int(a), int(b)] for a, b in heads],
    }


def load(path: str) -> Model:
    """A CTranslate2 Whisper folder -> :class:`Model` (encoder and decoder)."""
    parts = model_bin_parts(path)
    if not parts:
        raise CheckpointError(f"{path}: no model.bin (or model.bin.part1, ...) in the folder")
    mb = read_model_bin(parts)
    tensors, scalars = dequantize(mb)
    config = whisper_config(mb.source, tensors, scalars)
    state = whisper_state(mb.source, tensors, config)
    params = map_params(param_shapes(config), state, source=mb.source)
    extras = {"format": "ctranslate2", "generation": generation_config(path, config)}
    tokenizer = Path(path) / "tokenizer.json"
    if tokenizer.is_file():
        extras["tokenizer_json"] = tokenizer.read_text(encoding="utf-8")
    return Model(config, params, source=path, extras=extras)


# --- the CTranslate2 engine as reference, for `jaxspeech compare` -------------------------

def engine(path: str, compute_type: str = "float32"):
    """CTranslate2's own ``ctranslate2.models.Whisper`` on this folder, on the CPU. It reads
    only a whole ``model.bin``: a split one is joined in a temporary folder, removed once
    the engine has loaded it. ``float32`` (the default) dequantises an int8 / int16 model
    as jaxspeech does; the engine's int8 arithmetic would also quantise the activations."""
    import ctranslate2

    with _engine_folder(path) as folder:
        return ctranslate2.models.Whisper(folder, device="cpu", compute_type=compute_type)


@contextlib.contextmanager
def _engine_folder(path: str):
    parts = model_bin_parts(path)
    if parts == [str(Path(path) / "model.bin")]:
        yield path
        return
    tmp = tempfile.mkdtemp(prefix="jaxspeech-ct2-")
    try:
        with open(os.path.join(tmp, "model.bin"), "wb") as out:
            for part in parts:
                with open(part, "rb") as f:
                    shutil.copyfileobj(f, out)
        for name in os.listdir(path):
            if not name.startswith("model.bin"):
                os.symlink(os.path.abspath(os.path.join(path, name)), os.path.join(tmp, name))
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def reference(path: str, dtype: str = "float32"):
    """The reference for this folder in ``dtype``, as ``(features_fn, model_fn, generate_fn)``
    (the protocol of :func:`jaxspeech.convert.register_converter`).

    ``"float32"``: CTranslate2's own engine (:func:`engine`, float32):

    - ``features_fn(wave [B, samples], lengths [B] or None) -> (features [B, n_mels, frames],
      {})``: transformers' ``WhisperFeatureExtractor`` over the model's window (OpenAI's
      front end; faster-whisper's own pads differently, see PORTING_NOTES.md);
    - ``model_fn(features, tokens=None)``: the encoder output ``[B, frames / 2, d_model]``;
      with ``tokens [B, L]`` the teacher-forced logits ``[B, L, vocab]``. The engine scores a
      sequence only from the end of its task prompt (``<|startoftranscript|>`` ...
      ``<|notimestamps|>``, which each row must hold): it runs the prompt without logits, and
      without ``<|notimestamps|>`` it masks them with its timestamp rules. The rows before
      ``<|notimestamps|>`` are NaN;
    - ``generate_fn(features, max_new_tokens, suppress_tokens=None) -> [B] lists of token
      ids``: greedy decoding
      with the folder's suppress / begin-suppress tokens and no timestamps, the language
      detected by the engine on a multilingual model; each sequence from its start token
      through ``<|endoftext|>`` when reached.

    ``"float64"``: CTranslate2 has no float64, so transformers' Whisper in float64 holding
    the folder's weights (:func:`jaxspeech.convert.whisper.hf_torch_model`), as
    :func:`jaxspeech.convert.whisper.hf_reference` runs it.
    """
    model = load(path)
    config, gen = model.config, model.extras["generation"]
    if dtype == "float64":
        from jaxspeech.convert.whisper import hf_reference, hf_torch_model

        return hf_reference(hf_torch_model(model.params, config, gen), config.n_mels,
                            config.n_samples, "float64")
    if dtype != "float32":
        raise ValueError(f"reference dtype {dtype!r}: 'float32' or 'float64'")
    import ctranslate2
    from transformers import WhisperFeatureExtractor

    whisper = engine(path)
    extractor = WhisperFeatureExtractor(feature_size=config.n_mels,
                                        chunk_length=config.n_samples // 16000)

    def encode(features) -> np.ndarray:
        features = ctranslate2.StorageView.from_array(np.ascontiguousarray(features, np.float32))
        return np.array(whisper.encode(features, to_cpu=True), dtype=np.float32)

    def features_fn(wave, lengths=None):  # zero padding is what Whisper does anyway
        out = extractor(list(np.asarray(wave)), sampling_rate=16000, return_tensors="np")
        return out["input_features"], {}

    def model_fn(features, tokens=None):
        encoded = encode(features)
        if tokens is None:
            return encoded
        return np.stack([_scores(whisper, enc, row, gen, config.vocab_size)
                         for enc, row in zip(encoded, np.asarray(tokens), strict=True)])

    def generate_fn(features, max_new_tokens: int, suppress_tokens=None) -> list[list[int]]:
        return [_greedy(whisper, enc, gen, max_new_tokens, suppress_tokens)
                for enc in encode(features)]

    return features_fn, model_fn, generate_fn


def _ct2_generate(whisper, encoded: np.ndarray, prompt: list[int], start: int, steps: int,
                  **options):
    """One greedy ``Whisper.generate`` call on one item's encoder output ``[frames, d]``,
    ``steps`` decoding steps from ``start`` (the index of the last token of the engine's task
    prompt; it decodes ``min(max_length / 2, max_length - start)`` steps)."""
    import ctranslate2

    features = ctranslate2.StorageView.from_array(np.ascontiguousarray(encoded[None]))
    return whisper.generate(features, [prompt], beam_size=1,
                            max_length=max(2 * steps, steps + start), **options)[0]


def _scores(whisper, encoded: np.ndarray, row: np.ndarray, gen: dict, vocab: int) -> np.ndarray:
    """Teacher-forced logits ``[L, vocab]`` of one token row: CTranslate2 forces the tokens
    after the task prompt as a prefix and returns the raw logits of every step (no token
    suppressed); the prompt's own positions but the last stay NaN."""
    row = [int(t) for t in row]
    sot, no_ts = gen["decoder_start_token_id"], gen["no_timestamps_token_id"]
    if sot not in row:
        raise ValueError("CTranslate2 scores only sequences that hold <|startoftranscript|>")
    last = row.index(sot)  # the engine's prompt: sot and the special tokens after it
    while last + 1 < len(row) and sot <= row[last + 1] <= no_ts:
        last += 1
    if row[last] != no_ts:
        raise ValueError(f"CTranslate2 scores a sequence only after <|notimestamps|> (id "
                         f"{no_ts}); this one's prompt is {row[:last + 1]}")
    needed = len(row) - last
    result = _ct2_generate(whisper, encoded, row, last, needed, return_logits_vocab=True,
                           suppress_tokens=[], suppress_blank=False)
    steps = [np.asarray(step, np.float32).reshape(-1) for step in result.logits[0][:needed]]
    if len(steps) < needed:
        raise ValueError(f"CTranslate2 returned {len(steps)} of {needed} logit rows")
    out = np.full((len(row), vocab), np.nan, np.float32)
    out[last:] = np.stack(steps)
    return out


def _greedy(whisper, encoded: np.ndarray, gen: dict, max_new: int,
            suppress_tokens=None) -> list[int]:
    """The engine's greedy sequence for one item: start token, language and task on a
    multilingual model (the language the engine detects), ``<|notimestamps|>``, text, and
    ``<|endoftext|>`` when reached within ``max_new`` tokens. ``suppress_tokens``: ids never
    generated (default: the folder's own list, CTranslate2's ``[-1]``)."""
    import ctranslate2

    prompt = [gen["decoder_start_token_id"]]
    if gen["is_multilingual"]:
        features = ctranslate2.StorageView.from_array(np.ascontiguousarray(encoded[None]))
        language = whisper.detect_language(features)[0][0][0]
        prompt += [gen["lang_to_id"][language], gen["task_to_id"]["transcribe"]]
    prompt.append(gen["no_timestamps_token_id"])
    # one token more than asked: CTranslate2 drops the end token, so a sequence shorter than
    # max_new + 1 ended on it, and one that reached it is cut back to max_new
    ids = _ct2_generate(whisper, encoded, prompt, len(prompt) - 1, max_new + 1,
                        suppress_tokens=[-1] if suppress_tokens is None else
                        [int(t) for t in suppress_tokens],
                        suppress_blank=True).sequences_ids[0]
    return prompt + (ids + [gen["eos_token_id"]] if len(ids) < max_new else ids[:max_new])


register_converter("whisper-ctranslate2", sys.modules[__name__])
