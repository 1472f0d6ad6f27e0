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

CFG_KEYS = ("architecture", "method", "d_in", "d_sae", "k", "model_name", "hook_name", "context_size")


def render(cfg: S.AppConfig, rel: str, path: str, sae_cfg: dict, db: D.Dashboard | None) -> None:
    st.header(f"SAE {R.code(rel)}")
    st.html(R.kv_table([(k, sae_cfg[k]) for k in CFG_KEYS if sae_cfg.get(k) not in (None, "")]))
    core = Path(path) / "eval_core.json"
    if core.is_file():
        try:
            m = json.loads(core.read_text())
            keys = [("l0", "L0"), ("fvu", "FVU"), ("ce_loss_score", "CE loss recovered"), ("dead_fraction", "dead fraction")]
            cols = st.columns(len(keys))
            for c, (k, name) in zip(cols, keys):
                v = m.get(k)
                c.metric(name, f"{v:.4g}" if isinstance(v, (int, float)) and math.isfinite(v) else "—")
        except (OSError, json.JSONDecodeError):
            st.caption("eval_core.json is unreadable.")
    st.subheader("Dashboards")
    if db is None:
        missing_dashboard(path)
        return
    st.caption(provenance_caption(db))
    counts = db.counts()
    c = st.columns(4)
    c[0].metric("Latents computed", f"{counts['computed']:,} / {db.d_sae:,}")
    c[1].metric("Live", f"{counts['live']:,}")
    c[2].metric("Dead", f"{counts['dead']:,}")
    c[3].metric("Dense", f"{counts['dense']:,}")
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
            st.button(f"#{f} · {lab}", key=f"lab_{f}", on_click=S.go_to, args=(f,))
