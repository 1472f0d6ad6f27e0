"""The Python API in one place: what the CLI calls, for notebooks and scripts.

Training and evaluating (``train_and_evaluate``, ``train_and_evaluate_many``) live here; the method
comparisons the notebooks share and their small analysis and plotting helpers are in
:mod:`saebench.notebook`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from saebench.config import TrainConfig, load_config
from saebench.site import Site
from saebench.trainers.loop import TrainResult


def train_and_evaluate(cfg: TrainConfig | str | Path, *, model=None, source=None, eval_source=None, progress: bool = True,
                       **overrides: Any) -> tuple[TrainResult, dict | None]:
    """Train an SAE as ``cfg`` says and, if ``cfg.eval_tokens`` > 0, evaluate it.

    ``cfg`` may be a TrainConfig or a config file path (``overrides`` are applied on top).

    Without ``source``: activations are harvested from ``cfg.model`` on ``cfg.corpus`` and the core
    eval (CE loss recovered, KL, FVU...) runs on held-out text; the model is loaded once and shared.

    With ``source`` (a tensor, NumPy array/memmap, ``.npy`` path, shard folder, iterator factory or
    any ``ActivationSource``; see ``saebench.sources``): training reads it, no model is loaded (unless
    the method needs one), and the metrics are :func:`saebench.evals.core.evaluate_activations` on the
    first ``cfg.eval_tokens`` rows of ``eval_source`` (held-out data you provide, ``split="held-out"``)
    or, without one, of the training source (``split="train"``: not held out). They are also written
    to ``out_dir/eval_activations.json``.
    """
    if not isinstance(cfg, TrainConfig):
        cfg = load_config(TrainConfig, cfg, **overrides)
    elif overrides:
        cfg = cfg.model_copy(update=overrides)
    if source is not None:
        return _train_and_evaluate_source(cfg, source, eval_source, model=model, progress=progress)
    if eval_source is not None:
        raise ValueError("eval_source is for training on a source you give (source=); without one the core eval runs on held-out text")
    # One SAE is the one-element case of several: the same model/device handling under torchrun.
    (result,) = train_and_evaluate_many([cfg], model=model, progress=progress)
    return result


def _train_and_evaluate_source(cfg: TrainConfig, source, eval_source, *, model, progress: bool) -> tuple[TrainResult, dict | None]:
    import torch

    from saebench.evals.core import evaluate_activations
    from saebench.io import write_json
    from saebench.sources import as_source
    from saebench.trainers.loop import train

    source = as_source(source)
    with torch.enable_grad():  # also when called under no_grad
        result = train(cfg, source=source, model=model, progress=progress)
    metrics = None
    if cfg.eval_tokens:
        held_out = eval_source is not None
        metrics = evaluate_activations(result.sae, as_source(eval_source) if held_out else source, max_tokens=cfg.eval_tokens,
                                       hook_name=None if held_out else result.sae.cfg.hook_name, split="held-out" if held_out else "train",
                                       progress=progress)
        write_json(Path(result.out_dir) / "eval_activations.json", metrics)
    return result, metrics


def train_and_evaluate_many(
    cfgs: list[TrainConfig | str | Path] | str | Path, *, model=None, progress: bool = True, distribute_modules: bool = False, **overrides: Any
) -> list[tuple[TrainResult, dict | None] | None]:
    """Train several SAEs from one harvest (``trainers.loop.train_many``), then core-eval each one.

    ``cfgs`` is a list of TrainConfigs or config files, or one sweep file (``config.load_sweep``: a
    ``base`` table, an optional ``grid`` of lists and an optional ``sae`` list); ``overrides`` apply to
    every SAE. The model is loaded once and shared by harvesting and evaluation. Under ``torchrun`` the
    training is data parallel (or ``distribute_modules``: each SAE on one rank); an SAE is evaluated by
    the rank that wrote it (data parallel: rank 0; the other ranks get ``(result, None)``; with
    ``distribute_modules`` a rank gets ``None`` for SAEs it does not hold).
    """
    from saebench import distributed, models, preflight
    from saebench.config import load_sweep
    from saebench.lock import folder_locks
    from saebench.trainers import get_method
    from saebench.trainers.loop import OUT_DIR_HINT, writer_out_dirs

    if isinstance(cfgs, (str, Path)):
        cfgs = load_sweep(cfgs, **overrides)
    else:
        cfgs = [c.model_copy(update=overrides) if isinstance(c, TrainConfig) else load_config(TrainConfig, c, **overrides) for c in cfgs]
    for cfg in cfgs:  # fail fast on unknown methods and bad options, before loading anything
        get_method(cfg.method)(cfg)
    checked: set[tuple[str, bool]] = set()
    for cfg in cfgs:  # hooks, heads, k and the corpus splits (each corpus once), from config.json and the text alone
        key = (cfg.corpus, cfg.eval_tokens > 0)
        preflight.check_train_config(cfg, corpus=key not in checked)
        checked.add(key)
    distributed.init_from_env(cfgs[0].device)  # before loading: under torchrun each rank's model goes to its own GPU
    # One writer per out_dir, held from before the model loads until the eval is written.
    with folder_locks(writer_out_dirs(cfgs, distribute_modules), "training", hint=OUT_DIR_HINT):
        if model is None:
            model = models.load_model(cfgs[0].model, device=distributed.rank_device(cfgs[0].device))
        for cfg in cfgs:  # the same checks on the loaded model, before any harvest
            d_in = preflight.check_hook_on_model(model, cfg.hook_name)
            preflight.check_k(cfg.k, cfg.d_sae, cfg.expansion_factor, d_in, Site.parse(cfg.hook_name).hook)
        return _train_then_eval(cfgs, model, progress, distribute_modules)


def _train_then_eval(cfgs, model, progress: bool, distribute_modules: bool) -> list[tuple[TrainResult, dict | None] | None]:
    from saebench import distributed
    from saebench.evals.core import run_core_eval
    from saebench.trainers.loop import train_many

    results = train_many(cfgs, model=model, progress=progress, distribute_modules=distribute_modules)
    out: list[tuple[TrainResult, dict | None] | None] = []
    for cfg, result in zip(cfgs, results):
        if result is None:  # distribute_modules: another rank trained this SAE
            out.append(None)
            continue
        if not distribute_modules and distributed.rank() != 0:  # data parallel: rank 0 evaluates
            out.append((result, None))
            continue
        metrics = None
        if cfg.eval_tokens:
            metrics = run_core_eval(result.out_dir, model, corpus=cfg.corpus, eval_tokens=cfg.eval_tokens, context_size=cfg.context_size,
                                    batch_size=cfg.model_batch_size, exclude_special_tokens=cfg.exclude_special_tokens, device=str(result.sae.device),
                                    progress=progress)
        out.append((result, metrics))
    return out
