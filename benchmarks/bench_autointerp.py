"""Autointerp with the local judge: wall time per SAE for N latents, and how weak the 135M judge is.

    OMP_NUM_THREADS=2 python benchmarks/bench_autointerp.py SAE_DIR [--n-latents 20] [--backend hf] [--model M] [--url U]

SAE_DIR needs built dashboards (``saebench dashboards SAE_DIR``). Measures, with the chosen judge
(default: the offline SmolLM2-135M-Instruct through transformers, greedy):

1. **planted / obvious case**: a synthetic latent that fires on every " fox" in random-word text
   (``tests/test_autointerp.synthetic_codes``, 4 latents). (a) the full pipeline (explain + score);
   (b) the scorer alone, handed the true explanation ``the token "fox"``, on the same 14 windows for
   ``--planted-seeds`` seeds: a judge that can read scores ~1 here; 0.714 is answering "None".
2. **real latents**: ``--n-latents`` latents of SAE_DIR (seed 42) with the judge, with the rule-based
   keyword judge and with an always-"None" judge (the explanation-free baselines), each score with its
   sd, the unparsed answers, and the wall time (the model load excluded and reported separately).

The reply cache starts empty (``benchmarks/results/bench_autointerp_cache.sqlite``, not committed), so the
times are real generation, and the raw answers can be re-parsed later without the model. Records the load average before and after
(the development machines are shared). Writes ``benchmarks/results/bench_autointerp.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
from saebench.evals import autointerp as A

from saebench.llm import LLM, Backend, Reply

RESULTS = Path(__file__).parent / "results"
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))


class AlwaysNone(Backend):
    kind, model = "baseline", "always-none"

    def chat(self, messages, max_tokens, temperature=0.0, seed=0, usage=None):
        return Reply("anything" if "<<" in messages[-1]["content"] else "None", 0, 0)


def summary(r: dict) -> dict:
    return {k: r[k] for k in ("autointerp_score", "autointerp_std_dev", "n_latents_scored", "n_latents_requested", "n_unparsed", "skipped",
                              "seconds")} | {"usage": r["usage"]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("sae_dir")
    p.add_argument("--n-latents", type=int, default=20)
    p.add_argument("--backend", default="hf", choices=["hf", "openai"])
    p.add_argument("--model", default=None)
    p.add_argument("--url", default=None)
    p.add_argument("--planted-seeds", type=int, default=5)
    p.add_argument("--out", default=str(RESULTS / "bench_autointerp.json"))
    a = p.parse_args()
    from test_autointerp import synthetic_codes

    load0 = os.getloadavg()
    t = time.time()
    cache = Path(a.out).with_name("bench_autointerp_cache.sqlite")
    cache.unlink(missing_ok=True)
    llm = A.make_llm(a.backend, a.model, a.url, cache=cache)
    load_s = time.time() - t
    out: dict = {"machine": {"cpu_count": os.cpu_count(), "platform": platform.platform(), "omp_threads": os.environ.get("OMP_NUM_THREADS"),
                             "loadavg_before": load0}, "judge": llm.describe(), "judge_load_seconds": load_s}

    # 1. planted
    codes = synthetic_codes()
    t = time.time()
    full = A.evaluate_autointerp(codes, llm, A.AutointerpConfig(latents=(0,)), progress=False)
    out["planted_full_pipeline"] = summary(full) | {"explanation": full["latents"]["0"].get("explanation"),
                                                    "raw_explanation": full["latents"]["0"].get("raw_explanation"),
                                                    "raw_prediction": full["latents"]["0"].get("raw_prediction")}
    given = []
    for s in range(a.planted_seeds):
        cfg = A.AutointerpConfig(latents=(0,), seed=s)
        ex = A.select_examples(codes, 0, cfg)
        raw = llm.chat(A.score_messages(codes, ex, 'the token "fox"', __import__("random").Random(s)), cfg.max_tokens_in_prediction).text
        pred = A.parse_predictions(raw, len(ex.score))
        given.append({"seed": s, "raw": raw, "predictions": pred, "truth": [i + 1 for i, w in enumerate(ex.score) if w.active],
                      "score": None if pred is None else A.score_predictions(pred, [w.active for w in ex.score])})
    sc = [g["score"] for g in given if g["score"] is not None]
    out["planted_scorer_given_true_explanation"] = {"mean": float(np.mean(sc)) if sc else None, "n_parsed": len(sc), "runs": given,
                                                    "seconds": time.time() - t}

    # 2. real latents
    real = A.codes_from_dashboards(a.sae_dir)
    cfg = A.AutointerpConfig(n_latents=a.n_latents)
    t = time.time()
    r = A.evaluate_autointerp(real, llm, cfg, progress=True)
    wall = time.time() - t
    out["real"] = {"sae_dir": a.sae_dir, "data": r["data"], "judge": summary(r) | {"wall_seconds": wall,
                                                                                   "seconds_per_latent": wall / max(r["n_latents_requested"], 1)},
                   "keyword": summary(A.evaluate_autointerp(real, LLM(A.KeywordBackend()), cfg, progress=False)),
                   "always_none": summary(A.evaluate_autointerp(real, LLM(AlwaysNone()), cfg, progress=False)),
                   "latents": {k: {f: v.get(f) for f in ("raw_explanation", "explanation", "raw_prediction", "predictions", "truth", "score")}
                               for k, v in r["latents"].items()}}
    out["machine"]["loadavg_after"] = os.getloadavg()
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(out, indent=1))
    pf, pg, rj = out["planted_full_pipeline"], out["planted_scorer_given_true_explanation"], out["real"]["judge"]
    print(f"judge {llm.describe()['backend']}:{llm.describe()['model']} (load {load_s:.1f} s)")
    print(f"planted fox latent, full pipeline: score {pf['autointerp_score']}, explanation {pf['explanation']!r}")
    print(f"planted fox latent, scorer given the true explanation: mean {pg['mean']} over {pg['n_parsed']}/{a.planted_seeds} parsed answers")
    print(f"real latents ({a.n_latents} of {a.sae_dir}): judge {rj['autointerp_score']:.4f} ± {rj['autointerp_std_dev']:.4f} "
          f"({rj['n_latents_scored']} scored, {rj['n_unparsed']} unparsed, skipped {rj['skipped']}); "
          f"keyword {out['real']['keyword']['autointerp_score']:.4f}; always-None {out['real']['always_none']['autointerp_score']:.4f}")
    print(f"wall {rj['wall_seconds']:.1f} s for {rj['n_latents_requested']} latents ({rj['seconds_per_latent']:.2f} s/latent); "
          f"load {out['machine']['loadavg_before']} -> {out['machine']['loadavg_after']}; wrote {a.out}")


if __name__ == "__main__":
    main()
