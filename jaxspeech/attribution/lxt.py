"""AttnLRP and CP-LRP on ``transformers``' Whisper and CLAP with LXT's own rule functions.

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
    audio_rel, text_rel, score = lxt_clap_match_relevance(folder, features, ids, mask)  # CLAP
"""

from __future__ import annotations

import contextlib
import types
from collections.abc import Callable, Iterator

import numpy as np

__all__ = ["lxt_whisper_encoder", "lxt_whisper_relevance", "lxt_whisper",
           "lxt_whisper_token_relevance", "lxt_clap", "lxt_clap_match_relevance"]


@contextlib.contextmanager
def _lxt_attention(hf_module, cp: bool) -> Iterator:
    """LXT's attention patch on a transformers model file (``modeling_whisper``,
    ``modeling_clap``), undone exactly on exit. ``patch_attention`` rebinds the file's
    ``ALL_ATTENTION_FUNCTIONS`` to a plain dict snapshot and ``patch_cp_attention`` writes
    into its local overrides; either, left behind, hides every attention function registered
    later (``AttentionInterface.register``) from that model file for the rest of the process.
    So the table object and its local overrides are put back, not copied into."""
    import lxt.efficient.patches as patches

    table = hf_module.ALL_ATTENTION_FUNCTIONS
    local = dict(getattr(table, "_local_mapping", {}))
    eager = hf_module.eager_attention_forward
    try:
        (patches.patch_cp_attention if cp else patches.patch_attention)(hf_module)
        yield
    finally:
        hf_module.eager_attention_forward = eager
        hf_module.ALL_ATTENTION_FUNCTIONS = table
        if hasattr(table, "_local_mapping"):
            table._local_mapping = local


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
    torch.nn.functional.gelu = lambda x, *a, **k: identity_rule_implicit(gelu, x)
    try:  # the model is built inside the patch: GELUActivation captures F.gelu at init
        if part == "encoder":
            model = WhisperModel.from_pretrained(folder, attn_implementation="eager").encoder
        else:
            model = WhisperForConditionalGeneration.from_pretrained(
                folder, attn_implementation="eager")
        model.eval().requires_grad_(False)  # as LXT's quick start: input gradients only
        with _lxt_attention(hf_whisper, cp):
            for module in model.modules():
                if isinstance(module, torch.nn.LayerNorm):
                    module.forward = types.MethodType(patches.layer_norm_forward, module)
            yield model
    finally:
        torch.nn.functional.gelu = gelu


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


@contextlib.contextmanager
def lxt_clap(folder, cp: bool = False) -> Iterator:
    """``transformers``' ``ClapModel`` of the HF folder (eager attention, eval mode) with LXT's
    AttnLRP (``cp=False``) or CP-LRP (``cp=True``) rules on both towers; undone on exit.

    Text tower (RoBERTa): LXT's attention patch on ``modeling_clap.eager_attention_forward``,
    which ``ClapTextSelfAttention`` calls (q, k ÷ 4 and v ÷ 2, or q, k detached), the
    identity rule on its GELU, on the pooler's tanh and on the projection's ReLU. Audio tower
    (HTSAT, whose window attention does not call that function): LXT's wrappers on the
    q, k, v projections of every ``ClapAudioSelfAttention``, identity rule on GELU and ReLU.
    Every LayerNorm: LXT's ``layer_norm_forward`` (constant std)."""
    import lxt.efficient.patches as patches
    import torch
    import transformers.models.clap.modeling_clap as hf_clap
    from lxt.efficient.rules import divide_gradient, identity_rule_implicit, stop_gradient
    from transformers import ClapModel

    model = ClapModel.from_pretrained(folder, attn_implementation="eager")
    model.eval().requires_grad_(False)

    def wrap(module, rule=None, around=None):
        forward = module.forward
        module.forward = (lambda x: around(forward, x)) if around else (lambda x: rule(forward(x)))

    with _lxt_attention(hf_clap, cp):
        for module in model.modules():
            if isinstance(module, hf_clap.ClapAudioSelfAttention):
                q_k = stop_gradient if cp else (lambda t: divide_gradient(t, 4))
                wrap(module.query, q_k)
                wrap(module.key, q_k)
                if not cp:
                    wrap(module.value, lambda t: divide_gradient(t, 2))
            elif isinstance(module, (hf_clap.ClapAudioIntermediate, hf_clap.ClapTextIntermediate)):
                wrap(module.intermediate_act_fn, around=identity_rule_implicit)
            elif isinstance(module, hf_clap.ClapProjectionLayer):
                wrap(module.activation, around=identity_rule_implicit)
            elif isinstance(module, hf_clap.ClapTextPooler):
                wrap(module.activation, around=identity_rule_implicit)
            elif isinstance(module, torch.nn.LayerNorm):
                module.forward = types.MethodType(patches.layer_norm_forward, module)
        yield model


def lxt_clap_match_relevance(folder, features: np.ndarray, input_ids: np.ndarray,
                             attention_mask: np.ndarray, cp: bool = False, model=None,
                             is_longer: np.ndarray | None = None
                             ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Relevance of CLAP's audio-text similarity ``s[b, n] = â_b · t̂_n`` over the audio
    features and the text tokens, LXT's way on ``transformers``: ``(audio [B, N, *features],
    text [B, N, L], score [B, N])``.

    ``features [B, C, T, 64]`` (the extractor's), ``input_ids`` / ``attention_mask [N, L]``.
    Both embeddings are normalised with a detached norm (the identity rule of a norm); the
    product ``â · t̂`` is LXT's uniform rule (``divide_gradient(·, 2)``, as LXT's gated MLP
    treats a product of two activations) under AttnLRP, a plain product under CP-LRP. Per
    text n, one backward of ``Σ_b s[b, n]`` with text n repeated B times: clip b's audio
    relevance and the text relevance of copy b are pair (b, n)'s (items never meet). Text
    relevance is read at the word embeddings, ``Σ_d e·∂s/∂e``, the position ids given as
    RoBERTa computes them from the ids. ``model``: one already inside :func:`lxt_clap`."""
    import torch
    from lxt.efficient.rules import divide_gradient

    def run(clap):
        ids = torch.from_numpy(np.asarray(input_ids)).long()
        mask = torch.from_numpy(np.asarray(attention_mask)).long()
        pad = clap.config.text_config.pad_token_id
        positions = (torch.cumsum(ids.ne(pad).long(), 1) * ids.ne(pad).long()) + pad
        longer = None if is_longer is None else torch.from_numpy(
            np.asarray(is_longer, bool).reshape(-1, 1))
        b, n = features.shape[0], ids.shape[0]
        audio_rel, text_rel, scores = [], [], []
        for j in range(n):
            x = torch.from_numpy(np.array(features, np.float32)).requires_grad_(True)
            audio = clap.audio_projection(clap.audio_model(input_features=x, is_longer=longer)
                                          .pooler_output)
            audio = audio / audio.norm(dim=-1, keepdim=True).detach()
            e = clap.text_model.embeddings.word_embeddings(ids[j:j + 1].expand(b, -1)) \
                .detach().requires_grad_(True)
            text = clap.text_projection(clap.text_model(
                inputs_embeds=e, attention_mask=mask[j:j + 1].expand(b, -1),
                position_ids=positions[j:j + 1].expand(b, -1)).pooler_output)
            text = text / text.norm(dim=-1, keepdim=True).detach()
            product = audio * text
            if not cp:
                product = divide_gradient(product, 2)
            score = product.sum(-1)
            score.sum().backward()
            audio_rel.append((x * x.grad).detach().numpy())
            text_rel.append((e * e.grad).sum(-1).detach().numpy())
            scores.append(score.detach().numpy())
        return np.stack(audio_rel, 1), np.stack(text_rel, 1), np.stack(scores, 1)

    if model is not None:
        return run(model)
    with lxt_clap(folder, cp) as clap:
        return run(clap)
