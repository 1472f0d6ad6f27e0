"""Sparse probing (SAEBench's ``sparse_probing``; Gurnee et al. 2023, "Finding Neurons in a Haystack").

For every class of a labelled dataset (``evals/probe_datasets.py``) a binary one-vs-rest task is built
as in SAEBench's ``probe_training.prepare_probe_data``: all ``train_size // 2`` texts of the class
are positives; the negatives are ``ceil(n_pos / n_other_classes)`` random texts of each other class,
then ``n_pos`` of those at random. The test set is built the same way from held-out texts.

Each text is one row: BOS + its first ``context_length − 1`` tokens. The model runs to the SAE's
hook; activations are **mean-pooled over the text's tokens** (BOS, EOS, pad and other special tokens
excluded, as SAEBench's ``create_meaned_model_activations``), and the SAE latents are the mean over
the same tokens of the per-token SAE code (``get_sae_meaned_activations``: encode, then pool).

Probes (``evals/probes.py``): L2 logistic regression with scikit-learn's objective and C = 1.

- ``sae_top_{k}_test_accuracy``: the k latents with the largest |mean_pos − mean_neg| on the train
  set, a probe on those k pooled latents, accuracy on the test set; k in ``ks`` (default 1, 2, 5, 10,
  20, 50; SAEBench's default is 1, 2, 5).
- ``top_1_latent``: the latent chosen for k = 1 (per task), with its mean difference.
- ``sae_test_accuracy``: a probe on all pooled latents.
- ``llm_test_accuracy``: the dense baseline, a probe on the pooled activations themselves;
  ``llm_top_{k}_test_accuracy``: the same top-k selection over the activation channels.

Accuracies are averaged over the classes of a dataset, then over the datasets (SAEBench's
aggregation). Differences from SAEBench: the all-features probes (``llm_test_accuracy``,
``sae_test_accuracy``) are the same L2 logistic regression as the top-k ones, where SAEBench trains
them with AdamW for up to 100 epochs and keeps the epoch with the best *test* accuracy; texts get a
BOS and are not padded (SAEBench pads to 128 and masks); the class samples are drawn with Python's
``random`` rather than pandas. Tasks and sizes are configurable; the defaults are smaller than
SAEBench's 4,000 / 1,000 so that a CPU run takes minutes.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict
from typing import Any

import torch
from pydantic.dataclasses import dataclass as pydantic_dataclass  # validated configs; registry flags come from their fields
from saebench.evals.common import one_site
from saebench.evals import plots
from saebench.evals import registry
from saebench.evals.registry import Command, ConfigSpec, EvalSpec, register
from saebench.evals.probe_datasets import OFFLINE, ProbeDataset, load_probe_dataset
from saebench.evals.probes import fit_logistic, top_k_mean_diff
from torch import Tensor
from tqdm.auto import tqdm

from saebench.sae import SAE
from saebench.site import Site


@pydantic_dataclass(frozen=True)
class SparseProbingConfig:
    datasets: tuple[str, ...] = OFFLINE
    train_size: int = 200  # per binary task (half positives), as SAEBench's probe_train_set_size (4000)
    test_size: int = 100  # per binary task, as SAEBench's probe_test_set_size (1000)
    context_length: int = 128
    ks: tuple[int, ...] = (1, 2, 5, 10, 20, 50)
    seed: int = 42
    all_latents_probe: bool = True  # also fit sae_test_accuracy (a probe on every latent)
    C: float = 1.0
    batch_size: int = 8

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("batch_size")
        return d


# --------------------------------------------------------------------------- activations


def tokenize_texts(texts: Sequence[str], tokenizer, context_length: int) -> list[list[int]]:
    """BOS + the first ``context_length − 1`` tokens of each text."""
    bos = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    ids = tokenizer(list(texts), add_special_tokens=False, verbose=False)["input_ids"]
    return [[bos] + list(x[: context_length - 1]) for x in ids]


@torch.no_grad()
def pooled_activations(model, saes: Sequence[SAE], texts: Sequence[str], *, hook: str, head: int | None, context_length: int = 128,
                       batch_size: int = 8, special_ids: Tensor | None = None, progress: bool = False) -> tuple[Tensor, list[Tensor]]:
    """Mean-pooled activations [n, d] at ``hook`` and, per SAE, mean-pooled latents [n, d_sae] (float32, CPU).

    Rows are run in length order (right-padded within a batch; padding never reaches earlier
    positions of a causal model) and pooled over non-special tokens.
    """
    tok = model.tokenizer
    rows = tokenize_texts(texts, tok, context_length)
    if special_ids is None:
        from saebench.evals.common import special_ids_of

        special_ids = special_ids_of(tok)
    special = special_ids
    pad = tok.eos_token_id
    order = sorted(range(len(rows)), key=lambda i: len(rows[i]))
    device = model.cfg.device
    site = Site(hook, head)
    stop = site.stop_layer
    llm = None
    lat = [torch.zeros(len(rows), s.d_sae) for s in saes]
    for start in tqdm(range(0, len(order), batch_size), desc=f"probe activations {hook}", disable=not progress):
        idx = order[start : start + batch_size]
        L = max(len(rows[i]) for i in idx)
        toks = torch.full((len(idx), L), pad, dtype=torch.long)
        valid = torch.zeros(len(idx), L, dtype=torch.bool)
        for j, i in enumerate(idx):
            toks[j, : len(rows[i])] = torch.tensor(rows[i])
            valid[j, : len(rows[i])] = True
        valid &= ~torch.isin(toks, special)
        if not valid.any(1).all():
            bad = [texts[idx[j]][:60] for j in range(len(idx)) if not valid[j].any()]
            raise ValueError(f"texts with no non-special token cannot be pooled: {bad}")
        _, cache = model.run_with_cache(toks.to(device), names_filter=lambda n: n == hook, stop_at_layer=stop)
        x = site.flatten(cache[hook]).float().cpu()
        del cache
        counts = valid.sum(1, keepdim=True).float()
        pooled = (x * valid[..., None]).sum(1) / counts
        if llm is None:
            llm = torch.zeros(len(rows), x.shape[-1])
        rows_t = torch.tensor(idx)
        llm[rows_t] = pooled
        flat = x[valid]
        row_of = rows_t[:, None].expand(-1, L)[valid]
        for s, out in zip(saes, lat):
            if x.shape[-1] != s.d_in:
                raise ValueError(f"SAE d_in={s.d_in} does not match the width {x.shape[-1]} of hook {hook}")
            acts = s.encode_sparse(flat.to(s.device, s.dtype))
            v, ix = acts.values.float().cpu(), acts.indices.cpu()
            out.index_put_((row_of[:, None].expand_as(ix).reshape(-1), ix.reshape(-1)), v.reshape(-1), accumulate=True)
            out[rows_t] /= counts
    return llm, lat


# --------------------------------------------------------------------------- tasks and probes


def binary_task(n_by_class: dict[str, int], offsets: dict[str, int], cls: str, gen: torch.Generator) -> tuple[Tensor, Tensor]:
    """Row indices and labels of ``cls``-vs-rest (SAEBench's ``prepare_probe_data``, not the SCR variant)."""
    pos = torch.arange(offsets[cls], offsets[cls] + n_by_class[cls])
    others = [c for c in n_by_class if c != cls]
    per = math.ceil(len(pos) / len(others))
    neg = torch.cat([offsets[c] + torch.randperm(n_by_class[c], generator=gen)[:per] for c in others])
    neg = neg[torch.randperm(len(neg), generator=gen)[: len(pos)]]
    return torch.cat([pos, neg]), torch.cat([torch.ones(len(pos), dtype=torch.long), torch.zeros(len(neg), dtype=torch.long)])


def probe_accuracies(xtr: Tensor, ytr: Tensor, xte: Tensor, yte: Tensor, ks: Sequence[int], prefix: str, *, all_features: bool = True,
                     C: float = 1.0) -> dict[str, Any]:
    """``{prefix}_test_accuracy`` (all features) and ``{prefix}_top_{k}_test_accuracy`` (top-k by mean difference)."""
    out: dict[str, Any] = {}
    if all_features:
        out[f"{prefix}_test_accuracy"] = fit_logistic(xtr, ytr, C=C).accuracy(xte, yte)
    for k in ks:
        if k > xtr.shape[1]:
            continue
        sel = top_k_mean_diff(xtr, ytr, k)
        out[f"{prefix}_top_{k}_test_accuracy"] = fit_logistic(xtr[:, sel], ytr, C=C).accuracy(xte[:, sel], yte)
        if k == 1:
            i = int(sel[0])
            out[f"{prefix}_top_1_index"] = i
            out[f"{prefix}_top_1_mean_diff"] = float(xtr[ytr == 1, i].double().mean() - xtr[ytr == 0, i].double().mean())
    return out


def _mean_dicts(ds: Sequence[dict[str, Any]]) -> dict[str, float]:
    keys = [k for k in ds[0] if k.endswith("_accuracy") and all(k in d for d in ds)]
    return {k: sum(d[k] for d in ds) / len(ds) for k in keys}


@torch.no_grad()
def evaluate_sparse_probing(saes: SAE | Sequence[SAE], model, config: SparseProbingConfig | None = None, *,
                            datasets: Sequence[ProbeDataset] | None = None, special_ids: Tensor | None = None,
                            progress: bool = True, activations_out: dict | None = None) -> dict[str, Any] | list[dict[str, Any]]:
    """Sparse-probing results for one SAE or several at one hook (the model forwards are shared).

    Returns per SAE: the SAEBench-named means over datasets (``llm_test_accuracy``,
    ``llm_top_{k}_test_accuracy``, ``sae_test_accuracy``, ``sae_top_{k}_test_accuracy``) and
    ``datasets[name]`` with the same means over its classes and ``tasks[class]`` with each task's
    accuracies and ``top_1_latent`` / ``top_1_mean_diff``. ``activations_out``, if given, receives per
    dataset the pooled activations and latents, the class layout and the tasks' row indices (for
    side-by-side runs).
    """
    cfg = config or SparseProbingConfig()
    single = isinstance(saes, SAE)
    sae_list = [saes] if single else list(saes)
    hook, head = one_site(model, sae_list, "evaluate_sparse_probing")
    if special_ids is None:
        from saebench.evals.common import special_ids_of

        special_ids = special_ids_of(model.tokenizer)
    dsets = list(datasets) if datasets is not None else [load_probe_dataset(n, cfg.train_size, cfg.test_size, cfg.seed) for n in cfg.datasets]
    per_sae: list[dict[str, Any]] = [{"datasets": {}} for _ in sae_list]
    llm_by_ds = {}
    for ds in dsets:
        split_x = {}
        layout = {}
        for split in ("train", "test"):
            by_class = getattr(ds, split)
            texts = [t for c in ds.classes for t in by_class[c]]
            n_by = {c: len(by_class[c]) for c in ds.classes}
            offs, o = {}, 0
            for c in ds.classes:
                offs[c] = o
                o += n_by[c]
            layout[split] = (n_by, offs)
            split_x[split] = pooled_activations(model, sae_list, texts, hook=hook, head=head, context_length=cfg.context_length,
                                                batch_size=cfg.batch_size, special_ids=special_ids, progress=progress)
        tasks_llm, tasks_sae = {}, [{} for _ in sae_list]
        if activations_out is not None:
            activations_out[ds.name] = {"pooled": split_x, "layout": layout, "classes": ds.classes, "tasks": {}}
        for ci, c in enumerate(ds.classes):
            gen = torch.Generator().manual_seed(cfg.seed * 1000 + ci)
            tr_idx, ytr = binary_task(*layout["train"], c, gen)
            te_idx, yte = binary_task(*layout["test"], c, gen)
            if activations_out is not None:
                activations_out[ds.name]["tasks"][c] = (tr_idx, ytr, te_idx, yte)
            (xtr, lat_tr), (xte, lat_te) = split_x["train"], split_x["test"]
            tasks_llm[c] = probe_accuracies(xtr[tr_idx], ytr, xte[te_idx], yte, cfg.ks, "llm", C=cfg.C)
            for si in range(len(sae_list)):
                r = probe_accuracies(lat_tr[si][tr_idx], ytr, lat_te[si][te_idx], yte, cfg.ks, "sae", all_features=cfg.all_latents_probe, C=cfg.C)
                r["top_1_latent"] = r.pop("sae_top_1_index", None)
                r["top_1_mean_diff"] = r.pop("sae_top_1_mean_diff", None)
                tasks_sae[si][c] = r
        llm_by_ds[ds.name] = tasks_llm
        for si in range(len(sae_list)):
            tasks = {c: tasks_llm[c] | tasks_sae[si][c] for c in ds.classes}
            per_sae[si]["datasets"][ds.name] = _mean_dicts(list(tasks.values())) | {
                "source": ds.source, "n_train": sum(len(v) for v in ds.train.values()), "n_test": sum(len(v) for v in ds.test.values()),
                "tasks": tasks}
    for r, s in zip(per_sae, sae_list):
        r |= _mean_dicts(list(r["datasets"].values()))
        r |= {"hook_name": s.cfg.hook_name, "d_sae": s.d_sae, "config": cfg.to_dict()}
    return per_sae[0] if single else per_sae


# --------------------------------------------------------------------------- CLI


def format_summary(res: dict[str, Any]) -> str:
    ks = sorted({int(k.split("_")[2]) for k in res if k.startswith("sae_top_")})
    lines = [f"{'dataset':<22}{'LLM':>7}{'SAE':>7}" + "".join(f"{'top' + str(k):>8}" for k in ks)]
    for name, d in list(res["datasets"].items()) + [("mean", res)]:
        cells = [d.get("llm_test_accuracy"), d.get("sae_test_accuracy")] + [d.get(f"sae_top_{k}_test_accuracy") for k in ks]
        lines.append(f"{name:<22}" + "".join(f"{v:>7.3f}" if i < 2 else f"{v:>8.3f}" for i, v in enumerate(c if c is not None else math.nan for c in cells)))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """CLI: ``python -m saebench.evals.sparse_probing SAE_DIR [--datasets ...]``; writes ``eval_sparse_probing.json``."""
    return registry.run_one_sae_cli("sparse_probing", "saebench sparse-probing", __doc__, evaluate_sparse_probing, format_summary, "eval_sparse_probing.json", argv)


# --------------------------------------------------------------------------- the bench's sparse-probing eval: one job per hook


def _sparse_probing_columns(sp: dict[str, Any]) -> dict[str, Any]:
    row = {k: v for k, v in sp.items() if k.endswith("_test_accuracy")}
    for name, d in sp.get("datasets", {}).items():
        for k in ("llm_test_accuracy", "sae_top_1_test_accuracy", "sae_top_5_test_accuracy"):
            if k in d:
                row[f"{k}[{name}]"] = d[k]
    return row


def _sparse_probing_figures(rows, results) -> dict[str, Any]:
    sp = {name: r["sparse_probing"] for name, r in results.items() if r.get("sparse_probing")}
    return {"sparse_probing": plots.sparse_probing_figure(sp)} if sp else {}


register(EvalSpec(
    name="sparse_probing", scope="hook", order=50,
    compute=lambda ctx, saes, sae_dirs: evaluate_sparse_probing(saes, ctx.model, ctx.config("sparse_probing"), progress=ctx.progress),
    configs=(ConfigSpec("sparse_probing", SparseProbingConfig, prefix="probe", inherit=("batch_size",),
                        flags={"all_latents_probe": ["--probe-all-latents-probe"], "C": ["--probe-c"]},
                        helps={"datasets": "sparse probing: offline task names, hf:NAME (SAEBench's datasets) or labelled files",
                               "train_size": "sparse probing: texts per binary task (train)", "test_size": "sparse probing: texts per binary task (test)",
                               "ks": "sparse probing: k values", "batch_size": "sequences per forward (saebench bench: its --batch-size unless this flag is given)"}),),
    cache_key=lambda cfgs, data: cfgs["sparse_probing"].to_dict(),
    columns=_sparse_probing_columns, figures=_sparse_probing_figures,
    command=Command("sparse-probing", "SAEBench's sparse probing of one SAE: k-latent probes against a dense probe.",
                    "saebench.evals.sparse_probing:main"),
))


if __name__ == "__main__":
    main()
