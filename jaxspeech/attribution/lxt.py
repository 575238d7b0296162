"""AttnLRP and CP-LRP on the ``transformers`` Whisper encoder with LXT's own rule functions.

The independent implementation that jaxspeech's Whisper LRP is checked against
(``tests/test_attribution_whisper.py``) and timed against (``benchmarks/attribution.py``).
LXT (``lxt.efficient``, Achtibat et al. 2024) patches a PyTorch model in place: the
identity rule on every GELU (``identity_rule_implicit``), LayerNorm with a constant
standard deviation (``patches.layer_norm_forward``), and its attention wrappers
(q, k ÷ 4 and v ÷ 2 through ``divide_gradient``, or q, k detached for CP-LRP). Relevance
is then ``x * x.grad``. torch, transformers and lxt are imported inside the functions
(the ``reference`` extra; ``lxt.efficient`` imports under transformers 4).

    with lxt_whisper_encoder(folder, cp=False) as encoder:
        hidden = encoder(features).last_hidden_state
    relevance, score = lxt_whisper_relevance(folder, features, lambda h: h[:, 100:200].mean(1) @ d)
"""

from __future__ import annotations

import contextlib
import types
from collections.abc import Callable, Iterator

import numpy as np

__all__ = ["lxt_whisper_encoder", "lxt_whisper_relevance", "lxt_whisper",
           "lxt_whisper_token_relevance"]


@contextlib.contextmanager
def lxt_whisper(folder, cp: bool = False, part: str = "conditional") -> Iterator:
    """``transformers``' Whisper of the HF folder (eager attention, eval mode) with LXT's AttnLRP
    (``cp=False``) or CP-LRP (``cp=True``) rules patched in; every patch is undone on exit.
    ``part``: ``"conditional"`` (``WhisperForConditionalGeneration``: encoder, decoder and the
    tied output projection) or ``"encoder"``. LXT has no encoder-decoder support of its own;
    its attention patch replaces ``eager_attention_forward``, which Whisper's causal
    self-attention and cross-attention call as its encoder does, so the same rules apply."""
    import lxt.efficient.patches as patches
    import torch
    import transformers.models.whisper.modeling_whisper as hf_whisper
    from lxt.efficient.rules import identity_rule_implicit
    from transformers import WhisperForConditionalGeneration, WhisperModel

    gelu = torch.nn.functional.gelu
    saved = hf_whisper.eager_attention_forward, dict(hf_whisper.ALL_ATTENTION_FUNCTIONS)
    torch.nn.functional.gelu = lambda x, *a, **k: identity_rule_implicit(gelu, x)
    try:  # the model is built inside the patch: GELUActivation captures F.gelu at init
        if part == "encoder":
            model = WhisperModel.from_pretrained(folder, attn_implementation="eager").encoder
        else:
            model = WhisperForConditionalGeneration.from_pretrained(
                folder, attn_implementation="eager")
        model.eval().requires_grad_(False)  # as LXT's quick start: input gradients only
        (patches.patch_cp_attention if cp else patches.patch_attention)(hf_whisper)
        for module in model.modules():
            if isinstance(module, torch.nn.LayerNorm):
                module.forward = types.MethodType(patches.layer_norm_forward, module)
        yield model
    finally:
        torch.nn.functional.gelu = gelu
        hf_whisper.eager_attention_forward = saved[0]
        hf_whisper.ALL_ATTENTION_FUNCTIONS.clear()
        hf_whisper.ALL_ATTENTION_FUNCTIONS.update(saved[1])


@contextlib.contextmanager
def lxt_whisper_encoder(folder, cp: bool = False) -> Iterator:
    """The encoder alone under LXT's rules (:func:`lxt_whisper` with ``part="encoder"``)."""
    with lxt_whisper(folder, cp, part="encoder") as encoder:
        yield encoder


def lxt_whisper_token_relevance(folder, features: np.ndarray, sequence: np.ndarray, n_text: int,
                                cp: bool = False, model=None) -> tuple[np.ndarray, np.ndarray]:
    """Each text token's AttnLRP / CP-LRP relevance over the features, one backward per token
    (LXT's way): ``sequence [B, S]`` is the decoder input (prompt + ``n_text`` text tokens);
    token j's target is ``log p(sequence[:, S - n + j] | prefix)``. Returns
    ``(relevance [B, n, n_mels, frames], score [B, n])``. Pass a ``model`` already inside
    :func:`lxt_whisper` to reuse it (its rules then hold; ``folder`` and ``cp`` are unused);
    else one is built."""
    import torch

    seq = torch.from_numpy(np.asarray(sequence)).long()
    start = seq.shape[1] - n_text

    def run(net):
        relevance, scores = [], []
        for j in range(n_text):
            x = torch.from_numpy(np.asarray(features, np.float32)).requires_grad_(True)
            logits = net(input_features=x, decoder_input_ids=seq).logits
            logp = torch.log_softmax(logits[:, start + j - 1], dim=-1)
            score = logp.gather(1, seq[:, start + j, None])[:, 0]
            score.sum().backward()
            relevance.append((x * x.grad).detach().numpy())
            scores.append(score.detach().numpy())
        return np.stack(relevance, 1), np.stack(scores, 1)

    if model is not None:
        return run(model)
    with lxt_whisper(folder, cp) as net:
        return run(net)


def lxt_whisper_relevance(folder, features: np.ndarray, target: Callable, cp: bool = False,
                          encoder=None) -> tuple[np.ndarray, np.ndarray]:
    """``(relevance [B, n_mels, 3000], score [B])`` for ``target(last_hidden_state) -> [B]`` (a
    torch function) on log-mel ``features`` ``[B, n_mels, 3000]``. Pass an ``encoder`` already
    inside :func:`lxt_whisper_encoder` to reuse it (timing); else one is built."""
    import torch

    def run(enc):
        x = torch.from_numpy(np.asarray(features, np.float32)).requires_grad_(True)
        score = target(enc(x).last_hidden_state)
        score.sum().backward()
        return (x * x.grad).detach().numpy(), score.detach().numpy()

    if encoder is not None:
        return run(encoder)
    with lxt_whisper_encoder(folder, cp) as enc:
        return run(enc)
