"""`t2r export` reads weights from safetensors only, and refuses a SOURCE that is not a t2r folder or
whose files disagree with its config, with an error naming the file and what to do."""
import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from t2r.cli import main
from t2r.train.run_folder import TRAINER_STATE, RunFolder
from tests.export.fixtures import make_run, save_converted


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    folder = tmp_path_factory.mktemp("safety") / "converted"
    save_converted(folder, "llama", softmax_layers="1")
    return folder


@pytest.fixture
def copy(converted, tmp_path):
    dst = tmp_path / "src"
    shutil.copytree(converted, dst)
    return dst


def _fails(capsys, source, out, *args) -> str:
    assert main(["export", str(source), "--out", str(out), *args]) == 2
    assert not out.exists()  # nothing written
    return capsys.readouterr().err


def test_a_pickle_in_the_weights_folder_is_refused_unread(copy, tmp_path, capsys, monkeypatch):
    torch.save({"evil": torch.zeros(1)}, copy / "pytorch_model.bin")
    loads = []
    monkeypatch.setattr(torch, "load", lambda *a, **k: loads.append(a))
    err = _fails(capsys, copy, tmp_path / "e")
    assert f"{copy / 'pytorch_model.bin'}: refusing a pickle file" in err and "safetensors" in err
    assert loads == []


def test_a_folder_with_only_pickle_weights_is_refused(copy, tmp_path, capsys):
    state = load_file(copy / "model.safetensors")
    (copy / "model.safetensors").unlink()
    torch.save(state, copy / "pytorch_model.bin")
    assert "refusing a pickle file" in _fails(capsys, copy, tmp_path / "e")


def test_a_missing_tensor_is_named_with_its_file(copy, tmp_path, capsys):
    state = load_file(copy / "model.safetensors")
    del state["model.layers.2.self_attn.f_proj.weight"]
    save_file(state, copy / "model.safetensors", metadata={"format": "pt"})
    err = _fails(capsys, copy, tmp_path / "e")
    assert "model.safetensors lacks 1 tensor(s)" in err and "model.layers.2.self_attn.f_proj.weight" in err
    assert "config.json" in err


def test_an_edited_num_slots_is_caught_before_loading(copy, tmp_path, capsys):
    config = json.loads((copy / "config.json").read_text())
    config["num_slots"] = 32
    (copy / "config.json").write_text(json.dumps(config))
    err = _fails(capsys, copy, tmp_path / "e")
    assert f"{copy / 'model.safetensors'}: tensor model.layers.0.self_attn.f_proj.weight has shape [16, 64]" in err
    assert "implies [64, 64]" in err and "if config.json was edited, restore the one saved with these weights" in err



def test_a_config_beyond_the_conversion_limits_is_refused_by_its_bound(copy, tmp_path, capsys):
    """config.json holds to the bounds `t2r convert` holds to: 256 slots (more than the GPU kernels hold) is named
    with the limit, not found later as a shape mismatch or at the first GPU forward."""
    config = json.loads((copy / "config.json").read_text())
    config["num_slots"] = 256
    (copy / "config.json").write_text(json.dumps(config))
    err = _fails(capsys, copy, tmp_path / "e")
    assert f"{copy / 'config.json'}: num_slots=256 must be >= 1 and <= 128" in err and "restore the config.json" in err


def test_a_missing_shard_is_named(converted, tmp_path, capsys):
    assert main(["export", str(converted), "--out", str(tmp_path / "sharded"), "--max-shard-size", "200KB"]) == 0
    shard = sorted((tmp_path / "sharded").glob("model-*.safetensors"))[-1]
    shard.unlink()
    err = _fails(capsys, tmp_path / "sharded", tmp_path / "e")
    assert f"{shard} is missing (named in model.safetensors.index.json)" in err


def test_a_truncated_weights_file_is_named(copy, tmp_path, capsys):
    data = (copy / "model.safetensors").read_bytes()
    (copy / "model.safetensors").write_bytes(data[: len(data) // 2])
    err = _fails(capsys, copy, tmp_path / "e")
    assert f"{copy / 'model.safetensors'} is not a readable safetensors file" in err


def test_sources_that_are_not_t2r_folders_say_what_to_pass(tmp_path, capsys):
    from t2r.tiny import tiny_teacher

    teacher, tok = tiny_teacher("llama")
    teacher.save_pretrained(tmp_path / "teacher")
    err = _fails(capsys, tmp_path / "teacher", tmp_path / "e")
    assert "model_type 'llama', not 't2r'" in err and f"t2r convert {tmp_path / 'teacher'} --out DIR" in err
    (tmp_path / "empty").mkdir()
    assert "is not a t2r folder" in _fails(capsys, tmp_path / "empty", tmp_path / "e")
    assert "does not exist" in _fails(capsys, tmp_path / "nowhere", tmp_path / "e")

    run, _, _ = make_run(tmp_path / "run", lora=True, checkpoint=True)
    assert "pass the run output" in _fails(capsys, RunFolder(run).adapter, tmp_path / "e")
    assert "holds several checkpoints; pass one of them" in _fails(capsys, RunFolder(run).checkpoints, tmp_path / "e")
    state_only = RunFolder(run).checkpoint(400)
    state_only.mkdir()
    (state_only / TRAINER_STATE).write_text("{}")
    assert "holds only training state" in _fails(capsys, state_only, tmp_path / "e")
    assert "overlaps SOURCE" in _fails(capsys, run, run / "export")
