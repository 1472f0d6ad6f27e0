"""Encoders of the pursuit and top-AFA inference forms (``saebench.sae``): matching pursuit, its code merging, top-AFA's selection."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from saebench.sparse import SparseActs

# SAELens' matching-pursuit fields of cfg.json (``SAEConfig``): written only when set.
MP_FIELDS = ("residual_threshold", "max_iterations", "stop_on_duplicate_support")


def matching_pursuit(x_c: Tensor, W_dec: Tensor, steps: int, residual_threshold: float = 0.0,
                     stop_on_duplicate_support: bool = False, signed: bool = False) -> SparseActs:
    """Greedy (non-negative) matching pursuit of ``x_c`` [B, d] on the rows of ``W_dec`` [n, d], as SAELens 6.54 encodes.

    Each step picks i* = argmax_i ReLU(⟨r, d_i⟩), adds v = ReLU(⟨r, d_i*⟩) to latent i* and sets r ← r − v·d_i*,
    from r = x_c. A token stops (its later steps add nothing) once its residual norm is below
    ``residual_threshold`` (when > 0) or, with ``stop_on_duplicate_support``, once a step leaves its set of
    non-zero latents unchanged; the loop ends after ``steps`` steps or when every token has stopped. The
    values are differentiable in ``x_c`` and ``W_dec`` (the choices are not); the dense score product is
    taken without autograd. Returns the steps' (value, latent) pairs with repeats merged (``coalesce``).
    ``signed``: classic matching pursuit (ITDA's ``mp_encode``): i* = argmax_i |⟨r, d_i⟩| and v = ⟨r, d_i*⟩, no ReLU.
    """
    r = x_c
    B = x_c.shape[0]
    done = torch.zeros(B, dtype=torch.bool, device=x_c.device)
    vals, idxs = [], []
    support = None
    for _ in range(steps):
        with torch.no_grad():
            scores = r.detach() @ W_dec.detach().T
            i = (scores.abs() if signed else scores).argmax(-1)  # argmax of ReLU(scores) = argmax of scores unless all ≤ 0 (then v = 0)
        d = W_dec[i]
        v = (r * d).sum(-1)
        v = (v if signed else F.relu(v)) * (~done)
        r = r - v.unsqueeze(-1) * d
        vals.append(v)
        idxs.append(i)
        if stop_on_duplicate_support or residual_threshold > 0:
            with torch.no_grad():
                if stop_on_duplicate_support:
                    new = torch.zeros(B, W_dec.shape[0], dtype=torch.bool, device=x_c.device)
                    new[torch.arange(B, device=x_c.device), i] = v.detach() != 0
                    new = new if support is None else new | support
                    done = done | ((new == support).all(-1) if support is not None else (v.detach() == 0))
                    support = new
                if residual_threshold > 0:
                    done = done | (r.detach().norm(dim=-1) < residual_threshold)
                if bool(done.all()):
                    break
    return coalesce(SparseActs(torch.stack(vals, 1), torch.stack(idxs, 1)))


def top_afa_select(scores: Tensor, target: Tensor, candidates: int = 64) -> tuple[Tensor, Tensor]:
    """top-AFA (Lee et al. 2025): per token, the k largest ``scores`` [B, n] (≥ 0) with k = argmin_k |√(Σ_{j≤k} s_(j)²) − target|.

    ``target`` [B] is the approximate feature activation norm ‖x − b_dec‖; s_(1) ≥ s_(2) ≥ … are the sorted
    scores. As the authors' code (``TopAFASAE.forward``), the last cumulative sum is replaced by 1e8 (so k < n
    unless the target is beyond it) and ties go to the smallest k. The cumulative norm is non-decreasing, so
    the best k is where it crosses the target: the top ``candidates`` suffice for a row whose cumulative norm
    reaches the target within them; only the other rows are fully sorted. Returns padded ``(indices [B, K],
    valid [B, K])``, K the batch's largest k.
    """
    B, n = scores.shape
    m = min(n, candidates)
    vals, idx = scores.topk(m, dim=-1, sorted=True)
    short = (vals.square().cumsum(-1)[:, -1].sqrt() < target).nonzero().flatten() if m < n else idx.new_zeros(0)
    if len(short):  # rows whose crossing lies beyond the candidates: sort them fully
        full_vals, full_idx = scores[short].sort(-1, descending=True)
        vals = torch.cat([vals, vals.new_zeros(B, n - m)], 1)
        idx = torch.cat([idx, idx.new_zeros(B, n - m)], 1)
        vals[short], idx[short] = full_vals, full_idx
    norm = vals.square().cumsum(-1)
    if vals.shape[1] == n:
        norm[:, -1] = 1e8
    k = (norm.sqrt() - target.unsqueeze(-1)).abs().argmin(-1) + 1  # [B]
    width = int(k.max())
    valid = torch.arange(width, device=scores.device) < k.unsqueeze(-1)
    return torch.where(valid, idx[:, :width], 0), valid


def coalesce(acts: SparseActs) -> SparseActs:
    """Merge repeated latents within each row (their values add); freed slots hold value 0 at latent 0. Differentiable."""
    idx, order = acts.indices.sort(-1)
    vals = acts.values.gather(1, order)
    new = torch.ones_like(idx, dtype=torch.bool)
    new[:, 1:] = idx[:, 1:] != idx[:, :-1]
    slot = new.long().cumsum(-1) - 1
    out_vals = torch.zeros_like(vals).scatter_add(1, slot, vals)
    out_idx = torch.zeros_like(idx).scatter(1, slot, idx)
    return SparseActs(out_vals, out_idx)
