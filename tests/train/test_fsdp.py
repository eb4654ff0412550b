"""FSDP2 through `accelerate launch`, on two CPU processes over gloo (scripts/fsdp_on_cpu.py lifts
accelerate's GPU gate): the tiny config's two stages give DDP's losses and final weights, and a run
resumed from a mid-run checkpoint gives the first run's losses."""
import json
import subprocess
import sys

import pytest
import torch

from tests.train.runs import ENV, ROOT

pytestmark = pytest.mark.slow


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU machine run scripts/check_fsdp.sh without --cpu")
@pytest.mark.parametrize("sets,logged", [
    ("loss.fused=auto", "finetune losses: chunked (loss.fused: auto, under FSDP)"),
    ("loss.fused=off", "finetune losses: off (loss.fused: off)"),
    ("model.compile=always", "finetune losses: chunked, compiled (loss.fused: auto, under FSDP)"),
], ids=["chunked-losses", "full-logits", "compiled"])
def test_fsdp_gives_the_losses_and_weights_of_ddp_and_resumes_exactly(tmp_path, sets, logged):
    """The loss paths FSDP takes (the chunked one applies lm_head after the sharded forward), and
    compiled layers and losses (the DDP run compiles too)."""
    r = subprocess.run(["bash", "scripts/check_fsdp.sh", str(tmp_path), "--cpu", "--set", sets],
                       cwd=ROOT, capture_output=True, text=True, timeout=900, env={**ENV, "PYTHON": sys.executable})
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    # the path it took; check_fsdp.sh itself fails unless the log says the run was under FSDP
    assert logged in (tmp_path / "fsdp.log").read_text()
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["steps"] == {"fsdp": 10, "ddp": 10, "resumed": 10}
    assert summary["max_rel_loss_fsdp_ddp"] <= 1e-5
    assert summary["max_rel_loss_resumed_first"] <= 1e-6
    assert summary["max_weight_fsdp_ddp"] <= 1e-5
    assert summary["architectures"] == ["T2RForCausalLM"]


def test_check_fsdp_names_its_options():
    r = subprocess.run(["bash", "scripts/check_fsdp.sh", "/tmp/unused", "--gpu"], cwd=ROOT, capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 2 and "unknown option '--gpu' (the options are --cpu and --set KEY=VALUE)" in r.stderr
