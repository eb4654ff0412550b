"""The gla and linear mixers (``--mixer``) through conversion, decoding, padding, packing and export."""
import json
import subprocess
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM

from t2r.convert import ConversionOptions, convert
from t2r.layers.gla import GatedLinearAttention
from tests.conftest import converted, decode_token_by_token
from tests.kernels.gsa_inputs import rel_err

CASES = {
    "gla": dict(mixer="gla"),
    "linear": dict(mixer="linear"),
    "linear-no-decay": dict(mixer="linear", linear_decay="none", feature_map="elu1"),
    "gla-rope-linear-map": dict(mixer="gla", family="qwen2", use_rope=True, feature_map="linear",
                                v_activation="identity", output_norm=False),
    "gla-hybrid": dict(mixer="gla", family="mistral", softmax_layers="1"),
    # the window hybrid: prefill shorter (7) than the window, then through its ring buffer
    "gla-window": dict(mixer="gla", window_size=8, use_rope=True, feature_map="linear"),
    "linear-window": dict(mixer="linear", window_size=5, family="mistral", feature_map="hedgehog"),
}


def trained_like(model, seed=0):
    """Perturb what the conversion added (a fresh GLA gate does not yet depend on the data)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if any(f".{m}." in name for m in ("gk_proj", "q_map", "k_map", "g_norm", "window_mix")):
                p.add_(0.3 * torch.randn(p.shape, generator=gen).to(p))
    return model


def mixer_model(case):
    opts = dict(CASES[case])
    _, model, tok = converted(opts.pop("family", "llama"), **opts)
    return trained_like(model), tok


@pytest.mark.parametrize("mixer", ["gla", "linear"])
def test_conversion_builds_the_mixer_and_records_it(mixer, tmp_path):
    teacher, model, _ = converted("llama", mixer=mixer, softmax_layers="2")
    layers = [layer.self_attn for layer in model.model.layers]
    assert [type(a).__name__ for a in layers] == ["GatedLinearAttention"] * 2 + ["SoftmaxAttention", "GatedLinearAttention"]
    new = {n.split(".self_attn.")[1] for n, _ in model.named_parameters() if ".self_attn." in n}
    gate = {"gk_proj.down.weight", "gk_proj.up.weight", "gk_proj.up.bias"} if mixer == "gla" else set()
    assert new == {"q_proj.weight", "k_proj.weight", "v_proj.weight", "o_proj.weight", "g_norm.weight"} | gate
    model.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["mixer"] == mixer
    ids = torch.randint(2, 258, (2, 17))
    with torch.no_grad():  # the teacher's softmax attention is still there, for distillation
        with model.teacher_mode():
            assert rel_err(model(ids).logits, teacher(ids).logits) < 1e-5


def test_gla_gates_start_near_one_with_spread_memories():
    _, model, _ = converted("llama", mixer="gla", gate_logit_normalizer=16)
    attn = model.model.layers[0].self_attn
    gates = attn.log_gates(torch.randn(2, 5, 64)).exp()  # [B, T, H, D]
    assert torch.allclose(gates[0, 0], gates[1, 3])  # the up projection starts at zero: data-independent
    forget = 1 - gates[0, 0, 0]
    assert abs(forget.max().item() - 2 ** -5) < 1e-6 and abs(forget.min().item() - 2 ** -10) < 1e-7
    _, linear, _ = converted("llama", mixer="linear")
    decays = linear.model.layers[0].self_attn.log_gates(torch.randn(1, 3, 64)).exp()[0, 0, :, 0]
    assert torch.allclose(decays, torch.tensor([1 - 2 ** -5, 1 - 2 ** -6]))  # RetNet's, per kv head


@pytest.mark.parametrize("case", CASES)
def test_token_by_token_decoding_matches_parallel_forward(case):
    model, _ = mixer_model(case)
    ids = torch.randint(2, 258, (2, 30))
    with torch.no_grad():
        full = model(ids, use_cache=False).logits
    decoded, cache = decode_token_by_token(model, ids, 7)
    assert rel_err(decoded, full) < 1e-5
    assert cache.nbytes() == model.gsa_state_nbytes(batch_size=2) + sum(
        2 * 2 * 30 * 2 * 16 * 4 for i in range(4) if i not in model.config.gsa_layers)  # softmax layers' KV


@pytest.mark.parametrize("case", ["gla", "linear", "gla-window", "gla-hybrid"])
def test_left_padded_batch_equals_each_row_alone(case):
    model, _ = mixer_model(case)
    ids = torch.randint(2, 258, (3, 16))
    mask = torch.ones(3, 16, dtype=torch.long)
    mask[0, :5], mask[2, :11] = 0, 0
    with torch.no_grad():
        batch = model(ids, attention_mask=mask).logits
        for i in range(3):
            alone = model(ids[i:i + 1, mask[i].bool()]).logits[0]
            assert rel_err(batch[i, mask[i].bool()], alone) < 1e-5, i


@pytest.mark.parametrize("case", ["gla", "linear-window"])
def test_packed_documents_equal_each_document_alone(case):
    model, _ = mixer_model(case)
    docs = [torch.randint(2, 258, (n,)) for n in (5, 11, 4, 12, 1, 7)]
    rows = torch.cat(docs).view(2, 20)
    cu = torch.tensor([0, 5, 16, 20, 32, 33, 40])
    with torch.no_grad():
        packed = model(rows, cu_seqlens=cu).logits.view(40, -1)
        for doc, start in zip(docs, cu.tolist()):
            assert rel_err(packed[start:start + len(doc)], model(doc[None]).logits[0]) < 1e-5


def test_attention_transfer_trains_the_gla_gate():
    model, _ = mixer_model("gla")
    ids = torch.randint(2, 258, (2, 24))
    out = model(ids, attention_transfer=True)
    out.loss.backward()
    for layer in model.model.layers:
        assert isinstance(layer.self_attn, GatedLinearAttention)
        grad = layer.self_attn.gk_proj.up.weight.grad
        assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0


LOAD = """
import sys, torch
sys.modules["t2r"] = None  # importing t2r would fail: only the folder's own code may be used
from transformers import AutoModelForCausalLM
model = AutoModelForCausalLM.from_pretrained(sys.argv[1], trust_remote_code=True).eval()
ids = torch.arange(2, 40).view(2, 19)
with torch.no_grad():
    out = model(ids[:, :11], use_cache=True)
    steps = [out.logits]
    for t in range(11, 19):
        out = model(ids[:, t:t + 1], cache=out.get("cache", out.get("past_key_values")), use_cache=True)
        steps.append(out.logits)
    torch.save({"parallel": model(ids).logits, "decoded": torch.cat(steps, 1)}, sys.argv[2])
print(type(model.model.layers[0].self_attn).__module__, type(model.model.layers[0].self_attn).__name__)
"""


@pytest.mark.parametrize("mixer", ["gla", "linear"])
def test_converted_folder_loads_without_t2r(tmp_path, mixer):
    out = tmp_path / "cnv"
    convert("tiny-random-llama", out, ConversionOptions(mixer=mixer, window_size=4, softmax_layers="1"),
            log=lambda *_: None)
    ours = AutoModelForCausalLM.from_pretrained(out).eval()
    trained_like(ours).save_pretrained(out)  # a gate that depends on the data, as after training
    r = subprocess.run([sys.executable, "-c", LOAD, str(out), str(tmp_path / "logits.pt")], capture_output=True,
                       text=True, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "transformers_modules" in r.stdout and "GatedLinearAttention" in r.stdout
    theirs = torch.load(tmp_path / "logits.pt")
    with torch.no_grad():
        ref = ours(torch.arange(2, 40).view(2, 19)).logits
    assert torch.equal(theirs["parallel"], ref)
    assert rel_err(theirs["decoded"], ref) < 1e-5


def test_export_card_names_the_mixer_and_its_state_size(tmp_path):
    from t2r.cli import main
    from tests.export.fixtures import save_converted

    save_converted(tmp_path / "c", "llama", mixer="gla")
    assert main(["export", str(tmp_path / "c"), "--out", str(tmp_path / "e")]) == 0
    card = (tmp_path / "e" / "README.md").read_text()
    # 4 layers x 2 kv heads x a 16 x 16 fp32 state: 8 KiB (GSA's 64 slots would hold 64 KiB)
    assert "**Gated Linear Attention** (GLA)" in card and "state of 8 KiB per sequence" in card
    assert "| mixer | gla (low-rank gate, rank 16) |" in card
    assert "memory slots per kv head" not in card  # GSA's slots are no part of a gla layer
    assert "its layers run fla's Triton GLA kernels" in card and "GSA layers run" not in card
    assert "4 of its 4 attention layers are GLA" in card and "the GLA layers carry a recurrent state" in card


def test_bf16_decoding_keeps_an_fp32_state_and_follows_the_parallel_forward():
    _, model, _ = converted("llama", mixer="gla", dtype=torch.bfloat16)
    trained_like(model)
    ids = torch.randint(2, 258, (2, 20))
    with torch.no_grad():
        full = model(ids, use_cache=False).logits
    decoded, cache = decode_token_by_token(model, ids, 9)
    assert full.dtype == torch.bfloat16 and cache.gsa_state(0)[0].dtype == torch.float32
    assert rel_err(decoded, full) < 2e-2


def test_t2r_convert_mixer_flag(tmp_path, capsys):
    from t2r.cli import main

    out = tmp_path / "lin"
    assert main(["convert", "tiny-random-llama", "--out", str(out), "--mixer", "linear", "--linear-decay", "none"]) == 0
    config = json.loads((out / "config.json").read_text())
    assert config["mixer"] == "linear" and config["linear_decay"] == "none"
    assert "converted 4/4 attention layers to LINEAR" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["convert", "tiny-random-llama", "--out", str(tmp_path / "x"), "--mixer", "rnn"])
    assert "invalid choice: 'rnn' (choose from 'gsa', 'gla', 'linear')" in capsys.readouterr().err


def test_a_linear_mixer_with_nothing_new_to_train_says_so():
    from t2r.errors import T2RError
    from t2r.train.config import AttentionTransferStage
    from t2r.train.stages import stage_parameters

    _, model, _ = converted("llama", mixer="linear", feature_map="relu", output_norm=False)
    assert not any(".self_attn.g_norm." in n for n, _ in model.named_parameters())
    with pytest.raises(T2RError, match="mixer: linear, with a fixed feature map, no output norm"):
        stage_parameters(model, AttentionTransferStage(name="attention_transfer", steps=1, lr=1e-2))
    _, gla, _ = converted("llama", mixer="gla", feature_map="relu", output_norm=False)
    assert {n.split(".self_attn.")[1] for n in stage_parameters(gla, AttentionTransferStage(
        name="attention_transfer", steps=1, lr=1e-2))} == {"gk_proj.down.weight", "gk_proj.up.weight", "gk_proj.up.bias"}


def test_options_of_another_mixer_are_refused_in_one_line(tmp_path, capsys):
    """num_slots, gate_source, f_proj_init act on GSA alone (gate_rank on gla, linear_decay on linear):
    set to another value for another mixer they would be silently ignored."""
    from t2r.cli import main
    from t2r.errors import T2RError

    first = r"^num_slots=16 \(--num-slots\): only mixer gsa uses it, and the mixer is 'gla'; remove it"
    with pytest.raises(T2RError, match=first):
        ConversionOptions(mixer="gla", num_slots=16)
    with pytest.raises(T2RError, match=r"f_proj_init='random' .*gate_source='key' .*only mixer gsa uses them"):
        ConversionOptions(mixer="linear", gate_source="key", f_proj_init="random")
    with pytest.raises(T2RError, match="gate_rank=4 .*only mixer gla"):
        ConversionOptions(gate_rank=4)
    # their defaults, given or not, and every option of the chosen mixer, pass
    ConversionOptions(mixer="gla", num_slots=64, gate_source="f_proj", f_proj_init="key", gate_rank=4)
    ConversionOptions.model_validate(ConversionOptions(mixer="linear", linear_decay="none").model_dump())
    assert main(["convert", "tiny-random-llama", "--out", str(tmp_path), "--mixer", "linear", "--num-slots", "8"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "num_slots=8 (--num-slots): only mixer gsa uses it" in err[0]
    from pathlib import Path

    from t2r.train.config import load_config

    tiny = Path(__file__).parents[2] / "configs" / "tiny.yaml"  # GSA's recipe, 16 slots, switched to gla
    with pytest.raises(T2RError, match=r"tiny.yaml: num_slots=16 \(--num-slots\): only mixer gsa"):
        load_config(tiny, ["model.conversion.mixer=gla"])
