"""Reconstruction eval: the core metrics of ``evals/core.py`` for one SAE or several, sharing forwards per hook.

The metrics, their definitions and the code that computes them are ``evals/core.py``'s: one path,
:func:`~saebench.evals.core.evaluate_hook_group`, evaluates a group of SAEs at one hook (``evaluate_core``
is that group with one SAE). A batch gets **one** clean forward (activations + logits) shared by every
SAE at the hook, then one spliced forward per SAE (resumed at the hook where the model allows); the
zero-ablation terms are shared too (at a residual hook they cost one single-sequence pass per eval,
see ``core.ZeroAblation``). For N SAEs that is N + 1 forwards per batch instead of 2N. The same pass
also feeds the dead-latent counters of ``evals/dead.py`` (every position encoded, special ones kept
apart), and can run further than the downstream window on cheap truncated forwards
(``stop_at_layer``) when the dead-latent window is longer.

This module groups SAEs by hook (:func:`evaluate_reconstruction`) and is a CLI
(``python -m saebench.evals.reconstruction``); its defaults are ``saebench eval``'s: the SAE's own
corpus and context size, ``DEFAULT_BATCH_SIZE`` sequences per forward.
"""

from __future__ import annotations

import argparse
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from torch import Tensor

from saebench.evals import plots
from saebench.evals.core import DEFAULT_BATCH_SIZE, evaluate_hook_group, format_table, held_out_tokens
from saebench.evals.dead import DeadConfig
from saebench.evals.registry import Command, ConfigSpec, EvalSpec, SharedPass, data_key, register

from saebench.sae import SAE
from saebench.site import Site

__all__ = ["evaluate_hook_group", "evaluate_reconstruction", "run_reconstruction_eval"]


def evaluate_reconstruction(
    saes: SAE | Sequence[SAE],
    model,
    tokens: Tensor,
    *,
    special_ids: Tensor | None = None,
    batch_size: int = DEFAULT_BATCH_SIZE,
    downstream: bool = True,
    progress: bool = True,
    selection: str = "plain",
) -> dict[str, Any] | list[dict[str, Any]]:
    """Core metrics (``evaluate_core``'s definitions) for one SAE or several, sharing forwards per hook.

    ``selection="gradient"``: g-SAE's gradient-aware selection (``evaluate_hook_group``; g-SAEs only)."""
    single = isinstance(saes, SAE)
    sae_list = [saes] if single else list(saes)
    groups: dict[tuple, list[int]] = defaultdict(list)
    for i, s in enumerate(sae_list):
        groups[Site.of_sae(s)].append(i)
    results: list[dict[str, Any] | None] = [None] * len(sae_list)
    for idx in groups.values():
        res = evaluate_hook_group([sae_list[i] for i in idx], model, tokens, special_ids=special_ids, core=True, dead=False,
                                  downstream=downstream, batch_size=batch_size, progress=progress, selection=selection)
        for i, r in zip(idx, res):
            results[i] = r["core"]
    return results[0] if single else results


def run_reconstruction_eval(sae_dir: str | Path, model=None, *, corpus: str | None = None, eval_tokens: int = 65_536, context_size: int | None = None,
                            batch_size: int = DEFAULT_BATCH_SIZE, device: str = "cpu", out: str | Path | None = None,
                            progress: bool = True, selection: str = "plain") -> dict[str, Any]:
    """Load an SAE folder, evaluate the core metrics on held-out text, write ``eval_reconstruction.json``.

    ``corpus`` and ``context_size`` default to the SAE's own (its cfg), as in ``saebench eval``.
    ``selection="gradient"`` (g-SAEs only) selects latents with the g-SAE's training rule (``evals/gsae.py``).
    """
    from saebench import models, text
    from saebench.io import write_json

    sae = SAE.load(sae_dir, device=device)
    if model is None:
        model = models.load_model(sae.cfg.model_name or None, device=device)
    tokens, corpus, ctx = held_out_tokens(sae, model, corpus, eval_tokens, context_size, progress=progress)
    res = evaluate_reconstruction(sae, model, tokens, special_ids=text.special_ids(model.tokenizer), batch_size=batch_size, progress=progress,
                                  selection=selection)
    res |= {"corpus": corpus, "split": "eval", "context_size": ctx}
    write_json(Path(out) if out else Path(sae_dir) / "eval_reconstruction.json", res)
    return res


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """CLI: ``python -m saebench.evals.reconstruction SAE_DIR [--eval-tokens N]``."""
    from saebench.evals.common import add_common_args

    from saebench.config import HelpFormatter

    p = argparse.ArgumentParser(prog="saebench.evals.reconstruction", description=__doc__.split("\n\n")[0], formatter_class=HelpFormatter)
    add_common_args(p, own_text=True)
    p.add_argument("--selection", choices=["plain", "gradient"], default="plain",
                   help="plain: the SAE's inference rule; gradient: a g-SAE's training rule, with ∇ₓ of the LM loss from the eval's clean forward")
    a = p.parse_args(argv)
    res = run_reconstruction_eval(a.sae_dir, None, corpus=a.corpus, eval_tokens=a.eval_tokens, context_size=a.context_size,
                                  batch_size=a.batch_size, device=a.device, out=a.out, progress=not a.no_progress, selection=a.selection)
    print(format_table(res))
    return res


if __name__ == "__main__":
    main()


# --------------------------------------------------------------------------- the bench's core and dead evals: one shared pass per hook

CORE_COLUMNS = ("l0", "l1", "fvu", "fvu_without_outliers", "n_outlier_tokens", "explained_variance", "mse", "cossim", "l2_ratio",
                "relative_reconstruction_bias", "ce_loss_score", "kl_div_score", "ce_loss_without_sae", "ce_loss_with_sae", "ce_loss_with_ablation",
                "kl_div_with_sae", "kl_div_with_ablation",
                # SAEBench 0.6's definitions under their own names (evals/core.py): compare these with SAEBench tables
                "explained_variance_saebench", "relative_reconstruction_bias_saebench", "mse_saebench")
DEAD_COLUMNS = ("dead_fraction", "dead_window_tokens", "frac_alive", "dense_fraction_1pct", "dense_fraction_10pct", "special_only_fraction",
                "n_special_only")
AFA_COLUMNS = ("afa_norm_ratio", "afa_rel_error", "afa_abs_rel_error", "afa_over_activated_fraction", "afa_eps_lbo_median")


def _dead_tokens(cfgs: dict[str, Any], data: dict[str, Any]) -> int:
    return cfgs["dead"].dead_tokens or data["eval_tokens"]


def _core_dead_pass(ctx, saes: list[SAE], wanted: dict[str, list[bool]]) -> list[dict[str, dict[str, Any]]]:
    """Core and dead-latent metrics of the SAEs at one hook from one pass (``evaluate_hook_group``)."""
    n = len(saes)
    core, dead = wanted.get("core", [False] * n), wanted.get("dead", [False] * n)
    eval_tokens, dead_tokens = ctx.data["eval_tokens"], _dead_tokens(ctx.configs, ctx.data)
    toks = ctx.tokens
    n_rows = max(dead_tokens if any(dead) else 0, eval_tokens if any(core) else 0)
    out = evaluate_hook_group(saes, ctx.model, toks[: max(1, n_rows // toks.shape[1])], special_ids=ctx.special_ids, core=core, dead=dead,
                              core_tokens=eval_tokens, windows=ctx.config("dead").windows, batch_size=ctx.data["batch_size"], progress=ctx.progress)
    tag = {"corpus": "given tokens" if ctx.data["given_tokens"] else ctx.data["corpus"], "context_size": int(toks.shape[1])}
    return [{ev: r[ev] | tag for ev in r} for r in out]


CORE_DEAD = SharedPass("core+dead", _core_dead_pass)


def _short(n: int) -> str:
    return f"{n // 1_000_000}M" if n % 1_000_000 == 0 else f"{n // 1000}k" if n % 1000 == 0 else str(n)


def _core_columns(core: dict[str, Any]) -> dict[str, Any]:
    row = {c: core.get(c) for c in CORE_COLUMNS} | {c: core.get(c) for c in DEAD_COLUMNS if c in core}
    row["core_tokens"] = core.get("n_tokens")
    return row | {c: core[c] for c in AFA_COLUMNS if c in core}


def _dead_columns(dead: dict[str, Any]) -> dict[str, Any]:
    """The dead eval's window is the stated one: its columns override core's counts."""
    row = {c: dead.get(c) for c in DEAD_COLUMNS}
    for w, v in dead.get("dead_fraction_by_window", {}).items():
        row[f"dead_fraction_{_short(int(w))}"] = v
    return row


def _core_figures(rows, results) -> dict[str, Any]:
    figs = {}
    if any(r.get("ce_loss_score") is not None for r in rows):
        figs["pareto_ce_loss_vs_l0"] = plots.pareto_figure(rows, "l0", "ce_loss_score", higher_is_better=True, title="CE loss recovered vs L0")
    if any(r.get("fvu") is not None for r in rows):
        figs["pareto_fvu_vs_l0"] = plots.pareto_figure(rows, "l0", "fvu", higher_is_better=False, title="FVU vs L0 (lower is better)")
    if any(plots._finite(r.get("afa_norm_ratio")) for r in rows):
        figs["afa_norm_ratio"] = plots.afa_figure(rows)
    return figs


def _dead_figures(rows, results) -> dict[str, Any]:
    return {"dead_latents": plots.dead_latents_figure(rows)} if any(r.get("dead_fraction") is not None for r in rows) else {}


register(EvalSpec(
    name="core", aliases=("reconstruction",), scope="hook", shared=CORE_DEAD, order=0,
    cache_key=lambda cfgs, data: data_key(data) | {"eval_tokens": data["eval_tokens"]},
    tokens_needed=lambda cfgs, data: data["eval_tokens"],
    columns=_core_columns, figures=_core_figures,  # its command is `saebench eval` (saebench/cli.py: flags from EvalConfig)
))
register(EvalSpec(
    name="dead", scope="hook", shared=CORE_DEAD, order=10,
    configs=(ConfigSpec("dead", DeadConfig),),
    cache_key=lambda cfgs, data: data_key(data) | {"dead_tokens": _dead_tokens(cfgs, data), "windows": list(cfgs["dead"].windows)},
    tokens_needed=_dead_tokens,
    columns=_dead_columns, figures=_dead_figures,
    command=Command("dead", "Dead/dense-latent eval of one SAE over stated token windows.", "saebench.evals.dead:main"),
))
