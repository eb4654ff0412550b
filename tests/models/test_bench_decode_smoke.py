"""scripts/bench_decode.py end to end on CPU (--tiny): every path runs, the table has the teacher ratios,
and the static paths make the dynamic path's tokens."""
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_bench_decode_tiny():
    run = subprocess.run([sys.executable, str(ROOT / "scripts/bench_decode.py"), "--tiny", "--batches", "2",
                          "--prompts", "12", "--new-tokens", "4", "--windows", "4"],
                         capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert run.returncode == 0, run.stderr[-3000:]
    rows = [line.split("|")[1:-1] for line in run.stdout.splitlines() if line.startswith("| ") and "---" not in line]
    paths = {r[1].strip(): r for r in rows[1:]}
    assert set(paths) == {"teacher", "t2r dynamic", "t2r static", "t2r static loop"}
    assert paths["teacher"][8].strip() == "1.00"  # the teacher's prefill against itself
    for path in ("t2r static", "t2r static loop"):
        assert paths[path][12].strip() == "1.00", run.stdout  # the same tokens as the dynamic path
