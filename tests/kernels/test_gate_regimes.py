"""factored_chunks (which chunks the Triton kernels take in the factored form) and scripts/gate_regimes.py."""
import importlib.util
from pathlib import Path

import torch

from t2r.kernels.gsa.utils import factored_chunks

ROOT = Path(__file__).resolve().parents[2]


def test_a_chunk_is_factored_while_it_stays_within_the_threshold_of_its_middle():
    g = torch.full((1, 64 * 3 + 10, 2, 4), -0.5)  # 32 to either side of the middle: within 40
    g[:, 64:128, 1, 0] = -1.3  # second chunk, second head: 1.3 x 32 = 41.6 past the middle
    g[:, 128:192, 0, 3] = -30.0  # third chunk, first head: forgets at once
    ok = factored_chunks(g)
    assert ok.shape == (1, 4, 2)
    assert ok.tolist() == [[[True, True], [True, False], [False, True], [True, True]]]  # last: 10 tokens


def test_the_script_reports_each_layers_share_on_real_text(capsys):
    spec = importlib.util.spec_from_file_location("gate_regimes", ROOT / "scripts" / "gate_regimes.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    assert mod.main(["--model", "tiny-random-llama", "--rows", "1", "--seq-len", "256"]) == 0
    out = capsys.readouterr().out
    assert "| 0 |" in out and "| 1 |" in out and "of blocks pairwise" in out
