"""On a GPU: a converted model on the Triton kernels against the torch path, and decoding against
the parallel forward. Prints one line per check with its relative error.

    python scripts/check_gpu_model.py
"""
from __future__ import annotations

import torch

import t2r  # noqa: F401
from t2r.convert import ConversionOptions, convert_model
from t2r.models import output_cache
from t2r.tiny import tiny_teacher


def rel(a, b) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def main() -> None:
    assert torch.cuda.is_available(), "needs a CUDA GPU"
    teacher, _ = tiny_teacher("mistral", hidden_size=256, num_attention_heads=8, num_key_value_heads=2,
                              head_dim=32, intermediate_size=512, num_layers=4)
    model = convert_model(teacher, ConversionOptions(softmax_layers="1", num_slots=64)).cuda()
    ids = torch.randint(2, 258, (4, 301), device="cuda")
    for dtype in (torch.float32, torch.bfloat16):
        m = model.to(dtype)
        with torch.no_grad():
            triton_logits = m(ids, use_cache=False).logits
            for layer in m.model.layers:
                layer.self_attn.backend = "torch" if hasattr(layer.self_attn, "f_proj") else None
            torch_logits = m(ids, use_cache=False).logits
            for layer in m.model.layers:
                layer.self_attn.backend = None
            out = m(ids[:, :200], use_cache=True)
            cache, steps = output_cache(out), [out.logits]
            for t in range(200, 301):
                steps.append(m(ids[:, t:t + 1], cache=cache, use_cache=True).logits)
        print(f"{str(dtype):15s} triton vs torch logits rel err {rel(triton_logits, torch_logits):.2e}   "
              f"decode vs parallel rel err {rel(torch.cat(steps, 1), triton_logits):.2e}")
    m = model.float().train()
    loss = m(ids, labels=ids).loss
    loss.backward()
    grads = [p.grad for n, p in m.named_parameters() if "f_proj" in n]
    print(f"train step: loss {loss.item():.4f}, f_proj grads finite: {all(torch.isfinite(g).all().item() for g in grads)}")


if __name__ == "__main__":
    main()
