"""End-to-end SAEs (Braun et al., arXiv 2405.12241; ApolloResearch/e2e_sae): trained through the frozen model.

The SAE is a ReLU SAE (architecture ``relu``; ``activation="topk"`` makes it a TopK SAE with the same
losses, for comparisons at a fixed L0), c = ReLU(W_enc(x − b_dec) + b_enc), spliced into the
frozen model at the hook: the model runs once clean (no grad) and once with x̂ in place of x at every
non-special position, and the loss compares the two runs:

- ``e2e``:    L = 1.0·KL(p_clean ‖ p_spliced) + 1.5·mean_t ‖c_t‖₁ / d_in
- ``e2e_ds``: L = 0.5·KL + 1.5·mean_t ‖c_t‖₁ / d_in + (2.5 / n_ds)·Σ_h MSE(h_spliced, h_clean)

KL is per position, averaged over all positions of the batch's sequences, with the clean distribution as
the target (Apollo's code; its docstring has the direction backwards). The downstream MSE is the mean
over positions and dimensions, in the model's raw units, at the residual stream after every later block
except the model's last one, as in Apollo's e2e+ds configs (``later_resid_hooks``; ``downstream_hooks``
overrides). c is in the SAE's (scaled-input) units. With ``kl_coef = 0`` the
forward passes stop after the last downstream hook. The model's parameters are frozen on attach and
never receive gradient; backprop runs only from the logits down to the hook. At a residual-stream hook
of a model that supports it, the spliced forward resumes at the hook (only the later blocks run again;
``EndToEnd.resumed``), so a step costs one clean forward, half a forward and its backward at a middle
layer. From the second step on (``fast_path``) the clean pass is the bridge up to the hook plus the same
resumed blocks, and the KL is computed from the two final-normed residual streams chunk by chunk
(``kl_from_residuals``: the [tokens, d_vocab] logits, log-softmaxes and their gradients are never held
whole; the gradient is made in the forward); losses and gradients equal the plain path's.

Tokens, not activations: the method needs whole sequences. When the loop builds the source
(``train``/``train_many``/``saebench.api``/the CLI without ``source=``), ``make_source`` gives a
``TokenSequenceSource`` (whole sequences per batch: ``token_ids`` [n_seq, context]) and nothing is
harvested. With any other source (e.g. the default ``HookedSource`` when e2e is trained together with
activation methods, whose token ids are shuffled single tokens), the method ignores the batch and draws
``batch_size_tokens // context_size`` sequences per step itself, as a pure function of the step, from
``cfg.corpus`` tokenised with the model's tokenizer. The loop's ``mse_loss`` is reported detached (the
local reconstruction is a metric here, not a loss term).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from saebench.trainers.base import Method, Options, StepInput, StepOutput, register
from torch import Tensor

from saebench import sparse
from saebench.activations import ActivationSource, Batch, Position, token_mask
from saebench.site import Site
from saebench.config import ConfigError
from saebench.sae import SAE


class E2EOptions(Options):
    auxk_coef: float = Field(0.0, ge=0, description="Weight of AuxK on dead latents; 0 as the paper's ReLU SAEs (no dead-latent loss).")
    activation: Literal["relu", "topk"] = Field("relu", description=(
        "'relu': the paper's SAE, whose L0 is whatever the L1 term gives. 'topk': the same end-to-end losses on a TopK SAE "
        "(k from the config; set sparsity_coef = 0 for no L1), so e2e can be compared with the other methods at a fixed L0 "
        "(our extension, not in the paper)."))
    kl_coef: float = Field(1.0, ge=0, description="Weight of KL(p_clean ‖ p_spliced) per position.")
    sparsity_coef: float = Field(1.5, ge=0, description="Weight of mean ‖c‖₁ / d_in.")
    downstream_coef: float = Field(0.0, ge=0, description="Total weight of the downstream MSE terms, split evenly over the hooks.")
    downstream_hooks: list[str] | None = Field(None, description=(
        "Hooks for the downstream MSE (default, as Apollo's e2e+ds: resid_post of every later block except the model's last block)."))
    downstream_normalize: bool = Field(False, description=(
        "Divide each hook's downstream MSE by the clean activation's variance at that hook in the batch (an FVU, like the local "
        "loss), so that downstream_coef means the same on any model. Off (Apollo's): the MSE in the model's raw units, which on "
        "models with massive activations (SmolLM2: ~41,000 at the first step against a sparsity term of ~1-12 for λ 0.5-5) drowns the L1 term."))


class E2EDownstreamOptions(E2EOptions):
    kl_coef: float = Field(0.5, ge=0, description="Weight of KL(p_clean ‖ p_spliced) per position.")
    downstream_coef: float = Field(2.5, ge=0, description="Total weight of the downstream MSE terms, split evenly over the hooks.")


def _kl_dtype(dtype: torch.dtype) -> torch.dtype:
    """float32, or the logits' own dtype where it is wider (float64 stays float64)."""
    return torch.promote_types(dtype, torch.float32)


def kl_clean_to_spliced(logits_clean: Tensor, logits_new: Tensor) -> Tensor:
    """KL(p_clean ‖ p_new) per position, [...], in float32 at least: Σ_v p_clean (log p_clean − log p_new)."""
    dt = _kl_dtype(logits_new.dtype)
    lp = F.log_softmax(logits_clean.to(dt), -1)
    lq = F.log_softmax(logits_new.to(dt), -1)
    return F.kl_div(lq, lp, log_target=True, reduction="none").sum(-1)


def kl_chunk_rows(d_vocab: int, budget_bytes: int = 64 * 2**20) -> int:
    """Rows of [rows, d_vocab] float32 logits that fit ``budget_bytes`` (at least 1)."""
    return max(1, budget_bytes // (4 * d_vocab))


class _UnembedKL(torch.autograd.Function):
    """KL(p_clean ‖ p_new) per row from final-normed residuals, the [rows, d_vocab] logits made chunk by chunk.

    The gradient is computed in the forward, chunk by chunk (∂KL_i/∂logits_new_i = q_i − p_i, then times
    W_U): no [N, d_vocab] tensor is ever held, where the plain path keeps both logits, both
    log-softmaxes and the elementwise KL for the backward. KL_i depends on row i only, so the backward
    scales the saved rows by the incoming per-row gradient. The unembedding is frozen (no weight grad).
    """

    @staticmethod
    def forward(ctx, h_new: Tensor, h_clean: Tensor, weight: Tensor, bias: Tensor | None, chunk: int) -> Tensor:
        dt = _kl_dtype(weight.dtype)
        n = h_new.shape[0]
        kl = torch.empty(n, dtype=dt, device=h_new.device)
        need = ctx.needs_input_grad[0]
        grad = torch.empty_like(h_new) if need else None
        for s in range(0, n, chunk):
            e = min(n, s + chunk)
            lp = F.log_softmax(F.linear(h_clean[s:e], weight, bias).to(dt), -1)
            lq = F.log_softmax(F.linear(h_new[s:e], weight, bias).to(dt), -1)
            p = lp.exp()
            kl[s:e] = (p * (lp - lq)).sum(-1)
            if need:
                grad[s:e] = (lq.exp_() - p).to(weight.dtype) @ weight
        ctx.save_for_backward(grad if need else None)
        return kl

    @staticmethod
    def backward(ctx, g: Tensor):
        (grad,) = ctx.saved_tensors
        return (None if grad is None else grad * g[:, None].to(grad.dtype)), None, None, None, None


def kl_from_residuals(h_clean: Tensor, h_new: Tensor, weight: Tensor, bias: Tensor | None = None, chunk: int | None = None) -> Tensor:
    """``kl_clean_to_spliced(unembed(h_clean), unembed(h_new))`` per position, [...], without the full logits (``_UnembedKL``)."""
    shape = h_new.shape[:-1]
    d = h_new.shape[-1]
    rows = chunk or kl_chunk_rows(weight.shape[0])
    return _UnembedKL.apply(h_new.reshape(-1, d), h_clean.reshape(-1, d).detach(), weight, bias, rows).reshape(shape)


def later_resid_hooks(hook: str, n_layers: int) -> list[str]:
    """Apollo's downstream hooks: the output of every block after the hook, except the model's last block.

    ``blocks.l.hook_resid_post`` for every block from the first one after the hook (the hook's own block
    if the hook is inside it, e.g. ``hook_resid_pre``) up to, but not including, the final block
    ``n_layers - 1``. This is Braun et al.'s e2e+ds set: with the SAE at GPT-2's
    ``blocks.6.hook_resid_pre`` their ``gpt2_e2e_recon.yaml`` reads ``blocks.7..11.hook_resid_pre`` =
    the outputs of blocks 6..10, leaving out block 11's (the last block's, which only the final norm and
    the unembedding read, and whose fidelity the KL term already measures). Empty when the hook's
    only later block is the last one.
    """
    layer = Site(hook).layer or 0
    first = layer + 1 if hook.endswith("hook_resid_post") else layer
    if not hook.startswith("blocks."):
        first = 0  # embeddings
    return [f"blocks.{layer_}.hook_resid_post" for layer_ in range(first, n_layers - 1)]


@register
class EndToEnd(Method):
    """A ReLU SAE trained to preserve the model's output distribution (and downstream activations)."""

    name = "e2e"
    architecture = "relu"
    Options = E2EOptions
    needs_model = True
    # The step's fast path (from the second step on, where the spliced pass resumes): the clean pass runs the
    # bridge to the hook and the rest resumed, and the KL is computed from the final-normed residuals chunk by
    # chunk (``kl_from_residuals``), never holding [tokens, d_vocab] logits. False: the plain path throughout.
    fast_path: bool = True

    @classmethod
    def make_source(cls, cfg, model, *, hook_names: list[str], with_grads: bool = False, progress: bool = True) -> ActivationSource:
        """Whole token sequences of ``cfg.corpus`` (``TokenSequenceSource``), not harvested activations.

        The step runs the model itself, so the batches carry no activations (``batch_acts=False``) and
        nothing is harvested or cached. Several hooks at once, or several ranks, fall back to the
        default source, from which the step draws its own sequences (see ``sequences``).
        """
        from saebench import distributed, text

        if len(hook_names) != 1 or distributed.world_size() > 1 or getattr(model, "tokenizer", None) is None:
            return super().make_source(cfg, model, hook_names=hook_names, with_grads=with_grads, progress=progress)
        tokens = text.load_tokens(cfg.corpus, model.tokenizer, cfg.context_size, int(cfg.training_tokens * 1.05) + cfg.context_size,
                                  split="train", prepend_bos=cfg.prepend_bos)
        special = text.special_ids(model.tokenizer) if cfg.exclude_special_tokens else None
        return TokenSequenceSource(model, hook_names[0], tokens, special_ids=special, shuffle_buffer_tokens=cfg.shuffle_buffer_tokens,
                                   model_batch_size=cfg.model_batch_size, batch_acts=False)

    def __init__(self, cfg):
        super().__init__(cfg)
        self.architecture = self.opts.activation  # an instance's choice: "relu" (the paper) or "topk"

    def attach_model(self, model) -> None:
        """Freeze ``model`` and resolve the hook, downstream hooks and special tokens."""
        if model is None:
            raise ConfigError(f"method {self.name!r} runs the model itself; train() was given none")
        for p in model.parameters():
            p.requires_grad_(False)
        model.eval()
        self.model = model
        self.site = Site.parse(self.cfg.hook_name)
        self.hook, self.head = self.site
        n_layers = model.cfg.n_layers
        ds = self.opts.downstream_hooks
        self.downstream = [] if not self.opts.downstream_coef else (list(ds) if ds is not None else later_resid_hooks(self.hook, n_layers))
        if self.opts.downstream_coef and not self.downstream:
            raise ConfigError(f"method {self.name!r}: no block follows hook {self.hook!r} other than the model's last one (block "
                              f"{n_layers - 1}), whose output Apollo's default leaves out, so there is no downstream activation to "
                              f"match; set downstream_hooks (e.g. ['blocks.{n_layers - 1}.hook_resid_post']) or use an earlier hook")
        for h in self.downstream:
            if (Site(h).layer or 0) < (self.site.layer or 0):
                raise ConfigError(f"downstream hook {h!r} comes before the SAE's hook {self.hook!r}")
        # Stop the forward passes after the last hook the loss reads when the logits are not needed.
        last = max((Site(h).layer or 0 for h in self.downstream), default=n_layers) + 1
        self.stop_at_layer = None if self.opts.kl_coef or last >= n_layers else last
        tok = getattr(model, "tokenizer", None)
        self.special_ids = None
        if self.cfg.exclude_special_tokens and tok is not None:
            from saebench import text

            self.special_ids = text.special_ids(tok)
        self._tokens: Tensor | None = None
        self._perm: tuple[int, Tensor | None] = (-1, None)
        self._resume = None  # the resumed spliced forward, False where it does not apply (decided on the first step)
        self._fast_parts = None  # (resumed pass to the final norm, unembedding) of the fast path, built on first use

    # ----- where the token sequences come from --------------------------------------------------
    def sequences(self, inp: StepInput) -> Tensor:
        """This step's token sequences [n_seq, context]: the batch's, or drawn from cfg.corpus."""
        if inp.token_ids is not None and inp.token_ids.dim() == 2:
            return inp.token_ids
        if self._tokens is None:
            from saebench import text

            if getattr(self.model, "tokenizer", None) is None:
                raise ConfigError(f"method {self.name!r} needs whole token sequences: the batches carry single tokens and the model has "
                                  "no tokenizer to read cfg.corpus with; train with source=TokenSequenceSource(model, hook, tokens)")
            n_tok = int(self.cfg.training_tokens * 1.05) + self.cfg.context_size
            self._tokens = text.load_tokens(self.cfg.corpus, self.model.tokenizer, self.cfg.context_size, n_tok, split="train",
                                            prepend_bos=self.cfg.prepend_bos)
        n_rows = self._tokens.shape[0]
        per_step = max(1, self.cfg.batch_size_tokens // self.cfg.context_size)
        seed = getattr(self.cfg, "effective_data_seed", self.cfg.seed)
        rows = []
        for j in range(inp.step * per_step, (inp.step + 1) * per_step):
            epoch, pos = divmod(j, n_rows)
            if self._perm[0] != epoch:  # one shuffle of the sequences per epoch
                self._perm = (epoch, torch.randperm(n_rows, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch)))
            rows.append(int(self._perm[1][pos]))
        return self._tokens[rows]

    # ----- the step -----------------------------------------------------------------------------
    def select(self, pre: Tensor, batch: StepInput, sae: SAE | None = None) -> tuple[Tensor, Tensor | None]:
        if self.architecture == "topk":
            return sparse.topk_select(pre, self.cfg.k), None
        return sparse.mask_to_indices(pre > 0, pre, dense_ok=True)

    def _site(self, act: Tensor) -> Tensor:
        """The SAE's view [b, pos, d] of a hook activation (a view, so writes go through)."""
        return self.site.flatten(act)

    def run(self, tokens: Tensor, splice=None) -> tuple[Tensor, dict[str, Tensor], Tensor | None]:
        """One forward: (output, downstream activations, the hook's activation [b, pos, d]).

        ``splice`` writes the replacement into a copy of the hook's [b, pos, d] activation; None runs clean.
        """
        seen: dict[str, Tensor] = {}

        def at_hook(act, hook):
            seen["x"] = self._site(act)
            if splice is None:
                return act
            new = act.clone()
            splice(self._site(new))
            return new

        def grab(name):
            def fn(act, hook):
                seen[name] = act

            return fn

        hooks = [(self.hook, at_hook)] + [(h, grab(h)) for h in self.downstream]
        out = self.model.run_with_hooks(tokens, fwd_hooks=hooks, stop_at_layer=self.stop_at_layer)
        x = seen.pop("x")
        return out, seen, x

    def resumed(self, x_clean: Tensor, logits_clean: Tensor | None):
        """The spliced forward resumed at the hook (``saebench.models.resume_forward``), or None.

        It runs only the blocks after the hook: the blocks before it would compute the clean
        activations again. Used at a residual-stream hook of a model that resumes, when the loss reads
        the logits and every downstream hook is a later block's ``hook_resid_post``; checked once
        against the clean forward's logits (``resume_matches``). Otherwise the whole model runs.
        """
        if self._resume is None:
            from saebench.models import resume_forward, resume_matches

            # -1: a downstream hook that is not a block's output, which the resumed pass cannot give.
            layers = [int(h.split(".")[1]) if h.endswith("hook_resid_post") and h.startswith("blocks.") else -1 for h in self.downstream]
            run = resume_forward(self.model, self.hook, record=layers) if self.head is None else None
            # With stop_at_layer the clean "logits" are a residual stream: nothing to check the resumed pass against.
            ok = run is not None and self.stop_at_layer is None and resume_matches(self.model, self.hook, x_clean, logits_clean)
            self._resume = run if ok else False
        return self._resume or None

    def _fast(self):
        """(resumed pass to the final-normed residual, unembedding) for the fast path, or None where it does not apply."""
        if not (self.fast_path and self._resume and self.opts.kl_coef and self.stop_at_layer is None):
            return None
        if self._fast_parts is None:
            from saebench.models import resume_forward, unembedding

            layers = [int(h.split(".")[1]) for h in self.downstream]  # all blocks' resid_post: self._resume says so
            self._fast_parts = (resume_forward(self.model, self.hook, record=layers, head=False), unembedding(self.model))
        return self._fast_parts

    def _prefix(self, tokens: Tensor) -> Tensor:
        """The clean hook activation [b, pos, d], running the model only up to the hook's block."""
        seen: dict[str, Tensor] = {}

        def grab(act, hook):
            seen["x"] = self._site(act)

        self.model.run_with_hooks(tokens, fwd_hooks=[(self.hook, grab)], stop_at_layer=self.site.stop_layer)
        return seen["x"]

    def step(self, sae: SAE, inp: StepInput) -> StepOutput:
        tokens = self.sequences(inp).to(self.cfg.device)
        keep = token_mask(tokens, self.special_ids)
        fast = self._fast()
        if fast is not None:
            return self._fast_step(sae, inp, tokens, keep, *fast)
        with torch.no_grad():
            logits_clean, ds_clean, x_clean = self.run(tokens)
        x = x_clean[keep].to(sae.dtype) * inp.scale
        local = super().step(sae, StepInput(x=x, dead_mask=inp.dead_mask, step=inp.step, scale=inp.scale))

        def splice(site: Tensor) -> None:
            site[keep] = (local.x_hat / inp.scale).to(site.dtype)

        run = self.resumed(x_clean, logits_clean)
        if run is not None:
            h = x_clean.clone()
            splice(h)
            logits_new, ds_new = run(h)
        else:
            logits_new, ds_new, _ = self.run(tokens, splice)
        losses = {"mse_loss": local.losses["mse_loss"].detach()}
        if "auxiliary_reconstruction_loss" in local.losses:
            losses["auxiliary_reconstruction_loss"] = local.losses["auxiliary_reconstruction_loss"]
        if self.opts.kl_coef:
            losses["kl_loss"] = self.opts.kl_coef * kl_clean_to_spliced(logits_clean, logits_new).mean()
        losses["sparsity_loss"] = self.opts.sparsity_coef * local.acts.values.abs().sum(-1).mean() / sae.d_in
        if self.downstream:
            losses["downstream_loss"] = self.downstream_loss(ds_new, ds_clean)
        return StepOutput(losses, local.acts, local.x_hat)

    def downstream_loss(self, ds_new: dict[str, Tensor], ds_clean: dict[str, Tensor]) -> Tensor:
        """(downstream_coef / n_hooks) · Σ_h MSE(h_spliced, h_clean), each MSE over positions and dimensions; with
        ``downstream_normalize`` each divided by the clean activation's variance at that hook (about its batch mean)."""
        w = self.opts.downstream_coef / len(self.downstream)
        total = 0.0
        for h in self.downstream:
            new, clean = ds_new[h].float(), ds_clean[h].float()
            term = F.mse_loss(new, clean)
            if self.opts.downstream_normalize:
                flat = clean.reshape(-1, clean.shape[-1])
                term = term / (flat - flat.mean(0)).pow(2).mean().clamp_min(1e-12)
            total = total + term
        return w * total

    def _fast_step(self, sae: SAE, inp: StepInput, tokens: Tensor, keep: Tensor, run, unembed) -> StepOutput:
        """The step of ``step`` with the clean pass as prefix + resumed rest and the chunked KL (same losses and gradients)."""
        with torch.no_grad():
            x_clean = self._prefix(tokens)
            hid_clean, ds_clean = run(x_clean)
        x = x_clean[keep].to(sae.dtype) * inp.scale
        local = super().step(sae, StepInput(x=x, dead_mask=inp.dead_mask, step=inp.step, scale=inp.scale))
        h = x_clean.clone()
        h[keep] = (local.x_hat / inp.scale).to(h.dtype)
        hid_new, ds_new = run(h)
        losses = {"mse_loss": local.losses["mse_loss"].detach()}
        if "auxiliary_reconstruction_loss" in local.losses:
            losses["auxiliary_reconstruction_loss"] = local.losses["auxiliary_reconstruction_loss"]
        losses["kl_loss"] = self.opts.kl_coef * kl_from_residuals(hid_clean, hid_new, *unembed).mean()
        losses["sparsity_loss"] = self.opts.sparsity_coef * local.acts.values.abs().sum(-1).mean() / sae.d_in
        if self.downstream:
            losses["downstream_loss"] = self.downstream_loss(ds_new, ds_clean)
        return StepOutput(losses, local.acts, local.x_hat)


@register
class EndToEndDownstream(EndToEnd):
    """e2e + downstream reconstruction (Braun et al.'s e2e+ds)."""

    name = "e2e_ds"
    Options = E2EDownstreamOptions


class TokenSequenceSource(ActivationSource):
    """Whole token sequences with their activations at one hook, for methods that run the model (e2e).

    A chunk is a block of sequences; ``batches`` shuffles *sequences* within a chunk (seeded by
    (seed, chunk), so a stream is a pure function of its position) and yields ``Batch`` objects whose
    ``token_ids`` are [n_seq, context] and whose activations are those sequences' non-special tokens.

    ``batch_acts=False`` is for methods that run the model on the tokens themselves (e2e): the batches
    then carry an all-zero placeholder of the right shape [n_non_special, d] (a broadcast view, no
    memory) instead of activations, saving a forward to the hook per batch. ``chunk`` (the loop's
    scaling and initialisation sample) always has the real activations.
    """

    def __init__(self, model, hook_name: str, tokens: Tensor, *, special_ids: Tensor | None = None,
                 shuffle_buffer_tokens: int = 65_536, model_batch_size: int = 16, batch_acts: bool = True):
        if tokens.dim() != 2 or tokens.shape[0] == 0:
            raise ValueError(f"tokens must be a non-empty [n_seq, context] tensor, got {tuple(tokens.shape)}")
        self.model, self.tokens, self.special_ids = model, tokens, special_ids
        self.site = Site.parse(hook_name)
        self.hook, self.head = self.site
        self.hook_names = [hook_name]
        self.rows_per_chunk = max(1, shuffle_buffer_tokens // tokens.shape[1])
        self.model_batch_size = model_batch_size
        self.batch_acts = batch_acts
        self.d_in = {hook_name: self._acts(tokens[:1]).shape[-1]}

    @property
    def n_chunks(self) -> int:
        return math.ceil(self.tokens.shape[0] / self.rows_per_chunk)

    def _acts(self, rows: Tensor) -> Tensor:
        """Activations [rows, context, d] at the hook, running the model only up to the hook's block."""
        out = []
        device = next(iter(self.model.parameters())).device  # the tokens follow the model (a CUDA model gets CUDA ids)
        for s in range(0, rows.shape[0], self.model_batch_size):
            seen = {}

            def grab(act, hook):
                seen["x"] = act

            self.model.run_with_hooks(rows[s : s + self.model_batch_size].to(device), fwd_hooks=[(self.hook, grab)],
                                      stop_at_layer=self.site.stop_layer)
            out.append(self.site.flatten(seen["x"]).detach().float().cpu())
        return torch.cat(out)

    def _rows(self, i: int) -> tuple[Tensor, Tensor, Tensor]:
        rows = self.tokens[i * self.rows_per_chunk : (i + 1) * self.rows_per_chunk]
        with torch.no_grad():
            acts = self._acts(rows)
        return rows, acts, token_mask(rows, self.special_ids)

    def chunk(self, i: int) -> Batch:
        rows, acts, keep = self._rows(i)
        return Batch({self.hook_names[0]: acts[keep]}, rows)

    def batches(self, batch_size: int, seed: int = 0, start: Position = Position()) -> Iterator[tuple[Batch, Position]]:
        g, first = start.chunk, start.batch
        hook, d = self.hook_names[0], self.d_in[self.hook_names[0]]
        while True:
            i = self.chunk_order(g // self.n_chunks, seed)[g % self.n_chunks]
            if self.batch_acts:
                rows, acts, keep = self._rows(i)
            else:
                rows = self.tokens[i * self.rows_per_chunk : (i + 1) * self.rows_per_chunk]
                keep = token_mask(rows, self.special_ids)
            perm = torch.randperm(rows.shape[0], generator=torch.Generator().manual_seed(seed * 1_000_003 + g))
            per = max(1, batch_size // rows.shape[1])
            for b in range(first, rows.shape[0] // per):
                sel = perm[b * per : (b + 1) * per]
                x = acts[sel][keep[sel]] if self.batch_acts else torch.zeros(1, d).expand(int(keep[sel].sum()), d)
                yield Batch({hook: x}, rows[sel]), Position(g, b + 1)
            g, first = g + 1, 0
