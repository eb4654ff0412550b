"""Checkpoints are written whole or not at all: a write that fails or is killed leaves no folder a resume
would pick, ``latest`` names the newest, ``keep_last`` prunes the older ones, a damaged newest one is
skipped for the one before it, and a checkpoint restores the weights it held."""
import pytest
import torch
from accelerate import Accelerator

from t2r.train.checkpoint import (TrainerState, checkpoints_dir, intact_checkpoint, latest_checkpoint,
                                  read_trainer_state, save_checkpoint)


class Killed(BaseException):
    """What a SIGKILL looks like to the code after it: nothing after the point runs (not an OSError)."""


@pytest.fixture
def trainer():
    """(accelerator, prepared model, optimizer) on the CPU, one optimizer step taken."""
    acc = Accelerator(cpu=True)
    model = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Linear(5, 3))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model, optimizer = acc.prepare(model, optimizer)
    model(torch.randn(4, 6)).pow(2).sum().backward()
    optimizer.step()
    return acc, model, optimizer


def _save(acc, out, step, keep_last=2, extra=None):
    return save_checkpoint(acc, out, TrainerState(step=step, stage_step=step, data_position=8 * step), keep_last,
                           extra=extra)


def _names(out):
    return sorted(p.name for p in checkpoints_dir(out).iterdir())


def test_latest_is_the_newest_and_keep_last_prunes_the_rest(trainer, tmp_path):
    acc = trainer[0]
    for step in (3, 6, 9, 12):
        path = _save(acc, tmp_path, step, keep_last=2)
        assert path.name == f"step-{step:07d}" and latest_checkpoint(tmp_path) == path
        assert (checkpoints_dir(tmp_path) / "latest").read_text().strip() == path.name
    assert _names(tmp_path) == ["latest", "step-0000009", "step-0000012"]
    state = read_trainer_state(latest_checkpoint(tmp_path))
    assert (state.step, state.stage_step, state.data_position) == (12, 12, 96)
    _save(acc, tmp_path, 15, keep_last=1)
    assert _names(tmp_path) == ["latest", "step-0000015"]


def test_a_failed_write_leaves_nothing_and_the_previous_checkpoint_pointed_to(trainer, tmp_path):
    acc = trainer[0]
    _save(acc, tmp_path, 3)

    def disk_full(folder):
        (folder / "partial.bin").write_bytes(b"\0" * 10)
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError, match="No space left"):
        _save(acc, tmp_path, 6, extra=disk_full)
    assert _names(tmp_path) == ["latest", "step-0000003"]
    assert latest_checkpoint(tmp_path).name == "step-0000003"


def test_a_write_killed_midway_leaves_no_folder_a_resume_would_pick(trainer, tmp_path):
    acc = trainer[0]
    _save(acc, tmp_path, 3)

    def killed(folder):
        raise Killed

    with pytest.raises(Killed):
        _save(acc, tmp_path, 6, extra=killed)
    left = checkpoints_dir(tmp_path) / "step-0000006.tmp"
    assert left.is_dir() and (left / "accelerate").is_dir()  # half written: the weights, no trainer state
    assert latest_checkpoint(tmp_path).name == "step-0000003"
    assert intact_checkpoint(tmp_path).name == "step-0000003"
    # even with the pointer gone, and a leftover that has its trainer state, only whole folders count
    (checkpoints_dir(tmp_path) / "latest").unlink()
    (left / "trainer_state.json").write_text(TrainerState(step=6).to_json())
    assert latest_checkpoint(tmp_path).name == "step-0000003"
    # the next write at that step replaces the leftover
    _save(acc, tmp_path, 6)
    assert _names(tmp_path) == ["latest", "step-0000003", "step-0000006"]
    assert latest_checkpoint(tmp_path).name == "step-0000006"


def test_without_the_pointer_the_newest_whole_folder_is_latest(trainer, tmp_path):
    acc = trainer[0]
    for step in (3, 6):
        _save(acc, tmp_path, step)
    (checkpoints_dir(tmp_path) / "latest").unlink()
    assert latest_checkpoint(tmp_path).name == "step-0000006"
    (checkpoints_dir(tmp_path) / "step-0000006" / "trainer_state.json").unlink()
    assert latest_checkpoint(tmp_path).name == "step-0000003"
    assert latest_checkpoint(tmp_path / "no-run-here") is None


def test_a_damaged_newest_checkpoint_is_named_and_skipped(trainer, tmp_path):
    acc = trainer[0]
    for step in (3, 6):
        _save(acc, tmp_path, step)
    weights = checkpoints_dir(tmp_path) / "step-0000006" / "accelerate" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])  # truncated, as by a full disk outside t2r's writes
    warnings = []
    assert intact_checkpoint(tmp_path, log=warnings.append).name == "step-0000003"
    assert len(warnings) == 1 and "step-0000006" in warnings[0] and "model.safetensors" in warnings[0]


def test_a_checkpoint_restores_the_weights_and_optimizer_it_held(trainer, tmp_path):
    acc, model, optimizer = trainer
    saved = {k: v.clone() for k, v in model.state_dict().items()}
    moments = {k: v.clone() for k, v in optimizer.state_dict()["state"][0].items()}
    path = _save(acc, tmp_path, 3)
    model(torch.randn(4, 6)).pow(2).sum().backward()
    optimizer.step()
    assert any(not torch.equal(saved[k], v) for k, v in model.state_dict().items())
    acc.load_state(str(path / "accelerate"))
    for k, v in model.state_dict().items():
        assert torch.equal(v, saved[k]), k
    for k, v in optimizer.state_dict()["state"][0].items():
        assert torch.equal(v, moments[k]), k
