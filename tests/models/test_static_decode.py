"""Decoding on a T2RStaticCache (buffers allocated once, steps that read no host value: what a CUDA
graph captures) against the dynamic T2RCache path. The graph itself needs CUDA: scripts/bench_decode.py
checks its tokens against these eager steps on the GPU."""
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from t2r.generation import static_generate
from t2r.errors import T2RError
from t2r.models import T2RStaticCache, output_cache
from tests.conftest import converted
from tests.kernels.gsa_inputs import rel_err
from tests.kernels.triton_interp import DEVICE, triton_interpreter

CASES = {
    "all-gsa": dict(family="llama"),
    "softmax-layers": dict(family="mistral", softmax_layers="1,3"),  # mistral: a teacher window of 8 too
    "window": dict(family="llama", window_size=8, feature_map="linear", use_rope=True, gate_source="key",
                   output_norm=False, v_activation="identity"),
    "window-hybrid": dict(family="qwen2", window_size=5, softmax_layers="1", feature_map="hedgehog"),
    "gla": dict(family="llama", mixer="gla"),
    "linear-window": dict(family="qwen2", mixer="linear", window_size=5, softmax_layers="1"),
}


def _left_padded(batch=3, length=9):
    ids = torch.randint(2, 258, (batch, length))
    mask = torch.ones_like(ids)
    mask[0, :4] = 0
    mask[1, :1] = 0
    return ids, mask


@pytest.mark.parametrize("case", CASES)
def test_static_steps_give_the_dynamic_logits_past_the_window(case):
    _, model, _ = converted(**CASES[case])
    ids, mask = _left_padded()
    new = torch.randint(2, 258, (3, 20))  # 9 + 20 tokens: past every window (8, 5) and the teacher's (8)
    static = T2RStaticCache(model.config, max_batch_size=4, max_length=32)
    with torch.no_grad():
        dyn = model(ids, attention_mask=mask, use_cache=True)
        ours = model(ids, attention_mask=mask, cache=static)
        assert rel_err(ours.logits[mask.bool()], dyn.logits[mask.bool()]) < 1e-6
        dynamic, a, b = output_cache(dyn), [], []
        for t in range(new.shape[1]):
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
            a.append(model(new[:, t:t + 1], attention_mask=mask, cache=dynamic).logits)
            b.append(model(new[:, t:t + 1], attention_mask=mask, cache=static).logits)
    assert static.get_seq_length() == dynamic.get_seq_length() == 29
    assert rel_err(torch.cat(b, 1), torch.cat(a, 1)) < 1e-5


def test_static_steps_through_the_triton_kernels_give_the_dynamic_logits():
    from t2r.layers.gsa import GatedSlotAttention

    _, model, _ = converted(**CASES["window-hybrid"])
    model.to(DEVICE)
    for m in model.modules():
        if isinstance(m, GatedSlotAttention):
            m.backend = "triton"  # the decoding kernel a CUDA graph captures
    ids, mask = (t.to(DEVICE) for t in _left_padded())
    # eager steps: the graphs' replay has its own tests (test_cuda_graph_steps_make_the_dynamic_tokens)
    static = T2RStaticCache(model.config, max_batch_size=3, max_length=20, cuda_graph=False)
    with torch.no_grad(), triton_interpreter():
        dynamic = output_cache(model(ids, attention_mask=mask, use_cache=True))
        model(ids, attention_mask=mask, cache=static)
        for t in range(8):
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
            new = torch.randint(2, 258, (3, 1), device=DEVICE)
            a = model(new, attention_mask=mask, cache=dynamic).logits
            assert rel_err(model(new, attention_mask=mask, cache=static).logits, a) < 1e-5


FUSED = {  # the layers whose one-token steps run gsa_decode_step (no window)
    "paper-layer": dict(family="llama"),  # swish maps and v, f_proj gates, output norm: all in the kernel
    "recipe-b": dict(family="qwen2", feature_map="linear", use_rope=True, softmax_layers="1"),  # maps outside
    "key-gates": dict(family="mistral", gate_source="key", output_norm=False, v_activation="identity",
                      feature_map="elu1"),
}


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("case", FUSED)
def test_fused_decoding_steps_give_the_full_forward_logits(case, backend, monkeypatch):
    """Left-padded prompts, then one token a step on a static cache (state updated in place) and on
    the dynamic cache: every step's logits are those of one forward over the whole sequence."""
    import t2r.layers.gsa as gsa_layer
    from t2r.layers.gsa import GatedSlotAttention

    calls = []
    fused = gsa_layer.gsa_decode_step
    monkeypatch.setattr(gsa_layer, "gsa_decode_step", lambda *a, **kw: calls.append(1) or fused(*a, **kw))

    if backend == "torch" and DEVICE == "cuda":
        pytest.skip("the torch path is the CPU's; on CUDA the model runs the kernels")
    _, model, _ = converted(**FUSED[case])
    model.to(DEVICE)
    for m in model.modules():
        if isinstance(m, GatedSlotAttention):
            m.backend = backend
    ids, mask = (t.to(DEVICE) for t in _left_padded())
    new = torch.randint(2, 258, (3, 6), device=DEVICE)
    full_mask = torch.cat([mask, torch.ones_like(new)], 1)
    static = T2RStaticCache(model.config, max_batch_size=3, max_length=16)
    with torch.no_grad(), triton_interpreter():
        want = model(torch.cat([ids, new], 1), attention_mask=full_mask).logits[:, -6:]
        dynamic = output_cache(model(ids, attention_mask=mask, use_cache=True))
        model(ids, attention_mask=mask, cache=static)
        state = static.layers[0][0].data_ptr()
        got = {"static": [], "dynamic": []}
        for t in range(6):
            m = full_mask[:, :ids.shape[1] + t + 1]
            got["dynamic"].append(model(new[:, t:t + 1], attention_mask=m, cache=dynamic).logits)
            got["static"].append(model(new[:, t:t + 1], attention_mask=m, cache=static).logits)
    for name, steps in got.items():
        assert rel_err(torch.cat(steps, 1), want) < 1e-5, name
    assert static.layers[0][0].data_ptr() == state  # written in place
    # every GSA layer's step took the fused path: 6 dynamic steps, and 6 static ones (on CUDA the static
    # steps replay a CUDA graph: the layers run twice, for the warm-up step and the capture)
    layers = len(model.config.gsa_layers)
    assert len(calls) == 6 * layers + (2 if DEVICE == "cuda" else 6) * layers


@pytest.mark.parametrize("case", ["all-gsa", "window-hybrid"])
def test_generate_on_a_static_cache_makes_the_same_tokens(case):
    _, model, tok = converted(**CASES[case])
    tok.padding_side = "left"
    batch = tok(["def add(a, b):", "x = 1", "import os\nprint(os.getcwd())"], return_tensors="pt", padding=True)
    kw = dict(max_new_tokens=12, do_sample=False, pad_token_id=tok.pad_token_id, eos_token_id=None)
    dynamic = model.generate(**batch, **kw)
    out = model.generate(**batch, **kw, cache_implementation="static", return_dict_in_generate=True)
    assert isinstance(output_cache(out), T2RStaticCache)
    assert out.sequences.tolist() == dynamic.tolist()
    ours = static_generate(model, batch["input_ids"], batch["attention_mask"], 12, pad_token_id=tok.pad_token_id)
    assert ours.tolist() == dynamic[:, batch["input_ids"].shape[1]:].tolist()


def test_beam_search_on_a_static_cache_makes_the_same_tokens():
    _, model, tok = converted(**CASES["window-hybrid"])
    ids = tok(["def add(a, b):"], return_tensors="pt")["input_ids"]
    kw = dict(max_new_tokens=8, do_sample=False, num_beams=3, pad_token_id=tok.pad_token_id, eos_token_id=None)
    assert model.generate(ids, **kw, cache_implementation="static").tolist() == model.generate(ids, **kw).tolist()


def test_static_generate_stops_rows_at_eos_and_pads_them():
    _, model, _ = converted(**CASES["window"])
    ids, mask = _left_padded()
    greedy = static_generate(model, ids, mask, 12)
    eos = int(greedy[0, 3])
    ours = static_generate(model, ids, mask, 12, eos_token_id=[eos], pad_token_id=1)
    for row, ref in zip(ours.tolist(), greedy.tolist()):
        end = ref.index(eos) + 1 if eos in ref else len(ref)
        assert row[:end] == ref[:end] and set(row[end:]) <= {1}
    sampled = [static_generate(model, ids, mask, 12, temperature=1.0) for _ in range(2)]
    assert sampled[0].tolist() != sampled[1].tolist() and int(sampled[0].max()) < model.config.vocab_size


def _memory_after(model, cache, n_tokens):
    static_generate(model, torch.randint(2, 258, (2, 5)), max_new_tokens=n_tokens, cache=cache)
    buffers = [t for e in cache.layers + cache.windows if e for t in (e.values() if isinstance(e, dict) else e)]
    return cache.nbytes(), [t.data_ptr() for t in buffers]


@pytest.mark.parametrize("case", ["all-gsa", "window", "softmax-layers"])
def test_static_cache_memory_does_not_grow_with_generated_tokens(case):
    _, model, _ = converted(**CASES[case])
    cache = T2RStaticCache(model.config, max_batch_size=2, max_length=5 + 40)
    small = _memory_after(model, cache, 10)
    assert _memory_after(model, cache, 40) == small  # the same bytes, in the same buffers
    if case != "softmax-layers":  # the recurrent state (and ring buffer) alone, plus 8-byte counters for 2 rows + 1
        assert small[0] == model.gsa_state_nbytes(batch_size=2) + 8 * 3


class _HostReads(TorchDispatchMode):
    """The aten ops that copy a device value to the host (or size an output by one), which a CUDA graph
    capture cannot record."""
    SYNCING = ("_local_scalar_dense", "nonzero", "masked_select", "unique", "repeat_interleave")

    def __init__(self):
        super().__init__()
        self.seen = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if any(name in str(func) for name in self.SYNCING):
            self.seen.append(str(func))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("case", ["all-gsa", "window-hybrid", "softmax-layers"])
def test_a_decoding_step_reads_no_device_value_on_the_host(case):
    _, model, _ = converted(**CASES[case])
    ids, mask = _left_padded()
    cache = T2RStaticCache(model.config, max_batch_size=3, max_length=16)
    with torch.no_grad():
        model(ids, attention_mask=mask, cache=cache)
        with _HostReads() as reads:
            model.decode_step(ids[:, :1], cache)
    assert reads.seen == []


def test_static_cache_refuses_what_it_cannot_hold():
    _, model, _ = converted(**CASES["softmax-layers"])
    with pytest.raises(ValueError, match="give the static cache a max_length"):
        T2RStaticCache(model.config, max_batch_size=2)
    cache = T2RStaticCache(model.config, max_batch_size=2, max_length=8)
    with pytest.raises(ValueError, match="holds at most 2"):
        model(torch.randint(2, 258, (3, 4)), cache=cache)
    with pytest.raises(ValueError, match="at most max_length=8"):
        model(torch.randint(2, 258, (2, 9)), cache=cache)
    with pytest.raises(T2RError, match="do not fit the cache's max_length=8"):
        static_generate(model, torch.randint(2, 258, (2, 4)), max_new_tokens=5, cache=cache)


def test_t2r_generate_prints_the_same_text_on_a_static_cache(capsys):
    from t2r.cli import main

    texts = []
    for static in ("off", "on"):
        assert main(["generate", "tiny-random-llama", "--prompt", "def f(x):", "--max-new-tokens", "8",
                     "--static", static]) == 0
        texts.append(capsys.readouterr().out)
    assert texts[0] == texts[1] and texts[0].strip()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA GPU")
@pytest.mark.parametrize("case", CASES)
def test_cuda_graph_steps_make_the_dynamic_tokens(case):
    """On a GPU: each step a replayed CUDA graph (the Triton kernels on CUDA), against the eager dynamic path."""
    _, model, _ = converted(**CASES[case])
    model = model.cuda()
    ids, mask = (t.cuda() for t in _left_padded())
    kw = dict(max_new_tokens=24, min_new_tokens=24, do_sample=False, pad_token_id=0, eos_token_id=None,
              output_scores=True, return_dict_in_generate=True)
    dynamic = model.generate(ids, attention_mask=mask, **kw)
    static = model.generate(ids, attention_mask=mask, cache_implementation="static", **kw)
    assert output_cache(static).graphs  # the steps were graphed
    assert torch.equal(static.sequences, dynamic.sequences)
    assert rel_err(torch.stack(static.scores), torch.stack(dynamic.scores)) < 1e-4
    loop = static_generate(model, ids, attention_mask=mask, max_new_tokens=24)
    assert torch.equal(loop, dynamic.sequences[:, ids.shape[1]:])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA GPU")
def test_a_step_a_graph_cannot_hold_decodes_on_eagerly_with_a_warning(monkeypatch):
    _, model, _ = converted(**CASES["all-gsa"])
    model = model.cuda()
    ids, mask = (t.cuda() for t in _left_padded())
    kw = dict(max_new_tokens=8, min_new_tokens=8, do_sample=False, pad_token_id=0, eos_token_id=None)
    dynamic = model.generate(ids, attention_mask=mask, **kw)
    step = model.decode_step

    def with_host_copy(input_ids, cache):  # a host-to-device copy: not allowed while a graph records
        return step(input_ids + torch.zeros(1, dtype=input_ids.dtype).to(input_ids.device), cache)

    monkeypatch.setattr(model, "decode_step", with_host_copy)
    with pytest.warns(RuntimeWarning, match="could not be captured as a CUDA graph"):
        static = model.generate(ids, attention_mask=mask, cache_implementation="static", **kw)
    assert torch.equal(static, dynamic)
