"""SAEBench compatibility: does an SAE expose what SAEBench's custom-SAE interface needs (EVALS.md §1.2)?

A check of the weights and config alone (no model is loaded); the bench's ``compat`` eval, column
``saebench_compatible``.
"""

from __future__ import annotations

from typing import Any

import torch
from saebench.evals.registry import EvalSpec, register


def check_saebench_compat(sae) -> dict[str, Any]:
    """Does ``sae`` expose what SAEBench's custom-SAE interface needs (EVALS.md §1.2)? Never raises."""
    checks: dict[str, dict[str, Any]] = {}

    def check(name: str, fn) -> None:
        try:
            ok, detail = fn()
        except Exception as e:  # noqa: BLE001  (a missing attribute is a failed check, not a crash)
            ok, detail = False, f"{type(e).__name__}: {e}"
        checks[name] = {"ok": bool(ok), "detail": detail}

    cfg = getattr(sae, "cfg", None)
    d_in, d_sae = getattr(cfg, "d_in", None), getattr(cfg, "d_sae", None)
    check("nn.Module", lambda: (isinstance(sae, torch.nn.Module), type(sae).__name__))
    check("W_enc [d_in, d_sae]", lambda: (tuple(sae.W_enc.shape) == (d_in, d_sae), tuple(sae.W_enc.shape)))
    check("W_dec [d_sae, d_in]", lambda: (tuple(sae.W_dec.shape) == (d_sae, d_in), tuple(sae.W_dec.shape)))
    tol = 1e-2 if getattr(sae, "dtype", torch.float32) in (torch.bfloat16, torch.float16) else 1e-5

    def unit():
        err = float((sae.W_dec.detach().float().norm(dim=-1) - 1).abs().max())
        return err <= tol, f"max |‖W_dec[i]‖ − 1| = {err:.2e} (tolerance {tol:g})"

    check("W_dec rows unit norm", unit)
    check("b_enc [d_sae]", lambda: (tuple(sae.b_enc.shape) == (d_sae,), tuple(sae.b_enc.shape)))
    check("b_dec [d_in]", lambda: (tuple(sae.b_dec.shape) == (d_in,), tuple(sae.b_dec.shape)))
    check("device", lambda: (isinstance(sae.device, torch.device), str(sae.device)))
    check("dtype", lambda: (isinstance(sae.dtype, torch.dtype), str(sae.dtype)))

    def shapes():
        x = torch.randn(2, 3, d_in, dtype=sae.dtype, device=sae.device)
        f = sae.encode(x)
        xh = sae.decode(f)
        y = sae(x)
        ok = tuple(f.shape) == (2, 3, d_sae) and tuple(xh.shape) == (2, 3, d_in) and tuple(y.shape) == (2, 3, d_in)
        return ok, f"encode {tuple(f.shape)}, decode {tuple(xh.shape)}, forward {tuple(y.shape)}"

    check("encode/decode/forward on [batch, pos, d_in]", shapes)
    for f in ("model_name", "hook_name"):
        check(f"cfg.{f}", lambda f=f: (bool(getattr(cfg, f)), repr(getattr(cfg, f))))
    for f in ("d_in", "d_sae", "hook_layer"):
        check(f"cfg.{f}", lambda f=f: (isinstance(getattr(cfg, f), int), repr(getattr(cfg, f))))
    return {"ok": all(c["ok"] for c in checks.values()), "checks": checks}


register(EvalSpec(
    name="compat", aliases=("saebench_compat",), scope="sae", needs_model=False, order=40,
    compute=lambda ctx, sae, sae_dir: check_saebench_compat(sae),
    cache_key=lambda cfgs, data: {},
    columns=lambda r: {"saebench_compatible": r.get("ok")},
))
