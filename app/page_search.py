"""Search: by text or token in top examples (FTS5), by label/explanation, and prompt → top latents."""

from __future__ import annotations

import streamlit as st
from saebench.app import render as R
from saebench.app import state as S
from saebench.app.page_feature import missing_dashboard

from saebench import dashboards as D

MODES = ("Text in top examples", "Token", "Label / explanation", "Prompt → top latents")


def render(cfg: S.AppConfig, rel: str, path: str, db: D.Dashboard | None) -> None:
    st.header("Search latents")
    mode = st.radio("Search by", MODES, key="search_mode", horizontal=True)
    if mode == MODES[3]:
        _prompt_search(cfg, rel, path, db)
        return
    if db is None:
        missing_dashboard(path)
        return
    help_ = {
        MODES[0]: "Words that appear in a latent's top-activating contexts (all words must match).",
        MODES[1]: "A token on which a latent's top examples peak, e.g. `the` or `Paris` (case and edge spaces ignored).",
        MODES[2]: "Words in a label or explanation you (or an auto-interp run) wrote.",
    }[mode]
    with st.form("search_form", border=False):
        q = st.text_input("Query", key="search_query", help=help_)
        st.form_submit_button("Search")
    if not q.strip():
        st.caption(help_)
        return
    if mode == MODES[0]:
        hits = [(f, R.snippet_html(snip)) for f, snip in db.search_text(q, limit=25)]
    elif mode == MODES[1]:
        hits = [(f, R.STYLE + f'<span class="sb-list">peaks on <span class="tok" style="background:rgba(255,128,0,.5)">'
                 f"{R.esc(R.visible_token(tok))}</span> in {n} top example{'s' if n != 1 else ''} (max {v:.3g})</span>")
                for f, tok, n, v in db.search_token(q, limit=25)]
    else:
        hits = [(f, R.STYLE + f'<span class="sb-list"><b>{R.esc(lab)}</b> {R.esc(exp)}</span>') for f, lab, exp in db.search_labels(q, limit=25)]
    st.caption(f"{len(hits)} result{'s' if len(hits) != 1 else ''}")
    labels = db.labels([f for f, _ in hits])
    for f, body in hits:
        c1, c2 = st.columns([1, 5], vertical_alignment="center")
        c1.button(f"#{f}", key=f"hit_{f}", on_click=S.go_to, args=(f,), width="stretch",
                  help=labels.get(f) or f"Open latent {f}")
        with c2:
            if f in labels and mode != MODES[2]:
                st.caption(R.md(labels[f]))
            st.html(body)


def _prompt_search(cfg: S.AppConfig, rel: str, path: str, db: D.Dashboard | None) -> None:
    """Prompt → the top latents at every token (live: runs the model and the SAE)."""
    with st.form("prompt_search_form", border=False):
        text = st.text_area("Prompt", key="prompt_search_text", height=90, placeholder="Text to find the most active latents on")
        n = st.slider("Latents per token", 1, 10, 5, key="prompt_search_n")
        go = st.form_submit_button("Find latents")
    if go and text.strip():
        sae = S.sae_for(cfg, path)
        model, err = S.model_for(cfg, sae)
        if err:
            st.error(err)
            return
        acts = D.prompt_activations(model, sae, text)
        st.session_state["prompt_search_result"] = {"sae": rel, "tokens": acts.tokens, "special": acts.special,
                                                    "top": D.top_latents_per_token(acts, n)}
    res = st.session_state.get("prompt_search_result")
    if not res or res["sae"] != rel:
        return
    ids = sorted({j for row in res["top"] for j, _ in row})
    labels = db.labels(ids) if db is not None else {}
    rows = []
    best: dict[int, float] = {}
    for pos, (tok, special, top) in enumerate(zip(res["tokens"], res["special"], res["top"])):
        for j, v in top:
            best[j] = max(best.get(j, 0.0), abs(v))
        cells = ", ".join(f"#{j} ({v:.3g})" + (f" {labels[j]}" if j in labels else "") for j, v in top)
        rows.append({"pos": pos, "token": repr(R.visible_token(tok)), "top latents": "(special token, masked)" if special else (cells or "—")})
    st.dataframe(rows, hide_index=True, width="stretch")
    if best:
        order = sorted(best, key=lambda j: -best[j])
        c1, c2 = st.columns([3, 1], vertical_alignment="bottom")
        c1.selectbox("Open a latent", order, key="prompt_search_pick",
                            format_func=lambda j: f"#{j} · max {best[j]:.3g}" + (f" · {labels[j]}" if j in labels else ""))
        c2.button("Open", key="prompt_search_open", on_click=lambda: S.go_to(int(st.session_state["prompt_search_pick"])), width="stretch")
