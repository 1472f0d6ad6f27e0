"""Steering: default and steered generations side by side (same seed), plus next-token log-prob changes.

All steering math is :mod:`saebench.steering`'s: the vector is ``strength · max_act · W_dec[latent]``
with ``max_act`` the latent's largest |activation| in the dashboard's token set.
"""

from __future__ import annotations

import re
from types import SimpleNamespace

import streamlit as st
from saebench.app import render as R
from saebench.app import state as S

from saebench import dashboards as D

SCOPE_HELP = {
    "all": "every position (prompt and generated tokens)",
    "prompt": "prompt positions only",
    "generated": "generated positions only (the first new token is still unsteered)",
}
_RESID = re.compile(r"^blocks\.\d+\.hook_resid_(pre|mid|post)$")


def hook_choices(sae_hook: str, n_layers: int) -> list[str]:
    """The SAE's own hook, plus every residual-stream hook when the SAE reads the residual stream
    (the decoder direction lives in the same space there)."""
    out = [sae_hook]
    if _RESID.match(sae_hook):
        for layer in range(n_layers):
            for kind in ("resid_pre", "resid_post"):
                h = f"blocks.{layer}.hook_{kind}"
                if h not in out:
                    out.append(h)
    return out


def sae_at_hook(sae, hook: str):
    """A view of ``sae`` whose cfg names another hook (what the steering functions read)."""
    if hook == sae.cfg.hook_name:
        return sae
    return SimpleNamespace(cfg=sae.cfg.model_copy(update={"hook_name": hook, "hook_head_index": None}), W_dec=sae.W_dec)


def render(cfg: S.AppConfig, rel: str, path: str, db: D.Dashboard | None, d_sae: int) -> None:
    i = int(st.session_state.get("feature", 0))
    label = db.label(i)[0] if db is not None else ""
    st.header(f"Steer with latent {i}" + (f" · {R.md(label)}" if label else ""))
    try:
        from saebench import steering
    except ImportError as e:
        st.error(f"Steering is not available: {e}")
        return
    sae = S.sae_for(cfg, path)
    model, err = S.model_for(cfg, sae)
    if err:
        st.error(err)
        return

    f = S.payload(db, i)[0] if db is not None else None
    max_act = f.max_abs_act if f is not None else 0.0
    if max_act <= 0:
        why = "this SAE has no dashboards" if db is None else ("the latent is dead" if f is not None and f.dead else "the latent is not computed yet")
        st.info(f"Strength is in units of the latent's max activation, which is unknown because {why}. Set one by hand:")
        max_act = st.number_input("Max activation", min_value=0.0, value=1.0, step=0.1, key="steer_max_act")
    else:
        st.caption(f"Strength is in units of this latent's max |activation| in the dashboard tokens: **{max_act:.4g}**. "
                   "Negative strengths push the other way.")

    with st.form("steer_form", border=True):
        prompt = st.text_area("Prompt", value="The weather today is", key="steer_prompt", height=80)
        c1, c2, c3 = st.columns(3)
        strength = c1.slider("Strength (× max activation)", -20.0, 20.0, 4.0, 0.5, key="steer_strength")
        hooks = hook_choices(sae.cfg.hook_name, int(model.cfg.n_layers))
        hook = c2.selectbox("Hook", hooks, key="steer_hook", help="Where the decoder direction is added.")
        scope = c3.selectbox("Position scope", list(steering.SCOPES), index=list(steering.SCOPES).index("all"), key="steer_scope",
                             format_func=lambda s: f"{s}: {SCOPE_HELP.get(s, '')}")
        c4, c5, c6 = st.columns(3)
        seed = c4.number_input("Seed", min_value=0, value=0, step=1, key="steer_seed")
        temperature = c5.slider("Temperature", 0.0, 2.0, 1.0, 0.05, key="steer_temperature", help="0 is greedy.")
        n_new = c6.slider("New tokens", 1, 128, 30, key="steer_tokens")
        go = st.form_submit_button("Generate", type="primary")
    if go:
        if not prompt.strip():
            st.warning("Type a prompt first.")
        else:
            view = sae_at_hook(sae, hook)
            with st.spinner("Generating…"):
                default, steered = steering.steered_pair(model, view, prompt, i, float(strength), float(max_act), scope=scope,
                                                         max_new_tokens=int(n_new), seed=int(seed), temperature=float(temperature))
                diffs = D.next_token_changes(model, view, prompt, i, float(strength), float(max_act), scope=scope, top_n=10)
            st.session_state["steer_result"] = {
                "key": (rel, i), "prompt": prompt, "default": default.new_text, "steered": steered.new_text, "diffs": diffs,
                "settings": f"{strength:+g} × {max_act:.3g} at {hook}, scope {scope}, seed {seed}, T={temperature:g}",
            }
    res = st.session_state.get("steer_result")
    if not res or res["key"] != (rel, i):
        return
    a, b = st.columns(2)
    for col, name, text, css in ((a, "DEFAULT", res["default"], "steer-default"), (b, "STEERED", res["steered"], "steer-steered")):
        with col.container(border=True):
            st.markdown(f"**{name}**" + ("" if name == "DEFAULT" else f" · {R.md(res['settings'])}"))
            st.html(f'<div id="{css}" style="white-space:pre-wrap;font-family:ui-monospace,monospace;font-size:.85rem">'
                    f'<span style="color:#888">{R.esc(res["prompt"])}</span>{R.esc(text)}</div>')
    diffs = res["diffs"]
    if diffs:
        if all(abs(v) < 1e-9 for _, v in diffs):
            st.caption("Next-token log-probabilities are unchanged (under the 'generated' scope the prompt is not steered).")
        else:
            st.plotly_chart(R.bar_figure([t for t, _ in diffs], [v for _, v in diffs], "Next-token log-prob change (steered − default)"),
                            key="steer_diffs")
            st.caption("Ranked among the tokens plausible under either run (each run's top 50 cut to 95% of its probability mass), "
                       "so rare subwords whose tiny probabilities move a lot do not crowd the chart.")
