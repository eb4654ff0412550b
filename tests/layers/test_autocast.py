"""Every conversion option trains under bf16 and fp16 autocast on the Triton kernels (run by the
Triton interpreter on CPU): a finetune step and an attention-transfer step give finite losses and
gradients. (``use_rope: true`` used to crash here: RoPE promoted q and k to fp32 while v stayed
half precision.)"""
import pytest
import torch

from tests.conftest import converted
from tests.kernels.triton_interp import DEVICE, triton_interpreter

# together these take every value of every option
OPTION_SETS = {
    "paper": dict(),
    "rope-kept": dict(use_rope=True),
    "close-to-teacher": dict(feature_map="identity", use_rope=True, v_activation="identity", output_norm=False),
    "softmax-key-gate": dict(feature_map="softmax", gate_source="key", gate_logit_normalizer=16),
    "linear-window": dict(feature_map="linear", use_rope=True, window_size=4, f_proj_init="random"),
    "hedgehog-window-key": dict(feature_map="hedgehog", gate_source="key", window_size=3, use_rope=True),
    "relu-elu": dict(feature_map="relu", num_slots=8),
    "elu1-scale": dict(feature_map="elu1", gsa_scale=0.5, softmax_layers="1"),
}


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("name", OPTION_SETS)
def test_option_trains_under_autocast_on_triton(name, dtype):
    _, model, _ = converted("llama", **OPTION_SETS[name])
    model.config.gsa_backend = "triton"
    for layer in model.model.layers:
        if hasattr(layer.self_attn, "backend"):
            layer.self_attn.backend = "triton"
    model.to(DEVICE).train()
    ids = torch.randint(2, 258, (2, 19), device=DEVICE)
    with triton_interpreter(), torch.autocast(DEVICE, dtype=dtype):
        loss = model(ids, labels=ids).loss
        loss.backward()
        transfer = model(ids, attention_transfer=True).loss
        transfer.backward()
    assert torch.isfinite(loss) and torch.isfinite(transfer) and transfer > 0
    grads = {n: p.grad for n, p in model.named_parameters()}
    assert all(g is not None and torch.isfinite(g).all() for g in grads.values())
    assert grads["model.layers.0.self_attn.q_proj.weight"].abs().sum() > 0
