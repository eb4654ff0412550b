"""The sums a training step divides by its token count, against the same sums written out by hand in
plain torch: the next-token cross-entropy over the tokens that have a next token (right padding and
packed documents), the KL to the original checkpoint's distribution, and the attention-transfer error
of each GSA layer against the teacher's own attention on the teacher's hidden states."""
import pytest
import torch

from t2r.train.config import AttentionTransferStage, FinetuneStage
from t2r.train.data import collate
from t2r.train.stages import add_lora, count_targets, frozen_teacher, stage_loss_sum
from tests.conftest import converted

LENGTHS = (12, 7)  # two rows, the second right-padded to the first


def _padded(lengths=LENGTHS, seed=1):
    g = torch.Generator().manual_seed(seed)
    rows = [{"input_ids": torch.randint(2, 258, (n,), generator=g).tolist()} for n in lengths]
    return collate(rows, pad_id=1)


def _packed(doc_lens=((5, 11), (16,)), seed=2):
    g = torch.Generator().manual_seed(seed)
    rows = [{"input_ids": torch.randint(2, 258, (sum(d),), generator=g).tolist(), "doc_lens": list(d)}
            for d in doc_lens]
    return collate(rows, pad_id=1)


def _documents(batch):
    """(row, first position, length) of every document in the batch."""
    B, T = batch["input_ids"].shape
    if "cu_seqlens" in batch:
        cu = batch["cu_seqlens"].tolist()
        return [(a // T, a % T, b - a) for a, b in zip(cu[:-1], cu[1:])]
    return [(i, 0, int(n)) for i, n in enumerate(batch["attention_mask"].sum(1))]


def _hand_ce(logits, batch):
    """Sum over documents and positions t < len - 1 of -log softmax(logits[t])[token t + 1]; the count."""
    ids, total, count = batch["input_ids"], 0.0, 0
    for row, start, n in _documents(batch):
        for t in range(start, start + n - 1):
            total += -torch.log_softmax(logits[row, t].double(), -1)[ids[row, t + 1]].item()
            count += 1
    return total, count


def _hand_kl(student_logits, teacher_logits, batch, temperature):
    """t**2 * sum over the same positions of sum_v p(v) (log p(v) - log q(v)), p the teacher's at t."""
    total = 0.0
    for row, start, n in _documents(batch):
        for t in range(start, start + n - 1):
            log_p = torch.log_softmax(teacher_logits[row, t].double() / temperature, -1)
            log_q = torch.log_softmax(student_logits[row, t].double() / temperature, -1)
            total += (log_p.exp() * (log_p - log_q)).sum().item()
    return total * temperature ** 2


def _inputs(batch):
    return {k: v for k, v in batch.items() if k != "labels"}


@pytest.mark.parametrize("fused", ["off", "chunked"])
@pytest.mark.parametrize("make_batch", [_padded, _packed], ids=["right-padded", "packed"])
def test_next_token_loss_sum_and_count_by_hand(make_batch, fused):
    _, model, _ = converted("llama", softmax_layers="1", num_slots=8)
    stage = FinetuneStage(name="finetune", steps=1, lr=1e-3, lora=None)
    batch = make_batch()
    with torch.no_grad():
        logits = model(**_inputs(batch)).logits
        loss, parts = stage_loss_sum(model, batch, stage, fused=fused, chunk_size=5)
    want, count = _hand_ce(logits, batch)
    assert count_targets(batch, stage).item() == count
    assert count == sum(n - 1 for _, _, n in _documents(batch))  # no target across padding or documents
    assert loss.item() == pytest.approx(want, rel=1e-5)
    assert parts["ce"].item() == pytest.approx(want, rel=1e-5) and "kl" not in parts


@pytest.mark.parametrize("lora", [False, True], ids=["full-frozen-teacher", "lora-adapters-off"])
@pytest.mark.parametrize("fused", ["off", "chunked"])
def test_kl_to_the_original_checkpoint_by_hand(lora, fused):
    """The KL's teacher is the checkpoint the run started from (here the transformers model itself),
    whether the student moved by its adapters or by all its weights."""
    original, model, _ = converted("llama", softmax_layers="1", num_slots=8)
    stage = FinetuneStage(name="finetune", steps=1, lr=1e-3, kl_weight=0.5, kl_temperature=2.0,
                          lora={"rank": 4} if lora else None)
    teacher = None
    with torch.no_grad():
        if lora:
            model = add_lora(model, stage.lora)
            for n, p in model.named_parameters():
                if "lora_B" in n:
                    p.normal_(0, 0.05)
        else:
            teacher = frozen_teacher(model)
            for p in model.parameters():
                p.add_(0.01 * torch.randn_like(p))
        batch = _padded()
        student_logits = model(**_inputs(batch)).logits
        original_logits = original(**_inputs(batch)).logits
        loss, parts = stage_loss_sum(model, batch, stage, teacher, fused=fused, chunk_size=5)
    ce, _ = _hand_ce(student_logits, batch)
    kl = _hand_kl(student_logits, original_logits, batch, 2.0)
    assert kl > 0
    assert parts["ce"].item() == pytest.approx(ce, rel=1e-5)
    assert parts["kl"].item() == pytest.approx(kl, rel=1e-3)
    assert loss.item() == pytest.approx(ce + 0.5 * kl, rel=1e-5)


def _teacher_attention(original, batch):
    """Each layer's softmax attention input and output in the transformers teacher: {layer: (x, out)}."""
    seen, handles = {}, []
    for i, layer in enumerate(original.model.layers):
        def pre(module, args, kwargs, i=i):
            seen[i] = [kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]]

        def post(module, args, kwargs, out, i=i):
            seen[i].append(out[0] if isinstance(out, tuple) else out)

        handles.append(layer.self_attn.register_forward_pre_hook(pre, with_kwargs=True))
        handles.append(layer.self_attn.register_forward_hook(post, with_kwargs=True))
    try:
        original(**_inputs(batch))
    finally:
        for h in handles:
            h.remove()
    return seen


def _gsa_outputs_on(model, inputs_per_layer, batch):
    """Each GSA layer's output when it is fed ``inputs_per_layer[layer]`` (a plain forward, no transfer)."""
    out, handles = {}, []
    for i in model.config.gsa_layers:
        attn = model.model.layers[i].self_attn
        handles.append(attn.register_forward_pre_hook(lambda m, args, i=i: (inputs_per_layer[i], *args[1:])))
        handles.append(attn.register_forward_hook(lambda m, args, o, i=i: out.__setitem__(i, o)))
    try:
        model(**_inputs(batch))
    finally:
        for h in handles:
            h.remove()
    return out


@pytest.mark.parametrize("window", [0, 4], ids=["gsa", "window-hybrid"])
def test_attention_transfer_sum_by_hand(window):
    """Sum over GSA layers and real tokens of the mean over features of (GSA output - softmax output)**2,
    both taken on the teacher's hidden states at that layer; padding adds nothing; the count is the
    real tokens."""
    original, model, _ = converted("llama", softmax_layers="1", num_slots=8, window_size=window)
    stage = AttentionTransferStage(name="attention_transfer", steps=1, lr=1e-3)
    batch = _padded()
    with torch.no_grad():
        teacher = _teacher_attention(original, batch)
        student = _gsa_outputs_on(model, {i: teacher[i][0] for i in teacher}, batch)
        loss, parts = stage_loss_sum(model, batch, stage)
    mask = batch["attention_mask"].double()
    want = sum((((student[i].double() - teacher[i][1].double()) ** 2).mean(-1) * mask).sum().item()
               for i in model.config.gsa_layers)
    assert len(student) == 3 and want > 0
    assert count_targets(batch, stage).item() == sum(LENGTHS)
    assert loss.item() == pytest.approx(want, rel=1e-4)
    assert parts["transfer_mse"].item() == pytest.approx(want, rel=1e-4)
