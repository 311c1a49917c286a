"""Where sae_cache's time goes: its stages instrumented, next to the bare forward loop (diagnostic).

    python -m benchmark.breakdown [--quick] [--reps N] [--rows R] [--buffer-mib M] [--threads T] [--profile]
                                  [--ablations] [--device cuda]

Runs the forward loop of benchmark (a) and sae_cache end to end (shuffle=False) on the same model and
tokens, with sae_cache's stages wrapped (wall seconds and the calling thread's CPU seconds): the
forward pass (`capture`), the per-batch statistics, the copy into the host buffer, the dataset
iteration, waiting on the writer, the writer thread's `_write`, publishing and the final
`load_from_disk`. With --profile, the sae_cache run is also profiled with cProfile (main thread) and
the top functions by own time are printed. RssAnon and RssFile are sampled every 5 ms during the run
(VmHWM mixes anonymous memory with reclaimable file-backed pages). On a GPU a stage's wall time is
when the CPU got through it, not when the GPU did (kernels are queued). Not part of run_all: run it
where a target of (a) or (b) is missed.
"""

from __future__ import annotations

import functools
import pstats
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

from benchmark import forward_vs_cache
from benchmark._common import (
    BATCH,
    CONTEXT,
    GB,
    Job,
    MiB,
    Verdict,
    alternate,
    best,
    entry,
    f2,
    header,
    parse,
    parser,
    prepare_tokens,
    scratch,
    table,
    threads_text,
)
from benchmark._measure import Timed, proc_status

ABLATIONS = ("inline_writer", "no_fsync", "no_stats")
STAGES = (
    "forward pass (capture)",
    "statistics (HookStats.per_item)",
    "statistics (RunningStats.add)",
    "overflow check",
    "copy into host buffer (_copy, incl. add)",
    "token rows (dataset iteration)",
    "wait for a free buffer (acquire)",
    "hand buffer to writer (submit)",
    "writer thread: write shard (_write)",
    "publish (stage + metadata + swap)",
    "load_from_disk at the end",
)


# -- instruments --------------------------------------------------------------------------------------


class _Stage:
    """Accumulated wall and thread-CPU seconds of one instrumented function."""

    def __init__(self) -> None:
        self.wall = self.cpu = 0.0
        self.calls = 0

    def add(self, wall: float, cpu: float) -> None:
        self.wall += wall
        self.cpu += cpu
        self.calls += 1

    def wrap(self, fn):
        @functools.wraps(fn)
        def timed(*args, **kwargs):
            t, c = time.perf_counter(), time.thread_time()
            try:
                return fn(*args, **kwargs)
            finally:
                self.add(time.perf_counter() - t, time.thread_time() - c)

        return timed

    def wrap_iterator(self, fn):
        """Time each step of the iterator fn returns (the time to produce each item)."""

        @functools.wraps(fn)
        def timed(*args, **kwargs):
            it = iter(fn(*args, **kwargs))
            while True:
                t, c = time.perf_counter(), time.thread_time()
                try:
                    item = next(it)
                except StopIteration:
                    return
                finally:
                    self.add(time.perf_counter() - t, time.thread_time() - c)
                yield item

        return timed


class _RssSampler:
    """Samples RssAnon and RssFile every few milliseconds on a thread; keeps the peaks (VmHWM mixes the two)."""

    def __init__(self, interval_s: float = 0.005) -> None:
        self.interval_s = interval_s
        self.start = proc_status()
        self.peak = dict(self.start)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            for key, value in proc_status().items():
                self.peak[key] = max(self.peak.get(key, 0.0), value)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def _instrument() -> dict[str, _Stage]:
    """Wrap sae_cache's stages (in this process only); return their clocks by stage name."""
    from sae_cache import model, runner, stats, store, writer

    stages = {name: _Stage() for name in STAGES}
    patches = [
        (model.HookCapture, "__call__", "forward pass (capture)"),
        (store.ActivationsStore, "_check_overflow", "overflow check"),
        (store.ActivationsStore, "_copy", "copy into host buffer (_copy, incl. add)"),
        (stats.RunningStats, "add", "statistics (RunningStats.add)"),
        (writer.ShardWriter, "acquire", "wait for a free buffer (acquire)"),
        (writer.ShardWriter, "submit", "hand buffer to writer (submit)"),
        (writer.ShardWriter, "_write", "writer thread: write shard (_write)"),
        (runner.CacheActivationsRunner, "_publish", "publish (stage + metadata + swap)"),
        (runner.datasets, "load_from_disk", "load_from_disk at the end"),
    ]
    for owner, name, stage in patches:
        setattr(owner, name, stages[stage].wrap(getattr(owner, name)))
    stats.HookStats.per_item = staticmethod(stages["statistics (HookStats.per_item)"].wrap(stats.HookStats.per_item))
    runner.token_rows = stages["token rows (dataset iteration)"].wrap_iterator(runner.token_rows)
    return stages


def _apply_ablations(ablate: list[str]) -> None:
    """Diagnostic variants of sae_cache: each removes one cost to measure it.

    inline_writer: ShardWriter(background=False), shards written on the caller's thread;
    no_fsync: Arrow data files are not fsynced (SAELens's save_to_disk does not fsync either);
    no_stats: the per-batch statistics (HookStats.per_item) are replaced by zeros.
    """
    import torch

    from sae_cache import arrow_format, runner, stats

    for name in ablate:
        if name == "inline_writer":
            runner.ShardWriter = functools.partial(runner.ShardWriter, background=False)
        elif name == "no_fsync":
            arrow_format.fsync_path = lambda path: None
        elif name == "no_stats":
            stats.HookStats.per_item = staticmethod(
                lambda acts, stored: torch.zeros((acts.shape[0], 6), dtype=torch.float64, device=acts.device)
            )
        else:
            raise ValueError(f"unknown ablation {name!r}")


# -- the measured tasks -------------------------------------------------------------------------------


def task_ablated(ablate: list[str], **kwargs) -> dict:
    """The sae_cache run of benchmark (a) with the named costs removed."""
    _apply_ablations(ablate)
    return forward_vs_cache.task_sae_cache(**kwargs)


def task_breakdown(**setup) -> dict:
    """sae_cache end to end with its stages instrumented (wall and thread CPU per stage), shuffle=False.

    `setup`: the arguments of benchmark.forward_vs_cache.sae_cache_setup.
    """
    import torch

    from sae_cache import CacheActivationsRunner

    model, rows, cfg = forward_vs_cache.sae_cache_setup(**setup)
    stages = _instrument()  # after the setup: reading the rows is no call of load_from_disk at the end
    sampler = _RssSampler()
    main_cpu0 = time.thread_time()
    with Timed(cfg.device) as t, sampler:
        CacheActivationsRunner(cfg, override_dataset=rows, model=model).run()
    main_cpu = time.thread_time() - main_cpu0
    shutil.rmtree(cfg.new_cached_activations_path, ignore_errors=True)
    return t.result(
        tokens=cfg.training_tokens // cfg.context_size * cfg.context_size,
        main_thread_cpu_s=main_cpu,
        stages={k: {"wall": v.wall, "cpu": v.cpu, "calls": v.calls} for k, v in stages.items()},
        torch_threads_used=torch.get_num_threads(),
        peak_anon_mib=sampler.peak["RssAnon"],
        peak_file_mib=sampler.peak["RssFile"],
        anon_at_start_mib=sampler.start["RssAnon"],
        file_at_start_mib=sampler.start["RssFile"],
    )


TASKS = {"breakdown": task_breakdown, "ablated": task_ablated}


# -- the driver ---------------------------------------------------------------------------------------


def jobs(tmp: Path, data: dict, n_rows: int, buffer_mib: int, args, profile_path: Path | None) -> dict[str, Job]:
    plain = forward_vs_cache.sae_cache_job(data, tmp / "cache", n_rows * CONTEXT, buffer_mib * MiB / GB, args.device)
    instrumented = {k: v for k, v in plain.args.items() if k != "shuffle"}
    if profile_path:
        instrumented["_profile"] = str(profile_path)
    out = {
        "forward loop": forward_vs_cache.forward_job(data, n_rows, args.device),
        "sae_cache": Job("breakdown", "breakdown", instrumented),
    }
    if args.ablations:
        out["sae_cache (plain)"] = plain
        for ablation in ABLATIONS:
            out[f"sae_cache, {ablation}"] = Job("breakdown", "ablated", dict(plain.args, ablate=[ablation]))
        theirs = {k: v for k, v in plain.args.items() if k != "shuffle"}
        out["SAELens"] = Job("vs_saelens", "saelens", dict(theirs, out=str(tmp / "saelens")))
    return out


def report_stages(runs: dict[str, list[dict]], data: dict, n_rows: int, buffer_mib: int, reps: int) -> None:
    fwd, ours = best(runs["forward loop"]), best(runs["sae_cache"])
    header(
        "where sae_cache's time goes (instrumented run)",
        f"{n_rows:,} rows x {CONTEXT} tokens, batch {BATCH}, buffer {buffer_mib} MiB, shuffle=False, model "
        f"{data['kind']}; {threads_text(ours)}; forward loop {fwd['seconds']:.2f} s wall, {fwd['cpu_s']:.2f} s CPU; "
        f"best of {reps}",
    )
    rows = [
        ["sae_cache total (process)", f2(ours["seconds"]), "100%", f2(ours["cpu_s"]), "", ""],
        ["sae_cache main thread", "", "", f2(ours["main_thread_cpu_s"]), "", ""],
    ]
    for name, st in ours["stages"].items():
        share, per_call = f"{100 * st['wall'] / ours['seconds']:.1f}%", f"{1000 * st['wall'] / max(st['calls'], 1):.2f}"
        rows.append([name, f2(st["wall"]), share, f2(st["cpu"]), st["calls"], per_call])
    share = f"{100 * fwd['seconds'] / ours['seconds']:.1f}%"
    rows.append(["forward loop (benchmark a), total", f2(fwd["seconds"]), share, f2(fwd["cpu_s"]), "", ""])
    table(["stage", "wall s", "of sae_cache wall", "thread CPU s", "calls", "ms per call"], rows)
    print("\n(thread CPU is the calling thread's only: torch's other intra-op threads are in the process total.)")
    print(
        f"\nRSS during the sae_cache run (sampled every 5 ms): anonymous {ours['anon_at_start_mib']:,.0f} -> peak "
        f"{ours['peak_anon_mib']:,.0f} MiB (+{ours['peak_anon_mib'] - ours['anon_at_start_mib']:,.0f}), file-backed "
        f"{ours['file_at_start_mib']:,.0f} -> peak {ours['peak_file_mib']:,.0f} MiB; VmHWM {ours['hwm_mib']:,.0f} MiB, "
        f"VmHWM before the run {ours['base_hwm_mib']:,.0f} MiB; buffer {ours.get('buffer_mib', buffer_mib)} MiB "
        "requested"
    )


def report_ablations(runs: dict[str, list[dict]], buffer_mib: int, reps: int) -> None:
    header(
        "sae_cache with one cost removed at a time (diagnostic variants, not the package's behaviour)",
        "inline_writer: ShardWriter(background=False); no_fsync: data files not fsynced; no_stats: "
        f"HookStats.per_item replaced by zeros; same tokens and buffer ({buffer_mib} MiB); best of {reps}, alternating",
    )
    base = best(runs["forward loop"])
    rows = []
    for n in ["forward loop", "sae_cache (plain)", *(f"sae_cache, {a}" for a in ABLATIONS), "SAELens"]:
        r = best(runs[n])
        rows.append(
            [
                n,
                f2(r["seconds"]),
                " / ".join(f"{x['seconds']:.1f}" for x in runs[n]),
                f"{r['tokens'] / r['seconds']:,.0f}",
                f"{base['seconds'] / r['seconds']:.3f}",
                f2(r["cpu_s"]),
                f"{r['hwm_mib']:,.0f}",
            ]
        )
    table(["run", "best s", "all runs s", "tokens/s", "vs forward loop", "CPU s", "peak RSS MiB"], rows)


def print_profile(profile_path: Path) -> None:
    print("\ncProfile of the sae_cache run (main thread), top 20 by own time:\n\n```")
    stats = pstats.Stats(str(profile_path), stream=sys.stdout)
    stats.sort_stats("tottime").print_stats(20)
    print("```")
    profile_path.unlink()
    profile_path.parent.rmdir()


def main(argv: list[str] | None = None) -> list[Verdict]:
    p = parser(__doc__.splitlines()[0], device=True)
    p.add_argument("--rows", type=int, default=None, help=f"rows of {CONTEXT} tokens (default 4096)")
    p.add_argument("--buffer-mib", type=int, default=None, help="buffer_size_gb in MiB (default 64)")
    p.add_argument("--profile", action="store_true", help="also cProfile the sae_cache run (main thread)")
    p.add_argument(
        "--ablations",
        action="store_true",
        help="also time sae_cache with one cost removed at a time (inline writer, no fsync, no statistics) and SAELens",
    )
    args = parse(p, argv)
    n_rows = args.rows or (128 if args.quick else 4096)
    reps = args.reps or 1
    buffer_mib = args.buffer_mib or (4 if args.quick else 64)  # SAELens needs one batch (4 MiB) per buffer
    profile_path = Path(tempfile.mkdtemp(prefix="sae_cache_bench_prof_")) / "sae_cache.prof" if args.profile else None
    with scratch("breakdown") as tmp:
        data = prepare_tokens(tmp, n_rows)
        runs = alternate(jobs(tmp, data, n_rows, buffer_mib, args, profile_path), reps)
    report_stages(runs, data, n_rows, buffer_mib, reps)
    if args.ablations:
        report_ablations(runs, buffer_mib, reps)
    if profile_path and profile_path.exists():
        print_profile(profile_path)
    return []


if __name__ == "__main__":
    entry(main, TASKS)
