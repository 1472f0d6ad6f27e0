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
# # 2. Load SAEs and run the benchmark evals, with the Pareto plots
#
# `evals.bench.run_bench` evaluates every SAE folder with every eval asked for (core metrics with CE
# loss recovered, dead/dense latents, the SAEBench interface check; steering and circuits too, see
# notebooks 3 and 4), caches each result under its SAE's checksum, and writes `results.csv` /
# `.parquet` / `.json` plus offline HTML figures.
#
# It reads the SAEs notebook 1 trained in `RUN_DIR`; if there are none (a fresh checkout), it trains
# the preset's comparison first.

# %% tags=["parameters"]
RUN_DIR = "runs/notebooks"  # where notebook 1 trained
SIZE = "full"  # "full" (documented run) or "smoke" (CI)
EVALS = ["core", "dead", "compat"]  # also possible: "steering", "circuits" (slow; see notebooks 3 and 4)
EVAL_TOKENS = None  # held-out tokens for CE/KL and reconstruction; None: 16,384 (full) / 256 (smoke)
DEAD_TOKENS = None  # held-out tokens for the dead-latent window; None: 65,536 (full) / 512 (smoke)
BENCH_DIR = None  # None: RUN_DIR/bench

# %%
from pathlib import Path

import pandas as pd

from saebench import notebook
from saebench.evals import plots
from saebench.evals.bench import format_rows, run_bench
from saebench.models import load_model
from saebench.sae import load_sae

EVAL_TOKENS = EVAL_TOKENS or {"full": 16_384, "smoke": 256}[SIZE]
DEAD_TOKENS = DEAD_TOKENS or {"full": 65_536, "smoke": 512}[SIZE]
BENCH_DIR = BENCH_DIR or str(Path(RUN_DIR) / "bench")
model = load_model()

# %% [markdown]
# ## The SAEs

# %%
sae_dirs = notebook.ensure_comparison_saes(RUN_DIR, size=SIZE, model=model)  # notebook 1's SAEs (trains the preset's if there are none)
saes = {d.name: load_sae(d) for d in sae_dirs}
pd.DataFrame([{"sae": name, "architecture": s.cfg.architecture, "hook": s.cfg.hook_name, "d_in": s.cfg.d_in, "d_sae": s.cfg.d_sae,
               "k": s.cfg.k, "trained on": s.cfg.metadata.get("training_tokens"), "context": s.cfg.context_size}
              for name, s in saes.items()])

# %% [markdown]
# ## Run the benchmark
#
# Core and dead run in one shared pass per hook: one clean forward and the zero-ablation terms per
# batch for all SAEs, plus one spliced forward per SAE. The dead-latent window is stated in tokens.

# %%
context = next(iter(saes.values())).cfg.context_size or 128
res = run_bench(sae_dirs, EVALS, model, out_dir=BENCH_DIR, eval_tokens=EVAL_TOKENS, dead_tokens=DEAD_TOKENS, context_size=context)
print(format_rows(res.rows))
print(f"\n{len(res.computed)} results computed, {len(res.cached)} from cache")
for name, path in res.files.items():
    print(f"{name:>28}: {path}")

# %%
cols = ["sae", "architecture", "l0", "fvu", "explained_variance", "cossim", "ce_loss_score", "kl_div_score", "ce_loss_without_sae",
        "ce_loss_with_sae", "ce_loss_with_ablation", "dead_fraction", "dead_window_tokens", "dense_fraction_1pct", "saebench_compatible"]
pd.DataFrame(res.rows)[[c for c in cols if c in res.rows[0]]]

# %% [markdown]
# ## Pareto plots
#
# Sparsity (L0, lower is sparser) against CE loss recovered (higher is better) and FVU (lower is
# better). The dotted line is the Pareto front over all SAEs; hover a point for its folder.

# %%
plots.pareto_figure(res.rows, "l0", "ce_loss_score", higher_is_better=True, title="CE loss recovered vs L0")

# %%
plots.pareto_figure(res.rows, "l0", "fvu", higher_is_better=False, title="FVU vs L0 (lower is better)")

# %%
plots.dead_latents_figure(res.rows)

# %% [markdown]
# ## Cached, resumable
#
# Running the bench again computes nothing: every result is looked up under the SAE's weights
# checksum, the model and the eval's settings (given a model *name* instead of a loaded model, a
# fully cached run does not even load it). Add an SAE folder, or an eval, and only that is computed.

# %%
again = run_bench(sae_dirs, EVALS, model, out_dir=BENCH_DIR, eval_tokens=EVAL_TOKENS, dead_tokens=DEAD_TOKENS, context_size=context, figures=False,
                  progress=False)
print(f"{len(again.computed)} computed, {len(again.cached)} from cache")
assert not again.computed

# %% [markdown]
# The same from a shell: `saebench bench RUN_DIR/saes --evals core dead compat --out RUN_DIR/bench`.
# The figures are offline HTML pages in `BENCH_DIR/figures/`; the browser's Evals page (notebook 5)
# shows the same table and plots.
