"""`t2r finetune` of configs/tiny.yaml with the gla and linear mixers: attention transfer and the LoRA
finetune both lower their losses, and the outputs (merged model, base + adapter) agree."""
import json

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

import t2r  # noqa: F401
from tests.kernels.gsa_inputs import rel_err
from tests.train.runs import finetune_cmd, metrics, run

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("mixer", ["gla", "linear"])
def test_transfer_and_finetune_lower_the_loss(tmp_path, mixer):
    out = tmp_path / mixer
    # tiny.yaml's num_slots (16) is GSA's: back to its default, which the other mixers allow
    r = run(finetune_cmd(out, f"model.conversion.mixer={mixer}", "model.conversion.num_slots=64"))
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"attention layers to {mixer.upper()}" in r.stdout
    steps = metrics(out)
    transfer = [m["transfer_mse"] for m in steps if m["stage"] == "attention_transfer"]
    assert len(transfer) == 4 and transfer[-1] < transfer[0]
    summary = json.loads((out / "run_summary.json").read_text())
    errors = summary["transfer_error_per_layer"]  # held-out rows, per converted layer
    assert all(a < b for a, b in zip(errors["after"], errors["before"]))
    assert summary["eval"]["ppl_after"] < summary["eval"]["converted_ppl_before"]
    assert json.loads((out / "model" / "config.json").read_text())["mixer"] == mixer
    merged = AutoModelForCausalLM.from_pretrained(out / "model")
    unmerged = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(out / "base"), out / "adapter")
    ids = torch.randint(2, 258, (2, 33))
    with torch.no_grad():  # the adapter carries what the conversion added (gla's gk_proj) in full
        assert rel_err(merged(ids).logits, unmerged(ids).logits) < 1e-5
