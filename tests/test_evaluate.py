"""jaxspeech.evaluate: perturbation curves and ABPC, MPRT, localisation, the table and the CLI.

The model is a tiny random Whisper encoder (16 mels x 100 frames) and the target a
linear read-out of its embeddings over tokens 10..19, which see input frames 18..40
only (conv1 k3, conv2 k3 stride 2): gradient x input is exactly zero elsewhere, so
the right answers are known.
"""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import soundfile as sf

import jaxspeech as js
from jaxspeech import evaluate as ev
from jaxspeech.attribution import methods as js_methods
from jaxspeech.cli import main

SEEN = np.arange(18, 41)  # input frames the target reads


@pytest.fixture(scope="module")
def small():
    return js.init("whisper-tiny", d_model=32, encoder_layers=2, encoder_attention_heads=2,
                   encoder_ffn_dim=64, max_source_positions=50, n_mels=16, decoder_layers=0)


@pytest.fixture(scope="module")
def x():
    return np.random.default_rng(0).standard_normal((2, 16, 100)).astype(np.float32)


@pytest.fixture(scope="module")
def target():
    direction = np.random.default_rng(1).standard_normal(32).astype(np.float32)
    return js.targets.layer_direction("embeddings", direction, frames=np.arange(10, 20))


@pytest.fixture(scope="module")
def gxi(small, x, target):
    return js.attribute(small, features=x, target=target, method="gradient_x_input")


def constant(model, features, target, params, kwargs):
    return jnp.ones_like(features)


# --- perturbation curves -------------------------------------------------------------------

def literal_step(model, x, relevance, target, k, steps, patch, valid, lerf):
    """Step k of a curve, from the definition, with loops: patches of (bins, frames), only
    patches starting in an item's valid frames ranked, removed features set to 0."""
    b, n_f, n_t = x.shape
    pf, pt = patch
    out = x.copy()
    for i in range(b):
        units = []  # (relevance sum, unit index, [(f, t), ...]) in index order
        for tb in range(-(-n_t // pt)):
            for fb in range(-(-n_f // pf)):
                cells = [(f, t) for t in range(tb * pt, min((tb + 1) * pt, n_t))
                         for f in range(fb * pf, min((fb + 1) * pf, n_f))]
                if tb * pt < valid[i]:
                    units.append((sum(relevance[i, f, t] for f, t in cells), len(units), cells))
        order = sorted(units, key=lambda u: (u[0] if lerf else -u[0], u[1]))
        n_remove = int(np.floor(k * len(units) / steps + 0.5))
        for _, _, cells in order[:n_remove]:
            for f, t in cells:
                if t < valid[i]:
                    out[i, f, t] = 0.0
    y, inter = model.forward(model.params, jnp.asarray(out))
    return np.asarray(target(y, inter))


def test_curves_match_a_literal_implementation(small, x, target, gxi):
    rel = np.asarray(gxi.relevance, np.float64)
    valid, steps, patch = [80, 60], 6, (5, 7)
    c = ev.perturbation_curves(small, x, gxi.relevance, target, unit="patches", patch=patch,
                               steps=steps, baseline=0.0, valid_frames=valid)
    assert c.morf.shape == c.lerf.shape == (2, steps + 1)
    # 4 bands of 5 bins (the last of 1) x ceil(80/7) = 12, ceil(60/7) = 9 patch columns
    np.testing.assert_array_equal(c.units, [4 * 12, 4 * 9])
    for k in (1, 3, 6):
        for lerf, curve in ((False, c.morf), (True, c.lerf)):
            want = literal_step(small, x, rel, target, k, steps, patch, valid, lerf)
            # the same forward on the same inputs in other batches: float32 order only
            # (measured 7e-7 at |score| ≤ 2.5, 15x below)
            np.testing.assert_allclose(curve[:, k], want, rtol=1e-5, atol=1e-6)
    # the unperturbed score from another program: float32 order only. rtol 1e-5 (was 1e-6,
    # 8 ulp: measured 3.6e-7, a 2.8x margin on noise)
    np.testing.assert_allclose(c.morf[:, 0], gxi.score, rtol=1e-5)
    np.testing.assert_allclose(c.lerf[:, 0], gxi.score, rtol=1e-5)
    np.testing.assert_array_equal(c.morf[:, -1], c.lerf[:, -1])
    np.testing.assert_allclose(c.removed[:, 3], [24 / 48, np.floor(3 * 36 / 6 + 0.5) / 36])


def test_abpc_sign_monotonicity_and_non_informative_methods(small, x, target, gxi):
    for unit in ("frames", "patches"):
        c = ev.perturbation_curves(small, x, gxi.relevance, target, unit=unit, steps=10,
                                   baseline=0.0)
        # removing the most relevant units first hurts at once and stays below LeRF
        assert (c.morf[:, 1] < c.morf[:, 0]).all()
        assert (c.morf[:, 1:-1] < c.lerf[:, 1:-1]).all()
        assert (c.abpc > 0.5).all(), c.abpc  # the target's scale is ~2: measured 1.4 and 1.6
        np.testing.assert_allclose(ev.abpc(c), c.lerf_auc - c.morf_auc)
        # AUC: trapezoid over k/S in [0, 1]
        want = np.trapezoid(c.morf, np.linspace(0, 1, 11), axis=1)
        # 11 same-sign terms: a float32 sum is within 10·2⁻²⁴ = 6e-7 of them in any order
        # (Higham's bound); measured 1.4e-7
        np.testing.assert_allclose(c.morf_auc, want, rtol=1e-6)
        # the opposite ranking swaps the curves; a constant ranks nothing
        neg = ev.perturbation_curves(small, x, -gxi.relevance, target, unit=unit, steps=10,
                                     baseline=0.0)
        np.testing.assert_array_equal(neg.morf, c.lerf)
        np.testing.assert_array_equal(neg.abpc, -c.abpc)
        flat = ev.perturbation_curves(small, x, jnp.ones_like(gxi.relevance), target, unit=unit,
                                      steps=10, baseline=0.0)
        np.testing.assert_array_equal(flat.abpc, 0.0)


def test_default_baseline_is_the_item_minimum(small, x, target, gxi):
    c = ev.perturbation_curves(small, x, gxi.relevance, target, steps=4)
    floor = np.broadcast_to(x.min(axis=(1, 2), keepdims=True), x.shape)
    # as above, another program: float32 order only (measured equal)
    np.testing.assert_allclose(c.morf[:, -1], target(*small.forward(small.params, floor)),
                               rtol=1e-5)


# --- localisation ----------------------------------------------------------------------------

def test_localisation_against_a_literal_implementation(gxi):
    rel = np.asarray(gxi.relevance)
    mask = np.zeros(rel.shape, bool)
    mask[0, :8, 18:30] = True
    mask[1, :, 30:46] = True
    mass, hit = [], []
    for i in range(rel.shape[0]):
        inside = total = 0.0
        best, where = -np.inf, None
        for f in range(rel.shape[1]):
            for t in range(rel.shape[2]):
                v = float(rel[i, f, t])
                total += max(v, 0.0)
                inside += max(v, 0.0) if mask[i, f, t] else 0.0
                if v > best:
                    best, where = v, (f, t)
        mass.append(inside / total)
        hit.append(bool(mask[i][where]))
    # float32 sums of ≤ 1600 positive terms vs float64 ones: measured 1.2e-7 relative
    np.testing.assert_allclose(ev.mass_in_mask(rel, mask), mass, rtol=1e-5)
    np.testing.assert_array_equal(ev.pointing_game(rel, mask), hit)
    assert 0.05 < min(mass) and max(mass) < 0.95  # a partial mask: a real test of the ratio

    # the frames the target reads hold all of the relevance; a [B, frames] mask works too
    seen = np.zeros((2, 100), bool)
    seen[:, SEEN] = True
    np.testing.assert_array_equal(ev.mass_in_mask(rel, seen), [1.0, 1.0])
    np.testing.assert_array_equal(ev.pointing_game(rel, seen), [True, True])
    np.testing.assert_array_equal(ev.mass_in_mask(rel, ~seen), [0.0, 0.0])
    with pytest.raises(ValueError, match="fits neither"):
        ev.mass_in_mask(rel, seen[:, :50])


# --- rank correlation, SSIM, randomisation ------------------------------------------------

def test_spearman_and_ssim_against_literal_implementations(rng):
    a = rng.integers(0, 5, 40).astype(float)  # ties
    b = a + rng.standard_normal(40)

    def ranks(v):
        return np.array([sum(w < u for w in v) + (sum(w == u for w in v) - 1) / 2 + 1 for u in v])

    ra, rb = ranks(a), ranks(b)
    want = np.corrcoef(ra, rb)[0, 1]
    # float64 throughout: 1e-12 is ~5000 ulp of a correlation (measured 1 ulp); the same
    # for the SSIM below
    assert ev.spearman(a, b) == pytest.approx(want, abs=1e-12)
    assert ev.spearman(a, -a) == pytest.approx(-1.0)
    assert ev.spearman(np.ones(5), 2 * np.ones(5)) == 1.0
    assert ev.spearman(np.ones(5), np.arange(5)) == 0.0

    p, q = rng.random((9, 12)), rng.random((9, 12))
    w, n = 7, 49

    def unit(m):
        return (m - m.min()) / (m.max() - m.min())

    p1, q1 = unit(p), unit(q)
    vals = []
    for i in range(9 - w + 1):
        for j in range(12 - w + 1):
            u, v = p1[i:i + w, j:j + w].ravel(), q1[i:i + w, j:j + w].ravel()
            mu, mv = u.mean(), v.mean()
            vu, vv = u.var(ddof=1), v.var(ddof=1)
            cov = ((u - mu) * (v - mv)).sum() / (n - 1)
            vals.append((2 * mu * mv + 1e-4) * (2 * cov + 9e-4)
                        / ((mu ** 2 + mv ** 2 + 1e-4) * (vu + vv + 9e-4)))
    assert ev.ssim(p, q) == pytest.approx(np.mean(vals), abs=1e-10)  # float64 (measured 2e-16)
    assert ev.ssim(p, p) == pytest.approx(1.0)


def test_randomize_replaces_only_the_group(small):
    params = small.params
    new = ev.randomize(params, "layers.1", 0)
    for name in ("fc1", "fc2"):
        before, after = np.asarray(params["layers.1"][name]["kernel"]), \
            np.asarray(new["layers.1"][name]["kernel"])
        assert not np.allclose(before, after)
        rms_b, rms_a = np.sqrt((before ** 2).mean()), np.sqrt((after ** 2).mean())
        # rms·N(0, 1) draws: the sample RMS of 2048 values has a relative σ of 1/√4096 =
        # 1.6 %; 0.2 is 12σ (measured 3.3 %)
        assert rms_a == pytest.approx(rms_b, rel=0.2)
    # LayerNorm scales are all ones: their random values stay >= 0
    assert (np.asarray(new["layers.1"]["final_layer_norm"]["scale"]) >= 0).all()
    assert not np.allclose(new["layers.1"]["final_layer_norm"]["scale"], 1.0)
    for group in ("layers.0", "conv1", "layer_norm"):
        jax.tree.map(np.testing.assert_array_equal, params[group], new[group])
    jax.tree.map(np.testing.assert_array_equal, new, ev.randomize(params, "layers.1", 0))
    other = ev.randomize(params, "layers.1", jax.random.key(1))
    assert not np.allclose(other["layers.1"]["fc1"]["kernel"], new["layers.1"]["fc1"]["kernel"])
    with pytest.raises(ValueError, match="matches no parameter"):
        ev.randomize(params, "layers.7", 0)


# --- MPRT ----------------------------------------------------------------------------------

def test_parameter_groups_run_from_the_output_back(small):
    assert ev.parameter_groups(small) == ["layer_norm", "layers.1", "layers.0", "embed_positions",
                                          "conv2", "conv1"]


def test_mprt_cascade(small, x, target):
    res = ev.mprt(small, x, target, "gradient_x_input", ssim=True)
    assert res.groups == ("layer_norm", "layers.1", "layers.0", "embed_positions", "conv2",
                          "conv1")
    assert res.rho.shape == res.ssim.shape == (6, 2)
    # The target reads the embeddings linearly: the layers above it and the (additive)
    # positions cannot change its gradient; the convolutions below it do.
    np.testing.assert_array_equal(res.rho[:4], 1.0)
    np.testing.assert_allclose(res.ssim[:4], 1.0, atol=1e-9)  # identical maps, float64 SSIM
    # With a convolution randomised the maps decorrelate: measured |ρ| ≤ 0.13, SSIM ≤ 0.77,
    # final ρ 0.05. Properties of these seeded weights, not float noise (rounding moves a
    # rank correlation over 1600 cells by ~1e-6), so the same on any CPU.
    assert (np.abs(res.rho[4:]) < 0.3).all(), res.rho
    assert (res.ssim[4:] < 0.9).all()
    assert res.passed and res.final_rho < 0.3

    flat = ev.mprt(small, x, target, constant)
    np.testing.assert_array_equal(flat.rho, 1.0)
    assert not flat.passed

    mine = ev.mprt(small, x, target, "gradient_x_input", groups=[["conv1", "conv2"]])
    assert mine.groups == ("conv1+conv2",) and mine.passed

    whole = ev.mprt(small, x, js.targets.output_norm(), "gradient_x_input")
    # randomising the last LayerNorm already changes the output norm's map (measured ρ 0.33)
    assert whole.mean_rho[0] < 0.9 and whole.mean_rho[-1] < whole.mean_rho[0]


# --- evaluate, the table ---------------------------------------------------------------------

def test_evaluate_runs_methods_side_by_side(small, x, target, gxi):
    mask = np.zeros((2, 100), bool)
    mask[:, SEEN] = True
    table = ev.evaluate(small, target=target, features=x,
                        methods={"gradient_x_input": "gradient_x_input", "flat": constant,
                                 "gradcam": "gradcam"},
                        masks=mask, steps=6, patch=(5, 7), baseline=0.0)
    g, flat, cam = (table.row(m) for m in ("gradient_x_input", "flat", "gradcam"))
    frames = ev.perturbation_curves(small, x, gxi.relevance, target, steps=6, baseline=0.0)
    # the same curves averaged over 2 items: float32 rounding (measured 4e-8 relative)
    assert g.abpc_frames == pytest.approx(float(frames.abpc.mean()), rel=1e-6)
    assert g.morf_auc == pytest.approx(float(frames.morf_auc.mean()), rel=1e-6)
    assert g.abpc_frames > 0 and g.abpc_patches > 0
    assert g.mass_in_mask == 1.0 and g.pointing_game == 1.0
    assert g.mprt_pass is True and g.mprt_rho < 0.3  # as in test_mprt_cascade (0.05)
    assert flat.abpc_frames == 0.0 and flat.mprt_pass is False and flat.mprt_rho == 1.0
    assert flat.mass_in_mask == pytest.approx(23 / 100)
    # Grad-CAM without a layer cannot run: the row says why, the others are unaffected
    assert cam.error and "layer" in cam.error and cam.abpc_frames is None
    assert "gradcam" not in table.curves and "gradcam" not in table.mprt
    text, md = table.text(), table.markdown()
    for header in ("ABPC frames", "ABPC patches", "MoRF AUC", "LeRF AUC", "mass in mask",
                   "pointing game", "MPRT final ρ", "MPRT"):
        assert header in text and header in md
    assert "cannot run: ValueError" in md and "FAIL" in md and "pass" in md
    assert md.splitlines()[0].count("|") == md.splitlines()[3].count("|")
    json.dumps(table.to_dict())


# --- ECAPA: fixed decisions, a method that does not apply ---------------------------------

def test_ecapa_predicted_class_is_frozen_and_rollout_is_reported():
    m = js.init("ecapa-voxceleb", channels=(8, 8, 24), kernel_sizes=(5, 3, 1), dilations=(1, 2, 1),
                groups=(1, 1, 1), attention_channels=4, res2net_scale=2, se_channels=4,
                lin_neurons=8, out_neurons=5, n_mels=20)
    x = np.random.default_rng(3).standard_normal((3, 30, 20)).astype(np.float32)
    layer = next(n for n in js_methods.layer_names(m.config, x) if n.endswith("logits"))
    predicted = js.targets.predicted_class(layer)
    fixed = ev.fixed_target(m, x, predicted)
    assert fixed.name == "class_logit" and fixed.layer == layer
    y, inter = m.forward(m.params, x)
    np.testing.assert_array_equal(fixed.args["index"], np.argmax(inter[layer], -1))
    np.testing.assert_array_equal(fixed(y, inter), np.max(inter[layer], -1))
    # a different input keeps the class chosen on x
    y2, inter2 = m.forward(m.params, x[::-1])
    np.testing.assert_array_equal(fixed(y2, inter2),
                                  np.take_along_axis(inter2[layer], fixed.args["index"][:, None],
                                                     1)[:, 0])

    table = ev.evaluate(m, features=x, target=js.targets.output_norm(), methods=["rollout"],
                        mprt=False)
    row = table.row("rollout")
    assert "attention" in row.error and row.abpc_frames is None and table.curves == {}
    assert "cannot run" in table.text()


# --- the CLI ------------------------------------------------------------------------------

def test_cli_prints_table_writes_pngs_and_reports_unsupported(tmp_path, capsys):
    m = js.init("whisper-tiny", d_model=16, encoder_layers=1, encoder_attention_heads=2,
                encoder_ffn_dim=32, decoder_layers=0)
    ckpt = str(m.save(tmp_path / "ckpt"))
    rng = np.random.default_rng(4)
    files = []
    for name, seconds in (("a.wav", 0.5), ("b.wav", 0.3)):
        path = tmp_path / name
        sf.write(path, 0.1 * rng.standard_normal(int(16000 * seconds)), 16000)
        files.append(str(path))
    masks = np.zeros((2, 3000), bool)
    masks[:, 10:20] = True
    np.savez(tmp_path / "masks.npz", masks=masks)
    out = tmp_path / "ev"
    rc = main(["evaluate", ckpt, *files, "--methods", "gradient_x_input,gradcam", "--target",
              "output-norm", "--steps", "4", "--patch", "16x5", "--masks",
              str(tmp_path / "masks.npz"), "--out", str(out)])
    printed = capsys.readouterr().out
    assert rc == 0
    assert "ABPC frames" in printed and "gradient_x_input" in printed
    line = next(line for line in printed.splitlines() if line.startswith("gradcam"))
    assert "cannot run" in line and "layer" in line
    for png in ("curves_frames.png", "curves_patches.png", "mprt.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    result = json.loads((out / "results.json").read_text())
    # Whisper pads to 30 s: valid frames = samples // 160 + 1
    assert result["info"]["valid_frames"] == [51, 31]
    row = next(r for r in result["rows"] if r["method"] == "gradient_x_input")
    assert 0.0 <= row["mass_in_mask"] <= 1.0 and row["mprt_rho"] is not None
    assert result["mprt"]["gradient_x_input"]["groups"] == ["layer_norm", "layers.0",
                                                           "embed_positions", "conv2", "conv1"]
    assert "| gradcam |" in (out / "table.md").read_text()

    # the shipped model, explained for its own decision (the head's predicted class)
    assert main(["evaluate", "default", files[0], "--methods", "gradient_x_input", "--no-mprt",
                 "--steps", "2", "--out", str(out / "default")]) == 0
    assert "gradient_x_input" in capsys.readouterr().out
