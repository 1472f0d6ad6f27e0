"""GPU-oriented paths, checked through their CPU equivalents: bf16 autocast, TF32 switch, device mapping."""

import pytest
import torch
import torch.nn.functional as F
from saebench.trainers import get_method
from saebench.trainers.base import StepInput
from saebench.trainers.loop import train

from saebench import distributed, precision, sparse
from saebench.activations import SyntheticSource
from saebench.config import TrainConfig


def test_gather_pre_under_bf16_keeps_fp32_values_and_exact_sparse_backward():
    torch.manual_seed(0)
    x = torch.randn(12, 16, requires_grad=True)
    W = torch.randn(40, 16, requires_grad=True)
    b = torch.randn(40, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        with torch.no_grad():
            pre = F.linear(x, W, b)
        assert pre.dtype == torch.bfloat16
        idx = sparse.topk_select(pre, 4)
        out = sparse.gather_pre(x, W, b, pre, idx)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, F.linear(x, W, b).gather(1, idx).detach(), rtol=2e-2, atol=5e-2)  # bf16 forward values
    upstream = torch.randn(12, 4)
    (out * upstream).sum().backward()
    got = [t.grad.clone() for t in (x, W, b)]
    for t in (x, W, b):
        t.grad = None
    (F.linear(x, W, b).gather(1, idx) * upstream).sum().backward()  # fp32 reference: the backward is exact
    for g, t in zip(got, (x, W, b)):
        torch.testing.assert_close(g, t.grad, rtol=1e-5, atol=1e-5)


def test_autocast_step_is_close_to_fp32_and_keeps_fp32_master_weights():
    cfg = TrainConfig(hook_name="synthetic", d_sae=256, k=8, training_tokens=4096, batch_size_tokens=512)
    method = get_method("topk")(cfg)
    from saebench.sae import SAE

    sae = SAE(method.sae_config(32))
    sae.init_tied(torch.Generator().manual_seed(0))
    x = SyntheticSource(d=32, m=64, n_active=4, seed=0).chunk(0).acts["synthetic"][:512]
    inp = StepInput(x=x, dead_mask=torch.zeros(256, dtype=torch.bool), step=0)
    ref = method.step(sae, inp)
    with precision.autocast(True, "cpu"):
        out = method.step(sae, inp)
    assert out.acts.values.dtype == torch.float32 and out.x_hat.dtype == torch.float32
    assert out.loss.item() == pytest.approx(ref.loss.item(), rel=2e-2)
    out.loss.backward()
    assert all(p.dtype == torch.float32 and p.grad.dtype == torch.float32 for p in sae.parameters() if p.grad is not None)


def test_autocast_training_matches_fp32_training(tmp_path):
    src = SyntheticSource(d=16, m=32, n_active=2, seed=0, chunk_tokens=2048)
    common = dict(hook_name="synthetic", d_sae=64, k=2, training_tokens=256 * 60, batch_size_tokens=256, lr=4e-3, lr_warmup_steps=5,
                  dead_window_tokens=4096, log_every_steps=10)
    fp32 = train(TrainConfig(out_dir=str(tmp_path / "fp32"), **common), source=src, progress=False)
    bf16 = train(TrainConfig(out_dir=str(tmp_path / "bf16"), autocast=True, **common), source=src, progress=False)
    assert bf16.sae.W_dec.dtype == torch.float32
    assert bf16.sae.cfg.metadata["train_config"]["autocast"] is True
    assert bf16.history[-1]["fvu"] == pytest.approx(fp32.history[-1]["fvu"], abs=0.03)
    assert bf16.history[-1]["l0"] == pytest.approx(2.0)


def test_tf32_switch_only_on_cuda():
    before = (torch.get_float32_matmul_precision(), torch.backends.cuda.matmul.allow_tf32)
    assert precision.configure_matmul_precision("cpu", True) is False
    assert precision.configure_matmul_precision("cuda:0", False) is False
    assert (torch.get_float32_matmul_precision(), torch.backends.cuda.matmul.allow_tf32) == before
    try:
        assert precision.configure_matmul_precision("cuda:1", True) is True  # the flags are settable without a GPU
        assert torch.get_float32_matmul_precision() == "high" and torch.backends.cuda.matmul.allow_tf32
    finally:
        torch.set_float32_matmul_precision(before[0])
        torch.backends.cuda.matmul.allow_tf32 = before[1]
        torch.backends.cudnn.allow_tf32 = True


def test_autocast_is_a_no_op_when_off_and_device_mapping_without_launcher():
    with precision.autocast(False, "cuda"):
        assert not torch.is_autocast_enabled("cpu")
    assert precision.device_type("cuda:3") == "cuda"
    assert distributed.rank_device("cuda") == "cuda" and distributed.rank_device("cpu") == "cpu"
