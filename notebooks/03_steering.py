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
# # 3. Steering experiments
#
# 1. find the latents of a concept (DiffMean over labelled texts, with their detection AUROC);
# 2. steer with one of them: generations side by side over a strength sweep (same seed, so the same
#    sampling noise: only the intervention differs), and the next-token log-prob shifts;
# 3. measure the effect against its fluency cost, with a random direction of equal norm and the
#    opposite sign as controls;
# 4. steer one **AbsTopK** latent both ways: signed SAEs give a latent two poles.
#
# Strengths are in units of the latent's max |activation| on held-out text: `v = s · max_act · W_dec[i]`
# is added at the SAE's hook. Definitions: `docs/EVALS_IMPLEMENTED.md` (Steering).

# %% tags=["parameters"]
RUN_DIR = "runs/notebooks"
SIZE = "full"  # "full" (documented run) or "smoke" (CI)
METHOD = "topk"  # the SAE steered in sections 1-3 (notebook 1's folder name)
CONCEPT = "food"  # one of saebench.evals.tasks.CONCEPTS: food, ocean, programming, music
PROMPT = "Here is what I think about the weekend:"
STRENGTHS = None  # sweep of the eval; None: (0.5, 1, 2, 4, 8) (full) / (4,) (smoke)
SIDE_BY_SIDE = None  # strengths shown as generations; None: (0, 1, 2, 4, 8) / (0, 4)
N_PROMPTS = None  # steering prompts of the eval (half select the strength, half test it); None: 8 / 2
NEW_TOKENS = None  # tokens per generation; None: 32 / 6
MAX_ACT_TOKENS = None  # held-out tokens that set max_act and show top contexts; None: 16,384 / 512
NEUTRAL_TOKENS = None  # neutral-text tokens for the KL fluency cost; None: 512 / 64
TEMPERATURE = 0.7
SEED = 0

# %%
import pandas as pd

from saebench import notebook
from saebench.evals import plots
from saebench.evals.common import load_eval_tokens, special_ids_of
from saebench.evals.steering import SteeringConfig, concept_latent_scores, evaluate_steering, select_concept_latent
from saebench.evals.tasks import CONCEPTS
from saebench.models import load_model
from saebench.sae import load_sae
from saebench.steering import max_activation, next_token_logprob_diff

full = SIZE == "full"
STRENGTHS = tuple(STRENGTHS or ((0.5, 1.0, 2.0, 4.0, 8.0) if full else (4.0,)))
SIDE_BY_SIDE = tuple(SIDE_BY_SIDE or ((0, 1, 2, 4, 8) if full else (0, 4)))
N_PROMPTS = N_PROMPTS or (8 if full else 2)
NEW_TOKENS = NEW_TOKENS or (32 if full else 6)
MAX_ACT_TOKENS = MAX_ACT_TOKENS or (16_384 if full else 512)
NEUTRAL_TOKENS = NEUTRAL_TOKENS or (512 if full else 64)
GEN = dict(max_new_tokens=NEW_TOKENS, seed=SEED, temperature=TEMPERATURE)

model = load_model()
sae_dir, abs_dir = notebook.ensure_comparison_saes(RUN_DIR, [METHOD, "abstopk"], size=SIZE, model=model)
sae = load_sae(sae_dir)
tokens = load_eval_tokens(model, "default", MAX_ACT_TOKENS, sae.cfg.context_size or 128)  # held-out text
special = special_ids_of(model.tokenizer)
print(sae_dir, "|", sae.cfg.architecture, sae.cfg.hook_name, "d_sae", sae.cfg.d_sae)

# %% [markdown]
# ## 1. Find latents for the concept
#
# DiffMean: each latent's mean (over the concept's texts) of its max activation, minus the same on
# neutral texts. The best one is checked by its detection AUROC (concept vs neutral texts) and by
# the held-out contexts where it fires most.

# %%
concept = CONCEPTS[CONCEPT]
scores = concept_latent_scores(model, sae, concept)
top = scores.topk(5)
pd.DataFrame({"latent": top.indices.tolist(), "diffmean_score": top.values.tolist()})

# %%
info = select_concept_latent(model, sae, concept)
latent = info["latent"]
max_act = max_activation(sae, model, tokens, latent, special_ids=special)
print(f"latent {latent}: DiffMean {info['diffmean_score']:.3f}, detection AUROC {info['detection_auroc']:.2f}, "
      f"max activation {max_act:.3f} over {tokens.numel():,} held-out tokens")
pd.DataFrame(notebook.latent_extremes(model, sae, latent, tokens)["positive"])

# %% [markdown]
# ## 2. Steer: side-by-side generations over a strength sweep
#
# Strength 0 is the unsteered model. Every row uses the same seed, hence the same Gumbel noise.

# %%
gens = notebook.steering_generations(model, sae, PROMPT, latent, SIDE_BY_SIDE, max_act, **GEN)
pd.set_option("display.max_colwidth", None)
pd.DataFrame(gens)[["strength", "new_text"]]

# %%
s_show = max(SIDE_BY_SIDE)
diff = next_token_logprob_diff(model, sae, PROMPT, latent, s_show, max_act, top_n=8)
pd.DataFrame({"rises": [t for t, _ in diff[:8]], "Δ log p (up)": [d for _, d in diff[:8]],
              "falls": [t for t, _ in diff[8:]], "Δ log p (down)": [d for _, d in diff[8:]]})

# %% [markdown]
# ## 3. Measured effect vs fluency
#
# For each strength: the latent's activation on the generated text (re-encoded from a clean pass),
# how often the concept is present, the perplexity of the generation under the unsteered model, and
# the KL divergence the vector causes on neutral text. Controls: a random direction of the same norm
# (dashed) and the opposite sign. The score is AxBench-like (harmonic mean of concept, fluency and
# preservation), with the strength picked on half the prompts and scored on the other half.

# %%
steer_cfg = SteeringConfig(strengths=STRENGTHS, n_prompts=N_PROMPTS, max_new_tokens=NEW_TOKENS, neutral_tokens=NEUTRAL_TOKENS,
                           temperature=TEMPERATURE, seed=SEED)
res = evaluate_steering(model, sae, latent=latent, concept=CONCEPT, max_act=max_act, config=steer_cfg)
print(f"best strength {res['best_strength']}: score {res['score']:.3f} | random direction {res['random_score']:.3f} | "
      f"opposite sign {res['opposite_sign_score']:.3f} | unsteered {res['baseline_score']:.3f}")
curve_cols = ["condition", "strength", "delta_latent_act", "concept_presence", "lexicon_rate", "delta_ppl", "kl_neutral", "hm_score_test"]
pd.DataFrame(res["curve"])[curve_cols]

# %%
plots.steering_figure({f"{METHOD} latent {latent}": res})

# %% [markdown]
# ## 4. A bidirectional AbsTopK latent, steered both ways
#
# AbsTopK keeps the k largest |pre-activations| with their signs, so a latent fires positively on
# one kind of context and negatively on another. Below: the concept's AbsTopK latent, the held-out
# contexts at both poles, and generations and next-token shifts at −s, 0 and +s.

# %%
abs_sae = load_sae(abs_dir)
abs_info = select_concept_latent(model, abs_sae, concept)
abs_latent = abs_info["latent"]
abs_max = max_activation(abs_sae, model, tokens, abs_latent, special_ids=special)  # largest |activation|, either sign
poles = notebook.latent_extremes(model, abs_sae, abs_latent, tokens)
print(f"AbsTopK latent {abs_latent}: DiffMean {abs_info['diffmean_score']:.3f}, AUROC {abs_info['detection_auroc']:.2f}, max |act| {abs_max:.3f}")
pd.concat([pd.DataFrame(poles["positive"]).assign(pole="+"), pd.DataFrame(poles["negative"]).assign(pole="−")], ignore_index=True)

# %%
s_abs = max(SIDE_BY_SIDE)
both = notebook.steering_generations(model, abs_sae, PROMPT, abs_latent, (-s_abs, 0, s_abs), abs_max, **GEN)
pd.DataFrame(both)[["strength", "new_text"]]

# %%
up = next_token_logprob_diff(model, abs_sae, PROMPT, abs_latent, s_abs, abs_max, top_n=6)
down = next_token_logprob_diff(model, abs_sae, PROMPT, abs_latent, -s_abs, abs_max, top_n=6)
pd.DataFrame({f"rises at +{s_abs:g}": [t for t, _ in up[:6]], "Δ (+)": [d for _, d in up[:6]],
              f"rises at −{s_abs:g}": [t for t, _ in down[:6]], "Δ (−)": [d for _, d in down[:6]]})

# %%
abs_res = evaluate_steering(model, abs_sae, latent=abs_latent, concept=CONCEPT, max_act=abs_max, config=steer_cfg)
signed = pd.DataFrame([e for e in abs_res["curve"] if e["condition"] == "sae"])[["strength", "latent_act", "delta_latent_act", "kl_neutral"]]
print("mean signed activation of the latent on the generated text, by steering strength (a signed latent can go below zero):")
signed

# %%
plots.steering_figure({f"{METHOD} latent {latent}": res, f"abstopk latent {abs_latent} (±)": abs_res})

# %% [markdown]
# From a shell: `saebench steer SAE_DIR --latent I --strength S --prompt "..."` (one pair) and
# `saebench steering-eval SAE_DIR --concept food` (the sweep, written to `eval_steering.json`). The
# browser's Steer page (notebook 5) does the same interactively.
