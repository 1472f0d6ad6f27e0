"""g-SAE's gradient-aware selection at eval time (evals/gsae.py via the core eval) and benchmarks/bench_gsae.py."""

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from bench_loader import load_benchmark
from saebench.evals.core import evaluate_core, evaluate_hook_group
from saebench.evals.gsae import gradient_encode_sparse, gsae_beta, lm_loss_grad, spliced_loss_gap

from saebench.config import ConfigError
from saebench.sae import SAE, SAEConfig

HOOK = "blocks.0.hook_resid_post"
SPECIAL = torch.tensor([0, 1, 2])


def _gsae(beta: float = 3.0, method: str = "gsae", seed: int = 0, d_sae: int = 96, k: int = 5) -> SAE:
    sae = SAE(SAEConfig(architecture="topk", d_in=64, d_sae=d_sae, k=k, hook_name=HOOK, method=method,
                        metadata={"method_options": {"beta": beta}} if method == "gsae" else {}))
    sae.init_tied(torch.Generator().manual_seed(seed))
    with torch.no_grad():  # non-zero biases, so the pre-bias and b_enc paths are exercised
        sae.b_enc.copy_(0.05 * torch.randn(d_sae, generator=torch.Generator().manual_seed(seed + 1)))
        sae.b_dec.copy_(0.1 * torch.randn(64, generator=torch.Generator().manual_seed(seed + 2)))
    return sae


def _tokens(n=4, ctx=16, seed=0):
    t = torch.randint(3, 2000, (n, ctx), generator=torch.Generator().manual_seed(seed))
    t[:, 0] = 1  # BOS
    return t


def _reference(model, sae, tokens, beta, gradient=True):
    """Every number by hand, in float64: g from one forward over all of ``tokens``, the selection rule written out."""
    captured = {}

    def grab(a, hook):
        a = a.detach().requires_grad_(True)
        captured["a"] = a
        return a

    logits = model.run_with_hooks(tokens, fwd_hooks=[(HOOK, grab)])
    loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), tokens[:, 1:].reshape(-1))
    (g,) = torch.autograd.grad(loss, [captured["a"]])
    with torch.no_grad():
        x = captured["a"].detach().float().double()  # the core eval reads activations in float32, for every SAE
        keep = ~torch.isin(tokens, SPECIAL)
        xf, gf = x[keep], g[keep]
        W_enc, b_enc, W_dec, b_dec = (t.detach().double() for t in (sae.encoder_weight, sae.b_enc, sae.W_dec, sae.b_dec))
        pre = (xf - b_dec) @ W_enc.T + b_enc
        score = pre
        if gradient:
            # The last position of a sequence has g = 0 (no loss term reads it): there the rule is plain TopK.
            assert (gf.abs().sum(-1) == 0).sum() == tokens.shape[0]
            gn = gf / gf.pow(2).mean(-1, keepdim=True).sqrt().clamp_min(1e-12)
            score = pre + beta * pre.clamp_min(0) * (gn @ W_dec.T).abs()
        idx = score.topk(sae.cfg.k, dim=-1).indices
        z = torch.zeros_like(pre).scatter_(1, idx, pre.gather(1, idx).clamp_min(0))
        xhat = z @ W_dec + b_dec
        fvu = ((xf - xhat) ** 2).sum() / ((xf - xf.mean(0)) ** 2).sum()
        new = x.clone()
        new[keep] = xhat.float().double()  # the eval splices its float32 reconstruction
        spliced = model.run_with_hooks(tokens, fwd_hooks=[(HOOK, lambda a, hook: new.to(a.dtype))])
        lp_clean, lp_sae = F.log_softmax(logits.detach().double(), -1), F.log_softmax(spliced.double(), -1)
        pred = keep[:, :-1] & keep[:, 1:]
        tgt = tokens[:, 1:, None]
        ce_clean = -lp_clean[:, :-1].gather(-1, tgt).squeeze(-1)[pred]
        ce_sae = -lp_sae[:, :-1].gather(-1, tgt).squeeze(-1)[pred]
        kl = (lp_clean.exp() * (lp_clean - lp_sae)).sum(-1)[keep]
    return {"idx": idx, "fvu": fvu.item(), "l0": (z != 0).sum(-1).double().mean().item(), "ce_loss_without_sae": ce_clean.mean().item(),
            "ce_loss_with_sae": ce_sae.mean().item(), "ce_loss_abs_diff": (ce_sae - ce_clean).abs().mean().item(),
            "kl_div_with_sae": kl.mean().item()}


def test_gradient_eval_equals_a_hand_computed_reference(tiny_model64):
    """The core eval with selection='gradient' (batches of 3 sequences) equals the rule written out by hand (one batch of 4)."""
    model, tokens, beta = tiny_model64, _tokens(), 3.0
    sae = _gsae(beta).double()
    got = evaluate_core(sae, model, tokens, special_ids=SPECIAL, batch_size=3, progress=False, selection="gradient")
    plain = evaluate_core(sae, model, tokens, special_ids=SPECIAL, batch_size=3, progress=False)
    ref = _reference(model, sae, tokens, beta)
    ref_plain = _reference(model, sae, tokens, beta, gradient=False)
    # The selection really changes (else this test could not fail): many tokens get another support.
    changed = (ref["idx"].sort(-1).values != ref_plain["idx"].sort(-1).values).any(-1).double().mean().item()
    assert changed > 0.3
    assert got["selection"] == "gradient" and got["gsae_beta"] == beta and "selection" not in plain
    for r, m in ((ref, got), (ref_plain, plain)):
        assert m["n_tokens"] == 60
        assert m["l0"] == pytest.approx(r["l0"], abs=1e-12)
        # CE/KL: the eval log-softmaxes in float32 over the 49,152-token vocabulary (for every SAE), so its KL
        # (a difference of two ~10-nat sums) carries ~1e-5 absolute noise; the rest is float64.
        for key, rel, abs_ in (("fvu", 1e-6, 1e-9), ("ce_loss_without_sae", 1e-6, 1e-9), ("ce_loss_with_sae", 1e-6, 1e-9),
                               ("ce_loss_abs_diff", 1e-3, 2e-5), ("kl_div_with_sae", 1e-3, 5e-5)):
            assert m[key] == pytest.approx(r[key], rel=rel, abs=abs_), key
    assert got["ce_loss_with_sae"] != pytest.approx(plain["ce_loss_with_sae"], rel=1e-6)
    gap = spliced_loss_gap(plain, got)
    assert gap["spliced_loss_gap"] == pytest.approx((ref_plain["ce_loss_with_sae"] - ref_plain["ce_loss_without_sae"])
                                                    - (ref["ce_loss_with_sae"] - ref["ce_loss_without_sae"]), abs=2e-6)
    assert gap["abs_spliced_loss_gap"] == pytest.approx(ref_plain["ce_loss_abs_diff"] - ref["ce_loss_abs_diff"], abs=4e-5)
    assert gap["delta_ce_plain"] == pytest.approx(plain["ce_loss_with_sae"] - plain["ce_loss_without_sae"])


def test_eval_gradient_is_the_training_harvest_gradient(tiny_model):
    """lm_loss_grad gives the g the training harvest (HookedSource with_grads) stores, and no model parameter gets a .grad."""
    from saebench.activations import HookedSource

    tokens = _tokens(3, 12)
    src = HookedSource(tiny_model, [HOOK], tokens, with_grads=True)
    acts, grads = src._forward(tokens)
    logits, act, g = lm_loss_grad(tiny_model, tokens, HOOK)
    torch.testing.assert_close(act.float(), acts[0], rtol=0, atol=0)
    torch.testing.assert_close(g.float(), grads[0], rtol=1e-6, atol=1e-9)
    assert g.grad_fn is None and not g.requires_grad and logits.shape[:2] == tokens.shape
    assert all(p.grad is None for p in tiny_model.parameters())


def test_beta_zero_gradient_selection_is_plain_topk_and_sae_training_selection_is_shared():
    """β = 0 is encode_sparse bit for bit; at β > 0 the eval encoder picks the training method's indices."""
    from saebench.trainers import get_method
    from saebench.trainers.base import StepInput

    from saebench.config import TrainConfig

    sae = _gsae(0.0)
    x, g = torch.randn(50, 64, generator=torch.Generator().manual_seed(3)), torch.randn(50, 64, generator=torch.Generator().manual_seed(4))
    a, b = gradient_encode_sparse(sae, x, g, 0.0), sae.encode_sparse(x)
    assert torch.equal(a.indices.sort(-1).values, b.indices.sort(-1).values) and torch.equal(a.values.sort(-1).values, b.values.sort(-1).values)
    cfg = TrainConfig(hook_name="synthetic", d_sae=96, k=5, method="gsae", method_options={"beta": 2.0}, training_tokens=512, batch_size_tokens=50)
    method = get_method("gsae")(cfg)
    pre = sae.pre_acts(x).detach()
    train_idx, _ = method.select(pre, StepInput(x=x, dead_mask=torch.zeros(96, dtype=torch.bool), step=0, grads=7.0 * g), sae)
    ev = gradient_encode_sparse(sae, x, g, 2.0)
    assert torch.equal(ev.indices.sort(-1).values, train_idx.sort(-1).values)  # g's scale does not matter (unit RMS)
    assert not torch.equal(ev.indices.sort(-1).values, b.indices.sort(-1).values)


def test_gradient_selection_refuses_an_sae_that_is_not_a_gsae(tiny_model):
    tokens = _tokens(2, 8)
    topk = _gsae(method="topk")
    with pytest.raises(ConfigError, match="not a g-SAE.*selection='plain'"):
        evaluate_core(topk, tiny_model, tokens, special_ids=SPECIAL, progress=False, selection="gradient")
    with pytest.raises(ConfigError, match="not a g-SAE"):  # one SAE of a group is enough to refuse the group
        evaluate_hook_group([_gsae(), topk], tiny_model, tokens, special_ids=SPECIAL, progress=False, selection="gradient")
    with pytest.raises(ConfigError, match="selection must be one of"):
        evaluate_core(_gsae(), tiny_model, tokens, special_ids=SPECIAL, progress=False, selection="gradients")
    relu = SAE(SAEConfig(architecture="relu", d_in=64, d_sae=96, hook_name=HOOK, method="gsae"))
    with pytest.raises(ConfigError, match="not a TopK SAE"):
        gsae_beta(relu)
    assert gsae_beta(_gsae(0.25)) == 0.25
    assert gsae_beta(SAE(SAEConfig(architecture="topk", d_in=8, d_sae=16, k=2, method="gsae"))) == 1.0  # the method's default


def _load_bench():
    return load_benchmark("bench_gsae")


def test_bench_gsae_tiny_runs_and_resumes(tmp_path, monkeypatch):
    bench = _load_bench()
    out, runs = tmp_path / "out", tmp_path / "runs"
    argv = ["--tiny", "--out", str(out), "--runs-dir", str(runs), "--quiet", "--betas", "0.1", "10"]
    rows = bench.main(argv)
    assert [r["key"] for r in rows] == ["topk/seed0", "gsae_beta0.1/seed0", "gsae_beta10/seed0"]
    saved = json.loads((out / "gsae.json").read_text())
    assert (out / "gsae.md").read_text().count("| gsae_beta10 |") == 3  # plain, gradient and the gap row
    top = saved["rows"][0]
    assert "gradient" not in top and "gap" not in top and top["plain"]["l0"] == pytest.approx(4.0)
    for r in saved["rows"][1:]:
        assert r["gradient"]["l0"] == pytest.approx(4.0)
        assert r["gap"]["spliced_loss_gap"] == pytest.approx(r["plain"]["delta_ce"] - r["gradient"]["delta_ce"])
        assert r["train_seconds"] is not None and r["method_options"]["beta"] in (0.1, 10.0)
    top_dce = top["plain"]["delta_ce"]
    for entry in saved["summary"]:
        if entry["selection"] == "gradient":
            row = next(r for r in saved["rows"] if r["name"] == entry["name"])
            assert entry["vs_topk"]["gradient"] == [pytest.approx(row["gradient"]["delta_ce"] - top_dce)]
            assert entry["vs_topk"]["plain"] == [pytest.approx(row["plain"]["delta_ce"] - top_dce)]
    for r in saved["rows"]:  # the SAE folders are named by the SAE and its resolved options
        assert json.loads((Path(r["sae_dir"]) / "cfg.json").read_text())["method"] == r["name"].split("_")[0]
        assert Path(r["sae_dir"]).name == f"{r['name']}_seed0_{bench.bm.options_tag(r['resolved_options'])}"
    fig = bench.figure(saved["rows"], bench.sae_names([0.1, 10.0]), saved["meta"])  # what gsae_vs_topk.html draws
    assert (out / "gsae_vs_topk.html").stat().st_size > 1000
    plain = next(t for t in fig.data if t.name == "plain selection")
    assert list(plain.x) == [0.1, 10.0] and plain.y[1] == pytest.approx(saved["rows"][2]["plain"]["delta_ce"] - top_dce)
    # A second run finds every row: nothing is trained or evaluated again.
    from saebench.trainers import loop

    monkeypatch.setattr(loop, "train_many", lambda *a, **k: pytest.fail("trained again"))
    monkeypatch.setattr(bench, "evaluate", lambda *a, **k: pytest.fail("evaluated again"))
    again = bench.main(argv)
    assert [r["plain"] for r in again] == [r["plain"] for r in rows]
    history = json.loads((out / "gsae.json").read_text())["meta"]["earlier_runs"]  # the first run's record is kept
    assert [h["date"] for h in history] == [saved["meta"]["date"]] and "earlier_runs" not in history[0]
    # A lost row (an interrupted run) is evaluated again from its finished SAE folder, without training.
    kept = [r for r in saved["rows"] if r["name"] != "gsae_beta10"]
    (out / "gsae.json").write_text(json.dumps(saved | {"rows": kept}))
    monkeypatch.undo()
    monkeypatch.setattr(loop, "train_many", lambda *a, **k: pytest.fail("trained again"))
    redone = bench.main(argv)
    assert redone[-1]["key"] == "gsae_beta10/seed0" and redone[-1]["gradient"] == rows[-1]["gradient"]
    monkeypatch.undo()
    # A default changes (TopK's options now resolve differently): its row is stale, so TopK alone is retrained, into a
    # new folder, and the g-SAE rows are kept.
    real_resolve = bench.bm.resolved_options
    monkeypatch.setattr(bench.bm, "resolved_options", lambda m, o=None: real_resolve(m, o) | ({"auxk_coef": 0.25} if m == "topk" else {}))
    trained = []
    real_train_many = loop.train_many
    monkeypatch.setattr(loop, "train_many", lambda cfgs, *a, **k: (trained.extend(c.method for c in cfgs), real_train_many(cfgs, *a, **k))[1])
    after = {r["key"]: r for r in bench.main(argv)}
    assert trained == ["topk"] and after["topk/seed0"]["resolved_options"]["auxk_coef"] == 0.25
    assert after["topk/seed0"]["sae_dir"] != rows[0]["sae_dir"] and after["gsae_beta10/seed0"]["plain"] == rows[-1]["plain"]


def test_reconstruction_cli_evaluates_a_saved_gsae_with_gradient_selection(tiny_model_dir, text_file, tmp_path):
    from saebench.evals.reconstruction import main

    sae = _gsae(3.0)
    sae.cfg = sae.cfg.model_copy(update={"model_name": str(tiny_model_dir), "context_size": 32,
                                         "metadata": {"method_options": {"beta": 3.0}, "corpus": str(text_file)}})
    sae.save(tmp_path / "g")
    grad = main([str(tmp_path / "g"), "--eval-tokens", "256", "--no-progress", "--selection", "gradient", "--out", str(tmp_path / "grad.json")])
    plain = main([str(tmp_path / "g"), "--eval-tokens", "256", "--no-progress", "--out", str(tmp_path / "plain.json")])
    assert json.loads((tmp_path / "grad.json").read_text())["selection"] == "gradient" and grad["gsae_beta"] == 3.0
    assert grad["n_tokens"] == plain["n_tokens"] > 0 and grad["ce_loss_with_sae"] != plain["ce_loss_with_sae"]
