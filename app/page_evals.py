"""Eval dashboard: every SAE's core metrics and the bench results under the root, with Pareto plots."""

from __future__ import annotations

import streamlit as st
from saebench.app import render as R
from saebench.app import state as S
from saebench.evals.results import load_eval_results

COLUMNS = ["sae / run", "eval", "source", "n_tokens", "dead_window_tokens", "method", "architecture", "d_sae", "l0", "fvu",
           "explained_variance", "ce_loss_score", "kl_div_score", "dead_fraction", "dense_fraction_1pct"]


@st.cache_data(ttl=20, show_spinner=False)
def eval_records(root: str) -> list[dict]:
    return load_eval_results(root)


def render(cfg: S.AppConfig) -> None:
    st.header("Evals")
    records = eval_records(str(cfg.root))
    if not records:
        st.info(f"No eval results under `{cfg.root}` yet. The core eval writes `SAE_DIR/eval_core.json`; the benchmark "
                "writes `*results*.json` / `*results*.csv` files. Both are picked up here:")
        st.code("saebench eval SAE_DIR\nsaebench bench ...", language="bash")
        return
    records = [{"sae / run": r.get("sae") or r.get("name") or r.get("run") or r.get("source", "")} | r for r in records]
    cols = [c for c in COLUMNS if any(c in r for r in records)]
    extra = sorted({k for r in records for k in r} - set(cols) - {"sae", "name", "run"})
    st.caption(f"{len(records)} result{'s' if len(records) != 1 else ''}, one row per source file: an SAE with an eval_core.json "
               "and a bench row appears twice, each row saying which eval, file, token count and dead window it comes from. "
               "Lower L0 and FVU are better, higher CE loss recovered is better.")
    per_sae: dict[str, list[dict]] = {}
    for r in records:
        if r.get("sae"):
            per_sae.setdefault(str(r["sae"]), []).append(r)
    multi = {k: v for k, v in per_sae.items() if len(v) > 1}
    if multi:
        st.info("Several sources for " + ", ".join(R.code(k) for k in sorted(multi))
                + ": their numbers are shown side by side below, never one replacing the other.")
    st.dataframe([{c: r.get(c) for c in cols + extra} for r in records], hide_index=True, width="stretch", key="evals_table")
    a, b = st.columns(2)
    with a:
        if any("ce_loss_score" in r for r in records):
            st.plotly_chart(R.pareto_figure(records, "ce_loss_score", "CE loss recovered", maximize=True), key="pareto_ce")
        else:
            st.caption("No CE loss recovered values (run the core eval with downstream metrics).")
    with b:
        if any("fvu" in r for r in records):
            st.plotly_chart(R.pareto_figure(records, "fvu", "FVU", maximize=False), key="pareto_fvu")
