"""Whole `t2r finetune` runs of configs/tiny.yaml: outputs, several processes, interruptions."""
import json
import os
import signal
import subprocess
import sys

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

import t2r  # noqa: F401
from t2r.train.checkpoint import latest_checkpoint
from t2r.train.run_folder import ACCELERATE_STATE, LATEST, RunFolder, checkpoint_name
from tests.kernels.gsa_inputs import rel_err
from tests.train.runs import ENV, ROOT, finetune_cmd, metrics, run, start, wait_for_steps

pytestmark = pytest.mark.slow
LONG = ["stages.1.steps=24", "checkpoint.every_steps=4", "eval.every_steps=100"]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "tiny"
    r = run(finetune_cmd(out, "eval.every_steps=3"))
    assert r.returncode == 0, r.stderr[-3000:]
    return out, r


def test_run_writes_a_model_an_adapter_and_a_summary(tiny_run):
    out, r = tiny_run
    steps = metrics(out)
    assert [m["step"] for m in steps] == list(range(1, 11))
    assert [m["stage"] for m in steps] == ["attention_transfer"] * 4 + ["finetune"] * 6
    assert steps[3]["transfer_mse"] < steps[0]["transfer_mse"]  # attention transfer learns
    summary = json.loads(RunFolder(out).summary.read_text())
    ev = summary["eval"]
    assert ev["ppl_after"] < ev["converted_ppl_before"]  # finetuning helps on held-out modules
    assert summary["tokens_seen"] == 10 * 8 * 128 and [s["steps"] for s in summary["stages"]] == [4, 6]
    assert "held-out perplexity teacher_ppl" in r.stdout
    # attention transfer lowered every layer's error on held-out rows, and the summary says so per layer
    errors = summary["transfer_error_per_layer"]
    assert len(errors["before"]) == len(errors["after"]) == 3 and sum(errors["after"]) < sum(errors["before"])
    # OUTPUT/model and OUTPUT/base load by path without t2r (the modeling code and auto_map beside them)
    done = RunFolder(out)
    for folder in (done.model, done.base):
        assert "auto_map" in json.loads((folder / "config.json").read_text())
        assert (folder / "modeling_t2r.py").is_file()
    merged = AutoModelForCausalLM.from_pretrained(done.model)
    unmerged = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(done.base), done.adapter)
    ids = torch.randint(2, 258, (2, 33))
    with torch.no_grad():
        assert rel_err(merged(ids).logits, unmerged(ids).logits) < 1e-5
    assert done.logs.is_dir() and any(done.logs.rglob("events.out.tfevents*"))


def test_two_processes_give_the_losses_of_one(tiny_run, tmp_path):
    """accelerate launch, 2 processes (gloo on CPU) at the same global batch: same losses within 1e-5."""
    out, _ = tiny_run
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
           str(ROOT / "configs/accelerate/cpu-2proc.yaml"), "--main_process_port", "29533",
           "-m", "t2r.cli", "finetune", str(ROOT / "configs/tiny.yaml"), "--output-dir", str(tmp_path / "ddp"),
           "--set", "batch.micro_batch_size=2"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=ENV)
    assert r.returncode == 0, r.stderr[-3000:]
    one, two = metrics(out), metrics(tmp_path / "ddp")
    assert len(one) == len(two) == 10
    for a, b in zip(one, two):
        assert abs(a["loss"] - b["loss"]) <= 1e-5 * abs(a["loss"]), (a, b)
        assert a["tokens"] == b["tokens"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU machine the FSDP config shards")
def test_the_fsdp_config_on_a_machine_without_gpus_fails_before_any_work(tmp_path):
    """Without CUDA, accelerate would quietly run an FSDP config's processes as DDP, unsharded: the run
    must stop at once and say so, and leave no checkpoint or model behind."""
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
           str(ROOT / "configs/accelerate/fsdp-2gpu.yaml"), "--main_process_port", "29535",
           "-m", "t2r.cli", "finetune", str(ROOT / "configs/tiny.yaml"), "--output-dir", str(tmp_path / "fsdp")]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=ENV)
    assert r.returncode != 0
    assert "asks for FSDP (distributed_type: FSDP), which runs on CUDA GPUs" in r.stderr
    assert "configs/accelerate/cpu-2proc.yaml" in r.stderr
    assert not (tmp_path / "fsdp" / "checkpoints").exists() and not (tmp_path / "fsdp" / "model").exists()


def test_compiled_layers_give_the_losses_of_eager_ones(tiny_run, tmp_path):
    """model.compile: always (torch.compile's inductor on the CPU) through both stages, under gradient
    checkpointing, with the chunked losses compiled too: the eager run's losses."""
    out, _ = tiny_run
    r = run(finetune_cmd(tmp_path / "compiled", "eval.every_steps=3", "model.compile=always"))
    assert r.returncode == 0, r.stderr[-3000:]
    assert "compiled layers: the model's 4 decoder layers, torch.compile (model.compile: always, on cpu)" in r.stdout
    assert "finetune losses: chunked, compiled (loss.fused: auto, not on CUDA)" in r.stdout
    # every variant (layer kind x stage x teacher/eval x input grad) stays compiled: none falls back to eager
    assert "recompile_limit" not in r.stderr
    eager, compiled = metrics(out), metrics(tmp_path / "compiled")
    assert len(eager) == len(compiled) == 10
    for a, b in zip(eager, compiled):
        assert abs(a["loss"] - b["loss"]) <= 1e-4 * abs(a["loss"]), (a, b)


def test_resume_after_kill_9_continues_exactly(tmp_path):
    whole = run(finetune_cmd(tmp_path / "whole", *LONG))
    assert whole.returncode == 0, whole.stderr[-3000:]
    proc = start(finetune_cmd(tmp_path / "killed", *LONG), tmp_path / "killed.log")
    wait_for_steps(tmp_path / "killed", 14, proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    ckpt = latest_checkpoint(tmp_path / "killed")
    assert ckpt is not None and 4 <= int(ckpt.name.split("-")[1]) <= 14
    r = run(finetune_cmd(tmp_path / "killed", *LONG) + ["--resume"])
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"resuming from {ckpt.name}" in r.stdout
    assert [m["loss"] for m in metrics(tmp_path / "killed")] == [m["loss"] for m in metrics(tmp_path / "whole")]


def test_resume_refuses_a_changed_model_or_lora_and_keeps_the_run(tiny_run, tmp_path):
    """--resume with a setting the checkpoints depend on changed (here the LoRA rank): a one-line
    error naming the key, and the run's config and checkpoints untouched."""
    import shutil

    out = tmp_path / "run"
    shutil.copytree(tiny_run[0], out)
    before = RunFolder(out).config.read_text()
    r = run(finetune_cmd(out, "stages.1.lora.rank=8") + ["--resume"])
    assert r.returncode == 2 and "stages.1.lora.rank differs" in r.stderr and "Traceback" not in r.stderr
    assert RunFolder(out).config.read_text() == before and latest_checkpoint(out).name == checkpoint_name(9)


def test_sigterm_saves_a_checkpoint_and_says_how_to_resume(tmp_path):
    out = tmp_path / "run"
    proc = start(finetune_cmd(out, *LONG, "checkpoint.every_steps=1000"), tmp_path / "log")
    wait_for_steps(out, 6, proc)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=120) == 130
    log = (tmp_path / "log").read_text()
    assert "--resume" in log
    ckpt = latest_checkpoint(out)
    assert ckpt is not None and int(ckpt.name.split("-")[1]) >= 6  # the progress was kept
    r = run(finetune_cmd(out, *LONG))
    assert r.returncode == 2 and "pass --resume" in r.stderr  # never starts over a run by accident


def test_nonfinite_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path):
    out = tmp_path / "run"
    r = run(finetune_cmd(out, "stages.1.lr=1.0e+30", "stages.1.warmup_steps=0", "checkpoint.every_steps=4"))
    assert r.returncode == 3, r.stderr[-3000:]
    assert "became nan at step" in r.stderr or "became inf at step" in r.stderr
    assert "last good checkpoint is" in r.stderr and "--resume" in r.stderr
    assert latest_checkpoint(out).name == checkpoint_name(4)
    assert not RunFolder(out).model.exists()
    # with no checkpoint yet, it does not point at --resume, which could not work
    r = run(finetune_cmd(tmp_path / "early", "stages.1.lr=1.0e+30", "stages.1.warmup_steps=0",
                         "checkpoint.every_steps=100"))
    assert r.returncode == 3 and "no checkpoint was written yet, so there is nothing to resume" in r.stderr
    assert "--resume" not in r.stderr


DISK_FULL = r"""
import errno, sys
from accelerate import Accelerator
real = Accelerator.save_state
calls = {"n": 0}
def full_disk_after_first(self, output_dir=None, **kw):
    calls["n"] += 1
    if calls["n"] >= 2:
        raise OSError(errno.ENOSPC, "No space left on device")
    return real(self, output_dir, **kw)
Accelerator.save_state = full_disk_after_first
from t2r.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_failed_checkpoint_writes_leave_the_previous_one_usable(tmp_path):
    """The disk fills after the first checkpoint: the run goes on, step 3 stays complete and resumable."""
    out = tmp_path / "run"
    cmd = finetune_cmd(out, "stages.1.steps=8", "checkpoint.every_steps=3", "eval.every_steps=100")
    r = subprocess.run([sys.executable, "-c", DISK_FULL, *cmd[3:]], capture_output=True, text=True, env=ENV,
                       timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "writing the checkpoint at step 6 failed" in r.stdout and "(step-0000003) is intact" in r.stdout
    names = sorted(p.name for p in RunFolder(out).checkpoints.iterdir())
    assert names == [LATEST, checkpoint_name(3)]
    assert latest_checkpoint(out).name == checkpoint_name(3)
    first = metrics(out)
    r = run(finetune_cmd(out, "stages.1.steps=8", "checkpoint.every_steps=3", "eval.every_steps=100") + ["--resume"])
    assert r.returncode == 0, r.stderr[-3000:]
    assert "resuming from step-0000003" in r.stdout
    assert [m["loss"] for m in metrics(out)] == [m["loss"] for m in first]


def test_a_checkpoint_exports_the_model_it_held(tiny_run, tmp_path):
    """`t2r export OUTPUT/checkpoints/step-9`: the exported model scores the held-out rows exactly as
    the run scored its model at step 9."""
    from t2r.eval.perplexity import perplexity
    from t2r.train.checkpoint import read_trainer_state
    from t2r.train.config import load_config
    from t2r.train.data import load_documents, tokenize_and_pack

    out, _ = tiny_run
    ckpt = RunFolder(out).checkpoint(9)
    r = run([sys.executable, "-m", "t2r.cli", "export", str(ckpt), "--out", str(tmp_path / "export")])
    assert r.returncode == 0, r.stderr[-3000:]
    config = load_config(RunFolder(out).config)
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "export")
    tok = AutoTokenizer.from_pretrained(tmp_path / "export")
    held_out = tokenize_and_pack(load_documents(config.data)[1], tok, config.data, None)
    rows = list(held_out.select(range(config.eval.max_batches * config.batch.micro_batch_size)))
    ppl, _ = perplexity(model, rows, config.batch.micro_batch_size, tok.pad_token_id, "cpu")
    recorded = read_trainer_state(ckpt).evals["ppl_step_9"]
    assert abs(ppl - recorded) < 1e-4 * recorded, (ppl, recorded)


def test_bf16_weights_train_on_cpu_and_stay_bf16(tmp_path):
    r = run(finetune_cmd(tmp_path / "bf16", "model.conversion.dtype=bf16", "stages.1.steps=2", "eval.before=false"))
    assert r.returncode == 0, r.stderr[-3000:]
    assert all(torch.isfinite(torch.tensor(m["loss"])) for m in metrics(tmp_path / "bf16"))
    model = AutoModelForCausalLM.from_pretrained(RunFolder(tmp_path / "bf16").model)
    dtypes = {n.split(".")[-2]: p.dtype for n, p in model.named_parameters()}
    assert dtypes["q_proj"] == dtypes["f_proj"] == torch.bfloat16 and dtypes["g_norm"] == torch.float32


def test_a_second_run_on_the_same_folder_is_refused_while_the_first_lives(tmp_path):
    out = tmp_path / "busy"
    out.mkdir()
    RunFolder(out).lock.write_text(f"{os.getpid()}\n")  # this test process plays the first run
    r = run(finetune_cmd(out))
    assert r.returncode == 2 and f"another t2r finetune (pid {os.getpid()}) is writing {out}" in r.stderr
    assert not RunFolder(out).metrics.exists() and RunFolder(out).lock.read_text().strip() == str(os.getpid())


def test_a_fresh_run_starts_clean_and_takes_over_a_dead_runs_lock(tmp_path):
    """A folder an earlier attempt left without a checkpoint: its metrics do not mix into the new run's."""
    out = tmp_path / "again"
    out.mkdir()
    RunFolder(out).metrics.write_text('{"step": 1, "stage": "finetune", "loss": 99.0}\n' * 7)
    RunFolder(out).lock.write_text("99999999\n")  # above any pid limit: no such process
    r = run(finetune_cmd(out, "stages.0.steps=1", "stages.1.steps=1", "eval.teacher=false", "eval.before=false"))
    assert r.returncode == 0, r.stderr[-3000:]
    assert [m["step"] for m in metrics(out)] == [1, 2] and all(m["loss"] != 99.0 for m in metrics(out))
    assert not RunFolder(out).lock.exists()


def test_resume_skips_a_damaged_latest_checkpoint(tmp_path):
    """A truncated newest checkpoint (a crash while copying, a full disk elsewhere): --resume says so and
    continues from the one before it, with the losses an uninterrupted run has."""
    out = tmp_path / "run"
    sets = ["stages.1.steps=8", "checkpoint.every_steps=3", "eval.every_steps=100"]
    r = run(finetune_cmd(out, *sets))
    assert r.returncode == 0, r.stderr[-3000:]
    whole = metrics(out)
    weights = RunFolder(out).checkpoint(12) / ACCELERATE_STATE / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    RunFolder(out).model.rename(out / "model-first")  # what the resumed run writes again
    r = run(finetune_cmd(out, *sets) + ["--resume"])
    assert r.returncode == 0, r.stderr[-3000:]
    assert "checkpoint step-0000012 is damaged (model.safetensors does not read" in r.stdout
    assert "resuming from step-0000009" in r.stdout
    assert [m["loss"] for m in metrics(out)] == [m["loss"] for m in whole]


def test_a_run_trains_on_a_weighted_mix_of_sources(tmp_path):
    out = tmp_path / "mix"
    r = run(finetune_cmd(out, "data.dataset=null", "data.max_documents=null", "stages.1.steps=2",
                         "data.mix=[{dataset: python-stdlib, max_documents: 60}, "
                         "{dataset: english-prose, max_documents: 12, weight: 0.5}]"))
    assert r.returncode == 0, r.stderr[-3000:]
    ev = json.loads(RunFolder(out).summary.read_text())["eval"]
    assert ev["ppl_after"] < ev["converted_ppl_before"] and ev["eval_tokens"] > 0  # on both sources' held-out rows
    saved = RunFolder(out).config.read_text()
    assert "english-prose" in saved and "weight: 0.5" in saved
