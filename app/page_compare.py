"""Compare SAEs: for one latent, its closest latents in the OTHER SAEs that read the same hook.

Two measures, side by side: decoder cosine (always; only ``W_dec`` is read) and co-activation, the
Pearson correlation of activations over the same tokens (when both SAEs' dashboards scanned the
same token set and kept their sparse codes). Every match opens that latent in its own SAE: how a
feature splits, merges or persists across widths, methods and seeds.
"""

from __future__ import annotations

import streamlit as st
from saebench.app import render as R
from saebench.app import state as S

from saebench import dashboards as D

N_MATCHES = 5


def render(cfg: S.AppConfig, rel: str, path: str, sae_cfg: dict, db: D.Dashboard | None,
           saes: list[tuple[str, str, dict, bool]]) -> None:
    i = int(st.session_state.get("feature", 0))
    label = db.label(i)[0] if db is not None else ""
    hook = sae_cfg.get("hook_name", "?")
    st.header(f"Latent {i} across SAEs" + (f" · {R.md(label)}" if label else ""))
    st.caption(f"{R.code(rel)} reads {R.code(hook)}. Closest latents in every other SAE on that hook: by decoder cosine, "
               "and by co-activation (Pearson r of activations on the same dashboard tokens).")
    others = [(r, p, c, h) for r, p, c, h in saes if r != rel and D.same_site(sae_cfg, c)]
    if not others:
        st.info(f"No other SAE under the browse root reads {R.code(hook)} with d_in = {sae_cfg.get('d_in', '?')}. "
                "Train or copy one there (another width, method or seed) to compare.")
        return
    summ = db.summary(i) if db is not None else None
    if summ:
        st.html(R.summary_html(summ, compact=True))
    W_self = S.decoder_directions(path)
    if not 0 <= i < W_self.shape[0]:
        st.warning(f"Latent {i} is out of range for this SAE.")
        return
    direction = W_self[i]
    codes_self = S.token_codes(db) if db is not None else None
    pos = vals = None
    if codes_self is not None:
        pos, vals = codes_self.latent(i)
    for other_rel, other_path, other_cfg, _ in others:
        with st.container(border=True):
            st.markdown(f"**{R.md(other_rel)}** · {R.md(str(other_cfg.get('architecture', '?')))} · {other_cfg.get('d_sae', '?'):,} latents"
                        + ("" if other_cfg.get("model_name") == sae_cfg.get("model_name") else " · ⚠ another model name in its cfg.json"))
            other_db = S.get_dashboard(other_path)
            a, b = st.columns(2)
            with a:
                st.caption("Decoder cosine")
                cos = D.cosine_matches(direction, S.decoder_directions(other_path), N_MATCHES)
                _buttons(other_rel, other_db, cos, "cos")
            with b:
                st.caption("Co-activation on the same tokens (Pearson r)")
                why = _coact_unavailable(db, other_db, codes_self)
                if why:
                    st.caption(why)
                elif pos is not None and len(pos) == 0:
                    st.caption(f"Latent {i} never fired on the dashboard tokens.")
                else:
                    codes_other = S.token_codes(other_db)
                    m = codes_self._stat(codes_self.mean, i), codes_self._stat(codes_self.std, i)
                    r = codes_other.coactivation(pos, vals, m[0], m[1], N_MATCHES)
                    if not r:
                        st.caption("No latent of this SAE co-activates with it.")
                    _buttons(other_rel, other_db, r, "r")


def _coact_unavailable(db: D.Dashboard | None, other_db: D.Dashboard | None, codes_self) -> str:
    if db is None or other_db is None:
        return "Needs the dashboards of both SAEs (" + ("this one" if db is None else "that one") + " has none)."
    if codes_self is None or not D.TokenCodes.available(other_db.folder):
        return "Needs dashboards that kept their sparse codes (built by this version); rebuild with --no-resume."
    if not D.same_tokens(db.folder, other_db.folder):
        return "The two dashboards scanned different tokens (other corpus, split, context size or token count)."
    return ""


def _buttons(other_rel: str, other_db: D.Dashboard | None, matches: list[tuple[int, float]], what: str) -> None:
    ids = [j for j, _ in matches]
    labels = other_db.labels(ids) if other_db is not None else {}
    summaries = other_db.summaries(ids) if other_db is not None else {}
    for j, v in matches:
        desc = labels.get(j) or R.short_summary(summaries.get(j))
        st.button(f"#{j} · {what} {v:+.3f}" + (f" · {R.md(desc)}" if desc else ""), key=f"cmp_{other_rel}_{what}_{j}",
                  on_click=S.go_to_sae, args=(other_rel, j), width="stretch",
                  help=f"Open latent {j} of {other_rel}")
