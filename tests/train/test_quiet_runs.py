"""What a user sees around t2r's own output: no library warnings or progress bars they cannot act on; and what
the trackers receive."""
import os
import subprocess
import sys

import pytest
from accelerate import Accelerator

from t2r.train.run_folder import RunFolder
from tests.train.runs import ROOT, TINY

NOISE = ("FutureWarning", "Removed shared tensor", "check by verifying", "Map:", "Filter:", "de-quantizing")


def test_tiny_convert_and_finetune_print_no_library_noise(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "HF_DATASETS_DISABLE_PROGRESS_BARS"}
    env.update(TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1")
    t2r = [sys.executable, "-m", "t2r_launch"]  # the console script's module
    convert = subprocess.run([*t2r, "convert", "tiny-random-llama", "--out", str(tmp_path / "c")], cwd=ROOT,
                             capture_output=True, text=True, timeout=300, env=env)
    assert convert.returncode == 0, convert.stderr
    # a tied-embedding model (tiny llama) with LoRA, and a checkpoint at step 3: accelerate's safetensors save
    finetune = subprocess.run([*t2r, "finetune", str(TINY), "--output-dir", str(tmp_path / "f"), "--set",
                               "stages.0.steps=3", "--set", "stages.1.steps=1", "--set", "logging.tensorboard=false"],
                              cwd=ROOT, capture_output=True, text=True, timeout=600, env=env)
    assert finetune.returncode == 0, finetune.stderr
    assert RunFolder(tmp_path / "f").checkpoint(3).is_dir()
    for name, err in (("convert", convert.stderr), ("finetune", finetune.stderr)):
        assert not [n for n in NOISE if n in err], f"{name} stderr:\n{err}"


def test_map_bars_show_only_when_asked_and_datasets_switch_is_restored(capsys):
    from datasets import Dataset
    from datasets.utils import are_progress_bars_disabled

    from t2r.tiny import byte_level_tokenizer
    from t2r.train.config import DataConfig
    from t2r.train.data import map_bars, tokenize_and_pack

    if os.environ.get("HF_DATASETS_DISABLE_PROGRESS_BARS") is not None:
        pytest.skip("HF_DATASETS_DISABLE_PROGRESS_BARS decides the bars")
    docs = Dataset.from_dict({"text": ["def f(x):\n    return x\n" * 20] * 8})
    cfg, tok = DataConfig(dataset="python-stdlib", seq_len=32), byte_level_tokenizer()
    tokenize_and_pack(docs, tok, cfg, None)
    assert "Map" not in capsys.readouterr().err
    assert not are_progress_bars_disabled()  # datasets' own switch as it was
    with map_bars(True):  # finetune with logging.progress_bar on
        tokenize_and_pack(docs, tok, cfg, None)
    assert "Map" in capsys.readouterr().err


def test_gguf_dequantizing_bar_follows_transformers_switch(capsys):
    import transformers.modeling_gguf_pytorch_utils as gguf_utils
    from transformers.utils import logging as hf_logging

    from t2r.convert import _gguf_bar_follows_transformers

    plain = gguf_utils.tqdm
    was = hf_logging.is_progress_bar_enabled()
    try:
        hf_logging.disable_progress_bar()  # as the t2r command does
        with _gguf_bar_follows_transformers():
            list(gguf_utils.tqdm(range(3), desc="Converting and de-quantizing GGUF tensors..."))
        assert "de-quantizing" not in capsys.readouterr().err
        assert gguf_utils.tqdm is plain
        hf_logging.enable_progress_bar()  # a library user's default: the bar stays
        with _gguf_bar_follows_transformers():
            list(gguf_utils.tqdm(range(3), desc="Converting and de-quantizing GGUF tensors..."))
        assert "de-quantizing" in capsys.readouterr().err
    finally:
        (hf_logging.enable_progress_bar if was else hf_logging.disable_progress_bar)()


def test_trackers_receive_the_whole_validated_config(tmp_path, monkeypatch):
    from t2r.train.config import load_config
    from t2r.train.loop import finetune
    from t2r.train.tracking import tracker_config

    given = []
    real = Accelerator.init_trackers

    def init_trackers(self, project_name, config=None, init_kwargs=None):
        given.append((project_name, list(self.log_with), config))
        return real(self, project_name, config=config, init_kwargs=init_kwargs)  # TensorBoard takes it as hparams

    monkeypatch.setattr(Accelerator, "init_trackers", init_trackers)
    monkeypatch.setenv("TOKENIZERS_PARALLELISM", "false")
    config = load_config(TINY, ["stages.0.steps=1", "stages.1.steps=1", "logging.tensorboard=true",
                                "logging.wandb=false", "eval.before=false"], str(tmp_path / "run"))
    finetune(config)
    [(project, trackers, sent)] = given
    assert project == "t2r" and len(trackers) == 1
    assert sent == tracker_config(config, tmp_path / "run")
    dumped = config.model_dump(mode="json")
    assert sent["stages.1.lora.rank"] == dumped["stages"][1]["lora"]["rank"] == 4
    assert sent["data.seq_len"] == 128 and sent["model.conversion.num_slots"] == 16
    assert sent["optimizer.betas.1"] == dumped["optimizer"]["betas"][1] and sent["total_steps"] == 2
    assert all(v is None or isinstance(v, (bool, int, float, str)) for v in sent.values())
    assert {k.split(".")[0] for k in sent} >= set(dumped)  # every section of the config is there
    assert list(RunFolder(tmp_path / "run").logs.rglob("hparams.yml"))
