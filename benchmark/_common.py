"""What every benchmark shares: the machine, scratch directories, subprocess runs, tables, verdicts.

The parent process stays light (no torch import): every measured run is a fresh
`python -m benchmark._worker TASK JSON` subprocess that prints one `RESULT {json}` line, so each
run's peak RSS (VmHWM) is its own and no run warms another's allocator.
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
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
MiB = 1 << 20
GB = 1e9
CONTEXT = 128
D_MODEL = 256
HOOK = "blocks.1.hook_resid_post"
BATCH = 32
ACT_BYTES_PER_TOKEN = D_MODEL * 4  # float32
THREADS_ENV = "SAE_CACHE_BENCH_TORCH_THREADS"  # read by benchmark._worker: torch.set_num_threads in every run


@dataclass
class Verdict:
    """One target of issue 3 and what this run measured for it."""

    item: str
    measured: str
    target: str
    met: bool | None  # None: not judged (a --quick run, or a figure with no target)


def parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--quick", action="store_true", help="tiny sizes, one repetition: a smoke run of the script")
    p.add_argument("--reps", type=int, default=None, help="repetitions of each measurement (best of N is reported)")
    p.add_argument(
        "--threads",
        type=int,
        default=None,
        help=f"torch threads in every run (default: torch's default, the core count); sets ${THREADS_ENV}",
    )
    return p


def parse(p: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace:
    """Parse the arguments; --threads is handed to every worker through the environment."""
    args = p.parse_args(argv)
    if args.threads:
        os.environ[THREADS_ENV] = str(args.threads)
    return args


def threads_text(result: dict) -> str:
    n = result.get("torch_threads")
    return f"torch threads {n}" + ("" if os.environ.get(THREADS_ENV) else " (torch's default)")


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


@contextlib.contextmanager
def scratch(name: str) -> Iterator[Path]:
    """A temporary directory for a benchmark's data, removed afterwards (also on error)."""
    path = Path(tempfile.mkdtemp(prefix=f"sae_cache_bench_{name}_"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def run_worker(task: str, **kwargs) -> dict:
    """Run one task of benchmark._worker in a fresh Python process and return its result."""
    cmd = [sys.executable, "-m", "benchmark._worker", task, json.dumps(kwargs)]
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    env.setdefault("HF_DATASETS_OFFLINE", "1")
    env.setdefault("HF_HUB_OFFLINE", "1")
    proc = subprocess.run(cmd, cwd=REPO_ROOT, env=env, capture_output=True, text=True)
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT ") :])
    raise RuntimeError(
        f"worker task {task} failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}\n{proc.stdout[-2000:]}"
    )


def alternate(specs: dict[str, dict], reps: int, *, reverse_odd: bool = True) -> dict[str, list[dict]]:
    """Run each named (task, kwargs) spec `reps` times, alternating A/B/.. (order reversed every other round)."""
    results: dict[str, list[dict]] = {name: [] for name in specs}
    names = list(specs)
    for r in range(reps):
        order = names[::-1] if reverse_odd and r % 2 else names
        for name in order:
            spec = dict(specs[name])
            task = spec.pop("task")
            res = run_worker(task, **spec)
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


def dir_bytes(path: Path) -> int:
    """Apparent size of every file under path."""
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())


def f0(x: float) -> str:
    return f"{x:,.0f}"


def f2(x: float) -> str:
    return f"{x:.2f}"


def f3(x: float) -> str:
    return f"{x:.3f}"


def times(runs: list[dict]) -> str:
    """All run times, to show the spread behind the best one."""
    return " / ".join(f"{r['seconds']:.2f}" if r["seconds"] < 10 else f"{r['seconds']:.1f}" for r in runs)


def prepare_tokens(directory: Path, n_rows: int) -> dict:
    """A pretokenized datasets directory of n_rows rows of CONTEXT tokens (demo text, tiled), made once."""
    out = directory / f"tokens_{n_rows}"
    info = out / "bench_info.json"
    if info.exists():
        return json.loads(info.read_text())
    res = run_worker("tokens", out=str(out), n_rows=n_rows, context=CONTEXT)
    info.write_text(json.dumps(res))
    return res
