"""jaxspeech: explain speech and audio models in JAX.

    import jaxspeech as js
    m = js.load("path/to/checkpoint")        # HF / OpenAI / SpeechBrain / jaxspeech folder
    m = js.init("whisper-tiny", seed=0)      # a preset with random weights
    y = m(wave)                              # front end + model, jitted
"""

from jaxspeech import audio, lrp
from jaxspeech.convert import CheckpointError, load

# Each family registers its model and converter on import.
from jaxspeech.convert import whisper as _convert_whisper  # noqa: F401, E402, I001
from jaxspeech.model import Model, init, presets

# FAMILY ECAPA: from jaxspeech.convert import ecapa as _convert_ecapa  # noqa: F401, E402
# FAMILY CLAP: from jaxspeech.convert import clap as _convert_clap  # noqa: F401, E402

__all__ = ["load", "init", "presets", "Model", "CheckpointError", "audio", "lrp"]
__version__ = "0.1.0"
