"""Search: where latents fire on words, by peak token, by label / automatic summary, and prompt → top latents.

Every search is bounded (``saebench.dashboards.query_words``: characters, distinct words, a time limit
per query and a few searches at a time), says what it cut, and pages all its hits.
"""

from __future__ import annotations

import streamlit as st
from saebench.app import render as R
from saebench.app import state as S
from saebench.app.page_feature import missing_dashboard

from saebench import dashboards as D

MODES = ("Text in top examples", "Token", "Label / explanation", "Prompt → top latents")
PAGE_SIZE = 20


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
        MODES[0]: "Words on which a latent FIRES in its stored examples (all words must match); ranked by the activation "
                  "at those words relative to the latent's max.",
        MODES[1]: "A token on which a latent's top examples peak, e.g. `the` or `Paris` (case and edge spaces ignored).",
        MODES[2]: "Words in a label or explanation you wrote, in a latent's automatic (autointerp) explanation, or in its automatic "
                  "statistical summary.",
    }[mode]
    with st.form("search_form", border=False):
        q = st.text_input("Query", key="search_query", help=help_)
        st.form_submit_button("Search")
    if not q.strip():
        st.caption(help_)
        return
    state = (rel, mode, q)
    if st.session_state.get("search_state") != state:
        st.session_state["search_state"] = state
        st.session_state["search_offset"] = 0
    if mode == MODES[0]:
        page = db.search_fires(q)
    elif mode == MODES[1]:
        page = D.SearchPage(db.search_token(q), 0)
        page.total = len(page.hits)
        if len(q) > D.MAX_QUERY_CHARS:
            page.notes.append(f"A token is at most {D.MAX_QUERY_CHARS:,} characters; nothing matches this query.")
    else:
        page = _label_search(db, q)
    for note in page.notes:
        st.warning(note)
    total = page.total
    off = min(int(st.session_state.get("search_offset", 0)), max(total - 1, 0)) // PAGE_SIZE * PAGE_SIZE
    shown = page.hits[off : off + PAGE_SIZE]
    st.caption(f"{total:,} result{'s' if total != 1 else ''}" + (f" · showing {off + 1:,}–{off + len(shown):,}" if total > PAGE_SIZE else ""))
    ids = [_fid(h) for h in shown]
    labels = db.labels(ids)
    summaries = db.summaries(ids)
    for n, h in enumerate(shown):
        f = _fid(h)
        c1, c2 = st.columns([1, 6], vertical_alignment="center")
        c1.button(f"#{f}", key=f"hit_{off + n}_{f}", on_click=S.go_to, args=(f,), width="stretch",
                  help=R.md(labels[f]) if f in labels else f"Open latent {f}")
        with c2:
            if f in labels and mode != MODES[2]:
                st.caption(R.md(labels[f]))
            st.html(_hit_html(db, mode, h, summaries.get(f)))
    if total > PAGE_SIZE:
        a, b, _ = st.columns([1, 1, 4])
        a.button("◀ Previous page", key="search_prev", disabled=off == 0, on_click=_set_offset, args=(off - PAGE_SIZE,))
        b.button("Next page ▶", key="search_next", disabled=off + PAGE_SIZE >= total, on_click=_set_offset, args=(off + PAGE_SIZE,))


def _set_offset(off: int) -> None:
    st.session_state["search_offset"] = max(0, off)


def _fid(h) -> int:
    return h[0] if isinstance(h, tuple) else int(h)


def _label_search(db: D.Dashboard, q: str) -> D.SearchPage:
    """User labels first, then autointerp explanations, then automatic summaries
    (each hit: (latent, 'label'|'explanation'|'auto', label, explanation))."""
    _, notes = D.query_words(q)
    user = db.search_labels(q, limit=2000)
    expl = db.search_explanations(q)
    auto = db.search_summaries(q)
    seen = {f for f, _, _ in user}
    hits = [(f, "label", lab, exp) for f, lab, exp in user]
    hits += [(f, "explanation", "", "") for f in expl.hits if f not in seen]
    seen |= set(expl.hits)
    hits += [(f, "auto", "", "") for f in auto.hits if f not in seen]
    return D.SearchPage(hits, len(hits), list(dict.fromkeys(notes + expl.notes + auto.notes)))


def _hit_html(db: D.Dashboard, mode: str, h, summ: dict | None) -> str:
    if mode == MODES[0]:
        ex = db.example(h.feature, h.kind, h.rank)
        at = " · ".join(f"{R.quoted(w)} {v:.3g} ({r:.0%} of max)" for w, (v, r) in h.words.items())
        head = (f'<div class="sb-summary">fires on {at} · density {R.esc(R.fmt_density(h.density))}</div>' if h.words
                else f'<div class="sb-summary">words found in its top examples · density {R.esc(R.fmt_density(h.density))}</div>')
        if ex is None:
            return R.STYLE + head
        match = frozenset(j for j in D.word_tokens(ex.tokens, h.words) if ex.acts[j] != 0)
        scale = max((abs(v) for v in ex.acts), default=1.0) or 1.0
        return R.STYLE + head + R.examples_html([(ex.value, ex.tokens, ex.acts, ex.peak_index, ex.special, match)], scale)
    if mode == MODES[1]:
        toks = ", ".join(R.quoted(t) for t in h.tokens)
        return (R.STYLE + f'<div class="sb-summary">peaks on {toks} in {h.n} top example{"s" if h.n != 1 else ""} '
                f"(max {h.max_value:.3g}) · density {R.esc(R.fmt_density(h.density))}</div>")
    _, kind, lab, exp = h
    if kind == "label":
        return R.STYLE + f'<span class="sb-list"><b>{R.esc(lab)}</b> {R.esc(exp)}</span>'
    if kind == "explanation":
        e = db.explanation(h[0])
        return R.explanation_html(e, compact=True).replace('id="auto-explanation"', 'data-hit="explanation"') if e else ""
    return R.summary_html(summ or {}, compact=True).replace('id="auto-summary"', "") + R.STYLE + '<span class="sb-list" style="color:#888">automatic summary</span>'


def _prompt_search(cfg: S.AppConfig, rel: str, path: str, db: D.Dashboard | None) -> None:
    """Prompt → the top latents at every token (live: runs the model and the SAE)."""
    with st.form("prompt_search_form", border=False):
        text = st.text_area("Prompt", key="prompt_search_text", height=90, placeholder="Text to find the most active latents on",
                            help=f"The first {D.PROMPT_MAX_TOKENS} tokens are run (a longer text is cut, and the page says so).")
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
                                                    "top": D.top_latents_per_token(acts, n), "n_total": acts.n_prompt_tokens}
    res = st.session_state.get("prompt_search_result")
    if not res or res["sae"] != rel:
        return
    if res.get("n_total", 0) > len(res["tokens"]):
        st.warning(f"Your text has {res['n_total']:,} tokens; only the first {len(res['tokens']):,} were run.")
    ids = sorted({j for row in res["top"] for j, _ in row})
    labels = db.labels(ids) if db is not None else {}
    rows = []
    best: dict[int, float] = {}
    for pos, (tok, special, top) in enumerate(zip(res["tokens"], res["special"], res["top"])):
        for j, v in top:
            best[j] = max(best.get(j, 0.0), abs(v))
        if special:
            cells = "<i>(special token, masked)</i>"
        else:
            cells = ", ".join(f'<a href="{R.esc(S.feature_link(rel, j))}" target="_self">#{j}</a> ({v:.3g})'
                              + (f" {R.esc(labels[j])}" if j in labels else "") for j, v in top) or "—"
        rows.append(f'<tr><td>{pos}</td><td class="t">{R.esc(repr(R.visible_token(tok)))}</td><td>{cells}</td></tr>')
    st.html(R.STYLE + '<table class="sb-table" id="prompt-top-latents"><tr><th>pos</th><th>token</th><th>top latents (open in this tab)</th></tr>'
            + "".join(rows) + "</table>")
    if best:
        order = sorted(best, key=lambda j: -best[j])
        c1, c2 = st.columns([3, 1], vertical_alignment="bottom")
        c1.selectbox("Open a latent", order, key="prompt_search_pick",
                     format_func=lambda j: f"#{j} · max {best[j]:.3g}" + (f" · {labels[j]}" if j in labels else ""))
        c2.button("Open", key="prompt_search_open", on_click=lambda: S.go_to(int(st.session_state["prompt_search_pick"])), width="stretch")
