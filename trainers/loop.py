"""The one training loop every method uses."""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from saebench.activations import ActivationSource, Batch, CachedSource, HookedSource, Position, hook_layer_of, parse_hook, write_cache
from saebench.config import ConfigError, TrainConfig
from saebench.io import write_json
from saebench.sae import SAE
from saebench.trainers.base import Method, StepInput, get_method
from saebench.trainers.checkpoint import load_checkpoint, optimizer_from_tensors, optimizer_to_tensors, save_checkpoint

# Fields that may change between a run and its resumption without changing the result.
_RESUME_FREE = {"out_dir", "resume", "log_every_steps", "checkpoint_every_steps", "wandb", "wandb_project", "eval_tokens", "device", "model_batch_size", "on_nonfinite"}


class NonFiniteError(RuntimeError):
    """Training met NaN/inf in its inputs or loss."""


@dataclass
class TrainResult:
    sae: SAE
    out_dir: Path
    steps: int
    seconds: float
    history: list[dict[str, float]]


def default_lr(d_sae: int) -> float:
    """2e-4 / sqrt(d_sae / 2^14): the LR scaling fit of Gao et al. (as in dictionary_learning)."""
    return 2e-4 / math.sqrt(d_sae / 2**14)


def lr_factor(step: int, total: int, warmup: int, decay_fraction: float) -> float:
    """Linear warmup, constant, then linear decay to 0 over the last ``decay_fraction`` of steps."""
    if warmup and step < warmup:
        return (step + 1) / warmup
    decay_steps = int(total * decay_fraction)
    if decay_steps and step >= total - decay_steps:
        return max(0.0, (total - step) / decay_steps)
    return 1.0


def activation_scale(sample: torch.Tensor, mode: str) -> float:
    """Scalar s so that E‖s·x‖ = √d_in (SAELens 'expected_average_only_in'), or 1."""
    if mode == "none":
        return 1.0
    mean_norm = sample.float().norm(dim=-1).mean().item()
    if not math.isfinite(mean_norm) or mean_norm <= 0:
        raise NonFiniteError(f"cannot normalise activations: their mean norm is {mean_norm}")
    return math.sqrt(sample.shape[-1]) / mean_norm


def make_source(cfg: TrainConfig, model=None, progress: bool = True, with_grads: bool = False) -> ActivationSource:
    """The activation source a config asks for: online harvest, or a disk cache filled once."""
    from saebench import models, text

    if model is None:
        model = models.load_model(cfg.model, device=cfg.device)
    tokenizer = model.tokenizer
    n_tokens = cfg.harvest_tokens if cfg.activation_cache else cfg.training_tokens
    # Masked special tokens and outliers shrink the usable count; harvest a little more.
    tokens = text.load_tokens(cfg.corpus, tokenizer, cfg.context_size, int(n_tokens * 1.05) + cfg.context_size, split="train", prepend_bos=cfg.prepend_bos)
    special = text.special_ids(tokenizer) if cfg.exclude_special_tokens else None
    source = HookedSource(
        model, [cfg.hook_name], tokens, special_ids=special, shuffle_buffer_tokens=cfg.shuffle_buffer_tokens,
        model_batch_size=cfg.model_batch_size, outlier_norm_factor=cfg.outlier_norm_factor, with_grads=with_grads,
        progress=progress and not cfg.activation_cache,
    )
    if not cfg.activation_cache:
        return source
    provenance = {"model": cfg.model, "corpus": cfg.corpus, "context_size": cfg.context_size, "tokens": tokens.shape[0] * tokens.shape[1],
                  "exclude_special_tokens": cfg.exclude_special_tokens, "outlier_norm_factor": cfg.outlier_norm_factor, "with_grads": with_grads}
    return write_cache(source, cfg.activation_cache, provenance=provenance, progress=progress)


def train(cfg: TrainConfig, source: ActivationSource | None = None, model=None, progress: bool = True) -> TrainResult:
    """Train one SAE as ``cfg`` says, checkpointing and resuming in ``cfg.out_dir``."""
    method: Method = get_method(cfg.method)(cfg)
    out_dir = Path(cfg.out_dir)
    if method.needs_model and model is None:
        from saebench import models

        model = models.load_model(cfg.model, device=cfg.device)
    if source is None:
        source = make_source(cfg, model, progress, with_grads=method.needs_grads)
    if cfg.hook_name not in source.hook_names:
        raise ConfigError(f"hook {cfg.hook_name!r} is not provided by the activation source (it has {source.hook_names})")
    if method.needs_grads and source.chunk(0).grads is None:
        raise ConfigError(f"method {cfg.method!r} needs LM-loss gradients; the activation source has none")
    if hasattr(method, "attach_model"):
        method.attach_model(model)
    d_in = source.d_in[cfg.hook_name]
    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)

    hook, head = parse_hook(cfg.hook_name)
    sae_cfg = method.sae_config(
        d_in, model_name=cfg.model, hook_name=hook, hook_layer=hook_layer_of(hook), hook_head_index=head,
        context_size=cfg.context_size, prepend_bos=cfg.prepend_bos, device=cfg.device,
    )
    sae = SAE(sae_cfg).to(cfg.device)
    lr = cfg.lr or default_lr(sae_cfg.d_sae)
    opt = torch.optim.Adam(sae.parameters(), lr=lr, betas=cfg.adam_betas, eps=cfg.adam_eps)
    total = cfg.total_steps
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, total, cfg.lr_warmup_steps, cfg.lr_decay_fraction))

    step, pos, history = 0, Position(), []
    since_fired = torch.zeros(sae_cfg.d_sae, dtype=torch.long, device=cfg.device)
    fire_counts = torch.zeros(sae_cfg.d_sae, dtype=torch.long, device=cfg.device)
    ckpt = load_checkpoint(out_dir) if cfg.resume else None
    if ckpt is not None:
        tensors, meta = ckpt
        _check_resumable(cfg, meta["config"])
        sae.load_state_dict({k[4:]: v for k, v in tensors.items() if k.startswith("sae.")})
        optimizer_from_tensors(opt, tensors, meta["optimizer"])
        sched.load_state_dict(meta["scheduler"])
        method.load_state({k[7:]: v for k, v in tensors.items() if k.startswith("method.")})
        since_fired.copy_(tensors["since_fired"])
        fire_counts.copy_(tensors["fire_counts"])
        torch.set_rng_state(tensors["rng"])
        step, pos, scale, history = meta["step"], Position(**meta["position"]), meta["scale"], meta["history"]
    else:
        first = source.chunk(0) if source.n_chunks is None or source.n_chunks > 0 else None
        sample = first.acts[cfg.hook_name][: 16 * cfg.batch_size_tokens]
        _check_finite(sample, cfg, step=0, what="activations (first chunk)")
        scale = activation_scale(sample, cfg.normalize_activations)
        method.init_sae(sae, (sample[: cfg.batch_size_tokens] * scale).to(cfg.device), gen)

    wandb_run = _init_wandb(cfg) if cfg.wandb else None
    stream = source.batches(cfg.batch_size_tokens, seed=cfg.seed, start=pos)
    bar = tqdm(total=total, initial=step, desc=f"train {cfg.method} {cfg.hook_name}", disable=not progress, dynamic_ncols=True)
    t0, skipped = time.time(), 0
    while step < total:
        batch, pos = next(stream)
        batch = batch.to(cfg.device)
        x = batch.acts[cfg.hook_name].to(sae.dtype) * scale
        grads = batch.grads[cfg.hook_name].to(sae.dtype) / scale if batch.grads is not None else None
        dead = since_fired >= cfg.dead_window_tokens
        inp = StepInput(x=x, dead_mask=dead, step=step, grads=grads, token_ids=batch.token_ids, scale=scale)
        if not _finite_or_skip(x, cfg, step, "activations"):
            skipped += 1
            step += 1
            sched.step()
            bar.update(1)
            continue
        out = method.step(sae, inp)
        loss = out.loss
        if not _finite_or_skip(loss.detach(), cfg, step, "loss", extra=out.losses):
            opt.zero_grad(set_to_none=True)
            skipped += 1
            step += 1
            sched.step()
            bar.update(1)
            continue
        opt.zero_grad(set_to_none=True)
        loss.backward()
        sae.project_decoder_grad()
        if cfg.grad_clip_norm:
            torch.nn.utils.clip_grad_norm_(sae.parameters(), cfg.grad_clip_norm)
        opt.step()
        sae.normalize_decoder()
        sched.step()
        method.after_step(sae, inp, out, step)

        # dead-latent tracking, in tokens
        with torch.no_grad():
            nz = out.acts.values != 0
            fired = torch.zeros_like(fire_counts).index_add_(0, out.acts.indices[nz], torch.ones_like(out.acts.indices[nz]))
            fire_counts += fired
            since_fired += x.shape[0]
            since_fired[fired > 0] = 0
        step += 1
        bar.update(1)
        if step % cfg.log_every_steps == 0 or step == total:
            rec = {"step": step, "lr": sched.get_last_lr()[0]} | _step_metrics(out, dead)
            history.append(rec)
            bar.set_postfix(l0=f"{rec['l0']:.1f}", fvu=f"{rec['fvu']:.3f}", dead=f"{rec['dead_fraction']:.3f}")
            if wandb_run is not None:
                _log_wandb(wandb_run, rec, out, fire_counts, step, cfg)
        if step % cfg.checkpoint_every_steps == 0 and step < total:
            _checkpoint(out_dir, step, pos, scale, cfg, sae, opt, sched, method, since_fired, fire_counts, history)
    bar.close()
    seconds = time.time() - t0

    final = method.export(sae)
    final.fold_activation_scale(scale)
    final.cfg = final.cfg.model_copy(update={"metadata": {
        "training_tokens": step * cfg.batch_size_tokens, "corpus": cfg.corpus, "seed": cfg.seed, "method_options": dict(cfg.method_options),
        "activation_scale_folded": scale, "normalize_activations_in_training": cfg.normalize_activations,
        "skipped_steps": skipped, "train_config": cfg.model_dump(mode="json"), "saebench_version": _version(),
    }})
    out_dir.mkdir(parents=True, exist_ok=True)
    write_json(out_dir / "training_log.json", {"history": history, "seconds": seconds, "steps": step})
    final.save(out_dir, extra_files=["training_log.json"])
    if wandb_run is not None:
        wandb_run.finish()
    return TrainResult(final, out_dir, step, seconds, history)


def _step_metrics(out, dead: torch.Tensor) -> dict[str, float]:
    """The live metrics of one step, for the progress bar, history and wandb."""
    return {
        "l0": out.acts.l0().float().mean().item(),
        "fvu": out.losses["mse_loss"].item(),
        "dead_fraction": dead.float().mean().item(),
        "loss": out.loss.item(),
    } | {f"loss/{k}": v.item() for k, v in out.losses.items()} | out.metrics


def _check_resumable(cfg: TrainConfig, saved: dict[str, Any]) -> None:
    now = cfg.model_dump(mode="json")
    diff = [k for k in now if k not in _RESUME_FREE and now[k] != saved.get(k)]
    if diff:
        raise ConfigError(
            f"{cfg.out_dir} holds a checkpoint of a different run (fields differ: {', '.join(diff)}); "
            "use another out_dir, set resume=false to start over, or delete its checkpoints folder"
        )


def _checkpoint(out_dir, step, pos, scale, cfg, sae, opt, sched, method, since_fired, fire_counts, history) -> None:
    opt_t, opt_meta = optimizer_to_tensors(opt)
    tensors = {f"sae.{k}": v for k, v in sae.state_dict().items()} | opt_t | {f"method.{k}": v for k, v in method.state().items()}
    tensors |= {"since_fired": since_fired, "fire_counts": fire_counts, "rng": torch.get_rng_state()}
    meta = {"position": {"chunk": pos.chunk, "batch": pos.batch}, "scale": scale, "optimizer": opt_meta,
            "scheduler": sched.state_dict() | {"lr_lambdas": [None]}, "config": cfg.model_dump(mode="json"), "history": history}
    save_checkpoint(out_dir, step, tensors, meta)


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


def _finite_or_skip(t: torch.Tensor, cfg: TrainConfig, step: int, what: str, extra: dict | None = None) -> bool:
    if torch.isfinite(t).all():
        return True
    if cfg.on_nonfinite == "skip":
        return False
    _check_finite(t, cfg, step, what, extra)
    return False


def _init_wandb(cfg: TrainConfig):
    import wandb

    return wandb.init(project=cfg.wandb_project, config=cfg.model_dump(mode="json"), reinit=True)


def _log_wandb(run, rec: dict, out, fire_counts: torch.Tensor, step: int, cfg: TrainConfig) -> None:
    """SAELens-style keys: losses/*, metrics/*, sparsity/*, details/*."""
    import wandb

    log = {f"losses/{k}": float(v) for k, v in out.losses.items()} | {
        "losses/overall_loss": rec["loss"], "metrics/l0": rec["l0"], "metrics/explained_variance": 1 - rec["fvu"],
        "sparsity/dead_features": rec["dead_fraction"], "details/current_learning_rate": rec["lr"],
    }
    if step % (cfg.log_every_steps * 10) == 0:
        density = fire_counts.float() / max(step * cfg.batch_size_tokens, 1)
        log["plots/feature_density_line_chart"] = wandb.Histogram(torch.log10(density + 1e-10).cpu().numpy())
    run.log(log, step=step)


def _version() -> str:
    try:
        from importlib.metadata import version

        return version("saebench")
    except Exception:
        return "dev"


def load_training_log(sae_dir: str | Path) -> dict[str, Any]:
    return json.loads((Path(sae_dir) / "training_log.json").read_text())
