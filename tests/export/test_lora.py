"""`t2r export` of finetune runs that used LoRA: merged exports, adapter-only exports, checkpoints."""
import json

import pytest
import torch
from peft import PeftModel
from safetensors import safe_open
from transformers import AutoModelForCausalLM

from t2r import T2RForCausalLM
from t2r.cli import main
from t2r.train.run_folder import CHECKPOINTS, RunFolder
from tests.kernels.gsa_inputs import rel_err
from tests.export.fixtures import IDS, make_run, save_converted


def _export(*args):
    return main(["export", *map(str, args)])


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A run output with LoRA (adapter recorded with a stale base path) and one checkpoint."""
    return make_run(tmp_path_factory.mktemp("lora") / "run", lora=True, checkpoint=True)


def test_merged_export_gives_the_unmerged_peft_models_logits(run, tmp_path):
    root, reference, _ = run
    assert _export(root, "--out", tmp_path / "m") == 0  # merging is the default with an adapter
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "m")
    assert type(loaded) is T2RForCausalLM
    with torch.no_grad():
        logits = loaded(IDS).logits
    assert rel_err(logits, reference) < 1e-5  # fp32 merge: W + s * B @ A against x W + s * (x A) B
    names = {p.name for p in (tmp_path / "m").iterdir()}
    assert "adapter_config.json" not in names and "adapter_model.safetensors" not in names
    assert json.loads((tmp_path / "m" / "t2r_export.json").read_text())["merged_lora"] is True
    # the LoRA delta is really in there: the base alone is far from the finetuned model
    base = T2RForCausalLM.from_pretrained(RunFolder(root).base)
    with torch.no_grad():
        assert rel_err(base(IDS).logits, reference) > 1e-3
    card = (tmp_path / "m" / "README.md").read_text()
    assert "The LoRA adapter is merged into the weights" in card


def test_explicit_merge_lora_matches_and_casts_after_merging(run, tmp_path):
    root, reference, _ = run
    assert _export(root, "--out", tmp_path / "m", "--merge-lora", "--dtype", "bf16") == 0
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "m")
    assert loaded.dtype == torch.bfloat16 and loaded.model.layers[0].self_attn.g_norm.weight.dtype == torch.float32
    with torch.no_grad():
        assert rel_err(loaded(IDS).logits.float(), reference) < 3e-2


def test_adapter_only_export_loads_with_peft_on_the_converted_base(run, tmp_path):
    root, reference, _ = run
    out = tmp_path / "a"
    assert _export(root, "--out", out, "--adapter-only", "--base-id", "my-org/smollm2-gsa-base") == 0
    assert {p.name for p in out.iterdir()} == {"adapter_config.json", "adapter_model.safetensors", "README.md",
                                               "tokenizer.json", "tokenizer_config.json", "t2r_export.json"}
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == "my-org/smollm2-gsa-base"  # not the stale path of the run
    assert config["modules_to_save"] == ["f_proj", "g_norm"]
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(root / "base"), out)
    with torch.no_grad():
        assert rel_err(model(IDS).logits, reference) < 1e-6
    manifest = json.loads((out / "t2r_export.json").read_text())
    assert manifest["format"] == "adapter" and manifest["base"]["config"]["num_slots"] == 8
    card = (out / "README.md").read_text()
    assert "library_name: peft" in card and 'PeftModel.from_pretrained(base, "' in card
    assert "base_model: my-org/smollm2-gsa-base\nbase_model_relation: adapter" in card
    assert "AutoModelForCausalLM.from_pretrained(\"my-org/smollm2-gsa-base\")" in card


def test_adapter_only_without_base_id_points_at_the_local_base(run, tmp_path, capsys):
    root, _, _ = run
    assert _export(root, "--out", tmp_path / "a", "--adapter-only") == 0
    config = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(RunFolder(root).base.resolve())
    assert "--base-id" in capsys.readouterr().out


def test_a_checkpoint_exports_like_a_run_with_the_runs_summary(run, tmp_path):
    root, reference, _ = run
    step = RunFolder(root).checkpoint(300)
    assert _export(step, "--out", tmp_path / "c") == 0
    with torch.no_grad():
        assert rel_err(AutoModelForCausalLM.from_pretrained(tmp_path / "c")(IDS).logits, reference) < 1e-5
    card = (tmp_path / "c" / "README.md").read_text()
    assert "intermediate checkpoint `step-0000300`" in card and "1,234,567" in card  # summary two levels up
    assert not (tmp_path / "c" / "optimizer.bin").exists()


def test_lora_flags_on_a_run_without_lora_say_what_to_drop(tmp_path, capsys):
    root, reference, _ = make_run(tmp_path / "run", lora=False)
    for flag in ("--merge-lora", "--adapter-only"):
        assert _export(root, "--out", tmp_path / "x", flag) == 2
        assert "has no LoRA adapter" in (err := capsys.readouterr().err) and f"drop {flag}" in err
    assert not (tmp_path / "x").exists()
    assert _export(root, "--out", tmp_path / "full") == 0
    with torch.no_grad():
        assert torch.equal(AutoModelForCausalLM.from_pretrained(tmp_path / "full")(IDS).logits, reference)


def test_an_adapter_from_another_base_is_refused_naming_the_file(run, tmp_path, capsys):
    import shutil

    root, _, _ = run
    other = tmp_path / "run"
    shutil.copytree(root, other, ignore=shutil.ignore_patterns(CHECKPOINTS))
    shutil.rmtree(RunFolder(other).base)
    save_converted(RunFolder(other).base, "llama", softmax_layers="2", num_slots=16)  # not the base it was trained on
    assert _export(other, "--out", tmp_path / "x") == 2
    err = capsys.readouterr().err
    assert f"{RunFolder(other).adapter / 'adapter_model.safetensors'}: tensor" in err and "f_proj.weight" in err
    assert "trained on another base" in err and not (tmp_path / "x").exists()


def test_adapter_weights_keep_gsa_norms_fp32_under_bf16(run, tmp_path):
    root, _, _ = run
    assert _export(root, "--out", tmp_path / "a", "--adapter-only", "--dtype", "bf16") == 0
    with safe_open(tmp_path / "a" / "adapter_model.safetensors", "pt") as f:
        dtypes = {k: f.get_slice(k).get_dtype() for k in f.keys()}
    assert {d for k, d in dtypes.items() if ".g_norm." in k} == {"F32"}
    assert {d for k, d in dtypes.items() if "lora_" in k} == {"BF16"}


@pytest.mark.slow
def test_a_real_finetune_run_exports_merged_and_as_adapter(tmp_path):
    """The trainer's own output (configs/tiny.yaml: attention transfer, then LoRA), not a built layout."""
    from tests.train.runs import finetune_cmd, run as run_cmd

    out = tmp_path / "run"
    r = run_cmd(finetune_cmd(out))
    assert r.returncode == 0, r.stderr[-3000:]
    assert _export(out, "--out", tmp_path / "m") == 0
    assert _export(out, "--out", tmp_path / "a", "--adapter-only") == 0
    ids = torch.randint(2, 258, (2, 33))
    done = RunFolder(out)
    unmerged = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(done.base), done.adapter)
    exported = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(done.base), tmp_path / "a")
    with torch.no_grad():
        ref = unmerged(ids).logits
        assert rel_err(AutoModelForCausalLM.from_pretrained(tmp_path / "m")(ids).logits, ref) < 1e-5
        assert torch.equal(exported(ids).logits, ref)
    summary = json.loads(done.summary.read_text())
    card = (tmp_path / "m" / "README.md").read_text()
    assert f"Tokens seen: **{summary['tokens_seen']:,}**" in card
    assert f"| **this model** | **{summary['eval']['ppl_after']:,.2f}**" in card
