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

from saebench.evals.core import DEFAULT_BATCH_SIZE, evaluate_hook_group, format_table, held_out_tokens
from torch import Tensor

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
) -> dict[str, Any] | list[dict[str, Any]]:
    """Core metrics (``evaluate_core``'s definitions) for one SAE or several, sharing forwards per hook."""
    single = isinstance(saes, SAE)
    sae_list = [saes] if single else list(saes)
    groups: dict[tuple, list[int]] = defaultdict(list)
    for i, s in enumerate(sae_list):
        groups[Site.of_sae(s)].append(i)
    results: list[dict[str, Any] | None] = [None] * len(sae_list)
    for idx in groups.values():
        res = evaluate_hook_group([sae_list[i] for i in idx], model, tokens, special_ids=special_ids, core=True, dead=False,
                                  downstream=downstream, batch_size=batch_size, progress=progress)
        for i, r in zip(idx, res):
            results[i] = r["core"]
    return results[0] if single else results


def run_reconstruction_eval(sae_dir: str | Path, model=None, *, corpus: str | None = None, eval_tokens: int = 65_536, context_size: int | None = None,
                            batch_size: int = DEFAULT_BATCH_SIZE, device: str = "cpu", out: str | Path | None = None,
                            progress: bool = True) -> dict[str, Any]:
    """Load an SAE folder, evaluate the core metrics on held-out text, write ``eval_reconstruction.json``.

    ``corpus`` and ``context_size`` default to the SAE's own (its cfg), as in ``saebench eval``.
    """
    from saebench import models, text
    from saebench.io import write_json

    sae = SAE.load(sae_dir, device=device)
    if model is None:
        model = models.load_model(sae.cfg.model_name or None, device=device)
    tokens, corpus, ctx = held_out_tokens(sae, model, corpus, eval_tokens, context_size, progress=progress)
    res = evaluate_reconstruction(sae, model, tokens, special_ids=text.special_ids(model.tokenizer), batch_size=batch_size, progress=progress)
    res |= {"corpus": corpus, "split": "eval", "context_size": ctx}
    write_json(Path(out) if out else Path(sae_dir) / "eval_reconstruction.json", res)
    return res


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """CLI: ``python -m saebench.evals.reconstruction SAE_DIR [--eval-tokens N]``."""
    from saebench.evals.common import add_common_args

    from saebench.cli import HelpFormatter

    p = argparse.ArgumentParser(prog="saebench.evals.reconstruction", description=__doc__.split("\n\n")[0], formatter_class=HelpFormatter)
    add_common_args(p, own_text=True)
    a = p.parse_args(argv)
    res = run_reconstruction_eval(a.sae_dir, None, corpus=a.corpus, eval_tokens=a.eval_tokens, context_size=a.context_size,
                                  batch_size=a.batch_size, device=a.device, out=a.out, progress=not a.no_progress)
    print(format_table(res))
    return res


if __name__ == "__main__":
    main()
