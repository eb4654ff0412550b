"""The training benchmarks end to end on CPU: scripts/bench_e2e.py --tiny prints both recipes' training
rows (and the plain teacher against t2r's step), scripts/step_ops.py counts one finetune step's operators
by caller."""
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _run(*args):
    run = subprocess.run([sys.executable, *map(str, args)], capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert run.returncode == 0, run.stderr[-3000:]
    return run.stdout


def test_bench_e2e_tiny_prints_both_recipes():
    out = _run(ROOT / "scripts/bench_e2e.py", "--tiny", "--skip", "decode,generate,convert", "--steps", "1",
               "--train", "2x64")
    rows = {r[0].strip(): [c.strip() for c in r[1:]] for r in
            (line.split("|")[1:-1] for line in out.splitlines() if line.startswith("| ") and "---" not in line)}
    plain, t2r = rows["LoRA train tok/s, 2 x 64"], rows["LoRA train tok/s, 2 x 64, t2r step"]
    cross = rows["LoRA train tok/s, 2 x 64: plain teacher, converted t2r step"]
    assert cross[0] == plain[0] and cross[1] == t2r[1]  # the plain teacher against the converted model's t2r step
    for row in (plain, t2r, cross):
        assert re.fullmatch(r"[\d,]+", row[0]) and re.fullmatch(r"[\d,]+", row[1]) and row[2].endswith("x"), row


def test_step_ops_counts_a_finetune_step_by_caller():
    out = _run(ROOT / "scripts/step_ops.py", "--model", "tiny-random-llama", "--seq-len", "16", "--top", "50")
    total = int(re.search(r"(\d+) operators dispatched", out).group(1))
    callers = dict((m.group(2), int(m.group(1))) for m in re.finditer(r"^\s+(\d+)\s+[\d.]+%\s+(\S+)$", out, re.M)
                   if ":" in m.group(2) or m.group(2) == "other")
    assert total > 100
    assert any(c.startswith("t2r/layers/norm.py:") for c in callers) and any(c.startswith("t2r/layers/gsa.py:")
                                                                              for c in callers), out
    assert sum(callers.values()) <= total
