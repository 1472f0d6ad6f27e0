"""SAE overview: config, provenance of the dashboards, latent counts, density histogram, labels, core eval."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import streamlit as st
from saebench.app import render as R
from saebench.app import state as S
from saebench.app.page_feature import missing_dashboard, provenance_caption

from saebench import dashboards as D
from saebench.layout import EVAL_CORE_FILE

CFG_KEYS = ("architecture", "method", "d_in", "d_sae", "k", "model_name", "hook_name", "context_size")


def _num(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def source_line(m: dict, name: str) -> str:
    """Where a metrics record comes from: file, eval, tokens and dead window (only what it records)."""
    parts = [f"from {R.code(name)}"]
    if m.get("eval"):
        parts.append(f"eval {R.code(m['eval'])}")
    if _num(m.get("n_tokens")):
        parts.append(f"{int(m['n_tokens']):,} tokens")
    if _num(m.get("dead_window_tokens")):
        parts.append(f"dead = never fired in a {int(m['dead_window_tokens']):,}-token window")
    return " · ".join(parts)


def _fmt(v) -> str:
    if not _num(v):
        return "—"
    return f"{v:,}" if isinstance(v, int) or float(v).is_integer() and abs(v) >= 1000 else f"{v:.4g}"


SIDE_KEYS = ("l0", "fvu", "ce_loss_score", "kl_div_score", "dead_fraction", "n_tokens", "dead_window_tokens")


def _other_sources(cfg: S.AppConfig, rel: str) -> None:
    """Every eval record of this SAE (eval_core.json and bench rows), side by side, each with its source."""
    from saebench.app.page_evals import eval_records

    recs = [r for r in eval_records(str(cfg.root)) if r.get("sae") == rel]
    if len(recs) < 2:
        return
    st.markdown("**All eval results for this SAE** (one column per source; they are never merged)")
    keys = [k for k in SIDE_KEYS if any(k in r for r in recs)]
    head = "".join(f"<th>{R.esc(r.get('source', '?'))}<br><span style='color:#888'>{R.esc(r.get('eval', ''))}</span></th>" for r in recs)
    body = ""
    for k in keys:
        vals = [r.get(k) for r in recs]
        nums = [v for v in vals if _num(v)]
        differ = len({round(float(v), 6) for v in nums}) > 1
        cells = "".join(f"<td>{R.esc(_fmt(v))}</td>" for v in vals)
        body += f"<tr><td>{R.esc(k)}{' ⚠ differs' if differ else ''}</td>{cells}</tr>"
    st.html(R.STYLE + f'<table class="sb-table" id="eval-sources"><tr><th>metric</th>{head}</tr>{body}</table>')
    st.caption("Different evals use different token sets and dead windows: compare like with like.")


def render(cfg: S.AppConfig, rel: str, path: str, sae_cfg: dict, db: D.Dashboard | None) -> None:
    st.header(f"SAE {R.code(rel)}")
    st.html(R.kv_table([(k, sae_cfg[k]) for k in CFG_KEYS if sae_cfg.get(k) not in (None, "")]))
    core = Path(path) / EVAL_CORE_FILE
    if core.is_file():
        st.subheader("Core eval")
        try:
            m = json.loads(core.read_text())
            if not isinstance(m, dict):
                raise ValueError("not an object")  # noqa: TRY004 - caught below with the JSON errors
            keys = [("l0", "L0"), ("fvu", "FVU"), ("ce_loss_score", "CE loss recovered"), ("dead_fraction", "dead fraction")]
            cols = st.columns(len(keys))
            for c, (k, name) in zip(cols, keys):
                v = m.get(k)
                c.metric(name, f"{v:.4g}" if _num(v) else "—")
            st.caption(source_line({"eval": "core"} | m, "eval_core.json"))
        except (OSError, ValueError, RecursionError):
            st.caption("eval_core.json is unreadable.")
    _other_sources(cfg, rel)
    st.subheader("Dashboards")
    if db is None:
        missing_dashboard(path)
        return
    st.caption(provenance_caption(db))
    counts = db.counts()
    c = st.columns(4)
    n_tok = db.provenance.get("n_tokens") or 0
    c[0].metric("Latents computed", f"{counts['computed']:,} / {db.d_sae:,}")
    c[1].metric("Live", f"{counts['live']:,}")
    c[2].metric("Dead", f"{counts['dead']:,}", help=f"Never fired on the {n_tok:,} dashboard tokens.")
    c[3].metric("Dense", f"{counts['dense']:,}")
    st.caption(f"Live / dead / dense here count firing on the {n_tok:,} dashboard tokens ({R.code(db.provenance.get('split', '?'))} split): "
               "another window than an eval's dead fraction, so the two can differ.")
    if not db.complete:
        st.warning("The dashboard build is unfinished; resume it with:")
        st.code(D.build_command(path), language="bash")
    stats = db.stats()
    dens = stats["density"][stats["n_active"] > 0]
    if len(dens):
        logd = np.log10(dens)
        counts_, edges = np.histogram(logd, bins=40)
        st.plotly_chart(R.histogram_figure({"lo": float(edges[0]), "hi": float(edges[-1]), "counts": counts_.tolist()},
                                           "Live latents by log10 density", color="rgb(90,160,90)", xlabel="log10 density"), key="density_hist")
    labelled = db.all_labels(limit=200)
    if labelled:
        st.subheader("Labelled latents")
        for f, lab in labelled:
            st.button(f"#{f} · {R.md(lab)}", key=f"lab_{f}", on_click=S.go_to, args=(f,))
