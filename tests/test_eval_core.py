"""Core eval: every metric against its formula, and the identity/zero SAEs on a tiny model."""

import json
import math

import pytest
import torch

from saebench.evals.core import ce_loss_recovered, evaluate_core, fvu, kl_per_token, kl_score, run_core_eval
from saebench.sae import SAE, SAEConfig
from saebench.text import load_tokens, special_ids

HOOK = "blocks.0.hook_resid_post"


def _identity_sae(d, hook=HOOK, model_name=""):
    sae = SAE(SAEConfig(architecture="abstopk", d_in=d, d_sae=d, k=d, hook_name=hook, model_name=model_name))
    with torch.no_grad():
        sae.encoder_weight.copy_(torch.eye(d))
        sae.W_dec.copy_(torch.eye(d))
    return sae


def test_formulas_on_hand_made_example():
    x = torch.tensor([[1.0, 0.0], [0.0, 2.0], [3.0, 2.0]])
    x_hat = torch.tensor([[1.0, 1.0], [0.0, 1.0], [2.0, 2.0]])
    sse = (x - x_hat).pow(2).sum().item()  # 1 + 1 + 1 = 3
    mean = x.mean(0)
    total = (x - mean).pow(2).sum().item()
    assert fvu(sse, x.pow(2).sum().item(), x.sum(0), 3) == pytest.approx(3 / total)
    assert ce_loss_recovered(ce_clean=2.0, ce_sae=2.5, ce_zero=7.0) == pytest.approx(0.9)
    assert kl_score(kl_sae=0.5, kl_zero=2.0) == pytest.approx(0.75)
    p = torch.tensor([[0.0, 1.0, 2.0]])
    q = torch.tensor([[1.0, 1.0, 0.0]])
    lp, lq = p.log_softmax(-1), q.log_softmax(-1)
    assert kl_per_token(p, q).item() == pytest.approx((lp.exp() * (lp - lq)).sum().item(), rel=1e-6)
    assert kl_per_token(p, p).item() == pytest.approx(0.0, abs=1e-7)


def test_token_metrics_match_formulas(tiny_model):
    """Run the eval on a random SAE and recompute each token-level metric by hand."""
    torch.manual_seed(0)
    tokens = torch.randint(3, 1000, (3, 12))
    tokens[:, 0] = 1  # BOS
    sae = SAE(SAEConfig(architecture="topk", d_in=64, d_sae=96, k=5, hook_name=HOOK))
    sae.init_tied(torch.Generator().manual_seed(0))
    m = evaluate_core(sae, tiny_model, tokens, special_ids=torch.tensor([0, 1, 2]), downstream=False, progress=False)
    _, cache = tiny_model.run_with_cache(tokens, names_filter=lambda n: n == HOOK)
    x = cache[HOOK][:, 1:].reshape(-1, 64)  # BOS excluded
    with torch.no_grad():
        z = sae.encode(x)
        x_hat = sae(x)
    assert m["n_tokens"] == 33
    sse = (x - x_hat).pow(2).sum()
    assert m["fvu"] == pytest.approx((sse / (x - x.mean(0)).pow(2).sum()).item(), rel=1e-4)
    assert m["explained_variance"] == pytest.approx(1 - m["fvu"])
    assert m["mse"] == pytest.approx((sse / x.numel()).item(), rel=1e-4)
    assert m["l0"] == pytest.approx((z != 0).sum(-1).float().mean().item())
    assert m["l1"] == pytest.approx(z.abs().sum(-1).mean().item(), rel=1e-4)
    assert m["cossim"] == pytest.approx(torch.cosine_similarity(x, x_hat, -1).mean().item(), rel=1e-4)
    assert m["l2_ratio"] == pytest.approx((x_hat.norm(dim=-1) / x.norm(dim=-1)).mean().item(), rel=1e-4)
    assert m["relative_reconstruction_bias"] == pytest.approx((x_hat.pow(2).sum() / (x * x_hat).sum()).item(), rel=1e-4)
    ref = _saebench_06_metrics([(x, x_hat)])  # one batch of 3 sequences (batch_size 16)
    assert m["saebench_batches"] == 1
    for k in ("explained_variance", "relative_reconstruction_bias", "mse"):
        assert m[f"{k}_saebench"] == pytest.approx(ref[k], rel=1e-4), k
    density = (z != 0).float().mean(0)
    assert m["dead_fraction"] == pytest.approx((density == 0).float().mean().item())
    assert m["dead_window_tokens"] == 33
    assert m["dense_fraction_10pct"] == pytest.approx((density > 0.1).float().mean().item())
    assert sum(m["log10_density_histogram"]["counts"]) == int((density > 0).sum())


def _saebench_06_metrics(batches):
    """SAEBench 0.6's aggregation, transcribed from sae_bench/evals/core/main.py (get_sparsity_and_variance_metrics):
    per batch of (masked) inputs x and reconstructions x_hat, the same tensor operations in the same order."""
    rrb, mses, mean_sum_of_squares, mean_act_per_dimension, mean_sum_of_resid_squared = [], [], [], [], []
    for x, x_hat in batches:
        x_hat_norm_squared = torch.norm(x_hat, dim=-1) ** 2
        x_dot_x_hat = (x * x_hat).sum(dim=-1)
        rrb.append((x_hat_norm_squared.mean() / x_dot_x_hat.mean()).unsqueeze(0))
        resid_sum_of_squares = (x - x_hat).pow(2).sum(dim=-1)
        mses.append(resid_sum_of_squares / x.shape[0])  # flattened_mask.sum(): the batch's kept tokens
        mean_sum_of_squares.append(x.pow(2).sum(dim=-1).mean(dim=0))
        mean_act_per_dimension.append(x.pow(2).mean(dim=0))
        mean_sum_of_resid_squared.append(resid_sum_of_squares.mean(dim=0))
    total_variance = torch.stack(mean_sum_of_squares).mean(dim=0) - torch.cat(mean_act_per_dimension).mean(dim=0) ** 2
    residual_variance = torch.stack(mean_sum_of_resid_squared).mean(dim=0)
    return {"explained_variance": (1 - residual_variance / total_variance).item(), "relative_reconstruction_bias": torch.cat(rrb).mean().item(),
            "mse": torch.cat(mses).mean().item()}


def test_saebench_variants_follow_saebench_06():
    """explained_variance_saebench, relative_reconstruction_bias_saebench and mse_saebench equal SAEBench 0.6's code on
    synthetic batches of unequal sizes, scales and offsets (float64); ours stay ours, and they differ from them here."""
    from saebench.evals.core import CoreAccumulator
    from saebench.sparse import SparseActs

    g = torch.Generator().manual_seed(0)
    d = 12
    sae = SAE(SAEConfig(architecture="topk", d_in=d, d_sae=20, k=3))
    acc = CoreAccumulator(sae)
    batches = []
    for n, scale, shift in ((50, 1.0, 3.0), (17, 4.0, -1.0), (33, 0.5, 0.0), (0, 1.0, 0.0)):  # an empty batch is skipped
        x = (torch.randn(n, d, generator=g, dtype=torch.float64) * scale + shift)
        x_hat = 0.8 * x + 0.3 * torch.randn(n, d, generator=g, dtype=torch.float64)
        acts = SparseActs(torch.rand(n, 3, generator=g), torch.randint(0, 20, (n, 3), generator=g))
        acc.add_reconstruction(x, x_hat, acts)
        if n:
            batches.append((x, x_hat))
    m = acc.result(downstream=False)
    ref = _saebench_06_metrics(batches)
    assert m["saebench_batches"] == 3
    assert m["explained_variance_saebench"] == pytest.approx(ref["explained_variance"], rel=1e-12)
    assert m["relative_reconstruction_bias_saebench"] == pytest.approx(ref["relative_reconstruction_bias"], rel=1e-12)
    assert m["mse_saebench"] == pytest.approx(ref["mse"], rel=1e-12)
    x, x_hat = torch.cat([b[0] for b in batches]), torch.cat([b[1] for b in batches])
    sse = (x - x_hat).pow(2).sum()
    assert m["explained_variance"] == pytest.approx(1 - (sse / (x - x.mean(0)).pow(2).sum()).item(), rel=1e-12)
    assert m["mse"] == pytest.approx((sse / x.numel()).item(), rel=1e-12)
    assert m["relative_reconstruction_bias"] == pytest.approx((x_hat.pow(2).sum() / (x * x_hat).sum()).item(), rel=1e-12)
    for ours, theirs in (("explained_variance", "explained_variance_saebench"), ("mse", "mse_saebench"),
                         ("relative_reconstruction_bias", "relative_reconstruction_bias_saebench")):
        assert abs(m[ours] - m[theirs]) > 1e-3 * abs(m[ours]), ours  # different quantities on this data: no mix-up can pass
    from saebench.evals.core import format_table

    table = format_table(m)  # the printed table says which is which
    assert "explained var (1-FVU)" in table and "explained var [SAEBench]" in table and "MSE [SAEBench]" in table
    assert "shrinkage [SAEBench]" in table and "SAEBench 0.6's definitions, averaged over 3 batches" in table


def test_fvu_without_outliers_drops_only_huge_norm_tokens():
    """fvu keeps every token (as SAEBench); fvu_without_outliers drops norms > 10x the batch median."""
    from saebench.evals.core import CoreAccumulator
    from saebench.sparse import SparseActs

    g = torch.Generator().manual_seed(0)
    x = torch.randn(200, 8, generator=g)
    x[[3, 77]] *= 50.0  # two attention-sink-like tokens
    x_hat = x + 0.1 * torch.randn(200, 8, generator=g)
    x_hat[[3, 77]] = 0.0  # reconstructed terribly
    sae = SAE(SAEConfig(architecture="topk", d_in=8, d_sae=4, k=1))
    acc = CoreAccumulator(sae)
    acts = SparseActs(torch.ones(200, 1), torch.zeros(200, 1, dtype=torch.long))
    acc.add_reconstruction(x[:120], x_hat[:120], SparseActs(acts.values[:120], acts.indices[:120]))
    acc.add_reconstruction(x[120:], x_hat[120:], SparseActs(acts.values[120:], acts.indices[120:]))
    m = acc.result(downstream=False)

    def ref(a, b):
        return ((a - b).pow(2).sum() / (a - a.mean(0)).pow(2).sum()).item()

    inl = torch.ones(200, dtype=torch.bool)
    inl[[3, 77]] = False
    assert m["n_outlier_tokens"] == 2
    assert m["fvu"] == pytest.approx(ref(x, x_hat), rel=1e-5) and m["fvu"] > 0.9
    assert m["fvu_without_outliers"] == pytest.approx(ref(x[inl], x_hat[inl]), rel=1e-5) and m["fvu_without_outliers"] < 0.02


def test_identity_sae_recovers_all_and_zero_sae_none(tiny_model64):
    # float64 model and SAE: the scores compare two forwards (spliced vs clean/ablated) whose float32
    # kernel noise (~1e-5 of KLs of ~0.01 on this tiny model) depends on the CPU.
    tiny_model = tiny_model64
    tokens = torch.randint(3, 2000, (4, 16), generator=torch.Generator().manual_seed(0))
    tokens[:, 0] = 1
    special = torch.tensor([0, 1, 2])
    ident = _identity_sae(64).double()
    m = evaluate_core(ident, tiny_model, tokens, special_ids=special, progress=False)
    assert m["ce_loss_score"] == pytest.approx(1.0, abs=1e-5)
    assert m["kl_div_with_sae"] == pytest.approx(0.0, abs=1e-6)
    assert m["kl_div_score"] == pytest.approx(1.0, abs=1e-5)
    assert m["fvu"] == pytest.approx(0.0, abs=1e-10)
    assert m["ce_loss_with_ablation"] != m["ce_loss_without_sae"]
    zero = _identity_sae(64).double()
    with torch.no_grad():
        zero.W_dec.zero_()
    # With no special positions the zero SAE's splice is the zero ablation itself (which spares no position).
    m0 = evaluate_core(zero, tiny_model, tokens, special_ids=torch.empty(0, dtype=torch.long), progress=False)
    assert m0["ce_loss_score"] == pytest.approx(0.0, abs=1e-9)
    assert m0["kl_div_score"] == pytest.approx(0.0, abs=1e-9)


def test_sae_width_must_match_hook(tiny_model):
    sae = _identity_sae(32)
    with pytest.raises(ValueError, match="d_in=32 does not match the width 64"):
        evaluate_core(sae, tiny_model, torch.randint(3, 100, (1, 8)), progress=False)


def test_unknown_hook_lists_close_matches(tiny_model):
    from saebench.models import HookNameError

    sae = _identity_sae(64, hook="blocks.0.hook_resid_pots")
    with pytest.raises(HookNameError, match="blocks.0.hook_resid_post"):
        evaluate_core(sae, tiny_model, torch.randint(3, 100, (1, 8)), progress=False)


def test_run_core_eval_writes_json(tiny_model, tiny_model_dir, text_file, tmp_path):
    sae = _identity_sae(64, model_name=str(tiny_model_dir))
    sae.cfg = sae.cfg.model_copy(update={"context_size": 32, "metadata": {"corpus": str(text_file)}})
    sae.save(tmp_path / "sae")
    m = run_core_eval(tmp_path / "sae", tiny_model, eval_tokens=512, progress=False)
    saved = json.loads((tmp_path / "sae" / "eval_core.json").read_text())
    assert saved["ce_loss_score"] == pytest.approx(1.0, abs=1e-5) and saved["split"] == "eval"
    assert m["n_tokens"] > 0 and m["corpus"] == str(text_file)


def test_resumed_forward_equals_the_full_forward_with_a_splice(tiny_model):
    """Running only the blocks after a residual hook gives the logits of the full spliced forward."""
    from saebench.evals.core import splice_hook
    from saebench.models import resume_forward, resume_matches

    torch.manual_seed(0)
    tokens = torch.randint(3, 1000, (2, 10))
    n_layers = tiny_model.cfg.n_layers
    for hook in ["blocks.0.hook_resid_pre", HOOK, f"blocks.{n_layers - 1}.hook_resid_post"]:
        with torch.no_grad():
            logits, cache = tiny_model.run_with_cache(tokens, names_filter=lambda n, h=hook: n == h)
            run = resume_forward(tiny_model, hook)
            assert run is not None
            torch.testing.assert_close(run(cache[hook]), logits, rtol=1e-5, atol=1e-5)
            assert resume_matches(tiny_model, hook, cache[hook], logits)
            keep = torch.rand(tokens.shape) < 0.6
            new = torch.randn_like(cache[hook])
            want = tiny_model.run_with_hooks(tokens, fwd_hooks=[(hook, splice_hook(new, None, keep))])
            torch.testing.assert_close(run(torch.where(keep[..., None], new, cache[hook])), want, rtol=1e-5, atol=1e-5)
    assert resume_forward(tiny_model, "blocks.0.hook_mlp_out") is None  # inside a block: full forward


def test_core_eval_same_with_and_without_resuming(tiny_model64, monkeypatch):
    """The core metrics do not depend on whether the spliced passes resume at the hook.

    In float64: the KLs of this tiny random model are ~0.01, so float32 noise of ~1e-5 (CPU-dependent)
    would be 1e-3 relative; in float64 the two paths agree to ~1e-12.
    """
    import saebench.models as M

    tiny_model = tiny_model64
    tokens = torch.randint(3, 1000, (4, 16), generator=torch.Generator().manual_seed(0))
    tokens[:, 0] = 1
    sae = SAE(SAEConfig(architecture="topk", d_in=64, d_sae=96, k=5, hook_name=HOOK))
    sae.init_tied(torch.Generator().manual_seed(0))
    sae = sae.double()
    ids = torch.tensor([0, 1, 2])
    calls = []
    real = M.resume_forward
    monkeypatch.setattr(M, "resume_forward", lambda *a: calls.append(a) or real(*a))
    tiny_model.__dict__.pop("_saebench_resume_ok", None)
    resumed = evaluate_core(sae, tiny_model, tokens, special_ids=ids, progress=False)
    assert calls, "the eval did not resume at the residual hook"
    monkeypatch.setattr(M, "resume_forward", lambda *a: None)
    tiny_model.__dict__.pop("_saebench_resume_ok", None)
    full = evaluate_core(sae, tiny_model, tokens, special_ids=ids, progress=False)
    tiny_model.__dict__.pop("_saebench_resume_ok", None)
    for key in ("ce_loss_with_sae", "ce_loss_without_sae", "ce_loss_with_ablation", "ce_loss_score", "kl_div_with_sae", "kl_div_score"):
        assert resumed[key] == pytest.approx(full[key], rel=1e-8, abs=1e-10), key


def test_zero_ablation_zeroes_every_position_as_saebench_does(tiny_model):
    """CE/KL with ablation: the site zeroed at *every* position, BOS included (SAEBench's convention)."""
    import torch.nn.functional as F

    from saebench.evals.core import ZeroAblation

    torch.manual_seed(1)
    tokens = torch.randint(3, 1000, (3, 12))
    tokens[:, 0] = 1
    ids = torch.tensor([0, 1, 2])
    sae = _identity_sae(64)
    m = evaluate_core(sae, tiny_model, tokens, special_ids=ids, progress=False)
    with torch.no_grad():
        clean = tiny_model(tokens)
        zeroed = tiny_model.run_with_hooks(tokens, fwd_hooks=[(HOOK, lambda act, hook: torch.zeros_like(act))])
    lp, lq = F.log_softmax(clean.float(), -1), F.log_softmax(zeroed.float(), -1)
    ce = -lq[:, :-1].gather(-1, tokens[:, 1:, None]).squeeze(-1)  # every target here is a non-special token
    kl = (lp.exp() * (lp - lq)).sum(-1)[:, 1:]  # KL over the non-BOS positions
    assert m["ce_loss_with_ablation"] == pytest.approx(ce[:, 1:].mean().item(), rel=1e-5)
    assert m["kl_div_with_ablation"] == pytest.approx(kl.mean().item(), rel=1e-3, abs=1e-5)  # float32 Σp·log p − Σp·log q
    # A bias-free Llama carries nothing forward from an all-zero residual stream: uniform logits, CE = ln V.
    assert m["ce_loss_with_ablation"] == pytest.approx(math.log(tiny_model.cfg.d_vocab), rel=1e-5)
    # At a residual hook the zero-ablated logits do not depend on the tokens: one row, computed once per eval.
    za = ZeroAblation(tiny_model, HOOK, None)
    with torch.no_grad():
        logits, cache = tiny_model.run_with_cache(tokens, names_filter=lambda n: n == HOOK)
        row = za.logprobs(tokens, cache[HOOK], logits)
        assert row.shape == (1, 12, tiny_model.cfg.d_vocab)
        torch.testing.assert_close(row.expand_as(lq), lq, rtol=1e-5, atol=1e-5)
        assert za.logprobs(tokens[:2], cache[HOOK][:2], logits[:2]) is row


def test_resume_falls_back_on_a_mismatch(tiny_model):
    """A resumed pass that disagrees with the full forward is never used (checked once, remembered)."""
    from saebench.models import resume_matches

    tokens = torch.randint(3, 1000, (2, 8))
    with torch.no_grad():
        logits, cache = tiny_model.run_with_cache(tokens, names_filter=lambda n: n == HOOK)
    tiny_model.__dict__.pop("_saebench_resume_ok", None)
    assert not resume_matches(tiny_model, HOOK, cache[HOOK], logits + 1.0)
    assert not resume_matches(tiny_model, HOOK, cache[HOOK], logits)  # remembered for this model and hook
    tiny_model.__dict__.pop("_saebench_resume_ok", None)


def test_a_reconstruction_that_blows_up_only_on_outlier_tokens_warns():
    """FVU > 1 on all tokens but < 1 without the outliers (threshold SAEs on attention sinks): a clear warning, not silence."""
    from saebench.config import SaebenchWarning
    from saebench.evals.core import CoreAccumulator
    from saebench.sparse import SparseActs

    g = torch.Generator().manual_seed(0)
    x = torch.randn(200, 8, generator=g)
    x[[3, 77]] *= 50.0
    acts = SparseActs(torch.ones(200, 1), torch.zeros(200, 1, dtype=torch.long))
    sae = SAE(SAEConfig(architecture="jumprelu", d_in=8, d_sae=4, hook_name="blocks.0.hook_resid_post"))

    def result(x_hat):
        acc = CoreAccumulator(sae)
        acc.add_reconstruction(x, x_hat, acts)
        return acc.result(downstream=False)

    good = x + 0.1 * torch.randn(200, 8, generator=g)
    blown = good.clone()
    blown[[3, 77]] = -3 * x[[3, 77]]  # overshoots on the two outliers, as hundreds of firing latents do
    with pytest.warns(SaebenchWarning, match="2 outlier-norm tokens.*blows up"):
        m = result(blown)
    assert m["fvu"] > 1 and m["fvu_without_outliers"] < 0.02
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error", SaebenchWarning)
        assert result(good)["fvu"] < 1  # a good reconstruction stays silent
