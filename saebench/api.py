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
