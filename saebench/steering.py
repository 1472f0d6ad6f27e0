"""Steering a model with SAE decoder directions: vectors, position-scoped hooks, seeded generation.

The intervention (AxBench / SAELens / Neuronpedia "additive" steering) adds
``strength · max_act · W_dec[latent]`` to the activation at the SAE's hook, at the positions in a
*scope*:

- ``"prompt"``: positions ``p < prompt_len`` (the prompt tokens, BOS included);
- ``"generated"``: positions ``p ≥ prompt_len`` (the tokens the model has generated). The first new
  token is predicted at position ``prompt_len − 1``, so under this scope it comes from the unsteered
  distribution; steering starts to act from the second new token on;
- ``"all"``: every position.

Generation uses our own sampling loop (not ``TransformerBridge.generate``) so that it is exactly
reproducible: one Gumbel noise vector per step is drawn from a CPU ``torch.Generator`` seeded with
``seed`` and the token is ``argmax(logits / T + noise)`` (Gumbel-max sampling, equivalent to sampling
from ``softmax(logits / T)``). The noise does not depend on the logits, so the same seed gives the
same tokens with and without the KV cache, and a steered and an unsteered run with the same seed
share their noise (matched samples, as in Neuronpedia's DEFAULT vs STEERED).

The functions taking an ``sae`` read only ``sae.cfg.hook_name``, ``sae.cfg.hook_head_index``,
``sae.cfg.d_sae`` and ``sae.W_dec`` (plus ``encode_sparse`` in :func:`max_activation`), so a light
view with another hook name works too (the app uses one to steer at a different layer).

Thread safety: TransformerLens hooks live on the model's modules, so a hook added by one thread acts
on every forward pass another thread runs at the same time (a steering vector leaks into an
unsteered run; a ``stop_at_layer`` hook aborts someone else's generation). Every function here that
runs the model, and :func:`saebench.dashboards.prompt_activations`, holds :func:`model_lock` while
it does, so one model can be shared by threads (the browser's sessions share one cached model).
"""

from __future__ import annotations

import math
import threading
import time
import weakref
from collections.abc import Callable, Sequence
from typing import Literal, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor
from tqdm.auto import tqdm

from saebench.compat import cached_forward, kv_cache_ok
from saebench.sae import refuse_transcoders
from saebench.site import Site

Scope = Literal["prompt", "generated", "all"]
SCOPES: tuple[str, ...] = ("prompt", "generated", "all")

__all__ = [
    "Scope",
    "GenerationResult",
    "SteeringHook",
    "steering_vector",
    "steering_hook",
    "generate",
    "generate_tokens",
    "SteeringRun",
    "steer",
    "steered_pair",
    "next_token_logprob_diff",
    "rank_plausible_changes",
    "max_activation",
    "sae_site",
    "site_activations",
    "model_lock",
]


class GenerationResult(NamedTuple):
    """One generated sequence."""

    tokens: Tensor  # [1, n] prompt + new tokens
    text: str  # the whole sequence decoded (a leading BOS left out)
    new_text: str  # the new tokens decoded
    prompt_len: int  # number of prompt tokens (BOS included)


# --------------------------------------------------------------------------- sharing a model between threads

_MODEL_LOCKS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_MODEL_LOCKS_GUARD = threading.Lock()
_FALLBACK_LOCK = threading.RLock()  # for models that cannot be weakly referenced


def model_lock(model) -> threading.RLock:
    """The re-entrant lock that serialises runs of ``model`` (one per model object).

    Hold it around any forward pass, hooked or not, of a model other threads may run: hooks are
    attached to the model itself, so two overlapping runs would see each other's hooks.
    """
    with _MODEL_LOCKS_GUARD:
        try:
            lock = _MODEL_LOCKS.get(model)
            if lock is None:
                lock = _MODEL_LOCKS[model] = threading.RLock()
        except TypeError:
            lock = _FALLBACK_LOCK
        return lock


# --------------------------------------------------------------------------- sites




def sae_site(sae) -> Site:
    """The :class:`~saebench.site.Site` of an SAE (unpacks as ``hook, head``): ``'blocks.3.attn.hook_z:5'`` or
    ``cfg.hook_head_index`` give a head."""
    return Site.of_sae(sae)


@torch.no_grad()
def site_activations(model, hook_name: str, head: int | None, tokens: Tensor, batch_size: int = 16) -> Tensor:
    """Activations [n_seq, pos, d] at ``hook_name`` (one head of ``hook_z`` if ``head``) for ``tokens``."""
    out = []
    site = Site(hook_name, head)
    device = model.cfg.device
    for s in range(0, tokens.shape[0], batch_size):
        with model_lock(model):
            _, cache = model.run_with_cache(tokens[s : s + batch_size].to(device), names_filter=lambda n: n == hook_name, stop_at_layer=site.stop_layer)
        out.append(site.flatten(cache[hook_name]).float())
    return torch.cat(out)


# --------------------------------------------------------------------------- vectors and hooks


def steering_vector(sae, latent: int, strength: float, max_act: float) -> Tensor:
    """``strength · max_act · W_dec[latent]`` as a detached [d_in] tensor (negative strengths allowed)."""
    if not 0 <= latent < sae.cfg.d_sae:
        raise IndexError(f"latent {latent} is out of range for an SAE with d_sae={sae.cfg.d_sae}")
    if not math.isfinite(strength * max_act):
        raise ValueError(f"strength·max_act must be finite, got {strength}·{max_act}")
    return (float(strength) * float(max_act)) * sae.W_dec[latent].detach().clone()


class SteeringHook:
    """A TransformerLens forward hook adding ``vector`` at the absolute positions in ``scope``.

    ``vector`` is [d] (same for every row) or [batch, d] (one vector per row, for batched sweeps);
    on a ``hook_z`` site [b, pos, heads, d_head] it is added to ``head`` ([d_head]) or, with no head,
    to all heads ([heads·d_head]).

    The absolute position of the first activation in a call is ``position_offset`` when set (our
    sampling loop sets it before every forward). Left as None, it is inferred: a call with more than
    one position, or the first call, starts at 0 (a full pass); a one-position call after that
    continues where the previous call ended (a KV-cache decode step). Call ``reset()`` before
    reusing the hook for another generation.
    """

    def __init__(self, vector: Tensor, scope: Scope, prompt_len: int, head: int | None = None):
        if scope not in SCOPES:
            raise ValueError(f"scope must be one of {SCOPES}, not {scope!r}")
        if prompt_len < 0:
            raise ValueError(f"prompt_len must be >= 0, got {prompt_len}")
        self.vector = vector.detach()
        self.scope = scope
        self.prompt_len = int(prompt_len)
        self.head = head
        self.position_offset: int | None = None
        self._seen = 0

    def reset(self) -> None:
        """Forget the positions seen so far (start of a new sequence)."""
        self._seen = 0
        self.position_offset = None

    def in_scope(self, positions: Tensor) -> Tensor:
        """Bool mask over absolute ``positions``."""
        if self.scope == "all":
            return torch.ones_like(positions, dtype=torch.bool)
        if self.scope == "prompt":
            return positions < self.prompt_len
        return positions >= self.prompt_len

    def __call__(self, act: Tensor, hook=None) -> Tensor:
        n = act.shape[1]
        if self.position_offset is not None:
            offset = self.position_offset
        else:
            offset = self._seen if (n == 1 and self._seen > 0) else 0
        self._seen = offset + n
        mask = self.in_scope(torch.arange(offset, offset + n, device=act.device))
        if not bool(mask.any()):
            return act
        vec = self.vector.to(device=act.device, dtype=act.dtype)
        if vec.dim() == 1:
            vec = vec.unsqueeze(0)  # [1, d]
        if vec.shape[0] not in (1, act.shape[0]):
            raise ValueError(f"steering vectors for {vec.shape[0]} rows, but the batch has {act.shape[0]}")
        if act.dim() == 4:
            if self.head is not None:
                delta = torch.zeros_like(act)
                delta[:, :, self.head] = vec[:, None, :].expand(act.shape[0], n, -1)
                return act + delta * mask[None, :, None, None]
            vec = vec.view(vec.shape[0], act.shape[2], act.shape[3])
            return act + vec[:, None] * mask[None, :, None, None]
        if vec.shape[-1] != act.shape[-1]:
            raise ValueError(f"steering vector has width {vec.shape[-1]}, the hook's activations {act.shape[-1]}")
        return act + vec[:, None, :] * mask[None, :, None]


def steering_hook(vector: Tensor, scope: Scope, prompt_len: int, head: int | None = None) -> SteeringHook:
    """A TL hook fn adding ``vector`` at the positions in ``scope`` (see :class:`SteeringHook`).

    Works in full forwards and in KV-cache decode steps (one new position per call): the absolute
    position of a decode step is tracked by the hook.
    """
    return SteeringHook(vector, scope, prompt_len, head)


# --------------------------------------------------------------------------- sampling


def _prompt_tokens(model, prompt: str | Tensor, prepend_bos: bool = True) -> Tensor:
    if isinstance(prompt, str):
        toks = model.to_tokens(prompt, prepend_bos=prepend_bos)
    else:
        toks = prompt if prompt.dim() == 2 else prompt.unsqueeze(0)
    if toks.shape[1] == 0:
        raise ValueError("the prompt is empty")
    return toks.to(model.cfg.device).long()


def _gumbel(gen: torch.Generator, vocab: int) -> Tensor:
    u = torch.rand(vocab, generator=gen, dtype=torch.float64).clamp_(1e-12, 1 - 1e-12)
    return -torch.log(-torch.log(u))


def _pick(logits: Tensor, noise: Tensor, temperature: float, top_p: float | None) -> Tensor:
    """Next tokens [B] from last-position logits [B, V] and one shared noise vector [V]."""
    logits = logits.float()
    if temperature <= 0:
        return logits.argmax(-1)
    scaled = logits / temperature
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = scaled.sort(-1, descending=True)
        probs = sorted_logits.softmax(-1)
        # Keep the smallest prefix whose mass reaches top_p (the top token always stays).
        drop_sorted = (probs.cumsum(-1) - probs) >= top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        scaled = scaled.masked_fill(drop, -math.inf)
    return (scaled + noise.to(scaled.device, scaled.dtype)).argmax(-1)


@torch.no_grad()
def generate_tokens(
    model,
    tokens: Tensor,
    max_new_tokens: int,
    *,
    hooks: Sequence[tuple[str, SteeringHook]] = (),
    seed: int = 0,
    temperature: float = 1.0,
    top_p: float | None = None,
    use_kv_cache: bool = True,
    stop_at_eos: bool = True,
    progress: bool = False,
    on_token: Callable[[int, Tensor, Tensor], None] | None = None,
    fast_decode: bool = True,
) -> Tensor:
    """The sampling loop: ``tokens`` [B, P] (one prompt, or B copies of it) → [B, P + T].

    Every row sees the same noise. Rows that emitted EOS are padded with EOS; the loop stops once
    every row has (``stop_at_eos``) or after ``max_new_tokens``.

    ``on_token(step, new_tokens, logits)``, if given, is called after every sampled step with the
    step index (0 for the first new token), the new tokens [B] and the last-position logits [B, V]
    they were drawn from (step 0's are the logits after the prompt). It streams text to a UI.

    ``fast_decode``: with the KV cache and every hook a :class:`SteeringHook` at a
    ``blocks.L.hook_resid_pre/post`` site, run the plain Hugging Face model with one torch hook
    instead of the bridge (:mod:`saebench.fastgen`; verified once per model against the bridge path,
    which is used whenever that check fails or the fast path does not apply). False: always the bridge.
    """
    if max_new_tokens < 0:
        raise ValueError("max_new_tokens must be >= 0")
    if top_p is not None and not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    eos = getattr(model.tokenizer, "eos_token_id", None) if stop_at_eos else None
    with model_lock(model):
        # --- fast decoding (saebench.fastgen): the plain HF model + one torch hook, when its canary passed;
        # it checks its own KV cache against the bridge's full forward, so the bridge's cache is not needed
        fast = None
        if fast_decode and use_kv_cache and all(isinstance(h, SteeringHook) for _, h in hooks):
            from saebench.fastgen import fast_decoder

            fast = fast_decoder(model, [name for name, _ in hooks])
        # Checked once per model, before any hook is attached; a KV cache that disagrees with the full
        # forward (a library regression) is not used: slower, never silently wrong.
        use_kv_cache = use_kv_cache and (fast is not None or kv_cache_ok(model))
    gen = torch.Generator().manual_seed(int(seed))
    vocab = None
    done = torch.zeros(tokens.shape[0], dtype=torch.bool, device=tokens.device)
    for _, h in hooks:
        h.reset()

    def forward(inp: Tensor, offset: int, past):
        for _, h in hooks:
            h.position_offset = offset
        if fast is not None:
            return fast.step(inp, past)
        if use_kv_cache:
            return _call_last(model, inp, call=lambda i, **kw: cached_forward(model, i, past, **kw))
        return _call_last(model, inp), None

    with model_lock(model):
        with (fast.attached(model, hooks) if fast is not None else model.hooks(fwd_hooks=list(hooks))):
            logits, past = forward(tokens, 0, None)
            for t in tqdm(range(max_new_tokens), desc="generate", disable=not progress, leave=False):
                last = logits[:, -1]
                vocab = vocab or last.shape[-1]
                nxt = _pick(last, _gumbel(gen, vocab), temperature, top_p)
                if eos is not None:
                    nxt = torch.where(done, torch.full_like(nxt, eos), nxt)
                    done |= nxt == eos
                tokens = torch.cat([tokens, nxt[:, None]], dim=1)
                if on_token is not None:
                    on_token(t, nxt, last)
                if t == max_new_tokens - 1 or bool(done.all()):
                    break
                if use_kv_cache:
                    logits, past = forward(nxt[:, None], tokens.shape[1] - 1, past)
                else:
                    logits, _ = forward(tokens, 0, None)
        for _, h in hooks:
            h.position_offset = None
    return tokens


def _call_last(model, inp: Tensor, call=None, **kwargs):
    """``call(inp, **kwargs)`` (default ``model``) computing the logits of the last position only where HF allows it."""
    call = model if call is None else call
    if not getattr(model, "_saebench_no_logits_to_keep", False):
        try:
            return call(inp, logits_to_keep=1, **kwargs)
        except TypeError:
            model._saebench_no_logits_to_keep = True
    return call(inp, **kwargs)


def _decode(model, toks: Tensor) -> str:
    return model.tokenizer.decode(toks.tolist())


def _result(model, tokens: Tensor, prompt_len: int) -> GenerationResult:
    row = tokens[0]
    bos = getattr(model.tokenizer, "bos_token_id", None)
    start = 1 if bos is not None and row.numel() and int(row[0]) == bos else 0
    return GenerationResult(tokens.cpu(), _decode(model, row[start:]), _decode(model, row[prompt_len:]), prompt_len)


def _hooks_for(vector: Tensor | None, hook_name: str | None, scope: Scope, prompt_len: int, head: int | None):
    if vector is None:
        return []
    if not hook_name:
        raise ValueError("a steering vector needs hook_name (where to add it)")
    if ":" in hook_name:
        hook_name, head = Site.parse(hook_name)
    return [(hook_name, SteeringHook(vector, scope, prompt_len, head))]


def generate(
    model,
    prompt: str | Tensor,
    max_new_tokens: int = 30,
    *,
    vector: Tensor | None = None,
    hook_name: str | None = None,
    scope: Scope = "all",
    seed: int = 0,
    temperature: float = 1.0,
    top_p: float | None = None,
    use_kv_cache: bool = True,
    head: int | None = None,
    stop_at_eos: bool = True,
    prepend_bos: bool = True,
    fast_decode: bool = True,
) -> GenerationResult:
    """Sample a continuation of ``prompt``, optionally adding ``vector`` at ``hook_name`` over ``scope``.

    Seeded and exact: the same arguments give the same tokens with or without the KV cache.
    ``temperature=0`` is greedy. ``prompt`` is text (BOS prepended unless ``prepend_bos=False``) or
    token ids [n] / [1, n]. ``hook_name`` may name a head as ``'blocks.L.attn.hook_z:H'``.
    ``fast_decode``: see :func:`generate_tokens`.
    """
    toks = _prompt_tokens(model, prompt, prepend_bos)
    if toks.shape[0] != 1:
        raise ValueError(f"generate takes one prompt, got a batch of {toks.shape[0]}")
    plen = toks.shape[1]
    hooks = _hooks_for(vector, hook_name, scope, plen, head)
    out = generate_tokens(model, toks, max_new_tokens, hooks=hooks, seed=seed, temperature=temperature, top_p=top_p,
                          use_kv_cache=use_kv_cache, stop_at_eos=stop_at_eos, fast_decode=fast_decode)
    return _result(model, out, plen)


class SteeringRun(NamedTuple):
    """What :func:`steer` returns: both generations, the next-token log-prob changes, the time taken."""

    default: GenerationResult
    steered: GenerationResult
    logprob_diff: list[tuple[str, float]]  # as next_token_logprob_diff: top_n rises, then top_n falls
    seconds: float  # wall time of the generation (model already loaded)


def _row_result(model, tokens: Tensor, row: int, prompt_len: int, eos: int | None) -> GenerationResult:
    """Row ``row`` of a batched generation, cut after its first EOS (as a one-row run would stop)."""
    seq = tokens[row]
    if eos is not None:
        hits = (seq[prompt_len:] == eos).nonzero()
        if len(hits):
            seq = seq[: prompt_len + int(hits[0]) + 1]
    return _result(model, seq[None], prompt_len)


def rank_plausible_changes(base: Tensor, steered: Tensor, top_n: int = 10, top_k: int = 50, top_p: float = 0.95) -> list[tuple[int, float]]:
    """Rank next-token log-prob changes among the tokens plausible under EITHER distribution.

    ``base`` and ``steered`` are log-probabilities over the vocabulary. The candidates are the union,
    over both runs, of the ``top_k`` most likely tokens cut to the nucleus of mass ``top_p`` (at least
    one token each), so junk subwords whose tiny probabilities move a lot never dominate. Returns
    ``top_n`` rises (largest first) then ``top_n`` falls (most negative first) as (token id, change);
    fewer when there are fewer candidates.
    """
    cand: set[int] = set()
    for lp in (base, steered):
        v, i = lp.float().topk(min(top_k, lp.numel()))
        cum = v.exp().cumsum(0)
        n = int((cum < top_p).sum()) + 1
        cand.update(i[:n].tolist())
    ids = torch.tensor(sorted(cand))
    diff = (steered.float() - base.float())[ids]
    order = torch.argsort(diff, descending=True)
    n = min(top_n, len(ids))
    rises = [(int(ids[j]), float(diff[j])) for j in order[:n]]
    falls = [(int(ids[j]), float(diff[j])) for j in order.flip(0)[:n]]
    return rises + falls


def _logprob_diff(model, base_logits: Tensor, steered_logits: Tensor, top_n: int, plausible: bool = True) -> list[tuple[str, float]]:
    """``top_n`` rises then ``top_n`` falls of log p_steered − log p_default, as (token string, change).

    ``plausible``: rank only tokens plausible under either run (:func:`rank_plausible_changes`);
    otherwise the whole vocabulary, where junk subwords with tiny probabilities often move most.
    """
    base, steered = F.log_softmax(base_logits.float(), -1), F.log_softmax(steered_logits.float(), -1)
    tok = model.tokenizer
    if plausible:
        return [(tok.decode([t]), v) for t, v in rank_plausible_changes(base, steered, top_n)]
    diff = steered - base
    n = min(top_n, diff.numel())
    up = diff.topk(n)
    down = (-diff).topk(n)
    rises = [(tok.decode([int(i)]), float(v)) for v, i in zip(up.values, up.indices)]
    falls = [(tok.decode([int(i)]), -float(v)) for v, i in zip(down.values, down.indices)]
    return rises + falls


@torch.no_grad()
def steer(
    model,
    sae,
    prompt: str | Tensor,
    latent: int,
    strength: float,
    max_act: float,
    scope: Scope = "all",
    *,
    max_new_tokens: int = 30,
    seed: int = 0,
    temperature: float = 1.0,
    top_p: float | None = None,
    use_kv_cache: bool = True,
    stop_at_eos: bool = True,
    prepend_bos: bool = True,
    top_n: int = 10,
    plausible: bool = True,
    on_text: Callable[[str, str], None] | None = None,
    fast_decode: bool = True,
) -> SteeringRun:
    """Default and steered continuations of ``prompt`` in **one batched run** of two rows.

    Row 0 adds nothing, row 1 adds ``strength · max_act · W_dec[latent]`` over ``scope``; both rows
    see the same sampling noise (same seed), so this is :func:`generate` run twice, at the cost of
    one run (a decode step on CPU is bound by reading the weights, which both rows share). The
    next-token log-prob changes come from the same pass (the logits after the prompt), so they cost
    nothing extra; with ``plausible`` they are ranked among tokens plausible under either run
    (:func:`rank_plausible_changes`). ``on_text(default_new_text, steered_new_text)`` is called after every new token
    (for streaming into a UI). Batched and one-row runs agree to float rounding (the matmuls see a
    different batch size), so a sampled token can differ only where two candidates are tied to ~1e-6.
    ``fast_decode``: see :func:`generate_tokens` (False forces the TransformerBridge path).
    """
    refuse_transcoders(sae, "steering")
    t0 = time.perf_counter()
    hook, head = Site.of_sae(sae)
    vec = steering_vector(sae, latent, strength, max_act)
    toks = _prompt_tokens(model, prompt, prepend_bos)
    if toks.shape[0] != 1:
        raise ValueError(f"steer takes one prompt, got a batch of {toks.shape[0]}")
    plen = toks.shape[1]
    hooks = _hooks_for(torch.stack([torch.zeros_like(vec), vec]), hook, scope, plen, head)
    eos = getattr(model.tokenizer, "eos_token_id", None) if stop_at_eos else None
    first: list[Tensor] = []
    new: list[Tensor] = []

    def on_token(step: int, nxt: Tensor, logits: Tensor) -> None:
        if step == 0:
            first.append(logits.detach().float().cpu())
        if on_text is None:
            return
        new.append(nxt.cpu())
        cols = torch.stack(new, 1)
        texts = []
        for r in range(2):
            row = cols[r]
            if eos is not None:
                hits = (row == eos).nonzero()
                if len(hits):
                    row = row[: int(hits[0]) + 1]
            texts.append(_decode(model, row))
        on_text(texts[0], texts[1])

    out = generate_tokens(model, toks.expand(2, -1).contiguous(), max_new_tokens, hooks=hooks, seed=seed, temperature=temperature,
                          top_p=top_p, use_kv_cache=use_kv_cache, stop_at_eos=stop_at_eos, on_token=on_token, fast_decode=fast_decode)
    if hooks[0][1]._seen == 0:  # e.g. a hook TransformerLens gates off until model.set_use_*(True): nothing was steered
        raise ValueError(f"the hook {hook!r} never ran in the forward pass, so nothing was steered (is it gated off on this model?)")
    if not first:  # max_new_tokens == 0: no step ran, so no logits were seen
        with model_lock(model), model.hooks(fwd_hooks=hooks):
            for _, h in hooks:
                h.reset()
            first.append(_call_last(model, toks.expand(2, -1).contiguous())[:, -1].float().cpu())
    diffs = _logprob_diff(model, first[0][0], first[0][1], top_n, plausible)
    default, steered = (_row_result(model, out, r, plen, eos) for r in range(2))
    return SteeringRun(default, steered, diffs, time.perf_counter() - t0)


def steered_pair(model, sae, prompt: str | Tensor, latent: int, strength: float, max_act: float, scope: Scope = "all",
                 **gen_kwargs) -> tuple[GenerationResult, GenerationResult]:
    """``(default, steered)`` generations with the same seed (so the same sampling noise).

    Both come from one batched run (:func:`steer`); ``gen_kwargs`` are :func:`steer`'s keywords.
    """
    run = steer(model, sae, prompt, latent, strength, max_act, scope, **gen_kwargs)
    return run.default, run.steered


@torch.no_grad()
def next_token_logprob_diff(model, sae, prompt: str | Tensor, latent: int, strength: float, max_act: float,
                            scope: Scope = "all", top_n: int = 10, plausible: bool = True) -> list[tuple[str, float]]:
    """Tokens whose next-token log-prob changes most under steering: ``top_n`` rises, then ``top_n`` falls.

    Each entry is ``(token string, log p_steered − log p_default)`` for the token after the prompt;
    rises come in decreasing order, falls in increasing order (most negative first). Under the
    ``"generated"`` scope nothing in the prompt is steered, so every difference is 0.
    """
    toks = _prompt_tokens(model, prompt)
    hook, head = Site.of_sae(sae)
    vec = steering_vector(sae, latent, strength, max_act)
    with model_lock(model):
        base = model(toks)[0, -1]
        steered = model.run_with_hooks(toks, fwd_hooks=[(hook, SteeringHook(vec, scope, toks.shape[1], head))])[0, -1]
    return _logprob_diff(model, base, steered, top_n, plausible)


@torch.no_grad()
def max_activation(sae, model, tokens: Tensor, latent: int, *, batch_size: int = 16, special_ids: Tensor | None = None,
                   progress: bool = False, on_progress: Callable[[int, int], None] | None = None) -> float:
    """Largest |activation| of ``latent`` over ``tokens`` [n_seq, ctx] (special positions skipped if given).

    For ReLU-type SAEs this is the max activation; for signed SAEs the largest magnitude, so
    ``strength`` keeps its meaning (units of the latent's typical peak) for both poles. The model
    runs only up to the SAE's block. ``progress`` shows a tqdm bar (tokens, with an ETA);
    ``on_progress(done_tokens, total_tokens)`` is called after every batch (a UI's progress bar).
    The cost grows with ``tokens.numel()``: cap it (the CLI's ``--max-act-tokens``), or read the
    value from the dashboards when they exist (:func:`saebench.dashboards.max_abs_activation`).
    """
    hook, head = Site.of_sae(sae)
    best = 0.0
    total = int(tokens.numel())
    bar = tqdm(total=total, desc=f"max activation of latent {latent}", unit="tok", unit_scale=True, disable=not progress, leave=False)
    try:
        for s in range(0, tokens.shape[0], batch_size):
            toks = tokens[s : s + batch_size]
            x = site_activations(model, hook, head, toks, batch_size)
            keep = torch.ones(toks.shape, dtype=torch.bool) if special_ids is None else ~torch.isin(toks, special_ids.to(toks.device))
            x = x[keep.to(x.device)]
            if x.shape[0]:
                acts = sae.encode_sparse(x.to(sae.device))
                hit = acts.indices == latent
                if hit.any():
                    best = max(best, float(acts.values[hit].abs().max()))
            bar.update(int(toks.numel()))
            if on_progress is not None:
                on_progress(min(total, (s + toks.shape[0]) * tokens.shape[1]), total)
    finally:
        bar.close()
    return best
