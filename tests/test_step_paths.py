"""The training step's fast paths (issue #15.8) give the losses and gradients of the plain paths, in float64.

- vsae's KL (``_HalfSquaredReLU``: pre rectified in place, one dense product in the backward) and its z buffer give
  dense autograd's loss and gradients, with AuxK on;
- ``sparse.row_topk`` (AuxK's and the Zipf loss's large per-row top-k) selects what ``torch.topk`` selects;
- the benchmark covers every activation method.

Tolerances are float64 round-off (the paths sum the same terms in different orders), so they hold on any CPU.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from saebench import sparse
from saebench.config import TrainConfig
from saebench.sae import SAE
from saebench.trainers import get_method
from saebench.trainers.base import StepInput, normalized_mse, total_variance

TOL = dict(rtol=1e-9, atol=1e-12)


METHODS = [("topk", {}), ("batchtopk", {}), ("mutual_choice", {}), ("abstopk", {}), ("abstopk", {"variant": "batch"}),
           ("vsae", {}), ("vsae", {"variance": "learned"}), ("vsae_det", {}), ("feature_choice", {}), ("gsae", {})]


def _setup(method_name: str, opts: dict, tmp_path, n=96, d=24, k=5, B=64, dead_every=7):
    steps = 100
    cfg = TrainConfig(method=method_name, hook_name="h", d_sae=n, k=k, batch_size_tokens=B, training_tokens=B * steps,
                      normalize_activations="none", out_dir=str(tmp_path), method_options=opts | ({"kl_warmup_steps": 0} if method_name.startswith("vsae") else {}))
    method = get_method(method_name)(cfg)
    sae = SAE(method.sae_config(d))
    method.param_groups(sae, 1e-3)
    method.init_sae(sae, torch.randn(256, d, generator=torch.Generator().manual_seed(0)), torch.Generator().manual_seed(0))
    sae.double()
    with torch.no_grad():
        sae.b_enc.normal_(0, 0.3, generator=torch.Generator().manual_seed(2))
        sae.b_dec.normal_(0, 0.5, generator=torch.Generator().manual_seed(3))
    g = torch.Generator().manual_seed(1)
    x = torch.randn(B, d, generator=g, dtype=torch.float64)
    dead = torch.zeros(n, dtype=torch.bool)
    dead[::dead_every] = True
    grads = torch.randn(B, d, generator=g, dtype=torch.float64) if method.needs_grads else None
    return cfg, method, sae, StepInput(x=x, dead_mask=dead, step=int(0.9 * steps), grads=grads)


def _step_grads(method, sae, inp, fresh_rng: bool = True):
    if fresh_rng and hasattr(method, "_gen"):
        method._gen = None  # vsae: the same noise for both paths
    sae.zero_grad(set_to_none=True)
    out = method.step(sae, inp)
    out.loss.backward()
    return {k: v.detach().clone() for k, v in out.losses.items()}, {n: p.grad.clone() for n, p in sae.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("name,opts", METHODS, ids=[f"{m}-{'-'.join(map(str, o.values())) or 'default'}" for m, o in METHODS])
def test_every_method_step_with_row_topk_in_the_aux_loss_equals_torch_topk(name, opts, tmp_path, monkeypatch):
    """A float64 step of every activation method with AuxK (the Zipf loss for the choice methods) wide enough for
    ``row_topk``'s candidate search (k_aux 64 of 512 dead latents): the losses and every gradient equal those with
    ``torch.topk``. The choice methods run ``after_step`` first (their density history, in float64)."""
    cfg, method, sae, inp = _setup(name, opts | {"k_aux": 64}, tmp_path, n=1024, dead_every=2)
    if hasattr(method, "_fired"):
        for _ in range(3):
            out = method.step(sae, inp)
            method.after_step(sae, inp, out, inp.step)
    losses, got = _step_grads(method, sae, inp)
    assert "auxiliary_reconstruction_loss" in losses, losses.keys()
    monkeypatch.setattr(sparse, "row_topk", lambda s, k: s.topk(k, dim=-1, sorted=False).indices)
    ref_losses, ref = _step_grads(method, sae, inp)
    assert losses.keys() == ref_losses.keys() and got.keys() == ref.keys()
    for key in losses:
        torch.testing.assert_close(losses[key], ref_losses[key], **TOL)
    for n in got:
        torch.testing.assert_close(got[n], ref[n], **TOL, msg=lambda m: f"{n}: {m}")


@pytest.mark.parametrize("name,opts", [("vsae_det", {}), ("vsae", {}), ("vsae", {"variance": "learned"})])
def test_vsae_step_with_auxk_equals_dense_autograd_in_float64(name, opts, tmp_path):
    """Loss and every gradient of a vsae step (KL with pre rectified in place, z in a reused buffer, AuxK on dead
    latents) equal dense autograd's, to float64 round-off; two steps, so the buffers are reused."""
    cfg, method, sae, inp = _setup(name, opts | {"kl_coef": 0.7}, tmp_path)
    k, k_aux = cfg.k, sae.d_in // 2
    for _ in range(2):
        losses, got = _step_grads(method, sae, inp, fresh_rng=False)
        noise = getattr(method, "_noise", None)
        sae.zero_grad(set_to_none=True)
        x = inp.x
        xc = x - sae.b_dec
        pre = F.linear(xc, sae.encoder_weight, sae.b_enc)
        mu = F.relu(pre)
        kl = 0.5 * mu.pow(2).sum()
        if name == "vsae_det":
            z = mu
        elif opts.get("variance") == "learned":
            lv = F.linear(xc, sae.W_logvar, sae.b_logvar).clamp(-6.0, 2.0)
            z = mu + noise * (0.5 * lv).exp()
            kl = kl + 0.5 * (lv.exp() - 1 - lv).sum()
        else:
            z = mu + noise
        idx = z.detach().topk(k, -1).indices
        code = torch.zeros_like(pre).scatter(1, idx, z.gather(1, idx))
        x_hat = code @ sae.W_dec + sae.b_dec
        dead_idx = inp.dead_mask.nonzero().squeeze(1)
        aux_idx = dead_idx[pre.detach()[:, dead_idx].topk(min(k_aux, len(dead_idx)), -1).indices]
        aux_code = torch.zeros_like(pre).scatter(1, aux_idx, mu.gather(1, aux_idx))
        aux = method.opts.auxk_coef * normalized_mse(aux_code @ sae.W_dec, (x - x_hat).detach())
        ref = {"mse_loss": normalized_mse(x_hat, x), "auxiliary_reconstruction_loss": aux, "kl_loss": 0.7 * kl / total_variance(x)}
        assert losses.keys() == ref.keys()
        for key in ref:
            torch.testing.assert_close(losses[key], ref[key].detach(), **TOL)
        sum(ref.values()).backward()
        for n, p in sae.named_parameters():
            if p.grad is not None or n in got:
                torch.testing.assert_close(got[n], p.grad, **TOL, msg=lambda m: f"{n}: {m}")
        with torch.no_grad():  # move the SAE so the second step differs
            for p in sae.parameters():
                p.add_(0.01 * torch.randn(p.shape, generator=torch.Generator().manual_seed(9), dtype=p.dtype))


def test_row_topk_equals_torch_topk_as_sets_including_short_rows_and_its_fallbacks():
    g = torch.Generator().manual_seed(0)
    for B, n, k in [(64, 3000, 288), (32, 5000, 100), (16, 200, 80), (8, 1000, 10)]:
        s = torch.randn(B, n, generator=g, dtype=torch.float64)
        s[0] = torch.linspace(0, 1, n, dtype=torch.float64)  # sorted row: the strided sample is exact
        s[1, : n // 2] += 100  # a row whose top entries sit in one half
        s[2, ::8] -= 100  # the sampled columns are the row's smallest: too many candidates
        s[3, ::8] += 100  # the sampled columns are its largest: too few candidates (recomputed)
        got = sparse.row_topk(s, k).sort(-1).values
        ref = s.topk(k, -1).indices.sort(-1).values
        assert got.shape == (B, k) and torch.equal(got, ref), (B, n, k)
    low = torch.randn(16, 4000, generator=g, dtype=torch.float64)
    low[:, ::8] -= 100  # every row's sample misleads: most entries are candidates → plain topk over everything
    assert torch.equal(sparse.row_topk(low, 300).sort(-1).values, low.topk(300, -1).indices.sort(-1).values)
    flat = torch.zeros(16, 4000, dtype=torch.float64)  # all equal: no candidate above τ → every row recomputed
    assert sparse.row_topk(flat, 300).shape == (16, 300)


def test_bench_train_step_times_every_activation_method_and_the_floors(tmp_path):
    """benchmarks/bench_train_step.py at toy shapes: every activation method, the floors and the load average in its JSON."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_train_step.py"
    out = tmp_path / "r.json"
    env = os.environ | {"OMP_NUM_THREADS": "1"}
    subprocess.run([sys.executable, str(script), "--d-in", "16", "--n", "256", "--k", "4", "--batch", "64", "--repeats", "1",
                    "--skip-memory", "--no-reference", "--out", str(out)], check=True, env=env, capture_output=True, timeout=300)
    rep = json.loads(out.read_text())
    names = set(rep["methods_step_over_matmul"])
    assert {"topk", "batchtopk", "mutual_choice", "jumprelu", "abstopk", "abstopk_batch", "vsae", "vsae_det", "feature_choice",
            "gsae", "standard", "gated", "jumprelu_paper", "matryoshka_batchtopk", "matching_pursuit", "itda", "top_afa", "floor:kl_products", "floor:kl_products_noise", "floor:gsae_products"} <= names
    assert all(v["over_matmul"] > 0 for v in rep["methods_step_over_matmul"].values())
    assert rep["device"] == "cpu" and rep["threads"] == 1 and "load_average" in rep
    if not torch.cuda.is_available():  # a clear error, not a crash deep inside
        r = subprocess.run([sys.executable, str(script), "--device", "cuda", "--small", "--skip-memory", "--out", str(tmp_path / "c.json")],
                           env=env, capture_output=True, text=True, timeout=300)
        assert r.returncode != 0 and "sees no CUDA device" in r.stderr


def test_bench_dense_codes_times_both_paths_and_leaves_the_threshold_as_it_was(tmp_path):
    """benchmarks/bench_dense_codes.py at toy shapes: both paths timed at every K, the library's threshold restored after."""
    from bench_loader import load_benchmark
    from saebench import sparse

    before = dict(sparse.DENSE_CODE_MIN_DENSITY)
    rep = load_benchmark("bench_dense_codes").main(["--n", "64", "--d-in", "8", "--batch", "32", "--ks", "4", "32", "--repeats", "1",
                                                    "--methods", "standard", "--k", "4", "--out", str(tmp_path / "d.json")])
    assert [r["K"] for r in rep["rows"]] == [4, 32] and all(r["sparse_ms"] > 0 and r["dense_ms"] > 0 for r in rep["rows"])
    (m,) = rep["methods"]
    assert m["method"] == "standard" and m["all_latents_s"] > 0 and m["padded_s"] > 0
    assert sparse.mask_to_indices.__name__ == "mask_to_indices"  # the library's own function is back in place
    assert rep["threshold_in_use"] == before["cpu"] and sparse.DENSE_CODE_MIN_DENSITY == before
    assert (tmp_path / "d.json").exists()
