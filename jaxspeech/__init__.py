"""jaxspeech: explain speech and audio models in JAX.

    import jaxspeech as js
    m = js.load("path/to/checkpoint")        # HF / OpenAI / SpeechBrain / jaxspeech folder
    m = js.init("whisper-tiny", seed=0)      # a preset with random weights
    y = m(wave)                              # front end + model, jitted
"""

from jaxspeech import audio, edits, lrp
from jaxspeech.assets import load_default as default_model
from jaxspeech.attribution import METHODS, Attribution, attribute, targets
from jaxspeech.attribution.match import MatchAttribution, attribute_match
from jaxspeech.attribution.transcript import TranscriptAttribution, attribute_transcript
from jaxspeech.clap_text import clap_text_embeddings, zero_shot

# Each family registers its model and converter on import.
from jaxspeech.convert import CheckpointError, load
from jaxspeech.convert import clap as _convert_clap  # noqa: F401
from jaxspeech.convert import ctranslate2 as _convert_ctranslate2  # noqa: F401
from jaxspeech.convert import ecapa as _convert_ecapa  # noqa: F401
from jaxspeech.convert import whisper as _convert_whisper  # noqa: F401
from jaxspeech.model import Model, init, presets
from jaxspeech.patching import PatchingResult, Sites, patching  # the function shadows the module
from jaxspeech.transcribe import Transcript, transcribe
from jaxspeech.verify import verify  # the function shadows the module name

__all__ = ["load", "init", "presets", "Model", "CheckpointError", "audio", "lrp", "verify",
           "clap_text_embeddings", "zero_shot", "attribute", "Attribution", "METHODS", "targets",
           "default_model", "attribute_transcript", "TranscriptAttribution", "transcribe",
           "Transcript", "attribute_match", "MatchAttribution", "edits", "patching", "Sites",
           "PatchingResult"]
__version__ = "0.1.0"
