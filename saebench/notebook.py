"""What the user-journey notebooks (notebooks/*.py) share: method comparisons and small analysis helpers.

A *comparison* is one SAE per (hook, method), all trained from one activation harvest:
``RUN_DIR/saes/<hook_name>/<method>/`` for the SAEs and ``RUN_DIR/activations/<key>/`` for the
cache, where ``<key>`` is a hash of everything that decides the activations (model, corpus,
context, token budget, hooks), so a cache is only ever reused by runs that would harvest the same.
``COMPARISON_PRESETS`` holds the ``smoke`` (CI) and ``full`` sizes. The helpers below them
(``reconstruction_rows``, ``training_curves_figure``, ``steering_generations``, ``latent_extremes``)
are each a few lines over the library. Like :mod:`saebench.api` this is an entry point: it may use
the trainers and the evals.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from saebench.config import TrainConfig
from saebench.folders import read_training_log
from saebench.site import Site


COMPARISON_PRESETS: dict[str, dict[str, Any]] = {
    # Seconds on two busy CPU cores: what CI runs (the notebooks' smoke setting). Not a useful SAE.
    "smoke": {
        "methods": ("topk", "batchtopk", "abstopk"),
        "hook_name": "blocks.2.hook_resid_post",
        "fields": {"context_size": 64, "harvest_tokens": 2_048, "training_tokens": 4_096, "batch_size_tokens": 256, "d_sae": 256, "k": 16,
                   "lr_warmup_steps": 2, "dead_window_tokens": 2_048, "checkpoint_every_steps": 1_000, "eval_tokens": 0},
        "method_options": {"jumprelu": {"sparsity_mode": "target_l0"}},
    },
    # The documented full-size run: minutes to an hour on a laptop CPU, seconds to minutes on a GPU.
    "full": {
        "methods": ("topk", "batchtopk", "jumprelu", "abstopk"),
        "hook_name": "blocks.6.hook_resid_post",
        "fields": {"context_size": 128, "harvest_tokens": 200_000, "training_tokens": 600_000, "batch_size_tokens": 4_096, "expansion_factor": 8,
                   "k": 32, "lr_warmup_steps": 20, "dead_window_tokens": 200_000, "checkpoint_every_steps": 50, "eval_tokens": 0},
        "method_options": {"jumprelu": {"sparsity_mode": "target_l0"}},
    },
}

_CACHE_KEY_FIELDS = ("model", "corpus", "context_size", "prepend_bos", "exclude_special_tokens", "outlier_norm_factor", "harvest_tokens",
                     "training_tokens", "shuffle_buffer_tokens")


def _preset(size: str) -> dict[str, Any]:
    from saebench.config import ConfigError

    if size not in COMPARISON_PRESETS:
        raise ConfigError(f"unknown size {size!r}; choose from {sorted(COMPARISON_PRESETS)}")
    return COMPARISON_PRESETS[size]


def comparison_sae_dir(run_dir: str | Path, hook_name: str, method: str) -> Path:
    """Where the comparison SAE of ``method`` at ``hook_name`` lives: ``run_dir/saes/<hook_name>/<method>``."""
    return Path(run_dir) / "saes" / hook_name.replace("/", "_") / method


def is_trained(sae_dir: str | Path) -> bool:
    """Whether ``sae_dir`` holds a finished SAE (weights and cfg.json; an interrupted run has only checkpoints)."""
    from saebench.layout import is_sae_folder

    return is_sae_folder(sae_dir)


def comparison_configs(run_dir: str | Path = "runs/notebooks", methods: Sequence[str] | None = None, *, hooks: Sequence[str] | None = None,
                       size: str = "full", method_options: dict[str, dict[str, Any]] | None = None, **overrides: Any) -> list[TrainConfig]:
    """One TrainConfig per (hook, method) of a method comparison, all fed by one activation harvest.

    Args:
        run_dir: root of the comparison: SAEs go to ``run_dir/saes/<hook_name>/<method>``, the shared
            activation cache to ``run_dir/activations/<key>``.
        methods: training methods (``saebench methods``); default the preset's.
        hooks: hook points (one harvest reads them all); default the preset's one hook.
        size: ``"full"`` (the documented full-size run) or ``"smoke"`` (seconds on a CPU, for CI);
            see ``COMPARISON_PRESETS``.
        method_options: ``{method: options}`` on top of the preset's (e.g. ``{"jumprelu": {"bandwidth": 0.1}}``).
        **overrides: any TrainConfig field, for every SAE (e.g. ``k=64``, ``training_tokens=1_000_000``,
            ``device="cuda"``); ``hook_name`` is the same as ``hooks=[hook_name]``.

    The configs agree on every data field, so ``trainers.loop.train_many`` trains them together.
    """
    import hashlib
    import json

    preset = _preset(size)
    hooks = _comparison_hooks(preset, hooks, overrides)
    methods = list(methods or preset["methods"])
    if not methods or not hooks:
        raise ValueError("a comparison needs at least one method and one hook")
    options = {m: dict(o) for m, o in preset.get("method_options", {}).items()}
    for m, o in (method_options or {}).items():
        options[m] = options.get(m, {}) | dict(o)
    fields = dict(preset["fields"]) | overrides
    probe = TrainConfig(**(fields | {"hook_name": hooks[0]}))
    key_data = {f: getattr(probe, f) for f in _CACHE_KEY_FIELDS} | {"hooks": sorted(hooks)}
    key = hashlib.sha256(json.dumps(key_data, sort_keys=True, default=str).encode()).hexdigest()[:12]
    cache = Path(run_dir) / "activations" / key
    out = []
    for hook in hooks:
        for m in methods:
            out.append(TrainConfig(**(fields | {"hook_name": hook, "method": m, "method_options": options.get(m, {}),
                                                "out_dir": str(comparison_sae_dir(run_dir, hook, m)), "activation_cache": str(cache)})))
    return out


def _comparison_hooks(preset: dict[str, Any], hooks: Sequence[str] | None, overrides: dict[str, Any]) -> list[str]:
    """The hooks of a comparison: ``hooks``, or ``hook_name`` popped from ``overrides``, or the preset's."""
    if "hook_name" in overrides:
        if hooks is not None:
            raise ValueError("give hooks or hook_name, not both")
        hooks = [overrides.pop("hook_name")]
    return list(hooks or [preset["hook_name"]])


def ensure_comparison_saes(run_dir: str | Path = "runs/notebooks", methods: Sequence[str] | None = None, *, hooks: Sequence[str] | None = None,
                           size: str = "full", model=None, progress: bool = True, **overrides: Any) -> list[Path]:
    """The folders of a comparison's SAEs, training (from one harvest) only the ones not there yet.

    With ``methods=None``, every finished SAE already under ``run_dir/saes/<hook>/`` is used as it
    is (e.g. those notebook 1 trained, whatever its settings; the preset's methods first, in its
    order, then the others by name); only when a hook has none are the preset's methods trained. Named ``methods`` are each used if finished and trained otherwise
    (an interrupted run resumes from its checkpoint). ``size``, ``hooks`` and ``overrides`` are
    those of :func:`comparison_configs` and apply to what has to be trained.

    Returns the SAE folders in (hook, method) order.
    """
    preset = _preset(size)
    hooks = _comparison_hooks(preset, hooks, overrides)
    wanted: list[tuple[str, str]] = []
    for hook in hooks:
        if methods is None:
            folder = comparison_sae_dir(run_dir, hook, "x").parent
            order = list(preset["methods"])
            found = sorted((p.name for p in folder.iterdir() if is_trained(p)), key=lambda m: (order.index(m) if m in order else len(order), m)) \
                if folder.is_dir() else []
            wanted += [(hook, m) for m in (found or preset["methods"])]
        else:
            wanted += [(hook, m) for m in methods]
    missing = [(h, m) for h, m in wanted if not is_trained(comparison_sae_dir(run_dir, h, m))]
    if missing:
        from saebench.trainers.loop import train_many

        missing_hooks = list(dict.fromkeys(h for h, _ in missing))
        cfgs = [c for c in comparison_configs(run_dir, list(dict.fromkeys(m for _, m in missing)), hooks=missing_hooks, size=size, **overrides)
                if (c.hook_name, c.method) in missing]
        if model is None:
            from saebench import models

            model = models.load_model(cfgs[0].model, device=cfgs[0].device)
        import torch

        with torch.enable_grad():  # also when called under no_grad / set_grad_enabled(False)
            train_many(cfgs, model=model, progress=progress)
    return [comparison_sae_dir(run_dir, h, m) for h, m in wanted]


# =============================================================================================
# Small analysis helpers the notebooks call (each a few lines over the library)
# =============================================================================================


def reconstruction_rows(sae_dirs: Sequence[str | Path], model, *, eval_tokens: int = 8_192, corpus: str = "default", context_size: int | None = None,
                        batch_size: int = 8, progress: bool = True) -> list[dict[str, Any]]:
    """Held-out FVU, L0, cosine and dead fraction of several SAEs, plus their training time: one row each.

    Cheap (no CE loss: the model stops after each hook's block; SAEs at one hook share the forwards).
    ``dead_fraction`` is over the ``eval_tokens`` window; the full metrics come from ``evals.bench.run_bench``.
    """
    from collections import defaultdict

    from saebench.evals.bench import sae_labels
    from saebench.evals.common import load_eval_tokens, special_ids_of
    from saebench.evals.reconstruction import evaluate_hook_group
    from saebench.sae import SAE

    dirs = [Path(d) for d in sae_dirs]
    saes = {d: SAE.load(d, device=str(model.cfg.device)) for d in dirs}
    ctx = context_size or next(iter(saes.values())).cfg.context_size or 128
    tokens = load_eval_tokens(model, corpus, eval_tokens, ctx)
    groups: dict[tuple, list[Path]] = defaultdict(list)
    for d in dirs:
        groups[Site.of_sae(saes[d])].append(d)
    res: dict[Path, dict] = {}
    for ds in groups.values():
        for d, r in zip(ds, evaluate_hook_group([saes[d] for d in ds], model, tokens, special_ids=special_ids_of(model.tokenizer), core=True, dead=True,
                                                downstream=False, windows=(), batch_size=batch_size, progress=progress)):
            res[d] = r
    labels = sae_labels(dirs)
    rows = []
    for d in dirs:
        cfg, core, dead = saes[d].cfg, res[d]["core"], res[d]["dead"]
        log = read_training_log(d, missing_ok=True)
        rows.append({"sae": labels[str(d)], "method": cfg.method or cfg.architecture, "architecture": cfg.architecture, "hook_name": cfg.hook_name,
                     "d_sae": cfg.d_sae, "l0": core["l0"], "fvu": core["fvu"], "explained_variance": core["explained_variance"],
                     "cossim": core["cossim"], "dead_fraction": dead["dead_fraction"], "dead_window_tokens": dead["dead_window_tokens"],
                     "train_tokens": cfg.metadata.get("training_tokens"), "train_seconds": log.get("seconds")})
    return rows


def training_curves_figure(sae_dirs: Sequence[str | Path], metrics: Sequence[str] = ("fvu", "l0", "dead_fraction")):
    """Plotly figure of each SAE's training history (``training_log.json``): one panel per metric, x in tokens."""
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    from saebench.evals.bench import sae_labels
    from saebench.sae import SAE

    dirs = [Path(d) for d in sae_dirs]
    labels = sae_labels(dirs)
    fig = make_subplots(rows=1, cols=len(metrics), subplot_titles=list(metrics))
    palette = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#e377c2", "#7f7f7f")
    for i, d in enumerate(dirs):
        hist = read_training_log(d, missing_ok=True).get("history", [])
        per_step = SAE.load(d).cfg.metadata.get("train_config", {}).get("batch_size_tokens", 1)
        for j, m in enumerate(metrics):
            pts = [(h["step"] * per_step, h[m]) for h in hist if m in h]
            fig.add_trace(go.Scatter(x=[p[0] for p in pts], y=[p[1] for p in pts], mode="lines", name=labels[str(d)], legendgroup=str(d),
                                     showlegend=j == 0, line=dict(color=palette[i % len(palette)])), row=1, col=j + 1)
            fig.update_xaxes(title_text="training tokens", row=1, col=j + 1)
    fig.update_layout(title="Training curves (batch values, as logged)", template="plotly_white")
    return fig


def steering_generations(model, sae, prompt: str, latent: int, strengths: Sequence[float], max_act: float, *, scope: str = "all",
                         **gen_kwargs: Any) -> list[dict[str, Any]]:
    """Continuations of ``prompt`` with ``latent`` added at each strength (units of ``max_act``); same seed, so same noise.

    Strength 0 is the unsteered model (generated once). ``gen_kwargs`` go to ``saebench.steering.generate``
    (``max_new_tokens``, ``seed``, ``temperature``, ``top_p``...). Returns ``{"strength", "text", "new_text"}`` rows.
    """
    from saebench.steering import generate, steering_vector

    hook, head = Site.of_sae(sae)
    base = None
    rows = []
    for s in strengths:
        if s == 0:
            if base is None:
                base = generate(model, prompt, **gen_kwargs)
            g = base
        else:
            g = generate(model, prompt, vector=steering_vector(sae, latent, s, max_act), hook_name=hook, head=head, scope=scope, **gen_kwargs)
        rows.append({"strength": float(s), "text": g.text, "new_text": g.new_text})
    return rows


def latent_extremes(model, sae, latent: int, tokens, *, n: int = 5, before: int = 10, after: int = 3, batch_size: int = 16) -> dict[str, list[dict[str, Any]]]:
    """The ``n`` most positive and ``n`` most negative activations of ``latent`` over ``tokens`` [n_seq, ctx].

    Special tokens are skipped. Each entry has ``value``, the peak ``token`` and a ``context`` string
    with the peak marked as ``«token»``. Negative entries exist only for signed SAEs (AbsTopK).
    """
    import torch

    from saebench.evals.common import special_ids_of
    from saebench.steering import site_activations

    hook, head = Site.of_sae(sae)
    special = special_ids_of(model.tokenizer)
    vals = []
    with torch.no_grad():
        for s in range(0, tokens.shape[0], batch_size):
            toks = tokens[s : s + batch_size]
            x = site_activations(model, hook, head, toks, batch_size)
            acts = sae.encode_sparse(x.flatten(0, 1).to(sae.device))
            v = (acts.values * (acts.indices == latent)).sum(-1).float().cpu().view(toks.shape)
            v[torch.isin(toks, special)] = 0
            vals.append(v)
    v = torch.cat(vals)
    tok = model.tokenizer

    def entry(flat: int) -> dict[str, Any]:
        r, p = divmod(flat, v.shape[1])
        row = tokens[r].tolist()
        lo = max(0, p - before)
        if lo == 0 and row and row[0] in special.tolist():
            lo = 1
        ctx = tok.decode(row[lo:p]) + "«" + tok.decode([row[p]]) + "»" + tok.decode(row[p + 1 : p + 1 + after])
        return {"value": float(v[r, p]), "token": tok.decode([row[p]]), "context": ctx.replace("\n", "↵")}

    flat = v.flatten()
    k = min(n, flat.numel())
    pos = [entry(int(i)) for val, i in zip(*flat.topk(k)) if val > 0]
    neg = [entry(int(i)) for val, i in zip(*(-flat).topk(k)) if val > 0]
    return {"positive": pos, "negative": neg}
