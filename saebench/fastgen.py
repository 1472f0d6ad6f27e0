"""Fast KV-cached decoding for steering: the plain Hugging Face model under the bridge, one torch hook.

A steering request decodes ~30 steps of one or two rows. Through ``TransformerBridge`` every step
runs the bridge's wrapped components (hook points, re-implemented attention, keyword filtering),
and ``nn.Linear`` with a two-row input takes the generic GEMM path, which repacks the weight
matrix on every call. For a 135M model on CPU a decode step is bound by reading its ~0.5 GB of
weights, so both costs show.

:class:`FastDecoder` runs the same weights (the same ``Parameter`` objects: nothing is copied, an
in-place edit of the bridge's weights is seen here too) in a plain instance of the Hugging Face
model class, with two changes only:

* the steering edit is one plain torch hook on the decoder layer that the bridge's
  ``blocks.L.hook_resid_pre`` / ``hook_resid_post`` wraps (a forward pre-hook on its input, a
  forward hook on its output), calling the same hook function the bridge path would call;
* every ``nn.Linear`` computes inputs of at most :data:`GEMV_ROWS` rows as ``W @ xᵀ`` (a
  matrix-vector product that streams the weight once) instead of ``x @ Wᵀ``; the same sums in
  another order (float rounding), larger inputs take ``F.linear`` unchanged.

Only residual-stream sites are served (the sites a decoder direction is added at); any other hook
(``attn.hook_z`` heads, MLP outputs), an uncached run, or a hook already attached to the bridge
(which the plain model would not run) uses the bridge path.

Canary (:func:`fast_decode_ok`, once per model, like :mod:`saebench.compat`): on a probe sequence
the fast path, with two different vectors added at ``hook_resid_pre`` and at ``hook_resid_post`` of
a block, gives the bridge's logits with the same edits, in a full pass and in teacher-forced KV-cached decode
steps, and the hook sees the same positions per call. On a mismatch (a library release that moves
the hook point, renames weights or changes a layer's signature) a
:class:`~saebench.compat.LibraryBehaviourWarning` is emitted and generation stays on the bridge
path (slower, correct). :func:`saebench.compat.canary_report` lists the result as ``fast_decode``.
"""

from __future__ import annotations

import contextlib
import copy
import inspect
import re
import warnings
from collections.abc import Callable, Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from saebench import compat

__all__ = ["GEMV_ROWS", "GemvLinear", "FastDecoder", "resid_site", "fast_decode_ok", "fast_decoder"]

GEMV_ROWS = 8  # inputs with at most this many rows (batch x positions) take the W @ xT path
_ATTR = "_saebench_fast_decoder"  # model.__dict__ slot: FastDecoder, or the reason there is none
_SITE_RE = re.compile(r"^blocks\.(\d+)\.hook_resid_(pre|post)$")
_ORIG = "_original_component"


class GemvLinear(nn.Module):
    """``nn.Linear`` sharing ``lin``'s parameters; few-row inputs computed as ``(W @ xᵀ)ᵀ``.

    ``F.linear`` with a 1-2 row input runs a GEMM that packs the whole weight on every call; the
    transposed product is a matrix-vector product over the weight as it is stored (2-4x faster per
    decode step on the CPUs measured, see docs/PERFORMANCE.md). Same result up to float rounding.
    """

    def __init__(self, lin: nn.Linear, max_rows: int = GEMV_ROWS):
        super().__init__()
        self.in_features, self.out_features = lin.in_features, lin.out_features
        self.weight = lin.weight
        self.bias = lin.bias
        self.max_rows = int(max_rows)

    def forward(self, x: Tensor) -> Tensor:
        d = x.shape[-1]
        rows = x.numel() // d if d else 0
        if not 0 < rows <= self.max_rows:
            return F.linear(x, self.weight, self.bias)
        y = torch.matmul(self.weight, x.reshape(rows, d).t()).t()
        if self.bias is not None:
            y = y + self.bias
        return y.contiguous().view(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, max_rows={self.max_rows}"


def _strip(key: str) -> str:
    """A bridged HF key (``model.layers.0._original_component.mlp...``) as the plain model spells it."""
    return key.replace(f".{_ORIG}", "").replace(f"{_ORIG}.", "")


def _slots(root: nn.Module) -> dict[tuple[str, str], tuple[nn.Module, str]]:
    """``{(kind, plain key): (owner module, local name)}`` for every parameter and buffer under ``root``."""
    out: dict[tuple[str, str], tuple[nn.Module, str]] = {}
    for prefix, mod in root.named_modules(remove_duplicate=False):
        for kind in ("_parameters", "_buffers"):
            for name, t in getattr(mod, kind).items():
                if t is not None:
                    out.setdefault((kind, _strip(f"{prefix}.{name}" if prefix else name)), (mod, name))
    return out


def resid_site(model, hook_name: str) -> tuple[int, str] | None:
    """``(block index, 'pre' | 'post')`` when ``hook_name`` is the bridge block's input/output hook, else None."""
    m = _SITE_RE.match(hook_name or "")
    if not m:
        return None
    layer, kind = int(m.group(1)), m.group(2)
    blocks = getattr(model, "blocks", None)
    if blocks is None or not 0 <= layer < len(blocks):
        return None
    block = blocks[layer]
    want = getattr(block, "hook_in" if kind == "pre" else "hook_out", None)
    if want is None or model.hook_dict.get(hook_name) is not want:
        return None
    return layer, kind


def _post_hook(fn: Callable) -> Callable:
    def hook(module, args, out):
        if isinstance(out, tuple):
            return (fn(out[0]),) + tuple(out[1:])
        return fn(out)

    return hook


def _pre_hook(fn: Callable) -> Callable:
    def hook(module, args, kwargs):
        if args:
            return (fn(args[0]),) + tuple(args[1:]), kwargs
        kwargs = dict(kwargs)
        kwargs["hidden_states"] = fn(kwargs["hidden_states"])
        return args, kwargs

    return hook


class FastDecoder:
    """The plain HF model under ``model`` (a TransformerBridge), sharing its weights; see the module doc.

    ``gemv_rows``: the :class:`GemvLinear` row limit (0 keeps ``nn.Linear``; the benchmark's breakdown uses it).
    """

    def __init__(self, model, gemv_rows: int = GEMV_ROWS):
        hf = getattr(model, "original_model", None)
        if not isinstance(hf, nn.Module) or not hasattr(hf, "config"):
            raise TypeError("the model has no Hugging Face original_model")
        with torch.device("meta"):
            plain = type(hf)(copy.deepcopy(hf.config))
        for prefix, mod in list(plain.named_modules()) if gemv_rows > 0 else []:
            for name, child in list(mod.named_children()):
                if type(child) is nn.Linear:
                    setattr(mod, name, GemvLinear(child, gemv_rows))
        src = _slots(hf)
        self._links: list[tuple[nn.Module, str, str, nn.Module, str]] = []
        for prefix, mod in plain.named_modules(remove_duplicate=False):
            for kind in ("_parameters", "_buffers"):
                for name, t in list(getattr(mod, kind).items()):
                    if t is None:
                        continue
                    key = f"{prefix}.{name}" if prefix else name
                    if (kind, key) not in src:
                        raise KeyError(f"the bridge has no {kind[1:-1]} {key!r}")
                    owner, oname = src[kind, key]
                    getattr(mod, kind)[name] = getattr(owner, kind)[oname]
                    self._links.append((mod, kind, name, owner, oname))
        left = [n for n, t in [*plain.named_parameters(), *plain.named_buffers()] if t.is_meta]
        if left:
            raise KeyError(f"weights not found in the bridge: {left[:5]}")
        plain.eval()
        self.plain = plain
        self._block_paths: dict[int, str] = {}
        paths = {id(m): n for n, m in hf.named_modules()}
        for i, block in enumerate(model.blocks):
            path = paths.get(id(block))
            if path is not None:
                self._block_paths[i] = path
        self._keep = "logits_to_keep" in inspect.signature(plain.forward).parameters

    def current(self) -> bool:
        """Whether every weight and buffer is still the bridge's own object (``model.to(...)`` rebinds buffers)."""
        return all(getattr(mod, kind)[name] is getattr(owner, kind)[oname] for mod, kind, name, owner, oname in self._links)

    def module_for(self, model, hook_name: str) -> tuple[nn.Module, str] | None:
        site = resid_site(model, hook_name)
        if site is None or site[0] not in self._block_paths:
            return None
        return self.plain.get_submodule(self._block_paths[site[0]]), site[1]

    def serves(self, model, hook_names: Sequence[str]) -> bool:
        return all(self.module_for(model, n) is not None for n in hook_names)

    @contextlib.contextmanager
    def attached(self, model, hooks: Sequence[tuple[str, Callable]]) -> Iterator[None]:
        """Attach each ``(hook_name, fn)`` as a torch hook on the plain decoder layer; ``fn(act) -> act``."""
        handles = []
        try:
            for name, fn in hooks:
                found = self.module_for(model, name)
                if found is None:
                    raise ValueError(f"the fast decoder does not serve the hook {name!r}")
                mod, kind = found
                if kind == "post":
                    handles.append(mod.register_forward_hook(_post_hook(fn)))
                else:
                    handles.append(mod.register_forward_pre_hook(_pre_hook(fn), with_kwargs=True))
            yield
        finally:
            for h in handles:
                h.remove()

    def step(self, inp: Tensor, past=None, last_only: bool = True):
        """``(logits, cache)`` for ``inp`` [B, n] after the cached positions in ``past`` (None: a fresh cache)."""
        kw = {"logits_to_keep": 1} if (last_only and self._keep) else {}
        with warnings.catch_warnings():
            # as compat.cached_forward: a release that deprecates the argument's name prints it every step;
            # the canary checks that the cache still works
            warnings.filterwarnings("ignore", message=".*past_key_values.*deprecated", category=FutureWarning)
            out = self.plain(input_ids=inp, past_key_values=past, use_cache=True, **kw)
        logits = out.logits
        return (logits[:, -1:] if last_only else logits), out.past_key_values


def _mismatch(model, fast: FastDecoder) -> str | None:
    """None when the fast path reproduces the bridge's logits with the same edits (full and cached); else what differed.

    One pass with two different vectors, added at ``hook_resid_pre`` and at ``hook_resid_post`` of
    the same block: a hook on the wrong layer, or pre and post swapped, changes the logits.
    """
    toks = compat._probe_tokens(model)
    n = toks.shape[1]
    n_prefix = n - 3
    layer = min(1, int(model.cfg.n_layers) - 1)
    g = torch.Generator().manual_seed(11)
    names = [f"blocks.{layer}.hook_resid_pre", f"blocks.{layer}.hook_resid_post"]
    for name in names:
        if fast.module_for(model, name) is None:
            return f"{name} is not the input/output of a decoder layer the fast path can hook"
    calls: dict[str, list[int]] = {name: [] for name in names}

    def adder(name: str):
        vec = torch.randn(int(model.cfg.d_model), generator=g) * 3

        def add(act, hook=None):
            calls[name].append(act.shape[1])
            return act + vec.to(act.device, act.dtype)

        return add

    hooks = [(name, adder(name)) for name in names]
    with torch.no_grad():
        ref = model.run_with_hooks(toks, fwd_hooks=hooks)
        for c in calls.values():
            c.clear()
        with fast.attached(model, hooks):
            full, _ = fast.step(toks, None, last_only=False)
            logits, past = fast.step(toks[:, :n_prefix], None)
            steps = [logits[:, -1]]
            for p in range(n_prefix, n - 1):
                logits, past = fast.step(toks[:, p : p + 1], past)
                steps.append(logits[:, -1])
    where = " and ".join(names)
    ok, diff = compat._close(full, ref)
    if not ok:
        return f"the plain model with edits at {where} differs from the bridge with the same edits by up to {diff:.3g} in the logits"
    ok, diff = compat._close(torch.stack(steps, 1), ref[:, n_prefix - 1 : n - 1])
    if not ok:
        return f"KV-cached decoding of the plain model with edits at {where} differs from the bridge by up to {diff:.3g} in the logits"
    want = [n, n_prefix] + [1] * (len(steps) - 1)
    for name, seen in calls.items():
        if seen != want:
            return f"the hook at {name} saw positions {seen} per call, expected {want}"
    return None


def fast_decode_ok(model) -> bool:
    """Whether the fast path equals the bridge path on ``model`` (checked once per model; warns on a failure)."""
    report = compat.canary_report(model)
    if "fast_decode" in report:
        return report["fast_decode"]["ok"]
    try:
        fast = FastDecoder(model)
        problem = _mismatch(model, fast)
    except Exception as e:  # noqa: BLE001 - any failure of the fast path means: do not use it
        fast, problem = None, f"the fast decoding path raised {type(e).__name__}: {e}"
    compat._record(model, "fast_decode", problem is None,
                   problem or "the plain HF model with a torch hook gives the bridge's logits (full and KV-cached, resid_pre and resid_post)")
    if problem:
        compat._warn(problem, "Steering generation runs through the TransformerBridge hooks from now on (slower, correct).")
        model.__dict__[_ATTR] = None
    else:
        model.__dict__[_ATTR] = fast
    return problem is None


def _bridge_hooks_attached(model) -> bool:
    """Whether any TransformerLens hook is attached to the bridge now (the plain model would not run it)."""
    for hp in model.hook_dict.values():
        if hp._forward_hooks or hp._forward_pre_hooks:
            return True
    return False


def fast_decoder(model, hook_names: Sequence[str]) -> FastDecoder | None:
    """The model's :class:`FastDecoder` when it serves every hook in ``hook_names`` and passed its canary, else None.

    Call it holding :func:`saebench.steering.model_lock`. Rebuilt (and re-checked) when the bridge's
    weights or buffers were rebound since (``model.to(dtype)``).
    """
    if not isinstance(getattr(model, "original_model", None), nn.Module):
        return None
    if not fast_decode_ok(model):
        return None
    fast = model.__dict__.get(_ATTR)
    if fast is None:
        return None
    if not fast.current():
        model.__dict__.get(compat._REPORT_ATTR, {}).pop("fast_decode", None)
        if not fast_decode_ok(model):
            return None
        fast = model.__dict__[_ATTR]
    if not fast.serves(model, hook_names) or _bridge_hooks_attached(model):
        return None
    return fast
