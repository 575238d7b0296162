"""Edits: each intervention equals the same intervention done with PyTorch forward hooks on the
reference model (transformers Whisper, SpeechBrain ECAPA, transformers CLAP) with identical
weights, loaded through jaxspeech's own loaders; the identity edit leaves outputs
bit-identical; unknown sites list the available ones; edits reach attribution, truncation,
submodules, vmap and (on real tiny.en) every cached decoding step."""

import contextlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from test_whisper import hf_config, random_hf, rel_diff
from transformers import AttentionInterface, WhisperForConditionalGeneration
from transformers.masking_utils import AttentionMaskInterface, eager_mask

import jaxspeech as js
from jaxspeech import edits as E

# DESIGN.md: max |diff| <= 1e-4 of the output's scale for ports (float32). An edit adds a few
# elementwise ops to a port that meets this with ~1e-6 (tests/test_whisper*.py), so the
# bound is the port's; each case also checks that its edit moves the output by more than
# 10x the bound, so an edit that was not applied could not pass.
TOL = 1e-4
T_FRAMES = 100  # encoder positions: max_source_positions=100, a 2 s window (200 mel frames)


@contextlib.contextmanager
def hooks(*pairs):
    """``(module, fn)`` forward hooks (``fn(output) -> output``) and ``(module, fn, "pre")``
    forward pre-hooks (``fn(input) -> input``), removed on exit."""
    handles = []
    for module, fn, *kind in pairs:
        if kind == ["pre"]:
            handles.append(module.register_forward_pre_hook(lambda mod, args, fn=fn: (fn(args[0]),)
                                                            + tuple(args[1:])))
        else:
            def hook(mod, args, out, fn=fn):
                return (fn(out[0]),) + tuple(out[1:]) if isinstance(out, tuple) else fn(out)
            handles.append(module.register_forward_hook(hook))
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def _edited_attention(edits):
    """An attention function for transformers' AttentionInterface: eager attention whose
    weights go through ``edits[module]`` (the way to change a map inside HF's attention,
    which has no submodule to hook there)."""
    def attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0,
                  head_mask=None, **kwargs):
        w = torch.matmul(query, key.transpose(2, 3)) * scaling
        if attention_mask is not None and attention_mask.ndim == 4:
            w = w + attention_mask[:, :, :, : key.shape[-2]]
        w = torch.softmax(w, dim=-1)
        if module in edits:
            w = edits[module](w)
        return torch.matmul(w, value).transpose(1, 2).contiguous(), w
    return attention


AttentionInterface.register("jaxspeech_edit_test", _edited_attention({}))
AttentionMaskInterface.register("jaxspeech_edit_test", eager_mask)  # the causal mask as eager's


@pytest.fixture(scope="module")
def whisper(tmp_path_factory):
    cfg = hf_config(d_model=64, layers=2, heads=4, ffn=128)
    cfg.decoder_layers, cfg.max_source_positions = 2, T_FRAMES
    hf = random_hf(WhisperForConditionalGeneration, cfg, seed=7)
    folder = tmp_path_factory.mktemp("whisper_edits")
    hf.save_pretrained(folder)
    m = js.load(folder)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 80, 2 * T_FRAMES)).astype(np.float32)
    tokens = rng.integers(0, 64, (2, 6)).astype(np.int32)
    return m, hf, x, tokens


def hf_logits(hf, x, tokens):
    with torch.no_grad():
        return hf(input_features=torch.from_numpy(x),
                  decoder_input_ids=torch.from_numpy(tokens).long()).logits.numpy()


def heads_of(t, n_heads=4):  # [B, T, d] -> [B, T, heads, head_dim]
    return t.reshape(t.shape[0], t.shape[1], n_heads, -1)


def torch_project_out(t, d):
    u = torch.from_numpy(d / np.linalg.norm(d)).float()
    return t - (t @ u)[..., None] * u


def whisper_cases(hf):
    rng = np.random.default_rng(1)
    enc, dec = hf.model.encoder, hf.model.decoder
    keep = np.zeros(T_FRAMES, bool)
    keep[20:60] = True
    direction = rng.standard_normal(64).astype(np.float32)
    steer = rng.standard_normal(64).astype(np.float32)
    per_head = np.array([0.0, 0.5, 1.0, 2.0], np.float32)[:, None, None]  # [heads, 1, 1]

    def zero_heads(t, heads):
        h = heads_of(t).clone()
        h[:, :, heads] = 0
        return h.reshape(t.shape)

    def mean_head(t, head):
        h = heads_of(t).clone()
        h[:, :, head] = h[:, :, head].mean(dim=1, keepdim=True)
        return h.reshape(t.shape)

    # Three groups of edits, one compiled forward each; every edit was also checked alone
    # (each moves the logits by 2.5e-3 to 0.08 of their scale, far above the bound).
    return {
        "encoder_hidden_and_heads": (
            {"layers.0.hidden_state": js.edits.keep_frames(keep),
             **js.edits.ablate_heads(1, [0, 2]),
             "layers.1.hidden_state": [js.edits.scale(2.0), js.edits.project_out(direction)]},
            [(enc.layers[0], lambda t: t * torch.from_numpy(keep)[None, :, None]),
             (enc.layers[1].self_attn.out_proj, lambda t: zero_heads(t, [0, 2]), "pre"),
             (enc.layers[1], lambda t: torch_project_out(2.0 * t, direction))], {}),
        "attention_maps": (
            # a plain function on the decoder's causal map: keep each token's attention to
            # itself and to the first token
            {"layers.0.self_attn.attention": js.edits.scale(per_head),
             "decoder.layers.1.self_attn.attention":
                lambda v, **_: v * ((jnp.eye(6) + jnp.eye(6)[:, :1]) > 0)[None, None]},
            [], {enc.layers[0].self_attn: lambda w: w * torch.from_numpy(per_head)[None],
                 dec.layers[1].self_attn: lambda w: w * ((torch.eye(6) + torch.eye(6)[:, :1]) > 0)}),
        "embeddings_and_decoder": (
            {"embeddings": js.edits.mean(),
             "decoder.layers.0.hidden_state": js.edits.add(steer),
             **js.edits.ablate_heads("decoder.layers.1.encoder_attn", 3, value="mean")},
            [(enc.layers[0], lambda t: t.mean(dim=1, keepdim=True).expand_as(t), "pre"),
             (dec.layers[0], lambda t: t + torch.from_numpy(steer)),
             (dec.layers[1].encoder_attn.out_proj, lambda t: mean_head(t, 3), "pre")], {}),
    }


@pytest.mark.parametrize("case", ["encoder_hidden_and_heads", "attention_maps",
                                  "embeddings_and_decoder"])
def test_whisper_edit_equals_torch_hook(whisper, case):
    m, hf, x, tokens = whisper
    edits, pairs, maps = whisper_cases(hf)[case]
    plain = hf_logits(hf, x, tokens)
    implementation = hf.config._attn_implementation
    if maps:
        AttentionInterface.register("jaxspeech_edit_test", _edited_attention(maps))
        hf.config._attn_implementation = "jaxspeech_edit_test"
    try:
        with hooks(*pairs):
            ref = hf_logits(hf, x, tokens)
    finally:
        hf.config._attn_implementation = implementation
    ours = m.apply(m.params, x, tokens=tokens, edits=edits)
    assert rel_diff(ref, plain) > 10 * TOL, "the edit must move the output past the bound"
    assert rel_diff(ours, ref) <= TOL


def test_identity_edits_leave_outputs_bit_identical(whisper):
    m, _, x, tokens = whisper
    plain = np.asarray(m.apply(m.params, x, tokens=tokens))
    sites = ["embeddings", "layers.1.self_attn.heads", "layers.0.self_attn.attention",
             "decoder.layers.0.encoder_attn.attention", "decoder.layers.1.hidden_state"]
    # the encoder map's edit runs the materialised-map path instead of the fused one: the
    # same tile computations, so the same bits; a plain function returning its input too
    edited = m.apply(m.params, x, tokens=tokens, edits={
        **{s: js.edits.identity for s in sites}, "layers.0.hidden_state": lambda v: v})
    np.testing.assert_array_equal(np.asarray(edited), plain)


def test_unknown_site_lists_the_available_ones(whisper):
    m, _, x, tokens = whisper
    with pytest.raises(ValueError, match=r"unknown edit site.*'layers\.7\.hidden_state'.*"
                                         r"this model has: embeddings, layers\.0\.self_attn"):
        m.apply(m.params, x, edits={"layers.7.hidden_state": js.edits.zero})
    with pytest.raises(ValueError, match="give tokens="):  # decoder sites need the decoder
        m.apply(m.params, x, edits={"decoder.layers.0.hidden_state": js.edits.zero})
    with pytest.raises(TypeError, match="mapping"):
        m.apply(m.params, x, edits=[js.edits.zero])
    with pytest.raises(TypeError, match="an edit is"):
        m.apply(m.params, x, edits={"layers.0.hidden_state": 3.0})
    with pytest.raises(ValueError, match="must keep the value's shape"):
        m.apply(m.params, x, edits={"layers.0.hidden_state": lambda v: v[:, :10]})
    with pytest.raises(ValueError, match="does not broadcast"):
        m.apply(m.params, x, edits={"layers.0.hidden_state": js.edits.replace(np.ones(5))})
    names = js.edits.site_names(m, x, tokens=tokens)
    assert names[:4] == ["embeddings", "layers.0.self_attn.attention", "layers.0.self_attn.heads",
                         "layers.0.hidden_state"]  # forward order
    assert names[-1] == "decoder.layers.1.hidden_state"


def test_forward_reports_edited_values_and_batched_edits_vmap(whisper):
    m, _, x, tokens = whisper
    out, inter = m.forward(m.params, x, edits=js.edits.ablate_heads(0, [1]))
    assert np.all(np.asarray(inter["layers.0.self_attn.heads"])[:, :, 1] == 0)
    assert np.abs(np.asarray(inter["layers.0.self_attn.heads"])[:, :, 0]).max() > 0
    # a batch of edits: one compiled forward vmapped over the edit's traced arrays
    scales = jnp.asarray([0.0, 0.5, 2.0])

    def run(s):
        return m.apply(m.params, x, edits={"layers.1.hidden_state": js.edits.scale(s)})

    batched = jax.vmap(run)(scales)
    for i, s in enumerate(np.asarray(scales)):
        # the same function batched or not: float32 rounding of a reordered program only
        # (measured ~1e-7 of the output's scale)
        assert rel_diff(batched[i], run(float(s))) < 1e-5


def test_truncation_and_submodules(whisper):
    m, _, x, tokens = whisper
    _, inter = m.forward(m.params, x)
    # truncated: the compiled program stops at the site (XLA drops the layers after it)
    table = js.edits.site_table(m.config, x)

    def compiled(site):
        return E._upto.lower(m.config, m.params, jnp.asarray(x), {}, None, site,
                             table.path(site)).compile()

    first, last = compiled("layers.0.hidden_state"), compiled("layers.1.hidden_state")
    flops = [c.cost_analysis() for c in (first, last)]
    flops = [(c[0] if isinstance(c, list) else c)["flops"] for c in flops]
    assert flops[0] < 0.8 * flops[1]
    h0 = js.edits.upto(m, m.params, x, "layers.0.hidden_state")
    scale = np.abs(inter["layers.1.hidden_state"]).max()
    # another program, float32 order only (measured ~1e-7 of the scale)
    assert np.abs(np.asarray(h0) - np.asarray(inter["layers.0.hidden_state"])).max() < 1e-5 * scale
    # a layer's pure function, with edits named inside it
    layer = js.edits.submodule(m, "layers.1")
    assert layer.module_path == ("layers.1",) and layer.example_args[0].shape == (1, T_FRAMES, 64)
    p = layer.params_of(m.params)
    again = jax.jit(layer.apply)(p, inter["layers.0.hidden_state"])
    assert np.abs(np.asarray(again) - np.asarray(inter["layers.1.hidden_state"])).max() < 1e-5 * scale
    ablated = layer.apply(p, inter["layers.0.hidden_state"], edits={
        "self_attn.heads": js.edits.ablate_heads(1, [2])["layers.1.self_attn.heads"]})
    assert np.abs(np.asarray(ablated) - np.asarray(again)).max() > 1e-3 * scale
    with pytest.raises(ValueError, match="no module at 'layers.9'"):
        js.edits.submodule(m, "layers.9")


def test_edited_model_is_explained(whisper):
    """Attribution runs through the edits: gradient x input of the edited model equals
    x * jax.grad of the edited forward, and LRP rules leave the edited forward unchanged."""
    m, _, x, tokens = whisper
    edits = {**js.edits.ablate_heads(0, [0, 1]), "layers.1.hidden_state": js.edits.scale(0.5)}
    target = js.targets.layer_norm("layers.1.hidden_state")

    def f(x_):
        _, inter = m.forward(m.params, x_, edits=edits)
        return target(None, inter).sum()

    direct = np.asarray(x) * np.asarray(jax.grad(f)(jnp.asarray(x)))
    res = js.attribute(m, features=x, target=target, method="gradient_x_input", edits=edits)
    _, inter = m.forward(m.params, x)
    plain = np.asarray(target(None, inter))
    assert np.abs(np.asarray(res.score) - plain).min() > 0.1 * np.abs(plain).min()  # edited
    assert rel_diff(res.relevance, direct) < 1e-5  # the same gradient, another program
    lrp = js.attribute(m, features=x, target=target, method="attnlrp", edits=edits)
    np.testing.assert_allclose(lrp.score, res.score, rtol=1e-6)  # rules keep the forward
    assert np.isfinite(np.asarray(lrp.relevance)).all()


def test_edits_pass_through_remat(whisper):
    m, _, x, tokens = whisper
    edits = js.edits.ablate_heads(1, [3])
    np.testing.assert_allclose(m.apply(m.params, x, edits=edits, remat=True),
                               m.apply(m.params, x, edits=edits), atol=1e-6)


# --- ECAPA: SpeechBrain's ECAPA_TDNN with forward hooks ----------------------------------------

@pytest.fixture(scope="module")
def ecapa(tmp_path_factory):
    from jaxspeech.data.reference_checkpoints import ECAPA_SMALL, write_ecapa

    folder = tmp_path_factory.mktemp("ecapa_edits")
    sb, _ = write_ecapa(folder, ECAPA_SMALL, seed=3)
    m = js.load(str(folder))
    x = np.random.default_rng(2).standard_normal((2, 120, 80)).astype(np.float32)
    return m, sb, x


def sb_embedding(sb, x):
    with torch.no_grad():
        return sb(torch.from_numpy(x))[:, 0].numpy()


def test_ecapa_edits_equal_speechbrain_hooks(ecapa):
    """SpeechBrain computes [B, channels, frames]; the hooks do the same interventions in
    that layout."""
    m, sb, x = ecapa
    rng = np.random.default_rng(4)
    keep = np.arange(120) >= 30
    per_channel = rng.uniform(0, 2, 32).astype(np.float32)
    direction = rng.standard_normal((2, 96)).astype(np.float32)  # a 2-d subspace
    q, _ = np.linalg.qr(direction.T)
    basis = torch.from_numpy(q.T.astype(np.float32))  # [2, 96]
    prefix = "embedding_model."
    # one compiled forward for all five (each moves the embedding by more than 10x the bound
    # alone, checked when they were written)
    edits = {prefix + "blocks.1.hidden_state": js.edits.keep_frames(keep),
             prefix + "blocks.2.res2net_block.blocks.0.hidden_state": js.edits.zero,
             prefix + "blocks.2.hidden_state": js.edits.mean(),
             prefix + "blocks.3.hidden_state": js.edits.scale(per_channel),
             prefix + "mfa.hidden_state": js.edits.project_out(direction)}
    pairs = [(sb.blocks[1], lambda t: t * torch.from_numpy(keep)[None, None, :]),
             (sb.blocks[2].res2net_block.blocks[0], torch.zeros_like),
             (sb.blocks[2], lambda t: t.mean(dim=2, keepdim=True).expand_as(t)),
             (sb.blocks[3], lambda t: t * torch.from_numpy(per_channel)[None, :, None]),
             (sb.mfa, lambda t: t - torch.einsum("kc,bkt->bct", basis,
                                                 torch.einsum("bct,kc->bkt", t, basis)))]
    plain = sb_embedding(sb, x)
    with hooks(*pairs):
        ref = sb_embedding(sb, x)
    assert rel_diff(ref, plain) > 10 * TOL
    assert rel_diff(m.apply(m.params, x, edits=edits), ref) <= TOL


# --- CLAP: a Swin stage of transformers' ClapAudioModelWithProjection --------------------------

@pytest.mark.slow
def test_clap_stage_edit_equals_transformers_hook(tmp_path):
    from transformers import ClapAudioModelWithProjection

    from jaxspeech.data.reference_checkpoints import write_clap

    write_clap(tmp_path, dict(depths=[1, 1, 1, 1], patch_embeds_hidden_size=32, hidden_size=256,
                              num_attention_heads=[2, 2, 4, 4]), seed=5)
    m = js.load(tmp_path)
    hf = ClapAudioModelWithProjection.from_pretrained(tmp_path).eval()
    x = np.random.default_rng(5).standard_normal((1, 1, 1001, 64)).astype(np.float32) * 10 - 40
    longer = torch.zeros(1, dtype=torch.bool)
    blocks = hf.audio_model.audio_encoder.layers
    enc = "audio_model.audio_encoder."
    gain = np.random.default_rng(6).uniform(0, 2, 64).astype(np.float32)
    edits = {enc + "layers.1.blocks.0.hidden_state": js.edits.scale(gain),
             **js.edits.ablate_heads(enc + "layers.2.blocks.0.attention", [1])}

    def zero_head(t):  # [windows*B, n, C] -> head 1 of 4 zeroed
        h = t.reshape(t.shape[0], t.shape[1], 4, -1).clone()
        h[:, :, 1] = 0
        return h.reshape(t.shape)

    def embed():
        with torch.no_grad():
            return hf(input_features=torch.from_numpy(x), is_longer=longer).audio_embeds.numpy()

    plain = embed()
    with hooks((blocks[1].blocks[0], lambda t: t * torch.from_numpy(gain)),
               (blocks[2].blocks[0].attention.output.dense, zero_head, "pre")):
        ref = embed()
    ours = m.apply(m.params, x, is_longer=np.zeros(1, bool), edits=edits)
    assert rel_diff(ref, plain) > 10 * TOL
    assert rel_diff(ours, ref) <= TOL


# --- transcription: edits in every cached decoding step (real tiny.en) ------------------------

@pytest.mark.slow
def test_transcribe_applies_edits_in_every_decoding_step():
    """Greedy decoding of the edited model: each token is the argmax of the edited model's
    teacher-forced logits at its position (the encoder edited once, the decoder's sites at
    each step's own position, ``offset``); word timestamps align the edited model."""
    from jaxspeech.assets import speech_clips, whisper_folder
    from jaxspeech.tokenizer import WhisperTokenizer
    from jaxspeech.transcribe import generate, suppress_masks

    m = js.load(whisper_folder("tiny.en"))
    wave = speech_clips()[0].read()
    x = m.features(wave)
    plain = generate(m, x, max_new_tokens=24)
    block = np.zeros(448, bool)
    block[[1, 4]] = True  # zero two token positions (the prompt's last, a text token)
    edits = {**js.edits.ablate_heads(3, [0, 1, 2]),
             "decoder.layers.0.hidden_state": js.edits.keep_frames(~block),
             **js.edits.ablate_heads("decoder.layers.1.encoder_attn", [2, 5])}
    out = generate(m, x, max_new_tokens=24, edits=edits)
    assert out.tokens != plain.tokens  # the edits matter
    seq = np.asarray([out.prompts[0] + out.tokens[0]], np.int32)
    # teacher forced, the decoder site sees all positions at once (the mask's first L)
    logits = np.asarray(m.apply(m.params, x, tokens=seq, edits=edits))
    tok = WhisperTokenizer.from_model(m)
    every, first = suppress_masks(m.config, m.extras.get("generation") or {}, tok)
    p = len(out.prompts[0])
    for i in range(p - 1, seq.shape[1] - 1):
        masked = np.where(every | (first & (i == p - 1)), -np.inf, logits[0, i])
        assert int(np.argmax(masked)) == seq[0, i + 1], i
    words = js.transcribe(m, wave, word_timestamps=True, edits=edits, max_new_tokens=24,
                          no_speech_threshold=None)[0]
    assert words.tokens == out.tokens[0] and words.words


def test_submodule_and_site_helpers_on_ecapa(ecapa):
    m, _, x = ecapa
    names = js.edits.site_names(m, x, lengths=np.ones(2, np.float32))
    assert "embedding_model.blocks.2.hidden_state" in names and names[-1] == "logits"
    stat = js.edits.site_mean(m, features=x, site="embedding_model.blocks.1.hidden_state")
    _, inter = m.forward(m.params, x)
    np.testing.assert_allclose(stat, np.asarray(inter["embedding_model.blocks.1.hidden_state"])
                               .mean(axis=(0, 1)), rtol=1e-5, atol=1e-6)
    block = js.edits.submodule(m, "embedding_model.blocks.2")
    assert [a.shape if hasattr(a, "shape") else a for a in block.example_args][0] == (1, 200, 32)
