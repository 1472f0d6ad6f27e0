"""Wall time of each interpretability eval per SAE on the default model (SmolLM2-135M), with its headline numbers.

    OMP_NUM_THREADS=1 python benchmarks/bench_interp_evals.py runs/interp/sae [--eval-tokens 4096] [--max-words 2000]

Times, for the SAE folder given (at its hook, on the default model):

- ``core`` on ``--eval-tokens`` held-out tokens (the pass AFA rides on), and the AFA part alone: the
  ``AFAAccumulator`` fed the same tokens' activations and codes (its added cost in the core pass);
- ``sparse_probing`` on the three offline datasets (``--probe-train-size`` / ``--probe-test-size`` texts per
  task, default 200 / 100 as the eval's);
- ``absorption`` with ``--max-words`` vocabulary words.

Each eval runs once (they take minutes on CPU); the machine's load average is recorded before and after
each one, since the development machines are shared. Writes ``benchmarks/results/bench_interp_evals.json``
and ``.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import torch
from saebench.evals.absorption import AbsorptionConfig, evaluate_absorption
from saebench.evals.absorption import format_summary as absorption_summary
from saebench.evals.common import load_eval_tokens, special_ids_of
from saebench.evals.core import evaluate_core
from saebench.evals.quasi_orthogonality import AFAAccumulator
from saebench.evals.sparse_probing import SparseProbingConfig, evaluate_sparse_probing
from saebench.evals.sparse_probing import format_summary as probing_summary

from saebench import models
from saebench.sae import SAE
from saebench.steering import site_activations

RESULTS = Path(__file__).parent / "results"


def load() -> list[float]:
    return [round(v, 2) for v in os.getloadavg()]


def _dump_probing(folder: Path, model, sae, dump: dict, res: dict) -> None:
    """Pooled inputs and our per-task results; plus token-level activations of 32 texts to check the pooling."""
    from saebench.evals.probe_datasets import load_probe_dataset
    from saebench.evals.sparse_probing import pooled_activations, tokenize_texts

    folder.mkdir(parents=True, exist_ok=True)
    out = {}
    for name, d in dump.items():
        (xtr, ltr), (xte, lte) = d["pooled"]["train"], d["pooled"]["test"]
        out[name] = {"llm": {"train": xtr, "test": xte}, "sae": {"train": ltr[0], "test": lte[0]}, "layout": d["layout"], "classes": d["classes"],
                     "tasks": d["tasks"], "ours": res["datasets"][name]["tasks"]}
    ds = load_probe_dataset("fortunes_topic")
    texts = [t for c in ds.classes for t in ds.train[c][:6]][:32]
    rows = tokenize_texts(texts, model.tokenizer, 128)
    L = max(map(len, rows))
    toks = torch.full((len(rows), L), model.tokenizer.eos_token_id)
    for i, r in enumerate(rows):
        toks[i, : len(r)] = torch.tensor(r)
    x = site_activations(model, sae.cfg.hook_name, None, toks, batch_size=8).float()
    x[torch.isin(toks, special_ids_of(model.tokenizer))] = 0  # SAEBench zeroes BOS/pad/EOS positions before pooling
    llm, (lat,) = pooled_activations(model, [sae], texts, hook=sae.cfg.hook_name, head=None)
    torch.save({"probing": out, "pooling_check": {"acts_BLD": x, "ours_llm": llm, "ours_sae": lat}, "sae_dir": str(Path(res.get("sae_dir", "")))},
               folder / "sparse_probing.pt")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("sae_dir")
    p.add_argument("--eval-tokens", type=int, default=4096)
    p.add_argument("--max-words", type=int, default=AbsorptionConfig.max_words)
    p.add_argument("--probe-train-size", type=int, default=SparseProbingConfig.train_size)
    p.add_argument("--probe-test-size", type=int, default=SparseProbingConfig.test_size)
    p.add_argument("--evals", nargs="+", default=["core", "sparse_probing", "absorption"])
    p.add_argument("--out", default=str(RESULTS / "bench_interp_evals"))
    p.add_argument("--dump", default=None, help="folder for the inputs of benchmarks/interp_vs_saebench.py (SAEBench's code on our data)")
    a = p.parse_args()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS") or 1))
    rec: dict = {"sae_dir": a.sae_dir, "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                                                  "threads": torch.get_num_threads()}, "evals": {}}
    t = time.time()
    model = models.load_model(None)
    rec["model_load_seconds"] = time.time() - t
    sae = SAE.load(a.sae_dir)
    rec["sae"] = {"architecture": sae.cfg.architecture, "d_sae": sae.d_sae, "k": sae.cfg.k, "hook_name": sae.cfg.hook_name}
    special = special_ids_of(model.tokenizer)

    if "core" in a.evals:
        toks = load_eval_tokens(model, "default", a.eval_tokens, 128)
        l0, t = load(), time.time()
        core = evaluate_core(sae, model, toks, special_ids=special, batch_size=8, progress=False)
        sec = time.time() - t
        x = site_activations(model, sae.cfg.hook_name, None, toks, batch_size=8).flatten(0, 1).float()
        x = x[~torch.isin(toks.flatten(), special)]
        acts = sae.encode_sparse(x)
        t = time.time()
        acc = AFAAccumulator(sae)
        for s in range(0, x.shape[0], 1024):
            acc.add(x[s : s + 1024], type(acts)(acts.values[s : s + 1024], acts.indices[s : s + 1024]))
        afa = acc.result()
        rec["evals"]["core"] = {"seconds": sec, "afa_seconds": time.time() - t, "load_before": l0, "load_after": load(), "tokens": core["n_tokens"],
                                "metrics": {k: core[k] for k in ("l0", "fvu", "ce_loss_score", "afa_norm_ratio", "afa_rel_error",
                                                                 "afa_abs_rel_error", "afa_over_activated_fraction", "afa_eps_lbo_median")}}
        assert abs(afa["afa_norm_ratio"] - core["afa_norm_ratio"]) < 1e-6
        print(json.dumps(rec["evals"]["core"], indent=1))

    if "sparse_probing" in a.evals:
        cfg = SparseProbingConfig(train_size=a.probe_train_size, test_size=a.probe_test_size)
        l0, t = load(), time.time()
        dump_sp = {} if a.dump else None
        sp = evaluate_sparse_probing(sae, model, cfg, progress=False, activations_out=dump_sp)
        rec["evals"]["sparse_probing"] = {"seconds": time.time() - t, "load_before": l0, "load_after": load(), "config": cfg.to_dict(),
                                          "summary": probing_summary(sp),
                                          "metrics": {k: v for k, v in sp.items() if k.endswith("_accuracy")},
                                          "top_1_latents": {n: {c: r["top_1_latent"] for c, r in d["tasks"].items()} for n, d in sp["datasets"].items()}}
        print(probing_summary(sp))
        if a.dump:
            _dump_probing(Path(a.dump), model, sae, dump_sp, sp)

    if "absorption" in a.evals:
        cfg = AbsorptionConfig(max_words=a.max_words)
        l0, t = load(), time.time()
        dump_ab = {} if a.dump else None
        ab = evaluate_absorption(sae, model, cfg, progress=False, activations_out=dump_ab)
        rec["evals"]["absorption"] = {"seconds": time.time() - t, "load_before": l0, "load_after": load(), "config": cfg.to_dict(),
                                      "summary": absorption_summary(ab),
                                      "metrics": {k: ab[k] for k in ("mean_absorption_fraction_score", "mean_full_absorption_score",
                                                                     "mean_num_split_features", "n_usable_letters", "enough_letters",
                                                                     "mean_probe_f1", "n_words", "n_dropped_prompts")},
                                      "probe_f1_per_letter": {k: round(v["f1_probe"], 4) for k, v in ab["letters"].items()}}
        print(absorption_summary(ab))
        if a.dump:
            Path(a.dump).mkdir(parents=True, exist_ok=True)
            torch.save(dump_ab | {"result": {k: v for k, v in ab.items() if k != "config"}, "prompt_token_pos": cfg.prompt_token_pos},
                       Path(a.dump) / "absorption.pt")

    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(rec, indent=2, default=str) + "\n")
    lines = [f"# Interpretability evals, wall time per SAE ({rec['sae']})", "",
             f"model load {rec['model_load_seconds']:.1f} s; {rec['machine']}", "", "| eval | seconds | load avg before -> after |", "|---|---|---|"]
    for name, r in rec["evals"].items():
        lines.append(f"| {name} | {r['seconds']:.1f} | {r['load_before']} -> {r['load_after']} |")
        if name == "core":
            lines.append(f"| AFA part of core | {r['afa_seconds']:.2f} | |")
    for name, r in rec["evals"].items():
        if "summary" in r:
            lines += ["", f"## {name}", "", "```", r["summary"], "```"]
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print(f"wrote {out.with_suffix('.json')} and .md")


if __name__ == "__main__":
    main()
