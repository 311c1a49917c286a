"""What every benchmark's driver shares: the machine, the command line, scratch directories, the task protocol,
tables and verdicts.

The driver stays light (no torch import): every measured run is a fresh process,
`python -m benchmark.<module> --task TASK --args JSON` (`run_task`), that prints one `RESULT {json}` line, so
each run's peak RSS (VmHWM) is its own and no run warms another's allocator. torchrun runs (ranks_scaling)
use the same line, printed by rank 0. The measured side of the protocol is benchmark._measure.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from benchmark._measure import RESULT_PREFIX, THREADS_ENV, serve

REPO_ROOT = Path(__file__).resolve().parent.parent
MiB = 1 << 20
GB = 1e9
CONTEXT = 128
D_MODEL = 256
HOOK = "blocks.1.hook_resid_post"
BATCH = 32
ACT_BYTES_PER_TOKEN = D_MODEL * 4  # float32


@dataclass
class Verdict:
    """One target of issue 3 and what this run measured for it."""

    item: str
    measured: str
    target: str
    met: bool | None  # None: not judged (a --quick run, or a figure with no target)


@dataclass(frozen=True)
class Job:
    """One measured run: task `task` of benchmark.<module>, called with `args` in a fresh process."""

    module: str
    task: str
    args: dict = field(default_factory=dict)

    def but(self, **changes) -> Job:
        """The same job with some arguments changed."""
        return Job(self.module, self.task, {**self.args, **changes})


# -- the command line -------------------------------------------------------------------------------


def parser(description: str, *, device: bool = False) -> argparse.ArgumentParser:
    """The options every benchmark takes; device=True adds --device (for the benchmarks that run a model)."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--quick", action="store_true", help="tiny sizes, one repetition: a smoke run of the script")
    p.add_argument("--reps", type=int, default=None, help="repetitions of each measurement (best of N is reported)")
    p.add_argument(
        "--threads",
        type=int,
        default=None,
        help=f"torch threads in every run (default: torch's default, the core count); sets ${THREADS_ENV}",
    )
    if device:
        p.add_argument("--device", default="cpu", help="where the model runs, e.g. cuda (default: cpu)")
    return p


def parse(p: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace:
    """Parse the arguments; --threads is handed to every run through the environment."""
    args = p.parse_args(argv)
    if args.threads:
        os.environ[THREADS_ENV] = str(args.threads)
    return args


def entry(main: Callable[[list[str] | None], object], tasks: dict[str, Callable[..., dict]]) -> None:
    """A benchmark module's `__main__`: one measured task with --task, else the driver `main`."""
    if "--task" in sys.argv[1:]:
        serve(tasks, sys.argv[1:])
    else:
        main(None)


# -- the machine ------------------------------------------------------------------------------------


def machine() -> dict:
    """nproc, RAM, CPU model and load average of this machine."""
    model = "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    ram = 0
    with contextlib.suppress(OSError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                ram = int(line.split()[1]) * 1024
    return {"nproc": os.cpu_count(), "ram_gib": ram / (1 << 30), "cpu": model, "load": os.getloadavg()}


def load_text() -> str:
    a, b, c = os.getloadavg()
    return f"load average {a:.2f} {b:.2f} {c:.2f} (nproc {os.cpu_count()})"


def threads_text(result: dict) -> str:
    n = result.get("torch_threads")
    return f"torch threads {n}" + ("" if os.environ.get(THREADS_ENV) else " (torch's default)")


@contextlib.contextmanager
def scratch(name: str) -> Iterator[Path]:
    """A temporary directory for a benchmark's data, removed afterwards (also on error)."""
    path = Path(tempfile.mkdtemp(prefix=f"sae_cache_bench_{name}_"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


# -- measured runs ----------------------------------------------------------------------------------


def task_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """The environment of a measured run: this repository first on the path, offline, no tokenizer threads."""
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    env.setdefault("HF_DATASETS_OFFLINE", "1")
    env.setdefault("HF_HUB_OFFLINE", "1")
    return {**env, **(extra or {})}


def run_task(
    module: str, task: str, *, launcher: list[str] | None = None, env: dict[str, str] | None = None, **kwargs
) -> dict:
    """Run task `task` of benchmark.<module> in a fresh process and return its RESULT, plus `wall_s`: the
    process's whole wall time as seen from here (start-up included).

    `launcher` replaces `python -m` (e.g. torchrun's command line ending in -m); `env` adds variables.
    """
    cmd = [*(launcher or [sys.executable, "-m"]), f"benchmark.{module}", "--task", task, "--args", json.dumps(kwargs)]
    started = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO_ROOT, env=task_env(env), capture_output=True, text=True)
    wall_s = time.perf_counter() - started
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith(RESULT_PREFIX) and proc.returncode == 0:
            return {**json.loads(line[len(RESULT_PREFIX) :]), "wall_s": wall_s}
    raise RuntimeError(
        f"task {module}.{task} failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}\n{proc.stdout[-2000:]}"
    )


def run_job(job: Job) -> dict:
    return run_task(job.module, job.task, **job.args)


def alternate(jobs: dict[str, Job], reps: int, *, reverse_odd: bool = True) -> dict[str, list[dict]]:
    """Run each named job `reps` times, alternating A/B/.. (order reversed every other round)."""
    results: dict[str, list[dict]] = {name: [] for name in jobs}
    names = list(jobs)
    for r in range(reps):
        order = names[::-1] if reverse_odd and r % 2 else names
        for name in order:
            res = run_job(jobs[name])
            res["rep"] = r
            results[name].append(res)
            print(
                f"  [{name} rep {r + 1}/{reps}: {res['seconds']:.2f} s, peak RSS {res['hwm_mib']:.0f} MiB, "
                f"load {res['load'][0]:.2f}]",
                file=sys.stderr,
                flush=True,
            )
    return results


def best(runs: list[dict]) -> dict:
    """The fastest run (best of N: the run least disturbed by other load)."""
    return min(runs, key=lambda r: r["seconds"])


def prepare_tokens(directory: Path, n_rows: int) -> dict:
    """A pretokenized datasets directory of n_rows rows of CONTEXT tokens (demo text, tiled), made once."""
    out = directory / f"tokens_{n_rows}"
    info = out / "bench_info.json"
    if info.exists():
        return json.loads(info.read_text())
    res = run_task("_setup", "tokens", out=str(out), n_rows=n_rows, context=CONTEXT)
    info.write_text(json.dumps(res))
    return res


# -- printing ---------------------------------------------------------------------------------------


def header(title: str, note: str = "") -> None:
    """Print a table's title with the machine's load average at this moment."""
    print(f"\n### {title}\n")
    print(f"_{load_text()}; {time.strftime('%Y-%m-%d %H:%M:%S')}_" + (f"  \n_{note}_" if note else ""))
    print()


def table(columns: list[str], rows: list[list]) -> None:
    """Print a Markdown table."""
    print("| " + " | ".join(columns) + " |")
    print("|" + "|".join("---" for _ in columns) + "|")
    for row in rows:
        print("| " + " | ".join(str(c) for c in row) + " |")
    sys.stdout.flush()


def verdict_table(verdicts: list[Verdict]) -> None:
    mark = {True: "met", False: "**not met**", None: "not judged"}
    table(["item", "measured", "target", "verdict"], [[v.item, v.measured, v.target, mark[v.met]] for v in verdicts])


def f0(x: float) -> str:
    return f"{x:,.0f}"


def f2(x: float) -> str:
    return f"{x:.2f}"


def f3(x: float) -> str:
    return f"{x:.3f}"


def times(runs: list[dict]) -> str:
    """All run times, to show the spread behind the best one."""
    return " / ".join(f"{r['seconds']:.2f}" if r["seconds"] < 10 else f"{r['seconds']:.1f}" for r in runs)
