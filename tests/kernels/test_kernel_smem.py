"""The chunk kernels fit an H100's and H200's shared memory (232,448 bytes a block) at Mistral-7B's
attention shapes with the pipelining stages they are configured with. Checked by compiling them for
sm_90 with Triton's own compiler (scripts/kernel_smem.py), which needs no GPU: the 2026-12-07 kernels
did not fit there (the backward prep kernel asked for 270,336 bytes) and stopped 7B training on the
GPU while every CPU test passed."""
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PIPELINED = ("_local_fwd_kernel", "_fwd_o_kernel", "_bwd_prep_kernel", "_local_bwd_kernel", "_bwd_dqkv_kernel")


@pytest.mark.slow
def test_every_pipelined_kernel_fits_hopper_at_mistral_7b_shapes():
    r = subprocess.run([sys.executable, str(ROOT / "scripts" / "kernel_smem.py"), "--shapes", "128x64x4", "--check"],
                       capture_output=True, text=True, timeout=1200)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    rows = [line.split(" | ") for line in r.stdout.splitlines() if line.startswith("| 128x64x4 ")]
    assert sorted(row[1] for row in rows) == sorted(PIPELINED)
    for row in rows:
        assert row[4] == "yes" and 0 < int(row[3].replace(",", "")) <= 232448, row
