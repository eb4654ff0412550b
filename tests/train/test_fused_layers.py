"""model.fused_layers: which layers a run takes where, the errors for a choice that cannot run, and
(on a CUDA GPU) the same loss and gradients from liger's RMSNorm and SwiGLU kernels as from torch's."""
import pytest
import torch

from t2r.errors import T2RError
from t2r.train.config import ModelConfig
from t2r.train.fused_layers import liger_layer_functions, resolve_fused_layers, use_fused_layers
from tests.conftest import converted

CUDA = torch.cuda.is_available()


def test_auto_is_torch_off_gpus_and_under_fsdp_and_liger_fails_clearly_there():
    assert resolve_fused_layers("auto", "cpu")[0] == "off"
    assert resolve_fused_layers("off", "cpu")[0] == "off"
    assert resolve_fused_layers("auto", "cuda", sharded=True) == ("off", "model.fused_layers: auto, under FSDP")
    assert resolve_fused_layers("auto", "cuda", compiled=True) == (
        "off", "model.fused_layers: auto, under model.compile (the compiled layers fuse them)")
    with pytest.raises(T2RError, match="not supported under FSDP"):
        resolve_fused_layers("liger", "cuda", sharded=True)
    with pytest.raises(T2RError, match="must be one of auto, liger, off"):
        resolve_fused_layers("fast", "cpu")
    if liger_layer_functions()[0] is not None:
        with pytest.raises(T2RError, match="need a CUDA GPU; set model.fused_layers: auto"):
            resolve_fused_layers("liger", "cpu")


def test_yaml_off_reads_as_off():
    assert ModelConfig(source="x", fused_layers=False).fused_layers == "off"
    assert ModelConfig(source="x", fused_layers=True).fused_layers == "auto"
    assert ModelConfig(source="x").fused_layers == "off"  # opt-in until its speed is measured


@pytest.mark.skipif(liger_layer_functions()[0] is None, reason="liger-kernel does not import")
def test_every_norm_and_swiglu_is_taken_and_the_weights_do_not_change():
    _, model, _ = converted(output_norm=True)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    counts = use_fused_layers(model)
    layers = model.config.num_hidden_layers
    # two per decoder layer, the final norm, each GSA layer's output norm; one MLP per layer
    assert counts == {"RMSNorm": 3 * layers + 1, "SwiGLU": layers}
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


@pytest.mark.skipif(not CUDA or liger_layer_functions()[0] is None, reason="liger's kernels need a CUDA GPU")
def test_liger_layers_give_torch_loss_and_gradients_on_gpu():
    torch.manual_seed(0)
    models = []
    for fused in (False, True):
        _, model, _ = converted(output_norm=True)
        model = model.cuda().train()
        if fused:
            use_fused_layers(model)
        models.append(model)
    ids = torch.randint(2, 258, (2, 96), device="cuda")
    losses, grads = [], []
    for model in models:
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        losses.append(loss.detach())
        grads.append({n: p.grad for n, p in model.named_parameters() if p.grad is not None})
    assert torch.isfinite(losses[1]) and abs(losses[0] - losses[1]) < 2e-3 * losses[0]
    assert grads[0].keys() == grads[1].keys()
    for n, g in grads[0].items():
        err = (g - grads[1][n]).norm() / g.norm().clamp_min(1e-12)
        assert err < 3e-2, (n, err.item())
