"""Steering: default and steered generations side by side (same seed), plus next-token log-prob changes.

All steering math is :mod:`saebench.steering`'s: the vector is ``strength · max_act · W_dec[latent]``
with ``max_act`` the latent's largest |activation| in the dashboard's token set (or, without
dashboards, measured on a capped number of held-out tokens behind a progress bar, or typed in).

A request is :func:`steer_request`: default and steered continuations come from **one batched run of
two rows** (:func:`saebench.steering.steer`) and are streamed into the page token by token; the
next-token log-prob changes come from the same pass. The benchmark
``benchmarks/bench_steering.py`` times this function.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from types import SimpleNamespace
from typing import Any

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
MEASURE_TOKENS = 4_096  # held-out tokens scanned for the max activation when there are no dashboards


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


def steer_request(model, sae, hook: str, prompt: str, latent: int, strength: float, max_act: float, scope: str = "all", *,
                  seed: int = 0, temperature: float = 1.0, n_new: int = 30, top_n: int = 10,
                  on_text: Callable[[str, str], None] | None = None) -> dict[str, Any]:
    """One steering request as the page runs it: default + steered texts, log-prob changes, timing.

    ``on_text(default_new_text, steered_new_text)`` is called after every generated token.
    Returns what the page keeps in session state (texts, diffs, ``seconds``, ``n_new`` tokens
    generated, ``updates`` = number of streamed updates).
    """
    from saebench import steering

    updates = 0

    def stream(a: str, b: str) -> None:
        nonlocal updates
        updates += 1
        if on_text is not None:
            on_text(a, b)

    t0 = time.perf_counter()
    run = steering.steer(model, sae_at_hook(sae, hook), prompt, int(latent), float(strength), float(max_act), scope=scope,
                         max_new_tokens=int(n_new), seed=int(seed), temperature=float(temperature), top_n=top_n, on_text=stream)
    seconds = time.perf_counter() - t0
    n_gen = max(run.default.tokens.shape[1], run.steered.tokens.shape[1]) - run.default.prompt_len
    return {"prompt": prompt, "default": run.default.new_text, "steered": run.steered.new_text, "diffs": run.logprob_diff,
            "seconds": seconds, "n_new": n_gen, "updates": updates}


def _text_html(css: str, prompt: str, text: str) -> str:
    return (f'<div id="{css}" style="white-space:pre-wrap;font-family:ui-monospace,monospace;font-size:.85rem">'
            f'<span style="color:#888">{R.esc(prompt)}</span>{R.esc(text)}</div>')


def _slots(settings: str):
    """The two result boxes (DEFAULT, STEERED) with an empty slot each for the text, and a status line."""
    status = st.empty()
    a, b = st.columns(2)
    out = []
    for col, name in ((a, "DEFAULT"), (b, "STEERED")):
        with col.container(border=True):
            st.markdown(f"**{name}**" + ("" if name == "DEFAULT" else f" · {R.md(settings)}"))
            out.append(st.empty())
    return status, out[0], out[1]


def _measured_max(sae, model, key: tuple) -> tuple[float, int] | None:
    """Without dashboards: a button that measures the max activation on held-out tokens, with a progress bar.

    Returns ``(max |activation|, tokens scanned)`` once measured (kept per session), else None."""
    measured = st.session_state.setdefault("steer_measured", {})
    if key in measured:
        return measured[key]
    corpus = sae.cfg.metadata.get("corpus", "default")
    if not st.button(f"Measure it on {MEASURE_TOKENS:,} held-out tokens of {corpus!r}", key="steer_measure"):
        return None
    from saebench import steering, text

    bar = st.progress(0.0, text="Reading held-out text…")
    try:
        ctx = sae.cfg.context_size or 128
        toks = text.load_tokens(corpus, model.tokenizer, ctx, max(MEASURE_TOKENS, ctx), split="eval", prepend_bos=sae.cfg.prepend_bos)
        t0 = time.perf_counter()

        def tick(done: int, total: int) -> None:
            el = time.perf_counter() - t0
            eta = el / done * (total - done) if done else 0.0
            bar.progress(done / total, text=f"Scanning {done:,} / {total:,} tokens · {el:.0f} s, about {eta:.0f} s left")

        value = steering.max_activation(sae, model, toks, key[1], special_ids=text.special_ids(model.tokenizer), on_progress=tick)
    except Exception as e:  # noqa: BLE001 - shown to the user; the number input still works
        bar.empty()
        st.error(f"Could not measure the max activation: {e}")
        return None
    bar.empty()
    measured[key] = (value, int(toks.numel()))
    return measured[key]


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
        measured = None if (f is not None and f.dead) else _measured_max(sae, model, (rel, i))
        if measured is not None and measured[0] > 0:
            max_act = measured[0]
            st.caption(f"Strength is in units of this latent's max |activation| over {measured[1]:,} held-out tokens: **{max_act:.4g}** "
                       f"(measured here, since {why}; `saebench dashboards` records it over 131,072 tokens).")
        else:
            if measured is not None:
                st.warning(f"Latent {i} never fired on the {measured[1]:,} tokens scanned.")
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
    slots = None
    if go:
        if not prompt.strip():
            st.warning("Type a prompt first.")
        else:
            settings = f"{strength:+g} × {max_act:.3g} at {hook}, scope {scope}, seed {seed}, T={temperature:g}"
            slots = _slots(settings)
            status, ph_default, ph_steered = slots
            t0 = time.perf_counter()
            count = [0]

            def show(a: str, b: str) -> None:
                count[0] += 1
                ph_default.html(_text_html("steer-default", prompt, a))
                ph_steered.html(_text_html("steer-steered", prompt, b))
                status.caption(f"Generating… {count[0]} / {int(n_new)} new tokens · {time.perf_counter() - t0:.1f} s")

            status.caption("Generating…")
            out = steer_request(model, sae, hook, prompt, i, float(strength), float(max_act), scope, seed=int(seed),
                                temperature=float(temperature), n_new=int(n_new), on_text=show)
            st.session_state["steer_result"] = out | {"key": (rel, i), "settings": settings}
    res = st.session_state.get("steer_result")
    if not res or res["key"] != (rel, i):
        return
    status, ph_default, ph_steered = slots if slots is not None else _slots(res["settings"])
    ph_default.html(_text_html("steer-default", res["prompt"], res["default"]))
    ph_steered.html(_text_html("steer-steered", res["prompt"], res["steered"]))
    status.caption(f"Default and steered, {res['n_new']} new tokens each, generated together in {res['seconds']:.2f} s "
                   f"(one batched run, streamed in {res['updates']} steps).")
    diffs = res["diffs"]
    if diffs:
        if all(abs(v) < 1e-9 for _, v in diffs):
            st.caption("Next-token log-probabilities are unchanged (under the 'generated' scope the prompt is not steered).")
        else:
            st.plotly_chart(R.bar_figure([t for t, _ in diffs], [v for _, v in diffs], "Next-token log-prob change (steered − default)"),
                            key="steer_diffs")
            st.caption("Ranked among the tokens plausible under either run (each run's top 50 cut to 95% of its probability mass), "
                       "so rare subwords whose tiny probabilities move a lot do not crowd the chart.")
