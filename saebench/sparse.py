"""The sparse core shared by every SAE method.

A sparse code is carried as ``SparseActs(values [B, K], indices [B, K])``: K latents per token, the
rest zero. Fixed-k methods (TopK, AbsTopK, g-SAE) have K = k; variable-L0 methods (BatchTopK, JumpReLU,
Feature Choice) pad each row to the batch's largest count with zero values. Decoding and the encoder's
backward touch only those K entries, so the one dense product per training step is the encoder's
forward ``x @ W_enc`` (computed without autograd), never a dense ``[B, n_latents]`` gradient.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor


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


class _GatherLinear(torch.autograd.Function):
    """``out[b, j] = x[b] · W[idx[b, j]] + bias[idx[b, j]]`` with the forward value given.

    The dense pre-activations were already computed without autograd; this function attaches to
    the selected entries a backward that costs O(B·K·d): ``embedding_bag`` for the input gradient
    and ``index_add_`` for the weight and bias gradients.
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
        if ctx.needs_input_grad[0]:
            grad_x = F.embedding_bag(indices, weight, per_sample_weights=grad.to(weight.dtype), mode="sum")
        flat_idx = indices.reshape(-1)
        if ctx.needs_input_grad[1]:
            rows = (grad.unsqueeze(-1) * x.unsqueeze(1)).reshape(-1, x.shape[-1])
            grad_w = torch.zeros_like(weight).index_add_(0, flat_idx, rows.to(weight.dtype))
        if ctx.needs_input_grad[2]:
            grad_b = weight.new_zeros(weight.shape[0]).index_add_(0, flat_idx, grad.reshape(-1).to(weight.dtype))
        return grad_x, grad_w, grad_b, None, None


def gather_pre(x: Tensor, weight: Tensor, bias: Tensor, pre: Tensor, indices: Tensor) -> Tensor:
    """Differentiable ``pre[b, indices[b, j]]`` where ``pre = x @ weight.T + bias``.

    ``x`` [B, d] (may require grad), ``weight`` [n, d], ``bias`` [n], ``pre`` [B, n] (no grad),
    ``indices`` [B, K]. Gradients flow to x, weight and bias through the selected entries only.
    """
    out = pre.gather(1, indices)
    if pre.requires_grad:
        return out  # dense-autograd path (e.g. methods whose loss needs every pre-activation)
    return _GatherLinear.apply(x, weight, bias, indices, out)


def decode(acts: SparseActs, W_dec: Tensor, b_dec: Tensor | None = None) -> Tensor:
    """``x̂[b] = Σ_j values[b, j] · W_dec[indices[b, j]] (+ b_dec)``; W_dec is [n, d]. Returns [B, d]."""
    out = F.embedding_bag(acts.indices, W_dec, per_sample_weights=acts.values.to(W_dec.dtype), mode="sum")
    return out if b_dec is None else out + b_dec


def topk_select(scores: Tensor, k: int) -> Tensor:
    """Indices [B, k] of the k largest ``scores`` per row."""
    return scores.topk(k, dim=-1, sorted=False).indices


def mask_to_indices(mask: Tensor, scores: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Turn a boolean ``[B, n]`` selection into padded ``(indices [B, K], valid [B, K])``.

    K is the largest row count in the batch (at least 1). Padding entries point at latent 0 and are
    marked invalid; callers zero their values so they neither decode nor receive gradient.
    """
    counts = mask.sum(-1)
    width = max(int(counts.max().item()) if mask.numel() else 0, 1)
    key = mask.to(torch.float32) if scores is None else torch.where(mask, scores.abs() + 1.0, 0.0)
    idx = key.topk(width, dim=-1, sorted=False).indices
    valid = mask.gather(1, idx)
    return torch.where(valid, idx, 0), valid


def batch_topk_mask(scores: Tensor, k_total: int) -> Tensor:
    """Boolean ``[B, n]`` mask of the ``k_total`` largest entries of ``scores`` over the whole batch."""
    flat = scores.reshape(-1)
    k_total = min(k_total, flat.numel())
    mask = torch.zeros_like(flat, dtype=torch.bool)
    mask[flat.topk(k_total, sorted=False).indices] = True
    return mask.view_as(scores)
