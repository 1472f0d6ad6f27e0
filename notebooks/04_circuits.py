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
# # 4. Circuits: a feature circuit for indirect-object identification
#
# "When Mary and John went to the store, John gave a drink to" → " Mary". The metric is the logit
# difference m = logit(IO) − logit(S) at the last position; the corrupt prompt repeats the IO as the
# second subject, which flips the answer.
#
# The nodes are the latents of SAEs at several residual-stream layers, plus one **error node** per
# SAE (x − x̂, so the spliced model equals the model). Each node's indirect effect (attribution
# patching or integrated gradients) is measured on a discovery half of the prompts; on the other half,
# circuits of growing size are kept while every other node is mean-ablated:
#
# - **faithfulness** F(C) = (m(C) − m(∅)) / (m(all) − m(∅)): how much of the behaviour the circuit alone carries;
# - **completeness**, reported as F(all ∖ C): what is left without the circuit (0 = complete).
#
# A sample of nodes is also patched for real to check the attribution. Definitions:
# `docs/EVALS_IMPLEMENTED.md` (Circuits).

# %% tags=["parameters"]
RUN_DIR = "runs/notebooks"
SIZE = "full"  # "full" (documented run) or "smoke" (CI)
TASK = "ioi"  # or "sva", "greater_than"
CIRCUIT_HOOKS = None  # one TopK SAE per hook; None: layers 3, 6, 9 (full) / 1, 2 (smoke) residual stream
N_EXAMPLES = None  # prompt pairs (half discovery, half test); None: 64 / 4
ATTRIBUTION = None  # "ig" (integrated gradients) or "atp" (attribution patching); None: "ig" / "atp"
IG_STEPS = 10
N_PATCH_CHECK = None  # nodes patched for real to check the attribution; None: 16 / 2
CURVE_POINTS = None  # circuit sizes on the curves; None: 16 / 4
COMPARE_METHODS = None  # also one circuit per method of notebook 1 (at its hook); None: True / False

# %%
import pandas as pd
import plotly.graph_objects as go
from IPython.display import display

from saebench import notebook
from saebench.evals import plots
from saebench.evals.circuits import evaluate_circuit
from saebench.evals.tasks import make_task
from saebench.models import load_model
from saebench.sae import load_sae

full = SIZE == "full"
CIRCUIT_HOOKS = list(CIRCUIT_HOOKS or [f"blocks.{layer}.hook_resid_post" for layer in ((3, 6, 9) if full else (1, 2))])
N_EXAMPLES = N_EXAMPLES or (64 if full else 4)
ATTRIBUTION = ATTRIBUTION or ("ig" if full else "atp")
N_PATCH_CHECK = N_PATCH_CHECK or (16 if full else 2)
CURVE_POINTS = CURVE_POINTS or (16 if full else 4)
COMPARE_METHODS = full if COMPARE_METHODS is None else COMPARE_METHODS
CIRCUIT = dict(method=ATTRIBUTION, ig_steps=IG_STEPS, n_patch_check=N_PATCH_CHECK, max_curve_points=CURVE_POINTS, batch_size=16)

model = load_model()
circuit_dirs = notebook.ensure_comparison_saes(RUN_DIR, ["topk"], hooks=CIRCUIT_HOOKS, size=SIZE, model=model)  # trains the missing ones
saes = [load_sae(d) for d in circuit_dirs]
[(s.cfg.hook_name, s.cfg.d_sae, s.cfg.k) for s in saes]

# %% [markdown]
# ## The task

# %%
task = make_task(TASK, model.tokenizer, n=N_EXAMPLES)
tok = model.tokenizer
pd.set_option("display.max_colwidth", None)
pd.DataFrame([{"clean": m["clean"], "corrupt": m["corrupt"], "answer": tok.decode(list(a)), "wrong": tok.decode(list(w))}
              for m, a, w in zip(task.meta, task.answers, task.wrongs)]).head(6)

# %% [markdown]
# ## Discover the circuit

# %%
res = evaluate_circuit(model, saes, task, **CIRCUIT)
summary = {k: res[k] for k in ("m_clean", "m_corrupt", "m_full", "m_empty", "n_nodes_total", "n_nodes_nonzero", "nodes_for_faithfulness_0.8",
                               "nodes_for_faithfulness_0.9", "error_ie_share")}
summary["patch_check_pearson"] = res["patch_check"].get("pearson")
pd.Series(summary)

# %% [markdown]
# The nodes with the largest mean indirect effect: `<hook>/<latent>`, or `<hook>/err` for an SAE's
# error node. A latent can be opened in the feature browser (notebook 5) to see what it responds to.

# %%
pd.DataFrame(res["top_nodes"]).head(15)

# %%
plots.circuit_figure({f"{TASK}: TopK SAEs at {len(saes)} layers": res})

# %%
pc = pd.DataFrame(res["patch_check"].get("nodes", []))
fig = go.Figure(go.Scatter(x=pc.get("patching", []), y=pc.get("attribution", []), mode="markers", text=pc.get("node", []),
                           hovertemplate="%{text}<br>patching %{x:.3g}<br>attribution %{y:.3g}<extra></extra>"))
fig.update_layout(title=f"Attribution ({ATTRIBUTION}) vs real activation patching, r = {res['patch_check'].get('pearson', float('nan')):.3f}",
                  xaxis_title="effect of patching the node", yaxis_title="attributed effect", template="plotly_white")
fig

# %% [markdown]
# ## Which method gives smaller circuits?
#
# One circuit per SAE of notebook 1 (all at one hook): a method whose latents carry the behaviour in
# fewer nodes reaches high faithfulness sooner, and leaves less to its error node.

# %%
if COMPARE_METHODS:
    method_res = {d.name: evaluate_circuit(model, load_sae(d), task, **CIRCUIT) for d in notebook.ensure_comparison_saes(RUN_DIR, size=SIZE, model=model)}
    display(pd.DataFrame([{"sae": k, "nodes for F≥0.8": r["nodes_for_faithfulness_0.8"], "error IE share": r["error_ie_share"],
                           "patch-check r": r["patch_check"].get("pearson")} for k, r in method_res.items()]))
    display(plots.circuit_figure(method_res))

# %% [markdown]
# From a shell: `saebench circuits SAE_DIR [SAE_DIR ...] --tasks ioi --method ig` writes
# `eval_circuits.json`; `saebench bench ... --evals circuits` adds the curves to the benchmark table.
