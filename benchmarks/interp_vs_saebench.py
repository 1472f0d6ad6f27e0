"""SAEBench's own sparse-probing and absorption code on our data: agreement with saebench's evals.

Runs inside ``benchmarks/envs/saebench`` (sae-bench 0.6, sae-lens 6, scikit-learn; ``bash
benchmarks/make_anchor_envs.sh saebench``) on the inputs ``bench_interp_evals.py --dump DIR`` writes
(the activations our evals used, the tasks they built, and our results). It imports nothing from
saebench; the SAE is loaded by sae-lens as ``saebench_worker.py`` does.

    OMP_NUM_THREADS=1 benchmarks/envs/saebench/bin/python benchmarks/interp_vs_saebench.py DIR --sae-dir runs/interp/sae

Sparse probing:
1. pooling: SAEBench's ``create_meaned_model_activations`` / ``get_sae_meaned_activations`` on token-level
   activations of 32 texts (special positions zeroed, as its collector does) against our pooled values;
2. the same binary tasks: SAEBench's ``get_top_k_mean_diff_mask`` + ``train_sklearn_probe`` on exactly our
   train/test rows, per task and k: accuracy and the top-1 index against ours;
3. SAEBench's whole ``train_probe_on_activations`` (its own negative sampling, ``torch.manual_seed(42)``)
   on the per-class pooled inputs: dataset means against ours (they differ by sampling only).
Absorption, on our word activations and our ground-truth probes (put into SAEBench's ``LinearProbe``):
SAEBench's ``train_k_sparse_probes`` (Adam, 50 epochs), ``eval_probe_and_sae_k_sparse_raw_scores``,
``build_metrics_df``, ``add_feature_splits_to_metrics_df``, and its ``FeatureAbsorptionCalculator`` on
the probe's true positives, with a stand-in model that returns our activation at the word position
(the calculator only reads ``run_with_cache(...)[1][hook][:, -6]`` and ``to_tokens`` lengths). Per
letter and mean: split latents, absorption fraction and full-absorption rate against ours.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
# jaxtyping's run-time shape checks share dimension names between SAEBench's nested calls: its
# train_probe_on_activations names the per-class tensors "train_dataset_size" and then calls
# train_sklearn_probe on a binary task twice that size under the same name, which fails with
# jaxtyping 0.3. The checks are annotations only; turn them off.
os.environ.setdefault("JAXTYPING_DISABLE", "1")
import warnings

warnings.filterwarnings("ignore", category=FutureWarning)

import torch

sys.path.insert(0, str(Path(__file__).parent))


def probing(dump: dict, sae) -> dict:
    import sae_bench.evals.sparse_probing.probe_training as pt
    import sae_bench.sae_bench_utils.activation_collection as ac

    out: dict = {}
    chk = dump["pooling_check"]
    acts = chk["acts_BLD"].float()
    llm = ac.create_meaned_model_activations({"x": acts})["x"]
    lat = ac.get_sae_meaned_activations({"x": acts}, sae, 125)["x"].float()
    out["pooling"] = {"llm_max_abs_diff": float((llm - chk["ours_llm"]).abs().max()), "llm_max_abs": float(llm.abs().max()),
                      "sae_max_abs_diff": float((lat - chk["ours_sae"]).abs().max()), "sae_max_abs": float(lat.abs().max())}
    same_tasks, pipeline = {}, {}
    for name, d in dump["probing"].items():
        per_task = {}
        for c, (tr, ytr, te, yte) in d["tasks"].items():
            ours = d["ours"][c]
            row = {}
            for prefix, src in (("llm", d["llm"]), ("sae", d["sae"])):
                xtr, xte = src["train"][tr].float(), src["test"][te].float()
                for k in (1, 2, 5, 10, 20, 50):
                    key = f"{prefix}_top_{k}_test_accuracy"
                    if key not in ours:
                        continue
                    mask = pt.get_top_k_mean_diff_mask(xtr, ytr.int(), k)
                    _, acc = pt.train_sklearn_probe(pt.apply_topk_mask_reduce_dim(xtr, mask), ytr.int(), pt.apply_topk_mask_reduce_dim(xte, mask),
                                                    yte.int())
                    row[key] = {"saebench": float(acc), "ours": ours[key]}
                    if k == 1:
                        row[f"{prefix}_top_1_index"] = {"saebench": int((~mask).nonzero()[0]),
                                                        "ours": ours.get("top_1_latent") if prefix == "sae" else ours.get("llm_top_1_index")}
            per_task[c] = row
        same_tasks[name] = per_task
        # SAEBench's own pipeline on the per-class pooled inputs
        torch.manual_seed(42)
        res = {}
        for prefix, src in (("llm", d["llm"]), ("sae", d["sae"])):
            cls = {s: {c: src[s][d["layout"][s][1][c] : d["layout"][s][1][c] + d["layout"][s][0][c]].float() for c in d["classes"]}
                   for s in ("train", "test")}
            for k in (1, 2, 5):
                _, accs = pt.train_probe_on_activations(cls["train"], cls["test"], select_top_k=k)
                res[f"{prefix}_top_{k}_test_accuracy"] = {"saebench": statistics.mean(accs.values()),
                                                          "ours": statistics.mean(t[f"{prefix}_top_{k}_test_accuracy"] for t in d["ours"].values())}
        pipeline[name] = res
    diffs = [abs(v["saebench"] - v["ours"]) for t in same_tasks.values() for r in t.values() for k, v in r.items() if k.endswith("accuracy")]
    idx = [v["saebench"] == v["ours"] for t in same_tasks.values() for r in t.values() for k, v in r.items() if k.endswith("index")]
    out |= {"same_tasks": same_tasks, "same_tasks_summary": {"n_comparisons": len(diffs), "max_abs_accuracy_diff": max(diffs),
                                                              "mean_abs_accuracy_diff": statistics.mean(diffs), "top1_index_agreement": sum(idx) / len(idx)},
            "saebench_pipeline": pipeline}
    return out


class StandInModel:
    """What ``FeatureAbsorptionCalculator`` reads from a model: activations at position −6 and token lengths."""

    def __init__(self, acts_by_word: dict[str, torch.Tensor], hook: str, template_tail: str):
        self.acts, self.hook, self.tail = acts_by_word, hook, template_tail
        self.tokenizer = object()

    def _word(self, prompt: str) -> str:
        last = prompt.split("\n")[-1]
        assert last.endswith(self.tail), last
        return last[: -len(self.tail)]

    def run_with_cache(self, prompts, names_filter=None):
        x = torch.stack([self.acts[self._word(p)] for p in prompts])
        full = torch.zeros(len(prompts), 6, x.shape[-1])
        full[:, 0] = x
        return None, {self.hook: full}

    def to_tokens(self, prompt):
        return torch.zeros(1, 6, dtype=torch.long)


def absorption(dump: dict, sae, layer: int) -> dict:
    from sae_bench.evals.absorption import k_sparse_probing as ksp
    from sae_bench.evals.absorption.feature_absorption_calculator import FeatureAbsorptionCalculator
    from sae_bench.evals.absorption.probing import LinearProbe
    from sae_bench.evals.absorption.prompting import first_letter_formatter

    # SAEBench's loops run over all 26 letters; with a subsample some letters have no test word. Its code
    # is run on the letters our eval probed (train and test positives): labels are re-indexed into that
    # alphabet, which its k_sparse_probing module reads from its global LETTERS at call time.
    present = "".join(sorted(dump["probes"]))
    full = "abcdefghijklmnopqrstuvwxyz"
    words = dump["words"]
    n_tr = dump["n_train"]
    keep_tr = [i for i in range(n_tr) if full[int(dump["y_train"][i])] in present]
    keep_te = [i for i in range(len(words) - n_tr) if full[int(dump["y_test"][i])] in present]
    x_tr, x_te = dump["x_train"][keep_tr].float(), dump["x_test"][keep_te].float()
    train_labels = [(words[i], present.index(full[int(dump["y_train"][i])])) for i in keep_tr]
    eval_labels = [(words[n_tr + i], present.index(full[int(dump["y_test"][i])])) for i in keep_te]
    ksp.LETTERS = present
    probe = LinearProbe(x_tr.shape[1], len(present))
    with torch.no_grad():
        for letter, (w, b) in dump["probes"].items():
            probe.fc.weight[present.index(letter)] = w
            probe.fc.bias[present.index(letter)] = b
    t = time.time()
    torch.manual_seed(42)
    kprobes = ksp.train_k_sparse_probes(sae, train_labels, x_tr, ks=list(range(1, 11)), l1_decay=0.01, batch_size=4096, num_epochs=50,
                                        precalc_sae_acts=True)
    raw = ksp.eval_probe_and_sae_k_sparse_raw_scores(sae, probe, kprobes, eval_labels, x_te)
    meta = ksp.sae_k_sparse_metadata(sae, probe, kprobes, "ours", layer)
    metrics = ksp.build_metrics_df(raw, meta, 10)
    ksp.add_feature_splits_to_metrics_df(metrics, 10, 0.03)
    acts_by_word = {w: x_te[i] for i, (w, _) in enumerate(eval_labels)}
    hook = f"blocks.{layer}.hook_resid_post"
    calc = FeatureAbsorptionCalculator(model=StandInModel(acts_by_word, hook, " has the first letter:"), icl_word_list=words, max_icl_examples=10,
                                       base_template="{word} has the first letter:", answer_formatter=first_letter_formatter(), word_token_pos=-6,
                                       full_absorption_probe_cos_sim_threshold=0.025, absorption_fraction_probe_cos_sim_threshold=0.1,
                                       probe_projection_proportion_threshold=0.4, absorption_fraction_max_absorbing_latents=3, batch_size=10)
    ours = dump["result"]["letters"]
    letters = {}
    for _, row in metrics.iterrows():
        L = row["letter"]
        tps = raw[(raw["answer_letter"] == L) & (raw[f"score_probe_{L}"] > 0)]["token"].tolist()
        split = [int(i) for i in row["split_feats"]]
        res = calc.calculate_absorption(sae, words=tps, probe_direction=probe.weights[present.index(L)].detach(), main_feature_ids=split,
                                        layer=layer, show_progress=False)
        n = len(tps)
        fr = sum(r.absorption_fraction for r in res.word_results) / n if n else float("nan")
        full = sum(r.is_full_absorption for r in res.word_results) / n if n else float("nan")
        o = ours.get(L, {})
        letters[L] = {"f1_probe": {"saebench": float(row["f1_probe"]), "ours": o.get("f1_probe")},
                      "split_feats": {"saebench": split, "ours": o.get("split_feats")},
                      "k_sparse_f1": {"saebench": [float(row[f"f1_sparse_sae_{k}"]) for k in range(1, 11)], "ours": o.get("k_sparse_f1")},
                      "mean_absorption_fraction": {"saebench": fr, "ours": o.get("mean_absorption_fraction")},
                      "full_absorption_rate": {"saebench": full, "ours": o.get("full_absorption_rate")},
                      "usable": float(row["f1_probe"]) > 0.6}
    usable = [v for v in letters.values() if v["usable"]]

    def mean(key, who):
        vals = [v[key][who] for v in usable if v[key][who] is not None]
        return statistics.mean(vals) if vals else float("nan")

    summary = {k: {"saebench": mean(k, "saebench"), "ours": dump["result"][s]} for k, s in
               (("mean_absorption_fraction", "mean_absorption_fraction_score"), ("full_absorption_rate", "mean_full_absorption_score"))}
    summary["mean_num_split_features"] = {"saebench": statistics.mean(len(v["split_feats"]["saebench"]) for v in usable) if usable else float("nan"),
                                          "ours": dump["result"]["mean_num_split_features"]}
    summary["split_feats_identical_letters"] = sum(v["split_feats"]["saebench"] == v["split_feats"]["ours"] for v in letters.values())
    summary["top1_split_latent_identical_letters"] = sum(v["split_feats"]["saebench"][:1] == (v["split_feats"]["ours"] or [])[:1]
                                                         for v in letters.values())
    summary["n_letters"] = len(letters)
    summary["letters_used"] = present
    summary["n_train_words"], summary["n_test_words"] = len(train_labels), len(eval_labels)
    summary["n_usable_letters"] = len(usable)
    summary["max_abs_f1_probe_diff"] = max(abs(v["f1_probe"]["saebench"] - v["f1_probe"]["ours"]) for v in letters.values())
    return {"seconds": time.time() - t, "summary": summary, "letters": letters}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("dump")
    p.add_argument("--sae-dir", required=True)
    p.add_argument("--out", default=str(Path(__file__).parent / "results" / "interp_vs_saebench.json"))
    a = p.parse_args()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS") or 1))
    from saebench_worker import load_sae

    sae, how, _ = load_sae(Path(a.sae_dir), "cpu")
    cfg = json.loads((Path(a.sae_dir) / "cfg.json").read_text())
    layer = int(cfg["hook_name"].split(".")[1])
    rec: dict = {"sae_dir": a.sae_dir, "sae_loaded_by": how}
    d = Path(a.dump)
    if (d / "sparse_probing.pt").exists():
        rec["sparse_probing"] = probing(torch.load(d / "sparse_probing.pt", weights_only=False), sae)
        print(json.dumps({k: v for k, v in rec["sparse_probing"].items() if k != "same_tasks"}, indent=1))
    if (d / "absorption.pt").exists():
        rec["absorption"] = absorption(torch.load(d / "absorption.pt", weights_only=False), sae, layer)
        print(json.dumps(rec["absorption"].get("summary", rec["absorption"]), indent=1))
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(rec, indent=2, default=float) + "\n")
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
