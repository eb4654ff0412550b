"""Converted folders load by path in tools that never import t2r (lm-evaluation-harness's
``--model hf``, plain transformers): the modeling code and ``auto_map`` sit beside the weights."""
import json
import subprocess
import sys

import torch
from transformers import AutoModelForCausalLM

from t2r.convert import ConversionOptions, convert

LOAD = """
import sys, torch
sys.modules["t2r"] = None  # importing t2r would fail: only the folder's own code may be used
from transformers import AutoModelForCausalLM
model = AutoModelForCausalLM.from_pretrained(sys.argv[1], trust_remote_code=True).eval()
ids = torch.arange(2, 40).view(2, 19)
with torch.no_grad():
    torch.save(model(ids).logits, sys.argv[2])
print(type(model).__module__)
"""


def test_converted_folder_loads_without_t2r(tmp_path):
    out = tmp_path / "cnv"
    options = ConversionOptions(window_size=4, feature_map="linear", use_rope=True, softmax_layers="1")
    convert("tiny-random-mistral", out, options, log=lambda *_: None)
    config = json.loads((out / "config.json").read_text())
    assert config["auto_map"]["AutoModelForCausalLM"] == "modeling_t2r.T2RForCausalLM"
    r = subprocess.run([sys.executable, "-c", LOAD, str(out), str(tmp_path / "logits.pt")], capture_output=True,
                       text=True, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "transformers_modules" in r.stdout  # the folder's code, not t2r's
    ours = AutoModelForCausalLM.from_pretrained(out).eval()
    with torch.no_grad():
        ref = ours(torch.arange(2, 40).view(2, 19)).logits
    assert torch.equal(torch.load(tmp_path / "logits.pt"), ref)
