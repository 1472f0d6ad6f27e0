"""Feature circuits over SAE latents (Marks et al., "Sparse Feature Circuits"), and a head-level mode.

Graph nodes: at every *site* (a hook with an SAE spliced in) the SAE's latents plus one **error
node** ε = x − x̂, so the spliced model ``x ↦ x̂(f(x)) + ε`` is exactly the original model. Node
values are summed over positions (Marks' ``aggregation="sum"``). In head mode the nodes are
attention heads: the per-head slices of ``blocks.L.attn.hook_z``.

Metric: ``m = mean logit(answers) − mean logit(wrongs)`` at the last position of the *clean*
prompt (``evals/tasks.py``), per example.

Indirect effect of a node a, for patching it from its clean to its corrupt value:

- exact: ``IE(a) = m(clean | do(a = a_corrupt)) − m(clean)``;
- attribution patching (``method="atp"``): ``IE ≈ ∇_a m |_clean · (a_corrupt − a_clean)``, one
  forward and backward on the clean prompts; the gradient is the total derivative through the
  spliced model, i.e. through every later site's reconstruction + error node;
- integrated gradients (``method="ig"``, default, ``ig_steps=10`` as in Marks):
  ``IE ≈ mean_α ∇_a m |_{α·clean + (1−α)·corrupt} · (a_corrupt − a_clean)`` with α on
  ``linspace(0, 1, steps)``, interpolating one site at a time (the others run clean).

For a latent i the gradient is ``(∂m/∂x) · W_dec[i]`` and for the error node ``∂m/∂x``, so one
backward gives every node of a site.

Nodes are ranked by |mean IE| over the discovery split. Faithfulness of a circuit C, on the test
split, is ``F(C) = (m(C) − m(∅)) / (m(M) − m(∅))`` where m(C) runs the model with every node
outside C mean-ablated (its mean over the clean prompts of the task, per position), M is all nodes
(= the model, exactly) and ∅ none. Completeness is reported as the faithfulness of the complement,
``F(M \\ C)`` (0 = C holds everything the model uses). Both are curves over circuit size.

The attribution is checked against real activation patching on a sample of nodes (the top ones by
|IE| and a few random ones with a non-zero difference): their Pearson correlation and errors.
"""

from __future__ import annotations

import argparse
import math
import random
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal, Sequence

import torch
from torch import Tensor
from tqdm.auto import tqdm

from pydantic.dataclasses import dataclass as pydantic_dataclass  # validated configs; registry flags come from their fields
from saebench.evals.tasks import CircuitTask, make_task, reference_heads
from saebench.evals import plots, registry
from saebench.evals.registry import Command, ConfigSpec, EvalSpec, register
from saebench.sae import SAE
from saebench.site import Site as HookSite

Method = Literal["atp", "ig"]


# --------------------------------------------------------------------------- sites


class SAESite:
    """An SAE spliced in at its hook: nodes are its ``d_sae`` latents and one error node (last)."""

    def __init__(self, sae: SAE):
        from saebench.evals.transcoder import refuse_transcoders

        refuse_transcoders(sae, "feature circuits")
        self.sae = sae
        self.site = HookSite.of_sae(sae)
        self.hook, self.head = self.site
        self.n_nodes = sae.d_sae + 1
        self.name = self.hook + (f":{self.head}" if self.head is not None else "")

    def get(self, act: Tensor) -> Tensor:
        return self.site.flatten(act)

    def put(self, act: Tensor, x: Tensor) -> Tensor:
        return self.site.unflatten(act, x)

    def state(self, act: Tensor) -> dict[str, Tensor]:
        x = self.get(act).float()
        f = self.sae.encode(x)
        return {"x": x, "f": f, "err": x - self.sae.decode(f)}

    def node_ie(self, grad: Tensor, clean: dict[str, Tensor], corrupt: dict[str, Tensor]) -> Tensor:
        """[b, n_nodes] = ∇·Δ per node, summed over positions."""
        g = self.get(grad).float()
        g_lat = g @ self.sae.W_dec.detach().float().T
        ie_lat = (g_lat * (corrupt["f"] - clean["f"])).sum(1)
        ie_err = (g * (corrupt["err"] - clean["err"])).sum((1, 2))
        return torch.cat([ie_lat, ie_err[:, None]], dim=1)

    def ablate(self, act: Tensor, keep: Tensor, mean: dict[str, Tensor]) -> Tensor:
        st = self.state(act)
        f = torch.where(keep[: self.sae.d_sae], st["f"], mean["f"])
        err = st["err"] if bool(keep[-1]) else mean["err"].expand_as(st["err"])
        return self.put(act, self.sae.decode(f) + err)

    def patch(self, act: Tensor, node: int, clean: dict[str, Tensor], corrupt: dict[str, Tensor]) -> Tensor:
        x = self.get(act).float()
        if node < self.sae.d_sae:
            delta = (corrupt["f"][..., node] - clean["f"][..., node])[..., None] * self.sae.W_dec[node].detach().float()
        else:
            delta = corrupt["err"] - clean["err"]
        return self.put(act, x + delta)

    def interpolate(self, act: Tensor, alpha: float, clean: dict[str, Tensor], corrupt: dict[str, Tensor]) -> Tensor:
        return self.put(act, alpha * clean["x"] + (1 - alpha) * corrupt["x"])

    def label(self, j: int) -> str:
        return f"{self.name}/{'err' if j == self.sae.d_sae else j}"


class HeadSite:
    """The heads of one layer (``blocks.L.attn.hook_z``); node h is head h."""

    def __init__(self, layer: int, n_heads: int):
        self.layer = layer
        self.hook = f"blocks.{layer}.attn.hook_z"
        self.n_nodes = n_heads
        self.name = f"L{layer}"

    def state(self, act: Tensor) -> dict[str, Tensor]:
        return {"x": act.float()}

    def node_ie(self, grad: Tensor, clean: dict[str, Tensor], corrupt: dict[str, Tensor]) -> Tensor:
        return (grad.float() * (corrupt["x"] - clean["x"])).sum((1, 3))

    def ablate(self, act: Tensor, keep: Tensor, mean: dict[str, Tensor]) -> Tensor:
        return torch.where(keep[None, None, :, None], act, mean["x"].to(act.dtype))

    def patch(self, act: Tensor, node: int, clean: dict[str, Tensor], corrupt: dict[str, Tensor]) -> Tensor:
        out = act.clone()
        out[:, :, node] = corrupt["x"][:, :, node].to(act.dtype)
        return out

    def interpolate(self, act: Tensor, alpha: float, clean: dict[str, Tensor], corrupt: dict[str, Tensor]) -> Tensor:
        return (alpha * clean["x"] + (1 - alpha) * corrupt["x"]).to(act.dtype)

    def label(self, j: int) -> str:
        return f"L{self.layer}.H{j}"


Site = SAESite | HeadSite


# --------------------------------------------------------------------------- forwards


def last_logits(model, tokens: Tensor, hooks: list) -> Tensor:
    """Logits [b, 1, V] of the last position only (HF ``logits_to_keep=1`` skips the other unembeds)."""
    tokens = tokens.to(model.cfg.device)
    if getattr(model, "_saebench_no_logits_to_keep", False):
        return model.run_with_hooks(tokens, fwd_hooks=hooks)[:, -1:]
    try:
        return model.run_with_hooks(tokens, fwd_hooks=hooks, logits_to_keep=1)
    except TypeError:
        model._saebench_no_logits_to_keep = True
        return model.run_with_hooks(tokens, fwd_hooks=hooks)[:, -1:]


def _metric(logits: Tensor, weights: Tensor) -> Tensor:
    """Per-example logit-difference metric [b] from logits [b, pos, V] and weights [b, V]."""
    return (logits[:, -1].float() * weights).sum(-1)


def _batches(n: int, batch_size: int):
    for s in range(0, n, batch_size):
        yield slice(s, min(n, s + batch_size))


@torch.no_grad()
def _states(model, sites: Sequence[Site], tokens: Tensor) -> list[dict[str, Tensor]]:
    """Node states of every site on ``tokens`` (one forward, the model unchanged)."""
    captured: dict[int, Tensor] = {}

    def grab(i):
        def fn(act, hook):
            captured[i] = act.detach()
            return act
        return fn

    last_logits(model, tokens, [(s.hook, grab(i)) for i, s in enumerate(sites)])
    return [s.state(captured[i]) for i, s in enumerate(sites)]


@torch.no_grad()
def _metric_with(model, tokens: Tensor, weights: Tensor, hooks: list) -> Tensor:
    return _metric(last_logits(model, tokens, hooks), weights)


def _check_sites(model, sites: Sequence[Site]) -> None:
    from saebench.models import validate_hook_name

    names = [s.hook for s in sites]
    if len(set(names)) != len(names):
        raise ValueError(f"one site per hook: got {names}")
    for n in names:
        validate_hook_name(model, n)


def _slice_state(st: dict[str, Tensor], sl: slice) -> dict[str, Tensor]:
    return {k: v[sl] for k, v in st.items()}


def attribution(model, sites: Sequence[Site], task: CircuitTask, *, method: Method = "ig", ig_steps: int = 10, batch_size: int = 16,
                progress: bool = True) -> Tensor:
    """Per-example indirect effects [n, Σ n_nodes] of every node (sites concatenated in order)."""
    if method not in ("atp", "ig"):
        raise ValueError(f"method must be 'atp' or 'ig', not {method!r}")
    device = model.cfg.device
    vocab = model.cfg.d_vocab
    out = []
    batches = list(_batches(len(task), batch_size))
    bar = tqdm(total=len(batches) * (1 if method == "atp" else len(sites) * ig_steps), desc=f"attribution ({method})", disable=not progress)
    for sl in batches:
        sub = task.subset(range(sl.start, sl.stop))
        w = sub.metric_weights(vocab, device)
        clean, corrupt = _states(model, sites, sub.clean), _states(model, sites, sub.corrupt)
        if method == "atp":
            grads = _grads(model, sub.clean, w, [(s.hook, None) for s in sites])
            bar.update(1)
        else:
            grads = []
            for i, s in enumerate(sites):
                total = None
                for alpha in torch.linspace(0, 1, ig_steps).tolist():
                    def interp(act, hook, s=s, i=i, alpha=alpha):
                        return s.interpolate(act, alpha, clean[i], corrupt[i])
                    g = _grads(model, sub.clean, w, [(s.hook, interp)])[0]
                    total = g if total is None else total + g
                    bar.update(1)
                grads.append(total / ig_steps)
        out.append(torch.cat([s.node_ie(g, clean[i], corrupt[i]) for i, (s, g) in enumerate(zip(sites, grads))], dim=1).cpu())
    bar.close()
    return torch.cat(out)


def _grads(model, tokens: Tensor, weights: Tensor, sites_fns: list) -> list[Tensor]:
    """∂(Σ_b m_b)/∂act at each hook (optionally after replacing act with ``fn(act)``)."""
    leaves: dict[int, Tensor] = {}

    def make(i, fn):
        def hook_fn(act, hook):
            act = fn(act, hook) if fn is not None else act
            z = torch.zeros_like(act, requires_grad=True)
            leaves[i] = z
            return act + z
        return hook_fn

    with torch.enable_grad():
        logits = last_logits(model, tokens, [(h, make(i, fn)) for i, (h, fn) in enumerate(sites_fns)])
        _metric(logits, weights).sum().backward()
    return [leaves[i].grad.detach() for i in range(len(sites_fns))]


def patching_effects(model, sites: Sequence[Site], task: CircuitTask, nodes: Sequence[int], *, batch_size: int = 16,
                     progress: bool = True) -> Tensor:
    """Exact per-example IE [n, len(nodes)] by patching each node (global index) to its corrupt value."""
    offsets = _offsets(sites)
    vocab = model.cfg.d_vocab
    cols = []
    for sl in _batches(len(task), batch_size):
        sub = task.subset(range(sl.start, sl.stop))
        w = sub.metric_weights(vocab, model.cfg.device)
        clean, corrupt = _states(model, sites, sub.clean), _states(model, sites, sub.corrupt)
        base = _metric_with(model, sub.clean, w, [])
        row = []
        for g in tqdm(nodes, desc="activation patching", disable=not progress, leave=False):
            i, j = _locate(offsets, g)
            s = sites[i]

            def fn(act, hook, s=s, i=i, j=j):
                return s.patch(act, j, clean[i], corrupt[i])
            row.append((_metric_with(model, sub.clean, w, [(s.hook, fn)]) - base).cpu())
        cols.append(torch.stack(row, 1) if row else torch.zeros(sub.clean.shape[0], 0))
    return torch.cat(cols)


def _offsets(sites: Sequence[Site]) -> list[int]:
    out, acc = [], 0
    for s in sites:
        out.append(acc)
        acc += s.n_nodes
    return out + [acc]


def _locate(offsets: list[int], g: int) -> tuple[int, int]:
    for i in range(len(offsets) - 1):
        if offsets[i] <= g < offsets[i + 1]:
            return i, g - offsets[i]
    raise IndexError(f"node {g} out of range ({offsets[-1]} nodes)")


@torch.no_grad()
def mean_states(model, sites: Sequence[Site], tokens: Tensor, batch_size: int = 16) -> list[dict[str, Tensor]]:
    """Per-position means of every site's node state over ``tokens`` (the clean distribution)."""
    sums: list[dict[str, Tensor]] | None = None
    for sl in _batches(tokens.shape[0], batch_size):
        st = _states(model, sites, tokens[sl])
        part = [{k: v.sum(0) for k, v in d.items()} for d in st]
        sums = part if sums is None else [{k: a[k] + b[k] for k in a} for a, b in zip(sums, part)]
    return [{k: v / tokens.shape[0] for k, v in d.items()} for d in sums]


@torch.no_grad()
def ablated_metric(model, sites: Sequence[Site], task: CircuitTask, keep: Tensor, means: list[dict[str, Tensor]],
                   batch_size: int = 16) -> float:
    """Mean metric with every node outside ``keep`` (bool over all nodes) mean-ablated."""
    offsets = _offsets(sites)
    hooks = []
    for i, s in enumerate(sites):
        k = keep[offsets[i] : offsets[i + 1]].to(model.cfg.device)
        hooks.append((s.hook, lambda act, hook, s=s, k=k, mean=means[i]: s.ablate(act, k, mean)))
    vals = []
    for sl in _batches(len(task), batch_size):
        sub = task.subset(range(sl.start, sl.stop))
        vals.append(_metric_with(model, sub.clean, sub.metric_weights(model.cfg.d_vocab, model.cfg.device), hooks))
    return torch.cat(vals).mean().item()


def circuit_sizes(n_nonzero: int, n_total: int) -> list[int]:
    """0, powers of two up to the number of nodes with non-zero effect, that number, and all nodes."""
    sizes = {0, n_nonzero, n_total}
    k = 1
    while k < n_nonzero:
        sizes.add(k)
        k *= 2
    return sorted(sizes)


# --------------------------------------------------------------------------- the eval


def discover_circuit(model, sites: Sequence[Site], task: CircuitTask, *, method: Method = "ig", ig_steps: int = 10,
                     train_fraction: float = 0.5, n_patch_check: int = 16, batch_size: int = 16, seed: int = 0,
                     max_curve_points: int | None = None, progress: bool = True) -> dict[str, Any]:
    """Rank nodes by |IE| on the discovery split; faithfulness/completeness curves on the test split."""
    _check_sites(model, sites)
    if len(task) < 2:
        raise ValueError("a circuit task needs at least 2 examples (discovery and test)")
    train, test = task.split(train_fraction)
    offsets = _offsets(sites)
    n_total = offsets[-1]
    ie = attribution(model, sites, train, method=method, ig_steps=ig_steps, batch_size=batch_size, progress=progress)
    mean_ie = ie.mean(0)
    order = mean_ie.abs().argsort(descending=True)
    n_nonzero = int((mean_ie.abs() > 0).sum())

    means = mean_states(model, sites, task.clean, batch_size)
    all_nodes = torch.ones(n_total, dtype=torch.bool)
    m_full = ablated_metric(model, sites, test, all_nodes, means, batch_size)
    m_empty = ablated_metric(model, sites, test, ~all_nodes, means, batch_size)
    w_test = test.metric_weights(model.cfg.d_vocab, model.cfg.device)
    m_clean = _metric_with(model, test.clean, w_test, []).mean().item()
    m_corrupt = _metric_with(model, test.corrupt, w_test, []).mean().item()
    denom = m_full - m_empty

    def faith(m: float) -> float:
        return (m - m_empty) / denom if denom != 0 else math.nan

    sizes = circuit_sizes(n_nonzero, n_total)
    if max_curve_points and len(sizes) > max_curve_points:
        keep_idx = torch.linspace(0, len(sizes) - 1, max_curve_points).round().long().unique().tolist()
        sizes = [sizes[i] for i in keep_idx]
    f_curve, c_curve = [], []
    for n in tqdm(sizes, desc="faithfulness curve", disable=not progress):
        inside = torch.zeros(n_total, dtype=torch.bool)
        inside[order[:n]] = True
        f_curve.append(1.0 if n == n_total else 0.0 if n == 0 else faith(ablated_metric(model, sites, test, inside, means, batch_size)))
        c_curve.append(0.0 if n == n_total else 1.0 if n == 0 else faith(ablated_metric(model, sites, test, ~inside, means, batch_size)))

    check = _patch_check(model, sites, train, ie, order, n_nonzero, n_patch_check, batch_size, seed, progress)
    labels = [s.label(j) for s in sites for j in range(s.n_nodes)]
    top = [{"node": labels[g], "site": sites[_locate(offsets, g)[0]].name, "ie": float(mean_ie[g])} for g in order[: min(50, n_nonzero)].tolist()]
    err_ie = {s.name: float(mean_ie[offsets[i + 1] - 1]) for i, s in enumerate(sites) if isinstance(s, SAESite)}
    abs_total = float(mean_ie.abs().sum())
    err_share = sum(abs(v) for v in err_ie.values()) / abs_total if abs_total > 0 and err_ie else (math.nan if err_ie else None)
    return {
        "task": task.name,
        "method": method,
        "ig_steps": ig_steps if method == "ig" else None,
        "sites": [s.name for s in sites],
        "n_nodes_total": n_total,
        "n_nodes_nonzero": n_nonzero,
        "n_discovery": len(train),
        "n_test": len(test),
        "m_clean": m_clean,
        "m_corrupt": m_corrupt,
        "m_full": m_full,
        "m_empty": m_empty,
        "total_ie": float(mean_ie.sum()),
        "abs_ie_total": abs_total,
        "error_node_ie": err_ie,
        "error_ie_share": err_share,
        "top_nodes": top,
        "curve": {"sizes": sizes, "faithfulness": f_curve, "complement_faithfulness": c_curve},
        "nodes_for_faithfulness_0.8": _first_reaching(sizes, f_curve, 0.8),
        "nodes_for_faithfulness_0.9": _first_reaching(sizes, f_curve, 0.9),
        "patch_check": check,
    }


def _first_reaching(sizes: list[int], curve: list[float], level: float) -> int | None:
    for n, f in zip(sizes, curve):
        if f >= level:
            return n
    return None


def _patch_check(model, sites, task, ie, order, n_nonzero, n, batch_size, seed, progress) -> dict[str, Any]:
    """Attribution vs real activation patching on the top nodes and a random sample of the rest."""
    if n <= 0 or n_nonzero == 0:
        return {"n": 0}
    n_top = min(n_nonzero, max(1, n // 2))
    rest = order[n_top:n_nonzero].tolist()
    rng = random.Random(seed)
    nodes = order[:n_top].tolist() + rng.sample(rest, min(len(rest), n - n_top))
    real = patching_effects(model, sites, task, nodes, batch_size=batch_size, progress=progress).mean(0)
    approx = ie.mean(0)[nodes]
    err = (approx - real).abs()
    labels = [s.label(j) for s in sites for j in range(s.n_nodes)]
    return {
        "n": len(nodes),
        "pearson": _pearson(approx, real),
        "mean_abs_error": float(err.mean()),
        "max_abs_error": float(err.max()),
        "relative_error": float(err.sum() / real.abs().sum().clamp_min(1e-12)),
        "nodes": [{"node": labels[g], "attribution": float(a), "patching": float(r)} for g, a, r in zip(nodes, approx, real)],
    }


def _pearson(a: Tensor, b: Tensor) -> float:
    a, b = a.double() - a.double().mean(), b.double() - b.double().mean()
    d = (a.norm() * b.norm()).item()
    return float((a * b).sum().item() / d) if d > 0 else math.nan


def evaluate_circuit(model, saes: SAE | Sequence[SAE], task: CircuitTask | str, **kwargs) -> dict[str, Any]:
    """SAE feature circuit for ``task`` with one site per SAE (see :func:`discover_circuit` for kwargs)."""
    saes = [saes] if isinstance(saes, SAE) else list(saes)
    if isinstance(task, str):
        task = make_task(task, model.tokenizer, n=kwargs.pop("n_examples", 64), seed=kwargs.get("seed", 0))
    kwargs.pop("n_examples", None)
    return discover_circuit(model, [SAESite(s) for s in saes], task, **kwargs)


def compare_heads(found: Sequence[tuple[int, int]], reference: set[tuple[int, int]]) -> dict[str, Any]:
    """Precision / recall / F1 of a found head set against a reference circuit."""
    found_set = set(map(tuple, found))
    tp = len(found_set & reference)
    p = tp / len(found_set) if found_set else math.nan
    r = tp / len(reference) if reference else math.nan
    return {"precision": p, "recall": r, "f1": 2 * p * r / (p + r) if p + r > 0 else 0.0, "n_found": len(found_set), "n_reference": len(reference)}


def evaluate_head_circuit(model, task: CircuitTask | str, *, reference: set[tuple[int, int]] | None = None, layers: Sequence[int] | None = None,
                          **kwargs) -> dict[str, Any]:
    """Head-level circuit: nodes are attention heads (``attn.hook_z`` slices) of ``layers`` (default all).

    With a ``reference`` head set (``tasks.reference_heads(name)`` for GPT-2 small), the top-|ref|
    heads by |IE| are scored for precision and recall against it.
    """
    if isinstance(task, str):
        name = task
        task = make_task(task, model.tokenizer, n=kwargs.pop("n_examples", 64), seed=kwargs.get("seed", 0))
        if reference is None and getattr(model.cfg, "model_name", "") in ("gpt2", "gpt2-small"):
            reference = reference_heads(name)
    kwargs.pop("n_examples", None)
    layers = list(range(model.cfg.n_layers)) if layers is None else list(layers)
    sites = [HeadSite(l, model.cfg.n_heads) for l in layers]
    res = discover_circuit(model, sites, task, **kwargs)
    # Rank every head (not only the top 50) for the comparison.
    heads = [(int(n["node"].split(".")[0][1:]), int(n["node"].split("H")[1])) for n in res["top_nodes"]]
    res["heads_ranked"] = [f"L{l}.H{h}" for l, h in heads]
    if reference:
        res["reference_comparison"] = compare_heads(heads[: len(reference)], set(reference))
    return res


# --------------------------------------------------------------------------- CLI


@pydantic_dataclass(frozen=True)
class CircuitConfig:
    """Settings of the circuit eval (also what the bench runner hashes for its cache)."""

    tasks: tuple[str, ...] = ("ioi",)
    n_examples: int = 32
    method: str = "ig"
    ig_steps: int = 10
    train_fraction: float = 0.5
    n_patch_check: int = 16
    batch_size: int = 16
    seed: int = 0
    max_curve_points: int | None = 16

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def run_circuit_eval(sae_dirs: Sequence[str | Path], model=None, *, config: CircuitConfig = CircuitConfig(), heads: bool = False,
                     device: str = "cpu", out: str | Path | None = None, progress: bool = True) -> dict[str, Any]:
    """Circuits for every task in ``config`` with one site per SAE folder (and/or the head-level mode)."""
    from saebench import models
    from saebench.io import write_json

    saes = [SAE.load(d, device=device) for d in sae_dirs]
    if model is None:
        model = models.load_model((saes[0].cfg.model_name if saes else None) or None, device=device)
    kw = dict(method=config.method, ig_steps=config.ig_steps, train_fraction=config.train_fraction, n_patch_check=config.n_patch_check,
              batch_size=config.batch_size, seed=config.seed, max_curve_points=config.max_curve_points, progress=progress)
    res: dict[str, Any] = {"config": config.to_dict(), "tasks": {}}
    for name in config.tasks:
        task = make_task(name, model.tokenizer, n=config.n_examples, seed=config.seed)
        entry = {}
        if saes:
            entry["features"] = discover_circuit(model, [SAESite(s) for s in saes], task, **kw)
        if heads:
            entry["heads"] = evaluate_head_circuit(model, task, **kw)
        res["tasks"][name] = entry
    target = Path(out) if out else (Path(sae_dirs[0]) / "eval_circuits.json" if sae_dirs else Path("eval_circuits.json"))
    write_json(target, res)
    return res


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """CLI: ``python -m saebench.evals.circuits SAE_DIR [SAE_DIR ...] --tasks ioi sva --method ig [--heads]``."""
    from saebench.config import HelpFormatter

    p = argparse.ArgumentParser(prog="saebench circuits", description="Feature circuits (attribution patching / IG) with faithfulness curves.",
                                formatter_class=HelpFormatter)
    p.add_argument("sae_dirs", nargs="*", help="SAE folders: one site each (none with --heads: heads only)")
    p.add_argument("--model", default=None, help="model (default: the SAEs' cfg.json model_name; smollm2-135m with --heads only)")
    p.add_argument("--heads", action="store_true", help="also run the head-level mode (attn.hook_z per head)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", default=None, help="output JSON (default: eval_circuits.json next to the first SAE)")
    p.add_argument("--no-progress", action="store_true")
    dests = registry.add_flags(p, "circuits", prefix="")  # one flag per CircuitConfig field
    a = p.parse_args(argv)
    if not a.sae_dirs and not a.heads:
        p.error("give SAE folders, --heads, or both")
    cfg = registry.config_from_args(a, "circuits", dests)
    model = None
    if a.model or not a.sae_dirs:
        from saebench import models

        model = models.load_model(a.model, device=a.device)
    res = run_circuit_eval(a.sae_dirs, model, config=cfg, heads=a.heads, device=a.device, out=a.out, progress=not a.no_progress)
    for name, entry in res["tasks"].items():
        for kind, r in entry.items():
            print(f"{name} [{kind}] m_clean={r['m_clean']:.3f} m_corrupt={r['m_corrupt']:.3f} nodes for F>=0.8: {r['nodes_for_faithfulness_0.8']} "
                  f"patch-check r={r['patch_check'].get('pearson', float('nan')):.3f}")
    return res


# --------------------------------------------------------------------------- the bench's circuit eval


def _bench_circuits(ctx, sae: SAE, sae_dir: str) -> dict[str, Any]:
    c: CircuitConfig = ctx.config("circuits")
    per = {}
    for task in c.tasks:
        per[task] = evaluate_circuit(ctx.model, sae, task, n_examples=c.n_examples, method=c.method, ig_steps=c.ig_steps,
                                     train_fraction=c.train_fraction, n_patch_check=c.n_patch_check, batch_size=c.batch_size, seed=c.seed,
                                     max_curve_points=c.max_curve_points, progress=ctx.progress)
    return {"tasks": per}


def _circuit_columns(circ: dict[str, Any]) -> dict[str, Any]:
    row = {}
    for task, r in circ.get("tasks", {}).items():
        row[f"circuit_nodes_f80[{task}]"] = r.get("nodes_for_faithfulness_0.8")
        row[f"circuit_error_ie_share[{task}]"] = r.get("error_ie_share")
        row[f"circuit_patch_pearson[{task}]"] = r.get("patch_check", {}).get("pearson")
    return row


def _circuit_figures(rows, results) -> dict[str, Any]:
    circ = {f"{name}/{t}": r for name, res in results.items() for t, r in res.get("circuits", {}).get("tasks", {}).items()}
    return {"circuit_curves": plots.circuit_figure(circ)} if circ else {}


register(EvalSpec(
    name="circuits", aliases=("circuit",), scope="sae", compute=_bench_circuits, order=30,
    configs=(ConfigSpec("circuits", CircuitConfig, prefix="circuit", flags={"n_examples": ["--circuit-examples", "--circuit-n-examples"]},
                        choices={"tasks": ["ioi", "sva", "greater_than"], "method": ["atp", "ig"]}),),
    cache_key=lambda cfgs, data: cfgs["circuits"].to_dict(),
    columns=_circuit_columns, figures=_circuit_figures,
    command=Command("circuits", "Feature circuits (attribution patching / IG) with faithfulness and completeness.", "saebench.evals.circuits:main"),
))


if __name__ == "__main__":
    main()
