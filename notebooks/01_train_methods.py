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
# # 1. Train SAEs on a model layer, comparing several methods
#
# One activation harvest of SmolLM2-135M (the embedded, offline default model) feeds several SAEs
# trained side by side: TopK, BatchTopK, JumpReLU and AbsTopK by default (any method listed by
# `saebench methods` works). The SAEs land in `RUN_DIR/saes/<hook>/<method>/`, where notebooks 2–5
# find them.
#
# `SIZE = "full"` is the documented run (see `notebooks/README.md` for its wall time);
# `SIZE = "smoke"` is what CI executes: a few thousand tokens at an early layer, seconds on a CPU.

# %% tags=["parameters"]
RUN_DIR = "runs/notebooks"  # notebook 1 trains here; notebooks 2-5 read from here
SIZE = "full"  # "full" (documented run) or "smoke" (CI: tiny token counts, early layer)
METHODS = None  # None: the preset's methods, e.g. ["topk", "batchtopk", "jumprelu", "abstopk", "vsae"]
OVERRIDES = {}  # any TrainConfig field for every SAE, e.g. {"hook_name": "blocks.10.hook_resid_post", "k": 64, "device": "cuda"}
EVAL_TOKENS = None  # held-out tokens for the quick comparison below; None: 16,384 (full) / 512 (smoke)

# %%
import time

import pandas as pd

from saebench import notebook
from saebench.evals import plots
from saebench.models import load_model
from saebench.trainers.loop import train_many

EVAL_TOKENS = EVAL_TOKENS or {"full": 16_384, "smoke": 512}[SIZE]
model = load_model()  # SmolLM2-135M, offline; pass a hub name or a local folder for another model
print(model.cfg.n_layers, "layers, d_model", model.cfg.d_model)

# %% [markdown]
# ## The configs
#
# `notebook.comparison_configs` gives one `TrainConfig` per method. They share every data setting
# (model, corpus, context, token budget) and one activation cache, so one harvest feeds them all;
# each has its own `out_dir`, where it checkpoints and resumes.

# %%
cfgs = notebook.comparison_configs(RUN_DIR, METHODS, size=SIZE, **OVERRIDES)
shown = ["method", "hook_name", "d_sae", "expansion_factor", "k", "harvest_tokens", "training_tokens", "batch_size_tokens", "context_size",
         "method_options", "out_dir"]
pd.DataFrame([{f: getattr(c, f) for f in shown} for c in cfgs])

# %% [markdown]
# ## Train
#
# `train_many` harvests the activations once into `RUN_DIR/activations/` (checksummed shards, reused
# by a rerun) and then steps every SAE on each batch. Interrupt it and run the cell again: every SAE
# resumes from its last checkpoint.

# %%
t0 = time.time()
results = train_many(cfgs, model=model)
print(f"harvest + training: {time.time() - t0:.0f} s")
sae_dirs = [r.out_dir for r in results]
pd.DataFrame([{"method": c.method, "steps": r.steps, "train_seconds": round(r.seconds, 1), "final_fvu": r.history[-1]["fvu"],
               "final_l0": r.history[-1]["l0"], "out_dir": str(r.out_dir)} for c, r in zip(cfgs, results)])

# %% [markdown]
# ## Training curves
#
# Batch FVU, L0 and dead fraction as logged (`training_log.json` in each SAE folder). BatchTopK and
# JumpReLU have a variable L0 per token; TopK and AbsTopK have exactly k.

# %%
notebook.training_curves_figure(sae_dirs)

# %% [markdown]
# ## A quick comparison on held-out text
#
# FVU, L0 and dead latents on the held-out split, from one shared pass that stops after the hook's
# block (no CE loss here: notebook 2 runs the full benchmark, with CE loss recovered and the Pareto
# plots).

# %%
rows = notebook.reconstruction_rows(sae_dirs, model, eval_tokens=EVAL_TOKENS)
pd.DataFrame(rows)[["sae", "architecture", "d_sae", "l0", "fvu", "cossim", "dead_fraction", "dead_window_tokens", "train_seconds"]]

# %%
plots.pareto_figure(rows, "l0", "fvu", higher_is_better=False, title=f"Held-out FVU vs L0 ({EVAL_TOKENS:,} tokens)")

# %% [markdown]
# Next: `02_benchmark_evals` evaluates these SAEs with the benchmark evals; `05_browser` opens them
# in the feature browser. From a shell the same training is
# `saebench train --config FILE.toml` per SAE, or one sweep file through `saebench.api.train_and_evaluate_many`.
