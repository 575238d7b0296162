"""CLAP text tower (RoBERTa, Liu et al. 2019), as ``transformers``' ``ClapModel.get_text_features``.

    input_ids [B, L], attention_mask [B, L] (right-padded with <pad>)
      -> text_model.embeddings: word_embeddings[ids] + token_type_embeddings[0]
           + position_embeddings[position ids] -> LayerNorm
         position ids are RoBERTa's: counted from padding_idx + 1 over the non-<pad> tokens,
         padding_idx at the <pad> tokens (fairseq's make_positions)
      -> text_model.encoder.layer.i (post-LN):
           x = LayerNorm(x + attention.output.dense(softmax(q kᵀ / √d + mask) v))
           x = LayerNorm(x + output.dense(GELU(intermediate.dense(x))))
           "text_model.encoder.layer.i.hidden_state"           [B, L, hidden]
           "text_model.encoder.layer.i.attention.self.attention" [B, heads, L, L] (kept maps)
      -> text_model.pooler: tanh(dense(x[:, 0]))        (the <s> token)      [B, hidden]
      -> text_projection: linear1 -> ReLU -> linear2                        [B, projection_dim]
      -> L2-normalised (``get_text_features``'s ``F.normalize``)

The text tower is not a :class:`~jaxspeech.model.Family` of its own: a family is an audio
model with a front end, and the text tower only exists next to CLAP's audio tower, in the
same ``ClapModel`` checkpoint. :class:`jaxspeech.clap_text.TextTower` binds this config,
its params and the checkpoint's tokenizer, and ``Model.text`` holds it. Parameter paths
mirror the PyTorch names (``text_model.encoder.layer.3.attention.self.query.kernel``), so
loading is renames and transposes; every relevance-bearing op goes through
:mod:`jaxspeech.layers` / :mod:`jaxspeech.lrp`, so the rule sets apply to both towers.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxspeech import layers, lrp

__all__ = ["ClapTextConfig", "PRESETS", "ClapText", "position_ids", "param_shapes", "init_params",
           "word_embeddings"]

Rules = lrp.RuleSet | None


@dataclasses.dataclass(frozen=True)
class ClapTextConfig:
    """Text-tower hyper-parameters, named as in HF's ``ClapTextConfig`` (defaults: its own,
    RoBERTa-base: 768 wide, 12 layers of 12 heads, 3072 FFN, 50265 tokens, 514 positions,
    projection 512; ``layer_norm_eps`` 1e-12 as ``ClapTextConfig``, not RoBERTa's 1e-5)."""

    vocab_size: int = 50265
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    hidden_act: str = "gelu"
    max_position_embeddings: int = 514
    type_vocab_size: int = 1
    layer_norm_eps: float = 1e-12
    projection_dim: int = 512
    projection_hidden_act: str = "relu"
    pad_token_id: int = 1
    position_embedding_type: str = "absolute"
    # the compute dtype (mixed precision; params stay float32): "float32", "bfloat16", "float16"
    dtype: str = "float32"

    def __post_init__(self):
        layers.check_dtype(self.dtype)
        problems = []
        if self.hidden_size % self.num_attention_heads:
            problems.append(f"hidden_size={self.hidden_size} not divisible by "
                            f"num_attention_heads={self.num_attention_heads}")
        if self.hidden_act != "gelu" or self.projection_hidden_act != "relu":
            problems.append(f"hidden_act={self.hidden_act!r}, projection_hidden_act="
                            f"{self.projection_hidden_act!r} (ported: 'gelu' and 'relu')")
        if self.position_embedding_type != "absolute":
            problems.append(f"position_embedding_type={self.position_embedding_type!r} "
                            "(ported: 'absolute')")
        if self.max_length < 1:
            problems.append(f"max_position_embeddings={self.max_position_embeddings} leaves no "
                            f"position after padding_idx={self.pad_token_id}")
        if problems:
            raise ValueError("CLAP text config not supported: " + "; ".join(problems))

    @property
    def max_length(self) -> int:
        """The most tokens (with <s> and </s>) the position table holds: positions start at
        ``pad_token_id + 1`` (514 positions, padding_idx 1 -> 512 tokens)."""
        return self.max_position_embeddings - self.pad_token_id - 1

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @classmethod
    def from_hf_config(cls, hf: Mapping) -> ClapTextConfig:
        """From ``config.json`` of a ``ClapModel`` (its ``text_config``; the top-level
        ``projection_dim`` / ``projection_hidden_act`` win, as ``ClapConfig`` sets them on the
        text config) or a bare ``ClapTextConfig``. Refuses what the port lacks, naming it."""
        text = dict(hf.get("text_config") or ({} if "audio_config" in hf else hf))
        for key in ("projection_dim", "projection_hidden_act"):
            if key in hf and "text_config" in hf:
                text[key] = hf[key]
        defaults = cls()
        fields = {f.name: type(getattr(defaults, f.name)) for f in dataclasses.fields(cls)}
        # a null pad_token_id (a config that never set one) is RoBERTa's 1
        values = {k: fields[k](text[k]) for k in fields if text.get(k) is not None}
        return cls(**values)


# laion/clap-htsat-unfused, -fused, larger_clap_general and larger_clap_music all use
# ClapTextConfig's defaults: the RoBERTa-base text tower.
PRESETS = {name: ClapTextConfig() for name in (
    "clap-htsat-unfused", "clap-htsat-fused", "larger-clap-general", "larger-clap-music")}


def position_ids(input_ids: jnp.ndarray, pad_token_id: int) -> jnp.ndarray:
    """RoBERTa's position ids ``[B, L]``: the running count of non-<pad> tokens plus
    ``pad_token_id`` at each non-<pad> token, ``pad_token_id`` at <pad> tokens (HF's
    ``create_position_ids_from_input_ids``: padding is read from the ids, not the mask)."""
    real = (input_ids != pad_token_id).astype(jnp.int32)
    return jnp.cumsum(real, axis=1) * real + pad_token_id


class Embed(nn.Module):
    """An embedding table ``weight [num, features]`` (PyTorch's name and layout)."""

    num: int
    features: int

    @nn.compact
    def __call__(self, ids: jnp.ndarray) -> jnp.ndarray:
        table = self.param("weight", nn.initializers.normal(0.02), (self.num, self.features))
        return jnp.take(table, ids, axis=0)


class TextLayer(nn.Module):
    """One ``ClapTextLayer`` (BERT's post-LN block) on ``[B, L, hidden]``."""

    config: ClapTextConfig
    rules: Rules = None

    @nn.compact
    def __call__(self, x: jnp.ndarray, keys: jnp.ndarray) -> jnp.ndarray:
        cfg, r = self.config, layers.rules_at(self, self.rules)
        b, n, d = x.shape
        heads, hd = cfg.num_attention_heads, cfg.head_dim

        def project(name):
            return layers.Dense(d, rules=self.rules, name=f"attention.self.{name}")(x) \
                .reshape(b, n, heads, hd)

        # HF scales the scores, q·kᵀ·hd^-½; scaling q first is the same product (a
        # rounding apart) and the same relevance: the scale is linear.
        q = project("query") / math.sqrt(hd)
        context = layers.masked_attention(self, q, project("key"), project("value"), r,
                                          where=keys[:, None, None, :],
                                          name="attention.self.attention")
        y = layers.Dense(d, rules=self.rules, name="attention.output.dense")(
            context.reshape(b, n, d))
        x = layers.LayerNorm(cfg.layer_norm_eps, rules=self.rules,
                             name="attention.output.LayerNorm")(y + x)
        y = layers.gelu(layers.Dense(cfg.intermediate_size, rules=self.rules,
                                     name="intermediate.dense")(x), r)
        y = layers.Dense(d, rules=self.rules, name="output.dense")(y)
        x = layers.LayerNorm(cfg.layer_norm_eps, rules=self.rules, name="output.LayerNorm")(y + x)
        return layers.tap(self, "hidden_state", x)


class ClapText(nn.Module):
    """``input_ids [B, L]``, ``attention_mask [B, L]`` -> L2-normalised text embedding
    ``[B, projection_dim]`` (``ClapModel.get_text_features``).

    ``inputs_embeds [B, L, hidden]``: the word embeddings to use instead of looking up
    ``input_ids`` (the ids still give the position ids), so that relevance can be read at
    them: ``R_token = Σ_d e·∂f/∂e``. ``normalize=False`` returns the projection unnormalised.
    """

    config: ClapTextConfig
    rules: Rules = None
    normalize: bool = True

    @nn.compact
    def __call__(self, input_ids: jnp.ndarray, attention_mask: jnp.ndarray,
                 inputs_embeds: jnp.ndarray | None = None) -> jnp.ndarray:
        cfg, r = self.config, layers.rules_at(self, self.rules)
        if input_ids.ndim != 2 or attention_mask.shape != input_ids.shape:
            raise ValueError(f"CLAP text expects input_ids and attention_mask [batch, tokens], got "
                             f"{tuple(input_ids.shape)} and {tuple(attention_mask.shape)}")
        if input_ids.shape[1] > cfg.max_length:
            raise ValueError(f"{input_ids.shape[1]} tokens: this text tower holds at most "
                             f"{cfg.max_length} (max_position_embeddings "
                             f"{cfg.max_position_embeddings}); tokenize with truncation")
        d = cfg.hidden_size
        words = Embed(cfg.vocab_size, d, name="text_model.embeddings.word_embeddings")
        if inputs_embeds is None:
            inputs_embeds = words(input_ids)
        elif self.is_initializing():
            words(input_ids)
        token_type = Embed(cfg.type_vocab_size, d,
                           name="text_model.embeddings.token_type_embeddings")(
            jnp.zeros((1, 1), jnp.int32))  # HF's default token_type_ids: all 0
        positions = Embed(cfg.max_position_embeddings, d,
                          name="text_model.embeddings.position_embeddings")(
            position_ids(input_ids, cfg.pad_token_id))
        x = layers.LayerNorm(cfg.layer_norm_eps, rules=self.rules,
                             name="text_model.embeddings.LayerNorm")(
            inputs_embeds + token_type + positions)
        x = layers.to_compute(cfg, x)  # the embeddings' sum in float32, the layers in dtype
        keys = attention_mask.astype(bool)
        for i in range(cfg.num_hidden_layers):
            x = TextLayer(cfg, self.rules, name=f"text_model.encoder.layer.{i}")(x, keys)
        pooled = layers.tanh(layers.Dense(d, rules=self.rules, name="text_model.pooler.dense")(
            x[:, 0]), r)
        self.sow("intermediates", "text_model.pooler_output", pooled)
        y = layers.Dense(cfg.projection_dim, rules=self.rules, name="text_projection.linear1")(
            pooled)
        y = layers.Dense(cfg.projection_dim, rules=self.rules, name="text_projection.linear2")(
            layers.relu(y, r))
        y = layers.to_output(y)
        if not self.normalize:
            return y
        norm = jnp.sqrt(jnp.sum(jnp.square(y), axis=-1, keepdims=True))
        return y / lrp.norm_std(jnp.maximum(norm, 1e-12), r)  # F.normalize


def _example(batch: int = 1, length: int = 4):
    return jnp.zeros((batch, length), jnp.int32), jnp.ones((batch, length), jnp.int32)


@functools.lru_cache(maxsize=16)
def param_shapes(config: ClapTextConfig) -> dict:
    """``ShapeDtypeStruct`` tree of the params, without allocating them."""
    module = ClapText(config)
    return jax.eval_shape(lambda k: module.init(k, *_example()), jax.random.key(0))["params"]


def init_params(config: ClapTextConfig, seed: int = 0) -> dict:
    """Random params (Flax's initialisers) as a plain nested dict."""
    variables = jax.jit(ClapText(config).init)(jax.random.key(seed), *_example())
    return jax.tree.map(lambda v: v, dict(variables["params"]))


def word_embeddings(params: Mapping, input_ids: jnp.ndarray) -> jnp.ndarray:
    """``[B, L, hidden]``: the rows of the word-embedding table for ``input_ids``."""
    return jnp.take(params["text_model.embeddings.word_embeddings"]["weight"], input_ids, axis=0)
