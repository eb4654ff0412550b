"""token_cross_entropy (the models' next-token loss, a block of rows at a time) against
F.cross_entropy on fp32 logits: the same losses and gradients, ignored targets included, and
less memory kept for the backward."""
import pytest
import torch
import torch.nn.functional as F

from t2r.models.lm_loss import token_cross_entropy
from t2r.models.modeling_t2r import causal_lm_loss
from tests.kernels.gsa_inputs import rel_err


def _case(dtype, n=37, vocab=50, seed=0):
    gen = torch.Generator().manual_seed(seed)
    logits = (torch.randn(n, vocab, generator=gen) * 4).to(dtype).requires_grad_()
    target = torch.randint(0, vocab, (n,), generator=gen)
    target[::5] = -100
    return logits, target


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows", [None, 1, 8])  # one block, a row at a time, blocks with a short last one
def test_token_cross_entropy_gives_fp32_cross_entropy_losses_and_gradients(dtype, rows):
    logits, target = _case(dtype)
    weights = torch.rand(target.shape, generator=torch.Generator().manual_seed(1))
    ref = F.cross_entropy(logits.float(), target, ignore_index=-100, reduction="none")
    (ref * weights).sum().backward()
    want = logits.grad.clone()
    logits.grad = None
    got = token_cross_entropy(logits, target, rows=rows)
    (got * weights).sum().backward()
    assert got.dtype == torch.float32 and rel_err(got, ref) < 1e-6
    assert (got[target == -100] == 0).all()
    assert logits.grad.dtype == dtype
    assert rel_err(logits.grad, want) < (1e-6 if dtype == torch.float32 else 1e-2)
    assert (logits.grad[target == -100] == 0).all()


def test_causal_lm_loss_keeps_the_mean_sum_and_trainer_normalisation():
    logits, labels = torch.randn(2, 9, 30, requires_grad=True), torch.randint(0, 30, (2, 9))
    labels[0, :3] = -100
    flat, target = logits[:, :-1].reshape(-1, 30), labels[:, 1:].reshape(-1)
    ref = F.cross_entropy(flat, target, ignore_index=-100, reduction="sum")
    assert rel_err(causal_lm_loss(logits, labels, reduction="sum"), ref) < 1e-6
    assert rel_err(causal_lm_loss(logits, labels), ref / (target != -100).sum()) < 1e-6
    assert rel_err(causal_lm_loss(logits, labels, num_items_in_batch=torch.tensor(40)), ref / 40) < 1e-6
    with pytest.raises(ValueError, match="reduction"):
        causal_lm_loss(logits, labels, reduction="none")


def test_token_cross_entropy_keeps_no_fp32_copy_of_the_logits_for_the_backward():
    logits, target = _case(torch.bfloat16, n=64, vocab=4096)
    saved = []

    def pack(t):
        saved.append(t.numel() * t.element_size())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        token_cross_entropy(logits, target).sum()
    bf16_logits = logits.numel() * 2
    assert sum(saved) < bf16_logits * 1.1  # the logits themselves and a few bytes per row
    saved.clear()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        F.cross_entropy(logits.float(), target, ignore_index=-100)
    assert sum(saved) >= 2 * bf16_logits  # transformers' way keeps the fp32 log-softmax (4 bytes a logit)
