"""Transcoder vs skip-transcoder vs an SAE on SmolLM2-135M's layer-L MLP output, from ONE harvest (issue #18.7).

Three runs share one activation stream (``train_many``): a TopK transcoder and a TopK skip-transcoder reading
``blocks.L.ln2.hook_normalized`` and predicting ``blocks.L.hook_mlp_out``, and a TopK SAE reconstructing
``blocks.L.hook_mlp_out`` itself (the reference every transcoder paper compares with). Each is evaluated on
held-out tokens by the core eval: FVU against ``hook_mlp_out`` and CE loss recovered / KL with ``hook_mlp_out``
replaced by the prediction (zero ablation of ``hook_mlp_out`` as the floor).

Writes ``benchmarks/results/transcoders_smollm2.json`` and ``.md``.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_transcoders.py --layer 3 --tokens 65536
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--layer", type=int, default=3)
    ap.add_argument("--tokens", type=int, default=65_536)
    ap.add_argument("--eval-tokens", type=int, default=8_192)
    ap.add_argument("--k", type=int, default=32)
    ap.add_argument("--expansion", type=int, default=8)
    ap.add_argument("--lr", type=float, default=None, help="Adam lr for all three (default: the library's width rule).")
    ap.add_argument("--out", default=str(HERE / "results" / "transcoders_smollm2"))
    ap.add_argument("--work", default="/tmp/bench_transcoders")
    args = ap.parse_args()
    from saebench.evals.core import evaluate_core
    from saebench.trainers.loop import train_many

    from saebench import models, text
    from saebench.config import TrainConfig
    from saebench.sae import load_sae

    L = args.layer
    inp, out = f"blocks.{L}.ln2.hook_normalized", f"blocks.{L}.hook_mlp_out"
    common = dict(lr=args.lr, k=args.k, expansion_factor=args.expansion, training_tokens=args.tokens, batch_size_tokens=1024, context_size=128,
                  lr_warmup_steps=5, eval_tokens=0, model_batch_size=16, shuffle_buffer_tokens=16_384, resume=False, checkpoint_every_steps=100_000)
    runs = {
        "transcoder (topk)": TrainConfig(hook_name=inp, target_hook=out, out_dir=f"{args.work}/tc", **common),
        "skip-transcoder (topk)": TrainConfig(hook_name=inp, target_hook=out, skip_transcoder=True, out_dir=f"{args.work}/skip", **common),
        "SAE on mlp_out (topk)": TrainConfig(hook_name=out, out_dir=f"{args.work}/sae", **common),
    }
    t0 = time.perf_counter()
    model = models.load_model()
    t_model = time.perf_counter() - t0
    t0 = time.perf_counter()
    results = train_many(list(runs.values()), model=model, progress=False)
    t_train = time.perf_counter() - t0
    tokens = text.load_tokens("default", model.tokenizer, 128, args.eval_tokens, split="eval")
    special = text.special_ids(model.tokenizer)
    rows = {}
    for (name, c), r in zip(runs.items(), results):
        sae = load_sae(r.out_dir)
        t0 = time.perf_counter()
        m = evaluate_core(sae, model, tokens, special_ids=special, batch_size=16, progress=False)
        rows[name] = {k: m[k] for k in ("fvu", "fvu_without_outliers", "l0", "dead_fraction", "ce_loss_without_sae", "ce_loss_with_sae", "ce_loss_with_ablation",
                                        "ce_loss_score", "kl_div_score", "n_tokens")} | {"eval_seconds": time.perf_counter() - t0,
                                                                                          "architecture_in_cfg_json": json.loads((r.out_dir / "cfg.json").read_text())["architecture"]}
    report = {"model": "smollm2-135m", "layer": L, "input_hook": inp, "target_hook": out, "training_tokens": args.tokens, "k": args.k,
              "d_sae": args.expansion * 576, "eval_tokens": args.eval_tokens, "model_load_seconds": t_model,
              "harvest_and_train_seconds_all_three": t_train, "lr": args.lr,
              "final_training_fvu": {name: r.history[-1]["fvu"] for name, r in zip(runs, results)}, "machine": f"{platform.processor() or platform.machine()}, torch {torch.__version__}, "
              f"{torch.get_num_threads()} thread(s)", "rows": rows}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out + ".json").write_text(json.dumps(report, indent=1))
    lines = [f"# Transcoders on SmolLM2-135M layer {L}: {inp} -> {out} (issue #18.7)", "",
             f"One harvest of {args.tokens:,} training tokens feeds all three (train_many); k = {args.k}, d_sae = {args.expansion * 576}; "
             f"core eval on {args.eval_tokens:,} held-out tokens, `{out}` replaced by each prediction (CE/KL) and zeroed (floor).", "",
             ("    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_transcoders.py " + f"--layer {L} --tokens {args.tokens}"
              + (f" --lr {args.lr}" if args.lr else "")), "",
             "| run | cfg.json architecture | FVU vs mlp_out (train, last step) | FVU held-out | FVU held-out w/o outliers | L0 | dead | CE clean | CE spliced | CE zero-abl. | CE loss recovered | KL score |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, r in rows.items():
        lines.append(f"| {name} | `{r['architecture_in_cfg_json']}` | {report['final_training_fvu'][name]:.3f} | {r['fvu']:.3f} | {r['fvu_without_outliers']:.3f} | {r['l0']:.1f} | {r['dead_fraction']:.3f} | {r['ce_loss_without_sae']:.4f} | "
                     f"{r['ce_loss_with_sae']:.4f} | {r['ce_loss_with_ablation']:.4f} | {r['ce_loss_score']:.4f} | {r['kl_div_score']:.4f} |")
    lines += ["", f"Harvest + training of all three: {t_train:.0f} s; model load {t_model:.0f} s ({report['machine']}; 2 shared cores)."]
    Path(args.out + ".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
