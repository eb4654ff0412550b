"""``--resume`` with a setting the checkpoints depend on changed (the model, the data, the batch layout,
the seed, what each stage is and its LoRA) is refused naming that setting (the field itself); what may change between
attempts (step counts, learning rates, evaluation, checkpointing, logging) resumes."""
import shutil

import pytest
import yaml

from t2r.errors import T2RError
from t2r.train.checkpoint import TrainerState, checkpoints_dir
from t2r.train.config import RunConfig, dump_config, load_config, resume_mismatch
from t2r.train.loop import Run
from tests.train.runs import TINY


def tiny(*sets, **kw):
    return load_config(TINY, list(sets), **kw)


def saved(config: RunConfig) -> dict:
    """What a run leaves in OUTPUT/config.yaml, read back."""
    return yaml.safe_load(dump_config(config))


REFUSED = {
    "model.source=tiny-random-qwen2": "model.source",
    "model.conversion.num_slots=8": "model.conversion.num_slots",
    "model.conversion.softmax_layers=none": "model.conversion.softmax_layers",
    "data.seq_len=256": "data.seq_len",
    "data.max_documents=60": "data.max_documents",
    "batch.micro_batch_size=2": "batch.micro_batch_size",
    "batch.grad_accum=4": "batch.grad_accum",
    "seed=1": "seed",
    "stages.1.lora.rank=8": "stages.1.lora.rank",
    "stages.1.lora.target_modules=[q_proj]": "stages.1.lora.target_modules",
    "stages.1.lora=null": "stages.1.lora",
}

ALLOWED = ["stages.0.steps=9", "stages.1.steps=20", "stages.1.lr=5e-4", "stages.1.warmup_steps=3",
           "stages.1.schedule=linear", "stages.1.min_lr_ratio=0.0", "stages.1.kl_weight=0.0", "eval.every_steps=2",
           "eval.max_batches=1", "checkpoint.every_steps=1", "checkpoint.keep_last=5", "logging.progress_bar=true",
           "logging.tensorboard=false", "loss.fused=off", "optimizer.grad_clip=0.5",
           # neither the rows nor the weights depend on these
           "data.num_proc=3", "data.cache_dir=/tmp/elsewhere", "model.gradient_checkpointing=true"]


@pytest.mark.parametrize("change,key", REFUSED.items(), ids=REFUSED.keys())
def test_a_changed_setting_the_checkpoints_depend_on_is_named(change, key):
    assert resume_mismatch(saved(tiny()), tiny(change)) == key


@pytest.mark.parametrize("change", ALLOWED)
def test_settings_that_may_change_resume(change):
    assert resume_mismatch(saved(tiny()), tiny(change)) is None


def test_other_output_dirs_and_the_same_config_resume():
    assert resume_mismatch(saved(tiny()), tiny()) is None
    assert resume_mismatch(saved(tiny()), tiny(output_dir="elsewhere")) is None


def test_changed_stages_are_named():
    both = saved(tiny())
    only_finetune = RunConfig.model_validate({**both, "stages": both["stages"][1:]})
    assert resume_mismatch(both, only_finetune) == "stages (their number)"
    swapped = RunConfig.model_validate({**both, "stages": both["stages"][::-1]})
    assert resume_mismatch(both, swapped) == "stages.0.name"


def _a_run_with_one_checkpoint(out, config):
    """OUTPUT as a run leaves it after its first checkpoint: config.yaml and a whole step folder."""
    step = checkpoints_dir(out) / "step-0000003"
    step.mkdir(parents=True)
    (step / "trainer_state.json").write_text(TrainerState(step=3, stage_step=3, data_position=24).to_json())
    (checkpoints_dir(out) / "latest").write_text(step.name)
    (out / "config.yaml").write_text(dump_config(config))


def test_resume_with_other_data_is_refused_before_loading_it_and_keeps_the_run(tmp_path):
    """The refusal a user sees (``Run.setup``): it names the setting and the remedy, before the data or the
    model load, and leaves the run's config as it was."""
    out = tmp_path / "run"
    _a_run_with_one_checkpoint(out, tiny("logging.tensorboard=false", output_dir=str(out)))
    before = (out / "config.yaml").read_text()
    changed = tiny("logging.tensorboard=false", "data.dataset=no/such-dataset", output_dir=str(out))
    run = Run(changed, resume=True, log=lambda msg: None)
    assert run.state.step == 3
    with pytest.raises(T2RError) as e:  # a data set that does not exist: the refusal comes before reading it
        run.setup()
    msg = str(e.value)
    assert "cannot resume" in msg and "data.dataset differs" in msg and "new --output-dir" in msg
    assert (out / "config.yaml").read_text() == before
    shutil.rmtree(out / "checkpoints")
    with pytest.raises(T2RError, match="nothing to resume"):
        Run(changed, resume=True, log=lambda msg: None)
