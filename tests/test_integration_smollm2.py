"""End to end on the real SmolLM2-135M (the embedded default): harvest, train, save, evaluate."""

import pytest
import torch

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smollm2():
    from saebench.models import load_model

    return load_model()


def test_train_and_evaluate_topk_on_smollm2(smollm2, tmp_path):
    from saebench import TrainConfig, load_sae
    from saebench.api import train_and_evaluate

    cfg = TrainConfig(hook_name="blocks.3.hook_resid_post", k=16, expansion_factor=2, training_tokens=24 * 1024, batch_size_tokens=1024,
                      context_size=64, lr=2e-3, lr_warmup_steps=2, eval_tokens=1024, out_dir=str(tmp_path / "sae"), model_batch_size=8)
    result, metrics = train_and_evaluate(cfg, model=smollm2, progress=False)
    sae = load_sae(result.out_dir)
    assert sae.cfg.d_in == 576 and sae.cfg.d_sae == 1152 and sae.cfg.hook_layer == 3 and sae.cfg.model_name == "smollm2-135m"
    assert metrics["l0"] <= 16 and 0 < metrics["fvu"] < 1
    assert metrics["ce_loss_with_ablation"] > metrics["ce_loss_with_sae"] > metrics["ce_loss_without_sae"] > 2
    assert torch.isfinite(torch.tensor([metrics["kl_div_score"], metrics["ce_loss_score"]])).all()
    # the trained SAE reconstructs real activations it never saw better than their mean does
    assert metrics["explained_variance"] > 0.3


def test_skip_transcoder_mlp_in_to_out_on_smollm2_spliced_at_the_mlp_output(smollm2, tmp_path):
    """Issue #18.7: a transcoder on SmolLM2's layer-3 MLP (normalised input -> MLP output), both hooks from one harvest,
    evaluated with its prediction in place of the MLP's output."""
    from saebench import TrainConfig, load_sae
    from saebench.api import train_and_evaluate

    cfg = TrainConfig(hook_name="blocks.3.ln2.hook_normalized", target_hook="blocks.3.hook_mlp_out", skip_transcoder=True, k=16,
                      expansion_factor=2, training_tokens=24 * 1024, batch_size_tokens=1024, context_size=64, lr=2e-3, lr_warmup_steps=2,
                      eval_tokens=1024, out_dir=str(tmp_path / "tc"), model_batch_size=8)
    result, metrics = train_and_evaluate(cfg, model=smollm2, progress=False)
    tc = load_sae(result.out_dir)
    assert tc.cfg.d_out == 576 and tc.cfg.hook_name_out == "blocks.3.hook_mlp_out" and tc.W_skip.shape == (576, 576)
    assert metrics["hook_name_out"] == "blocks.3.hook_mlp_out" and metrics["l0"] <= 16 and 0 < metrics["fvu"] < 1
    # the MLP replaced by the transcoder loses less than the MLP zeroed
    assert metrics["ce_loss_with_ablation"] > metrics["ce_loss_with_sae"] > metrics["ce_loss_without_sae"] > 2
    assert 0 < metrics["ce_loss_score"] <= 1
