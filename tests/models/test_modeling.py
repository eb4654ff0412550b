"""The converted model against its teacher, and its recurrent decoding against its own parallel forward."""
import pytest
import torch
from transformers import AutoModelForCausalLM

from t2r import T2RCache, T2RForCausalLM
from t2r.models import output_cache
from tests.conftest import converted, decode_token_by_token
from tests.kernels.gsa_inputs import rel_err

FAMILIES = ["llama", "mistral", "qwen2"]


@pytest.mark.parametrize("family", FAMILIES)
def test_softmax_only_conversion_reproduces_teacher_logits(family):
    teacher, student, _ = converted(family, softmax_layers="all")
    ids = torch.randint(2, 258, (2, 21))  # 21 > mistral's window of 8
    pos = torch.arange(21).expand(2, 21)
    with torch.no_grad():
        assert rel_err(student(ids).logits, teacher(ids, position_ids=pos).logits) < 1e-5


@pytest.mark.parametrize("family", FAMILIES)
def test_softmax_only_conversion_matches_teacher_under_left_padding(family):
    teacher, student, _ = converted(family, softmax_layers="all")
    ids = torch.randint(2, 258, (2, 15))
    mask = torch.ones(2, 15, dtype=torch.long)
    mask[0, :6] = 0
    pos = (mask.cumsum(-1) - 1).clamp_min(0)
    with torch.no_grad():
        ours = student(ids, attention_mask=mask).logits
        ref = teacher(ids, attention_mask=mask, position_ids=pos).logits
    real = mask.bool()
    assert rel_err(ours[real], ref[real]) < 1e-5


def test_teacher_mode_runs_the_teacher_with_the_same_weights():
    teacher, student, _ = converted("qwen2")
    ids = torch.randint(2, 258, (2, 17))
    with torch.no_grad():
        gsa = student(ids).logits
        with student.teacher_mode():
            as_teacher = student(ids).logits
        ref = teacher(ids).logits
    assert rel_err(as_teacher, ref) < 1e-5
    assert rel_err(gsa, ref) > 1e-2  # outside the block the GSA layers are back


CASES = {
    "all-gsa": dict(family="llama"),
    "hybrid": dict(family="mistral", softmax_layers="1,3"),
    "rope-kept": dict(family="qwen2", use_rope=True, feature_map="relu"),
    # the window hybrid: prefill shorter (8) and longer (5) than the window, then a ring buffer
    "window": dict(family="llama", window_size=8, feature_map="linear", use_rope=True, gate_source="key",
                   output_norm=False, v_activation="identity"),
    "window-hybrid": dict(family="mistral", window_size=5, softmax_layers="1", feature_map="hedgehog"),
}


@pytest.mark.parametrize("case", CASES)
def test_token_by_token_decoding_matches_parallel_forward(case):
    _, model, _ = converted(**CASES[case])
    ids = torch.randint(2, 258, (2, 40))
    with torch.no_grad():
        full = model(ids, use_cache=False).logits
    decoded, cache = decode_token_by_token(model, ids, 7)
    assert isinstance(cache, T2RCache) and cache.get_seq_length() == 40
    assert rel_err(decoded, full) < 1e-4


@pytest.mark.parametrize("case", ["all-gsa", "hybrid", "rope-kept", "window", "window-hybrid"])
def test_left_padded_batch_generates_like_each_prompt_alone(case):
    _, model, tok = converted(**CASES[case])
    prompts = ["def add(a, b):", "x = 1", "import os\nprint(os.getcwd())"]
    tok.padding_side = "left"
    batch = tok(prompts, return_tensors="pt", padding=True)
    assert (batch["attention_mask"] == 0).any()
    kw = dict(max_new_tokens=12, do_sample=False, pad_token_id=tok.pad_token_id, eos_token_id=None)
    together = model.generate(**batch, **kw)[:, batch["input_ids"].shape[1]:]
    for i, p in enumerate(prompts):
        alone = model.generate(**tok(p, return_tensors="pt"), **kw)[0, -12:]
        assert together[i].tolist() == alone.tolist(), p


def _cache_after(model, n_tokens):
    ids = torch.randint(2, 258, (2, 5))
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n_tokens, min_new_tokens=n_tokens,
                         do_sample=False, pad_token_id=1, return_dict_in_generate=True)
    assert out.sequences.shape[1] == 5 + n_tokens
    return output_cache(out)


def test_gsa_state_memory_does_not_grow_with_the_context():
    _, model, _ = converted("llama")
    small, large = _cache_after(model, 10), _cache_after(model, 1000)
    assert small.nbytes() == large.nbytes() == model.gsa_state_nbytes(batch_size=2)
    _, hybrid, _ = converted("llama", softmax_layers="0")
    assert _cache_after(hybrid, 1000).nbytes() > _cache_after(hybrid, 10).nbytes()  # only the KV cache grows
    _, windowed, _ = converted("llama", window_size=16)  # state + a ring buffer of the last 16 tokens
    small, large = _cache_after(windowed, 10), _cache_after(windowed, 300)
    assert small.nbytes() == large.nbytes() == windowed.gsa_state_nbytes(batch_size=2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_save_and_load_round_trip_is_bit_exact_and_safetensors_only(tmp_path, dtype):
    _, model, _ = converted("qwen2", softmax_layers="2", dtype=dtype)
    assert model.model.layers[0].self_attn.q_proj.weight.dtype == dtype
    model.save_pretrained(tmp_path)
    files = sorted(p.name for p in tmp_path.iterdir())
    assert "model.safetensors" in files and not any(f.endswith((".bin", ".pt", ".pth", ".pkl")) for f in files)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=dtype)
    assert isinstance(loaded, T2RForCausalLM) and loaded.config.gsa_layers == [0, 1, 3]
    ours, theirs = model.state_dict(), loaded.state_dict()
    assert ours.keys() == theirs.keys()
    for k in ours:
        assert ours[k].dtype == theirs[k].dtype and torch.equal(ours[k], theirs[k]), k
    assert loaded.model.layers[0].self_attn.g_norm.weight.dtype == torch.float32  # kept fp32
    ids = torch.randint(2, 258, (1, 9))
    with torch.no_grad():
        assert torch.equal(model(ids).logits, loaded(ids).logits)


@pytest.mark.parametrize("options", [dict(softmax_layers="0,2"), dict(softmax_layers="0", window_size=3)],
                         ids=["hybrid", "window"])
def test_packed_documents_do_not_see_each_other(options):
    """cu_seqlens: each packed document gives the logits it gives alone (GSA state reset, softmax masked)."""
    _, model, _ = converted("mistral", **options)
    docs = [torch.randint(2, 258, (n,)) for n in (5, 11, 4, 12, 1, 7)]
    rows = torch.cat(docs).view(2, 20)
    cu = torch.tensor([0, 5, 16, 20, 32, 33, 40])  # every row boundary (20) is a document boundary
    with torch.no_grad():
        packed = model(rows, cu_seqlens=cu).logits.view(40, -1)
        for doc, start in zip(docs, cu.tolist()):
            alone = model(doc[None]).logits[0]
            assert rel_err(packed[start:start + len(doc)], alone) < 1e-5
    with pytest.raises(ValueError, match="row boundary"):
        model(rows, cu_seqlens=torch.tensor([0, 5, 25, 40]))


def test_gradient_checkpointing_gives_the_same_gradients():
    _, model, _ = converted("mistral", softmax_layers="1")
    ids = torch.randint(2, 258, (2, 24))
    model.train()

    def grads():
        model.zero_grad()
        model(ids, labels=ids).loss.backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    plain = grads()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    assert model.model.gradient_checkpointing
    checkpointed = grads()
    assert plain.keys() == checkpointed.keys() and len(plain) > 10
    for n in plain:
        assert rel_err(checkpointed[n], plain[n]) < 1e-5, n


def test_attention_transfer_error_per_layer_counts_only_real_tokens():
    """Each GSA layer's transfer error is a sum over real tokens: padding adds nothing, and the layers'
    errors add up to the loss."""
    _, model, _ = converted("llama", softmax_layers="2")
    ids = torch.randint(2, 258, (3, 12))
    mask = torch.ones(3, 12, dtype=torch.long)
    mask[1, :5] = 0  # left padding
    with torch.no_grad():
        out = model(ids, attention_mask=mask, attention_transfer=True)
        alone = model(ids[1:2, 5:], attention_transfer=True)
        rows = [model(ids[i:i + 1], attention_transfer=True) for i in (0, 2)]
    assert out.layer_errors.shape == (3,) and torch.allclose(out.layer_errors.sum(), out.loss)
    expected = alone.layer_errors + sum(r.layer_errors for r in rows)
    assert rel_err(out.layer_errors, expected) < 1e-4


def test_an_attention_transfer_forward_leaves_the_model_converted():
    """Attention transfer runs the layers on the teacher's path for that forward only: the next plain
    forward is the converted model's again, not the teacher's."""
    _, model, _ = converted("llama", softmax_layers="2")
    ids = torch.randint(2, 258, (2, 12))
    with torch.no_grad():
        before = model(ids).logits
        with model.teacher_mode():
            teacher = model(ids).logits
        model(ids, attention_transfer=True)
        after = model(ids).logits
    assert torch.equal(after, before) and rel_err(after, teacher) > 1e-3
