"""``logging.profile_steps: [FIRST, LAST]``: where a run's step time goes, as torch.profiler sees it.

Optimizer steps FIRST..LAST (counted over the whole run, from 1) run under torch.profiler (CPU, and the
GPU where there is one); when LAST ends, the main process writes OUTPUT/profile.txt: the wall time per
profiled step; the step's phases (``phase``: forward, teacher forward, losses, backward, the wait for
the GPU, optimizer) by host time; then on a GPU the kernels and the host's operators (what limits a
host-bound step), on a CPU the operators, each sorted by time with its share. Profiling slows the
profiled steps; their throughput in metrics.jsonl is not the run's.
"""
from __future__ import annotations

import time
from pathlib import Path

import torch

ROWS = 40
PHASE = "t2r."  # the prefix of the step's phases as the profiler records them


def phase(name: str):
    """A step phase's range for the profiler (``t2r.NAME``); next to nothing when no profiler runs."""
    return torch.profiler.record_function(PHASE + name)


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
    """The phases by host time (a range's whole time: where a host-bound step waits shows as the phase
    that waited); then on a GPU the kernels alone (an operator's device time is its kernels' time:
    listing both would count it twice) and the host's operators and runtime calls by CPU self time; on
    a CPU, the operators' self time."""
    from torch.autograd import DeviceType

    events = prof.key_averages()
    n = last - first + 1
    phases = [e for e in events if e.key.startswith(PHASE) and e.device_type == DeviceType.CPU]
    cpu = [e for e in events if e.device_type == DeviceType.CPU and not e.key.startswith(PHASE)]
    kernels = [e for e in events if e.device_type != DeviceType.CPU and e.self_device_time_total > 0
               and not e.key.startswith(PHASE)]
    lines = [f"steps {first}..{last} ({n}): {wall_per_step * 1e3:.1f} ms wall per step"]
    if phases:
        lines.append("phases, host ms per step (a range's whole time): " + ", ".join(
            f"{e.key[len(PHASE):]} {e.cpu_time_total / n / 1e3:.1f}" for e in sorted(phases, key=lambda e: e.key)))
    if not kernels:
        return "\n".join(lines + table(cpu, n, "CPU operators", lambda e: e.self_cpu_time_total)) + "\n"
    host = [e for e in cpu if e.self_cpu_time_total > 0]
    calls = f"host operators and runtime calls ({sum(e.count for e in host) / n:,.0f} calls per step)"
    return "\n".join(lines + table(kernels, n, "GPU kernels", lambda e: e.self_device_time_total) + [""]
                     + table(host, n, calls, lambda e: e.self_cpu_time_total)) + "\n"


def table(events, n: int, title: str, total) -> list[str]:
    """``title`` with the events' summed ``total`` per step, then the ROWS largest: share, ms per step,
    calls per step, name."""
    rows = sorted(events, key=total, reverse=True)
    whole = sum(total(e) for e in rows) or 1
    lines = [f"{title}: {whole / n / 1e3:.1f} ms self time per step",
             f"{'share':>6} {'ms/step':>9} {'calls/step':>10}  name"]
    for e in rows[:ROWS]:
        name = e.key if len(e.key) <= 110 else e.key[:107] + "..."
        lines.append(f"{total(e) / whole:6.1%} {total(e) / n / 1e3:9.2f} {e.count / n:10.1f}  {name}")
    return lines
