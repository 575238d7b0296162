"""Random-weight checkpoints written by the PyTorch references themselves, in their own formats.

Tests, benchmarks and ``jaxspeech demo`` need checkpoints without a download. Each
writer builds the reference model (``transformers`` / SpeechBrain) with random
weights of a sensible scale — random norms, biases and BatchNorm statistics too, so
that every parameter matters to the output — and saves it exactly as users receive
it from the hub:

    write_whisper(folder, "whisper-tiny")          # HF folder: config.json + model.safetensors
    write_ecapa(folder, ECAPA_SMALL)               # SpeechBrain: hyperparams.yaml + *.ckpt
    write_clap(folder, text_tower=True)            # HF ClapModel folder + tokenizer + extractor

torch, transformers and speechbrain are imported inside the writers (the
``reference`` extra); the rest of jaxspeech never needs them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["WHISPER_SIZES", "write_whisper", "ECAPA_FULL", "ECAPA_SMALL", "ECAPA_YAML", "ecapa_yaml",
           "ecapa_modules", "write_ecapa", "CLAP_SIZES", "randomize_clap", "save_roberta_tokenizer",
           "roberta_tokenizer_json", "SMALL_TEXT", "write_clap"]

# --- Whisper -----------------------------------------------------------------------------

WHISPER_SIZES = {  # d_model, encoder layers, heads (HF WhisperConfig names)
    "whisper-tiny": (384, 4, 6), "whisper-base": (512, 6, 8), "whisper-small": (768, 12, 12),
    "whisper-medium": (1024, 24, 16)}


def write_whisper(folder: str | Path, size: str | tuple[int, int, int] = "whisper-tiny", *,
                  n_mels: int = 80, ffn_dim: int | None = None, max_source_positions: int = 1500,
                  seed: int = 0, perturb: float = 0.0, conditional: bool = False, **save_kwargs):
    """An HF ``WhisperModel`` (or ``WhisperForConditionalGeneration``) folder; returns the
    torch model. ``max_source_positions`` below 1500 gives a shorter window (100: 2 s).
    ``perturb`` adds that much noise to biases and LayerNorm parameters (HF
    initialises them to 0 / 1, which hides mistakes in their handling). ``save_kwargs``
    go to ``save_pretrained`` (``safe_serialization``, ``max_shard_size``)."""
    import torch
    from transformers import WhisperConfig, WhisperForConditionalGeneration, WhisperModel

    d, layers, heads = WHISPER_SIZES[size] if isinstance(size, str) else size
    ffn = 4 * d if ffn_dim is None else ffn_dim
    torch.manual_seed(seed)
    cfg = WhisperConfig(num_mel_bins=n_mels, d_model=d, encoder_layers=layers,
                        encoder_attention_heads=heads, encoder_ffn_dim=ffn, decoder_layers=1,
                        decoder_attention_heads=heads, decoder_ffn_dim=ffn, vocab_size=64,
                        max_source_positions=max_source_positions,
                        pad_token_id=0, bos_token_id=1, eos_token_id=2, decoder_start_token_id=1)
    model = (WhisperForConditionalGeneration if conditional else WhisperModel)(cfg).eval()
    if perturb:
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name.endswith("bias") or "layer_norm" in name:
                    p.add_(perturb * torch.randn_like(p))
    model.save_pretrained(folder, **save_kwargs)
    return model


# --- ECAPA-TDNN (SpeechBrain) ----------------------------------------------------------------

# The layout of speechbrain/spkrec-ecapa-voxceleb's hyperparams.yaml.
ECAPA_YAML = """\
# ############################################################################
# Model: ECAPA big for Speaker verification
# ############################################################################

# Feature parameters
n_mels: {n_mels}

# Pretrain folder (HuggingFace)
pretrained_path: speechbrain/spkrec-ecapa-voxceleb

# Output parameters
out_n_neurons: {out_neurons}

# Model params
compute_features: !new:speechbrain.lobes.features.Fbank
    n_mels: !ref <n_mels>

mean_var_norm: !new:speechbrain.processing.features.InputNormalization
    norm_type: sentence
    std_norm: False

embedding_model: !new:speechbrain.lobes.models.ECAPA_TDNN.ECAPA_TDNN
    input_size: !ref <n_mels>
{arch}

classifier: !new:speechbrain.lobes.models.ECAPA_TDNN.Classifier
    input_size: {lin_neurons}
    out_neurons: !ref <out_n_neurons>

mean_var_norm_emb: !new:speechbrain.processing.features.InputNormalization
    norm_type: global
    std_norm: False

modules:
    compute_features: !ref <compute_features>
    mean_var_norm: !ref <mean_var_norm>
    embedding_model: !ref <embedding_model>
    mean_var_norm_emb: !ref <mean_var_norm_emb>
    classifier: !ref <classifier>

label_encoder: !new:speechbrain.dataio.encoder.CategoricalEncoder

pretrainer: !new:speechbrain.utils.parameter_transfer.Pretrainer
    loadables:
        embedding_model: !ref <embedding_model>
        mean_var_norm_emb: !ref <mean_var_norm_emb>
        classifier: !ref <classifier>
        label_encoder: !ref <label_encoder>
    paths:
        embedding_model: !ref <pretrained_path>/embedding_model.ckpt
        mean_var_norm_emb: !ref <pretrained_path>/mean_var_norm_emb.ckpt
        classifier: !ref <pretrained_path>/classifier.ckpt
        label_encoder: !ref <pretrained_path>/label_encoder.txt
"""

# spkrec-ecapa-voxceleb's size (7205 VoxCeleb speakers) and a small one for fast tests. Every
# key but n_mels and out_neurons is an ``ECAPA_TDNN`` argument, written into the yaml.
ECAPA_FULL = dict(n_mels=80, out_neurons=7205, channels=[1024, 1024, 1024, 1024, 3072],
                  kernel_sizes=[5, 3, 3, 3, 1], dilations=[1, 2, 3, 4, 1], attention_channels=128,
                  lin_neurons=192)
ECAPA_SMALL = dict(ECAPA_FULL, channels=[32, 32, 32, 32, 96], attention_channels=16, lin_neurons=24,
                   out_neurons=5, se_channels=8)


def _ecapa_args(hp: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in hp.items() if k not in ("n_mels", "out_neurons")}


def ecapa_yaml(hp: dict[str, Any]) -> str:
    """spkrec-ecapa-voxceleb's ``hyperparams.yaml`` (:data:`ECAPA_YAML`) for preset ``hp``."""
    arch = "\n".join(f"    {k}: {v}" for k, v in _ecapa_args(hp).items())
    return ECAPA_YAML.format(n_mels=hp["n_mels"], out_neurons=hp["out_neurons"],
                             lin_neurons=hp["lin_neurons"], arch=arch)


def ecapa_modules(hp: dict[str, Any], seed: int = 0):
    """SpeechBrain ``(ECAPA_TDNN, Classifier)`` with random weights and random BatchNorm
    running statistics and affine parameters, in eval mode."""
    import torch
    from speechbrain.lobes.models.ECAPA_TDNN import ECAPA_TDNN, Classifier

    torch.manual_seed(seed)
    emb = ECAPA_TDNN(hp["n_mels"], **_ecapa_args(hp))
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, v in emb.state_dict().items():
            if name.endswith("running_mean"):
                v.copy_(torch.rand(v.shape, generator=gen) * 0.4 - 0.2)
            elif name.endswith("running_var"):
                v.copy_(torch.rand(v.shape, generator=gen) * 1.5 + 0.5)
            elif name.endswith("norm.weight"):
                v.copy_(torch.rand(v.shape, generator=gen) + 0.5)
            elif name.endswith("norm.bias"):
                v.copy_(torch.randn(v.shape, generator=gen) * 0.1)
    clf = Classifier(hp["lin_neurons"], out_neurons=hp["out_neurons"])
    return emb.eval(), clf.eval()


def write_ecapa(folder: str | Path, hp: dict[str, Any] = ECAPA_SMALL, *, seed: int = 0,
                classifier: bool = True):
    """A SpeechBrain spkrec-style folder (``hyperparams.yaml``, ``embedding_model.ckpt``,
    optionally ``classifier.ckpt``); returns the torch ``(embedding_model, classifier)``."""
    import torch

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    emb, clf = ecapa_modules(hp, seed)
    torch.save(emb.state_dict(), folder / "embedding_model.ckpt")
    if classifier:
        torch.save(clf.state_dict(), folder / "classifier.ckpt")
    (folder / "hyperparams.yaml").write_text(ecapa_yaml(hp))
    return emb, clf


# --- CLAP ------------------------------------------------------------------------------------

CLAP_SIZES = {  # ClapAudioConfig overrides per preset
    "clap-htsat-unfused": {},
    "larger-clap-general": dict(patch_embeds_hidden_size=128, depths=[2, 2, 12, 2], hidden_size=1024),
}


def randomize_clap(model, seed: int) -> None:
    """Replace HF's init (zero biases and bias tables, unit norms) by random values of a
    sensible scale, so every parameter matters to the output."""
    import torch

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in model.state_dict().items():
            if not t.is_floating_point():
                continue
            r = torch.randn(t.shape, generator=g)
            if name.endswith("batch_norm.running_mean"):  # the mel-bin norm sees dB values
                t.copy_(-40 + 10 * r)
            elif name.endswith("batch_norm.running_var"):
                t.copy_(300 + 200 * torch.rand(t.shape, generator=g))
            elif name.endswith("running_var"):
                t.copy_(0.5 + torch.rand(t.shape, generator=g))
            elif name.endswith("running_mean"):
                t.copy_(0.3 * r)
            elif name.startswith("logit_scale"):
                t.fill_(float(np.log(20.0)) + 0.5 * r.item())
            elif t.ndim == 1 and name.endswith("weight"):  # LayerNorm / BatchNorm scales
                t.copy_(1 + 0.2 * r)
            elif t.ndim == 1:
                t.copy_(0.1 * r)
            elif "relative_position_bias_table" in name:
                t.copy_(0.5 * r)
            else:
                t.copy_(r / np.sqrt(t[0].numel()))


ROBERTA_MERGES = ("Ġ d", "o g", "Ġd og", "Ġ r", "a i", "Ġr ai", "i n", "in g", "a r", "Ġ b",
                  "Ġb ar", "Ġ t", "h e", "Ġt he", "Ġ a", "o n", "Ġ o", "o o", "Ġr oo")


def roberta_tokenizer_json(merges=ROBERTA_MERGES) -> tuple[str, int]:
    """``(tokenizer.json text, vocabulary size)`` of a byte-level BPE RoBERTa tokenizer built
    with the ``tokenizers`` library: RoBERTa's special tokens, all 256 byte symbols and
    ``merges`` (so most words are several tokens), RoBERTa's byte-level pre-tokenizer and
    decoder and its ``<s> ... </s>`` post-processor, as transformers' converter builds
    ``RobertaTokenizerFast`` from a slow tokenizer."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers.models.roberta.tokenization_roberta import bytes_to_unicode

    vocab = {"<s>": 0, "<pad>": 1, "</s>": 2, "<unk>": 3}
    for c in sorted(set(bytes_to_unicode().values())):
        vocab[c] = len(vocab)
    for m in merges:
        vocab.setdefault(m.replace(" ", ""), len(vocab))
    vocab["<mask>"] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[tuple(m.split()) for m in merges],
                               continuing_subword_prefix="", end_of_word_suffix="",
                               fuse_unk=False))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.RobertaProcessing(sep=("</s>", 2), cls=("<s>", 0),
                                                      add_prefix_space=False, trim_offsets=True)
    tok.add_special_tokens([AddedToken(t, special=True) for t in ("<s>", "<pad>", "</s>", "<unk>")]
                           + [AddedToken("<mask>", lstrip=True, special=True)])
    return tok.to_str(), len(vocab)


def save_roberta_tokenizer(folder: str | Path, model_max_length: int = 512) -> int:
    """The tokenizer of :func:`roberta_tokenizer_json` saved into ``folder`` by transformers'
    ``RobertaTokenizerFast`` (``tokenizer.json``, ``tokenizer_config.json`` with
    ``model_max_length``, ``vocab.json``, ``merges.txt``), as a CLAP checkpoint holds it;
    returns its vocabulary size."""
    from tokenizers import Tokenizer
    from transformers import RobertaTokenizerFast

    text, size = roberta_tokenizer_json()
    RobertaTokenizerFast(tokenizer_object=Tokenizer.from_str(text),
                         model_max_length=model_max_length).save_pretrained(folder)
    return size


# A text tower small enough for the tests: 2 layers of 2 heads, 32 wide, 64 positions.
SMALL_TEXT = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=48,
                  max_position_embeddings=64)


def write_clap(folder: str | Path, audio: dict[str, Any] | str = "clap-htsat-unfused", *,
               text_tower: bool = False, fusion: bool = False, seed: int = 0,
               text: dict[str, Any] | None = None, tokenizer: bool = True):
    """An HF CLAP folder with random weights and a ``ClapFeatureExtractor``; returns the torch
    model. ``audio``: a preset name of :data:`CLAP_SIZES` or ``ClapAudioConfig`` overrides.
    ``text_tower``: a ``ClapModel`` with a text tower (``text``: ``ClapTextConfig``
    overrides, default :data:`SMALL_TEXT`; ``{}`` is the real RoBERTa-base size) and, with
    ``tokenizer``, the offline tokenizer of :func:`save_roberta_tokenizer` (its
    ``model_max_length`` the position table's); else a ``ClapAudioModelWithProjection``.
    ``fusion``: the fused model with the ``fusion`` truncation (else ``rand_trunc`` with
    ``repeatpad``, as clap-htsat-unfused)."""
    import torch
    from transformers import (
        ClapAudioConfig,
        ClapAudioModelWithProjection,
        ClapConfig,
        ClapFeatureExtractor,
        ClapModel,
    )

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    overrides = dict(CLAP_SIZES[audio] if isinstance(audio, str) else audio)
    if fusion:
        overrides["enable_fusion"] = True
    torch.manual_seed(seed)
    if text_tower:
        text = dict(SMALL_TEXT if text is None else text)
        positions = text.get("max_position_embeddings", 514)
        _, vocab = roberta_tokenizer_json()
        if tokenizer:  # RoBERTa's model_max_length: the positions after padding_idx 1
            save_roberta_tokenizer(folder, model_max_length=positions - 2)
        if "hidden_size" in text:  # a small tower: a table of the tokenizer's size
            text.setdefault("vocab_size", vocab)
        model = ClapModel(ClapConfig(text_config=text, audio_config=overrides))
    else:
        model = ClapAudioModelWithProjection(ClapAudioConfig(**overrides))
    model.eval()
    randomize_clap(model, seed + 1)
    model.save_pretrained(folder)
    if fusion:
        extractor = ClapFeatureExtractor(frequency_min=30, frequency_max=15000, truncation="fusion",
                                         padding="repeat")
    else:
        extractor = ClapFeatureExtractor(frequency_min=50, frequency_max=14000,
                                         truncation="rand_trunc", padding="repeatpad")
    extractor.save_pretrained(folder)
    return model
