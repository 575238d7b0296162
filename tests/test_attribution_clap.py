"""Attribution on CLAP's audio tower (HTSAT Swin): forward identity, conservation, LXT and
captum agreement, windowed rollout against its dense definition, text targets, batching,
Grad-CAM, and where tokens and frames sit over the features and the waveform.

The tiny model keeps HTSAT's geometry at a small width: 256x256 folded image, patches of
8 (a 32x32 grid), 8x8 windows, depths 2-1-1. Stage 0 has 16 windows with a shifted,
masked second block; two patch merges; stage 2's 8x8 grid is one window (the real
model's 12 blocks, shifts dropped on one-window grids included, are checked against HF's
partition without compiling). Random weights are saved as HF folders (a ClapModel with a
text tower and a ClapAudioModelWithProjection holding the same audio weights) and loaded
with js.load. Feature batches of 2 throughout, so each program compiles once.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers.models.clap.modeling_clap as hf_clap
from transformers import ClapAudioModelWithProjection, ClapFeatureExtractor, ClapModel

import jaxspeech as js
from jaxspeech.data.reference_checkpoints import write_clap
from jaxspeech.frontends import clap as frontend
from jaxspeech.lrp import RULE_SETS
from jaxspeech.models import clap as jclap

pytestmark = pytest.mark.xdist_group("clap_attribution")

ENC = "audio_model.audio_encoder."
AUDIO = dict(patch_embeds_hidden_size=16, depths=[2, 1, 1], num_attention_heads=[2, 2, 4],
             hidden_size=64, patch_size=8, patch_stride=[8, 8], window_size=8)
PROJ = 512  # ClapModel's default projection_dim: the text and audio sides share it


def rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / np.abs(b).max())


def corr(a, b):
    return float(np.corrcoef(np.ravel(a), np.ravel(b))[0, 1])


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """``(ClapModel folder with a tokenizer, ClapAudioModelWithProjection folder)`` holding
    the same random audio weights."""
    root = tmp_path_factory.mktemp("clap_attribution")
    full, tower = root / "clap", root / "tower"
    model = write_clap(full, AUDIO, text_tower=True, seed=3)
    audio = ClapAudioModelWithProjection(model.config.audio_config).eval()
    audio.load_state_dict({k: v for k, v in model.state_dict().items()
                           if k.startswith(("audio_model.", "audio_projection."))})
    audio.save_pretrained(tower)
    ClapFeatureExtractor.from_pretrained(full).save_pretrained(tower)
    return full, tower


@pytest.fixture(scope="module")
def model(folders):
    return js.load(folders[1])  # audio_embeds, not L2-normalised (config.normalize False)


def hf_tower(folders):
    return ClapAudioModelWithProjection.from_pretrained(folders[1]).eval()


def dB_features(seed, batch):
    """Log-mel-like features ``[batch, 1, 1001, 64]`` (the tower's batch norm expects dB)."""
    rng = np.random.default_rng(seed)
    return (-40 + 12 * rng.standard_normal((batch, 1, frontend.CHUNK_FRAMES, 64))).astype(np.float32)


@pytest.fixture(scope="module")
def features():
    return dB_features(1, 2)


@pytest.fixture(scope="module")
def direction():
    return np.random.default_rng(2).standard_normal(PROJ).astype(np.float32)


def direction_target(direction):
    return js.targets.layer_direction(None, direction)


def test_the_folders_load_as_the_tiny_geometry(model):
    assert model.config.depths == (2, 1, 1) and model.config.patch_stride == (8, 8)
    assert not model.config.normalize and model.config.projection_dim == PROJ
    assert jclap.stage_grids(model.config) == [(32, 32), (16, 16), (8, 8)]


# --- the forward never changes ---------------------------------------------------------------

def test_forward_with_every_rule_set_is_bitwise_the_plain_forward(model, features):
    sets = (None, *RULE_SETS.values())

    @jax.jit  # one program for all rule sets: a rule that changed a value would show here
    def outputs(params, x):
        return [model.module(rules).apply({"params": params}, x) for rules in sets]

    plain, *ruled = (np.asarray(y) for y in outputs(model.params, jnp.asarray(features)))
    for name, y in zip(RULE_SETS, ruled, strict=True):
        np.testing.assert_array_equal(y, plain, err_msg=name)


# --- conservation on a bias-free model ------------------------------------------------------

def bias_free(params):
    """Biases, batch-norm running means (a shift) and relative position biases zeroed."""
    zero = ("bias", "mean", "self.relative_position_bias_table")
    return jax.tree_util.tree_map_with_path(
        lambda path, v: jnp.zeros_like(v) if path[-1].key in zero else v, params)


# CP-LRP with the ε, γ and z+ linear rules on different parts of the network: one program
# that conserves only if each of the three rules does.
LINEAR_RULES = (RULE_SETS["cp_lrp"].override(r"layers\.0\.", linear="epsilon")
                .override(r"layers\.1\.", linear="gamma")
                .override(r"patch_embed|audio_projection", linear="zplus"))


@pytest.mark.parametrize("rules", ["cp_lrp", "linear_rules", "attnlrp"])
def test_conservation_on_a_bias_free_model(model, features, direction, rules):
    """Bias-free, every op but the softmax conserves under these rules: convolutions,
    linears (z, ε, γ, z+), the bicubic time stretch, batch norm, LayerNorm with a constant
    σ, identity GELU/ReLU, mean pooling, residual sums. CP-LRP holds attention constant and
    so keeps the total to float precision, with plain (z) linears and with ε/γ/z+ ones.
    AttnLRP's softmax rule Σᵢ xᵢ(Rᵢ − sᵢΣR) ≠ ΣR does not conserve (the window mask's −100
    and the scores' implicit bias absorb relevance), nor do the epsilon, gamma and zplus
    sets, which keep that softmax rule: their ratio is reported, only required finite."""
    params = bias_free(model.params)
    target = direction_target(direction)
    kw = {"rules": LINEAR_RULES} if rules == "linear_rules" else {"method": rules}
    res = js.attribute(model, features=features, params=params, target=target, **kw)
    ratio = np.asarray(res.conservation())
    print(f"{rules}: conservation {ratio}")
    if rules == "attnlrp":
        assert np.isfinite(ratio).all()
    else:  # DESIGN's 1e-4 (was 1e-3, no origin given): measured 1e-7 (CP-LRP) and 3.3e-6
        # (with ε = 1e-6, whose stabiliser keeps ε/(z + ε) of each output's relevance)
        np.testing.assert_allclose(ratio, 1.0, atol=1e-4)


def test_text_similarity_conserves_under_cp_lrp(model, features):
    """Audio–text similarity normalises the audio embedding; under LRP its norm is a
    constant, so on a bias-free copy CP-LRP hands the whole similarity to the input (its
    plain gradient × input would sum to 0: a cosine is scale-invariant)."""
    params = bias_free(model.params)
    audio = np.asarray(model.apply(params, jnp.asarray(features)))
    text = np.random.default_rng(3).standard_normal((3, audio.shape[-1])).astype(np.float32)
    text[1] = audio[0] + 0.5 * text[1] * np.linalg.norm(audio[0]) / np.linalg.norm(text[1])
    target = js.targets.text_similarity(text, index=1)
    res = js.attribute(model, features=features, params=params, target=target, method="cp_lrp")
    assert np.all(np.abs(np.asarray(res.score)) > 0.05), res.score  # built so: measured 0.89
    # DESIGN's 1e-4 (was 1e-3, no origin given): measured 1.2e-7
    np.testing.assert_allclose(np.asarray(res.conservation()), 1.0, atol=1e-4)
    plain = js.attribute(model, features=features, params=params, target=target,
                         method="gradient_x_input")
    # Σ x·∇f = d/dλ f(λx) = 0: bias-free, the patch embedding is linear and the LayerNorm
    # after it removes the input's scale, so this is 0 up to float32 rounding (measured
    # 9e-9 of the score)
    assert np.all(np.abs(np.asarray(plain.relevance.sum(axis=(1, 2, 3)))) < 1e-3 * np.abs(res.score))


# --- agreement with LXT on the transformers tower -------------------------------------------

def lxt_relevance(folders, features, direction, cp: bool):
    """AttnLRP / CP-LRP relevance of transformers' ClapAudioModelWithProjection with LXT's
    rule functions patched into its modules' forwards: identity rule on GELU and ReLU,
    LayerNorm with a constant std (LXT's layer_norm_forward), and LXT's attention wrapper
    on the q, k, v projections (q, k ÷ 4 and v ÷ 2; or q, k detached for CP-LRP)."""
    import types

    import lxt.efficient.patches as patches
    from lxt.efficient.rules import divide_gradient, identity_rule_implicit, stop_gradient

    tower = hf_tower(folders)

    def wrap(module, rule, around=None):
        """``rule`` on the module's output, or ``around(forward, x)`` (LXT's non_linear_forward)."""
        forward = module.forward
        module.forward = (lambda x: around(forward, x)) if around else (lambda x: rule(forward(x)))

    for module in tower.modules():
        if isinstance(module, hf_clap.ClapAudioSelfAttention):
            q_k = stop_gradient if cp else (lambda t: divide_gradient(t, 4))
            wrap(module.query, q_k)
            wrap(module.key, q_k)
            if not cp:
                wrap(module.value, lambda t: divide_gradient(t, 2))
        elif isinstance(module, hf_clap.ClapAudioIntermediate):  # GELUActivation
            wrap(module.intermediate_act_fn, None, identity_rule_implicit)
        elif isinstance(module, hf_clap.ClapProjectionLayer):  # nn.ReLU
            wrap(module.activation, None, identity_rule_implicit)
        elif isinstance(module, torch.nn.LayerNorm):
            module.forward = types.MethodType(patches.layer_norm_forward, module)
    x = torch.from_numpy(features).requires_grad_(True)
    target = tower(input_features=x).audio_embeds @ torch.from_numpy(direction)
    target.sum().backward()
    return (x * x.grad).detach().numpy(), target.detach().numpy()


@pytest.mark.parametrize("method", ["attnlrp", "cp_lrp"])
def test_lrp_matches_lxt_on_the_transformers_tower(folders, model, features, direction, method):
    ref, ref_score = lxt_relevance(folders, features, direction, cp=method == "cp_lrp")
    res = js.attribute(model, features=features, target=direction_target(direction), method=method)
    np.testing.assert_allclose(np.asarray(res.score), ref_score, rtol=1e-4)  # DESIGN's bound
    r = np.asarray(res.relevance)
    print(f"{method} vs LXT: max rel diff {rel(r, ref):.2e}, correlation {corr(r, ref):.8f}")
    # DESIGN's 1e-4 (was 1e-3, no origin given); measured 8e-7
    assert rel(r, ref) <= 1e-4 and corr(r, ref) > 0.9999
    # and the rules matter: plain gradient x input of the same tower is far from it (1.3)
    x = torch.from_numpy(features).requires_grad_(True)
    (hf_tower(folders)(input_features=x).audio_embeds @ torch.from_numpy(direction)).sum().backward()
    assert rel((x * x.grad).detach().numpy(), ref) > 1e-2


# --- captum: integrated gradients --------------------------------------------------------------

def test_integrated_gradients_match_captum_and_are_complete(folders, model, features, direction):
    from captum.attr import IntegratedGradients

    tower, d = hf_tower(folders), torch.from_numpy(direction)
    features = features[:1]
    x = torch.from_numpy(features)
    baseline = torch.full_like(x, float(features.min()))
    def f(t):
        return tower(input_features=t).audio_embeds @ d

    ref, delta = IntegratedGradients(f).attribute(
        x, baselines=baseline, n_steps=32, method="gausslegendre", return_convergence_delta=True)
    ref = ref.detach().numpy()
    with torch.no_grad():
        ref_gap = np.abs(delta.numpy()) / np.abs((f(x) - f(baseline)).numpy())
    res = js.attribute(model, features=features, target=direction_target(direction),
                       method="integrated_gradients")  # defaults: 32 steps, min baseline
    gap = np.asarray(res.extras["completeness_gap"])
    print(f"IG vs captum: max rel diff {rel(res.relevance, ref):.2e}, correlation "
          f"{corr(res.relevance, ref):.8f}, completeness gap {gap}")
    # DESIGN's 1e-4 (was 1e-3, no origin given); measured 5e-7
    assert rel(res.relevance, ref) <= 1e-4
    # (ΣR - Δscore)/|Δscore| is a property of the model's path and the 32 nodes, not of the
    # port (4.5 % on this random tower, 0.06 % on an earlier draw of its weights): it must be
    # the reference's own gap, captum's convergence delta on the same nodes. The relevance
    # agrees to 1e-4 of its largest value above; summed over the features that leaves the
    # gaps within 1e-3 of |Δscore|
    assert np.allclose(np.abs(gap), ref_gap, rtol=0, atol=1e-3), (gap, ref_gap)


# --- rollout: the windowed vector products against dense T x T matrices ----------------------

class DenseSwin:
    """Literal dense matrices of the HF tower's geometry, read from its modules after a
    forward (``window_size`` / ``shift_size`` as HF set them for each grid): a block's
    per-window [W, n, n] matrices placed in a full T x T matrix by HF's own cyclic roll and
    ``window_partition`` of a grid of token indices, and patch merging as a [T/4, T]
    matrix with 1/4 for each of HF's 2x2 neighbours."""

    def __init__(self, encoder):
        self.blocks = []
        for i, stage in enumerate(encoder.layers):
            for j, block in enumerate(stage.blocks):
                self.blocks.append((i, j, block))

    def window_tokens(self, block):
        h, w = block.input_resolution
        grid = torch.arange(h * w).view(1, h, w, 1)
        if block.shift_size > 0:
            grid = torch.roll(grid, shifts=(-block.shift_size, -block.shift_size), dims=(1, 2))
        ws = block.window_size
        return hf_clap.window_partition(grid, ws).reshape(-1, ws * ws).numpy()

    def dense(self, block, windows):
        """``windows [B, W, n, n]`` -> ``[B, T, T]``."""
        tok = self.window_tokens(block)
        t = tok.size
        out = np.zeros((windows.shape[0], t, t))
        for w in range(tok.shape[0]):
            out[:, tok[w][:, None], tok[w][None, :]] = windows[:, w]
        return out

    @staticmethod
    def merge(h, w):
        grid = np.arange(h * w).reshape(h, w)
        parts = [grid[0::2, 0::2], grid[1::2, 0::2], grid[0::2, 1::2], grid[1::2, 1::2]]
        out = np.zeros(((h // 2) * (w // 2), h * w))
        for p in parts:
            out[np.arange(p.size), p.reshape(-1)] = 0.25
        return out


def torch_attention(tower):
    """Make every ClapAudioSelfAttention keep its probabilities, gradients retained (HF's
    output_attentions returns only each stage's last block). Returns the list they go to."""
    maps = []
    for module in tower.modules():
        if isinstance(module, hf_clap.ClapAudioSelfAttention):
            def forward(hidden, mask=None, head_mask=None, output_attentions=False,
                        _forward=module.forward):
                out = _forward(hidden, mask, head_mask, output_attentions=True)
                if out[1].requires_grad:
                    out[1].retain_grad()
                maps.append(out[1])
                return out if output_attentions else out[:1]

            module.forward = forward
    return maps


def roll_dense(swin, maps, batch, step, stop):
    """``R [B, T_stop, T_0]`` through blocks ``0..stop``, forward: R ← step(block, map, R)
    at each block, R ← P R at each patch merge."""
    joint = None
    stage = 0
    for k, ((i, _, block), a) in enumerate(zip(swin.blocks, maps, strict=False)):
        if k > stop:
            break
        h, w = block.input_resolution
        if joint is None:
            joint = np.broadcast_to(np.eye(h * w), (batch, h * w, h * w))
        if i != stage:
            joint = swin.merge(2 * h, 2 * w)[None] @ joint
            stage = i
        joint = step(block, a, joint)
    return joint


def test_rollout_equals_its_dense_definition(folders, model, features):
    """Abnar & Zuidema on the windowed maps, literally: Â = normalise(0.5·mean_h A + 0.5·I)
    per block as a dense T x T matrix, merges as [T/4, T] matrices, rollout = rows · Â_L P ⋯ Â_1.
    A from transformers' tower. The target reads stage 1's block 0, so rollout stops there
    (stage 1 and 2's later blocks cannot change it) and its rows are that grid's tokens."""
    tower = hf_tower(folders)
    maps = torch_attention(tower)
    with torch.no_grad():
        tower(input_features=torch.from_numpy(features))
    swin = DenseSwin(tower.audio_model.audio_encoder)
    b = features.shape[0]
    maps = [a.numpy().astype(np.float64).reshape(b, -1, *a.shape[1:]) for a in maps]

    def step(block, a, joint):
        dense = swin.dense(block, a.mean(2))
        dense = 0.5 * dense + 0.5 * np.eye(dense.shape[-1])[None]
        return (dense / dense.sum(-1, keepdims=True)) @ joint

    joint = roll_dense(swin, maps, b, step, stop=2)  # blocks: 0.0, 0.1, 1.0
    frames = np.arange(0, 256, 3)
    expected = joint[:, frames].mean(1)
    target = js.targets.layer_norm(ENC + "layers.1.blocks.0.hidden_state", frames=frames)
    res = js.attribute(model, features=features, target=target, method="rollout")
    tokens = np.asarray(res.extras["tokens"])
    print(f"rollout vs dense: max rel diff {rel(tokens, expected):.2e}")
    assert tokens.shape == (2, 1024)
    np.testing.assert_allclose(tokens.sum(-1), 1.0, rtol=1e-5)  # row-stochastic all the way
    assert rel(tokens, expected) < 1e-4  # DESIGN's bound; measured 5e-7
    # the token map is laid over the features by the tokens' own geometry
    index = jclap.token_index(model.config, 1024, frontend.CHUNK_FRAMES)
    np.testing.assert_array_equal(np.asarray(res.relevance), tokens[:, index])


def test_gradient_rollout_equals_chefer_on_transformers_attention(folders, model, features,
                                                                   direction):
    """Chefer et al. 2021, literally, with every block's attention probabilities and their
    gradients from torch autograd on transformers' tower: R ← R + E_h[(∇A ⊙ A)⁺]·R per block
    as dense T x T matrices from R = I, R ← P R at each merge; rows = all final tokens."""
    tower = hf_tower(folders)
    maps = torch_attention(tower)
    out = tower(input_features=torch.from_numpy(features)).audio_embeds
    (out @ torch.from_numpy(direction)).sum().backward()
    swin = DenseSwin(tower.audio_model.audio_encoder)
    b = features.shape[0]
    cams = [np.maximum(a.grad.numpy() * a.detach().numpy(), 0).astype(np.float64)
            .reshape(b, -1, *a.shape[1:]).mean(2) for a in maps]

    def step(block, cam, joint):
        return joint + swin.dense(block, cam) @ joint

    joint = roll_dense(swin, cams, b, step, stop=len(cams))
    expected = joint.mean(1)
    res = js.attribute(model, features=features, target=direction_target(direction),
                       method="gradient_rollout")
    tokens = np.asarray(res.extras["tokens"])
    print(f"gradient rollout vs torch: max rel diff {rel(tokens, expected):.2e}, "
          f"correlation {corr(tokens, expected):.8f}")
    assert rel(tokens, expected) < 1e-4  # DESIGN's bound; measured 2e-7


def test_window_geometry_of_the_real_model_is_hfs():
    """clap-htsat-unfused's 12 blocks (64x64 grid, windows of 8, shifts, a last stage of
    one window): jaxspeech's geometry is what HF's roll + window_partition does to a grid
    of token indices, and merges are HF's 2x2 neighbours."""
    from transformers import ClapAudioConfig

    config = js.presets()["clap-htsat-unfused"]  # its geometry at 1/12 of the width
    encoder = hf_clap.ClapAudioEncoder(ClapAudioConfig(patch_embeds_hidden_size=8, hidden_size=64,
                                                       num_attention_heads=[1, 1, 1, 1]))
    swin = DenseSwin(encoder)
    geometry = jclap.attention_geometry(config)
    assert [g.name for g in geometry] == [f"{ENC}layers.{i}.blocks.{j}.attention.attention"
                                          for i, j, _ in swin.blocks]
    for (i, j, block), g in zip(swin.blocks, geometry, strict=True):
        block.set_shift_and_window_size(block.input_resolution)  # what HF's forward does
        np.testing.assert_array_equal(g.windows, swin.window_tokens(block))
        h, w = block.input_resolution
        if j == 0 and i > 0:
            merge = swin.merge(2 * h, 2 * w)
            np.testing.assert_array_equal(np.sort(g.sources, 1),
                                          np.sort(np.argwhere(merge > 0)[:, 1].reshape(-1, 4), 1))
        else:
            assert g.sources is None
    assert geometry[-1].windows.shape == (1, 64)  # 8x8 grid: one window, HF drops the shift


# --- where a token sits over the features ----------------------------------------------------

@pytest.mark.parametrize("fusion", [False, True])
@pytest.mark.parametrize("patch", [4, 8])
def test_token_index_is_hfs_patch_embedding(fusion, patch):
    """Each feature cell's token, read off transformers' own patch embedding: with all-ones
    kernels and zero biases a token is the sum of the pixels it covers, so the gradient of
    Σ_token c_token·token at a cell is c of the token that cell feeds (0 where none). At
    1024 frames (no time stretch) that is token_index exactly, for the clip channel
    (``proj``) and for fusion's crop channels (``mel_conv2d``, captured at the fusion
    block's input); at 1001 frames each frame goes where torch's bicubic stretch puts
    most of its weight."""
    from transformers import ClapAudioConfig

    hf = ClapAudioConfig(patch_size=patch, patch_stride=[patch, patch], enable_fusion=fusion,
                         fusion_type="aff_2d" if fusion else None, depths=[2, 2, 2],
                         patch_embeds_hidden_size=8, num_attention_heads=[1, 1, 1], hidden_size=32)
    encoder = hf_clap.ClapAudioEncoder(hf).eval()
    embed = encoder.patch_embed
    config = jclap.ClapConfig.from_hf_config(hf.to_dict())
    seen = {}
    with torch.no_grad():
        for conv in (embed.proj, getattr(embed, "mel_conv2d", None)):
            if conv is not None:
                conv.weight.fill_(1.0)
                conv.bias.zero_()
    if fusion:
        embed.fusion_model.register_forward_hook(
            lambda mod, args, out: seen.update(clip=args[0], crops=args[1]))
    else:
        embed.proj.register_forward_hook(lambda mod, args, out: seen.update(clip=out))
    channels = 4 if fusion else 1
    x = torch.randn(1, channels, 1024, 64, requires_grad=True)
    img = encoder.reshape_mel2img(x)
    embed(img, torch.tensor([0]) if fusion else None)
    gh, gw = config.grid_size
    for stage in range(3):  # stage s: the 2^s x 2^s merge of the stage-0 tokens
        side_h, side_w = gh >> stage, gw >> stage
        code = torch.arange(1.0, side_h * side_w + 1).view(side_h, side_w)
        code = code.repeat_interleave(2 ** stage, 0).repeat_interleave(2 ** stage, 1)
        total = sum((seen[k][0, 0] * code).sum() for k in seen)  # one channel of the ones-conv
        (grad,) = torch.autograd.grad(total, x, retain_graph=True)
        expect = jclap.token_index(config, side_h * side_w, 1024) + 1  # 0: feeds no token
        np.testing.assert_array_equal(grad[0].numpy(), expect)
        if fusion:
            assert (expect[1:] == 0).any() and (expect[0] > 0).all()  # crop columns cut
    # 1001 frames: the stretched frame each frame gives most weight to (torch bicubic)
    eye = torch.eye(1001).view(1, 1, 1001, 1001)
    stretch = torch.nn.functional.interpolate(eye, (1024, 1001), mode="bicubic", align_corners=True)
    nearest = stretch[0, 0].argmax(0).numpy()
    np.testing.assert_array_equal(jclap.token_index(config, gh * gw, 1001),
                                  jclap.token_index(config, gh * gw, 1024)[:, nearest])


def test_tokens_to_features_refuses_what_is_no_grid(model):
    with pytest.raises(ValueError, match="not one of this CLAP model's stage grids"):
        jclap.tokens_to_features(model.config, "x", jnp.zeros((1, 100)), (1, 1, 1001, 64))
    with pytest.raises(ValueError, match=r"\[batch, 1, frames, 64\]"):
        jclap.tokens_to_features(model.config, "x", jnp.zeros((1, 64)), (1, 4, 1001, 64))


# --- audio-text targets --------------------------------------------------------------------------

def test_text_similarity_with_given_embeddings_and_with_labels(folders, features):
    """The audio-text cosine against ClapModel: given text embeddings, and label strings
    embedded by the checkpoint's own text tower (jaxspeech.clap_text). Gradient x input
    vs torch autograd of the same cosine on ClapModel.get_audio_features."""
    full = folders[0]
    m = js.load(full)  # a ClapModel: L2-normalised embeddings (get_audio_features)
    assert m.config.normalize
    clap = ClapModel.from_pretrained(full).eval()
    labels = ["a dog", "rain on a roof"]
    from_labels = js.clap_text_embeddings(full, labels)
    given = np.random.default_rng(4).standard_normal((2, PROJ)).astype(np.float32)
    index = np.array([1, 0])
    for text in (given, from_labels):
        x = torch.from_numpy(features).requires_grad_(True)
        audio = clap.get_audio_features(input_features=x)
        t = torch.nn.functional.normalize(torch.from_numpy(text), dim=-1)
        cos = (audio * t[torch.from_numpy(index)]).sum(-1)
        cos.sum().backward()
        ref = (x * x.grad).detach().numpy()
        res = js.attribute(m, features=features, target=js.targets.text_similarity(text, index),
                           method="gradient_x_input")
        # cosines ≤ 1: 1e-5 is float32 noise (measured 3e-8)
        np.testing.assert_allclose(np.asarray(res.score), cos.detach().numpy(), atol=1e-5)
        print(f"text similarity: scores {np.asarray(res.score)}, max rel diff "
              f"{rel(res.relevance, ref):.2e}, correlation {corr(res.relevance, ref):.8f}")
        # DESIGN's 1e-4 (was 1e-3, no origin given); measured 6.3e-7
        assert rel(res.relevance, ref) <= 1e-4
    # the labels' scores (the last call) are ClapModel's own audio-text logits, unscaled
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(full)
    with torch.no_grad():
        out = clap(**tok(labels, padding=True, return_tensors="pt"),
                   input_features=torch.from_numpy(features))
    logits = out.logits_per_audio.numpy() / float(clap.logit_scale_a.detach().exp())
    # the same cosines (≤ 1) through ClapModel's logits: float32 noise (measured 3e-8)
    np.testing.assert_allclose(np.asarray(res.score), logits[np.arange(2), index], atol=1e-5)


# --- batching ----------------------------------------------------------------------------------

def test_batch_of_4_equals_4_single_calls(model, direction):
    """Rollout: items never meet in the forward (batch norm from stored statistics, windows
    within an item), so neither in any backward of it; the window products and the rows
    are batched too."""
    method = "rollout"
    x = dB_features(5, 4)
    target = direction_target(direction)
    batched = js.attribute(model, features=x, target=target, method=method)
    for i in range(4):
        single = js.attribute(model, features=x[i:i + 1], target=target, method=method)
        # batch 4 and batch 1 compile to other summation orders: float32 noise, measured
        # 3e-7 of the max (≤ 3 % of these bounds)
        np.testing.assert_allclose(batched.relevance[i], single.relevance[0], rtol=2e-4,
                                   atol=2e-5 * float(np.abs(single.relevance).max()))
        np.testing.assert_allclose(batched.score[i], single.score[0], rtol=1e-5)


# --- Grad-CAM ------------------------------------------------------------------------------------

def test_gradcam_on_a_swin_stage_matches_torch(folders, model, features, direction):
    """Grad-CAM on stage 1's block output [B, 16*16, C] (HF's token layout), against torch
    autograd on the same block of transformers' tower: relu(Σ_c mean_t(∂f/∂A_tc) A_tc)."""
    layer = ENC + "layers.1.blocks.0.hidden_state"
    tower = hf_tower(folders)
    kept = {}

    def keep(module, args, out):
        out[0].retain_grad()
        kept["a"] = out[0]

    tower.audio_model.audio_encoder.layers[1].blocks[0].register_forward_hook(keep)
    out = tower(input_features=torch.from_numpy(features)).audio_embeds
    (out @ torch.from_numpy(direction)).sum().backward()
    a, g = kept["a"].detach().numpy(), kept["a"].grad.numpy()
    expected = np.maximum((a * g.mean(1, keepdims=True)).sum(-1), 0)
    res = js.attribute(model, features=features, target=direction_target(direction),
                       method="gradcam", layer=layer)
    cam = np.asarray(res.extras["tokens"])
    print(f"Grad-CAM vs torch: max rel diff {rel(cam, expected):.2e}")
    # DESIGN's 1e-4 (was 1e-3, no origin given); measured 6e-7
    assert cam.shape == (2, 256) and rel(cam, expected) < 1e-4
    index = jclap.token_index(model.config, 256, frontend.CHUNK_FRAMES)
    np.testing.assert_array_equal(np.asarray(res.relevance), cam[:, index])
    with pytest.raises(ValueError, match="attention.attention"):  # a 5-D map is no token layer
        js.attribute(model, features=features, target=direction_target(direction),
                     method="gradcam", layer=ENC + "layers.1.blocks.0.attention.attention")


# --- frames and the waveform ------------------------------------------------------------------

def hf_repeatpad(n):
    """HF's repeatpad window of a short clip (tiled int(480000 / n) times, then zeros) as
    clip sample numbers, -1 for the zeros."""
    clip = np.tile(np.arange(n), frontend.MAX_SAMPLES // n)
    return np.pad(clip, (0, frontend.MAX_SAMPLES - clip.size), constant_values=-1)


def spread(frames, signal):
    """Each frame's relevance over the 480 signal samples from 480 t on, summed onto the clip
    samples ``signal`` names (-1: none)."""
    per_sample = np.repeat(frames / 480, 480)[:signal.size]
    out = np.zeros(signal.max() + 1)
    keep = signal[:per_sample.size] >= 0
    np.add.at(out, signal[:per_sample.size][keep], per_sample[keep])
    return out


def test_frames_and_waveform_pull_back(model):
    """frames() pools [B, C, T, 64] over channels and mels on the feature time axis. The
    waveform pull-back follows the front end: a 10 s clip is its 1001 hops (what
    Attribution.to_waveform assumes); a 3 s repeatpad clip's repeats fold back onto it; a
    rand_trunc crop of a 14 s clip sits at its offset; a fused 25 s clip's shrunk channel
    goes back through torch's bilinear shrink and its crops to their frame offsets."""
    rng = np.random.default_rng(7)
    rel_ = rng.standard_normal((2, 1, frontend.CHUNK_FRAMES, 64)).astype(np.float32)
    res = js.Attribution(jnp.asarray(rel_), jnp.ones(2), jnp.asarray(rel_), "x", "x", model,
                         wave=np.zeros((2, frontend.MAX_SAMPLES), np.float32))
    frames = rel_.sum(axis=(1, 3))
    # sums of 64 values in float32 (|frame| ≤ 30): measured 3.8e-6; the pull-backs below
    # are linear maps in float32 against float64 sums: DESIGN's 1e-4 (measured ≤ 1.3e-7
    # relative)
    np.testing.assert_allclose(np.asarray(res.frames()), frames, rtol=1e-5, atol=1e-4)
    back = np.asarray(jclap.waveform_relevance(model.config, rel_, frontend.MAX_SAMPLES))
    np.testing.assert_allclose(back, np.asarray(res.to_waveform()), rtol=1e-5, atol=1e-7)

    n = 3 * 48000
    back = np.asarray(jclap.waveform_relevance(model.config, rel_, [n, frontend.MAX_SAMPLES]))
    expect = spread(frames[0], hf_repeatpad(n))
    np.testing.assert_allclose(back[0, :n], expect, rtol=1e-4, atol=1e-6)
    assert not back[0, n:].any()
    kept = frames[0, :900].sum()  # 3 whole repeats; the rest of the window is zeros
    np.testing.assert_allclose(back[0].sum(), kept, rtol=1e-4)

    n, start = 14 * 48000, 123456
    back = np.asarray(jclap.waveform_relevance(model.config, rel_[:1], n, crops=[start]))
    expect = spread(frames[0], start + np.arange(frontend.MAX_SAMPLES))
    np.testing.assert_allclose(back[0, :expect.size], expect, rtol=1e-4, atol=1e-6)
    assert not back[0, expect.size:].any()

    fused = js.presets()["clap-htsat-fused"]
    n = 25 * 48000
    total = frontend.n_frames(n)
    starts = np.array([10, 700, 1400])
    rel4 = rng.standard_normal((1, 4, frontend.CHUNK_FRAMES, 64)).astype(np.float32)
    back = np.asarray(jclap.waveform_relevance(fused, rel4, n, crops=starts[None]))
    shrink = torch.nn.functional.interpolate(torch.eye(total)[None, None], (frontend.CHUNK_FRAMES, total),
                                             mode="bilinear", align_corners=False)[0, 0].numpy()
    per = rel4[0].sum(-1)
    whole = per[0] @ shrink.astype(np.float64)
    for k in range(3):
        whole[starts[k]:starts[k] + frontend.CHUNK_FRAMES] += per[k + 1]
    expect = spread(whole, np.arange(n))
    np.testing.assert_allclose(back[0], expect, rtol=1e-4, atol=1e-5)
