# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#       format_version: '1.3'
#       jupytext_version: 1.19.6
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # 5. Open the feature browser on the SAEs just trained
#
# Two steps: precompute each SAE's feature dashboards once (one pass over held-out text, stored in
# `SAE_DIR/dashboards/`), then serve the Streamlit browser over `RUN_DIR`. Everything the browser
# shows can also be queried from Python through `saebench.dashboards.Dashboard`, as below.
# See `docs/BROWSER.md`.

# %% tags=["parameters"]
RUN_DIR = "runs/notebooks"
SIZE = "full"  # "full" (documented run) or "smoke" (CI)
DASHBOARD_TOKENS = None  # held-out positions scanned per SAE; None: 65,536 (full) / 1,024 (smoke)
CONCEPT = "food"  # the latent shown below is this concept's (as in notebook 3)
SEARCH = "bread"  # a word to search in the top examples
PROMPT = "She baked fresh bread and served it with butter and honey."
LAUNCH_BROWSER = False  # True: start the browser server from this notebook (non-blocking; it keeps running)
PORT = 8501

# %%
import subprocess

import pandas as pd
from IPython.display import HTML

from saebench import notebook
from saebench.app import render
from saebench.app.launch import browse_command
from saebench.dashboards import Dashboard, build_dashboards, dashboard_dir, find_saes, prompt_activations, top_latents_per_token
from saebench.evals.steering import select_concept_latent
from saebench.evals.tasks import CONCEPTS
from saebench.models import load_model
from saebench.sae import load_sae

DASHBOARD_TOKENS = DASHBOARD_TOKENS or {"full": 65_536, "smoke": 1_024}[SIZE]
model = load_model()
sae_dirs = notebook.ensure_comparison_saes(RUN_DIR, size=SIZE, model=model)  # notebook 1's SAEs

# %% [markdown]
# ## Precompute the dashboards
#
# Resumable and idempotent: a finished build is returned as is, a killed one resumes at its first
# unfinished feature batch. Shell: `saebench dashboards SAE_DIR`.

# %%
for d in sae_dirs:
    out = build_dashboards(d, model=model, n_tokens=DASHBOARD_TOKENS)
    db = Dashboard(out)
    print(f"{d}: {db.counts()} over {db.provenance.get('n_tokens', 0):,} tokens, "
          f"{db.meta.get('timings', {}).get('total_s', float('nan')):.1f} s")

# %%
pd.DataFrame([{"sae": e.rel, "architecture": e.cfg.get("architecture"), "d_sae": e.cfg.get("d_sae"), "dashboards": e.has_dashboard}
              for e in find_saes(RUN_DIR)])

# %% [markdown]
# ## One latent, queried headless
#
# The concept latent of the first SAE: its statistics, logit effects, top activations (coloured by
# activation, exact value on hover) and activation histogram, as on the browser's Feature page.

# %%
sae_dir = sae_dirs[0]
sae = load_sae(sae_dir)
db = Dashboard(dashboard_dir(sae_dir))
latent = select_concept_latent(model, sae, CONCEPTS[CONCEPT])["latent"]
f = db.feature(latent)
pd.Series({"latent": latent, "density": f.density, "n_active": f.n_active, "max_act": f.max_act, "min_act": f.min_act, "dead": f.dead,
           "dense": f.dense, "top logits": ", ".join(repr(t) for t, _ in f.logits_pos[:6]),
           "bottom logits": ", ".join(repr(t) for t, _ in f.logits_neg[:6]),
           "nearest by decoder cosine": f.cos_neighbours[:5]})

# %%
top = db.examples(latent, "top")[:10]
HTML(render.examples_html([(e.value, e.tokens, e.acts, e.peak_index, e.special) for e in top], f.max_abs_act or 1.0,
                          header=f"latent {latent}: top activations"))

# %%
render.histogram_figure(f.act_hist, f"latent {latent}: non-zero activations") if f.act_hist else "latent never fired on the scanned tokens"

# %% [markdown]
# ## Search, and a prompt's top latents per token

# %%
pd.DataFrame(db.search_text(SEARCH, limit=8), columns=["latent", "snippet"])

# %%
acts = prompt_activations(model, sae, PROMPT)
per_token = top_latents_per_token(acts, n=3)
pd.DataFrame([{"token": t, "top latents (id, value)": [(i, round(v, 2)) for i, v in lat]} for t, lat in zip(acts.tokens, per_token)])

# %%
db.set_label(latent, f"{CONCEPT} (notebook 5)", explanation="DiffMean latent of the concept's texts", source="notebook")
db.search_labels(CONCEPT)

# %% [markdown]
# ## Open the browser
#
# From a shell, in the repository: `saebench browse RUN_DIR` (or the `streamlit run` line printed
# below), then open the URL. The deep link goes straight to this latent's page. The server binds to
# localhost only.

# %%
root_rel = next(e.rel for e in find_saes(RUN_DIR) if e.path.resolve() == sae_dir.resolve())
cmd = browse_command(RUN_DIR, port=PORT)
print(" ".join(cmd))
print(f"http://127.0.0.1:{PORT}/?sae={root_rel}&feature={latent}&page=Feature")

# %%
server = None
if LAUNCH_BROWSER:  # non-blocking: the server runs beside the kernel until terminated
    server = subprocess.Popen(cmd)
    print(f"browser running (pid {server.pid}) at http://127.0.0.1:{PORT}")

# %% [markdown]
# Stop a server started here with `server.terminate()` (it is a child process of the kernel).
