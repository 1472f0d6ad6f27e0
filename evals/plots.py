"""Plotly figures for bench results (also usable from the Streamlit app): Pareto views, dead latents,
steering curves, faithfulness/completeness curves. Every function takes plain dicts/lists and returns
a ``plotly.graph_objects.Figure``; :func:`write_figures` saves them as standalone HTML that works
offline (one shared ``plotly.min.js`` next to the pages)."""

from __future__ import annotations

import math
import warnings
from pathlib import Path
from typing import Any, Mapping, Sequence

import plotly.graph_objects as go
from plotly.subplots import make_subplots

from saebench.config import SaebenchWarning

_PALETTE = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#17becf")


def _finite(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def pareto_front(points: Sequence[tuple[float, float]], higher_is_better: bool) -> list[int]:
    """Indices of the points on the Pareto front of (x ↓, y ↑ or ↓), ordered by x."""
    order = sorted(range(len(points)), key=lambda i: (points[i][0], -points[i][1] if higher_is_better else points[i][1]))
    front, best = [], -math.inf if higher_is_better else math.inf
    for i in order:
        y = points[i][1]
        if (higher_is_better and y > best) or (not higher_is_better and y < best):
            front.append(i)
            best = y
    return front


def _with_front(fig: go.Figure, pts: Sequence[Mapping[str, Any]], x: str, y: str, higher_is_better: bool, title: str | None, log_x: bool,
                yaxis_title: str | None = None, height: int | None = None, front_width: float | None = None, log_y: bool = False) -> go.Figure:
    """The dotted black Pareto front of all ``pts``, the title, axis titles, and a log x (and, with ``log_y``, y) axis when
    every value on it is positive (a linear axis otherwise: a log axis would hide the points at or below zero)."""
    if len(pts) > 1:
        front = pareto_front([(p[x], p[y]) for p in pts], higher_is_better)
        fig.add_trace(go.Scatter(x=[pts[i][x] for i in front], y=[pts[i][y] for i in front], mode="lines", name="Pareto front",
                                 line=dict(color="black", dash="dot", width=front_width)))
    better = "higher" if higher_is_better else "lower"
    fig.update_layout(title=title or f"{y} vs {x} ({better} is better)", xaxis_title=x, yaxis_title=yaxis_title or y, template="plotly_white",
                      height=height)
    if log_x and pts and all(p[x] > 0 for p in pts):
        fig.update_xaxes(type="log")
    if log_y and pts and all(p[y] > 0 for p in pts):
        fig.update_yaxes(type="log")
    return fig


def pareto_figure(rows: Sequence[Mapping[str, Any]], x: str = "l0", y: str = "ce_loss_score", *, color_by: str = "method",
                  higher_is_better: bool = True, title: str | None = None, log_x: bool = True, log_y: bool = False) -> go.Figure:
    """Scatter of ``y`` against ``x`` (one trace per ``color_by`` group) with the overall Pareto front. ``log_y``: a log y axis
    (when every y is positive), for losses that span orders of magnitude, such as ΔCE across collapsed and good SAEs."""
    pts = [r for r in rows if _finite(r.get(x)) and _finite(r.get(y))]
    fig = go.Figure()
    groups: dict[str, list] = {}
    for r in pts:
        groups.setdefault(str(r.get(color_by) or r.get("architecture") or "sae"), []).append(r)
    for i, (g, rs) in enumerate(sorted(groups.items())):
        fig.add_trace(go.Scatter(
            x=[r[x] for r in rs], y=[r[y] for r in rs], mode="markers", name=g,
            marker=dict(size=10, color=_PALETTE[i % len(_PALETTE)]),
            text=[r.get("sae", "") for r in rs], hovertemplate=f"%{{text}}<br>{x}=%{{x:.4g}}<br>{y}=%{{y:.4g}}<extra>{g}</extra>",
        ))
    return _with_front(fig, pts, x, y, higher_is_better, title, log_x, log_y=log_y)


def pareto_curves_figure(aggregates: Sequence[Mapping[str, Any]], x: str = "l0", y: str = "delta_ce", *, group_by: str = "variant",
                         higher_is_better: bool = False, title: str | None = None, log_x: bool = True, log_y: bool = False) -> go.Figure:
    """One line per ``group_by`` through its settings' means, with ± sd error bars on both axes.

    ``aggregates`` are seed aggregates (``x``, ``y`` means and ``x_sd``, ``y_sd``; ``n`` seeds), e.g.
    ``bench_pareto.aggregate``'s. The dotted black line is the Pareto front of all the means.
    """
    pts = [a for a in aggregates if _finite(a.get(x)) and _finite(a.get(y))]
    fig = go.Figure()
    groups: dict[str, list] = {}
    for a in pts:
        groups.setdefault(str(a.get(group_by)), []).append(a)
    for i, (g, rs) in enumerate(groups.items()):
        rs = sorted(rs, key=lambda a: a[x])
        color = _PALETTE[i % len(_PALETTE)]
        dash = ("solid", "dash", "dot", "dashdot")[(i // len(_PALETTE)) % 4]
        fig.add_trace(go.Scatter(
            x=[a[x] for a in rs], y=[a[y] for a in rs], mode="lines+markers", name=g, line=dict(color=color, dash=dash),
            error_x=dict(type="data", array=[a.get(f"{x}_sd") or 0.0 for a in rs], visible=True, thickness=1),
            error_y=dict(type="data", array=[a.get(f"{y}_sd") or 0.0 for a in rs], visible=True, thickness=1),
            text=[f"{a.get('setting', '')}, n={a.get('n', '?')}" for a in rs],
            hovertemplate=f"%{{text}}<br>{x}=%{{x:.4g}}<br>{y}=%{{y:.4g}}<extra>{g}</extra>",
        ))
    better = "higher" if higher_is_better else "lower"
    return _with_front(fig, pts, x, y, higher_is_better, title, log_x, yaxis_title=f"{y} ({better} is better)", height=600, front_width=1,
                       log_y=log_y)


def dead_latents_figure(rows: Sequence[Mapping[str, Any]]) -> go.Figure:
    """Grouped bars per SAE: dead fraction (with its window), dense > 1 %, dense > 10 %, special-token-only."""
    rs = [r for r in rows if _finite(r.get("dead_fraction"))]
    names = [f"{r.get('sae', '?')}<br>({int(r.get('dead_window_tokens', 0)):,} tok)" for r in rs]
    fig = go.Figure()
    for key, label, color in (("dead_fraction", "dead", "#d62728"), ("dense_fraction_1pct", "dense > 1%", "#ff7f0e"),
                              ("dense_fraction_10pct", "dense > 10%", "#9467bd"), ("special_only_fraction", "special-token only", "#7f7f7f")):
        if any(_finite(r.get(key)) for r in rs):
            fig.add_trace(go.Bar(x=names, y=[r.get(key) if _finite(r.get(key)) else None for r in rs], name=label, marker_color=color))
    fig.update_layout(barmode="group", title="Dead and dense latents (fraction of latents; window in tokens)", yaxis_title="fraction of latents",
                      template="plotly_white")
    return fig


def steering_figure(results: Mapping[str, Mapping[str, Any]]) -> go.Figure:
    """Per SAE (and concept): target effect vs strength (latent vs random control), and effect vs KL cost."""
    fig = make_subplots(rows=1, cols=2, subplot_titles=("target effect vs strength", "effect vs fluency cost (KL on neutral text)"))
    for i, (name, res) in enumerate(results.items()):
        color = _PALETTE[i % len(_PALETTE)]
        key = res.get("effect_key", "delta_latent_act")
        for cond, dash in (("sae", "solid"), ("random", "dash")):
            pts = sorted((e for e in res.get("curve", []) if e["condition"] == cond), key=lambda e: e["strength"])
            if not pts:
                continue
            fig.add_trace(go.Scatter(x=[e["strength"] for e in pts], y=[e.get(key) for e in pts], mode="lines+markers", name=f"{name} [{cond}]",
                                     line=dict(color=color, dash=dash), legendgroup=name), row=1, col=1)
            pos = [e for e in pts if e["strength"] > 0]
            fig.add_trace(go.Scatter(x=[e["kl_neutral"] for e in pos], y=[e.get(key) for e in pos], mode="lines+markers", showlegend=False,
                                     text=[f"s={e['strength']}" for e in pos], line=dict(color=color, dash=dash), legendgroup=name), row=1, col=2)
    fig.update_xaxes(title_text="strength (× max activation)", row=1, col=1)
    fig.update_xaxes(title_text="KL(unsteered ‖ steered) per token", row=1, col=2)
    fig.update_yaxes(title_text="target effect", row=1, col=1)
    fig.update_layout(title="Steering sweeps (solid: SAE latent, dashed: random direction of equal norm)", template="plotly_white")
    return fig


def circuit_figure(results: Mapping[str, Mapping[str, Any]]) -> go.Figure:
    """Faithfulness F(C) and complement faithfulness F(M∖C) against circuit size, per SAE/task."""
    fig = make_subplots(rows=1, cols=2, subplot_titles=("faithfulness F(C)", "completeness: F(M \\ C) (0 = complete)"))
    for i, (name, res) in enumerate(results.items()):
        c = res.get("curve", {})
        sizes = [max(s, 0.5) for s in c.get("sizes", [])]  # size 0 drawn at 0.5 on the log axis
        color = _PALETTE[i % len(_PALETTE)]
        fig.add_trace(go.Scatter(x=sizes, y=c.get("faithfulness"), mode="lines+markers", name=name, line=dict(color=color), legendgroup=name),
                      row=1, col=1)
        fig.add_trace(go.Scatter(x=sizes, y=c.get("complement_faithfulness"), mode="lines+markers", name=name, showlegend=False,
                                 line=dict(color=color), legendgroup=name), row=1, col=2)
    for col in (1, 2):
        fig.update_xaxes(type="log", title_text="nodes in circuit", row=1, col=col)
    fig.update_layout(title="Feature circuits: mean-ablation faithfulness curves (test split)", template="plotly_white")
    return fig


def sparse_probing_figure(results: Mapping[str, Mapping[str, Any]]) -> go.Figure:
    """Sparse-probing test accuracy against k (SAE top-k latents), one line per SAE; dotted: the dense LLM probe."""
    fig = go.Figure()
    for i, (name, res) in enumerate(results.items()):
        ks = sorted(int(k.split("_")[2]) for k in res if k.startswith("sae_top_") and k.endswith("_test_accuracy"))
        color = _PALETTE[i % len(_PALETTE)]
        fig.add_trace(go.Scatter(x=ks, y=[res[f"sae_top_{k}_test_accuracy"] for k in ks], mode="lines+markers", name=name,
                                 line=dict(color=color), legendgroup=name))
        if _finite(res.get("llm_test_accuracy")) and ks:
            fig.add_trace(go.Scatter(x=[ks[0], ks[-1]], y=[res["llm_test_accuracy"]] * 2, mode="lines", name=f"{name} [dense probe]",
                                     line=dict(color=color, dash="dot"), legendgroup=name))
    fig.update_xaxes(type="log", title_text="k (latents in the probe)")
    fig.update_layout(title="Sparse probing: test accuracy of k-latent probes (mean over tasks); dotted: logistic probe on the activations",
                      yaxis_title="test accuracy", template="plotly_white")
    return fig


def absorption_figure(results: Mapping[str, Mapping[str, Any]]) -> go.Figure:
    """Per SAE: mean absorption fraction and full-absorption rate per letter (probe F1 on hover; unusable letters hollow)."""
    fig = make_subplots(rows=1, cols=2, subplot_titles=("mean absorption fraction per letter", "full absorption rate per letter"))
    for i, (name, res) in enumerate(results.items()):
        letters = res.get("letters", {})
        xs = list(letters)
        color = _PALETTE[i % len(_PALETTE)]
        for col, key in ((1, "mean_absorption_fraction"), (2, "full_absorption_rate")):
            fig.add_trace(go.Scatter(x=xs, y=[letters[x][key] for x in xs], mode="markers", name=name, legendgroup=name, showlegend=col == 1,
                                     marker=dict(color=color, size=9, symbol=["circle" if letters[x]["usable"] else "circle-open" for x in xs]),
                                     text=[f"probe F1 {letters[x]['f1_probe']:.2f}, {letters[x]['num_probe_true_positives']} TPs" for x in xs],
                                     hovertemplate="%{x}: %{y:.3f}<br>%{text}"), row=1, col=col)
    fig.update_layout(title="Feature absorption (first-letter task); hollow: letters whose probe F1 is too low to count",
                      template="plotly_white")
    return fig


def autointerp_figure(results: Mapping[str, Mapping[str, Any]]) -> go.Figure:
    """Histogram of per-latent detection scores, one trace per SAE; dotted: the always-"None" baseline (10/14)."""
    fig = go.Figure()
    base = None
    for i, (name, res) in enumerate(results.items()):
        scores = [r["score"] for r in res.get("latents", {}).values() if _finite(r.get("score"))]
        judge = res.get("judge", {})
        fig.add_trace(go.Histogram(x=scores, xbins=dict(start=-0.5 / 14, end=1 + 0.5 / 14, size=1 / 14), opacity=0.6,
                                   name=f"{name} (mean {res.get('autointerp_score', float('nan')):.3f}, n={len(scores)}; "
                                        f"judge {judge.get('backend')}:{judge.get('model')})",
                                   marker_color=_PALETTE[i % len(_PALETTE)]))
        base = (res.get("baselines") or {}).get("always_none", base)
    if base is not None:
        fig.add_vline(x=base, line_dash="dot", line_color="black", annotation_text=f"always 'None' {base:.3f}")
    fig.update_layout(title="Autointerp: per-latent detection score (14 windows: 2 top + 2 importance-weighted + 10 random)",
                      xaxis_title="detection accuracy", yaxis_title="latents", barmode="overlay", template="plotly_white")
    return fig


def afa_figure(rows: Sequence[Mapping[str, Any]]) -> go.Figure:
    """AFA: mean ‖f̃‖/‖z‖ per SAE (1 = the code has the norm the input predicts) against L0, ε_LBO on hover."""
    rs = [r for r in rows if _finite(r.get("afa_norm_ratio"))]
    fig = go.Figure(go.Scatter(x=[r.get("l0") for r in rs], y=[r["afa_norm_ratio"] for r in rs], mode="markers+text",
                               text=[r.get("sae", "") for r in rs], textposition="top center",
                               customdata=[r.get("afa_eps_lbo_median") for r in rs],
                               hovertemplate="%{text}<br>L0 %{x:.4g}<br>‖f̃‖/‖z‖ %{y:.4f}<br>median ε_LBO %{customdata:.3g}<extra></extra>"))
    fig.add_hline(y=1.0, line_dash="dot", line_color="black")
    fig.update_layout(title="Approximate feature activation: mean ‖f̃‖/‖z‖ (>1 over-activated, <1 under-activated)", xaxis_title="L0",
                      yaxis_title="mean ‖f̃‖ / ‖z‖", template="plotly_white")
    return fig


_LOCAL_PLOTLY_TAG = '<script charset="utf-8" src="plotly.min.js"></script>'


def _with_cdn_fallback(html: str) -> str:
    """The page loads ``plotly.min.js`` from beside it (offline); where that file is missing (a figure committed to git
    without the 4.8 MB library, opened from a fresh clone) it loads the same plotly.js version from the CDN instead."""
    from plotly.offline import get_plotlyjs_version

    cdn = f"https://cdn.plot.ly/plotly-{get_plotlyjs_version()}.min.js"
    fallback = f"<script>window.Plotly || document.write('<script charset=\"utf-8\" src=\"{cdn}\"><\\/script>')</script>"
    return html.replace(_LOCAL_PLOTLY_TAG, _LOCAL_PLOTLY_TAG + fallback, 1)


def write_figures(figs: Mapping[str, go.Figure], out_dir: str | Path) -> dict[str, Path]:
    """Write each figure to ``out_dir/<name>.html``: offline, with plotly.min.js written once beside them, and the CDN
    as a fallback where that file is absent (results folders keep the pages in git but not the library)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {}
    for name, fig in figs.items():
        path = out / f"{name}.html"
        fig.write_html(str(path), include_plotlyjs="directory", full_html=True)
        html = path.read_text(encoding="utf-8")
        if _LOCAL_PLOTLY_TAG in html:
            path.write_text(_with_cdn_fallback(html), encoding="utf-8")
        else:  # a plotly whose page layout we have not seen: the page still works beside plotly.min.js
            warnings.warn(f"plotly wrote {path} without the script tag saebench expects; the page has no CDN fallback and needs "
                          "plotly.min.js beside it", SaebenchWarning, stacklevel=2)
        paths[name] = path
    return paths
