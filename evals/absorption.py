"""Feature absorption on the first-letter task (Chanin et al. 2024, arXiv 2409.14507; SAEBench's ``absorption``).

Data (SAEBench's ``vocab.get_alpha_tokens`` and ``prompting``): the words are the tokens of the
model's own vocabulary made only of ASCII letters (one optional leading space). Each word gets an
in-context prompt: a newline, then 10 random other words as ``"{w} has the first letter: W"`` lines,
then ``"{word} has the first letter:"``; the activation is read at the word's token, 6 tokens before
the end (``prompt_token_pos = -6``), at the SAE's hook. A prompt whose token there is not the word's
single token is dropped. Up to ``max_words`` words are sampled (seeded); 80% train, 20% test.

1. **Ground-truth probes**: one logistic probe per letter ("starts with L" vs the rest) on the
   activations, balanced class weights (SAEBench: a 26-way one-vs-rest probe, BCE with pos_weight).
   ``f1_probe`` per letter on the test words (logit > 0). A letter is usable when ``f1_probe`` >
   ``min_probe_f1`` (0.6); SAEBench stops when fewer than ``min_letters`` (20) are usable: we still
   report, with ``enough_letters = False``.
2. **Feature splitting (k-sparse probing)**: an L1-regularised logistic probe per letter on all SAE
   latents of the train words (mean BCE with pos_weight = n_neg/n_pos + 0.01·‖w‖₁, SAEBench's
   ``train_sparse_multi_probe``; solved here with FISTA), then for k = 1..``max_k`` the k latents with
   the largest weights and a balanced L2 logistic probe on them; F1 on the test words. The split
   latents are the k-probe's latents for the largest k reached while each step raises F1 by more than
   ``f1_jump_threshold`` (0.03) (SAEBench's ``add_feature_splits_to_metrics_df``; k = 1 always counts).
3. **Absorption** on the test words of letter L that its probe gets right (probe logit > 0): with p the
   unit probe direction, a = x·p, and proj_i = f_i·cos(p, W_dec[i]):
   - absorption fraction: M = Σ_{i∈split} proj_i; A = the sum of the top 3 proj_j over the other
     latents with cos ≥ 0.1 and proj_j > 0. 0 if M ≥ a or A/a < 0.4; else 1 if M ≤ 0; else
     min(A, a−M)/(min(A, a−M) + M), clipped to [0, 1].
   - full absorption: every split latent has f < 1e-8, the top-projecting latent (of the top 10)
     has cos ≥ 0.025, a ≥ 0, and its projection is at least 0.4·a. That latent is the absorber.
   Per letter: ``mean_absorption_fraction`` = Σ fractions / #true positives, ``full_absorption_rate`` =
   #full / #true positives, ``num_split_features`` = #split latents.

Means over usable letters: ``mean_absorption_fraction_score``, ``mean_full_absorption_score``,
``mean_num_split_features`` (SAEBench's names), with their standard deviations.

Differences from SAEBench: probes are fitted to convergence (L-BFGS / FISTA) rather than by Adam for
50 epochs; the absorption step reuses the test prompts' activations (SAEBench builds new prompts with
new random ICL examples for the same words); ``max_words`` (default 2,000) subsamples the ~47k
alphabetic SmolLM2 tokens so a CPU run takes minutes. SAEBench's README warns that models under ~1B
parameters and SAEs under 16k latents give spuriously low absorption; SmolLM2-135M is such a model,
and the per-letter probe F1s in the result say what it supports.
"""

from __future__ import annotations

import math
import random
import statistics
import string
from collections.abc import Sequence
from dataclasses import asdict
from typing import Any

import torch
from pydantic.dataclasses import dataclass as pydantic_dataclass  # validated configs; registry flags come from their fields
from saebench.evals.common import one_site
from saebench.evals import plots
from saebench.evals import registry
from saebench.evals.registry import Command, ConfigSpec, EvalSpec, register
from saebench.evals.probes import balanced_weights, fit_logistic
from torch import Tensor
from tqdm.auto import tqdm

from saebench.sae import SAE
from saebench.site import Site

LETTERS = string.ascii_lowercase
EPS = 1e-8


@pydantic_dataclass(frozen=True)
class AbsorptionConfig:
    max_words: int = 2000
    train_fraction: float = 0.8
    n_icl: int = 10
    prompt_template: str = "{word} has the first letter:"
    prompt_token_pos: int = -6
    min_probe_f1: float = 0.6
    min_letters: int = 20
    max_k: int = 10
    f1_jump_threshold: float = 0.03
    l1_decay: float = 0.01
    l1_iters: int = 500
    full_absorption_cos: float = 0.025
    fraction_cos: float = 0.1
    projection_proportion: float = 0.4
    max_absorbers: int = 3
    top_feats: int = 10
    seed: int = 42
    batch_size: int = 16

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("batch_size")
        return d


# --------------------------------------------------------------------------- words, prompts, activations


def alpha_vocab(tokenizer) -> list[tuple[str, int]]:
    """(word, token id) for every vocabulary token made of ASCII letters, with at most one leading space."""
    letters = set(string.ascii_letters)
    out = []
    for tok, i in sorted(tokenizer.get_vocab().items(), key=lambda kv: kv[1]):
        w = tokenizer.convert_tokens_to_string([tok])
        core = w.removeprefix(" ")
        if core and all(c in letters for c in core):
            out.append((w, i))
    return out


def first_letter(word: str) -> str:
    return next(c for c in word if c.isalpha()).lower()


def icl_prompt(word: str, examples: Sequence[str], rng: random.Random, cfg: AbsorptionConfig) -> str:
    """SAEBench's ``create_icl_prompt`` with ``prepend_separator_to_first_example``: newline-separated ICL lines, then the word."""
    pool = [e for e in rng.sample(list(examples), min(len(examples), cfg.n_icl + 1)) if e != word][: cfg.n_icl]
    lines = [cfg.prompt_template.format(word=e) + " " + first_letter(e).upper() for e in pool]
    return "\n" + "\n".join(lines + [cfg.prompt_template.format(word=word)])


@torch.no_grad()
def word_activations(model, hook: str, head: int | None, words: Sequence[tuple[str, int]], cfg: AbsorptionConfig,
                     progress: bool = False) -> tuple[Tensor, list[int]]:
    """Activations [n, d] at the word token of each word's prompt, and the indices of the words kept."""
    tok = model.tokenizer
    rng = random.Random(cfg.seed)
    vocab_words = [w for w, _ in words]
    prompts = [icl_prompt(w, vocab_words, rng, cfg) for w, _ in words]
    bos = tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id
    ids = [[bos] + x for x in tok(prompts, add_special_tokens=False, verbose=False)["input_ids"]]
    keep = [i for i, (x, (_, t)) in enumerate(zip(ids, words)) if len(x) > -cfg.prompt_token_pos and x[cfg.prompt_token_pos] == t]
    site = Site(hook, head)
    stop = site.stop_layer
    out = []
    for s in tqdm(range(0, len(keep), cfg.batch_size), desc=f"absorption prompts {hook}", disable=not progress):
        rows = [ids[i] for i in keep[s : s + cfg.batch_size]]
        L = max(map(len, rows))
        toks = torch.full((len(rows), L), tok.eos_token_id, dtype=torch.long)
        for j, r in enumerate(rows):
            toks[j, : len(r)] = torch.tensor(r)
        _, cache = model.run_with_cache(toks.to(model.cfg.device), names_filter=lambda n: n == hook, stop_at_layer=stop)
        x = site.flatten(cache[hook]).float().cpu()
        pos = torch.tensor([len(r) + cfg.prompt_token_pos for r in rows])
        out.append(x[torch.arange(len(rows)), pos])
    return torch.cat(out) if out else torch.zeros(0, model.cfg.d_model), keep


# --------------------------------------------------------------------------- probes


def f1_score(pred: Tensor, y: Tensor) -> float:
    tp = int((pred & y).sum())
    fp, fn = int((pred & ~y).sum()), int((~pred & y).sum())
    return 2 * tp / (2 * tp + fp + fn) if tp else 0.0


def l1_multi_probe(x: Tensor, labels: Tensor, classes: Sequence[int], l1: float = 0.01, iters: int = 500) -> Tensor:
    """Weights [d, len(classes)] of one-vs-rest L1 logistic probes, by FISTA (per-class step sizes).

    Each class minimises mean BCE with pos_weight n_neg/n_pos + l1·‖w‖₁ (SAEBench's
    ``train_sparse_multi_probe`` objective); intercepts are fitted and not penalised. ``x`` may be a
    sparse COO matrix [n, d] (SAE latents).
    """
    n = x.shape[0]
    y = torch.stack([(labels == c) for c in classes], 1).double()
    n_pos = y.sum(0).clamp_min(1)
    pw = (n - n_pos) / n_pos
    X = x.double().coalesce() if x.is_sparse else x.double()
    Xt = X.t().coalesce() if X.is_sparse else X.t()
    # Lipschitz constant of the smooth part: max(pw, 1)/4 · λ_max(XᵀX)/n (power iteration), plus the intercept.
    v = torch.ones(X.shape[1], 1, dtype=torch.float64)
    for _ in range(30):
        v = Xt @ (X @ v)
        v = v / v.norm().clamp_min(1e-30)
    lam = float((X @ v).norm() ** 2) + n
    step = 1.0 / (pw.clamp_min(1.0) / 4 * lam / n)  # [classes]: the problems are independent
    W = torch.zeros(X.shape[1], len(classes), dtype=torch.float64)
    b = torch.zeros(len(classes), dtype=torch.float64)
    Wm, bm, t = W.clone(), b.clone(), 1.0
    for _ in range(iters):
        z = X @ Wm + bm
        sig = torch.sigmoid(z)
        g = (pw * y * (sig - 1) + (1 - y) * sig) / n  # d/dz of the pos-weighted mean BCE
        W_new = Wm - step * (Xt @ g)
        W_new = torch.sign(W_new) * (W_new.abs() - step * l1).clamp_min(0)
        b_new = bm - step * g.sum(0)
        t_new = (1 + math.sqrt(1 + 4 * t * t)) / 2
        Wm = W_new + (t - 1) / t_new * (W_new - W)
        bm = b_new + (t - 1) / t_new * (b_new - b)
        W, b, t = W_new, b_new, t_new
    return W


def _dense_latents(sae: SAE, x: Tensor) -> Tensor:
    with torch.no_grad():
        acts = sae.encode_sparse(x.to(sae.device, sae.dtype))
    return acts.to_dense(sae.d_sae).float().cpu()


# --------------------------------------------------------------------------- the eval


def ground_truth_probes(x_tr: Tensor, y_tr: Tensor, x_te: Tensor, y_te: Tensor, letters: Sequence[int]) -> dict[int, dict[str, Any]]:
    """Per letter index: the probe, its unit direction and test statistics."""
    out = {}
    for li in letters:
        p = fit_logistic(x_tr, (y_tr == li).long(), sample_weight=balanced_weights((y_tr == li).long()))
        logits = p.logits(x_te)
        pred, truth = logits > 0, y_te == li
        out[li] = {"probe": p, "direction": (p.w / p.w.norm()).float(), "logits_test": logits,
                   "f1_probe": f1_score(pred, truth), "accuracy_probe": float((pred == truth).double().mean()),
                   "n_test": int(truth.sum()), "n_train": int((y_tr == li).sum())}
    return out


def absorption_for_sae(sae: SAE, x_tr: Tensor, y_tr: Tensor, x_te: Tensor, y_te: Tensor, words_te: Sequence[str],
                       probes: dict[int, dict[str, Any]], cfg: AbsorptionConfig) -> dict[str, Any]:
    """Steps 2 and 3 of the module docstring for one SAE, given the activations and ground-truth probes."""
    f_tr, f_te = _dense_latents(sae, x_tr), _dense_latents(sae, x_te)
    letters = sorted(probes)
    W = l1_multi_probe(f_tr.to_sparse(), y_tr, letters, cfg.l1_decay, cfg.l1_iters)
    dec = sae.W_dec.detach().float().cpu()
    dec_unit = dec / dec.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    per_letter = {}
    for li in letters:
        letter = LETTERS[li]
        ytr, yte = (y_tr == li).long(), y_te == li
        f1s, feats = [], []
        for k in range(1, cfg.max_k + 1):
            sel = W[:, letters.index(li)].topk(k).indices
            kp = fit_logistic(f_tr[:, sel], ytr, sample_weight=balanced_weights(ytr), max_iter=500)
            f1s.append(f1_score(kp.logits(f_te[:, sel]) > 0, yte))
            feats.append(sel.tolist())
        split, prev = [], -100.0
        for f1, fs in zip(f1s, feats):
            if f1 > prev + cfg.f1_jump_threshold:
                prev, split = f1, fs
            else:
                break
        pr = probes[li]
        p = pr["direction"]
        cos = dec_unit @ p
        tp = (yte & (pr["logits_test"] > 0)).nonzero().flatten().tolist()
        fracs, absorbed = [], []
        is_main = torch.zeros(sae.d_sae, dtype=torch.bool)
        is_main[split] = True
        for i in tp:
            f = f_te[i]
            proj = f * cos
            a = float(x_te[i] @ p)
            M = float(proj[split].sum())
            cand = proj[(~is_main) & (cos >= cfg.fraction_cos) & (proj > 0)]
            A = float(cand.topk(min(cfg.max_absorbers, cand.numel())).values.sum()) if cand.numel() else 0.0
            if M >= a or a <= 0 or A / a < cfg.projection_proportion:
                frac = 0.0
            elif M <= 0:
                frac = 1.0
            else:
                ab = min(A, a - M)
                frac = min(max(ab / (ab + M), 0.0), 1.0)
            fracs.append(frac)
            top = int(proj.topk(min(cfg.top_feats, proj.numel())).indices[0])
            full = (bool((f[split] < EPS).all()) and float(cos[top]) >= cfg.full_absorption_cos and a > 0
                    and float(proj[top]) / a >= cfg.projection_proportion)
            if full:
                absorbed.append({"word": words_te[i], "absorbing_latent": top, "absorbing_latent_cos": float(cos[top])})
        n_tp = len(tp)
        per_letter[letter] = {
            "f1_probe": pr["f1_probe"], "accuracy_probe": pr["accuracy_probe"], "n_train": pr["n_train"], "n_test": pr["n_test"],
            "usable": pr["f1_probe"] > cfg.min_probe_f1, "num_probe_true_positives": n_tp, "split_feats": split,
            "num_split_features": len(split), "k_sparse_f1": f1s,
            "mean_absorption_fraction": sum(fracs) / n_tp if n_tp else math.nan,
            "full_absorption_rate": len(absorbed) / n_tp if n_tp else math.nan, "num_full_absorption": len(absorbed),
            "absorbed_words": absorbed[:20],
        }
    usable = [r for r in per_letter.values() if r["usable"] and r["num_probe_true_positives"] > 0]

    def mean_sd(key):
        vals = [r[key] for r in usable]
        return (statistics.mean(vals) if vals else math.nan, statistics.stdev(vals) if len(vals) > 1 else math.nan)

    (maf, maf_sd), (mfa, mfa_sd), (mns, mns_sd) = mean_sd("mean_absorption_fraction"), mean_sd("full_absorption_rate"), mean_sd("num_split_features")
    return {"mean_absorption_fraction_score": maf, "mean_full_absorption_score": mfa, "mean_num_split_features": mns,
            "std_dev_absorption_fraction_score": maf_sd, "std_dev_full_absorption_score": mfa_sd, "std_dev_num_split_features": mns_sd,
            "n_usable_letters": len(usable), "enough_letters": len(usable) >= cfg.min_letters,
            "mean_probe_f1": statistics.mean(r["f1_probe"] for r in per_letter.values()) if per_letter else math.nan,
            "letters": per_letter, "hook_name": sae.cfg.hook_name, "d_sae": sae.d_sae, "config": cfg.to_dict()}


def evaluate_absorption(saes: SAE | Sequence[SAE], model, config: AbsorptionConfig | None = None, *, progress: bool = True,
                        activations_out: dict | None = None) -> dict[str, Any] | list[dict[str, Any]]:
    """Absorption for one SAE or several at one hook (prompts, activations and probes are shared).

    ``activations_out``, if given, receives the word activations, labels, words and probes (for side-by-side runs).
    """
    cfg = config or AbsorptionConfig()
    single = isinstance(saes, SAE)
    sae_list = [saes] if single else list(saes)
    hook, head = one_site(model, sae_list, "evaluate_absorption")
    vocab = alpha_vocab(model.tokenizer)
    rng = random.Random(cfg.seed)
    words = rng.sample(vocab, min(cfg.max_words, len(vocab)))
    x, keep = word_activations(model, hook, head, words, cfg, progress=progress)
    words = [words[i] for i in keep]
    labels = torch.tensor([LETTERS.index(first_letter(w)) for w, _ in words])
    n_tr = int(len(words) * cfg.train_fraction)
    x_tr, x_te, y_tr, y_te = x[:n_tr], x[n_tr:], labels[:n_tr], labels[n_tr:]
    letters = [li for li in range(len(LETTERS)) if (y_tr == li).any() and (y_tr != li).any() and (y_te == li).any()]
    probes = ground_truth_probes(x_tr, y_tr, x_te, y_te, letters)
    words_te = [w for w, _ in words[n_tr:]]
    if activations_out is not None:
        activations_out |= {"x_train": x_tr, "y_train": y_tr, "x_test": x_te, "y_test": y_te, "words": [w for w, _ in words], "n_train": n_tr,
                            "probes": {LETTERS[li]: (p["probe"].w.float(), p["probe"].b) for li, p in probes.items()}}
    res = []
    for s in sae_list:
        r = absorption_for_sae(s, x_tr, y_tr, x_te, y_te, words_te, probes, cfg)
        r |= {"n_words": len(words), "n_vocab_alpha_tokens": len(vocab), "n_dropped_prompts": min(cfg.max_words, len(vocab)) - len(keep)}
        res.append(r)
    return res[0] if single else res


def format_summary(res: dict[str, Any]) -> str:
    lines = [f"{'letter':<7}{'probe F1':>9}{'n test':>7}{'TPs':>5}{'split':>6}{'abs frac':>9}{'full abs':>9}"]
    for letter, r in res["letters"].items():
        lines.append(f"{letter + ('' if r['usable'] else '*'):<7}{r['f1_probe']:>9.3f}{r['n_test']:>7}{r['num_probe_true_positives']:>5}"
                     f"{r['num_split_features']:>6}{r['mean_absorption_fraction']:>9.3f}{r['full_absorption_rate']:>9.3f}")
    lines.append(f"mean absorption fraction {res['mean_absorption_fraction_score']:.4f}, full absorption {res['mean_full_absorption_score']:.4f}, "
                 f"split features {res['mean_num_split_features']:.2f} over {res['n_usable_letters']} usable letters (* = probe F1 <= "
                 f"{res['config']['min_probe_f1']}){'' if res['enough_letters'] else '; fewer than SAEBench needs'}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """CLI: ``python -m saebench.evals.absorption SAE_DIR``; writes ``eval_absorption.json``."""
    return registry.run_one_sae_cli("absorption", "saebench absorption", __doc__, evaluate_absorption, format_summary, "eval_absorption.json", argv)


# --------------------------------------------------------------------------- the bench's absorption eval: one job per hook

ABSORPTION_COLUMNS = ("mean_absorption_fraction_score", "mean_full_absorption_score", "mean_num_split_features", "n_usable_letters",
                      "mean_probe_f1")


def _absorption_figures(rows, results) -> dict[str, Any]:
    ab = {name: r["absorption"] for name, r in results.items() if r.get("absorption")}
    return {"absorption": plots.absorption_figure(ab)} if ab else {}


register(EvalSpec(
    name="absorption", scope="hook", order=60,
    compute=lambda ctx, saes, sae_dirs: evaluate_absorption(saes, ctx.model, ctx.config("absorption"), progress=ctx.progress),
    configs=(ConfigSpec("absorption", AbsorptionConfig, prefix="absorption", inherit=("batch_size",),
                        flags={"max_words": ["--absorption-words", "--absorption-max-words"]},
                        helps={"max_words": "absorption: vocabulary words sampled",
                               "batch_size": "sequences per forward (saebench bench: its --batch-size unless this flag is given)"}),),
    cache_key=lambda cfgs, data: cfgs["absorption"].to_dict(),
    columns=lambda ab: {c: ab.get(c) for c in ABSORPTION_COLUMNS} | {"absorption_enough_letters": ab.get("enough_letters")},
    figures=_absorption_figures,
    command=Command("absorption", "SAEBench's first-letter feature absorption of one SAE.", "saebench.evals.absorption:main"),
))


if __name__ == "__main__":
    main()
