"""jaxspeech's own checkpoint folder: ``jaxspeech.json`` (family + config) and
``params/`` (orbax-checkpoint). Written to a temporary sibling folder and renamed
into place, so an interrupted save never leaves a half-written checkpoint and an
existing one is never overwritten unless asked.

A CLAP model with its text tower (``Model.text``) also holds ``text_params/`` (orbax),
the text config and ``logit_scale_t`` under ``"text"`` in ``jaxspeech.json``, and the
RoBERTa tokenizer as ``tokenizer.json`` (Whisper keeps its tokenizer there too)."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import tempfile
from pathlib import Path

import jax
import numpy as np

from jaxspeech.convert.common import CheckpointError, flatten
from jaxspeech.model import Model, config_from_dict, config_to_dict, param_shapes

META = "jaxspeech.json"
FORMAT_VERSION = 1
# A tokenizer (Whisper's tokenizer.json) travels as a file of its own next to the params.
TOKENIZER_KEY, TOKENIZER_FILE = "tokenizer_json", "tokenizer.json"
TEXT_PARAMS = "text_params"


def _json_able(value) -> bool:
    """Scalars, and lists / dicts of them (Whisper's generation settings)."""
    if isinstance(value, (str, int, float, bool)) or value is None:
        return True
    if isinstance(value, (list, tuple)):
        return all(_json_able(v) for v in value)
    if isinstance(value, dict):
        return all(isinstance(k, str) and _json_able(v) for k, v in value.items())
    return False


def detect(path: str) -> bool:
    return (Path(path) / META).is_file()


def save(model: Model, path: str | os.PathLike, *, overwrite: bool = False) -> str:
    import orbax.checkpoint as ocp

    path = Path(path).absolute()
    if path.exists() and not overwrite:
        raise FileExistsError(
            f"{path} exists; pass overwrite=True (CLI: --overwrite) to replace it")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        params = jax.tree.map(np.asarray, model.params)
        with ocp.StandardCheckpointer() as ckpt:
            ckpt.save(tmp / "params", params)
        extras = {k: v for k, v in model.extras.items()
                  if _json_able(v) and k not in ("converted_from", TOKENIZER_KEY)}
        # the format recorded is the original one, also when re-saving a converted model
        extras["format"] = model.extras.get("converted_from") or model.extras.get("format")
        meta = {"format_version": FORMAT_VERSION, "config": config_to_dict(model.config),
                "source": model.source, "extras": extras}
        (tmp / META).write_text(json.dumps(meta, indent=2, sort_keys=True))
        if model.extras.get(TOKENIZER_KEY):
            (tmp / TOKENIZER_FILE).write_text(model.extras[TOKENIZER_KEY])
        text = getattr(model, "text", None)
        if text is not None:
            with ocp.StandardCheckpointer() as ckpt:
                ckpt.save(tmp / TEXT_PARAMS, jax.tree.map(np.asarray, text.params))
            meta["text"] = {"config": dataclasses.asdict(text.config),
                            "logit_scale_t": text.logit_scale_t,
                            "max_length": None if text.tokenizer is None
                            else text.tokenizer.max_length}
            (tmp / META).write_text(json.dumps(meta, indent=2, sort_keys=True))
            if text.tokenizer is not None:
                (tmp / TOKENIZER_FILE).write_text(text.tokenizer.tokenizer_json)
        if path.exists():
            shutil.rmtree(path)
        os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return str(path)


def load(path: str | os.PathLike) -> Model:
    path = Path(path).absolute()
    meta = json.loads((path / META).read_text())
    if meta.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"{path}: jaxspeech checkpoint format {meta.get('format_version')}, "
                              f"this jaxspeech reads {FORMAT_VERSION}")
    config = config_from_dict(meta["config"])
    params = _restore(path, "params", param_shapes(config))
    extras = dict(meta.get("extras", {}))
    text = _load_text(path, meta["text"]) if meta.get("text") else None
    if text is None and (path / TOKENIZER_FILE).is_file():
        extras[TOKENIZER_KEY] = (path / TOKENIZER_FILE).read_text()
    extras["converted_from"] = extras.pop("format", None)
    extras["format"] = "jaxspeech"
    return Model(config, params, source=meta.get("source") or str(path), extras=extras, text=text)


def _restore(path: Path, name: str, expected):
    """The orbax item ``path / name`` as the tree ``expected`` (shapes) says, after checking
    that the stored tree has exactly its leaves and shapes."""
    import orbax.checkpoint as ocp

    with ocp.StandardCheckpointer() as ckpt:
        stored = ckpt.metadata(path / name)
        stored_tree = getattr(stored, "item_metadata", stored)
        stored_tree = getattr(stored_tree, "tree", stored_tree)
        want = {".".join(k): tuple(v.shape) for k, v in flatten(expected).items()}
        have = {".".join(k): tuple(v.shape) for k, v in flatten(stored_tree).items()}
        problems = [f"missing {k}" for k in sorted(set(want) - set(have))]
        problems += [f"unexpected {k}" for k in sorted(set(have) - set(want))]
        problems += [f"mis-shaped {k}: stored {have[k]}, config expects {want[k]}"
                     for k in sorted(set(want) & set(have)) if want[k] != have[k]]
        if problems:
            raise CheckpointError(f"{path / name} does not match its config:\n  "
                                  + "\n  ".join(problems))
        return ckpt.restore(path / name, expected)


def _load_text(path: Path, meta: dict):
    """A CLAP text tower saved by :func:`save`: ``text_params/``, its config, the tokenizer."""
    from jaxspeech.clap_text import TextTower
    from jaxspeech.models.clap_text import ClapTextConfig, param_shapes
    from jaxspeech.roberta_tokenizer import RobertaTokenizer

    try:
        config = ClapTextConfig(**meta["config"])
    except TypeError as e:
        raise CheckpointError(f"{path}: text config {meta['config']} ({e})") from None
    params = _restore(path, TEXT_PARAMS, param_shapes(config))
    tokenizer, problem = None, f"{path} was saved without a tokenizer (its source had none)"
    if (path / TOKENIZER_FILE).is_file():
        tokenizer = RobertaTokenizer((path / TOKENIZER_FILE).read_text(), meta.get("max_length"))
    return TextTower(config, params, tokenizer, logit_scale_t=meta.get("logit_scale_t"),
                     tokenizer_problem=None if tokenizer else problem)
