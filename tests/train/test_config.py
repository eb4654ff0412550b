"""The run config: every shipped config validates; bad keys and values fail early and say where."""
from pathlib import Path

import pytest

from t2r.errors import T2RError
from t2r.train.config import FinetuneStage, load_config

CONFIGS = sorted((Path(__file__).resolve().parents[2] / "configs").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_shipped_configs_validate(path):
    config = load_config(path)
    assert config.total_steps > 0 and config.stages


def _write(tmp_path, text):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    return path


BASE = """
model: {source: tiny-random-llama}
data: {dataset: python-stdlib, seq_len: 64}
stages:
  - {name: attention_transfer, steps: 2, lr: 1.0e-3}
  - {name: finetune, steps: 3, lr: 1.0e-4}
"""


def test_mistyped_keys_are_named_with_their_path_and_a_suggestion(tmp_path):
    path = _write(tmp_path, BASE.replace("seq_len: 64", "seq_len: 64, text_feild: body")
                  .replace("lr: 1.0e-4}", "lr: 1.0e-4, lora: {rnak: 4}}"))
    with pytest.raises(T2RError) as err:
        load_config(path)
    msg = str(err.value)
    assert "data.text_feild: unknown key; did you mean 'text_field'?" in msg
    assert "stages.1.finetune.lora.rnak: unknown key; did you mean 'rank'?" in msg


def test_bad_yaml_values_name_the_key(tmp_path):
    path = _write(tmp_path, BASE.replace("steps: 3", "steps: 0").replace("seq_len: 64", "seq_len: many"))
    with pytest.raises(T2RError) as err:
        load_config(path)
    assert "stages.1.finetune.steps: Input should be greater than or equal to 1 (got 0)" in str(err.value)
    assert "data.seq_len" in str(err.value)
    with pytest.raises(T2RError, match="stages.0: Input tag 'distill'"):
        load_config(_write(tmp_path, BASE.replace("attention_transfer", "distill")))
    with pytest.raises(T2RError, match="exactly one of data.dataset"):
        load_config(_write(tmp_path, BASE.replace("dataset: python-stdlib", "files: ['a.txt'], dataset: x")))


def test_set_overrides_any_key_with_yaml_values(tmp_path):
    path = _write(tmp_path, BASE)
    c = load_config(path, ["stages.1.lora.rank=16", "data.seq_len=256", "model.conversion.softmax_layers=[0, 2]",
                           "stages.0.lr=5e-3"], output_dir="elsewhere")
    assert isinstance(c.stages[1], FinetuneStage) and c.stages[1].lora.rank == 16
    assert c.data.seq_len == 256 and c.model.conversion.softmax_layers == [0, 2]
    assert c.stages[0].lr == 5e-3 and c.output_dir == "elsewhere"
    with pytest.raises(T2RError, match="stages.7 does not exist|7 is not an index"):
        load_config(path, ["stages.7.lr=1"])
    with pytest.raises(T2RError, match="expects key=value"):
        load_config(path, ["data.seq_len"])


def test_unreadable_configs(tmp_path):
    with pytest.raises(T2RError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")
    with pytest.raises(T2RError, match="not valid YAML"):
        load_config(_write(tmp_path, "model: [unclosed"))


@pytest.mark.parametrize("override,expect", [
    ("optimizer.betas=[0.9, 1.5]", "optimizer.betas.1: Input should be less than 1"),
    ("optimizer.eps=0", "optimizer.eps: Input should be greater than 0"),
    ("stages.1.lora={target_modules: [q_prj]}", "unknown target_modules ['q_prj']"),
    ("model.conversion.softmax_layers=all", "no layer becomes GSA, so there is nothing to train"),
    ("model.conversion.window_size=64", "data.seq_len=64 must exceed model.conversion.window_size=64"),
])
def test_bad_values_fail_before_any_work(tmp_path, override, expect):
    """Caught when the config is read: before the teacher is converted or any text is tokenised."""
    with pytest.raises(T2RError) as err:
        load_config(_write(tmp_path, BASE), [override])
    assert expect in str(err.value)
    if "q_prj" in expect:
        assert "did you mean 'q_proj'?" in str(err.value)


def test_output_dir_that_is_a_file_is_refused_before_any_work(tmp_path):
    from t2r.train.loop import Run

    blocker = tmp_path / "out"
    blocker.write_text("not a folder")
    config = load_config(_write(tmp_path, BASE), output_dir=str(blocker))
    with pytest.raises(T2RError, match=f"--output-dir {blocker} is a file; choose a folder"):
        Run(config)
    assert blocker.read_text() == "not a folder"


def test_missing_tensorboard_is_said_not_silent(tmp_path, monkeypatch):
    import importlib.util

    from t2r.train import tracking

    config = load_config(_write(tmp_path, BASE))
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name.startswith("tensorboard") else real(name, *a))
    said = []
    assert tracking.use_tensorboard(config, said.append) is False
    assert said and "tensorboard is not installed (pip install tensorboard" in said[0]
    monkeypatch.setattr(importlib.util, "find_spec", real)
    assert tracking.use_tensorboard(config, said.append) is True and len(said) == 1


def test_a_converted_folders_own_window_is_checked_against_the_rows(tmp_path):
    from t2r.convert import ConversionOptions, convert

    convert("tiny-random-llama", tmp_path / "cnv", ConversionOptions(window_size=64), log=lambda *a: None)
    with pytest.raises(T2RError, match="data.seq_len=64 must exceed the converted folder's window_size=64"):
        load_config(_write(tmp_path, BASE), [f"model.source={tmp_path / 'cnv'}"])
