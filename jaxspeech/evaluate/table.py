"""``evaluate``: every method side by side on one batch and target, as a :class:`Table`."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import numpy as np

from jaxspeech.attribution import targets as _targets
from jaxspeech.attribution.targets import Target
from jaxspeech.evaluate.common import (
    CANNOT_RUN,
    DEFAULT_METHODS,
    Method,
    _mean,
    _relevance,
    _resolve_valid,
    _sizes,
    fixed_target,
    markdown_table,
    text_table,
    valid_frames_of,
)
from jaxspeech.evaluate.localisation import _expand_mask, mass_in_mask, pointing_game
from jaxspeech.evaluate.perturbation import Curves, perturbation_curves
from jaxspeech.evaluate.randomisation import MPRTResult, _label, _mprt, parameter_groups


@dataclasses.dataclass(frozen=True)
class Row:
    """One method's numbers, each averaged over items (``None``: not computed; ``error``:
    why the method could not run on this model)."""

    method: str
    abpc_frames: float | None = None
    abpc_patches: float | None = None
    morf_auc: float | None = None
    lerf_auc: float | None = None
    mass_in_mask: float | None = None
    pointing_game: float | None = None
    mprt_rho: float | None = None
    mprt_pass: bool | None = None
    mprt_ssim: float | None = None
    error: str | None = None


_COLUMNS = [("method", "method"), ("ABPC frames", "abpc_frames"), ("ABPC patches", "abpc_patches"),
            ("MoRF AUC", "morf_auc"), ("LeRF AUC", "lerf_auc"), ("mass in mask", "mass_in_mask"),
            ("pointing game", "pointing_game"), ("MPRT final ρ", "mprt_rho"), ("MPRT pass/fail", "mprt_pass")]


def _cell(value) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, bool):
        return "pass" if value else "FAIL"
    if isinstance(value, float):
        return "nan" if np.isnan(value) else f"{value:.4g}"
    return str(value)


@dataclasses.dataclass
class Table:
    """The result of :func:`evaluate`: one :class:`Row` per method, plus the curves
    (``curves[method]["frames" | "patches"]``), the cascades (``mprt[method]``) and the
    settings (``info``)."""

    rows: list[Row]
    curves: dict[str, dict[str, Curves]]
    mprt: dict[str, MPRTResult]
    info: dict[str, Any]

    def row(self, method: str) -> Row:
        for r in self.rows:
            if r.method == method:
                return r
        raise KeyError(f"no row for method {method!r}; rows: {[r.method for r in self.rows]}")

    def _grid(self) -> tuple[list[str], list[list[str]]]:
        cols = list(_COLUMNS)
        if any(r.mprt_ssim is not None for r in self.rows):
            cols.insert(-1, ("MPRT final SSIM", "mprt_ssim"))
        if any(r.error for r in self.rows):
            cols.append(("note", "error"))
        head = [c for c, _ in cols]
        body = [[_cell(getattr(r, f)) if f != "error" else (f"cannot run: {r.error}" if r.error
                                                            else "") for _, f in cols]
                for r in self.rows]
        return head, body

    def caption(self) -> str:
        i = self.info
        return (f"target {i['target']}, {i['items']} item(s), {i['steps']} steps, patches "
                f"{i['patch'][0]} bins x {i['patch'][1]} frames, baseline {i['baseline']}; "
                "ABPC = AUC(LeRF) - AUC(MoRF), each the area over the removed fraction [0, 1] "
                "(sum over steps / steps), in target units; MoRF/LeRF AUC over frames; "
                f"MPRT: Spearman rho after randomising {len(i['groups'])} groups (output "
                f"first), pass if <= {i['mprt_threshold']}; means over items")

    def text(self) -> str:
        return text_table(*self._grid(), self.caption())

    def markdown(self) -> str:
        return markdown_table(*self._grid(), self.caption())

    def __str__(self) -> str:
        return self.text()

    def to_dict(self) -> dict:
        """Everything as plain JSON-able values (per-item numbers included)."""
        return {
            "info": self.info,
            "rows": [dataclasses.asdict(r) for r in self.rows],
            "curves": {m: {u: {"morf": c.morf.tolist(), "lerf": c.lerf.tolist(),
                               "removed": c.removed.tolist(), "unit": c.unit,
                               "abpc": c.abpc.tolist()} for u, c in cs.items()}
                       for m, cs in self.curves.items()},
            "mprt": {m: {"groups": list(r.groups), "rho": r.rho.tolist(),
                         "ssim": None if r.ssim is None else r.ssim.tolist(),
                         "final_rho": r.final_rho, "passed": r.passed}
                     for m, r in self.mprt.items()},
        }

    def figures(self) -> dict[str, Any]:
        """``{file name: matplotlib Figure}``: ``curves_frames.png``, ``curves_patches.png``
        (mean MoRF solid, LeRF dashed, one colour per method) and ``mprt.png`` (mean ρ per
        cascade step). Legends sit beside the axes, never over the curves."""
        from matplotlib.figure import Figure  # no pyplot: no global backend state

        figures = {}
        for unit in ("frames", "patches"):
            runs = {m: c[unit] for m, c in self.curves.items() if unit in c}
            if not runs:
                continue
            fig = Figure(figsize=(9.5, 4.5))
            ax = fig.add_subplot()
            for i, (method, c) in enumerate(runs.items()):
                colour = f"C{i % 10}"
                steps = np.linspace(0, 1, c.morf.shape[1])
                ax.plot(steps, c.morf.mean(0), color=colour,
                        label=f"{method} MoRF (ABPC {float(c.abpc.mean()):.3g})")
                ax.plot(steps, c.lerf.mean(0), color=colour, ls="--", label=f"{method} LeRF")
            ax.set_xlabel(f"share of {next(iter(runs.values())).unit} removed")
            ax.set_ylabel(f"target ({self.info['target']})")
            ax.set_title(f"perturbation curves over {unit} (MoRF solid, LeRF dashed)",
                         fontsize=10)
            _legend_beside(ax)
            figures[f"curves_{unit}.png"] = fig
        if self.mprt:
            fig = Figure(figsize=(8.5, 4.5))
            ax = fig.add_subplot()
            labels = next(iter(self.mprt.values())).groups
            for i, (method, r) in enumerate(self.mprt.items()):
                ax.plot(np.arange(1, len(labels) + 1), r.mean_rho, marker="o", color=f"C{i % 10}",
                        label=method)
            ax.axhline(next(iter(self.mprt.values())).threshold, color="grey", ls=":")
            ax.set_xticks(np.arange(1, len(labels) + 1), labels, rotation=60, ha="right",
                          fontsize=7)
            ax.set_ylabel("Spearman ρ to original relevance")
            ax.set_title("cascading parameter randomisation (output first)", fontsize=10)
            _legend_beside(ax)
            figures["mprt.png"] = fig
        return figures

    def plot(self, out_dir: str | Path) -> list[Path]:
        """Write :meth:`figures` as PNGs to ``out_dir``; returns their paths."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        written = []
        for name, fig in self.figures().items():
            written.append(out / name)
            fig.savefig(written[-1], dpi=110, bbox_inches="tight")  # room for the legend
        return written


def _legend_beside(ax) -> None:
    """The legend right of the axes (``savefig(bbox_inches="tight")`` makes room for it)."""
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0,
              frameon=False)


def _named(methods_: Sequence[Method] | Mapping[str, Method]) -> dict[str, Method]:
    if isinstance(methods_, Mapping):
        return dict(methods_)
    if isinstance(methods_, str) or callable(methods_):
        methods_ = [methods_]
    out = {}
    for m in methods_:
        name = m if isinstance(m, str) else getattr(m, "__name__", "custom")
        if name in out:
            raise ValueError(f"method {name!r} given twice; pass a dict to name them apart")
        out[name] = m
    return out


def _describe(baseline) -> str:
    if baseline is None:
        return "item minimum"
    if callable(baseline):
        return getattr(baseline, "__name__", "custom")
    return f"{float(baseline):g}" if np.ndim(baseline) == 0 else "array"


def evaluate(
    model,
    wave=None,
    target: Target | None = None,
    methods: Sequence[Method] | Mapping[str, Method] = DEFAULT_METHODS,
    *,
    features=None,
    masks=None,
    params=None,
    valid_frames="auto",
    steps: int = 20,
    patch: tuple[int, int] = (8, 10),
    baseline=None,
    mprt: bool = True,
    groups: Sequence[str | Sequence[str]] | None = None,
    mprt_threshold: float = 0.5,
    ssim: bool = False,
    absolute: bool = False,
    key: jax.Array | int | None = None,
    method_options: Mapping[str, Mapping] | None = None,
    batch_size: int = 4,
    sample_rate: int | None = None,
    **prepare_options,
) -> Table:
    """Run every method on the same batch and target and tabulate faithfulness and sanity.

    ``wave [B, samples]`` (or a list of clips) at ``model.sample_rate``, or precomputed
    ``features`` in the model's layout with their keyword inputs in ``prepare_options``
    (``lengths=`` for ECAPA). ``target``: default :func:`jaxspeech.targets.default`;
    ``predicted_class`` is frozen to the clean decision. ``methods``: names for
    :func:`jaxspeech.attribute`, functions ``fn(model, features, target, params, kwargs)
    -> relevance``, or a dict naming them; ``method_options[name]`` are extra keyword
    arguments to ``attribute`` (``{"gradcam": {"layer": "layers.2.hidden_state"}}``).
    A method that cannot run on the model (rollout without attention) gets a row saying
    why. ``masks``: bool ground truth in the features' layout (or ``[B, frames]``) for
    the localisation columns. ``valid_frames``: ``"auto"`` (from the clip lengths when
    ``wave`` is given, see :func:`valid_frames_of`), ``None`` (all frames) or ``[B]``.
    ``steps``, ``patch`` (frequency bins, frames), ``baseline``, ``batch_size``: see
    :func:`perturbation_curves`. ``mprt``: run the cascade (``groups`` default
    :func:`parameter_groups`, ``key`` default ``jax.random.key(0)``, ``mprt_threshold``,
    ``ssim``, ``absolute``: see :func:`mprt`).
    """
    params = model.params if params is None else params
    x, kwargs = model.inputs(wave, features, sample_rate=sample_rate, **prepare_options)
    time_axis = model.family.time_axis % x.ndim
    if isinstance(valid_frames, str):
        if valid_frames != "auto":
            raise ValueError(f"valid_frames must be 'auto', None or [B] frames, got {valid_frames!r}")
        valid_frames = None if wave is None else valid_frames_of(model, _sizes(wave), x.shape[time_axis])
    valid = np.asarray(_resolve_valid(valid_frames, x, time_axis))
    target = fixed_target(model, x, _targets.resolve(model, target), kwargs, params)
    mask = None if masks is None else _expand_mask(masks, x.shape, time_axis)
    options = dict(method_options or {})
    common = dict(kwargs=kwargs, params=params, steps=steps, baseline=baseline,
                  valid_frames=valid, batch_size=batch_size)

    rows, curves, runs = {}, {}, {}
    for name, method in _named(methods).items():
        opts = options.get(name, {}) if isinstance(method, str) else {}
        try:
            relevance = _relevance(model, method, x, kwargs, target, params, opts)
        except CANNOT_RUN as e:
            rows[name] = Row(name, error=f"{type(e).__name__}: {e}".splitlines()[0])
            continue
        runs[name] = (method, opts, relevance)
        frames = perturbation_curves(model, x, relevance, target, unit="frames", **common)
        patches = perturbation_curves(model, x, relevance, target, unit="patches", patch=patch,
                                      **common)
        curves[name] = {"frames": frames, "patches": patches}
        local = {}
        if mask is not None:
            local = dict(mass_in_mask=_mean(mass_in_mask(relevance, mask, time_axis=time_axis)),
                         pointing_game=_mean(pointing_game(relevance, mask, time_axis=time_axis)))
        rows[name] = Row(name, abpc_frames=_mean(frames.abpc), abpc_patches=_mean(patches.abpc),
                         morf_auc=_mean(frames.morf_auc), lerf_auc=_mean(frames.lerf_auc), **local)

    cascade, results = [], {}
    if mprt and runs:
        cascade = list(parameter_groups(model, params) if groups is None else groups)
        results = _mprt(model, x, kwargs, target, runs, params, cascade,
                        jax.random.key(0) if key is None else key, mprt_threshold, ssim, absolute,
                        valid)
        for name, res in results.items():
            rows[name] = dataclasses.replace(
                rows[name], mprt_rho=res.final_rho, mprt_pass=res.passed,
                mprt_ssim=None if res.ssim is None else _mean(res.ssim[-1]))
    info = {"model": model.kind, "target": target.name, "items": int(x.shape[0]),
            "steps": int(steps), "patch": [int(p) for p in patch],
            "baseline": _describe(baseline),
            "valid_frames": valid.tolist(), "groups": [_label(g) for g in cascade],
            "mprt_threshold": float(mprt_threshold)}
    return Table([rows[n] for n in _named(methods)], curves, results, info)
