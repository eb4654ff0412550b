"""What each stage trains, against the model's own parameter names: attention transfer only what the
conversion added to the teacher, a full finetune everything, a LoRA finetune the adapters peft adds
(and the new GSA modules it saves in full); and one step of the stage's loss reaches nothing else."""
import pytest
import torch

from t2r.errors import T2RError
from t2r.train.config import AttentionTransferStage, FinetuneStage
from t2r.train.data import collate
from t2r.train.stages import add_lora, set_trainable, stage_loss_sum
from tests.conftest import converted

TRANSFER = AttentionTransferStage(name="attention_transfer", steps=1, lr=1e-3)
FULL = FinetuneStage(name="finetune", steps=1, lr=1e-3, lora=None)
LORA = FinetuneStage(name="finetune", steps=1, lr=1e-3, lora={"rank": 4})

# conversions that add different sets of modules: the gate projection and the output norm (defaults),
# learnable feature maps, a window mix
OPTIONS = {
    "defaults": dict(softmax_layers="1", num_slots=8),
    "hedgehog-window": dict(softmax_layers="0", num_slots=8, feature_map="hedgehog", window_size=4),
}


def _batch():
    rows = [{"input_ids": list(range(2, 14))}, {"input_ids": list(range(40, 47))}]
    return collate(rows, pad_id=1)


def _grads_after_one_step(model, stage):
    model.train()
    model.zero_grad(set_to_none=True)
    loss, _ = stage_loss_sum(model, _batch(), stage, fused="off")
    loss.backward()
    return {n for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("options", OPTIONS.values(), ids=OPTIONS.keys())
def test_attention_transfer_trains_exactly_what_the_conversion_added(options):
    teacher, model, _ = converted("llama", **options)
    added = {n for n, _ in model.named_parameters()} - {n for n, _ in teacher.named_parameters()}
    assert added  # the conversion did add something
    trained = set_trainable(model, TRANSFER)
    assert set(trained) == added
    assert {n for n, p in model.named_parameters() if p.requires_grad} == added
    reached = _grads_after_one_step(model, TRANSFER)
    assert reached == added  # and the transfer loss reaches every one of them
    softmax = int(options["softmax_layers"])
    assert not any(f".layers.{softmax}." in n for n in trained)  # the layer that stays softmax adds nothing


def test_full_finetune_trains_every_parameter():
    _, model, _ = converted("llama", softmax_layers="1", num_slots=8)
    every = {n for n, _ in model.named_parameters()}
    assert set(set_trainable(model, FULL)) == every
    assert _grads_after_one_step(model, FULL) == every  # embeddings (tied to lm_head) included


def test_lora_trains_the_adapters_peft_added_and_the_new_gsa_modules():
    _, model, _ = converted("llama", softmax_layers="1", num_slots=8)
    model = add_lora(model, LORA.lora)
    # peft marks what it trains itself: the adapters and its full copies of modules_to_save
    peft_trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    trained = set(set_trainable(model, LORA))
    assert trained == peft_trainable
    lora = {n for n in trained if ".lora_A." in n or ".lora_B." in n}
    layers, targets = model.config.num_hidden_layers, len(LORA.lora.target_modules)
    assert len(lora) == 2 * targets * layers  # A and B on every target of every layer
    copies = trained - lora
    assert copies and all(".modules_to_save." in n for n in copies)
    assert not any("embed_tokens" in n or "mlp" in n or ".original_module." in n for n in trained)
    assert _grads_after_one_step(model, LORA) == trained


def test_a_transfer_stage_with_nothing_to_train_is_refused_with_the_remedy():
    _, model, _ = converted("llama", softmax_layers="1", num_slots=8, gate_source="key", output_norm=False)
    with pytest.raises(T2RError, match="attention_transfer has nothing to train.*gate_source: f_proj"):
        set_trainable(model, TRANSFER)


def test_a_model_without_gsa_layers_is_told_so_for_attention_transfer():
    """softmax_layers listing every layer (config validation refuses only the word 'all') converts
    nothing: the refusal should say so, not suggest gate_source: f_proj, which this model already has."""
    _, model, _ = converted("llama", softmax_layers="0,1,2,3", num_slots=8)
    assert model.config.gsa_layers == []
    with pytest.raises(T2RError, match="no GSA layers"):
        set_trainable(model, TRANSFER)
