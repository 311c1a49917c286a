"""(f) The on-disk shuffle: end to end, and `shuffle_shards` alone vs one plain copy of the files.

    python -m benchmark.shuffle [--quick] [--reps N] [--rows R] [--shard-mib M] [--sizes A,B] [--skip-e2e]
                                [--device cuda]

1. End to end: `CacheActivationsRunner` with shuffle=True vs shuffle=False on the same model and
   tokens (64 MiB buffers), alternating, best of N (the model runs on --device).
2. Alone: synthetic shards of M MiB (default 256, the buffer) making caches of A and B shards
   (default 4 and 16: 1 GiB and 4 GiB) are shuffled with `sae_cache.shuffle.shuffle_shards` (rows;
   and positions across sequences at the first size) using the runner's bucket size (a quarter of a
   buffer), against `shutil.copyfile` + fsync of each shard. Before each run the shards are read
   once, untimed, so that every run reads them from the page cache. The shuffle writes its output
   as the runner does (direct_io=True: around the page cache where the filesystem allows); rows
   with direct_io=False are shown for reference at the first size (not judged).

Targets (issue 3, 1f): shuffle time <= 3x one plain copy; peak RSS <= one buffer + 0.5 GB whatever the
cache size.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from benchmark import forward_vs_cache
from benchmark._common import (
    CONTEXT,
    D_MODEL,
    GB,
    HOOK,
    Job,
    MiB,
    Verdict,
    alternate,
    best,
    entry,
    f0,
    f2,
    f3,
    header,
    parse,
    parser,
    prepare_tokens,
    run_task,
    scratch,
    table,
    threads_text,
    times,
)
from benchmark._measure import Timed

TIME_TARGET = 3.0
PAGE_CACHE = "shuffle_shards (rows), direct_io=False"  # for reference: output through the page cache, as before
E2E_COLUMNS = [
    "run",
    "tokens",
    "best s",
    "all runs s",
    "tokens/s",
    "CPU s",
    "model RSS MiB",
    "peak RSS MiB",
    "disk / raw acts",
]
ALONE_COLUMNS = ["cache", "run", "best s", "all runs s", "MB/s", "vs copy", "CPU s", "peak RSS MiB"]


# -- the measured tasks -------------------------------------------------------------------------------


def _warm(files: list[str]) -> None:
    """Read the files once (untimed), so that every run starts with them in the page cache (a shuffle
    drops the pages of shard bytes it has read; the next run must not pay for reading them from disk)."""
    chunk = bytearray(8 << 20)
    for name in files:
        with open(name, "rb", buffering=0) as f:
            while f.readinto(chunk):
                pass


def task_shuffle(
    shards: list[str],
    out: str,
    bucket_dir: str,
    rows_per_file: int,
    n_rows: int,
    context: int,
    across: bool = False,
    seed: int = 42,
    direct_io: bool = True,
) -> dict:
    """sae_cache.shuffle.shuffle_shards alone, with the runner's bucket size (a quarter of a buffer) and its output
    writes."""
    from sae_cache.arrow_format import cache_features
    from sae_cache.shuffle import shuffle_shards
    from sae_cache.shuffle_io import bytes_per_row

    features = cache_features({HOOK: D_MODEL}, context, "float32")
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    bucket_bytes = rows_per_file * bytes_per_row(features) // 4
    _warm(shards)
    with Timed() as t:
        names = shuffle_shards(
            [Path(s) for s in shards],
            features=features,
            seed=seed,
            across_sequences=across,
            rows_per_file=rows_per_file,
            n_rows=n_rows,
            bucket_dir=Path(bucket_dir),
            out_dir=out_dir,
            bucket_bytes=bucket_bytes,
            direct_io=direct_io,
        )
    written = sum((out_dir / n).stat().st_size for n in names)
    shutil.rmtree(out_dir, ignore_errors=True)
    shutil.rmtree(bucket_dir, ignore_errors=True)
    return t.result(bytes=written, n_files=len(names), bucket_bytes=bucket_bytes)


def task_copy(shards: list[str], out: str) -> dict:
    """One plain copy of the files (shutil.copyfile + fsync each): the floor for any on-disk shuffle."""
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    _warm(shards)
    with Timed() as t:
        for s in shards:
            dst = out_dir / Path(s).name
            shutil.copyfile(s, dst)
            fd = os.open(dst, os.O_RDONLY)
            os.fsync(fd)
            os.close(fd)
    written = sum(p.stat().st_size for p in out_dir.iterdir())
    shutil.rmtree(out_dir, ignore_errors=True)
    return t.result(bytes=written)


TASKS = {"shuffle": task_shuffle, "copy": task_copy}


# -- the driver ---------------------------------------------------------------------------------------


def end_to_end(tmp: Path, n_rows: int, buffer_mib: int, reps: int, device: str) -> tuple[dict, dict]:
    data = prepare_tokens(tmp, n_rows)
    off = forward_vs_cache.sae_cache_job(data, tmp / "cache", n_rows * CONTEXT, buffer_mib * MiB / GB, device)
    return data, alternate({"shuffle=False": off, "shuffle=True": off.but(shuffle=True)}, reps)


def alone(tmp: Path, shard_mib: int, n_shards: int, reps: int, across_too: bool) -> dict:
    shards = run_task(
        "_setup",
        "make_shards",
        directory=str(tmp / f"shards_{n_shards}"),
        shard_mib=shard_mib,
        n_shards=n_shards,
        context=CONTEXT,
        as_cache=False,
    )
    rows = Job(
        "shuffle",
        "shuffle",
        dict(
            shards=shards["files"],
            out=str(tmp / "shuffled"),
            bucket_dir=str(tmp / "buckets"),
            rows_per_file=shards["rows_per_file"],
            n_rows=shards["n_rows"],
            context=CONTEXT,
        ),
    )
    jobs = {"copy + fsync": Job("shuffle", "copy", dict(shards=shards["files"], out=str(tmp / "copy")))}
    jobs["shuffle_shards (rows)"] = rows
    if across_too:
        jobs["shuffle_shards (across sequences)"] = rows.but(across=True)
        jobs[PAGE_CACHE] = rows.but(direct_io=False)
    print(f"(f) shuffle alone: {n_shards} shards x {shard_mib} MiB", flush=True)
    runs = alternate(jobs, reps)
    for f in shards["files"]:
        os.remove(f)
    return {"n_shards": n_shards, "bytes": shards["bytes"], "runs": runs}


def report_end_to_end(data: dict, runs: dict[str, list[dict]], n_rows: int, buffer_mib: int, reps: int) -> Verdict:
    off, on = best(runs["shuffle=False"]), best(runs["shuffle=True"])
    header(
        "(f1) shuffle=True vs shuffle=False end to end",
        f"sae_cache, model: {data['kind']}, {n_rows:,} rows x {CONTEXT} tokens, buffer {buffer_mib} MiB; "
        f"best of {reps}; {threads_text(off)}",
    )
    rows = [
        [
            name,
            f0(r["tokens"]),
            f2(r["seconds"]),
            times(runs[name]),
            f0(r["tokens"] / r["seconds"]),
            f2(r["cpu_s"]),
            f0(r["base_hwm_mib"]),
            f0(r["hwm_mib"]),
            f3(r["disk_bytes"] / r["raw_act_bytes"]),
        ]
        for name, r in (("shuffle=False", off), ("shuffle=True", on))
    ]
    table(E2E_COLUMNS, rows)
    ratio = on["seconds"] / off["seconds"]
    print(
        f"\nshuffle=True / shuffle=False time: **{ratio:.3f}** "
        f"(the shuffle added {on['seconds'] - off['seconds']:+.2f} s for {on['disk_bytes'] / 1e6:,.0f} MB of cache)"
    )
    return Verdict("1f shuffle=True / False end to end (time)", f"{ratio:.3f}", "(context)", None)


def _alone_verdicts(name: str, r: dict, copy: dict, size: str, budget_mib: float, quick) -> list[Verdict]:
    ratio = r["seconds"] / copy["seconds"]
    return [
        Verdict(
            f"1f {name} / copy time ({size})", f"{ratio:.2f}x", f"<= {TIME_TARGET}x", quick and ratio <= TIME_TARGET
        ),
        Verdict(
            f"1f {name} peak RSS ({size})",
            f"{r['hwm_mib']:,.0f} MiB",
            f"<= {budget_mib:,.0f} MiB",
            r["hwm_mib"] <= budget_mib,
        ),
    ]


def report_alone(alones: list[dict], shard_mib: int, reps: int, quick: bool) -> list[Verdict]:
    budget_mib = shard_mib + 0.5 * GB / MiB
    header(
        "(f2) shuffle_shards alone vs one plain copy of the shards",
        f"synthetic shards of {shard_mib} MiB activations (the buffer), rows of {CONTEXT} x 256 float32; "
        f"bucket = buffer / 4; best of {reps}; RSS target = one buffer + 0.5 GB = {budget_mib:,.0f} MiB",
    )
    rows, verdicts = [], []
    for res in alones:
        copy = best(res["runs"]["copy + fsync"])
        size = f"{res['bytes'] / 1e9:.2f} GB"
        for name, runs in res["runs"].items():
            r = best(runs)
            rows.append(
                [
                    f"{res['n_shards']} x {shard_mib} MiB ({size})",
                    name,
                    f2(r["seconds"]),
                    times(runs),
                    f0(r["bytes"] / 1e6 / r["seconds"]),
                    f2(r["seconds"] / copy["seconds"]),
                    f2(r["cpu_s"]),
                    f0(r["hwm_mib"]),
                ]
            )
            if name not in ("copy + fsync", PAGE_CACHE):
                verdicts += _alone_verdicts(name, r, copy, size, budget_mib, None if quick else True)
    table(ALONE_COLUMNS, rows)
    return verdicts


def main(argv: list[str] | None = None) -> list[Verdict]:
    p = parser(__doc__.splitlines()[0], device=True)
    p.add_argument("--rows", type=int, default=None, help=f"end-to-end rows of {CONTEXT} tokens (default 4096)")
    p.add_argument("--shard-mib", type=int, default=None, help="MiB of activations per synthetic shard (default 256)")
    p.add_argument("--sizes", default=None, help="shards per synthetic cache, two sizes (default 4,16)")
    p.add_argument("--skip-e2e", action="store_true", help="only the shuffle alone")
    args = parse(p, argv)
    reps = args.reps or (1 if args.quick else 3)
    n_rows = args.rows or (128 if args.quick else 4096)
    buffer_mib = 2 if args.quick else 64
    shard_mib = args.shard_mib or (8 if args.quick else 256)
    sizes = [int(s) for s in (args.sizes or ("2,4" if args.quick else "4,16")).split(",")]
    with scratch("shuffle") as tmp:
        e2e = None if args.skip_e2e else end_to_end(tmp, n_rows, buffer_mib, reps, args.device)
        alones = [alone(tmp, shard_mib, n, reps, across_too=(i == 0)) for i, n in enumerate(sizes)]
    verdicts = [] if e2e is None else [report_end_to_end(*e2e, n_rows, buffer_mib, reps)]
    return verdicts + report_alone(alones, shard_mib, reps, args.quick)


if __name__ == "__main__":
    entry(main, TASKS)
