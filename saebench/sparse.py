"""The sparse core shared by every SAE method.

A sparse code is carried as ``SparseActs(values [B, K], indices [B, K])``: K latents per token, the
rest zero. Fixed-k methods (TopK, AbsTopK, g-SAE) have K = k; variable-L0 methods (BatchTopK, JumpReLU,
Feature Choice) pad each row to the batch's largest count with zero values. Decoding and the encoder's
backward touch only those K entries, so the one dense product per training step is the encoder's
forward ``x @ W_enc`` (computed without autograd), never a dense ``[B, n_latents]`` gradient. The one
exception is a code so dense that GEMMs are faster (``dense_codes``: ReLU + L1 early in training).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from saebench import distributed


class SparseActs(NamedTuple):
    """A batch of sparse codes: ``values[b, j]`` is the activation of latent ``indices[b, j]``."""

    values: Tensor  # [B, K] float
    indices: Tensor  # [B, K] int64

    def to_dense(self, n_latents: int) -> Tensor:
        """Scatter into a dense ``[B, n_latents]`` tensor (for analysis, not the hot path)."""
        out = self.values.new_zeros(self.values.shape[0], n_latents)
        return out.scatter_add_(1, self.indices, self.values)

    def l0(self) -> Tensor:
        """Number of non-zero latents per token, ``[B]`` (signed values count when non-zero)."""
        return (self.values != 0).sum(-1)

    def firing_counts(self, n_latents: int) -> Tensor:
        """Tokens each latent fires on (a non-zero value), ``[n_latents]`` int64, on the codes' device.

        No boolean indexing, so no device sync; padding (value 0) counts nothing; :func:`all_latents` rows are a column sum.
        """
        nz = self.values != 0
        if is_all_latents(self.indices, n_latents):
            return nz.sum(0)
        counts = torch.zeros(n_latents, dtype=torch.long, device=self.indices.device)
        return counts.index_add_(0, self.indices.reshape(-1), nz.reshape(-1).long())


class _GatherLinear(torch.autograd.Function):
    """``out[b, j] = x[b] · W[idx[b, j]] + bias[idx[b, j]]`` with the forward value given.

    The dense pre-activations were already computed without autograd; this function attaches to
    the selected entries a backward that costs O(B·K·d): ``embedding_bag`` for the input gradient
    and a sparse ``Gᵀx`` product for the weight gradient (``_scatter_rows``).
    """

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor, indices: Tensor, out: Tensor) -> Tensor:
        ctx.save_for_backward(x, weight, indices)
        return out

    @staticmethod
    def backward(ctx, grad: Tensor):
        x, weight, indices = ctx.saved_tensors
        grad = grad.contiguous()
        grad_x = grad_w = grad_b = None
        B, K = indices.shape
        full = is_all_latents(indices, weight.shape[0])  # the code is a dense [B, n] already, whatever its size
        if full or dense_codes(grad.device, B, K, weight.shape[0], weight.element_size()):
            # A code this dense (ReLU + L1 early in training: thousands of latents a token) back-propagates
            # faster as dense GEMMs than as B·K gathered rows.
            if full:
                g = grad.to(weight.dtype)
            else:
                g = weight.new_zeros(B, weight.shape[0]).scatter_add_(1, indices, grad.to(weight.dtype))
            grad_x = g @ weight if ctx.needs_input_grad[0] else None
            grad_w = g.t() @ x.to(weight.dtype) if ctx.needs_input_grad[1] else None
            grad_b = g.sum(0) if ctx.needs_input_grad[2] else None
            return grad_x, grad_w, grad_b, None, None
        if ctx.needs_input_grad[0]:
            grad_x = F.embedding_bag(indices, weight, per_sample_weights=grad.to(weight.dtype), mode="sum")
        if ctx.needs_input_grad[1]:
            grad_w = _scatter_rows(indices, grad, x, weight.shape[0]).to(weight.dtype)
        if ctx.needs_input_grad[2]:
            flat_idx = indices.reshape(-1)
            grad_b = weight.new_zeros(weight.shape[0]).index_add_(0, flat_idx, grad.reshape(-1).to(weight.dtype))
        return grad_x, grad_w, grad_b, None, None


class _DecoderWeightGrad(torch.autograd.Function):
    """Identity on the decoded ``out``; its backward adds W_dec's gradient ``Σ_b values[b, j]·grad[b]`` at rows ``indices``.

    ``embedding_bag``'s own weight gradient materialises a ``[B·K, d]`` product and sorts it; this computes
    the same ``Aᵀ·grad`` (A the [B, n] sparse code) as one sparse-dense product instead.
    """

    @staticmethod
    def forward(ctx, out: Tensor, weight: Tensor, indices: Tensor, values: Tensor) -> Tensor:
        ctx.save_for_backward(indices, values)
        ctx.n_rows = weight.shape[0]
        return out

    @staticmethod
    def backward(ctx, grad: Tensor):
        indices, values = ctx.saved_tensors
        grad_w = _scatter_rows(indices, values, grad.contiguous(), ctx.n_rows) if ctx.needs_input_grad[1] else None
        return grad, grad_w, None, None


def _scatter_rows(indices: Tensor, coef: Tensor, rows: Tensor, n: int) -> Tensor:
    """``out[i] = Σ_{(b, j): indices[b, j] = i} coef[b, j] · rows[b]``, i.e. Cᵀ·rows for the sparse [B, n] matrix C.

    ``indices``/``coef`` [B, K], ``rows`` [B, d] → [n, d]. One COO sparse-dense product: no ``[B·K, d]``
    temporary (``index_add_`` of ``coef[..., None] * rows[:, None]`` writes 300 MB at B=4096, K=32, d=576).
    Duplicate (i, b) pairs, e.g. padding, are summed.
    """
    B, K = indices.shape
    if _dense_scatter(rows.device, B, K, n, rows.element_size()):
        # On a GPU a product this dense is faster as a dense one: cuSPARSE took 1.1 ms for AuxK's k_aux = 288 of 16,384
        # latents at B = 4,096 on an H100 (benchmarks/results/gpu_h100_2026-11-25), scatter + GEMM a fraction of that.
        dense = rows.new_zeros(B, n).scatter_add_(1, indices, coef.to(rows.dtype))
        return dense.t() @ rows
    coo = torch.empty(2, B * K, dtype=torch.long, device=indices.device)
    coo[0] = indices.reshape(-1)
    coo[1] = torch.arange(B, device=indices.device).unsqueeze(1).expand(B, K).reshape(-1)
    c = torch.sparse_coo_tensor(coo, coef.reshape(-1).to(rows.dtype), (n, B), check_invariants=False)
    # addmm with beta=0 zeroes its output once; torch.sparse.mm allocates zeros and zeroes them again.
    return torch.addmm(rows.new_empty(n, rows.shape[1]), c, rows, beta=0)


DENSE_SCATTER_MIN_DENSITY = 1 / 256  # K / n from which _scatter_rows uses a dense product on CUDA
DENSE_SCATTER_MAX_BYTES = 1 << 30  # ... if the dense [B, n] code fits in this


DENSE_CODE_MIN_DENSITY = {"cuda": 1 / 64, "cpu": 1 / 5}  # K / n from which decode and the encoder's backward use dense GEMMs


def dense_codes(device: torch.device, B: int, K: int, n: int, element_size: int) -> bool:
    """Whether codes of K of n latents per token are decoded (and back-propagated) through a dense [B, n] code and GEMMs.

    The sparse path costs O(B·K·d) in gathers; a GEMM costs O(B·n·d) at several times the throughput. Past
    ``DENSE_CODE_MIN_DENSITY`` the GEMMs win (``benchmarks/bench_dense_codes.py``: on 2 CPU cores from about 1/5 of the
    latents, on an H200 from 1/64 or less; B 4,096, 4,608 latents, d 576).
    TopK-style codes (k = 32 of 4,608) stay on the sparse path; ReLU + L1 codes early in training (half the latents) do not.
    """
    frac = DENSE_CODE_MIN_DENSITY.get(device.type)
    return frac is not None and K >= n * frac and B * n * element_size <= DENSE_SCATTER_MAX_BYTES


_ARANGES: dict[tuple[int, str], Tensor] = {}


def all_latents(B: int, n: int, device: torch.device | str) -> Tensor:
    """Index rows [B, n] naming every latent in order: a stride-0 view of one cached ``arange(n)`` (no B·n memory).

    The index rows of a code too dense to pad (``mask_to_indices(..., dense_ok=True)``); :func:`is_all_latents`
    recognises them, so that ``take``, ``gather_pre``, ``decode`` and the encoder's backward use the dense tensors directly.
    """
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:  # key by the tensor's own device name ("cuda:0")
        device = torch.device("cuda", torch.cuda.current_device())
    key = (n, str(device))
    if key not in _ARANGES:
        _ARANGES[key] = torch.arange(n, device=device)
    return _ARANGES[key].expand(B, n)


def is_all_latents(indices: Tensor, n: int) -> bool:
    """Whether ``indices`` are :func:`all_latents` rows for ``n`` latents (checked without reading them: no device sync)."""
    if indices.dim() != 2 or indices.shape[1] != n or indices.stride() != (0, 1) or indices.storage_offset() != 0:
        return False
    ref = _ARANGES.get((n, str(indices.device)))
    return ref is not None and indices.untyped_storage().data_ptr() == ref.untyped_storage().data_ptr()


def _dense_scatter(device: torch.device, B: int, K: int, n: int, element_size: int) -> bool:
    """Whether ``_scatter_rows`` should scatter into a dense [B, n] code and use one GEMM (CUDA, dense enough, small enough).

    On CPU the sparse product always wins (its cost is O(B·K·d) against the GEMM's O(B·n·d)); on a GPU the
    sparse kernels' overheads make the GEMM faster from about 1/256 density at these sizes.
    """
    return device.type == "cuda" and K >= n * DENSE_SCATTER_MIN_DENSITY and B * n * element_size <= DENSE_SCATTER_MAX_BYTES


def gather_pre(x: Tensor, weight: Tensor, bias: Tensor, pre: Tensor, indices: Tensor) -> Tensor:
    """Differentiable ``pre[b, indices[b, j]]`` where ``pre = x @ weight.T + bias``.

    ``x`` [B, d] (may require grad), ``weight`` [n, d], ``bias`` [n], ``pre`` [B, n] (no grad),
    ``indices`` [B, K]. Gradients flow to x, weight and bias through the selected entries only.
    """
    out = pre.clone() if is_all_latents(indices, pre.shape[1]) else pre.gather(1, indices)
    if out.dtype != weight.dtype:
        # Under autocast the dense product is bf16; the selected values (and their gradients) are
        # carried at the weights' precision from here on.
        out = out.to(weight.dtype)
    if pre.requires_grad:
        return out  # dense-autograd path (e.g. methods whose loss needs every pre-activation)
    return _GatherLinear.apply(x, weight, bias, indices, out)


def take(vec: Tensor, indices: Tensor) -> Tensor:
    """``vec[indices]`` for a per-latent vector ``vec`` [n] and code indices [B, m], with a fast backward.

    Advanced indexing's backward is ``index_put_(accumulate=True)``, which on CUDA sorts all B·m indices to
    add the colliding ones deterministically: 19 ms a step at B 4,096 on an H100, 83% of a JumpReLU step
    (``benchmarks/results/profile_train_step_cuda.txt``). ``index_select``'s backward is ``index_add_``
    (atomic adds): the same values and gradients, up to float summation order.
    """
    if is_all_latents(indices, vec.shape[0]):
        return vec.expand(indices.shape)  # its backward sums over the batch, as index_add_ would
    return vec.index_select(0, indices.reshape(-1)).view(indices.shape)


def decode(acts: SparseActs, W_dec: Tensor, b_dec: Tensor | None = None) -> Tensor:
    """``x̂[b] = Σ_j values[b, j] · W_dec[indices[b, j]] (+ b_dec)``; W_dec is [n, d]. Returns [B, d].

    Gradients: to the values through ``embedding_bag``; to W_dec through ``_DecoderWeightGrad`` (sparse). A dense
    code (``dense_codes``, or :func:`all_latents` rows) is decoded as one GEMM with autograd's dense gradients.
    """
    values = acts.values.to(W_dec.dtype)
    B, K = acts.indices.shape
    if is_all_latents(acts.indices, W_dec.shape[0]):
        out = values @ W_dec  # the code is dense already
    elif dense_codes(values.device, B, K, W_dec.shape[0], W_dec.element_size()):
        # Dense enough that one GEMM beats B·K gathered rows; autograd gives values' (gather) and W_dec's (GEMM) gradients.
        out = values.new_zeros(B, W_dec.shape[0]).scatter_add(1, acts.indices, values) @ W_dec
    elif not (W_dec.requires_grad and torch.is_grad_enabled()):
        out = F.embedding_bag(acts.indices, W_dec, per_sample_weights=values, mode="sum")
    else:
        out = F.embedding_bag(acts.indices, W_dec.detach(), per_sample_weights=values, mode="sum")
        out = _DecoderWeightGrad.apply(out, W_dec, acts.indices, values.detach())
    return out if b_dec is None else out + b_dec


def topk_select(scores: Tensor, k: int) -> Tensor:
    """Indices [B, k] of the k largest ``scores`` per row."""
    return scores.topk(k, dim=-1, sorted=False).indices


def mask_to_indices(mask: Tensor, scores: Tensor | None = None, *, dense_ok: bool = False) -> tuple[Tensor, Tensor]:
    """Turn a boolean ``[B, n]`` selection into padded ``(indices [B, K], valid [B, K])``.

    K is the largest row count in the batch (at least 1). Padding entries point at latent 0 and are
    marked invalid; callers zero their values so they neither decode nor receive gradient. Within a row
    the entries are in ascending latent order. One pass over the mask (``nonzero``) and O(nnz) work after
    it: no [B, n] float key or top-K over it. ``scores`` is accepted for compatibility and not needed.

    ``dense_ok`` (training steps): when the mask is at least ``DENSE_CODE_MIN_DENSITY`` full on average, return
    ``(all_latents(B, n), mask)`` instead: every latent, the unselected ones invalid. Building padded rows for such a
    code (ReLU + L1 at initialisation: half the latents) costs more than the step's GEMMs, and the dense path takes
    these rows as they are.
    """
    if dense_ok:
        B, n = mask.shape
        frac = DENSE_CODE_MIN_DENSITY.get(mask.device.type)
        if frac is not None and B * n * 4 <= DENSE_SCATTER_MAX_BYTES:
            sample = mask[:: max(1, B // 256)]  # the density from a strided sample of rows: either answer is exact, this one is cheap
            if int(sample.sum()) >= frac * sample.numel():
                return all_latents(B, n, mask.device), mask
    rows, cols = mask.nonzero(as_tuple=True)  # row-major: grouped by row already
    return _rows_from_sorted_pairs(rows, cols, mask.shape[0])


def _rows_from_sorted_pairs(rows: Tensor, cols: Tensor, n_rows: int) -> tuple[Tensor, Tensor]:
    counts = torch.bincount(rows, minlength=n_rows)
    width = max(int(counts.max()) if rows.numel() else 0, 1)
    starts = counts.cumsum(0) - counts
    pos = torch.arange(rows.numel(), device=rows.device) - starts[rows]
    idx = torch.zeros(n_rows, width, dtype=torch.long, device=rows.device)
    valid = torch.zeros(n_rows, width, dtype=torch.bool, device=rows.device)
    idx[rows, pos] = cols
    valid[rows, pos] = True
    return idx, valid


def pairs_to_rows(rows: Tensor, cols: Tensor, n_rows: int) -> tuple[Tensor, Tensor]:
    """Selected (row, col) pairs [N] as padded ``(indices [n_rows, K], valid [n_rows, K])``, K the largest row count.

    What ``mask_to_indices`` gives for the boolean matrix with those entries set, without building it:
    O(N log N) for N pairs instead of O(n_rows · n_cols).
    """
    order = rows.argsort(stable=True)
    return _rows_from_sorted_pairs(rows[order], cols[order], n_rows)


def batch_topk_mask(scores: Tensor, k_total: int) -> Tensor:
    """Boolean ``[B, n]`` mask of the ``k_total`` largest entries of ``scores`` over the whole batch.

    In a data-parallel step the batch is the *global* one: ``k_total`` adds up over ranks and the mask
    keeps this rank's entries at or above the global ``k_total``-th largest score
    (``_global_batch_topk_mask``), so ranks together select what one process would.
    """
    if distributed.active():
        return _global_batch_topk_mask(scores, k_total)
    flat = scores.reshape(-1)
    k_total = min(k_total, flat.numel())
    mask = torch.zeros_like(flat, dtype=torch.bool)
    mask[flat.topk(k_total, sorted=False).indices] = True
    return mask.view_as(scores)


def batch_topk_select(scores: Tensor, k_total: int, absolute: bool = False) -> tuple[Tensor, Tensor]:
    """The ``k_total`` largest entries of ``scores`` [B, n] over the whole batch, as padded ``(indices, valid)`` rows.

    ``absolute``: rank by |scores| (AbsTopK's batch variant) without materialising ``scores.abs()``.

    Exact (up to ties) and without a batch-wide sort, in two ways:

    1. ``_threshold_candidates``: a threshold τ_low estimated from a strided sample of rows, set where the
       sample predicts about 2·k_total entries; one pass ``scores > τ_low`` (``nonzero``) collects the
       candidates. When there are at least k_total of them, every winner is one (everything left out is
       ≤ τ_low < every candidate), so the top k_total of the candidates is the batch's. Otherwise (or with
       too many candidates), way 2.
    2. Every row's m = 4·k_total/B largest entries are candidates, and τ is the k_total-th largest of them.
       A row whose m-th largest is below τ cannot hold a winner outside its candidates; the few rows
       that reach τ ("heavy" rows: high-norm tokens early in training) contribute all their entries
       instead. That can only raise the k_total-th largest candidate, so the other rows stay below it,
       and the top k_total of the candidates is the batch's, exactly.
    """
    if distributed.active() or scores.dim() != 2:
        return mask_to_indices(batch_topk_mask(scores.abs() if absolute else scores, k_total), scores)
    B, n = scores.shape
    k_total = min(k_total, B * n)
    fast = _threshold_candidates(scores, k_total, absolute)
    if fast is not None:
        return fast
    if absolute:
        scores = scores.abs()
    m = min(n, max(1, 4 * -(-k_total // B)))
    vals, idx = scores.topk(m, dim=-1, sorted=False)
    tau = vals.reshape(-1).topk(k_total, sorted=False).values.min()
    heavy = (vals.min(-1).values >= tau).nonzero().flatten() if m < n else idx.new_zeros(0)
    cand = vals.index_fill(0, heavy, -torch.inf).reshape(-1)
    if len(heavy):  # heavy rows: every entry is a candidate
        cand = torch.cat([cand, scores[heavy].reshape(-1)])
    chosen = cand.topk(k_total, sorted=False).indices
    light = torch.zeros(B * m, dtype=torch.bool, device=scores.device)
    light[chosen[chosen < B * m]] = True
    idx, valid = _compact(idx, light.view(B, m))
    if len(heavy):
        full = torch.zeros(len(heavy) * n, dtype=torch.bool, device=scores.device)
        full[chosen[chosen >= B * m] - B * m] = True
        h_idx, h_valid = _compact(torch.arange(n, device=scores.device).expand(len(heavy), n), full.view(len(heavy), n))
        width = max(idx.shape[1], h_idx.shape[1])
        idx, valid = F.pad(idx, (0, width - idx.shape[1])), F.pad(valid, (0, width - valid.shape[1]))
        idx[heavy], valid[heavy] = F.pad(h_idx, (0, width - h_idx.shape[1])), F.pad(h_valid, (0, width - h_valid.shape[1]))
    return torch.where(valid, idx, 0), valid


def _threshold_candidates(scores: Tensor, k_total: int, absolute: bool, sample_rows: int = 64) -> tuple[Tensor, Tensor] | None:
    """Way 1 of ``batch_topk_select``; None when the sampled threshold does not give between k_total and 16·k_total candidates."""
    B, n = scores.shape
    stride = max(1, B // sample_rows)
    sample = scores[::stride]
    sample = sample.abs() if absolute else sample
    want = min(sample.numel(), max(1, -(-2 * k_total * sample.shape[0] // B)))
    tau = sample.reshape(-1).topk(want, sorted=False).values.min()
    if absolute and tau <= 0:
        return None
    mask = torch.gt(scores, tau)
    if absolute:
        mask |= torch.lt(scores, -tau)
    count = int(torch.count_nonzero(mask))  # a bool .sum() copies the mask to int64 first: 30x slower
    if not k_total <= count <= 16 * k_total:
        return None
    rows, cols = mask.nonzero(as_tuple=True)
    vals = scores[rows, cols]
    vals = vals.abs() if absolute else vals
    keep = torch.zeros(count, dtype=torch.bool, device=scores.device)
    keep[vals.topk(k_total, sorted=False).indices] = True
    return _rows_from_sorted_pairs(rows[keep], cols[keep], B)


def _compact(idx: Tensor, valid: Tensor) -> tuple[Tensor, Tensor]:
    """Padded rows ``(idx, valid)`` [R, w] narrowed to the widest row's count of valid entries."""
    width = max(int(valid.sum(-1).max()), 1) if valid.numel() else 1
    if width < valid.shape[1]:
        keep = valid.to(torch.float32).topk(width, dim=-1, sorted=False).indices
        idx, valid = idx.gather(1, keep), valid.gather(1, keep)
    return idx, valid


def _global_batch_topk_mask(scores: Tensor, k_total: int) -> Tensor:
    """``batch_topk_mask`` over the union of the data-parallel ranks' batches.

    The global top-K is a subset of the union of every rank's local top-K, so each rank shares only its
    local top-K scores (all-gather of K floats), and all ranks take the same threshold τ = the K-th
    largest. Entries ≥ τ are kept (> τ when τ ≤ 0: non-positive scores of rectified methods decode as
    zero either way). Exact up to ties at τ.
    """
    flat = scores.reshape(-1)
    k_global = int(distributed.all_reduce_sum(torch.tensor([k_total], device=scores.device)).item())
    k_local = min(k_global, flat.numel())
    local = flat.topk(k_local, sorted=False).values
    width = int(distributed.all_reduce_max(torch.tensor([k_local], device=scores.device)).item())
    if k_local < width:  # ranks with fewer entries pad, so the all-gather has equal shapes
        local = torch.cat([local, local.new_full((width - k_local,), -torch.inf)])
    pooled = distributed.all_gather_cat(local)
    tau = pooled.topk(min(k_global, pooled.numel()), sorted=False).values.min()
    return (scores > tau) if tau <= 0 else (scores >= tau)


def row_topk(scores: Tensor, k: int, stride: int = 8, margin: float = 1.5) -> Tensor:
    """Indices [B, k] of the k largest entries of each row of ``scores`` [B, n]: ``scores.topk(k, -1).indices`` as a set.

    For a large k (AuxK's and the Zipf loss's k_aux = d_in/2 = 288), ``torch.topk``'s per-row selection over all n
    entries dominates; here each row's threshold τ_b is estimated from every ``stride``-th column (the
    ``margin``·k/stride-th largest of the sample), one pass ``scores > τ_b`` collects each row's candidates
    (about margin·k of them), and the top k is taken among those. Exact: when a row has at least k candidates,
    everything left out is ≤ τ_b < every candidate; rows with fewer are recomputed with ``torch.topk`` over the
    whole row (as is everything when the candidates are not few). Ties may resolve to other, equal-valued entries.
    """
    if scores.dim() != 2:
        return scores.topk(min(k, scores.shape[-1]), dim=-1, sorted=False).indices
    B, n = scores.shape
    k = min(k, n)
    want = -(-int(margin * k) // stride)
    if n < 4 * stride * want or k < 64:
        return scores.topk(k, dim=-1, sorted=False).indices
    tau = scores[:, ::stride].topk(want, dim=-1, sorted=False).values.amin(-1, keepdim=True)
    rows, cols = torch.gt(scores, tau).nonzero(as_tuple=True)
    if rows.numel() > 4 * margin * k * B:  # the sample misjudged (e.g. many equal entries): no gain
        return scores.topk(k, dim=-1, sorted=False).indices
    idx, valid = _rows_from_sorted_pairs(rows, cols, B)
    if idx.shape[1] < k:
        idx, valid = F.pad(idx, (0, k - idx.shape[1])), F.pad(valid, (0, k - valid.shape[1]))
    cand = scores.gather(1, idx).masked_fill_(~valid, -torch.inf)
    out = idx.gather(1, cand.topk(k, dim=-1, sorted=False).indices)
    short = (valid.sum(-1) < k).nonzero().squeeze(1)
    if short.numel():
        out[short] = scores[short].topk(k, dim=-1, sorted=False).indices
    return out


GSAE_DEFAULT_BETA = 1.0  # g-SAE's default β (trainers/gsae.py); here so that the eval reads it without importing a trainer


def gradient_scores(pre: Tensor, grads: Tensor, W_dec: Tensor, beta: float, out: Tensor | None = None) -> Tensor:
    """Selection scores [B, n]: π + β·ReLU(π)·|W_dec g|, g [B, d] normalised to unit RMS per token.

    Computed in place in one [B, n] tensor (``out`` if given, reused between steps): ReLU(π)·|G| =
    max(π·|G|, 0) as |G| ≥ 0, so no ReLU'd copy of π is made.
    """
    g = grads / grads.pow(2).mean(-1, keepdim=True).sqrt().clamp_min(1e-12)
    scores = torch.mm(g, W_dec.T, out=out) if out is not None else g @ W_dec.T
    scores.abs_().mul_(pre).clamp_min_(0)
    if beta != 1:
        scores.mul_(beta)
    return scores.add_(pre)
