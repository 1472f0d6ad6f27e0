"""The feature page: one latent's examples, histograms, logit effects, neighbours, label and live test."""

from __future__ import annotations

import streamlit as st
from saebench.app import render as R
from saebench.app import state as S

from saebench import dashboards as D


def missing_dashboard(path: str, what: str = "this SAE") -> None:
    """The empty state for an SAE without dashboards: what is missing and the exact command."""
    st.info(f"No dashboards for {what} yet. Build them (one pass over held-out text) with:")
    st.code(D.build_command(path), language="bash")


def provenance_caption(db: D.Dashboard) -> str:
    p = db.provenance
    n = p.get("n_tokens") or 0
    return (f"Examples from {n:,} tokens ({p.get('n_sequences', '?')} sequences × {p.get('context_size', '?')}) of "
            f"{R.code(p.get('corpus', '?'))} ({p.get('split', '?')} split) · model {R.code(p.get('model', '?'))} · "
            f"hook {R.code(p.get('hook_name', '?'))}" + (" · special tokens masked" if p.get("exclude_special_tokens") else "")
            + (f" · {p['n_outlier_tokens']:,} tokens with an activation norm over {p.get('outlier_norm_factor'):g}x the median masked"
               if p.get("n_outlier_tokens") else ""))


def render(cfg: S.AppConfig, rel: str, path: str, db: D.Dashboard | None, d_sae: int) -> None:
    i = int(st.session_state.get("feature", 0))
    if db is None:
        st.header(f"Latent {i}")
        missing_dashboard(path)
        return
    f, examples = S.payload(db, i)
    label, explanation = db.label(i)
    st.header(f"Latent {i}" + (f" · {R.md(label)}" if label else ""))
    if explanation:
        st.caption(R.md(explanation))
    if f is None:
        n_batches = db.meta.get("n_batches", "?")
        st.warning(f"Latent {i} has not been computed yet: the dashboard build is unfinished "
                   f"({db.done_batches}/{n_batches} feature batches). Resume it with:")
        st.code(D.build_command(path), language="bash")
        return
    st.caption(provenance_caption(db))

    signed = bool(db.provenance.get("signed"))
    m = st.columns(5 if signed else 4)
    n_tok = db.provenance.get("n_tokens") or 0
    m[0].metric("Density", R.fmt_density(f.density), help=f"Fraction of the {n_tok:,} (non-special) dashboard tokens on which the latent is non-zero.")
    m[1].metric("Active on", f"{f.n_active:,} tokens", help=f"Of the {n_tok:,} dashboard tokens (see the line above).")
    m[2].metric("Max activation", f"{f.max_act:.4g}" if f.max_act is not None else "—")
    if signed:
        m[3].metric("Min activation", f"{f.min_act:.4g}" if f.min_act is not None else "—")
    flags = (["dead"] if f.dead else []) + (["dense"] if f.dense else [])
    m[-1].metric("Flags", ", ".join(flags) if flags else "—")
    if f.dead:
        st.warning(f"Latent {i} is dead: it never fired on the {db.provenance.get('n_tokens', 0):,} tokens scanned. "
                   "Its decoder direction (logit effects, neighbours) is still shown below.")

    summ = db.summary(i)
    if summ:
        st.html(R.summary_html(summ))
    elif not f.dead:
        st.caption("No automatic summary: these dashboards were built before summaries existed (rebuild them to get one).")
    expl = db.explanation(i)
    if expl:
        st.html(R.explanation_html(expl))
    elif not f.dead:
        st.caption(f"No automatic explanation for latent {i} yet. Generate one (an LLM judge; see docs/EVALS_IMPLEMENTED.md) with: "
                   + R.code(f"saebench autointerp {path} --latents {i}"))

    left, right = st.columns([2, 3], gap="medium")
    with right:
        test = _test_prompt(cfg, rel, path, i, f)
        _examples(f, examples, signed)
    with left:
        marks = []
        if test is not None:
            peak = max(test["values"], key=abs) if test["values"] else 0.0
            marks.append((peak, f"your prompt: {peak:.3g}"))
        if f.act_hist:
            st.plotly_chart(R.histogram_figure(f.act_hist, f"Activations · density {R.fmt_density(f.density)}", marks=marks), key=f"acthist_{i}")
        elif marks:
            st.caption(f"Your prompt's largest activation: {marks[0][0]:.4g}")
        _logits(f, i)
        _neighbours(db, f)
        _label_editor(db, rel, i, label, explanation)
        c1, c2 = st.columns(2)
        c1.button("Steer with this latent →", key="to_steer", on_click=S.go_to, args=(i, "Steer"), type="primary")
        c2.button("Compare across SAEs →", key="to_compare", on_click=S.go_to, args=(i, "Compare"))


def _test_prompt(cfg: S.AppConfig, rel: str, path: str, i: int, f: D.FeatureData) -> dict | None:
    """The "test a prompt" box; returns the latest result for this latent (or None)."""
    with st.form("test_prompt_form", border=True):
        text = st.text_area("Test a prompt", key="test_prompt_text", height=80,
                            placeholder="Type text to see this latent's activation on every token",
                            help=f"The first {D.PROMPT_MAX_TOKENS} tokens are run (a longer text is cut, and the page says so).")
        submitted = st.form_submit_button("Run on my text")
    if submitted:
        if not text.strip():
            st.warning("Type some text first.")
        else:
            sae = S.sae_for(cfg, path)
            model, err = S.model_for(cfg, sae)
            if err:
                st.error(err)
            else:
                acts = D.prompt_activations(model, sae, text)
                st.session_state["test_result"] = {"sae": rel, "feature": i, "prompt": text, "tokens": acts.tokens,
                                                   "values": acts.latent(i), "special": acts.special, "n_total": acts.n_prompt_tokens}
    res = st.session_state.get("test_result")
    if not res or res["sae"] != rel or res["feature"] != i:
        return None
    vals = res["values"]
    peak = max(range(len(vals)), key=lambda j: abs(vals[j])) if vals else None
    scale = max(f.max_abs_act, max((abs(v) for v in vals), default=0.0)) or 1.0
    top = vals[peak] if peak is not None else 0.0
    st.markdown(f"**Your prompt** · max activation **{top:.4g}**" + (f" ({top / f.max_abs_act:.0%} of the dataset max)" if f.max_abs_act else ""))
    if res.get("n_total", 0) > len(res["tokens"]):
        st.warning(f"Your text has {res['n_total']:,} tokens; only the first {len(res['tokens']):,} were run.")
    st.html(R.examples_html([(top, res["tokens"], vals, peak, res["special"])], scale, css_id="test-prompt-result"))
    return res


def _examples(f: D.FeatureData, examples: list[D.Example], signed: bool) -> None:
    scale = f.max_abs_act or 1.0
    top = [e for e in examples if e.kind == "top"]
    bottom = [e for e in examples if e.kind == "bottom"]
    inter = [e for e in examples if e.kind == "interval"]
    if top:
        st.subheader("Top activations")
        st.html(R.examples_html([(e.value, e.tokens, e.acts, e.peak_index, e.special) for e in top], scale, css_id="top-examples"))
    elif not f.dead:
        st.caption("No positive activations.")
    if signed and bottom:
        st.subheader("Most negative activations")
        st.html(R.examples_html([(e.value, e.tokens, e.acts, e.peak_index, e.special) for e in bottom], scale, css_id="bottom-examples"))
    if inter:
        with st.expander(f"Interval samples ({len(f.intervals)} intervals)", expanded=True):
            parts = []
            by_bin: dict[int, list[D.Example]] = {}
            for e in sorted(inter, key=lambda e: -abs(e.value)):
                by_bin.setdefault(e.bin, []).append(e)
            for iv in sorted(f.intervals, key=lambda iv: -iv["hi"]):
                rows = by_bin.get(iv["bin"], [])
                if not rows:
                    continue
                head = f"Interval {iv['lo']:.3g} – {iv['hi']:.3g} · contains {iv['fraction']:.1%}"
                parts.append(R.examples_html([(e.value, e.tokens, e.acts, e.peak_index, e.special) for e in rows], scale, header=head))
            st.html("".join(parts) or "<i>No samples.</i>")


def _logits(f: D.FeatureData, i: int) -> None:
    if not f.logits_pos:
        st.caption("Logit effects are not available for this hook (its width differs from the unembedding's).")
        return
    st.markdown("**Logit effects** (`W_dec · W_U`)")
    a, b = st.columns(2)
    with a:
        st.caption("Negative")
        st.html(R.logit_list_html(f.logits_neg, positive=False))
    with b:
        st.caption("Positive")
        st.html(R.logit_list_html(f.logits_pos, positive=True))
    if f.logit_hist:
        st.plotly_chart(R.histogram_figure(f.logit_hist, "Logit effects over the vocabulary", color="rgb(120,120,200)", xlabel="logit effect"),
                        key=f"logithist_{i}")


def _neighbours(db: D.Dashboard, f: D.FeatureData) -> None:
    st.markdown("**Nearest latents**")
    t1, t2 = st.tabs(["Decoder cosine", "Activation correlation"])
    ids = [j for j, _ in f.cos_neighbours] + [j for j, _ in f.corr_neighbours]
    labels = db.labels(ids)
    summaries = db.summaries(ids)
    for tab, items, what in ((t1, f.cos_neighbours, "cos"), (t2, f.corr_neighbours, "r")):
        with tab:
            if not items:
                st.caption("None (the latent never fired, or nothing co-occurs with it)." if what == "r" else "None.")
            for j, v in items:
                lab = labels.get(j) or R.short_summary(summaries.get(j))
                st.button(f"#{j} · {what} {v:+.3f}" + (f" · {R.md(lab)}" if lab else ""), key=f"nb_{what}_{j}",
                                   on_click=S.go_to, args=(j,), width="stretch")


def _label_editor(db: D.Dashboard, rel: str, i: int, label: str, explanation: str) -> None:
    with st.expander("Label", expanded=not label):
        with st.form(f"label_form_{rel}_{i}", border=False):
            st.text_input("Label", value=label, key=f"label_{rel}_{i}", max_chars=200)
            st.text_area("Explanation", value=explanation, key=f"expl_{rel}_{i}", height=80)
            st.form_submit_button("Save label", on_click=_save_label, args=(db, rel, i))
        msg = st.session_state.pop("label_flash", None)
        if msg:
            (st.success if msg[0] else st.error)(msg[1])


def _save_label(db: D.Dashboard, rel: str, i: int) -> None:
    """Form callback: runs before the rerun, so the page header already shows the new label."""
    try:
        db.set_label(i, st.session_state.get(f"label_{rel}_{i}", ""), st.session_state.get(f"expl_{rel}_{i}", ""))
        st.session_state["label_flash"] = (True, "Label saved.")
    except Exception as e:  # noqa: BLE001 - e.g. a read-only folder
        st.session_state["label_flash"] = (False, f"Could not save the label: {e}")
