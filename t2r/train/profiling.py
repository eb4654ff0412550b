"""``logging.profile_steps: [FIRST, LAST]``: where a run's step time goes, as torch.profiler sees it.

Optimizer steps FIRST..LAST (counted over the whole run, from 1) run under torch.profiler (CPU, and the
GPU where there is one); when LAST ends, the main process writes OUTPUT/profile.txt: on a GPU the
kernels, on a CPU the operators, sorted by their time, the share of each, and the wall time per
profiled step. Profiling slows the profiled steps; their throughput in metrics.jsonl is not the run's.
"""
from __future__ import annotations

import time
from pathlib import Path

import torch

ROWS = 40


class StepProfiler:
    """Start before step FIRST, stop and write after step LAST; a no-op when ``steps`` is None."""

    def __init__(self, steps: list[int] | None, out: Path, main_process: bool):
        """``out``: the report's path (``RunFolder.profile``), written by the main process only."""
        self.first, self.last = (steps or (0, -1))
        self.out, self.main_process = out, main_process
        self.prof = None

    def before(self, step: int) -> None:
        """``step``: the number the coming optimizer step will have."""
        if step == self.first and self.prof is None:
            from torch.profiler import ProfilerActivity, profile

            activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
            self.prof = profile(activities=activities)
            self.prof.start()
            self.started = time.perf_counter()

    def after(self, step: int) -> None:
        if self.prof is None or step < self.last:
            return
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        wall = (time.perf_counter() - self.started) / (self.last - self.first + 1)
        self.prof.stop()
        if self.main_process:
            self.out.write_text(report(self.prof, self.first, self.last, wall))
        self.prof = None


def report(prof, first: int, last: int, wall_per_step: float) -> str:
    """On a GPU, the kernels alone (an operator's device time is its kernels' time: listing both would
    count it twice); on a CPU, the operators' self time."""
    from torch.autograd import DeviceType

    events = prof.key_averages()
    kernels = [e for e in events if e.device_type != DeviceType.CPU and e.self_device_time_total > 0]
    on_device = bool(kernels)
    total = (lambda e: e.self_device_time_total) if on_device else (lambda e: e.self_cpu_time_total)
    rows = sorted(kernels if on_device else events, key=total, reverse=True)
    whole = sum(total(e) for e in rows) or 1
    n = last - first + 1
    where = "GPU kernel" if on_device else "CPU"
    lines = [f"steps {first}..{last} ({n}): {wall_per_step * 1e3:.1f} ms wall per step, "
             f"{whole / n / 1e3:.1f} ms of {where} self time per step",
             f"{'share':>6} {'ms/step':>9} {'calls/step':>10}  name"]
    for e in rows[:ROWS]:
        name = e.key if len(e.key) <= 110 else e.key[:107] + "..."
        lines.append(f"{total(e) / whole:6.1%} {total(e) / n / 1e3:9.2f} {e.count / n:10.1f}  {name}")
    return "\n".join(lines) + "\n"
