"""The Python API in one place: what the CLI calls, for notebooks and scripts."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from saebench.config import TrainConfig, load_config
from saebench.trainers.loop import TrainResult, make_source, train


def train_and_evaluate(cfg: TrainConfig | str | Path, *, model=None, progress: bool = True, **overrides: Any) -> tuple[TrainResult, dict | None]:
    """Train an SAE as ``cfg`` says and, if ``cfg.eval_tokens`` > 0, run the core eval on held-out text.

    ``cfg`` may be a TrainConfig or a config file path (``overrides`` are applied on top). The model is
    loaded once and shared by harvesting and evaluation.
    """
    from saebench import models
    from saebench.evals.core import run_core_eval
    from saebench.trainers import get_method

    if not isinstance(cfg, TrainConfig):
        cfg = load_config(TrainConfig, cfg, **overrides)
    elif overrides:
        cfg = cfg.model_copy(update=overrides)
    method = get_method(cfg.method)  # fail fast on an unknown method, before loading anything
    method(cfg)  # and on bad method options
    if model is None:
        model = models.load_model(cfg.model, device=cfg.device)
    from saebench.models import validate_hook_name
    from saebench.activations import parse_hook

    validate_hook_name(model, parse_hook(cfg.hook_name)[0])
    source = None if method.needs_model and not method.needs_grads else make_source(cfg, model, progress, with_grads=method.needs_grads)
    result = train(cfg, source=source, model=model, progress=progress)
    metrics = None
    if cfg.eval_tokens:
        metrics = run_core_eval(result.out_dir, model, corpus=cfg.corpus, eval_tokens=cfg.eval_tokens, context_size=cfg.context_size,
                                batch_size=cfg.model_batch_size, exclude_special_tokens=cfg.exclude_special_tokens, device=cfg.device,
                                progress=progress)
    return result, metrics


def train_and_evaluate_many(
    cfgs: list[TrainConfig | str | Path] | str | Path, *, model=None, progress: bool = True, distribute_modules: bool = False, **overrides: Any
) -> list[tuple[TrainResult, dict | None] | None]:
    """Train several SAEs from one harvest (``trainers.loop.train_many``), then core-eval each one.

    ``cfgs`` is a list of TrainConfigs or config files, or one sweep file (``config.load_sweep``: a
    ``base`` table, an optional ``grid`` of lists and an optional ``sae`` list); ``overrides`` apply to
    every SAE. The model is loaded once and shared by harvesting and evaluation. Under ``torchrun`` the
    training is data parallel (or ``distribute_modules``: each SAE on one rank); an SAE is evaluated by
    the rank that wrote it, and the other ranks get ``None`` in its place.
    """
    from saebench import distributed, models
    from saebench.activations import parse_hook
    from saebench.config import load_sweep
    from saebench.evals.core import run_core_eval
    from saebench.models import validate_hook_name
    from saebench.trainers import get_method
    from saebench.trainers.loop import train_many

    if isinstance(cfgs, (str, Path)):
        cfgs = load_sweep(cfgs, **overrides)
    else:
        cfgs = [c.model_copy(update=overrides) if isinstance(c, TrainConfig) else load_config(TrainConfig, c, **overrides) for c in cfgs]
    for cfg in cfgs:  # fail fast on unknown methods and bad options, before loading anything
        get_method(cfg.method)(cfg)
    distributed.init_from_env(cfgs[0].device)  # before loading: under torchrun each rank's model goes to its own GPU
    if model is None:
        model = models.load_model(cfgs[0].model, device=distributed.rank_device(cfgs[0].device))
    for cfg in cfgs:
        validate_hook_name(model, parse_hook(cfg.hook_name)[0])
    results = train_many(cfgs, model=model, progress=progress, distribute_modules=distribute_modules)
    out: list[tuple[TrainResult, dict | None] | None] = []
    for cfg, result in zip(cfgs, results):
        if result is None or (not distribute_modules and distributed.rank() != 0):
            out.append(None)
            continue
        metrics = None
        if cfg.eval_tokens:
            metrics = run_core_eval(result.out_dir, model, corpus=cfg.corpus, eval_tokens=cfg.eval_tokens, context_size=cfg.context_size,
                                    batch_size=cfg.model_batch_size, exclude_special_tokens=cfg.exclude_special_tokens, device=str(result.sae.device),
                                    progress=progress)
        out.append((result, metrics))
    return out
