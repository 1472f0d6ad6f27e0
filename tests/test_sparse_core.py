"""The sparse core: its gather/decode match dense autograd exactly, and the SAE's invariants hold."""

import math

import pytest
import torch
import torch.nn.functional as F

from saebench import sparse
from saebench.io import ArtifactError
from saebench.sae import SAE, SAEConfig


def _sae(arch="topk", d_in=16, d_sae=48, k=4, seed=0):
    sae = SAE(SAEConfig(architecture=arch, d_in=d_in, d_sae=d_sae, k=k if arch in ("topk", "abstopk") else None, hook_name="blocks.0.hook_resid_post"))
    g = torch.Generator().manual_seed(seed)
    sae.init_tied(g)
    with torch.no_grad():
        sae.encoder_weight.add_(0.1 * torch.randn(d_sae, d_in, generator=g))
        sae.b_enc.normal_(0, 0.1, generator=g)
        sae.b_dec.normal_(0, 0.1, generator=g)
        if arch in ("jumprelu", "abs_jumprelu"):
            sae.log_threshold.fill_(math.log(0.05))
    return sae


def test_gather_backward_matches_dense_autograd():
    torch.manual_seed(0)
    x = torch.randn(10, 16, requires_grad=True)
    W = torch.randn(48, 16, requires_grad=True)
    b = torch.randn(48, requires_grad=True)
    idx = torch.randint(0, 48, (10, 5))
    upstream = torch.randn(10, 5)
    # sparse path
    with torch.no_grad():
        pre = F.linear(x, W, b)
    out = sparse.gather_pre(x, W, b, pre, idx)
    (out * upstream).sum().backward()
    grads_sparse = [t.grad.clone() for t in (x, W, b)]
    for t in (x, W, b):
        t.grad = None
    # dense reference
    (F.linear(x, W, b).gather(1, idx) * upstream).sum().backward()
    for gs, t in zip(grads_sparse, (x, W, b)):
        torch.testing.assert_close(gs, t.grad, rtol=1e-5, atol=1e-6)


def test_sparse_decode_matches_dense():
    torch.manual_seed(1)
    W = torch.randn(48, 16)
    acts = sparse.SparseActs(torch.randn(7, 4), torch.randint(0, 48, (7, 4)))
    torch.testing.assert_close(sparse.decode(acts, W), acts.to_dense(48) @ W, rtol=1e-5, atol=1e-6)


def test_mask_to_indices_pads_and_marks_valid():
    mask = torch.tensor([[True, False, True, False], [False, False, False, False], [True, True, True, False]])
    idx, valid = sparse.mask_to_indices(mask)
    assert idx.shape == (3, 3)
    assert valid.sum(1).tolist() == [2, 0, 3]
    for row in range(3):
        assert set(idx[row][valid[row]].tolist()) == set(torch.nonzero(mask[row]).flatten().tolist())


def test_batch_topk_mask_count():
    scores = torch.randn(8, 20)
    m = sparse.batch_topk_mask(scores, 13)
    assert int(m.sum()) == 13
    assert scores[m].min() >= scores[~m].max()


@pytest.mark.parametrize("case", ["random", "one_heavy_row", "three_heavy_rows", "ties_at_zero", "k_total_is_everything"])
def test_batch_topk_select_equals_the_batch_wide_sort(case):
    """The candidate search selects what a batch-wide top-k selects, also when a row holds most winners
    (forcing m to grow) and when τ ties (ReLU zeros)."""
    g = torch.Generator().manual_seed(0)
    scores = torch.randn(64, 300, generator=g)
    k_total = 64 * 5
    if case == "one_heavy_row":
        scores[7] += 10.0  # row 7 alone holds all 300 of its entries among the winners
    elif case == "three_heavy_rows":
        scores[[2, 30, 63]] += torch.tensor([[1.5], [3.0], [2.0]])  # each holds more winners than its first candidates
    elif case == "ties_at_zero":
        scores = scores.clamp_min(0) * (torch.rand(64, 300, generator=g) < 0.01)  # fewer positives than k_total
    elif case == "k_total_is_everything":
        k_total = 64 * 300
    idx, valid = sparse.batch_topk_select(scores, k_total)
    got = torch.zeros_like(scores, dtype=torch.bool)
    got[torch.arange(64)[:, None].expand_as(idx)[valid], idx[valid]] = True
    assert int(valid.sum()) == int(got.sum()) == k_total  # exactly k_total distinct entries
    assert scores[got].min() >= scores[~got].max() if (~got).any() else True
    if case in ("random", "one_heavy_row", "three_heavy_rows"):
        assert torch.equal(got, sparse.batch_topk_mask(scores, k_total))
    assert idx.shape[1] == int(valid.sum(-1).max())  # compacted to the widest row


@pytest.mark.parametrize("arch", ["topk", "abstopk", "jumprelu", "abs_jumprelu", "relu"])
def test_sparse_encode_equals_dense_reference(arch):
    sae = _sae(arch)
    x = torch.randn(12, 16)
    pre = F.linear(x - sae.b_dec, sae.encoder_weight, sae.b_enc).detach()
    if arch == "topk":
        ref = torch.zeros_like(pre).scatter(1, pre.topk(4).indices, F.relu(pre.topk(4).values))
    elif arch == "abstopk":
        i = pre.abs().topk(4).indices
        ref = torch.zeros_like(pre).scatter(1, i, pre.gather(1, i))
    elif arch == "jumprelu":
        ref = pre * (pre > 0.05)
    elif arch == "abs_jumprelu":
        ref = pre * (pre.abs() > 0.05)
    else:
        ref = F.relu(pre)
    torch.testing.assert_close(sae.encode(x).detach(), ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(sae(x).detach(), (ref @ sae.W_dec + sae.b_dec).detach(), rtol=1e-5, atol=1e-5)


def test_abstopk_is_best_k_sparse_approximation():
    """H_k(u) = argmin_{‖z‖₀ ≤ k} ‖z − u‖² (brute force over supports, small n)."""
    import itertools

    u = torch.randn(6)
    best = min(itertools.combinations(range(6), 2), key=lambda s: sum(u[i] ** 2 for i in range(6) if i not in s))
    idx = sparse.topk_select(u.abs()[None], 2)[0]
    assert set(idx.tolist()) == set(best)


def test_decoder_projection_keeps_unit_norm():
    sae = _sae()
    x = torch.randn(32, 16)
    opt = torch.optim.SGD(sae.parameters(), lr=0.5)
    for _ in range(5):
        loss = (sae(x) - x).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        sae.project_decoder_grad()
        unit = sae.W_dec / sae.W_dec.norm(dim=-1, keepdim=True)
        radial = (sae.W_dec.grad * unit).sum(-1).abs()
        assert (radial <= 1e-5 * sae.W_dec.grad.norm(dim=-1) + 1e-8).all()  # no radial component left
        opt.step()
        sae.normalize_decoder()
        torch.testing.assert_close(sae.W_dec.norm(dim=-1), torch.ones(48))


@pytest.mark.parametrize("arch", ["topk", "jumprelu", "abstopk"])
def test_fold_activation_scale_keeps_outputs(arch):
    sae = _sae(arch)
    x = torch.randn(20, 16) * 7
    s = 0.37
    with torch.no_grad():
        trained_out = sae(x * s) / s
        trained_codes = sae.encode(x * s) / s
        sae.fold_activation_scale(s)
        torch.testing.assert_close(sae(x), trained_out, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(sae.encode(x), trained_codes, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(sae.W_dec.norm(dim=-1), torch.ones(48))


@pytest.mark.parametrize("arch", ["topk", "jumprelu"])
def test_save_load_round_trip_is_exact(tmp_path, arch):
    sae = _sae(arch)
    sae.save(tmp_path / "sae")
    loaded = SAE.load(tmp_path / "sae")
    assert loaded.cfg == sae.cfg
    for (n1, t1), (n2, t2) in zip(sae.state_dict().items(), loaded.state_dict().items()):
        assert n1 == n2 and torch.equal(t1, t2)
    x = torch.randn(5, 16)
    assert torch.equal(sae(x), loaded(x))


def test_saebench_interface_shapes():
    sae = _sae()
    assert sae.W_enc.shape == (16, 48) and sae.W_dec.shape == (48, 16)
    assert sae.b_enc.shape == (48,) and sae.b_dec.shape == (16,)
    assert sae.dtype == torch.float32 and sae.device.type == "cpu"
    assert sae.encode(torch.randn(2, 3, 16)).shape == (2, 3, 48)
    assert sae.decode(torch.zeros(2, 3, 48)).shape == (2, 3, 16)
    for f in ("model_name", "d_in", "d_sae", "hook_layer", "hook_name"):
        assert hasattr(sae.cfg, f)


def test_loads_saelens_format(tmp_path):
    import json

    from safetensors.torch import save_file

    d, n = 8, 12
    t = {"W_enc": torch.randn(d, n), "W_dec": torch.randn(n, d), "b_enc": torch.randn(n), "b_dec": torch.randn(d), "threshold": torch.rand(n)}
    save_file(t, str(tmp_path / "sae_weights.safetensors"))
    (tmp_path / "cfg.json").write_text(json.dumps({"architecture": "jumprelu", "d_in": d, "d_sae": n, "dtype": "float32",
                                                    "metadata": {"model_name": "gpt2", "hook_name": "blocks.3.hook_resid_pre"}}))
    sae = SAE.load(tmp_path)
    assert sae.cfg.hook_name == "blocks.3.hook_resid_pre" and sae.cfg.hook_layer == 3 and sae.cfg.model_name == "gpt2"
    x = torch.randn(4, d)
    pre = (x - t["b_dec"]) @ t["W_enc"] + t["b_enc"]
    ref = (pre * (pre > t["threshold"])) @ t["W_dec"] + t["b_dec"]
    torch.testing.assert_close(sae(x).detach(), ref, rtol=1e-4, atol=1e-5)


def test_wrong_width_input_is_a_clear_error():
    sae = _sae()
    with pytest.raises(ValueError, match="d_in=16"):
        sae.encode(torch.randn(3, 17))


@pytest.mark.parametrize(
    "damage, match",
    [
        ("truncate_weights", "truncated or corrupted"),
        ("bad_json", "not valid JSON"),
        ("foreign_json", "not a valid saebench SAE config"),
        ("wrong_shape", "shape"),
        ("missing_folder", "does not exist"),
        ("empty_folder", "does not exist|not an SAE folder"),
    ],
)
def test_corrupted_or_foreign_folders_give_clear_errors(tmp_path, damage, match):
    import json

    folder = tmp_path / "sae"
    _sae().save(folder)
    if damage == "truncate_weights":
        p = folder / "sae_weights.safetensors"
        p.write_bytes(p.read_bytes()[:200])
    elif damage == "bad_json":
        (folder / "cfg.json").write_text("{not json")
    elif damage == "foreign_json":
        (folder / "cfg.json").write_text(json.dumps({"format_version": 1, "hello": "world"}))
    elif damage == "wrong_shape":
        cfg = json.loads((folder / "cfg.json").read_text())
        cfg["d_sae"] = 50
        (folder / "cfg.json").write_text(json.dumps(cfg))
        (folder / "manifest.json").unlink()  # else the manifest check refuses the edited cfg.json before the shapes are read
    elif damage == "missing_folder":
        folder = tmp_path / "nope"
    elif damage == "empty_folder":
        folder = tmp_path / "empty"
        folder.mkdir()
    with pytest.raises(ArtifactError, match=match):
        SAE.load(folder)


def test_verify_reports_what_is_wrong(tmp_path):
    from saebench.io import verify_folder

    folder = _sae().save(tmp_path / "sae")
    assert verify_folder(folder) == []
    p = folder / "sae_weights.safetensors"
    data = bytearray(p.read_bytes())
    data[-5] ^= 0xFF  # flip bits in the payload
    p.write_bytes(bytes(data))
    problems = verify_folder(folder)
    assert len(problems) == 1 and "sae_weights.safetensors" in problems[0] and "checksum" in problems[0]


def test_sparse_decode_backward_matches_dense_autograd():
    """decode's gradients (to the values via embedding_bag, to W_dec via the sparse product) equal dense autograd."""
    torch.manual_seed(2)
    W = torch.randn(48, 16, requires_grad=True)
    idx = torch.randint(0, 48, (9, 5))
    idx[0, 1] = idx[0, 0]  # a repeated latent in one row (padding does this) sums
    vals = torch.randn(9, 5, requires_grad=True)
    upstream = torch.randn(9, 16)
    (sparse.decode(sparse.SparseActs(vals, idx), W) * upstream).sum().backward()
    got = (W.grad.clone(), vals.grad.clone())
    W.grad = vals.grad = None
    dense = torch.zeros(9, 48).index_put((torch.arange(9)[:, None].expand(-1, 5), idx), vals, accumulate=True)
    ((dense @ W) * upstream).sum().backward()
    torch.testing.assert_close(got[0], W.grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got[1], vals.grad, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("absolute", [False, True])
@pytest.mark.parametrize("case", ["random", "heavy_rows_outside_the_sample", "fallback_path"])
def test_batch_topk_select_threshold_path_equals_the_batch_wide_sort(case, absolute, monkeypatch):
    """The sampled-threshold path (rows strided 1 in 16 here) and its fallback select exactly the batch's top k·B, by |score| too."""
    g = torch.Generator().manual_seed(1)
    B, n, k_total = 1024, 200, 1024 * 4
    scores = torch.randn(B, n, generator=g)
    if case == "heavy_rows_outside_the_sample":
        scores[[1, 2, 3, 5]] *= 6.0  # rows the sample (0, 16, 32, ...) never sees hold most winners
    calls = []
    real = sparse._threshold_candidates
    monkeypatch.setattr(sparse, "_threshold_candidates", lambda *a, **kw: calls.append(r := real(*a, **kw)) or r)
    if case == "fallback_path":  # the sampled threshold refused: the per-row candidate search
        monkeypatch.setattr(sparse, "_threshold_candidates", lambda s, k, a, sample_rows=256: real(s, k // 20, a) and None)
    idx, valid = sparse.batch_topk_select(scores, k_total, absolute=absolute)
    got = torch.zeros_like(scores, dtype=torch.bool)
    got[torch.arange(B)[:, None].expand_as(idx)[valid], idx[valid]] = True
    ref = sparse.batch_topk_mask(scores.abs() if absolute else scores, k_total)
    assert int(valid.sum()) == k_total and torch.equal(got, ref)
    if case == "random":
        assert calls and calls[0] is not None  # the fast path served this batch


def test_take_equals_advanced_indexing_in_value_and_gradient():
    """sparse.take (index_select, whose backward is index_add) is vec[indices] with the same gradient, collisions included."""
    from saebench import sparse

    g = torch.Generator().manual_seed(0)
    vec = torch.randn(50, dtype=torch.float64, generator=g)
    idx = torch.randint(0, 50, (64, 7), generator=g)  # many repeated latents: the gradient must add them up
    w = torch.randn(64, 7, dtype=torch.float64, generator=g)
    a, b = vec.clone().requires_grad_(), vec.clone().requires_grad_()
    (sparse.take(a.exp(), idx) * w).sum().backward()
    (b.exp()[idx] * w).sum().backward()
    assert torch.equal(sparse.take(vec, idx), vec[idx])
    torch.testing.assert_close(a.grad, b.grad, rtol=1e-12, atol=1e-12)


def test_scatter_rows_dense_path_equals_the_sparse_product(monkeypatch):
    """The GPU's dense scatter + GEMM path of _scatter_rows gives the sparse COO product (forced here on the CPU)."""
    from saebench import sparse

    g = torch.Generator().manual_seed(1)
    B, K, n, d = 40, 9, 30, 7
    idx = torch.randint(0, n, (B, K), generator=g)  # duplicates within a row (padding) must add up
    coef = torch.randn(B, K, dtype=torch.float64, generator=g)
    rows = torch.randn(B, d, dtype=torch.float64, generator=g)
    want = sparse._scatter_rows(idx, coef, rows, n)
    assert not sparse._dense_scatter(rows.device, B, K, n, 8)  # never on the CPU
    assert sparse._dense_scatter(torch.device("cuda"), 4096, 288, 16384, 4)  # AuxK at the benchmark shapes on a GPU
    assert not sparse._dense_scatter(torch.device("cuda"), 4096, 32, 16384, 4)  # TopK's k: the sparse product
    monkeypatch.setattr(sparse, "_dense_scatter", lambda *a: True)
    torch.testing.assert_close(sparse._scatter_rows(idx, coef, rows, n), want, rtol=1e-12, atol=1e-12)


def test_dense_code_path_equals_the_sparse_path_in_value_and_gradient(monkeypatch):
    """Codes dense enough (ReLU + L1 early in training) decode and back-propagate through dense GEMMs: same x̂, same gradients."""
    from saebench import sparse
    from saebench.sparse import SparseActs

    g = torch.Generator().manual_seed(2)
    B, n, d, K = 24, 40, 6, 13
    x = torch.randn(B, d, dtype=torch.float64, generator=g)
    W, Wd = torch.randn(n, d, dtype=torch.float64, generator=g), torch.randn(n, d, dtype=torch.float64, generator=g)
    b = torch.randn(n, dtype=torch.float64, generator=g)
    pre = torch.addmm(b, x, W.t())
    idx = pre.topk(K, dim=-1).indices
    idx[:, -2:] = 0  # padding-style duplicates of latent 0 must add up on both paths
    w_out = torch.randn(B, d, dtype=torch.float64, generator=g)

    def run(dense: bool):
        monkeypatch.setattr(sparse, "DENSE_CODE_MIN_DENSITY", {"cpu": 0.0 if dense else 2.0})
        leaves = [t.clone().requires_grad_() for t in (x, W, b, Wd)]
        xx, WW, bb, WWd = leaves
        f = torch.relu(sparse.gather_pre(xx, WW, bb, pre, idx))
        out = sparse.decode(SparseActs(f, idx), WWd, None)
        (out * w_out).sum().backward()
        return out.detach(), [t.grad for t in leaves]

    (out_s, grads_s), (out_d, grads_d) = run(False), run(True)
    torch.testing.assert_close(out_d, out_s, rtol=1e-12, atol=1e-12)
    for a, c in zip(grads_d, grads_s):
        torch.testing.assert_close(a, c, rtol=1e-12, atol=1e-12)
    monkeypatch.undo()
    assert not sparse.dense_codes(torch.device("cpu"), 4096, 32, 4608, 4)  # TopK's codes stay sparse
    assert sparse.dense_codes(torch.device("cpu"), 4096, 2304, 4608, 4)  # ReLU + L1 at init: half the latents
    assert not sparse.dense_codes(torch.device("cuda"), 4096, 32, 16384, 4)
    assert not sparse.dense_codes(torch.device("cpu"), 1 << 20, 4608, 4608, 4)  # a dense code over 1 GiB: the sparse path


def test_relu_l1_steps_take_the_dense_code_path_while_topk_stays_sparse(monkeypatch):
    """ReLU + L1 at initialisation fires about half the latents: its code comes as all-latents rows (the dense path);
    TopK's never does, and its decode and encoder backward stay on the sparse path."""
    from saebench import sparse
    from saebench.config import TrainConfig
    from saebench.sae import SAE
    from saebench.trainers import get_method
    from saebench.trainers.base import StepInput

    taken = []
    real = sparse.dense_codes
    monkeypatch.setattr(sparse, "dense_codes", lambda *a: taken.append(real(*a)) or taken[-1])
    x = torch.randn(256, 16, generator=torch.Generator().manual_seed(0))
    for name, dense in (("standard", True), ("topk", False)):
        taken.clear()
        cfg = TrainConfig(hook_name="h", d_sae=128, k=4, training_tokens=256 * 100, batch_size_tokens=256, method=name)
        method = get_method(name)(cfg)
        sae = SAE(method.sae_config(16))
        method.param_groups(sae, 1e-3)
        method.init_sae(sae, x, torch.Generator().manual_seed(0))
        out = method.step(sae, StepInput(x=x, dead_mask=torch.zeros(128, dtype=torch.bool), step=50))
        out.loss.backward()
        assert sparse.is_all_latents(out.acts.indices, 128) == dense, name
        assert not any(taken), (name, taken)  # nothing padded went dense: standard's rows were all-latents, TopK's stay sparse
        assert dense or taken  # TopK asked, and was told sparse

def test_mask_to_indices_gives_every_latent_for_a_dense_mask_and_padded_rows_otherwise(monkeypatch):
    from saebench import sparse

    g = torch.Generator().manual_seed(3)
    dense_mask = torch.rand(16, 40, generator=g) < 0.5
    idx, valid = sparse.mask_to_indices(dense_mask, dense_ok=True)
    assert sparse.is_all_latents(idx, 40) and idx.shape == (16, 40) and idx.stride() == (0, 1)
    assert torch.equal(idx[5], torch.arange(40)) and torch.equal(valid, dense_mask)
    assert not sparse.is_all_latents(idx, 41) and not sparse.is_all_latents(torch.arange(40).repeat(16, 1), 40)  # a copy is not one
    # Without dense_ok, or sparse enough, the usual padded rows (ascending, invalid entries at latent 0).
    assert not sparse.is_all_latents(sparse.mask_to_indices(dense_mask)[0], 40)
    sparse_mask = torch.zeros(16, 40, dtype=torch.bool)
    sparse_mask[:, 3] = True
    idx, valid = sparse.mask_to_indices(sparse_mask, dense_ok=True)
    assert idx.shape == (16, 1) and bool((idx == 3).all()) and bool(valid.all())


@pytest.mark.parametrize("method,options", [("standard", {}), ("standard_constrained", {}), ("gated", {}),
                                            ("jumprelu", {"form": "paper"}), ("jumprelu", {"sparsity_mode": "target_l0", "topk_warmup_fraction": 0.0})])
def test_a_step_on_every_latent_equals_the_step_on_padded_rows(method, options, monkeypatch):
    """ReLU-family steps whose codes are dense run on all_latents rows; losses and every gradient equal the padded path's."""
    from saebench import sparse
    from saebench.config import TrainConfig
    from saebench.sae import SAE
    from saebench.trainers import get_method
    from saebench.trainers.base import StepInput

    x = torch.randn(64, 12, dtype=torch.float64, generator=torch.Generator().manual_seed(4))

    def run(dense: bool):
        monkeypatch.setattr(sparse, "DENSE_CODE_MIN_DENSITY", {"cpu": 0.0 if dense else 2.0})
        cfg = TrainConfig(hook_name="h", d_sae=48, k=4, training_tokens=64 * 100, batch_size_tokens=64, method=method,
                          method_options=options)
        m = get_method(method)(cfg)
        sae = SAE(m.sae_config(12)).to(torch.float64)
        m.param_groups(sae, 1e-3)
        m.init_sae(sae, x, torch.Generator().manual_seed(0))
        out = m.step(sae, StepInput(x=x, dead_mask=torch.zeros(48, dtype=torch.bool), step=60))
        out.loss.backward()
        assert sparse.is_all_latents(out.acts.indices, 48) == dense
        grads = {n: p.grad.clone() for n, p in sae.named_parameters() if p.grad is not None}
        return {k: v.detach() for k, v in out.losses.items()}, grads, out.acts.l0()

    (loss_d, grad_d, l0_d), (loss_s, grad_s, l0_s) = run(True), run(False)
    assert loss_d.keys() == loss_s.keys() and grad_d.keys() == grad_s.keys() and grad_d
    for k in loss_d:
        torch.testing.assert_close(loss_d[k], loss_s[k], rtol=1e-10, atol=1e-12)
    for k in grad_d:
        torch.testing.assert_close(grad_d[k], grad_s[k], rtol=1e-9, atol=1e-12, msg=lambda m, k=k: f"{k}: {m}")
    assert torch.equal(l0_d, l0_s)


def test_all_latent_rows_back_propagate_densely_even_above_the_dense_size_cap(monkeypatch):
    """The [B, n] code of all-latents rows exists already: the cap on densifying padded rows does not send them down the
    gathered-rows path (which cannot take their stride-0 view efficiently); gradients equal the padded path's."""
    from saebench import sparse
    from saebench.sparse import SparseActs

    g = torch.Generator().manual_seed(5)
    B, n, d = 16, 24, 5
    x, W, Wd = (torch.randn(*s, dtype=torch.float64, generator=g) for s in ((B, d), (n, d), (n, d)))
    b = torch.randn(n, dtype=torch.float64, generator=g)
    pre = torch.addmm(b, x, W.t())
    mask = pre > 0

    def grads(idx, valid):
        leaves = [t.clone().requires_grad_() for t in (x, W, b, Wd)]
        f = torch.relu(sparse.gather_pre(leaves[0], leaves[1], leaves[2], pre, idx)) * valid
        sparse.decode(SparseActs(f, idx), leaves[3]).pow(2).sum().backward()
        return [t.grad for t in leaves]

    want = grads(*sparse.mask_to_indices(mask))
    monkeypatch.setattr(sparse, "DENSE_SCATTER_MAX_BYTES", 1)

    def gathered_rows(*a, **kw):
        raise AssertionError("all-latents rows went down the gathered-rows path")

    monkeypatch.setattr(sparse.F, "embedding_bag", gathered_rows)
    got = grads(sparse.all_latents(B, n, "cpu"), mask)
    for a, c in zip(got, want):
        torch.testing.assert_close(a, c, rtol=1e-12, atol=1e-12)
