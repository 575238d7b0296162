"""A TFDS builder for a local copy of L2-ARCTIC (Zhao et al. 2018), which TFDS cannot download.

L2-ARCTIC is distributed on request (https://psi.engr.tamu.edu/l2-arctic-corpus/); unpack
it and point the builder at the folder that holds the speaker folders::

    l2arctic/ABA/wav/arctic_a0001.wav          44.1 kHz mono, 16 bit
    l2arctic/ABA/transcript/arctic_a0001.txt   the prompt
    ...                                        24 speakers, 6 first languages

    from jaxspeech.corpus.l2arctic import build
    build("~/data/l2arctic", data_dir="~/tensorflow_datasets")   # once
    # then: jaxspeech attribute-corpus tfds:l2_arctic --split train --data-dir ~/tensorflow_datasets ...

or ``jaxspeech build-l2arctic ~/data/l2arctic --data-dir ~/tensorflow_datasets``.

Features: ``audio`` (int16 samples at 44.1 kHz, a ``Tensor`` so that building and reading
need no TensorFlow), ``id`` (``SPEAKER/UTTERANCE``), ``speaker``, ``l1`` (ClassLabel over
the six first languages, the ``label`` of a corpus run), ``gender``, ``text``. One split,
``train``, with every utterance (slice it: ``train[:10%]``). Prepared as ``array_record``
(random access, no TensorFlow). Folders without ``wav/`` are ignored; a speaker folder
that is not one of the 24 is refused, naming it.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import tensorflow_datasets as tfds

__all__ = ["L2Arctic", "build", "SPEAKERS", "LANGUAGES", "SAMPLE_RATE"]

SAMPLE_RATE = 44100
LANGUAGES = ("arabic", "mandarin", "hindi", "korean", "spanish", "vietnamese")
# speaker -> (first language, gender), from the corpus README
SPEAKERS = {
    "ABA": ("arabic", "M"), "SKA": ("arabic", "F"), "YBAA": ("arabic", "M"), "ZHAA": ("arabic", "F"),
    "BWC": ("mandarin", "M"), "LXC": ("mandarin", "F"), "NCC": ("mandarin", "F"),
    "TXHC": ("mandarin", "M"),
    "ASI": ("hindi", "M"), "RRBI": ("hindi", "M"), "SVBI": ("hindi", "F"), "TNI": ("hindi", "F"),
    "HJK": ("korean", "F"), "HKK": ("korean", "M"), "YDCK": ("korean", "F"), "YKWK": ("korean", "M"),
    "EBVS": ("spanish", "M"), "ERMS": ("spanish", "M"), "MBMPS": ("spanish", "F"),
    "NJS": ("spanish", "F"),
    "HQTV": ("vietnamese", "M"), "PNV": ("vietnamese", "F"), "THV": ("vietnamese", "F"),
    "TLV": ("vietnamese", "M"),
}


class L2Arctic(tfds.core.GeneratorBasedBuilder):
    """L2-ARCTIC from a local copy (``manual_dir``)."""

    VERSION = tfds.core.Version("5.0.0")
    RELEASE_NOTES = {"5.0.0": "L2-ARCTIC v5 layout (24 speakers)."}
    MANUAL_DOWNLOAD_INSTRUCTIONS = (
        "Request L2-ARCTIC from https://psi.engr.tamu.edu/l2-arctic-corpus/, unpack it and pass "
        "the folder holding the speaker folders (ABA/, ASI/, ...) as manual_dir.")

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            description="Non-native English speech: 24 speakers of 6 first languages reading "
                        "CMU ARCTIC prompts.",
            features=tfds.features.FeaturesDict({
                "audio": tfds.features.Tensor(shape=(None,), dtype=np.int16),
                "id": tfds.features.Text(),
                "speaker": tfds.features.Text(),
                "l1": tfds.features.ClassLabel(names=LANGUAGES),
                "gender": tfds.features.Text(),
                "text": tfds.features.Text(),
            }),
            supervised_keys=("audio", "l1"),
            homepage="https://psi.engr.tamu.edu/l2-arctic-corpus/",
            citation="Zhao, G., Sonsaat, S., Silpachai, A., Lucic, I., Chukharev-Hudilainen, E., "
                     "Levis, J., Gutierrez-Osuna, R. (2018). L2-ARCTIC: A Non-native English "
                     "Speech Corpus. Interspeech.",
            metadata=tfds.core.MetadataDict(sample_rate=SAMPLE_RATE),
        )

    def _split_generators(self, dl_manager):
        root = Path(dl_manager.manual_dir)
        return {"train": self._generate_examples(root)}

    def _generate_examples(self, root: Path):
        import soundfile as sf

        speakers = sorted(p for p in root.iterdir() if (p / "wav").is_dir())
        if not speakers:
            raise FileNotFoundError(f"{root}: no speaker folders with wav/ inside "
                                    f"({self.MANUAL_DOWNLOAD_INSTRUCTIONS})")
        unknown = [p.name for p in speakers if p.name.upper() not in SPEAKERS]
        if unknown:
            raise ValueError(f"{root}: speaker folders {unknown} are not L2-ARCTIC speakers "
                             f"(known: {sorted(SPEAKERS)})")
        for spk in speakers:
            l1, gender = SPEAKERS[spk.name.upper()]
            for wav in sorted((spk / "wav").glob("*.wav")):
                data, rate = sf.read(wav, dtype="int16", always_2d=True)
                if rate != SAMPLE_RATE:
                    raise ValueError(f"{wav}: {rate} Hz, expected L2-ARCTIC's {SAMPLE_RATE} Hz")
                prompt = spk / "transcript" / f"{wav.stem}.txt"
                key = f"{spk.name}/{wav.stem}"
                mono = data[:, 0] if data.shape[1] == 1 else data.mean(axis=1).astype(np.int16)
                yield key, {"audio": mono, "id": key, "speaker": spk.name, "l1": l1,
                            "gender": gender,
                            "text": prompt.read_text().strip() if prompt.is_file() else ""}


def build(manual_dir: str | os.PathLike, data_dir: str | os.PathLike) -> str:
    """Prepare L2-ARCTIC from ``manual_dir`` into ``data_dir`` (array_record); returns the
    prepared dataset's folder."""
    builder = L2Arctic(data_dir=os.path.expanduser(os.fspath(data_dir)), file_format="array_record")
    builder.download_and_prepare(download_config=tfds.download.DownloadConfig(
        manual_dir=os.path.expanduser(os.fspath(manual_dir))))
    return str(builder.data_path)
