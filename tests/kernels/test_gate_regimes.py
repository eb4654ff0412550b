"""chunk_regimes (how the Triton kernels evaluate each chunk: factored, blocked or pairwise) and
scripts/gate_regimes.py."""
import importlib.util
from pathlib import Path

import torch

from t2r.kernels.gsa.utils import BLOCKED as B
from t2r.kernels.gsa.utils import FACTORED as F
from t2r.kernels.gsa.utils import PAIRWISE as P
from t2r.kernels.gsa.utils import chunk_regimes

ROOT = Path(__file__).resolve().parents[2]


def test_a_chunk_is_factored_within_the_threshold_of_its_middle_else_blocked_within_its_sub_blocks():
    g = torch.full((1, 64 * 3 + 10, 2, 4), -0.5)  # 32 to either side of the middle: within 40
    g[:, 64:128, 1, 0] = -1.3  # second chunk, second head: 1.3 x 32 = 41.6 past the middle; 10.4 in a sub-block
    g[:, 128:192, 0, 3] = -30.0  # third chunk, first head: forgets at once (240 past a sub-block's middle)
    regimes = chunk_regimes(g)
    assert regimes.shape == (1, 4, 2)
    assert regimes.tolist() == [[[F, F], [F, B], [P, F], [F, F]]]  # last: 10 tokens


def test_a_steep_sub_block_alone_sends_its_chunk_pairwise():
    g = torch.full((1, 64, 1, 2), -2.0)  # 16 past each sub-block's middle: blocked
    assert chunk_regimes(g).tolist() == [[[B]]]
    g[:, 40:48, :, 1] = -6.0  # sub-block 2 falls by 6 x 8 = 48 after its middle
    assert chunk_regimes(g).tolist() == [[[P]]]
    assert chunk_regimes(g, chunk=16).tolist() == [[[F], [F], [P], [F]]]  # chunks of one sub-block: no blocked form


def test_the_script_reports_each_layers_share_on_real_text(capsys):
    spec = importlib.util.spec_from_file_location("gate_regimes", ROOT / "scripts" / "gate_regimes.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    assert mod.main(["--model", "tiny-random-llama", "--rows", "1", "--seq-len", "256"]) == 0
    out = capsys.readouterr().out
    assert "| 0 |" in out and "| 1 |" in out and "of blocks blocked" in out and "pairwise" in out
