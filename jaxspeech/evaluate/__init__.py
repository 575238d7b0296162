"""Faithfulness and sanity of attribution methods, side by side, batched and jitted.

    from jaxspeech.evaluate import evaluate
    table = evaluate(m, wave, target=js.targets.class_logit(3),
                     methods=["gradient_x_input", "integrated_gradients", "attnlrp"],
                     masks=masks)          # bool, the features' layout (or [B, frames])
    print(table.markdown())
    table.plot("out/")                     # curves_frames.png, curves_patches.png, mprt.png

Three checks (``ATTRIBUTION_NOTES.md``, "Evaluating faithfulness"):

* **Perturbation curves** (:func:`perturbation_curves`): remove frames or
  time–frequency patches most-relevant-first (MoRF) and least-relevant-first (LeRF)
  by replacing them with a baseline, record the target after each step, report the
  area between the curves (ABPC = AUC(LeRF) − AUC(MoRF), each AUC over the removed
  fraction [0, 1], i.e. normalised by the number of steps; the AttnLRP protocol). All
  steps of both curves are one jitted ``lax.map`` over the pure model.
* **Model-parameter randomisation** (:func:`mprt`, Adebayo et al. 2018): re-initialise
  the parameters group by group from the output back to the input and report the
  Spearman rank correlation (optionally SSIM) between the original and the
  randomised relevance after each step. A method passes when the correlation has
  fallen to ``threshold`` or below once the cascade is complete.
* **Localisation** on planted evidence (:func:`mass_in_mask`, :func:`pointing_game`):
  the share of positive relevance inside a ground-truth mask, and whether the
  single most relevant feature lies inside it.

CLI: ``jaxspeech evaluate CHECKPOINT AUDIO... --methods ... --target ... --out DIR``.

Modules: ``perturbation`` (curves, ABPC), ``randomisation`` (MPRT, parameter groups,
Spearman, SSIM), ``localisation``, ``table`` (:func:`evaluate`, :class:`Table`), ``cli``;
this file only re-exports.
"""

from jaxspeech.evaluate.cli import add_commands
from jaxspeech.evaluate.common import DEFAULT_METHODS, Method, fixed_target, valid_frames_of
from jaxspeech.evaluate.localisation import mass_in_mask, pointing_game
from jaxspeech.evaluate.perturbation import Curves, abpc, perturbation_curves
from jaxspeech.evaluate.randomisation import (
    MPRTResult,
    mprt,
    parameter_groups,
    randomize,
    spearman,
    ssim,
)
from jaxspeech.evaluate.table import Row, Table, evaluate

__all__ = ["evaluate", "Table", "Row", "Curves", "MPRTResult", "perturbation_curves", "abpc",
           "mprt", "parameter_groups", "randomize", "spearman", "ssim", "mass_in_mask",
           "pointing_game", "fixed_target", "valid_frames_of", "add_commands", "DEFAULT_METHODS",
           "Method"]
