"""Pure rendering helpers for the browser: HTML for token heat maps, plotly figures, tables.

Everything that comes from the corpus or the vocabulary goes through :func:`esc` before it is
placed in HTML, so a ``<script>`` in the text shows as text.
"""

from __future__ import annotations

import html
import math
from collections.abc import Sequence

# Imported here, before any session runs: plotly only looks pandas up in sys.modules, so a figure
# built while another session's thread is still importing pandas (st.dataframe imports it lazily)
# would see a half-initialised module ("partially initialized module 'pandas' has no attribute 'Series'").
import pandas  # noqa: F401
import plotly.graph_objects as go

POS_RGB = (255, 128, 0)  # orange: positive activation
NEG_RGB = (30, 110, 255)  # blue: negative activation
_VISIBLE = {"\n": "↵", "\t": "⇥", "\r": "␍"}


def esc(text: str) -> str:
    """HTML-escape text (quotes included)."""
    return html.escape(str(text), quote=True)


_MD_SPECIAL = set("\\`*_{}[]()#+-.!|<>$~")


def md(text: str) -> str:
    """Escape text for Streamlit markdown (no formatting, links, HTML or LaTeX from user/corpus text)."""
    return "".join("\\" + c if c in _MD_SPECIAL else c for c in str(text)).replace("\n", " ")


def code(text: str) -> str:
    """Inline code for Streamlit markdown (backticks inside the text cannot end the span)."""
    return "`" + str(text).replace("`", "'").replace("\n", " ") + "`"


def visible_token(tok: str) -> str:
    """A token as shown: newlines/tabs as symbols, an empty token as '∅'."""
    if tok == "":
        return "∅"
    return "".join(_VISIBLE.get(c, c) for c in tok)


def _bg(value: float, scale: float) -> str:
    if value == 0 or scale <= 0 or not math.isfinite(value):
        return "transparent"
    a = min(1.0, abs(value) / scale) * 0.85 + 0.1
    r, g, b = POS_RGB if value > 0 else NEG_RGB
    return f"rgba({r},{g},{b},{a:.3f})"


def token_spans(tokens: Sequence[str], values: Sequence[float], scale: float, peak: int | None = None,
                special: Sequence[bool] | None = None, match: set[int] | frozenset[int] = frozenset()) -> str:
    """Tokens as adjacent inline spans (the text reads as text; boundaries are a faint line) coloured by
    activation, with the exact value on hover (``title``); ``match`` marks tokens of searched words."""
    parts = []
    for j, (tok, v) in enumerate(zip(tokens, values)):
        style = f"background:{_bg(v, scale)};"
        cls = "tok"
        if peak is not None and j == peak:
            cls += " peak"
        if special is not None and special[j]:
            cls += " special"
        if j in match:
            cls += " match"
        title = f"{visible_token(tok)!r} = {v:.4g}" if v else f"{visible_token(tok)!r}"
        parts.append(f'<span class="{cls}" style="{style}" title="{esc(title)}">{esc(visible_token(tok))}</span>')
    return "".join(parts)


STYLE = """
<style>
.sb-examples {font-family: system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; font-size: 0.88rem; line-height: 1.75;}
.sb-examples .row {display: flex; gap: 0.6rem; align-items: baseline; border-bottom: 1px solid rgba(128,128,128,0.15); padding: 1px 0;}
.sb-examples .val {min-width: 4.5rem; text-align: right; color: #888; flex: none; font-family: ui-monospace, monospace; font-size: 0.8rem;}
.sb-examples .ctx {white-space: pre-wrap; word-break: break-word;}
.sb-examples .tok {margin: 0; padding: 0; border-radius: 0; box-shadow: inset -1px 0 0 rgba(128,128,128,0.22);}
.sb-examples .tok:hover {box-shadow: inset 0 0 0 1px rgba(0,0,0,0.55);}
.sb-examples .tok.peak {outline: 1.5px solid rgba(0,0,0,0.65); outline-offset: -1px;}
.sb-examples .tok.special {color: #999; font-style: italic;}
.sb-examples .tok.match {text-decoration: underline 2px rgba(0,0,0,0.6); text-underline-offset: 3px;}
.sb-summary {border-left: 3px solid rgba(120,120,200,0.6); padding: 0.3rem 0.7rem; background: rgba(120,120,200,0.07); font-size: 0.88rem;}
.sb-summary .q {font-family: ui-monospace, monospace; background: rgba(255,128,0,0.18); padding: 0 2px; white-space: pre;}
.sb-summary .auto {color: #777; font-size: 0.8rem;}
table.sb-table {border-collapse: collapse; font-size: 0.85rem;}
table.sb-table td, table.sb-table th {padding: 2px 10px 2px 0; border-bottom: 1px solid rgba(128,128,128,0.15); text-align: left; vertical-align: top;}
table.sb-table .t {font-family: ui-monospace, monospace; white-space: pre;}
.sb-examples .hdr {font-weight: 600; margin-top: 0.4rem; font-family: sans-serif;}
.sb-list {font-family: ui-monospace, monospace; font-size: 0.85rem;}
.sb-list .tok {padding: 0 3px; border-radius: 3px; white-space: pre;}
.sb-snippet mark {background: rgba(255,128,0,0.45); padding: 0 1px;}
</style>
"""


def examples_html(rows: Sequence[tuple], scale: float, header: str | None = None, css_id: str | None = None) -> str:
    """A block of examples: each row is (value, tokens, values, peak index[, special flags])."""
    ident = f' id="{esc(css_id)}"' if css_id else ""
    out = [STYLE, f'<div class="sb-examples"{ident}>']
    if header:
        out.append(f'<div class="hdr">{esc(header)}</div>')
    for value, toks, vals, peak, *rest in rows:
        spans = token_spans(toks, vals, scale, peak, rest[0] if rest else None, rest[1] if len(rest) > 1 else frozenset())
        out.append(f'<div class="row"><span class="val">{value:.3f}</span><span class="ctx">{spans}</span></div>')
    out.append("</div>")
    return "".join(out)


def logit_list_html(items: Sequence[tuple[str, float]], positive: bool) -> str:
    """Top ± logit-effect tokens as coloured chips."""
    if not items:
        return ""
    scale = max(abs(v) for _, v in items) or 1.0
    rows = []
    for tok, v in items:
        rows.append(f'<div><span class="tok" style="background:{_bg(v, scale)}">{esc(visible_token(tok))}</span> '
                    f'<span style="color:#888">{v:+.3f}</span></div>')
    return STYLE + '<div class="sb-list">' + "".join(rows) + "</div>"


def snippet_html(snippet: str) -> str:
    """An FTS snippet (matches wrapped in ⟦ ⟧) escaped, with matches highlighted."""
    s = esc(visible_token(snippet)).replace("\u27e6", "<mark>").replace("\u27e7", "</mark>")
    return STYLE + f'<span class="sb-snippet sb-list">{s}</span>'


def histogram_figure(hist: dict, title: str, color: str = "rgb(255,128,0)", marks: Sequence[tuple[float, str]] = (),
                     xlabel: str = "activation", log_y: bool = False) -> go.Figure:
    """A bar chart of an equal-width histogram ``{"lo", "hi", "counts"}`` with optional vertical marks."""
    counts = hist.get("counts", [])
    lo, hi = float(hist.get("lo", 0.0)), float(hist.get("hi", 1.0))
    n = max(len(counts), 1)
    w = (hi - lo) / n if hi > lo else 1.0
    centres = [lo + (j + 0.5) * w for j in range(len(counts))]
    fig = go.Figure(go.Bar(x=centres, y=counts, width=[w * 0.95] * len(counts), marker_color=color,
                           hovertemplate="%{x:.4g}: %{y}<extra></extra>"))
    for x, label in marks:
        fig.add_vline(x=x, line_color="crimson", line_width=2, line_dash="dash",
                      annotation_text=esc(label), annotation_position="top")
    fig.update_layout(title={"text": esc(title), "font": {"size": 14}}, height=230, margin={"l": 10, "r": 10, "t": 40, "b": 30},
                      xaxis_title=xlabel, yaxis_title="count", bargap=0.02, showlegend=False)
    if log_y:
        fig.update_yaxes(type="log")
    return fig


def bar_figure(labels: Sequence[str], values: Sequence[float], title: str) -> go.Figure:
    """Horizontal bars (positive orange, negative blue), e.g. next-token log-prob changes."""
    colors = [f"rgb{POS_RGB}" if v >= 0 else f"rgb{NEG_RGB}" for v in values]
    fig = go.Figure(go.Bar(y=[esc(repr(visible_token(t))) for t in labels], x=list(values), orientation="h", marker_color=colors,
                           hovertemplate="%{y}: %{x:+.3f}<extra></extra>"))
    fig.update_layout(title={"text": esc(title), "font": {"size": 14}}, height=max(220, 22 * len(labels) + 60),
                      margin={"l": 10, "r": 10, "t": 40, "b": 30}, yaxis={"autorange": "reversed"}, xaxis_title="Δ log-prob")
    return fig


def quoted(tok: str) -> str:
    """A token as an escaped inline chip (spaces kept visible)."""
    return f'<span class="q">{esc(visible_token(tok))}</span>'


def summary_html(summ: dict, compact: bool = False) -> str:
    """The automatic statistical summary of a latent (escaped), clearly marked as automatic."""
    def toks(items):
        return ", ".join(f"{quoted(t)} {s:.0%}" for t, s in items)

    parts = []
    if summ.get("at"):
        parts.append(f"<strong>fires on</strong> {toks(summ['at'])}")
    if summ.get("before"):
        parts.append(f"<strong>just after</strong> {toks(summ['before'])}")
    if summ.get("promotes"):
        parts.append(f"<strong>promotes</strong> {', '.join(quoted(t) for t in summ['promotes'])}")
    head = "" if compact else ('<div class="auto">Automatic statistical summary, not an explanation: shares of the latent\'s '
                               "activation mass on the dashboard tokens, and its top logit effects.</div>")
    return STYLE + f'<div class="sb-summary" id="auto-summary">{head}{" · ".join(parts)}</div>'


def explanation_html(e: dict, compact: bool = False) -> str:
    """A latent's automatic LLM explanation (escaped), marked as automatic, with its detection score and judge."""
    score = e.get("score")
    n = (e.get("details") or {}).get("n_scoring")
    sc = (f"detection score {score:.2f}" + (f" on {n} windows" if n else "") + " (0.71 = answering 'None' always)"
          if isinstance(score, (int, float)) and math.isfinite(score) else "not scored")
    who = e.get("explainer", "?") if e.get("explainer") == e.get("scorer") else f"{e.get('explainer', '?')} / scorer {e.get('scorer', '?')}"
    head = f'<span class="auto">Automatic explanation (autointerp · {esc(who)} · {esc(sc)})</span>'
    return STYLE + f'<div class="sb-summary" id="auto-explanation">{head}{"" if compact else "<br>"} <strong>{esc(e.get("text", ""))}</strong></div>'


def short_summary(summ: dict | None, n: int = 3) -> str:
    """Plain text for a button: the latent's top tokens (e.g. "' fox', ' dog'")."""
    if not summ or not summ.get("at"):
        return ""
    return ", ".join(repr(visible_token(t)) for t, _ in summ["at"][:n])


def fmt_density(d: float) -> str:
    """A density as a percentage with sensible precision (0.5%, 0.0123%, 0)."""
    if d <= 0:
        return "0%"
    pct = d * 100
    return f"{pct:.2f}%" if pct >= 1 else f"{pct:.3g}%"


def kv_table(rows: Sequence[tuple[str, object]]) -> str:
    """A small two-column key/value HTML table (values escaped)."""
    body = "".join(f'<tr><td style="color:#888;padding:2px 12px 2px 0">{esc(k)}</td><td style="font-family:ui-monospace,monospace">{esc(v)}</td></tr>'
                   for k, v in rows)
    return f'<table style="border-collapse:collapse;font-size:.9rem">{body}</table>'


def pareto_front(xs: Sequence[float], ys: Sequence[float], maximize: bool) -> list[int]:
    """Indices of the points on the Pareto front: lower x is better; higher (or lower) y is better."""
    pts = sorted((x, y if maximize else -y, i) for i, (x, y) in enumerate(zip(xs, ys)) if _finite(x) and _finite(y))
    front, best = [], -math.inf
    for x, y, i in pts:
        if y > best:
            front.append(i)
            best = y
    return front


def _finite(v) -> bool:
    return isinstance(v, (int, float)) and math.isfinite(v)


def pareto_figure(records: Sequence[dict], y: str, ylabel: str, maximize: bool) -> go.Figure:
    """Scatter of ``y`` against L0 with the Pareto front drawn as a line, one colour per method."""
    pts = [r for r in records if _finite(r.get("l0")) and _finite(r.get(y))]
    fig = go.Figure()
    by_method: dict[str, list[dict]] = {}
    for r in pts:
        by_method.setdefault(str(r.get("method") or r.get("architecture") or "?"), []).append(r)
    for m, rs in sorted(by_method.items()):
        fig.add_trace(go.Scatter(
            x=[r["l0"] for r in rs], y=[r[y] for r in rs], mode="markers", name=esc(m), marker={"size": 10},
            text=[esc(str(r.get("sae") or r.get("name") or r.get("source", ""))) for r in rs],
            hovertemplate="%{text}<br>L0 %{x:.2f}<br>" + esc(ylabel) + " %{y:.4f}<extra></extra>"))
    front = pareto_front([r["l0"] for r in pts], [r[y] for r in pts], maximize)
    if len(front) > 1:
        fp = sorted((pts[i]["l0"], pts[i][y]) for i in front)
        fig.add_trace(go.Scatter(x=[p[0] for p in fp], y=[p[1] for p in fp], mode="lines", name="Pareto front",
                                 line={"color": "grey", "dash": "dot"}, hoverinfo="skip"))
    fig.update_layout(title={"text": esc(f"{ylabel} vs L0"), "font": {"size": 14}}, height=360, margin={"l": 10, "r": 10, "t": 40, "b": 30},
                      xaxis_title="L0 (active latents per token)", yaxis_title=esc(ylabel))
    return fig
