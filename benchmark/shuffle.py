"""(f) The on-disk shuffle: end to end, and `shuffle_shards` alone vs one plain copy of the files.

    python -m benchmark.shuffle [--quick] [--reps N] [--rows R] [--shard-mib M] [--sizes A,B] [--skip-e2e]

1. End to end: `CacheActivationsRunner` with shuffle=True vs shuffle=False on the same model and
   tokens (64 MiB buffers), alternating, best of N.
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

from benchmark._common import (
    BATCH,
    CONTEXT,
    GB,
    MiB,
    Verdict,
    alternate,
    best,
    f0,
    f2,
    f3,
    header,
    parse,
    parser,
    prepare_tokens,
    run_worker,
    scratch,
    table,
    threads_text,
    times,
)

TIME_TARGET = 3.0
PAGE_CACHE = (
    "shuffle_shards (rows), direct_io=False"  # for reference: output through the page cache, as before session 4
)


def end_to_end(tmp, n_rows: int, buffer_mib: int, reps: int) -> tuple[dict, dict]:
    data = prepare_tokens(tmp, n_rows)
    common = dict(
        task="sae_cache",
        data=data["path"],
        kind=data["kind"],
        batch=BATCH,
        context=CONTEXT,
        training_tokens=n_rows * CONTEXT,
        buffer_size_gb=buffer_mib * MiB / GB,
        out=str(tmp / "cache"),
    )
    runs = alternate(
        {"shuffle=False": dict(shuffle=False, **common), "shuffle=True": dict(shuffle=True, **common)}, reps
    )
    return data, runs


def alone(tmp, shard_mib: int, n_shards: int, reps: int, across_too: bool) -> dict:
    shards = run_worker(
        "make_shards",
        directory=str(tmp / f"shards_{n_shards}"),
        shard_mib=shard_mib,
        n_shards=n_shards,
        context=CONTEXT,
        as_cache=False,
    )
    common = dict(shards=shards["files"])
    specs = {
        "copy + fsync": dict(task="copy", out=str(tmp / "copy"), **common),
        "shuffle_shards (rows)": dict(
            task="shuffle",
            out=str(tmp / "shuffled"),
            scratch=str(tmp / "scratch"),
            rows_per_file=shards["rows_per_file"],
            n_rows=shards["n_rows"],
            context=CONTEXT,
            **common,
        ),
    }
    if across_too:
        specs["shuffle_shards (across sequences)"] = dict(specs["shuffle_shards (rows)"], across=True)
        specs[PAGE_CACHE] = dict(specs["shuffle_shards (rows)"], direct_io=False)
    print(f"(f) shuffle alone: {n_shards} shards x {shard_mib} MiB", flush=True)
    runs = alternate(specs, reps)
    for f in shards["files"]:
        os.remove(f)
    return {"n_shards": n_shards, "bytes": shards["bytes"], "runs": runs}


def main(argv: list[str] | None = None) -> list[Verdict]:
    p = parser(__doc__.splitlines()[0])
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
    verdicts = []
    with scratch("shuffle") as tmp:
        e2e = None if args.skip_e2e else end_to_end(tmp, n_rows, buffer_mib, reps)
        alones = [alone(tmp, shard_mib, n, reps, across_too=(i == 0)) for i, n in enumerate(sizes)]
    quick = None if args.quick else True
    if e2e is not None:
        data, runs = e2e
        off, on = best(runs["shuffle=False"]), best(runs["shuffle=True"])
        header(
            "(f1) shuffle=True vs shuffle=False end to end",
            f"sae_cache, model: {data['kind']}, {n_rows:,} rows x {CONTEXT} tokens, buffer {buffer_mib} MiB; best of {reps}; {threads_text(off)}",
        )
        table(
            [
                "run",
                "tokens",
                "best s",
                "all runs s",
                "tokens/s",
                "CPU s",
                "model RSS MiB",
                "peak RSS MiB",
                "disk / raw acts",
            ],
            [
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
            ],
        )
        print(
            f"\nshuffle=True / shuffle=False time: **{on['seconds'] / off['seconds']:.3f}** "
            f"(the shuffle added {on['seconds'] - off['seconds']:+.2f} s for {on['disk_bytes'] / 1e6:,.0f} MB of cache)"
        )
        verdicts.append(
            Verdict(
                "1f shuffle=True / False end to end (time)", f"{on['seconds'] / off['seconds']:.3f}", "(context)", None
            )
        )
    budget_mib = shard_mib + 0.5 * GB / MiB
    header(
        "(f2) shuffle_shards alone vs one plain copy of the shards",
        f"synthetic shards of {shard_mib} MiB activations (the buffer), rows of {CONTEXT} x 256 float32; bucket = buffer / 4; "
        f"best of {reps}; RSS target = one buffer + 0.5 GB = {budget_mib:,.0f} MiB",
    )
    rows = []
    for res in alones:
        copy = best(res["runs"]["copy + fsync"])
        for name, runs in res["runs"].items():
            r = best(runs)
            rows.append(
                [
                    f"{res['n_shards']} x {shard_mib} MiB ({res['bytes'] / 1e9:.2f} GB)",
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
                ratio = r["seconds"] / copy["seconds"]
                verdicts.append(
                    Verdict(
                        f"1f {name} / copy time ({res['bytes'] / 1e9:.2f} GB)",
                        f"{ratio:.2f}x",
                        f"<= {TIME_TARGET}x",
                        quick and ratio <= TIME_TARGET,
                    )
                )
                verdicts.append(
                    Verdict(
                        f"1f {name} peak RSS ({res['bytes'] / 1e9:.2f} GB)",
                        f"{r['hwm_mib']:,.0f} MiB",
                        f"<= {budget_mib:,.0f} MiB",
                        r["hwm_mib"] <= budget_mib,
                    )
                )
    table(["cache", "run", "best s", "all runs s", "MB/s", "vs copy", "CPU s", "peak RSS MiB"], rows)
    return verdicts


if __name__ == "__main__":
    main()
