"""A converted model inside the tools people train with: transformers' Trainer and generate, TRL's
padding-free collator and SFTTrainer.

Packed batches in their formats (position ids restarting per document, flash-attention kwargs)
must keep documents apart exactly as t2r's own ``cu_seqlens`` does; the loss must honour
``num_items_in_batch`` so gradient accumulation averages over the whole accumulated batch; and a
keyword the model does not know must be refused, not silently dropped.
"""
import copy

import pytest
import torch
import torch.nn.functional as F
from transformers import DataCollatorWithFlattening, DynamicCache, Trainer, TrainerCallback, TrainingArguments
from trl import SFTConfig, SFTTrainer
from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

from t2r.models.modeling_t2r import next_token_targets
from tests.conftest import converted
from tests.kernels.gsa_inputs import rel_err

PAD = 1  # the tiny tokenizer's pad id
MODELS = {
    # whole layers kept softmax (mistral: sliding window 8) beside GSA layers
    "hybrid": dict(softmax_layers="0,2"),
    # the in-layer window hybrid (exact softmax over the last 4 tokens, GSA before), RoPE kept in GSA
    "window": dict(window_size=4, softmax_layers="1", use_rope=True, feature_map="linear"),
}
LENGTHS = (6, 13, 1, 9, 5)  # longer and shorter than both windows; a one-token document


def _docs(lengths=LENGTHS):
    return [torch.randint(2, 258, (n,)) for n in lengths]


def _offsets(docs) -> torch.Tensor:
    return torch.tensor([0] + torch.tensor([len(d) for d in docs]).cumsum(0).tolist())


def _per_token_ce(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), target.reshape(-1), reduction="none")


def _alone(model, docs):
    """Each document run by itself: its logits [n, V] and next-token losses [n - 1]."""
    logits = [model(d[None], use_cache=False).logits[0] for d in docs]
    losses = [_per_token_ce(lg[:-1], d[1:]) for lg, d in zip(logits, docs)]
    return logits, losses


def _trl_padding_free(docs) -> dict:
    collate = DataCollatorForLanguageModeling(pad_token_id=PAD, padding_free=True)
    return collate([{"input_ids": d.tolist()} for d in docs])


# the forms a packed batch reaches a model in: the keys of TRL's padding-free batch a caller passes
FORMS = {
    "position_ids": ("input_ids", "labels", "position_ids"),
    "flash_attention_kwargs": ("input_ids", "labels", "cu_seq_lens_q", "cu_seq_lens_k", "max_length_q",
                               "max_length_k"),
    "seq_idx": ("input_ids", "labels", "seq_idx"),
    "trl_padding_free_batch": None,  # everything TRL's collator returns
    "transformers_flattening": "flattening",  # DataCollatorWithFlattening: input_ids, labels, position_ids
}


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("options", MODELS.values(), ids=MODELS.keys())
def test_padding_free_batch_gives_each_document_its_own_logits_and_loss(options, form):
    _, model, _ = converted("mistral", **options)
    model.eval()
    docs = _docs()
    if FORMS[form] == "flattening":
        batch = DataCollatorWithFlattening()([{"input_ids": d.tolist()} for d in docs])
    else:
        batch = _trl_padding_free(docs)
        if FORMS[form] is not None:
            batch = {k: batch[k] for k in FORMS[form]}
    row, cu = torch.cat(docs)[None], _offsets(docs)
    assert torch.equal(batch["input_ids"], row)
    with torch.no_grad():
        out = model(**batch)
        own = model(row, cu_seqlens=cu, labels=row)  # t2r's own packed batch
        alone_logits, alone_losses = _alone(model, docs)
        unpacked = model(row).logits  # the same row read as one sequence: documents see each other
    assert out.logits.shape == (1, row.shape[1], model.config.vocab_size)
    assert rel_err(out.logits, own.logits) < 1e-5
    for d, start, lg in zip(docs, cu.tolist(), alone_logits):
        assert rel_err(out.logits[0, start:start + len(d)], lg) < 1e-5
    assert rel_err(unpacked[0, cu[1]:], out.logits[0, cu[1]:]) > 1e-3  # (the comparison can tell)
    # per token: no document predicts the next one's first token; every other token as alone
    per_token = _per_token_ce(out.logits[0], next_token_targets(row, cu)[0])
    expected = torch.cat(alone_losses)
    has_target = next_token_targets(row, cu)[0] != -100
    assert has_target.sum() == sum(n - 1 for n in LENGTHS)
    assert rel_err(per_token[has_target], expected) < 1e-5
    assert abs(out.loss.item() - expected.mean().item()) < 1e-5 and abs(own.loss.item() - out.loss.item()) < 1e-5


def test_rope_positions_restart_in_each_document():
    """RoPE sees each packed document from position 0, whether the caller gives the positions
    (position_ids) or t2r derives them from the boundaries (cu_seq_lens_q, seq_idx, cu_seqlens)."""
    _, model, _ = converted("llama", use_rope=True, feature_map="relu", softmax_layers="2")
    docs = _docs((9, 14, 4))
    batch, cu = _trl_padding_free(docs), _offsets(docs)
    restarting = torch.cat([torch.arange(len(d)) for d in docs])[None]
    seen = []
    hook = model.model.rotary_emb.register_forward_hook(lambda module, args, out: seen.append(args[0].clone()))
    forms = {"position_ids": dict(position_ids=batch["position_ids"]),
             "flash_attention_kwargs": dict(cu_seq_lens_q=batch["cu_seq_lens_q"], cu_seq_lens_k=batch["cu_seq_lens_k"]),
             "seq_idx": dict(seq_idx=batch["seq_idx"]), "cu_seqlens": dict(cu_seqlens=cu)}
    try:
        with torch.no_grad():
            for name, kwargs in forms.items():
                seen.clear()
                logits = model(input_ids=batch["input_ids"], **kwargs).logits[0]
                assert len(seen) == 1 and torch.equal(seen[0].expand_as(restarting), restarting), name
                for d, start in zip(docs, cu.tolist()):
                    assert rel_err(logits[start:start + len(d)], model(d[None]).logits[0]) < 1e-5, name
    finally:
        hook.remove()


def test_padding_to_a_multiple_leaves_the_documents_alone():
    """TRL pads a padding-free row to pad_to_multiple_of with position 0 tokens: each is a document of
    its own, and the real documents keep their logits and loss."""
    _, model, _ = converted("mistral", window_size=4, softmax_layers="1")
    docs = _docs()
    collate = DataCollatorForLanguageModeling(pad_token_id=PAD, padding_free=True, pad_to_multiple_of=16)
    batch = collate([{"input_ids": d.tolist()} for d in docs])
    total = sum(LENGTHS)
    assert batch["input_ids"].shape[1] == 48 > total
    with torch.no_grad():
        padded = model(**batch)
        own = model(torch.cat(docs)[None], cu_seqlens=_offsets(docs), labels=torch.cat(docs)[None])
    assert rel_err(padded.logits[:, :total], own.logits) < 1e-5
    assert abs(padded.loss.item() - own.loss.item()) < 1e-5


def test_position_ids_under_padding_are_positions_not_document_starts():
    """A left-padded batch with the position ids generate builds (padding at 1, the first real token
    at 0) is one sequence per row, not packed documents."""
    _, model, _ = converted("mistral", window_size=4, softmax_layers="1")
    ids = torch.randint(2, 258, (2, 11))
    mask = torch.ones(2, 11, dtype=torch.long)
    mask[0, :4] = 0
    pos = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 1)
    with torch.no_grad():
        given = model(ids, attention_mask=mask, position_ids=pos).logits
        derived = model(ids, attention_mask=mask).logits
        alone = model(ids[:1, 4:]).logits
    real = mask.bool()
    assert rel_err(given[real], derived[real]) < 1e-6
    assert rel_err(given[0, 4:], alone[0]) < 1e-5


class _GradientsBeforeStep(TrainerCallback):
    """The accumulated gradients at the optimizer step (Trainer zeroes them right after)."""

    def __init__(self):
        self.grads = {}

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        self.grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def _train_args(tmp_path, **extra) -> dict:
    # one SGD step (no clipping, constant lr, fp32): the update is -lr x the accumulated gradient
    return dict(output_dir=str(tmp_path), per_device_train_batch_size=2, gradient_accumulation_steps=2, max_steps=1,
                learning_rate=0.1, optim="sgd", max_grad_norm=0.0, lr_scheduler_type="constant", warmup_steps=0,
                weight_decay=0.0, logging_steps=1, report_to=[], use_cpu=True, save_strategy="no", bf16=False,
                fp16=False, seed=0, **extra)


def _own_step(model, docs):
    """t2r's own computation on the same four documents: one packed row, mean over every target."""
    ref = copy.deepcopy(model).train()
    row = torch.cat(docs)[None]
    loss = ref(row, cu_seqlens=_offsets(docs), labels=row).loss
    loss.backward()
    return loss.item(), {n: p.grad for n, p in ref.named_parameters() if p.grad is not None}


def _check_step(trainer, model, before, grab, ref_loss, ref_grads):
    logged = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(logged) == 1 and abs(logged[0] - ref_loss) < 1e-5
    assert grab.grads.keys() == ref_grads.keys() and len(ref_grads) > 40
    for n, g in ref_grads.items():
        assert rel_err(grab.grads[n], g) < 1e-5, n
    # the step: every weight moved by -lr x that gradient (all together: a single tiny update is
    # below fp32's resolution of the weight it is added to)
    params = dict(model.named_parameters())
    moved = torch.cat([(params[n].detach() - before[n]).flatten() for n in ref_grads])
    assert rel_err(moved, torch.cat([-0.1 * g.flatten() for g in ref_grads.values()])) < 1e-4


@pytest.mark.parametrize("collator", ["trl-padding-free", "padded"])
def test_trainer_gradient_accumulation_matches_t2r_loss(tmp_path, collator):
    """Trainer, 2 micro-batches of 2 documents with unequal token counts: the logged loss and the
    accumulated gradient are those of the mean over all four documents' tokens (Trainer passes
    num_items_in_batch and leaves the loss unscaled), and the step moves the weights by -lr x it.
    Trainer.evaluate then reports the updated model's loss on them."""
    _, model, _ = converted("mistral", window_size=4, softmax_layers="1")
    docs = _docs((7, 12, 3, 9))
    ref_loss, ref_grads = _own_step(model, docs)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    grab = _GradientsBeforeStep()
    collate = DataCollatorForLanguageModeling(pad_token_id=PAD, padding_free=collator == "trl-padding-free")
    dataset = [{"input_ids": d.tolist()} for d in docs]
    trainer = Trainer(model=model, args=TrainingArguments(**_train_args(tmp_path, per_device_eval_batch_size=4)),
                      data_collator=collate, train_dataset=dataset, callbacks=[grab])
    assert trainer.model_accepts_loss_kwargs and trainer.label_names == ["labels"]
    trainer.train()
    _check_step(trainer, model, before, grab, ref_loss, ref_grads)
    row = torch.cat(docs)[None]
    with torch.no_grad():
        updated = model.eval()(row, cu_seqlens=_offsets(docs), labels=row).loss.item()
    assert abs(updated - ref_loss) > 1e-4  # the step changed it
    assert abs(trainer.evaluate(eval_dataset=dataset)["eval_loss"] - updated) < 1e-5


def test_trl_sft_trainer_padding_free_matches_t2r_loss(tmp_path):
    """TRL's SFTTrainer, padding-free with gradient accumulation: it runs the trunk itself (its fused
    LM head calls model.model with the padding-free batch) and gets t2r's loss and gradients."""
    from datasets import Dataset

    _, model, tok = converted("mistral", window_size=4, softmax_layers="1")
    docs = _docs((7, 12, 3, 9))
    ref_loss, ref_grads = _own_step(model, docs)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    grab = _GradientsBeforeStep()
    args = SFTConfig(**_train_args(tmp_path, padding_free=True, max_length=None))
    trainer = SFTTrainer(model=model, args=args, processing_class=tok, callbacks=[grab],
                         train_dataset=Dataset.from_dict({"input_ids": [d.tolist() for d in docs]}))
    trainer.train()
    _check_step(trainer, model, before, grab, ref_loss, ref_grads)


def test_unknown_keyword_arguments_are_refused_by_name():
    _, model, _ = converted("llama", softmax_layers="1")
    ids = torch.randint(2, 258, (1, 6))
    with pytest.raises(TypeError, match="token_type_idz"):
        model(ids, token_type_idz=torch.zeros_like(ids))
    with pytest.raises(TypeError, match="labelz"):
        model.model(ids, labelz=ids)
    with pytest.raises(TypeError, match="shift_labels"):
        model(ids, shift_labels=ids)
    with pytest.raises(ValueError, match="temprature"):
        model.generate(ids, max_new_tokens=2, temprature=0.5)
    with pytest.raises(ValueError, match="output_attentions"):
        model(ids, output_attentions=True)
    with pytest.raises(TypeError, match="DynamicCache"):
        model(ids, past_key_values=DynamicCache())


def test_arguments_transformers_passes_are_honoured():
    _, model, _ = converted("llama", softmax_layers="1", window_size=4)
    ids = torch.randint(2, 258, (2, 9))
    with torch.no_grad():
        out = model(ids, labels=ids, use_cache=False)
        same = model(ids, labels=ids, use_cache=False, return_dict=True, output_attentions=False,
                     cache_position=torch.arange(9))
        as_tuple = model(ids, labels=ids, use_cache=False, return_dict=False)
        last = model(ids, use_cache=False, logits_to_keep=1).logits
        picked = model(ids, use_cache=False, logits_to_keep=torch.tensor([2, 5])).logits
        summed = model(ids, labels=ids, use_cache=False, num_items_in_batch=torch.tensor(40)).loss
        trunk = model.model(input_ids=ids, use_cache=False, return_dict=True)
    assert torch.equal(same.logits, out.logits) and torch.equal(same.loss, out.loss)
    assert isinstance(as_tuple, tuple) and torch.equal(as_tuple[0], out.loss) and torch.equal(as_tuple[1], out.logits)
    assert torch.allclose(last, out.logits[:, -1:], atol=1e-6)
    assert torch.allclose(picked, out.logits[:, [2, 5]], atol=1e-6)
    targets = 2 * 8  # two rows of 9 tokens
    assert abs(summed.item() - out.loss.item() * targets / 40) < 1e-5
    assert torch.allclose(model.lm_head(trunk.last_hidden_state), out.logits, atol=1e-6)
    with pytest.raises(ValueError, match="logits_to_keep"):
        model(ids, labels=ids, logits_to_keep=1)


def test_disagreeing_packing_arguments_are_refused():
    _, model, _ = converted("llama")
    docs = _docs((4, 6))
    batch = _trl_padding_free(docs)
    ids, cu = batch["input_ids"], batch["cu_seq_lens_q"]
    with pytest.raises(ValueError, match="cu_seq_lens_q and cu_seq_lens_k"):
        model(ids, cu_seq_lens_q=cu, cu_seq_lens_k=torch.tensor([0, 5, 10]))
    with pytest.raises(ValueError, match="max_length_q=9"):
        model(ids, cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=9)
    with pytest.raises(ValueError, match="seq_idx"):
        model(ids, cu_seqlens=cu, seq_idx=torch.zeros_like(ids))
    with pytest.raises(ValueError, match="cache or with padding"):
        model(ids, attention_mask=torch.tensor([[0] + [1] * 9]), cu_seq_lens_q=cu, cu_seq_lens_k=cu)
