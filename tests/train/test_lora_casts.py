"""lora_input_casts_off: under autocast, peft's LoRA layers stop copying their input to fp32 (and autocast
back), with the same loss and gradients; without autocast nothing changes."""
import contextlib

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from t2r.train.config import LoraConfig
from t2r.train.stages import add_lora, lora_input_casts_off
from tests.conftest import converted


class _Casts(TorchDispatchMode):
    """Counts dtype casts of activation-sized tensors (the LoRA layers' inputs)."""

    def __init__(self, min_numel: int):
        super().__init__()
        self.min_numel, self.n = min_numel, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func is torch.ops.aten._to_copy.default and out.numel() >= self.min_numel:
            self.n += 1
        return out


def _lora_model():
    _, model, _ = converted(family="llama", dtype=torch.bfloat16)
    model = add_lora(model, LoraConfig(rank=4, alpha=8, dropout=0.0))
    for p in model.parameters():  # as the finetune loop trains them: fp32 adapters, bf16 frozen weights
        if p.requires_grad:
            p.data = p.data.float()
    return model


def _step(model, ids, casts_off: bool):
    counter = _Casts(ids.numel() * model.config.hidden_size)
    with counter, torch.autocast("cpu", dtype=torch.bfloat16):
        with lora_input_casts_off(model) if casts_off else contextlib.nullcontext():
            loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return loss.detach(), grads, counter.n


def test_lora_input_casts_off_gives_the_same_loss_and_gradients_with_fewer_casts():
    torch.manual_seed(0)
    model = _lora_model()
    ids = torch.randint(2, 258, (2, 24))
    loss, grads, casts = _step(model, ids, casts_off=False)
    loss_off, grads_off, casts_off = _step(model, ids, casts_off=True)
    assert torch.equal(loss, loss_off)
    assert grads.keys() == grads_off.keys() and any("lora_A" in n for n in grads)
    for n in grads:
        assert torch.equal(grads[n], grads_off[n]), n
    lora_layers = sum(1 for m in model.modules() if hasattr(m, "lora_A") and hasattr(m, "cast_input_dtype_enabled"))
    assert casts - casts_off >= 2 * lora_layers  # every LoRA layer: its input to fp32 and back, forward
    assert all(m.cast_input_dtype_enabled for m in model.modules() if hasattr(m, "cast_input_dtype_enabled"))


def test_lora_input_casts_stay_on_without_autocast():
    model = _lora_model()
    with lora_input_casts_off(model):
        flags = [m.cast_input_dtype_enabled for m in model.modules() if hasattr(m, "cast_input_dtype_enabled")]
    assert flags and all(flags)
