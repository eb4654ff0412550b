"""Running real `t2r finetune` processes for the tests."""
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from t2r.train.run_folder import RunFolder

ROOT = Path(__file__).resolve().parents[2]
TINY = ROOT / "configs" / "tiny.yaml"
ENV = {**os.environ, "HF_DATASETS_DISABLE_PROGRESS_BARS": "1", "TOKENIZERS_PARALLELISM": "false",
       "OMP_NUM_THREADS": "1"}


def finetune_cmd(out, *sets, config=TINY):
    cmd = [sys.executable, "-m", "t2r.cli", "finetune", str(config), "--output-dir", str(out)]
    for s in sets:
        cmd += ["--set", s]
    return cmd


def run(cmd, timeout=600, env=None):
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env={**ENV, **(env or {})})


def metrics(out) -> list[dict]:
    return [json.loads(line) for line in RunFolder(out).metrics.read_text().splitlines()]


def start(cmd, log_path):
    log = open(log_path, "w")
    return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=ENV)


def wait_for_steps(out, n, proc, timeout=300):
    """Block until the run in ``out`` logged ``n`` steps (or fail if it ended first)."""
    path = RunFolder(out).metrics
    end = time.time() + timeout
    while time.time() < end:
        if path.is_file() and len(path.read_text().splitlines()) >= n:
            return
        assert proc.poll() is None, "the run ended before reaching the step"
        time.sleep(0.05)
    raise TimeoutError(f"no step {n} after {timeout}s")
