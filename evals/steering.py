"""Quantified, offline steering eval: a strength sweep with controls, a Pareto curve and one score.

For one latent i (or a named concept from ``evals/tasks.py``, whose latent is chosen by DiffMean:
the largest mean-of-max activation on the concept's texts minus that on neutral texts), and each
strength s in the sweep (units of the latent's max activation ``max_act``), the vector
``v = s · max_act · W_dec[i]`` is added at the SAE's hook over a position scope, and every
steering prompt is continued with a fixed seed (``saebench.steering``: Gumbel-max sampling with
noise shared by all conditions, so conditions differ only by the intervention).

Conditions: ``sae`` (the latent, at every s of the sweep *and* at −s: the opposite-sign control),
``random`` (a fixed random direction with the norm of ``v``, at every s given), and the unsteered
baseline (s = 0).

Per prompt and condition:

- target effect (a): ``latent_act`` = mean activation of latent i over the generated tokens,
  re-encoded by the SAE from a clean (unsteered) forward of the generated text, and
  ``concept_presence`` = fraction of generated tokens with sign(s)·a_i ≥ τ·max_act (τ = 0.1);
- target effect (b), when target tokens are known (a concept's target words, or ``target_tokens``):
  ``target_logprob`` = mean over generated positions of log Σ_{t∈targets} p_steered(t), teacher-forced
  on the steered model's own generation, and ``lexicon_rate`` = fraction of generated tokens that are
  targets;
- fluency cost: ``gen_nll`` = mean NLL of the generated tokens under the *unsteered* model
  (``delta_ppl`` = exp(gen_nll) − exp(gen_nll of the unsteered generation)), and ``kl_neutral`` =
  mean KL(p_unsteered ‖ p_steered) per token on neutral text with v added at every position.

Combined score (AxBench-like, documented in docs/EVALS_IMPLEMENTED.md): per prompt
``H = 3 / (1/c + 1/f + 1/g)`` (0 if any term is 0) with concept score c (``concept_presence``,
or ``lexicon_rate`` with ``concept_metric="lexicon"``), fluency f = exp(−max(0, gen_nll − gen_nll₀))
(= min(1, PPL₀/PPL)) and preservation g = exp(−kl_neutral). Prompts are split in two (even
indices: *select*, odd: *test*); the best strength s* maximises mean H on the select split and
``score`` is mean H at s* on the test split. The random control gets its own s* the same way
(``random_score``); ``opposite_sign_score`` is the test H of the latent at −s*.
"""

from __future__ import annotations

import argparse
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor
from tqdm.auto import tqdm

from pydantic.dataclasses import dataclass as pydantic_dataclass  # validated configs; registry flags come from their fields
from saebench.evals.tasks import CONCEPTS, NEUTRAL_TEXTS, STEERING_PROMPTS, Concept
from saebench.evals import plots, registry
from saebench.evals.registry import Command, ConfigSpec, EvalSpec, data_key, register
from saebench.sae import SAE
from saebench.site import Site
from saebench.steering import SteeringHook, generate_tokens, site_activations


@pydantic_dataclass(frozen=True)
class SteeringConfig:
    """Settings of the steering eval (the bench runner hashes them for its cache)."""

    strengths: tuple[float, ...] = (0.5, 1.0, 2.0, 4.0, 8.0)
    opposite_sign: bool = True  # also run −s for every s (the wrong-sign control)
    random_control: bool = True
    scope: str = "all"
    max_new_tokens: int = 24
    n_prompts: int = 8
    seed: int = 0
    temperature: float = 0.7
    top_p: float | None = None
    presence_threshold: float = 0.1  # τ, in units of max_act
    concept_metric: str = "latent"  # "latent" (concept_presence) or "lexicon" (lexicon_rate)
    neutral_tokens: int = 512
    neutral_context: int = 64
    max_act_tokens: int = 16_384
    batch_size: int = 8
    concepts: tuple[str, ...] = ("food",)  # used by the bench runner when no latent is given

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def sweep_strengths(cfg: SteeringConfig) -> list[float]:
    """All strengths run for the latent: the given ones, their negatives (if asked), and 0."""
    s = set(float(x) for x in cfg.strengths) | {0.0}
    if cfg.opposite_sign:
        s |= {-float(x) for x in cfg.strengths}
    return sorted(s)


# --------------------------------------------------------------------------- latent choice


@torch.no_grad()
def _text_tokens(model, texts: Sequence[str]) -> list[Tensor]:
    return [model.to_tokens(t) for t in texts]


@torch.no_grad()
def concept_latent_scores(model, sae: SAE, concept: Concept) -> Tensor:
    """DiffMean score per latent: mean over positive texts of the max activation minus the same on negatives."""
    from saebench.evals.transcoder import refuse_transcoders

    refuse_transcoders(sae, "the steering eval")
    hook, head = Site.of_sae(sae)

    def max_per_text(texts):
        rows = []
        for toks in _text_tokens(model, texts):
            x = site_activations(model, hook, head, toks)[0, 1:]  # skip BOS
            rows.append(sae.encode(x.to(sae.device)).max(0).values.float().cpu())
        return torch.stack(rows)

    pos = max_per_text(concept.positive)
    neg = max_per_text(concept.negative or NEUTRAL_TEXTS)
    return pos.mean(0) - neg.mean(0)


def _auroc(pos: Tensor, neg: Tensor) -> float:
    """ROC AUC of scores ``pos`` vs ``neg`` (ties count one half)."""
    gt = (pos[:, None] > neg[None, :]).double().mean()
    eq = (pos[:, None] == neg[None, :]).double().mean()
    return float(gt + 0.5 * eq)


@torch.no_grad()
def select_concept_latent(model, sae: SAE, concept: Concept) -> dict[str, Any]:
    """The latent that best separates the concept's texts (DiffMean), with its detection AUROC."""
    scores = concept_latent_scores(model, sae, concept)
    latent = int(scores.argmax())
    hook, head = Site.of_sae(sae)

    def max_act_of(texts):
        out = []
        for toks in _text_tokens(model, texts):
            x = site_activations(model, hook, head, toks)[0, 1:]
            out.append(float(sae.encode(x.to(sae.device))[:, latent].max()))
        return torch.tensor(out)

    auroc = _auroc(max_act_of(concept.positive), max_act_of(concept.negative or NEUTRAL_TEXTS))
    return {"latent": latent, "diffmean_score": float(scores[latent]), "detection_auroc": auroc}


# --------------------------------------------------------------------------- measurements


@dataclass
class _Row:
    condition: str
    strength: float
    vector: Tensor


@dataclass
class _PromptResult:
    latent_act: Tensor
    presence: Tensor
    gen_nll: Tensor
    target_logprob: Tensor | None
    lexicon_rate: Tensor | None
    texts: list[str] = field(default_factory=list)


@torch.no_grad()
def _measure_prompt(model, sae: SAE, hook: str, head: int | None, latent: int, max_act: float, rows: list[_Row], prompt: Tensor,
                    cfg: SteeringConfig, seed: int, targets: Tensor | None) -> _PromptResult:
    plen = prompt.shape[1]
    vecs = torch.stack([r.vector for r in rows])
    steer = SteeringHook(vecs, cfg.scope, plen, head)
    gen = generate_tokens(model, prompt.expand(len(rows), -1).contiguous(), cfg.max_new_tokens, hooks=[(hook, steer)], seed=seed,
                          temperature=cfg.temperature, top_p=cfg.top_p, stop_at_eos=True)
    n_new = gen.shape[1] - plen
    eos = model.tokenizer.eos_token_id
    new = gen[:, plen:]
    # Generated positions count up to and including the first EOS.
    after_eos = torch.cumsum((new == eos).long(), 1) - (new == eos).long() > 0 if eos is not None else torch.zeros_like(new, dtype=torch.bool)
    valid = (~after_eos).float()
    n_valid = valid.sum(1).clamp_min(1)
    # Clean forward on the generations: NLL of each generated token and the re-encoded latent.
    logits, cache = model.run_with_cache(gen, names_filter=lambda n: n == hook)
    x = cache[hook]
    x = Site(hook, head).flatten(x)
    lp = F.log_softmax(logits[:, plen - 1 : -1].float(), -1)
    nll = -lp.gather(-1, new[..., None]).squeeze(-1)
    gen_nll = (nll * valid).sum(1) / n_valid
    del logits, lp
    a = sae.encode(x[:, plen:].float().to(sae.device))[..., latent].float().cpu()
    latent_act = (a * valid).sum(1) / n_valid
    sign = torch.tensor([1.0 if r.strength >= 0 else -1.0 for r in rows])
    presence = ((sign[:, None] * a >= cfg.presence_threshold * max_act).float() * valid).sum(1) / n_valid
    target_lp = lexicon = None
    if targets is not None and targets.numel():
        steer.reset()
        lg = model.run_with_hooks(gen, fwd_hooks=[(hook, steer)])
        lps = F.log_softmax(lg[:, plen - 1 : -1].float(), -1)
        tl = torch.logsumexp(lps[..., targets.to(lps.device)], -1)
        target_lp = (tl * valid).sum(1) / n_valid
        lexicon = (torch.isin(new, targets.to(new.device)).float() * valid).sum(1) / n_valid
        del lg, lps
    texts = [model.tokenizer.decode(new[i].tolist()) for i in range(len(rows))] if n_new else [""] * len(rows)
    return _PromptResult(latent_act.cpu(), presence.cpu(), gen_nll.cpu(), None if target_lp is None else target_lp.cpu(),
                         None if lexicon is None else lexicon.cpu(), texts)


@torch.no_grad()
def _neutral_kls(model, hook: str, head: int | None, vecs: list[Tensor], neutral: Tensor, keep: Tensor, batch_size: int,
                 progress: bool) -> list[float]:
    """Per vector: mean KL(p_unsteered ‖ p_steered) per non-special token of ``neutral``, v added at every position.

    The unsteered log-probs are computed once per batch and shared by all vectors (a zero vector gives 0).
    """
    totals = [0.0] * len(vecs)
    count = 0
    bar = tqdm(total=len(vecs) * -(-neutral.shape[0] // batch_size), desc="neutral-text KL", disable=not progress, leave=False)
    for s in range(0, neutral.shape[0], batch_size):
        toks = neutral[s : s + batch_size].to(model.cfg.device)
        k = keep[s : s + batch_size].to(toks.device)
        lp = F.log_softmax(model(toks).float(), -1)
        p = lp.exp()
        count += int(k.sum())
        for j, vec in enumerate(vecs):
            bar.update(1)
            if not bool(vec.any()):
                continue
            lq = F.log_softmax(model.run_with_hooks(toks, fwd_hooks=[(hook, SteeringHook(vec, "all", 0, head))]).float(), -1)
            totals[j] += (p * (lp - lq)).sum(-1)[k].sum().item()
            del lq
    bar.close()
    return [t / max(count, 1) for t in totals]


def _harmonic(*xs: Tensor) -> Tensor:
    stacked = torch.stack([x.double() for x in xs])
    h = len(xs) / (1.0 / stacked.clamp_min(1e-12)).sum(0)
    return torch.where((stacked > 0).all(0), h, torch.zeros_like(h))


def _pareto(points: list[tuple[float, float]]) -> list[bool]:
    """Pareto-optimal flags for (effect ↑, cost ↓) points."""
    flags = []
    for i, (e, c) in enumerate(points):
        dominated = any((e2 >= e and c2 <= c) and (e2 > e or c2 < c) for j, (e2, c2) in enumerate(points) if j != i)
        flags.append(not dominated)
    return flags


# --------------------------------------------------------------------------- the eval


def evaluate_steering(
    model,
    sae: SAE,
    *,
    latent: int | None = None,
    concept: str | Concept | None = None,
    target_tokens: Sequence[int] | None = None,
    max_act: float | None = None,
    prompts: Sequence[str] | None = None,
    neutral_tokens: Tensor | None = None,
    max_act_tokens: Tensor | None = None,
    special_ids: Tensor | None = None,
    config: SteeringConfig = SteeringConfig(),
    progress: bool = True,
) -> dict[str, Any]:
    """Run the steering sweep for one latent (or concept) of ``sae``; returns a JSON-able dict.

    ``max_act`` defaults to the latent's largest |activation| on ``max_act_tokens`` (else on the
    concept texts + neutral text); if the latent never fires there, the median activation norm at
    the hook is used instead and ``max_act_source`` says so. ``neutral_tokens`` [n, ctx] default to
    the packed ``NEUTRAL_TEXTS``.
    """
    from saebench.evals.transcoder import refuse_transcoders

    refuse_transcoders(sae, "the steering eval")
    from saebench.evals.common import special_ids_of
    from saebench.steering import max_activation

    hook, head = Site.of_sae(sae)
    cfg = config
    if cfg.concept_metric not in ("latent", "lexicon"):
        raise ValueError("concept_metric must be 'latent' or 'lexicon'")
    special_ids = special_ids if special_ids is not None else special_ids_of(model.tokenizer)
    info: dict[str, Any] = {}
    if isinstance(concept, str):
        if concept not in CONCEPTS:
            raise ValueError(f"unknown concept {concept!r}; known: {sorted(CONCEPTS)}")
        concept = CONCEPTS[concept]
    if concept is not None:
        info = select_concept_latent(model, sae, concept) if latent is None else {"latent": latent}
        latent = info["latent"]
        if target_tokens is None:
            target_tokens = concept.target_token_ids(model.tokenizer)
    if latent is None:
        raise ValueError("give a latent index or a concept")
    if not 0 <= latent < sae.d_sae:
        raise IndexError(f"latent {latent} out of range (d_sae={sae.d_sae})")
    if neutral_tokens is None:
        neutral_tokens = _pack_texts(model, NEUTRAL_TEXTS)
    neutral_tokens = neutral_tokens[: max(1, cfg.neutral_tokens // neutral_tokens.shape[1])]
    source = "given"
    if max_act is None:
        pool = max_act_tokens if max_act_tokens is not None else neutral_tokens
        max_act = max_activation(sae, model, pool, latent, special_ids=special_ids, batch_size=cfg.batch_size)
        source = "max |activation| on eval tokens" if max_act_tokens is not None else "max |activation| on neutral text"
        if concept is not None and max_act_tokens is None:
            ct = _pack_texts(model, concept.positive, pad=True)
            max_act = max(max_act, max_activation(sae, model, ct, latent, special_ids=special_ids, batch_size=cfg.batch_size))
            source += " + concept texts"
        if max_act <= 0:
            x = site_activations(model, hook, head, neutral_tokens[:4])
            max_act = float(x.flatten(0, 1).norm(dim=-1).median())
            source = "fallback: median activation norm (latent never fired)"
    max_act = float(max_act)

    strengths = sweep_strengths(cfg)
    direction = sae.W_dec[latent].detach().float()
    gen = torch.Generator().manual_seed(cfg.seed + 7919)
    rand_dir = torch.randn(direction.shape, generator=gen)
    rand_dir = rand_dir / rand_dir.norm() * direction.norm()
    rows = [_Row("sae", s, s * max_act * direction) for s in strengths]
    if cfg.random_control:
        rows += [_Row("random", float(s), float(s) * max_act * rand_dir) for s in cfg.strengths if s != 0]
    base_idx = next(i for i, r in enumerate(rows) if r.condition == "sae" and r.strength == 0.0)

    prompt_texts = list(prompts if prompts is not None else STEERING_PROMPTS)[: cfg.n_prompts]
    if len(prompt_texts) < 2:
        raise ValueError("the steering eval needs at least 2 prompts (a select and a test split)")
    targets = torch.tensor(sorted(set(int(t) for t in target_tokens)), dtype=torch.long) if target_tokens else None

    per_prompt: list[_PromptResult] = []
    for p_idx, text in enumerate(tqdm(prompt_texts, desc=f"steering latent {latent}", disable=not progress)):
        toks = model.to_tokens(text)
        per_prompt.append(_measure_prompt(model, sae, hook, head, latent, max_act, rows, toks, cfg, cfg.seed + p_idx, targets))
    keep = ~torch.isin(neutral_tokens, special_ids)
    kl = torch.tensor(_neutral_kls(model, hook, head, [r.vector for r in rows], neutral_tokens, keep, cfg.batch_size, progress))

    def stack(attr):
        vals = [getattr(p, attr) for p in per_prompt]
        return None if vals[0] is None else torch.stack(vals)  # [prompts, rows]

    act, pres, nll, tlp, lex = stack("latent_act"), stack("presence"), stack("gen_nll"), stack("target_logprob"), stack("lexicon_rate")
    fluency = torch.exp(-(nll - nll[:, base_idx : base_idx + 1]).clamp_min(0))
    preserve = torch.exp(-kl)[None, :].expand_as(fluency)
    if cfg.concept_metric == "lexicon" and lex is None:
        raise ValueError("concept_metric='lexicon' needs target tokens (a concept or target_tokens)")
    concept_score = lex if cfg.concept_metric == "lexicon" else pres
    h = _harmonic(concept_score, fluency, preserve)
    select = list(range(0, len(prompt_texts), 2))
    test = list(range(1, len(prompt_texts), 2))

    curve = []
    for j, r in enumerate(rows):
        entry = {
            "condition": r.condition,
            "strength": r.strength,
            "vector_norm": float(r.vector.norm()),
            "latent_act": float(act[:, j].mean()),
            "delta_latent_act": float((act[:, j] - act[:, base_idx]).mean()),
            "concept_presence": float(pres[:, j].mean()),
            "gen_nll": float(nll[:, j].mean()),
            "delta_ppl": float((nll[:, j].exp() - nll[:, base_idx].exp()).mean()),
            "kl_neutral": float(kl[j]),
            "fluency_score": float(fluency[:, j].mean()),
            "preservation_score": float(math.exp(-float(kl[j]))),
            "concept_score": float(concept_score[:, j].mean()),
            "hm_score_select": float(h[select, j].mean()),
            "hm_score_test": float(h[test, j].mean()),
        }
        if tlp is not None:
            entry |= {"target_logprob": float(tlp[:, j].mean()), "delta_target_logprob": float((tlp[:, j] - tlp[:, base_idx]).mean()),
                      "lexicon_rate": float(lex[:, j].mean())}
        curve.append(entry)
    effect_key = "delta_target_logprob" if tlp is not None and cfg.concept_metric == "lexicon" else "delta_latent_act"
    pareto: dict[str, list[float]] = {}
    for cond in ("sae", "random"):
        pts = [(c, e) for c, e in zip(range(len(curve)), curve) if e["condition"] == cond and e["strength"] > 0]
        if pts:
            flags = _pareto([(e[effect_key], e["kl_neutral"]) for _, e in pts])
            for (i, e), f in zip(pts, flags):
                curve[i]["pareto_optimal"] = f
            pareto[cond] = [e["strength"] for (_, e), f in zip(pts, flags) if f]

    def best(cond: str) -> tuple[float | None, float, float]:
        cand = [e for e in curve if e["condition"] == cond and e["strength"] != 0]
        if not cand:
            return None, math.nan, math.nan
        # Ties (e.g. all zero) go to raising over lowering, then to the gentlest strength.
        b = max(cand, key=lambda e: (e["hm_score_select"], e["strength"] > 0, -abs(e["strength"])))
        return b["strength"], b["hm_score_select"], b["hm_score_test"]

    s_best, sel, score = best("sae")
    rs, _, rscore = best("random")
    opp = next((e["hm_score_test"] for e in curve if e["condition"] == "sae" and s_best is not None and e["strength"] == -s_best), math.nan)
    samples = []
    for j, r in enumerate(rows):
        if r.condition == "sae" and r.strength in (0.0, s_best):
            samples += [{"strength": r.strength, "prompt": prompt_texts[i], "continuation": per_prompt[i].texts[j]} for i in range(min(2, len(per_prompt)))]
    return {
        "hook_name": sae.cfg.hook_name,
        "latent": latent,
        "concept": concept.name if concept is not None else None,
        **{k: v for k, v in info.items() if k != "latent"},
        "max_act": max_act,
        "max_act_source": source,
        "scope": cfg.scope,
        "n_prompts": len(prompt_texts),
        "split": {"select": select, "test": test},
        "target_tokens": None if targets is None else targets.tolist(),
        "concept_metric": cfg.concept_metric,
        "effect_key": effect_key,
        "strengths": strengths,
        "curve": curve,
        "pareto_strengths": pareto,
        "best_strength": s_best,
        "score_select": sel,
        "score": score,
        "random_best_strength": rs,
        "random_score": rscore,
        "opposite_sign_score": opp,
        "baseline_score": curve[base_idx]["hm_score_test"],  # the unsteered model (s = 0): chance concept presence
        "samples": samples,
        "config": cfg.to_dict(),
    }


def _pack_texts(model, texts: Sequence[str], pad: bool = False) -> Tensor:
    """Texts → [n, ctx] tokens: each row one text, right-padded with EOS to the longest (EOS counts as special)."""
    rows = [model.to_tokens(t)[0] for t in texts]
    n = max(len(r) for r in rows)
    eos = model.tokenizer.eos_token_id
    return torch.stack([torch.cat([r, torch.full((n - len(r),), eos, dtype=r.dtype)]) for r in rows]).cpu()


def run_steering_eval(sae_dir: str | Path, model=None, *, latent: int | None = None, concept: str | None = None,
                      config: SteeringConfig = SteeringConfig(), corpus: str | None = None, device: str = "cpu",
                      out: str | Path | None = None, progress: bool = True) -> dict[str, Any]:
    """Load an SAE folder, run the sweep (neutral text and max_act from ``corpus`` if given), write ``eval_steering.json``."""
    from saebench import models
    from saebench.evals.common import load_eval_tokens
    from saebench.io import write_json

    sae = SAE.load(sae_dir, device=device)
    if model is None:
        model = models.load_model(sae.cfg.model_name or None, device=device)
    neutral = max_tok = None
    if corpus:
        max_tok = load_eval_tokens(model, corpus, config.max_act_tokens, 128)
        neutral = load_eval_tokens(model, corpus, config.neutral_tokens, config.neutral_context)
    res = evaluate_steering(model, sae, latent=latent, concept=concept, config=config, neutral_tokens=neutral, max_act_tokens=max_tok,
                            progress=progress)
    write_json(Path(out) if out else Path(sae_dir) / "eval_steering.json", res)
    return res


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """CLI: ``python -m saebench.evals.steering SAE_DIR (--latent I | --concept food) [--strengths 0.5 1 2 4]``."""
    from saebench.config import HelpFormatter

    p = argparse.ArgumentParser(prog="saebench steering-eval", description="Offline steering sweep with controls and an AxBench-like score.",
                                formatter_class=HelpFormatter)
    p.add_argument("sae_dir")
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--latent", type=int)
    g.add_argument("--concept", choices=sorted(CONCEPTS))
    p.add_argument("--model", default=None, help="model (default: the SAE's cfg.json model_name)")
    p.add_argument("--corpus", default=None, help="text for max_act and the neutral-text KL (default: built-in neutral sentences)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", default=None, help="output JSON (default: SAE_DIR/eval_steering.json)")
    p.add_argument("--no-progress", action="store_true")
    dests = registry.add_flags(p, "steering", prefix="", skip=("concepts",))  # one flag per SteeringConfig field (--concept picks one)
    a = p.parse_args(argv)
    cfg = registry.config_from_args(a, "steering", dests)
    model = None
    if a.model:
        from saebench import models

        model = models.load_model(a.model, device=a.device)
    res = run_steering_eval(a.sae_dir, model, latent=a.latent, concept=a.concept, config=cfg, corpus=a.corpus, device=a.device, out=a.out,
                            progress=not a.no_progress)
    print(f"latent {res['latent']} max_act {res['max_act']:.3f}: best strength {res['best_strength']} score {res['score']:.3f} "
          f"(random {res['random_score']:.3f}, opposite sign {res['opposite_sign_score']:.3f})")
    return res


# --------------------------------------------------------------------------- the bench's steering eval


def _bench_steering(ctx, sae: SAE, sae_dir: str) -> dict[str, Any]:
    """Every concept of the config, steered with its DiffMean latent; max activation and neutral KL on the bench's tokens."""
    cfg: SteeringConfig = ctx.config("steering")
    toks = ctx.tokens
    max_tok = toks[: max(1, cfg.max_act_tokens // toks.shape[1])]
    neutral = toks[: max(1, cfg.neutral_tokens // cfg.neutral_context), : cfg.neutral_context]
    per = {c: evaluate_steering(ctx.model, sae, concept=c, config=cfg, max_act_tokens=max_tok, neutral_tokens=neutral, special_ids=ctx.special_ids,
                                progress=ctx.progress) for c in cfg.concepts}

    def mean(key):
        vals = [r[key] for r in per.values() if isinstance(r.get(key), (int, float)) and math.isfinite(r[key])]
        return sum(vals) / len(vals) if vals else math.nan

    return {"score": mean("score"), "random_score": mean("random_score"), "opposite_sign_score": mean("opposite_sign_score"), "concepts": per}


def _steering_columns(st: dict[str, Any]) -> dict[str, Any]:
    row = {"steering_score": st.get("score"), "steering_random_score": st.get("random_score"),
           "steering_opposite_sign_score": st.get("opposite_sign_score")}
    for c, r in st.get("concepts", {}).items():
        row[f"steering_score[{c}]"] = r.get("score")
        row[f"steering_best_strength[{c}]"] = r.get("best_strength")
        row[f"steering_latent[{c}]"] = r.get("latent")
    return row


def _steering_figures(rows, results) -> dict[str, Any]:
    steer = {f"{name}/{c}": r for name, res in results.items() for c, r in res.get("steering", {}).get("concepts", {}).items()}
    return {"steering_curves": plots.steering_figure(steer)} if steer else {}


register(EvalSpec(
    name="steering", scope="sae", compute=_bench_steering, order=20,
    configs=(ConfigSpec("steering", SteeringConfig, prefix="steer",
                        flags={"n_prompts": ["--steer-prompts", "--steer-n-prompts"], "max_new_tokens": ["--steer-tokens", "--steer-max-new-tokens"]},
                        helps={"strengths": "strengths in units of max activation", "concepts": "concepts from evals/tasks.py",
                               "max_new_tokens": "new tokens per steered generation"},
                        choices={"scope": ["prompt", "generated", "all"], "concepts": sorted(CONCEPTS), "concept_metric": ["latent", "lexicon"]}),),
    cache_key=lambda cfgs, data: data_key(data) | cfgs["steering"].to_dict(),
    tokens_needed=lambda cfgs, data: cfgs["steering"].max_act_tokens,
    columns=_steering_columns, figures=_steering_figures,
    command=Command("steering-eval", "Quantified steering sweep with controls and a Pareto curve.", "saebench.evals.steering:main"),
))


if __name__ == "__main__":
    main()
