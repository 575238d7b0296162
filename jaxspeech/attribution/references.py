"""PyTorch reference attributions for ECAPA-TDNN: zennit LRP and captum, on SpeechBrain's modules.

These are the independent implementations that jaxspeech's ECAPA attributions are
checked against (``tests/test_attribution_ecapa.py``) and timed against
(``benchmarks/attribution_ecapa.py``). torch, speechbrain, zennit and captum are
imported inside the functions (the ``reference`` extra).

    emb, clf = speechbrain_ecapa(folder)
    rel, score = zennit_ecapa_relevance(folder, features, None, 3, rule="gamma", gamma=0.25)
    cam = captum_gradcam(folder, features, "embedding_model.mfa.hidden_state", 3)
    ig = captum_integrated_gradients(folder, features, 3, baseline)

**zennit and the rule sets.** zennit propagates relevance itself through the
backward pass (each hooked layer returns its input's relevance), jaxspeech the
cotangent ``relevance / activation`` (``R = x * grad``). An op zennit leaves unhooked
therefore passes relevance by its plain gradient, which is right only for routing
(copy, concatenate, split, reflect padding, transpose: the relevances of the copies
add up, as they do under ``x * grad``). SpeechBrain's ECAPA also adds, multiplies,
sums over time and normalises; :class:`EcapaForZennit` runs the same weights with
each such op as its own module, so that the composite of :func:`ecapa_composite`
can give it the rule that jaxspeech's rule sets (:mod:`jaxspeech.lrp`) give it:

SpeechBrain op -> module here -> zennit rule (jaxspeech op):

- ``nn.Conv1d``; the classifier as a bias-free ``Linear`` of its normalised weight
  -> ``Epsilon`` / ``Gamma`` / ``ZPlus`` (``lrp.linear``)
- ``nn.BatchNorm1d`` (inference) -> ``Epsilon`` with the exact (ε = 0) stabiliser (plain
  gradient of the per-channel affine map: the z-rule, its shift absorbing relevance)
- ``ReLU``, ``Tanh``, ``sqrt`` of the variance (:class:`Sqrt`) -> ``Pass`` (identity rule)
- SE gate ``s * x`` -> :class:`ConstantGate`, ``s`` computed without gradient -> ``Pass``
  (``lrp.gate``, gate constant)
- Res2Net ``x_i + y_{i-1}``, residual ``x + shortcut`` -> ``zennit.layer.Sum`` -> ``Norm``
  exact (plain gradient of ``+``)
- ``x - mean`` -> :class:`Difference` -> ``Norm`` exact (plain gradient of ``-``)
- time mean with the constant mask weights -> :class:`WeightedSum` -> ``Norm`` exact
  (plain gradient: a linear map)
- attention · x, attention · (x - mean)², (x - mean)² -> :class:`Product` then ``Sum`` over
  time -> :class:`UniformProduct` (each factor half) and ``Norm`` exact (``lrp.bilinear``,
  uniform)
- softmax over time -> :class:`Softmax` -> ``Norm`` exact, i.e. ``x ⊙ (R - s ΣR)`` (the
  softmax's own gradient: AttnLRP's rule)
- the classifier's ``F.normalize`` -> :class:`Normalize` -> ``Pass`` (``lrp.norm_std``:
  the norm is a constant)

The exact stabiliser (``t`` where ``t != 0``, else 1) reproduces ``x * grad``, which
has no ε; where ``t == 0`` the incoming relevance is 0 too. Only the rule sets whose
non-linear-layer fields are AttnLRP's (``epsilon``, ``gamma``, ``zplus``) are built.
Items are explained at full length; padded items (``lengths < 1``) are run alone on
their valid frames (SpeechBrain's batched forward lets the padding into short items,
see :mod:`jaxspeech.models.ecapa`), and their padded frames get zero relevance.
"""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np

__all__ = ["speechbrain_ecapa", "EcapaForZennit", "ecapa_composite", "zennit_relevance",
           "zennit_ecapa_relevance", "captum_gradcam", "captum_integrated_gradients",
           "torch_layer", "valid_frames"]

RULES = ("epsilon", "gamma", "zplus")


def speechbrain_ecapa(folder):
    """``(ECAPA_TDNN, Classifier or None)`` of a SpeechBrain ECAPA folder, as SpeechBrain
    builds them (HyperPyYAML) with the folder's checkpoints loaded, in eval mode."""
    import torch
    from hyperpyyaml import load_hyperpyyaml

    from jaxspeech.convert import ecapa as convert

    folder = Path(folder)
    # the folder stands in for a hub id in pretrained_path, so nothing is ever fetched
    overrides = {"pretrained_path": str(folder)} \
        if "pretrained_path" in convert.read_hyperparams(folder / convert.HYPERPARAMS) else None
    with open(folder / convert.HYPERPARAMS) as f:
        hp = load_hyperpyyaml(f, overrides=overrides)
    emb = hp["embedding_model"]
    emb.load_state_dict(torch.load(folder / convert.EMBEDDING_CKPT, map_location="cpu",
                                   weights_only=True), strict=True)
    clf = None
    if (folder / convert.CLASSIFIER_CKPT).is_file() and "classifier" in hp:
        clf = hp["classifier"]
        clf.load_state_dict(torch.load(folder / convert.CLASSIFIER_CKPT, map_location="cpu",
                                       weights_only=True), strict=True)
        clf.eval()
    return emb.eval(), clf


def _exact(t):
    """zennit stabiliser for ε = 0: divide by ``t`` itself (by 1 where ``t == 0``)."""
    import torch

    return torch.where(t == 0, torch.ones_like(t), t)


@functools.cache
def _modules():
    """The helper module classes and the uniform product rule, made once (torch and zennit
    are imported lazily; the composite matches modules by these classes)."""
    import torch
    import torch.nn.functional as F
    from zennit.core import BasicHook, Stabilizer

    class ConstantGate(torch.nn.Module):
        """``x [B, C, T] * scale [B, C, 1]``, ``scale`` set (without gradient) before the call."""

        scale: torch.Tensor | None = None

        def forward(self, x):
            return x * self.scale

    class WeightedSum(torch.nn.Module):
        """``sum_t weights[t] x[..., t]`` with constant ``weights [B, 1, T]`` set before the call."""

        weights: torch.Tensor | None = None

        def forward(self, x):
            return (self.weights * x).sum(2)

    class Difference(torch.nn.Module):
        """``u [..., 2] -> u[..., 0] - u[..., 1]``."""

        def forward(self, u):
            return u[..., 0] - u[..., 1]

    class Product(torch.nn.Module):
        """``u [..., 2] -> u[..., 0] * u[..., 1]`` (a product of two activations)."""

        def forward(self, u):
            return u[..., 0] * u[..., 1]

    class Softmax(torch.nn.Module):
        def __init__(self, dim):
            super().__init__()
            self.dim = dim

        def forward(self, x):
            return F.softmax(x, dim=self.dim)

    class Sqrt(torch.nn.Module):
        def forward(self, x):
            return torch.sqrt(x)

    class Normalize(torch.nn.Module):
        """``F.normalize`` over the last axis (SpeechBrain's ``Classifier``)."""

        def forward(self, x):
            return F.normalize(x)

    class UniformProduct(BasicHook):
        """Uniform rule for a product of two activations (AttnLRP; LXT ``divide_gradient``):
        each factor gets half of the product's relevance. On :class:`Product`'s stacked
        input: ``R_u = u * d(u0 u1)/du * R / (u0 u1) / 2``."""

        def __init__(self, stabilizer=_exact):
            stabilizer_fn = Stabilizer.ensure(stabilizer)
            super().__init__(
                input_modifiers=[lambda input: input],
                param_modifiers=[lambda param, _: param],
                output_modifiers=[lambda output: output],
                gradient_mapper=lambda out_grad, outputs: out_grad / stabilizer_fn(outputs[0]),
                reducer=lambda inputs, gradients: inputs[0] * gradients[0] / 2,
            )

    return dict(ConstantGate=ConstantGate, WeightedSum=WeightedSum, Difference=Difference,
                Product=Product, Softmax=Softmax, Sqrt=Sqrt, Normalize=Normalize,
                UniformProduct=UniformProduct)


def EcapaForZennit(embedding_model, classifier=None):  # a factory: torch is imported lazily
    """SpeechBrain's ``ECAPA_TDNN`` (+ ``Classifier``) with the same weights, every op that
    carries an LRP rule as its own module (the table above); ``features [B, T, n_mels]`` ->
    logits ``[B, out_neurons]`` (embedding ``[B, lin_neurons]`` without a classifier).

    Its forward equals SpeechBrain's at full length (no ``lengths``); convolutions,
    BatchNorms, activations and dropout are SpeechBrain's own modules, shared, not copied.
    """
    import torch
    import torch.nn.functional as F
    from zennit.layer import Sum

    mods = _modules()

    class _Statistics(torch.nn.Module):
        """Weighted mean and std over time of ``x [B, C, T]``, SpeechBrain's
        ``_compute_statistics``. ``constant``: weights are the fixed mask average (linear),
        else the attention (products of activations)."""

        def __init__(self, constant: bool, eps: float):
            super().__init__()
            self.constant, self.eps = constant, eps
            self.diff, self.square, self.sqrt = mods["Difference"](), mods["Product"](), mods["Sqrt"]()
            if constant:
                self.mean_sum, self.var_sum = mods["WeightedSum"](), mods["WeightedSum"]()
            else:
                self.mean_prod, self.var_prod = mods["Product"](), mods["Product"]()
                self.mean_sum, self.var_sum = Sum(dim=2), Sum(dim=2)

        def _wsum(self, prod, total, w, v):
            if self.constant:
                total.weights = w
                return total(v)
            return total(prod(torch.stack([w, v], -1)))

        def forward(self, x, w):
            mean = self._wsum(getattr(self, "mean_prod", None), self.mean_sum, w, x)
            centred = self.diff(torch.stack([x, mean.unsqueeze(2).expand_as(x)], -1))
            sq = self.square(torch.stack([centred, centred], -1))
            var = self._wsum(getattr(self, "var_prod", None), self.var_sum, w, sq)
            return mean, self.sqrt(var.clamp(self.eps))

    class _EcapaForZennit(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.embedding_model = embedding_model
            self.res2net_adds = torch.nn.ModuleList()
            self.residual_adds = torch.nn.ModuleList()
            self.gates = torch.nn.ModuleList()
            for block in embedding_model.blocks[1:]:
                self.res2net_adds.append(torch.nn.ModuleList(
                    Sum() for _ in range(block.res2net_block.scale - 2)))
                self.residual_adds.append(Sum())
                self.gates.append(mods["ConstantGate"]())
            asp = embedding_model.asp
            self.context = _Statistics(True, asp.eps) if asp.global_context else None
            self.softmax = mods["Softmax"](dim=2)
            self.pooling = _Statistics(False, asp.eps)
            self.classifier = None
            if classifier is not None:
                if len(classifier.blocks):
                    raise ValueError("Classifier with lin_blocks > 0 is not supported")
                w = F.normalize(classifier.weight.detach())
                self.classifier = torch.nn.Linear(w.shape[1], w.shape[0], bias=False)
                with torch.no_grad():
                    self.classifier.weight.copy_(w)
                self.normalize = mods["Normalize"]()

        def _res2net(self, block, adds, x):
            ys = []
            for i, xi in enumerate(torch.chunk(x, block.scale, dim=1)):
                if i == 0:
                    y = xi
                elif i == 1:
                    y = block.blocks[0](xi)
                else:
                    y = block.blocks[i - 1](adds[i - 2](torch.stack([xi, y], -1)))
                ys.append(y)
            return torch.cat(ys, dim=1)

        def _se_res2net(self, i, block, x):
            residual = x if block.shortcut is None else block.shortcut(x)
            x = block.tdnn1(x)
            x = self._res2net(block.res2net_block, self.res2net_adds[i], x)
            x = block.tdnn2(x)
            se = block.se_block
            with torch.no_grad():  # the gate is a constant (lrp.gate)
                s = torch.sigmoid(se.conv2(torch.relu(se.conv1(x.mean(dim=2, keepdim=True)))))
            self.gates[i].scale = s
            x = self.gates[i](x)
            return self.residual_adds[i](torch.stack([x, residual], -1))

        def _asp(self, x):
            asp = self.embedding_model.asp
            length = x.shape[-1]
            if asp.global_context:
                w = torch.full((1, 1, length), 1.0 / length, dtype=x.dtype)
                mean, std = self.context(x, w)
                attn = torch.cat([x, mean.unsqueeze(2).repeat(1, 1, length),
                                  std.unsqueeze(2).repeat(1, 1, length)], dim=1)
            else:
                attn = x
            attn = self.softmax(asp.conv(asp.tanh(asp.tdnn(attn))))
            mean, std = self.pooling(x, attn)
            return torch.cat((mean, std), dim=1).unsqueeze(2)

        def forward(self, features):
            m = self.embedding_model
            x = features.transpose(1, 2)
            xl = []
            for i, layer in enumerate(m.blocks):
                x = layer(x) if i == 0 else self._se_res2net(i - 1, layer, x)
                xl.append(x)
            x = m.mfa(torch.cat(xl[1:], dim=1))
            x = m.fc(m.asp_bn(self._asp(x)))[:, :, 0]  # [B, lin_neurons]
            if self.classifier is None:
                return x
            return self.classifier(self.normalize(x))

    return _EcapaForZennit().eval()


def ecapa_composite(rule: str = "epsilon", epsilon: float = 1e-6, gamma: float = 0.25):
    """The zennit composite for :class:`EcapaForZennit` that does what jaxspeech's rule set
    ``rule`` (``"epsilon"``, ``"gamma"``, ``"zplus"``) does: zennit's ``Epsilon`` / ``Gamma``
    / ``ZPlus`` on every convolution and linear layer (stabiliser ``epsilon``), the rules of
    the table above everywhere else."""
    import torch
    from zennit.composites import LayerMapComposite
    from zennit.layer import Sum
    from zennit.rules import Epsilon, Gamma, Norm, Pass, ZPlus

    if rule not in RULES:
        raise ValueError(f"rule {rule!r}: expected one of {RULES}")
    mods = _modules()
    linear = {"epsilon": lambda: Epsilon(epsilon=epsilon),
              "gamma": lambda: Gamma(gamma=gamma, stabilizer=epsilon),
              "zplus": lambda: ZPlus(stabilizer=epsilon)}[rule]()
    return LayerMapComposite([
        ((torch.nn.Conv1d, torch.nn.Linear), linear),
        ((torch.nn.BatchNorm1d,), Epsilon(epsilon=_exact)),
        ((torch.nn.ReLU, torch.nn.Tanh, mods["Sqrt"], mods["ConstantGate"], mods["Normalize"]),
         Pass()),
        ((Sum, mods["WeightedSum"], mods["Difference"], mods["Softmax"]), Norm(stabilizer=_exact)),
        ((mods["Product"],), mods["UniformProduct"]()),
    ])


def zennit_relevance(model, composite, features, target_index):
    """``(relevance [B, T, n_mels], score [B])`` torch tensors: zennit LRP of ``model``
    (:class:`EcapaForZennit`) on full-length ``features [B, T, n_mels]``, for logit
    ``target_index`` (scalar or ``[B]``). The output relevance is the logit itself at
    the target (one-hot times the output), so relevance sums to the logit where the
    rules conserve, as jaxspeech's ``x * grad`` does."""
    import torch

    x = torch.as_tensor(np.array(features, np.float32) if isinstance(features, np.ndarray)
                        else features, dtype=torch.float32).clone().requires_grad_(True)
    with composite.context(model) as modified:
        out = modified(x)
        index = torch.as_tensor(np.broadcast_to(np.asarray(target_index), (x.shape[0],)).copy())
        onehot = torch.nn.functional.one_hot(index.long(), out.shape[1]).to(out.dtype)
        (grad,) = torch.autograd.grad(out, x, grad_outputs=onehot * out)
    score = (out * onehot).sum(1)
    return grad.detach(), score.detach()


def valid_frames(lengths, batch: int, frames: int) -> np.ndarray:
    """``[B]`` frame counts of relative ``lengths`` (SpeechBrain's ``length_to_mask``)."""
    rel = np.ones(batch, np.float32) if lengths is None else np.asarray(lengths, np.float32)
    return (np.arange(frames, dtype=np.float32)[None] < (rel * np.float32(frames))[:, None]).sum(1)


def zennit_ecapa_relevance(folder, features, lengths=None, target_index=0, rule: str = "epsilon",
                           epsilon: float = 1e-6, gamma: float = 0.25):
    """zennit LRP of a SpeechBrain ECAPA folder (with ``classifier.ckpt``) for logit
    ``target_index``: ``(relevance np [B, T, n_mels], score np [B])``.

    ``features [B, T, n_mels]`` (numpy or torch), relative ``lengths [B]`` or ``None``;
    items shorter than ``T`` are explained alone on their valid frames."""
    emb, clf = speechbrain_ecapa(folder)
    if clf is None:
        raise ValueError(f"{folder} has no classifier.ckpt: a class logit needs the classifier")
    model = EcapaForZennit(emb, clf)
    composite = ecapa_composite(rule, epsilon, gamma)
    feats = np.asarray(features, np.float32)
    b, t, _ = feats.shape
    index = np.broadcast_to(np.asarray(target_index), (b,))
    n = valid_frames(lengths, b, t)
    if np.all(n == t):
        rel, score = zennit_relevance(model, composite, feats, index)
        return rel.numpy(), score.numpy()
    rel = np.zeros_like(feats)
    score = np.zeros(b, np.float32)
    for i in range(b):
        r, s = zennit_relevance(model, composite, feats[i:i + 1, : n[i]], index[i:i + 1])
        rel[i, : n[i]], score[i] = r[0].numpy(), s[0].numpy()
    return rel, score


# --- captum ---------------------------------------------------------------------------

def torch_layer(embedding_model, layer: str):
    """jaxspeech layer name -> SpeechBrain module whose output it is:
    ``"embedding_model.blocks.1.hidden_state"`` -> ``embedding_model.blocks[1]``."""
    prefix, suffix = "embedding_model.", ".hidden_state"
    if not (layer.startswith(prefix) and layer.endswith(suffix)):
        raise ValueError(f"{layer!r} is not an ECAPA block output "
                         "('embedding_model.<block>.hidden_state')")
    return embedding_model.get_submodule(layer[len(prefix):-len(suffix)])


def _logits_fn(emb, clf):
    def forward(x):
        return clf(emb(x))[:, 0, :]

    return forward


def captum_gradcam(folder, features, layer: str, target_index) -> np.ndarray:
    """captum ``LayerGradCam`` (ReLU applied, as Selvaraju et al.) of logit ``target_index`` at
    jaxspeech layer ``layer`` of the SpeechBrain model: ``[B, T]`` (captum's layout is
    ``[B, C, T]`` -> ``[B, 1, T]`` after its channel sum)."""
    import torch
    from captum.attr import LayerGradCam

    emb, clf = speechbrain_ecapa(folder)
    x = torch.from_numpy(np.array(features, np.float32))
    cam = LayerGradCam(_logits_fn(emb, clf), torch_layer(emb, layer)).attribute(
        x, target=_target(target_index, x.shape[0]), relu_attributions=True)
    return cam[:, 0, :].detach().numpy()


def captum_integrated_gradients(folder, features, target_index, baseline, n_steps: int = 32,
                                method: str = "gausslegendre") -> np.ndarray:
    """captum ``IntegratedGradients`` of logit ``target_index`` on the SpeechBrain model:
    ``[B, T, n_mels]`` from ``baseline`` (same shape) to ``features``."""
    import torch
    from captum.attr import IntegratedGradients

    emb, clf = speechbrain_ecapa(folder)
    x = torch.from_numpy(np.array(features, np.float32))  # writable copies for torch
    base = torch.from_numpy(np.array(baseline, np.float32))
    ig = IntegratedGradients(_logits_fn(emb, clf)).attribute(
        x, baselines=base, target=_target(target_index, x.shape[0]), n_steps=n_steps,
        method=method)
    return ig.detach().numpy()


def _target(index, batch: int):
    index = np.asarray(index)
    return int(index) if index.ndim == 0 else [int(i) for i in index.reshape(batch)]
