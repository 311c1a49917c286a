"""The measured side of the task protocol: one task per process, `RESULT {json}` on stdout.

`serve(tasks, argv)` runs `--task TASK --args JSON`: the task does its setup (model, dataset, synthetic
buffers) untimed, times one section with `Timed` (wall seconds and the process's CPU seconds, all threads;
on a GPU the clock is read only after torch.cuda.synchronize), and returns a dict. `serve` adds the
process's peak RSS (VmHWM, which includes the setup), its RSS at the end and the load average when it
started, and prints the line (under torchrun, rank 0 only). `_profile` (a path) in the arguments writes a
cProfile of the timed section (main thread only).
"""

from __future__ import annotations

import argparse
import cProfile
import json
import os
import resource
import time
from collections.abc import Callable
from pathlib import Path

THREADS_ENV = "SAE_CACHE_BENCH_TORCH_THREADS"  # set by the drivers' --threads: torch.set_num_threads in every run
RESULT_PREFIX = "RESULT "


def proc_status() -> dict[str, float]:
    """VmHWM, VmRSS, RssAnon and RssFile of this process, in MiB."""
    out = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmHWM", "VmRSS", "RssAnon", "RssFile"):
            out[key] = int(value.split()[0]) / 1024
    return out


def sync(device: str) -> None:
    """Wait for the GPU's queued work (a no-op on the CPU), so that a clock read after it counts that work."""
    if device.startswith("cuda"):
        import torch

        torch.cuda.synchronize(device)


class Timed:
    """Times a section: wall seconds, CPU seconds (user + system, every thread), RSS when it started.

    On a GPU (`device` cuda) the queued work is waited for before the clock starts and before it stops.
    """

    profile_path: str | None = None

    def __init__(self, device: str = "cpu") -> None:
        self.device = device

    def __enter__(self) -> Timed:
        sync(self.device)
        status = proc_status()
        self.base_mib, self.base_hwm_mib = status["VmRSS"], status["VmHWM"]
        self._profiler = cProfile.Profile() if Timed.profile_path else None
        self._ru = resource.getrusage(resource.RUSAGE_SELF)
        self._t = time.perf_counter()
        if self._profiler:
            self._profiler.enable()
        return self

    def __exit__(self, *exc) -> None:
        sync(self.device)
        self.seconds = time.perf_counter() - self._t
        if self._profiler:
            self._profiler.disable()
            self._profiler.dump_stats(Timed.profile_path)
        ru = resource.getrusage(resource.RUSAGE_SELF)
        self.cpu_s = (ru.ru_utime - self._ru.ru_utime) + (ru.ru_stime - self._ru.ru_stime)

    def result(self, **extra) -> dict:
        return {
            "seconds": self.seconds,
            "cpu_s": self.cpu_s,
            "base_mib": self.base_mib,
            "base_hwm_mib": self.base_hwm_mib,
            **extra,
        }


def serve(tasks: dict[str, Callable[..., dict]], argv: list[str]) -> None:
    """Run one task (`--task NAME --args JSON`) and print its result as one `RESULT {json}` line."""
    p = argparse.ArgumentParser(description="one measured run of a benchmark task")
    p.add_argument("--task", required=True, choices=sorted(tasks))
    p.add_argument("--args", default="{}", help="the task's keyword arguments, as a JSON object")
    args = p.parse_args(argv)
    kwargs = json.loads(args.args)
    Timed.profile_path = kwargs.pop("_profile", None)
    import torch

    if os.environ.get(THREADS_ENV):
        torch.set_num_threads(int(os.environ[THREADS_ENV]))
    load = os.getloadavg()
    result = tasks[args.task](**kwargs)
    status = proc_status()
    result.update(
        hwm_mib=status["VmHWM"],
        rss_end_mib=status["VmRSS"],
        rss_file_end_mib=status.get("RssFile", 0.0),
        load=load,
        task=args.task,
        torch_threads=torch.get_num_threads(),
    )
    if os.environ.get("RANK", "0") == "0":  # under torchrun, one line: rank 0's
        print(RESULT_PREFIX + json.dumps(result), flush=True)
