"""Linear probes shared by the sparse-probing and absorption evals (torch only, no scikit-learn).

:func:`fit_logistic` minimises scikit-learn's ``LogisticRegression(penalty="l2", C=C)`` objective,
``C · Σ_i log(1 + exp(−y_i (w·x_i + b))) + ½‖w‖²`` (intercept not penalised), with L-BFGS in float64.
The objective is strictly convex, so any solver that converges finds the same probe; SAEBench fits
the same objective with scikit-learn's lbfgs (``max_iter=1000``). ``tests/test_sparse_probing.py``
checks the optimality condition (gradient ≈ 0) and planted answers.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class LogisticProbe:
    """``w`` [d], ``b`` (float), the feature indices it reads (None = all), and fit diagnostics."""

    w: Tensor
    b: float
    grad_norm: float
    iterations: int

    def logits(self, x: Tensor) -> Tensor:
        return x.double() @ self.w + self.b

    def accuracy(self, x: Tensor, y: Tensor) -> float:
        return float(((self.logits(x) > 0).long() == y.long()).double().mean())


def logistic_objective(w: Tensor, b: Tensor, x: Tensor, y: Tensor, C: float, sample_weight: Tensor | None = None) -> Tensor:
    """scikit-learn's L2 logistic objective with labels y ∈ {0, 1} (and optional per-sample weights)."""
    s = 2.0 * y.double() - 1.0
    loss = torch.nn.functional.softplus(-s * (x @ w + b))
    if sample_weight is not None:
        loss = loss * sample_weight
    return C * loss.sum() + 0.5 * (w @ w)


def balanced_weights(y: Tensor) -> Tensor:
    """scikit-learn's ``class_weight="balanced"``: n / (2·n_class) for each sample's class."""
    y = y.long()
    n, n1 = len(y), int(y.sum())
    if n1 in (0, n):
        raise ValueError("balanced weights need both classes in y")
    return torch.where(y == 1, n / (2.0 * n1), n / (2.0 * (n - n1))).double()


def fit_logistic(x: Tensor, y: Tensor, C: float = 1.0, max_iter: int = 1000, tol: float = 1e-6,
                 sample_weight: Tensor | None = None) -> LogisticProbe:
    """Fit the L2 logistic regression (scikit-learn's objective) to ``x`` [n, d], ``y`` [n] ∈ {0, 1}."""
    x = x.detach().double()
    y = y.detach().double()
    sw = None if sample_weight is None else sample_weight.double()
    if x.shape[0] != y.shape[0] or x.dim() != 2:
        raise ValueError(f"x must be [n, d] and y [n]; got {tuple(x.shape)} and {tuple(y.shape)}")
    with torch.enable_grad():
        w = torch.zeros(x.shape[1], dtype=torch.float64, requires_grad=True)
        b = torch.zeros((), dtype=torch.float64, requires_grad=True)
        opt = torch.optim.LBFGS([w, b], lr=1, max_iter=max_iter, tolerance_grad=tol, tolerance_change=1e-12, history_size=20,
                                line_search_fn="strong_wolfe")

        def closure():
            opt.zero_grad()
            loss = logistic_objective(w, b, x, y, C, sw)
            loss.backward()
            return loss

        opt.step(closure)
        opt.zero_grad()
        logistic_objective(w, b, x, y, C, sw).backward()
        g = torch.cat([w.grad, b.grad.view(1)]).abs().max().item()
    n_iter = opt.state[opt._params[0]].get("n_iter", 0)
    return LogisticProbe(w.detach(), float(b.detach()), g, int(n_iter))


def top_k_mean_diff(x: Tensor, y: Tensor, k: int) -> Tensor:
    """Indices of the ``k`` features with the largest |mean(x | y=1) − mean(x | y=0)| (SAEBench's selection)."""
    diff = (x[y == 1].double().mean(0) - x[y == 0].double().mean(0)).abs()
    return torch.argsort(diff, descending=True, stable=True)[:k]
