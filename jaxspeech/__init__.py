"""jaxspeech: explain speech and audio models in JAX.

    import jaxspeech as js
    m = js.load("path/to/checkpoint")        # HF / OpenAI / SpeechBrain / jaxspeech folder
    m = js.init("whisper-tiny", seed=0)      # a preset with random weights
    y = m(wave)                              # front end + model, jitted
"""

from jaxspeech import audio, lrp
from jaxspeech.convert import CheckpointError, load, register_converter
from jaxspeech.convert import whisper as _whisper_convert
from jaxspeech.model import Model, init, presets
from jaxspeech.models import whisper as _whisper  # noqa: F401  (registers the family)

register_converter("whisper", _whisper_convert)

__all__ = ["load", "init", "presets", "Model", "CheckpointError", "audio", "lrp"]
__version__ = "0.1.0"
