"""The one training loop every method uses: one SAE (``train``) or several fed by one batch stream (``train_many``).

Each SAE is a ``_Run`` (method, weights, optimizer, schedule, dead-latent counters, checkpoint folder). Every
step reads one batch of a (multi-hook) activation source and each run takes its step on its hook's part of
it. Under ``torchrun`` the same loop is data parallel, or spreads the SAEs over the ranks
(``distribute_modules``); see ``saebench.distributed`` and docs/DISTRIBUTED.md.
"""

from __future__ import annotations

import inspect
import math
import os
import socket
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from saebench.trainers import transcoder
from saebench.trainers.base import Method, StepInput, get_method
from saebench.trainers.checkpoint import load_checkpoint, optimizer_from_tensors, optimizer_to_tensors, save_checkpoint
from tqdm.auto import tqdm

from saebench.activations import ActivationSource, Batch, Position, make_source  # noqa: F401 (make_source: public here too)
from saebench.config import ConfigError, TrainConfig
from saebench.distributed import (
    all_gather_cat,
    all_gather_rows,
    all_reduce_max,
    all_reduce_mean,
    any_rank,
    average_gradients,
    broadcast_float,
    broadcast_module,
    broadcast_tensor,
    data_parallel,
    gather_objects,
    init_from_env,
    rank,
    rank_device,
)
from saebench.folders import read_training_log as load_training_log  # noqa: F401 (public here too)
from saebench.io import atomic_write_bytes, check_free_space, write_json
from saebench.layout import TRAINING_LOG_FILE
from saebench.lock import folder_locks
from saebench.precision import autocast, configure_matmul_precision
from saebench.sae import SAE
from saebench.site import Site
from saebench.sparse import SparseActs

# Fields that may change between a run and its resumption without changing the result.
_RESUME_FREE = {"out_dir", "resume", "log_every_steps", "checkpoint_every_steps", "wandb", "wandb_project", "eval_tokens", "device", "model_batch_size", "on_nonfinite"}


class NonFiniteError(RuntimeError):
    """Training met NaN/inf in its inputs or loss."""


@dataclass
class TrainResult:
    sae: SAE
    out_dir: Path
    steps: int
    seconds: float  # training time over every process of the run (resumes included)
    history: list[dict[str, float]]


def default_lr(d_sae: int, d_in: int = 768) -> float:
    """2e-4 / sqrt(d_sae / 2^14) · sqrt(768 / d_in): Gao et al.'s width scaling, fitted on GPT-2 small (d_in = 768),
    carried to other input sizes.

    Inputs are scaled to unit RMS per coordinate, so an encoder row (unit norm) has entries ~1/sqrt(d_in), and
    Adam moves each entry by about lr per step: the row turns by ~lr·sqrt(d_in) per step. The sqrt(768/d_in)
    factor keeps that turn what Gao et al. tuned at d_in = 768, instead of 3x slower at d_in = 80 (issue #20.5:
    TopK recovered 47% of planted features at d_in 80, d_sae 1,280 with 2e-4/sqrt(d_sae/2^14) = 7.2e-4, 100% at 2e-3;
    this rule gives 2.2e-3). Examples: d_in 576, d_sae 4,608 → 4.4e-4; d_in 2,304, d_sae 16,384 → 1.2e-4.
    """
    return 2e-4 / math.sqrt(d_sae / 2**14) * math.sqrt(768 / d_in)


def lr_factor(step: int, total: int, warmup: int, decay_fraction: float) -> float:
    """Linear warmup, constant, then linear decay to 0 over the last ``decay_fraction`` of steps."""
    if warmup and step < warmup:
        return (step + 1) / warmup
    decay_steps = int(total * decay_fraction)
    if decay_steps and step >= total - decay_steps:
        return max(0.0, (total - step) / decay_steps)
    return 1.0


def make_optimizer(params, cfg: TrainConfig, lr: float) -> torch.optim.Adam:
    """Adam with the config's betas and eps; the fused kernel (one pass per tensor) where the device has one.

    ``params``: tensors, or parameter groups (dicts with "params" and optionally their own "lr"), as
    ``Method.param_groups`` gives them. On CPU the fused step is ~6x faster than the per-tensor loop
    for a 16k-latent SAE (docs/PERFORMANCE.md).
    """
    params = list(params)
    tensors = [t for g in params for t in (g["params"] if isinstance(g, dict) else [g])]
    fused = all(p.device.type in ("cpu", "cuda") and p.is_floating_point() for p in tensors)
    return torch.optim.Adam(params, lr=lr, betas=cfg.adam_betas, eps=cfg.adam_eps, fused=fused or None)


def activation_scale(sample: torch.Tensor, mode: str) -> float:
    """Scalar s so that E‖s·x‖ = √d_in (SAELens 'expected_average_only_in'), or 1."""
    if mode == "none":
        return 1.0
    mean_norm = sample.float().norm(dim=-1).mean().item()
    if not math.isfinite(mean_norm) or mean_norm <= 0:
        raise NonFiniteError(f"cannot normalise activations: their mean norm is {mean_norm}")
    return math.sqrt(sample.shape[-1]) / mean_norm


# Fields that define the activation stream; SAEs trained from one stream built here must agree on them.
_DATA_FIELDS = ("model", "corpus", "context_size", "prepend_bos", "exclude_special_tokens", "outlier_norm_factor", "activation_cache",
                "harvest_tokens", "shuffle_buffer_tokens", "model_batch_size")


def train(cfg: TrainConfig, source: ActivationSource | None = None, model=None, progress: bool = True) -> TrainResult:
    """Train one SAE as ``cfg`` says, checkpointing and resuming in ``cfg.out_dir`` (``train_many`` of one)."""
    return train_many([cfg], source=source, model=model, progress=progress)[0]


@dataclass
class _Run:
    """One SAE in training: everything a step changes and a checkpoint stores."""

    cfg: TrainConfig
    method: Method
    sae: SAE
    opt: torch.optim.Optimizer
    sched: torch.optim.lr_scheduler.LambdaLR
    scale: float
    step: int
    pos: Position
    since_fired: torch.Tensor
    fire_counts: torch.Tensor
    history: list[dict[str, float]]
    writes: bool  # this process writes the run's checkpoints and artifacts
    skipped: int = 0
    seconds: float = 0.0  # training time of this process (set when the run finishes)
    wandb_run: Any = None
    seconds_before: float = 0.0  # training time of the earlier processes this run resumed from (their checkpoints)
    processes: list[dict[str, Any]] = field(default_factory=list)  # one record per earlier process
    t0: float = 0.0  # when this process started taking steps
    start_step: int = 0

    def process_record(self, seconds: float) -> dict[str, Any]:
        """This process's share of the run: who, when, how long, which steps."""
        return {"pid": os.getpid(), "host": socket.gethostname(), "started": _iso(self.t0), "seconds": seconds,
                "steps": [self.start_step, self.step]}

    source_info: dict | None = None  # provenance of a source the caller gave (saebench.sources)
    target_scale: float = 1.0  # a transcoder's target normalisation factor (its input's is ``scale``)

    @property
    def out_dir(self) -> Path:
        return Path(self.cfg.out_dir)

    @property
    def total(self) -> int:
        return self.cfg.total_steps


def train_many(cfgs: list[TrainConfig], source: ActivationSource | None = None, model=None, progress: bool = True, *,
               distribute_modules: bool = False) -> list[TrainResult | None]:
    """Train several SAEs from one activation stream: one harvest (or cache read) feeds them all.

    Each config is one SAE with its own method, hook, seed, optimizer, schedule and ``out_dir`` (where it
    checkpoints and resumes). They share the batch stream, so they must agree on ``batch_size_tokens``
    and on the data order (``data_seed``, default the first config's ``seed``; configs that leave
    ``data_seed`` unset get it filled in, so each stored config reproduces its SAE when trained alone),
    and, when the source is built here, on the data fields (model, corpus, context, cache...). Their
    lengths (``training_tokens``) may differ: a run that is done stops taking steps.

    Under ``torchrun`` (``WORLD_SIZE`` > 1) the loop runs on every rank:

    - data parallel (default): every rank holds every SAE, reads a disjoint ``1/world`` slice of each
      global batch of ``batch_size_tokens`` (its own cache shards / harvested sequences), and gradients
      and batch statistics are averaged/reduced, so training equals one process on the same global
      batches; rank 0 writes checkpoints and artifacts.
    - ``distribute_modules``: SAE ``i`` lives only on rank ``i % world``; ranks read disjoint slices and
      all-gather the activations, so every SAE still trains on the full global batch, stored once.

    A ``source`` may also be a tensor, array, shard folder or iterator (``saebench.sources.as_source``).
    Configs that leave ``hook_name`` / ``model`` / ``corpus`` unset take the given source's
    (``sources.adopt_source_fields``), and its provenance goes into each SAE's ``cfg.json``.

    Returns one ``TrainResult`` per config (``None`` for SAEs another rank trained).
    """
    source_info = None
    if source is not None:
        from saebench.sources import adopt_source_fields, as_source, source_provenance

        source = as_source(source)
        cfgs = [adopt_source_fields(c, source, model) for c in cfgs]
        source_info = source_provenance(source, model)
    cfgs = _shared_stream_configs(list(cfgs), source is not None)
    rank_, world = init_from_env(cfgs[0].device)
    if world > 1:
        cfgs = [c.model_copy(update={"device": rank_device(c.device)}) for c in cfgs]
    bs = cfgs[0].batch_size_tokens
    if bs % world:
        raise ConfigError(f"batch_size_tokens={bs} must be divisible by the number of ranks ({world}): each reads an equal slice")
    owned = [i for i in range(len(cfgs)) if not distribute_modules or i % world == rank_]
    writes = rank_ == 0 or distribute_modules
    # One writer per out_dir: a second run into the same folder would delete this one's checkpoints.
    with folder_locks(writer_out_dirs(cfgs, distribute_modules), "training", hint=OUT_DIR_HINT):
        return _train_many(cfgs, source, model, progress, distribute_modules, rank_, world, owned, writes, source_info)


OUT_DIR_HINT = ("Wait for it to finish (a finished run's SAE is in that folder), stop it (it resumes from its last checkpoint "
                "when restarted), or train into another --out-dir.")


def writer_out_dirs(cfgs: list[TrainConfig], distribute_modules: bool = False) -> list[str]:
    """The ``out_dir`` folders this process writes (and locks) when it trains ``cfgs``: all of them, or
    under ``torchrun`` rank 0's (data parallel) or this rank's SAEs (``distribute_modules``)."""
    from saebench.distributed import world_size

    r, world = rank(), world_size()
    if not distribute_modules:
        return [c.out_dir for c in cfgs] if r == 0 else []
    return [c.out_dir for i, c in enumerate(cfgs) if i % world == r]


def _train_many(cfgs: list[TrainConfig], source, model, progress: bool, distribute_modules: bool, rank_: int, world: int, owned: list[int],
                writes: bool, source_info: dict | None = None) -> list[TrainResult | None]:
    dp = world > 1 and not distribute_modules
    bs = cfgs[0].batch_size_tokens
    methods = [get_method(c.method)(c) for c in cfgs]
    if model is None and any(methods[i].needs_model for i in owned):
        from saebench import models
        from saebench.sources import NO_MODEL

        bad = next(cfgs[i] for i in owned if methods[i].needs_model)
        if bad.model == NO_MODEL:
            raise ConfigError(f"method {bad.method!r} runs the language model the activations came from, and none is named; "
                              "pass model= or name it in the source (model=...)")

        model = models.load_model(cfgs[0].model, device=cfgs[0].device)
    if source is None:
        source = _source_for(cfgs, methods, model, progress and rank_ == 0)
    for c in cfgs:
        if c.hook_name not in source.hook_names:
            raise ConfigError(f"hook {c.hook_name!r} is not provided by the activation source (it has {source.hook_names}); set hook_name "
                              "to one of those, or leave it unset to use a one-hook source's")
        if c.target_hook is not None and c.target_hook not in source.hook_names:
            raise ConfigError(f"target_hook {c.target_hook!r} (the transcoder's output) is not provided by the activation source "
                              f"(it has {source.hook_names}); give a source with both hooks")
    first: list = []  # chunk 0, read once for the initialisation of every fresh run

    def first_chunk() -> Batch:
        if not first:
            first.append(source.chunk(0))
        return first[0]

    if any(m.needs_grads for m in methods) and first_chunk().grads is None:
        bad = next(c.method for c, m in zip(cfgs, methods) if m.needs_grads)
        raise ConfigError(f"method {bad!r} needs LM-loss gradients; the activation source has none")
    for c in cfgs:
        configure_matmul_precision(c.device, c.tf32)

    runs = {i: _start_run(cfgs[i], methods[i], source, model, first_chunk, world, writes, replicated=dp, source_info=source_info) for i in owned}
    # The shared stream starts where the run furthest behind resumes; runs further ahead wait for it.
    mine = [(r.step, r.pos.chunk, r.pos.batch) for r in runs.values()]
    everyone = gather_objects(mine)
    if dp and any(theirs != mine for theirs in everyone):
        raise ConfigError("ranks resumed from different checkpoints; out_dir must be on a filesystem every rank sees (or start over with resume=false)")
    states = [s for per_rank in everyone for s in per_rank]
    step, c0, b0 = min(states) if states else (0, 0, 0)
    pos = Position(c0, b0)
    total = max(c.total_steps for c in cfgs)
    for r in runs.values():
        if r.cfg.wandb and r.writes:
            r.wandb_run = _init_wandb(r.cfg, many=len(runs) > 1)

    kw = {"rank": rank_, "world": world} if world > 1 else {}
    if world > 1 and "world" not in inspect.signature(source.batches).parameters:
        raise ConfigError(f"{type(source).__name__} cannot be read by several ranks (its batches() takes no rank/world)")
    stream = source.batches(bs // world, seed=cfgs[0].effective_data_seed, start=pos, **kw)
    label = f"train {cfgs[0].method} {cfgs[0].hook_name}" if len(cfgs) == 1 else f"train {len(cfgs)} SAEs"
    bar = tqdm(total=total, initial=step, desc=label, disable=not progress or rank_ != 0, dynamic_ncols=True)
    t0 = time.time()
    for r in runs.values():
        r.t0 = t0
    while step < total:
        batch, pos = next(stream)
        if distribute_modules and world > 1:
            batch = _gather_batch(batch)
        for r in runs.values():
            if r.step == step and r.step < r.total:
                _train_step(r, batch, pos, dp, world)
                if r.step == r.total:
                    r.seconds = time.time() - t0
        step += 1
        bar.update(1)
        if len(runs) == 1:
            rec = next(iter(runs.values())).history[-1:] or [None]
            if rec[0] is not None and rec[0]["step"] == step:
                bar.set_postfix(l0=f"{rec[0]['l0']:.1f}", fvu=f"{rec[0]['fvu']:.3f}", dead=f"{rec[0]['dead_fraction']:.3f}")
    bar.close()
    for r in runs.values():
        r.seconds = r.seconds or time.time() - t0
    return [_finish(runs[i], world) if i in runs else None for i in range(len(cfgs))]


def _source_for(cfgs: list[TrainConfig], methods: list[Method], model, progress: bool) -> ActivationSource:
    """The source the methods ask for (``Method.make_source``): their own when they all agree on one, else the harvest."""
    hooks = transcoder.hooks_to_harvest(cfgs)  # a transcoder's target hook comes from the same forward
    longest = cfgs[0].model_copy(update={"training_tokens": max(c.training_tokens for c in cfgs)})
    builders = {type(m).make_source.__func__: type(m) for m in methods}
    owner = next(iter(builders.values())) if len(builders) == 1 else Method
    return owner.make_source(longest, model, hook_names=hooks, with_grads=any(m.needs_grads for m in methods), progress=progress)


def _shared_stream_configs(cfgs: list[TrainConfig], have_source: bool) -> list[TrainConfig]:
    """Check that ``cfgs`` can share one batch stream; fill in a shared ``data_seed`` where unset."""
    if not cfgs:
        raise ConfigError("train_many needs at least one TrainConfig")
    if len(cfgs) == 1:
        return cfgs
    lead = cfgs[0]
    dirs = [str(Path(c.out_dir).resolve()) for c in cfgs]
    if len(set(dirs)) < len(dirs):
        raise ConfigError(f"SAEs trained together need distinct out_dir folders (got {[c.out_dir for c in cfgs]})")
    sizes = {c.batch_size_tokens for c in cfgs}
    if len(sizes) > 1:
        raise ConfigError(f"SAEs trained together read one batch stream, so batch_size_tokens must agree (got {sorted(sizes)})")
    seed = lead.effective_data_seed
    out = []
    for c in cfgs:
        if c.effective_data_seed != seed:
            if c.data_seed is not None:
                raise ConfigError(f"SAEs trained together share one data order; data_seed={c.data_seed} of {c.out_dir} differs from {seed}")
            c = c.model_copy(update={"data_seed": seed})
        if not have_source:
            diff = [f for f in _DATA_FIELDS if getattr(c, f) != getattr(lead, f)]
            if diff:
                raise ConfigError(f"SAEs trained from one harvest must agree on {', '.join(diff)} ({c.out_dir} differs from {lead.out_dir})")
        out.append(c)
    return out


def _start_run(cfg: TrainConfig, method: Method, source: ActivationSource, model, first_chunk, world: int, writes: bool,
               replicated: bool = False, source_info: dict | None = None) -> _Run:
    """Build one SAE with its optimizer and schedule: fresh (initialised from chunk 0) or from its checkpoint.

    ``replicated``: every rank holds this SAE (data parallel); rank 0's initialisation is broadcast.
    ``source_info``: provenance of a caller's source; activations from no model get no layer (-1) or context size.
    """
    if hasattr(method, "attach_model"):
        method.attach_model(model)
    d_in = source.d_in[cfg.hook_name]
    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    site = Site.parse(cfg.hook_name)
    hook, head = site
    no_model = source_info is not None and not source_info.get("model") and not hook.startswith("blocks.")
    transcoder.check_method(cfg, method)
    sae_cfg = method.sae_config(
        d_in, model_name=cfg.model, hook_name=hook, hook_layer=-1 if no_model else (site.layer or 0), hook_head_index=head,
        context_size=None if no_model else cfg.context_size, prepend_bos=cfg.prepend_bos, device=cfg.device,
        **transcoder.sae_fields(cfg, source.d_in.get(cfg.target_hook, 0)),
    )
    sae = SAE(sae_cfg).to(cfg.device)
    lr = cfg.lr or default_lr(sae_cfg.d_sae, sae_cfg.d_in)
    opt = make_optimizer(method.param_groups(sae, lr), cfg, lr)
    total = cfg.total_steps
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, total, cfg.lr_warmup_steps, cfg.lr_decay_fraction))
    counters = [torch.zeros(sae_cfg.d_sae, dtype=torch.long, device=cfg.device) for _ in range(2)]
    run = _Run(cfg, method, sae, opt, sched, 1.0, 0, Position(), counters[0], counters[1], [], writes, source_info=source_info)
    ckpt = load_checkpoint(run.out_dir) if cfg.resume else None
    if ckpt is not None:
        tensors, meta = ckpt
        _check_resumable(cfg, meta["config"])
        _check_same_source(cfg, meta.get("source"), source_info, d_in, tensors.get("sae.encoder_weight"))
        if meta.get("world_size", 1) != world:
            n = meta.get("world_size", 1)
            raise ConfigError(f"{cfg.out_dir} was checkpointed by {n} rank(s), and its data position means the same only with as many; "
                              f"resume with {n} rank(s) or start over (resume=false)")
        sae.load_state_dict({k[4:]: v for k, v in tensors.items() if k.startswith("sae.")})
        optimizer_from_tensors(opt, tensors, meta["optimizer"])
        sched.load_state_dict(meta["scheduler"])
        method.load_state({k[7:]: v for k, v in tensors.items() if k.startswith("method.")})
        run.since_fired.copy_(tensors["since_fired"])
        run.fire_counts.copy_(tensors["fire_counts"])
        torch.set_rng_state(tensors["rng"])
        run.step, run.pos, run.scale, run.history = meta["step"], Position(**meta["position"]), meta["scale"], meta["history"]
        run.target_scale = meta.get("target_scale", 1.0)
        run.skipped = meta.get("skipped", 0)
        run.seconds_before, run.processes = float(meta.get("seconds", 0.0)), list(meta.get("processes", []))
        run.start_step = run.step
    else:
        sample = first_chunk().acts[cfg.hook_name][: 16 * cfg.batch_size_tokens]
        _check_finite(sample, cfg, step=0, what="activations (first chunk)")
        run.scale = activation_scale(sample, cfg.normalize_activations)
        method.init_sae(sae, (sample[: cfg.batch_size_tokens] * run.scale).to(cfg.device), gen)
        if cfg.target_hook is not None:  # a transcoder: its target's own scale, and b_dec among the targets
            y = first_chunk().acts[cfg.target_hook][: 16 * cfg.batch_size_tokens]
            _check_finite(y, cfg, step=0, what="target activations (first chunk)")
            run.target_scale = activation_scale(y, cfg.normalize_activations)
            transcoder.init_output_bias(sae, (y[: cfg.batch_size_tokens] * run.target_scale).to(cfg.device))
        if replicated:  # replicas start identical even where a harvest is not bit-reproducible
            run.scale = broadcast_float(run.scale)
            run.target_scale = broadcast_float(run.target_scale)
            broadcast_module(sae)
    return run


def _gather_batch(batch: Batch) -> Batch:
    """Every rank's slice of the global batch, concatenated in rank order (``distribute_modules``)."""
    acts = {h: all_gather_rows(a) for h, a in batch.acts.items()}
    grads = None if batch.grads is None else {h: all_gather_rows(g) for h, g in batch.grads.items()}
    return Batch(acts, all_gather_rows(batch.token_ids), grads)


def _train_step(r: _Run, batch: Batch, pos: Position, dp: bool, world: int) -> None:
    """One optimizer step of one SAE on its hook's part of ``batch`` (this rank's slice of it under ``dp``)."""
    cfg, sae, step = r.cfg, r.sae, r.step
    x = batch.acts[cfg.hook_name].to(cfg.device).to(sae.dtype) * r.scale
    grads = batch.grads[cfg.hook_name].to(cfg.device).to(sae.dtype) / r.scale if batch.grads is not None else None
    dead = r.since_fired >= cfg.dead_window_tokens
    inp = StepInput(x=x, dead_mask=dead, step=step, grads=grads, token_ids=batch.token_ids.to(cfg.device), scale=r.scale,
                    target=transcoder.target(cfg, batch, r.target_scale, sae.dtype))
    if not _finite_or_skip(x, cfg, step, "activations", dp=dp):
        _skip(r)
    else:
        with data_parallel(dp), autocast(cfg.autocast, cfg.device):
            out = r.method.step(sae, inp)
        loss = out.loss
        r.opt.zero_grad(set_to_none=True)
        if not _finite_or_skip(loss.detach(), cfg, step, "loss", extra=out.losses, dp=dp):
            _skip(r)
        else:
            _optimize(r, loss, dp)
            if dp:
                # After-step statistics (threshold EMAs, firing densities) see the global batch's codes,
                # so every rank computes what one process would.
                out = replace(out, acts=_gather_acts(out.acts))
            r.method.after_step(sae, inp, out, step)
            if dp and hasattr(sae, "log_threshold"):
                broadcast_tensor(sae.log_threshold)  # a safety net: thresholds are set outside the optimizer
            _count_firing(r, out, x.shape[0] * (world if dp else 1))
            r.step += 1
            if r.step % cfg.log_every_steps == 0 or r.step == r.total:
                with data_parallel(dp):
                    rec = {"step": r.step, "lr": r.sched.get_last_lr()[0]} | _step_metrics(out, dead)
                r.history.append(rec)
                if r.wandb_run is not None:
                    _log_wandb(r.wandb_run, rec, out, r.fire_counts, r.step, cfg)
    if r.step % cfg.checkpoint_every_steps == 0 and r.step < r.total and r.writes:
        _checkpoint(r, pos, world)


def _optimize(r: _Run, loss: torch.Tensor, dp: bool) -> None:
    """Backward, (all-reduce,) decoder-gradient projection, clipping, Adam, unit-norm decoder, LR schedule."""
    loss.backward()
    if dp:
        average_gradients(r.sae.parameters())
    r.sae.project_decoder_grad()
    if r.cfg.grad_clip_norm:
        torch.nn.utils.clip_grad_norm_(r.sae.parameters(), r.cfg.grad_clip_norm)
    r.opt.step()
    r.sae.normalize_decoder()
    r.sched.step()


@torch.no_grad()
def _gather_acts(acts: SparseActs) -> SparseActs:
    """The codes of the global batch: every rank's ``SparseActs`` (padded to the widest K) in rank order."""
    with data_parallel():
        width = int(all_reduce_max(torch.tensor([acts.values.shape[1]], device=acts.values.device)).item())
        pad = width - acts.values.shape[1]
        values = torch.nn.functional.pad(acts.values.detach(), (0, pad))
        indices = torch.nn.functional.pad(acts.indices, (0, pad))
        return SparseActs(all_gather_cat(values), all_gather_cat(indices))


@torch.no_grad()
def _count_firing(r: _Run, out, tokens: int) -> None:
    """Dead-latent tracking in tokens: which latents fired in the (global) batch."""
    fired = out.acts.firing_counts(r.fire_counts.shape[0]).to(r.fire_counts.dtype)  # no device sync
    r.fire_counts += fired
    r.since_fired.add_(tokens).masked_fill_(fired > 0, 0)


def _skip(r: _Run) -> None:
    """A non-finite batch or loss under on_nonfinite='skip': count it and move on."""
    r.skipped += 1
    r.step += 1
    r.sched.step()


def _finish(r: _Run, world: int) -> TrainResult:
    """Export, fold the activation scale and (on the writing rank) save the SAE and its training log."""
    cfg = r.cfg
    final = r.method.export(r.sae)
    final.fold_activation_scale(r.scale, r.target_scale if cfg.target_hook is not None else None)
    final.cfg = final.cfg.model_copy(update={"metadata": {
        "training_tokens": r.step * cfg.batch_size_tokens, "corpus": cfg.corpus, "seed": cfg.seed, "method_options": dict(cfg.method_options),
        "activation_scale_folded": r.scale, "normalize_activations_in_training": cfg.normalize_activations,
        "skipped_steps": r.skipped, "train_config": cfg.model_dump(mode="json"), "saebench_version": _version(),
    } | ({"world_size": world} if world > 1 else {}) | ({"activation_source": r.source_info} if r.source_info is not None else {})
      | ({"target_activation_scale_folded": r.target_scale} if cfg.target_hook is not None else {})})
    if r.writes:
        # "seconds" adds up every process that trained this run (resumed runs too); "processes" has each one's share.
        _save_final(r, final, {"history": r.history, "seconds": r.seconds_before + r.seconds, "steps": r.step,
                               "seconds_this_process": r.seconds, "processes": r.processes + [r.process_record(r.seconds)]})
    if r.wandb_run is not None:
        r.wandb_run.finish()
    return TrainResult(final, r.out_dir, r.step, r.seconds_before + r.seconds, r.history)


def _save_final(r: _Run, final: SAE, log: dict[str, Any]) -> None:
    """Write the SAE and its training log; on a write error the folder keeps its previous SAE and log."""
    r.out_dir.mkdir(parents=True, exist_ok=True)
    check_free_space(r.out_dir, sum(t.numel() * t.element_size() for t in final.state_dict().values()), "the trained SAE")
    log_path = r.out_dir / TRAINING_LOG_FILE
    old = log_path.read_bytes() if log_path.is_file() else None
    write_json(log_path, log)
    try:
        final.save(r.out_dir, extra_files=[TRAINING_LOG_FILE])
    except OSError:
        try:  # put the previous SAE's log back, so the folder still matches its manifest
            if old is None:
                log_path.unlink(missing_ok=True)
            else:
                atomic_write_bytes(log_path, old)
        except OSError:
            pass
        raise


def _step_metrics(out, dead: torch.Tensor) -> dict[str, float]:
    """The live metrics of one step, for the progress bar, history and wandb (global-batch values in a data-parallel step)."""
    vals = {
        "l0": out.acts.l0().float().mean(),
        "fvu": out.losses["mse_loss"].detach().float(),
        "dead_fraction": dead.float().mean(),
        "loss": out.loss.detach().float(),
    } | {f"loss/{k}": v.detach().float() for k, v in out.losses.items()}
    keys = list(vals)
    flat = all_reduce_mean(torch.stack([vals[k].reshape(()) for k in keys]))
    return dict(zip(keys, flat.tolist())) | out.metrics


def _check_resumable(cfg: TrainConfig, saved: dict[str, Any]) -> None:
    now = cfg.model_dump(mode="json")
    fields = TrainConfig.model_fields
    # A field added after the checkpoint was written reads as its default.
    diff = [k for k in now if k not in _RESUME_FREE and now[k] != saved.get(k, _json_default(fields[k]))]
    if diff:
        raise ConfigError(
            f"{cfg.out_dir} holds a checkpoint of a different run (fields differ: {', '.join(diff)}); "
            "use another out_dir, set resume=false to start over, or delete its checkpoints folder"
        )


def _check_same_source(cfg: TrainConfig, saved: dict | None, now: dict | None, d_in: int, w_dec: torch.Tensor | None) -> None:
    """Refuse to resume on activations of another width, or (for ``saebench.sources``) another stream layout."""
    if w_dec is not None and w_dec.shape[-1] != d_in:
        raise ConfigError(f"{cfg.out_dir} holds a checkpoint of an SAE on d_in={w_dec.shape[-1]} activations, but the source gives d_in={d_in}; "
                          "use another out_dir or set resume=false")
    if saved and now and saved.get("fingerprint") and now.get("fingerprint") and saved["fingerprint"] != now["fingerprint"]:
        keys = ("n_tokens", "d_in", "hook_name", "chunk_tokens", "shuffle")
        diff = {k: (saved.get(k), now.get(k)) for k in keys if saved.get(k) != now.get(k)}
        raise ConfigError(f"{cfg.out_dir} was checkpointed on another activation stream ({', '.join(f'{k}: {a} then, {b} now' for k, (a, b) in diff.items())}); "
                          "resuming would not continue the same data. Give the same data and chunking, or use another out_dir / resume=false")


def _json_default(field) -> Any:
    value = field.default if field.default_factory is None else field.default_factory()
    return list(value) if isinstance(value, tuple) else value


def _checkpoint(r: _Run, pos: Position, world: int) -> None:
    opt_t, opt_meta = optimizer_to_tensors(r.opt)
    tensors = {f"sae.{k}": v for k, v in r.sae.state_dict().items()} | opt_t | {f"method.{k}": v for k, v in r.method.state().items()}
    tensors |= {"since_fired": r.since_fired, "fire_counts": r.fire_counts, "rng": torch.get_rng_state()}
    meta = {"position": {"chunk": pos.chunk, "batch": pos.batch}, "scale": r.scale, "target_scale": r.target_scale, "optimizer": opt_meta, "skipped": r.skipped,
            "scheduler": r.sched.state_dict() | {"lr_lambdas": [None]}, "config": r.cfg.model_dump(mode="json"), "history": r.history}
    if r.source_info is not None:
        meta["source"] = r.source_info
    if world > 1:
        meta["world_size"] = world
    now = time.time() - r.t0
    meta |= {"seconds": r.seconds_before + now, "processes": r.processes + [r.process_record(now)]}
    save_checkpoint(r.out_dir, r.step, tensors, meta)


def _check_finite(t: torch.Tensor, cfg: TrainConfig, step: int, what: str, extra: dict | None = None) -> None:
    if torch.isfinite(t).all():
        return
    bad = (~torch.isfinite(t)).sum().item()
    finite = t[torch.isfinite(t)]
    stats = f"{bad} of {t.numel()} values non-finite"
    if finite.numel():
        stats += f"; finite values range [{finite.min().item():.3g}, {finite.max().item():.3g}]"
    if extra:
        stats += "; loss terms " + ", ".join(f"{k}={float(v):.4g}" for k, v in extra.items())
    ckpt = Path(cfg.out_dir) / "checkpoints"
    raise NonFiniteError(
        f"step {step}, hook {cfg.hook_name}: NaN/inf in {what} ({stats}). The last good checkpoint is kept in {ckpt}. "
        "Check the model dtype and the corpus, lower the learning rate, or set on_nonfinite='skip'."
    )


def _finite_or_skip(t: torch.Tensor, cfg: TrainConfig, step: int, what: str, extra: dict | None = None, dp: bool = False) -> bool:
    """True if ``t`` is finite (on every rank under ``dp``, so that ranks skip or stop together)."""
    local_ok = bool(torch.isfinite(t).all())
    if dp and any_rank(not local_ok):
        if local_ok:
            if cfg.on_nonfinite == "skip":
                return False
            raise NonFiniteError(f"step {step}, hook {cfg.hook_name}: NaN/inf in {what} on another rank (see its report)")
    elif local_ok:
        return True
    if cfg.on_nonfinite == "skip":
        return False
    _check_finite(t, cfg, step, what, extra)
    return False


def _init_wandb(cfg: TrainConfig, many: bool = False):
    import wandb

    # Several SAEs trained together log to several concurrent runs, named after their out_dir.
    return wandb.init(project=cfg.wandb_project, config=cfg.model_dump(mode="json"), name=Path(cfg.out_dir).name if many else None,
                      reinit="create_new" if many else True)


def _log_wandb(run, rec: dict, out, fire_counts: torch.Tensor, step: int, cfg: TrainConfig) -> None:
    """SAELens-style keys: losses/*, metrics/*, sparsity/*, details/*."""
    import wandb

    log = {f"losses/{k}": float(v.detach()) for k, v in out.losses.items()} | {
        "losses/overall_loss": rec["loss"], "metrics/l0": rec["l0"], "metrics/explained_variance": 1 - rec["fvu"],
        "sparsity/dead_features": rec["dead_fraction"], "details/current_learning_rate": rec["lr"],
    }
    if step % (cfg.log_every_steps * 10) == 0:
        density = fire_counts.float() / max(step * cfg.batch_size_tokens, 1)
        log["plots/feature_density_line_chart"] = wandb.Histogram(torch.log10(density + 1e-10).cpu().numpy())
    run.log(log, step=step)


def _iso(t: float) -> str:
    import datetime

    return datetime.datetime.fromtimestamp(t, datetime.timezone.utc).isoformat(timespec="seconds")


def _version() -> str:
    try:
        from importlib.metadata import version

        return version("saebench")
    except Exception:
        return "dev"
