"""Dead and dense latents, with the token window always stated.

Definitions (EVALS.md §5):

- a latent is *active* on a token when its value is non-zero (so signed SAEs count both signs);
- ``dead_fraction_by_window[N]``: fraction of latents not active on any of the first N non-special
  eval tokens, for each N in ``windows`` (default 1M and 10M, the OpenAI convention) that the eval
  set reaches; ``dead_fraction`` is the same over the whole eval set, whose size is
  ``dead_window_tokens`` (SAEBench's ``frac_alive`` = 1 − it);
- ``density_i`` = (#non-special tokens where latent i is active) / (#non-special tokens);
  ``dense_fraction_1pct`` / ``_10pct`` = fraction of latents with density > 1% / > 10% (SAEBench
  ``freq_over_1_percent`` / ``_10_percent``); ``dense_mass_1pct`` / ``_10pct`` = share of all
  firings carried by those latents (SAEBench ``normalized_freq_over_*``);
- ``log10_density_histogram``: histogram of log10 density over live latents (40 bins on [−8, 0]);
- *special-token-only* latents fire on at least one special token (BOS/EOS/pad...) and on no
  other token. Special positions are encoded separately for this and never count towards the
  other statistics.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor
from tqdm.auto import tqdm

from saebench.sae import SAE
from saebench.sparse import SparseActs
from saebench.site import Site
from saebench.steering import site_activations

DEFAULT_WINDOWS = (1_000_000, 10_000_000)
MAX_LISTED = 200


class DeadConfig(BaseModel):
    """Settings of the bench's dead-latent eval (its token window and the windows it reports)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    dead_tokens: int | None = Field(None, gt=0, description="Tokens for the dead-latent window (default: the bench's --eval-tokens).")
    windows: tuple[int, ...] = Field(DEFAULT_WINDOWS, description="Dead-fraction windows in tokens.")


class DeadLatentCounter:
    """Per-latent firing counts over a token stream, special and non-special tokens kept apart."""

    def __init__(self, d_sae: int, windows: Sequence[int] = DEFAULT_WINDOWS):
        self.d_sae = d_sae
        self.windows = tuple(int(w) for w in windows)
        self.fires = torch.zeros(d_sae, dtype=torch.long)
        self.first_fire = torch.full((d_sae,), -1, dtype=torch.long)  # index of the first firing (non-special order)
        self.special_fires: dict[int, Tensor] = {}  # special token id -> per-latent counts
        self.n = 0
        self.n_special = 0

    def update(self, acts: SparseActs, token_ids: Tensor, special: Tensor) -> None:
        """Add one batch: ``acts`` for N tokens in stream order, their ids [N] and special mask [N]."""
        vals, idx = acts.values.detach().cpu(), acts.indices.cpu()
        token_ids, special = token_ids.cpu(), special.cpu().bool()
        normal = ~special
        nv, ni = vals[normal], idx[normal]
        nz = nv != 0
        if nz.any():
            rows = torch.arange(nv.shape[0]).unsqueeze(1).expand_as(ni)[nz] + self.n
            lat = ni[nz]
            self.fires.index_add_(0, lat, torch.ones_like(lat))
            first = torch.full((self.d_sae,), torch.iinfo(torch.long).max, dtype=torch.long).scatter_reduce(0, lat, rows, "amin")
            new = (self.first_fire < 0) & (first < torch.iinfo(torch.long).max)
            self.first_fire[new] = first[new]
        self.n += int(normal.sum())
        if special.any():
            sv, si, sid = vals[special], idx[special], token_ids[special]
            self.n_special += int(special.sum())
            for t in sid.unique().tolist():
                rows = sid == t
                m = sv[rows] != 0
                lat = si[rows][m]
                counts = self.special_fires.setdefault(int(t), torch.zeros(self.d_sae, dtype=torch.long))
                counts.index_add_(0, lat, torch.ones_like(lat))

    def result(self, tokenizer=None) -> dict[str, Any]:
        """JSON-able statistics (see the module docstring)."""
        if self.n == 0:
            raise ValueError("no non-special tokens were counted")
        n, d = self.n, self.d_sae
        alive = self.fires > 0
        density = self.fires.double() / n
        by_window = {}
        unavailable = []
        for w in self.windows:
            if n >= w:
                fired = (self.first_fire >= 0) & (self.first_fire < w)
                by_window[str(w)] = 1 - fired.double().mean().item()
            else:
                unavailable.append(w)
        if alive.any():
            counts, edges = np.histogram(np.log10(density[alive].numpy()), bins=40, range=(-8, 0))
        else:
            counts, edges = np.zeros(40, dtype=int), np.linspace(-8, 0, 41)
        total = self.fires.sum().item()
        special_any = torch.zeros(d, dtype=torch.bool)
        for c in self.special_fires.values():
            special_any |= c > 0
        special_only = special_any & ~alive
        only_idx = special_only.nonzero().flatten()
        by_token = {}
        for t, c in sorted(self.special_fires.items()):
            name = tokenizer.decode([t]) if tokenizer is not None else str(t)
            by_token[f"{t}:{name}"] = int(((c > 0) & special_only).sum())
        dense1, dense10 = density > 0.01, density > 0.10
        return {
            "n_tokens": n,
            "n_special_tokens": self.n_special,
            "active_rule": "value != 0",
            "dead_fraction": 1 - alive.double().mean().item(),
            "dead_window_tokens": n,
            "n_dead": int((~alive).sum()),
            "frac_alive": alive.double().mean().item(),
            "dead_fraction_by_window": by_window,
            "windows_unavailable": unavailable,
            "dense_fraction_1pct": dense1.double().mean().item(),
            "dense_fraction_10pct": dense10.double().mean().item(),
            "dense_mass_1pct": self.fires[dense1].sum().item() / total if total else math.nan,
            "dense_mass_10pct": self.fires[dense10].sum().item() / total if total else math.nan,
            "log10_density_histogram": {"counts": counts.tolist(), "edges": edges.tolist()},
            "special_only_fraction": special_only.double().mean().item(),
            "n_special_only": int(special_only.sum()),
            "special_only_latents": only_idx[:MAX_LISTED].tolist(),
            "special_only_by_token": by_token,
            "max_density": density.max().item(),
        }


@torch.no_grad()
def evaluate_dead(
    sae: SAE,
    model,
    tokens: Tensor,
    *,
    special_ids: Tensor | None = None,
    windows: Sequence[int] = DEFAULT_WINDOWS,
    batch_size: int = 16,
    progress: bool = True,
) -> dict[str, Any]:
    """Dead/dense/special-only statistics of ``sae`` on ``tokens`` [n_seq, ctx] (every position encoded)."""
    hook, head = Site.of_sae(sae)
    counter = DeadLatentCounter(sae.d_sae, windows)
    special_ids = special_ids if special_ids is not None else torch.empty(0, dtype=torch.long)
    for s in tqdm(range(0, tokens.shape[0], batch_size), desc="dead latents", disable=not progress):
        toks = tokens[s : s + batch_size]
        x = site_activations(model, hook, head, toks, batch_size).flatten(0, 1)
        flat = toks.flatten()
        counter.update(sae.encode_sparse(x.to(sae.device)), flat, torch.isin(flat, special_ids))
    out = counter.result(getattr(model, "tokenizer", None))
    out |= {"hook_name": sae.cfg.hook_name, "d_sae": sae.d_sae}
    return out


def run_dead_eval(sae_dir: str | Path, model=None, *, corpus: str = "default", eval_tokens: int = 1_000_000, context_size: int = 128,
                  batch_size: int = 8, device: str = "cpu", out: str | Path | None = None, windows: Sequence[int] = DEFAULT_WINDOWS,
                  progress: bool = True) -> dict[str, Any]:
    """Load an SAE folder, count dead/dense latents on held-out text, write ``eval_dead.json``."""
    from saebench import models
    from saebench.evals.common import load_eval_tokens, special_ids_of
    from saebench.io import write_json

    sae = SAE.load(sae_dir, device=device)
    if model is None:
        model = models.load_model(sae.cfg.model_name or None, device=device)
    tokens = load_eval_tokens(model, corpus, eval_tokens, context_size)
    res = evaluate_dead(sae, model, tokens, special_ids=special_ids_of(model.tokenizer), windows=windows, batch_size=batch_size, progress=progress)
    res |= {"corpus": corpus, "split": "eval", "context_size": context_size}
    write_json(Path(out) if out else Path(sae_dir) / "eval_dead.json", res)
    return res


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """CLI: ``python -m saebench.evals.dead SAE_DIR [--eval-tokens N] [--windows 1000000 10000000]``."""
    from saebench.evals.common import add_common_args

    from saebench.config import HelpFormatter

    p = argparse.ArgumentParser(prog="saebench.evals.dead", description=__doc__.split("\n\n")[0], formatter_class=HelpFormatter)
    add_common_args(p)
    p.add_argument("--windows", type=int, nargs="*", default=list(DEFAULT_WINDOWS), help="dead-fraction windows in tokens")
    a = p.parse_args(argv)
    res = run_dead_eval(a.sae_dir, None, corpus=a.corpus, eval_tokens=a.eval_tokens, context_size=a.context_size, batch_size=a.batch_size,
                        device=a.device, out=a.out, windows=a.windows, progress=not a.no_progress)
    print(_summary(res))
    return res


def _summary(res: dict[str, Any]) -> str:
    lines = [f"dead fraction {res['dead_fraction']:.4f} over {res['dead_window_tokens']:,} tokens"]
    for w, v in res["dead_fraction_by_window"].items():
        lines.append(f"dead fraction {v:.4f} over the first {int(w):,} tokens")
    if res["windows_unavailable"]:
        lines.append(f"windows not reached: {', '.join(f'{w:,}' for w in res['windows_unavailable'])}")
    lines.append(f"dense >1%: {res['dense_fraction_1pct']:.4f}  >10%: {res['dense_fraction_10pct']:.4f}")
    lines.append(f"special-token-only latents: {res['n_special_only']} ({res['special_only_fraction']:.4f})")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
