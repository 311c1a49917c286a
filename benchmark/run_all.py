"""Run every benchmark and end with one table of issue 3's targets (`make bench`).

    python -m benchmark.run_all [--quick] [--only a,b,...] [--skip a,b,...] [--threads T] [--device cuda]

Runs, in order: forward_vs_cache (a), vs_saelens (b), writer (c), scaling (e), shuffle (f),
reader (g), transformers_path (h); peak RSS and bytes on disk (d) are columns of their tables. `--quick` passes
--quick to each (a smoke run of a few minutes); `--device` is passed to those that run a model (a, b, e, f, h),
whose CPU targets are then reported, not judged. The
full suite takes tens of minutes on 2 CPU cores; run it under nohup and redirect stdout to keep the tables.
"""

from __future__ import annotations

import argparse
import platform
import subprocess
import sys
import time
from dataclasses import replace

from benchmark import forward_vs_cache, reader, scaling, shuffle, transformers_path, vs_saelens, writer
from benchmark._common import REPO_ROOT, Verdict, header, machine, verdict_table

SUITE = {
    "a": forward_vs_cache,
    "b": vs_saelens,
    "c": writer,
    "e": scaling,
    "f": shuffle,
    "g": reader,
    "h": transformers_path,
}
WITH_DEVICE = {"a", "b", "e", "f", "h"}  # the benchmarks that run a model


def git_state() -> str:
    """The commit measured, and whether the working tree differs from it."""

    def git(*args: str) -> str:
        return subprocess.run(["git", *args], capture_output=True, text=True, cwd=REPO_ROOT).stdout.strip()

    dirty = git("status", "--porcelain", "--", "sae_cache")
    return f"commit {git('rev-parse', '--short', 'HEAD') or 'unknown'}" + (
        " (sae_cache/ has uncommitted changes)" if dirty else ""
    )


def arguments(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="tiny sizes: a smoke run of every benchmark")
    p.add_argument("--only", default="", help="comma-separated letters to run (default all: a,b,c,e,f,g,h)")
    p.add_argument("--skip", default="", help="comma-separated letters to skip")
    p.add_argument("--threads", type=int, default=None, help="torch threads in every run (default: torch's default)")
    p.add_argument("--device", default="cpu", help="where the model runs in a, b, e, f and h, e.g. cuda (default: cpu)")
    return p.parse_args(argv)


def script_argv(key: str, args: argparse.Namespace) -> list[str]:
    """The command line handed to benchmark `key`."""
    argv = ["--quick"] if args.quick else []
    argv += [f"--threads={args.threads}"] if args.threads else []
    return argv + ([f"--device={args.device}"] if key in WITH_DEVICE else [])


def not_judged_off_cpu(verdicts: list[Verdict], device: str) -> list[Verdict]:
    """The targets of a benchmark that runs a model are CPU targets (a small model whose forward pass is the cost);
    on another device the figures are reported, not judged (benchmark.gpu judges the GPU)."""
    if device == "cpu":
        return verdicts
    return [replace(v, target=f"{v.target} on a CPU; not judged on {device}", met=None) for v in verdicts]


def main(argv: list[str] | None = None) -> None:
    args = arguments(argv)
    only = [x for x in args.only.split(",") if x] or list(SUITE)
    skip = {x for x in args.skip.split(",") if x}
    info = machine()
    print("## sae_cache benchmarks" + (" (--quick)" if args.quick else ""))
    print(
        f"\nmachine: {info['nproc']} CPUs ({info['cpu']}), {info['ram_gib']:.1f} GiB RAM, "
        f"Python {platform.python_version()}, load average at start {' '.join(f'{x:.2f}' for x in info['load'])}"
    )
    print(f"sae_cache at {git_state()}")
    verdicts, started = [], time.perf_counter()
    for key in (k for k in only if k not in skip):
        print(f"\n[run_all] {key}: {SUITE[key].__name__}", file=sys.stderr, flush=True)
        t = time.perf_counter()
        found = SUITE[key].main(script_argv(key, args))
        verdicts += not_judged_off_cpu(found, args.device) if key in WITH_DEVICE else found
        print(f"[run_all] {key} took {time.perf_counter() - t:.0f} s", file=sys.stderr, flush=True)
    header("targets of issue 3", f"whole suite: {time.perf_counter() - started:.0f} s")
    verdict_table(verdicts)
    if args.device == "cpu":
        print(
            "\nThe GPU figure (issue 3, item 5: benchmark (a) on a GPU with a GPT-2-small-sized model) is not "
            "measured by this suite."
        )


if __name__ == "__main__":
    main()
