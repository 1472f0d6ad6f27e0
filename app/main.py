"""saebench feature browser: ``saebench browse ROOT`` (or ``streamlit run app/main.py -- --root ROOT``).

Sidebar: SAE picker (every SAE folder under the root), page, latent index with previous / next /
random and an "only live latents" switch. Pages: SAE overview, Feature, Search, Steer, Evals. The
navigation state lives in the URL (``?sae=...&feature=...&page=...``), so every view is a deep link.
"""

from __future__ import annotations

import streamlit as st
from saebench.app import page_compare, page_evals, page_feature, page_overview, page_search, page_steer
from saebench.app import render as R
from saebench.app import state as S
from saebench.layout import CFG_FILE, LEGACY_WEIGHTS_FILE, WEIGHTS_FILE


def _sae_option(info: dict, rel: str) -> str:
    _, _, cfg, has_dash = info[rel]
    arch = cfg.get("architecture", "?")
    d_sae = cfg.get("d_sae", "?")
    return f"{rel} · {arch} · {d_sae} latents" + ("" if has_dash else " · no dashboards")


def run() -> None:
    st.set_page_config(page_title="saebench · feature browser", layout="wide")
    cfg = S.app_config()
    saes, skipped = S.list_saes(str(cfg.root))
    rels = [s[0] for s in saes]
    warnings = S.init_from_url(rels)
    st.session_state.setdefault("page", "Feature")

    sb = st.sidebar
    sb.title("saebench")
    sb.caption(f"Browsing `{cfg.root}`")
    page = sb.radio("Page", S.PAGES, key="page", horizontal=True)
    for w in warnings:
        st.warning(w)
    if skipped:
        st.warning(f"Skipped {len(skipped)} SAE folder{'s' if len(skipped) != 1 else ''} that cannot be read:\n\n"
                   + "\n".join(f"- {R.code(rel)}: {R.md(reason)}" for rel, reason in skipped[:20])
                   + (f"\n- … and {len(skipped) - 20} more" if len(skipped) > 20 else ""))

    if not saes:
        if page == "Evals":
            page_evals.render(cfg)
        else:
            st.title("No SAEs here yet")
            st.info(
                f"There is no SAE folder under `{cfg.root}`. An SAE folder holds `{CFG_FILE}` plus `{WEIGHTS_FILE}` "
                f"(SAELens' layout, which saebench writes; `{LEGACY_WEIGHTS_FILE}` in older saebench folders). Train one, then build its dashboards:"
            )
            st.code(f"saebench train --out-dir {cfg.root}/my-sae\nsaebench dashboards {cfg.root}/my-sae", language="bash")
        S.sync_url()
        return

    if st.session_state.get("sae") not in rels:
        st.session_state["sae"] = rels[0]
    info = {s[0]: s for s in saes}
    rel = sb.selectbox("SAE", rels, key="sae", format_func=lambda r: _sae_option(info, r))
    _, path, sae_cfg, _ = info[rel]
    db = S.get_dashboard(path)
    d_sae = int(sae_cfg.get("d_sae") or (db.d_sae if db else 1))
    if not 0 <= int(st.session_state.get("feature", 0)) < d_sae:
        st.session_state["feature"] = 0

    sb.number_input(f"Latent (0 – {d_sae - 1})", min_value=0, max_value=d_sae - 1, step=1, key="feature")
    c1, c2 = sb.columns(2)
    c1.button("◀ Previous", key="nav_prev", on_click=S.nav_step, args=(db, d_sae, -1), width="stretch")
    c2.button("Next ▶", key="nav_next", on_click=S.nav_step, args=(db, d_sae, 1), width="stretch")
    sb.button("Random latent", key="nav_random", on_click=S.nav_random, args=(db, d_sae), width="stretch")
    sb.checkbox("Only live latents", key="live_only", help="Previous / next / random skip latents that never fired.")
    if db is None:
        sb.caption("No dashboards for this SAE.")
    else:
        counts = db.counts()
        n_tok = db.provenance.get("n_tokens") or 0
        sb.caption(f"{counts['live']:,} live · {counts['dead']:,} dead · {counts['dense']:,} dense "
                   f"(never fired / dense on the {n_tok:,} dashboard tokens)"
                   + ("" if db.complete else f" · build unfinished ({counts['computed']:,}/{d_sae:,} computed)"))

    try:
        if page == "SAE":
            page_overview.render(cfg, rel, path, sae_cfg, db)
        elif page == "Feature":
            page_feature.render(cfg, rel, path, db, d_sae)
        elif page == "Search":
            page_search.render(cfg, rel, path, db)
        elif page == "Compare":
            page_compare.render(cfg, rel, path, sae_cfg, db, [(r, p, c, h) for r, p, c, h in saes])
        elif page == "Steer":
            page_steer.render(cfg, rel, path, db, d_sae)
        else:
            page_evals.render(cfg)
    except Exception as e:  # noqa: BLE001 - one line instead of a traceback (Streamlit's reruns are BaseExceptions)
        msg = (str(e).splitlines() or [""])[0].replace(str(cfg.root), "<root>")[:300]
        st.error(f"This page could not be shown for {R.code(rel)}: {type(e).__name__}: {R.md(msg)}")
    S.sync_url()


run()
