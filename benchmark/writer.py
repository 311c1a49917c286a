"""(c) The writer alone: synthetic activation buffers (no model) through sae_cache's real write path.

    python -m benchmark.writer [--quick] [--reps N] [--buffer-mib M] [--buffers K] [--no-datasets]

Each run writes K buffers of M MiB of float32 activations (rows x 128 x 256, plus int32 token ids),
one file per buffer, and fsyncs each file:

- raw: the same bytes with one sequential `write` + fsync per file (the floor);
- write_arrow_file: sae_cache.arrow_format's Arrow IPC writer (what every shard goes through);
- ShardWriter: the background writer thread (submit/close, manifest, rename) around it, each buffer
  submitted in the runner's pieces (a quarter buffer, at most 64 MiB: one record batch each), through
  the page cache (the runner's shards when shuffle=True, read back by the shuffle);
- ShardWriter, direct_io: the same around the page cache (O_DIRECT: the runner's final shards when
  shuffle=False);
- datasets save_to_disk: SAELens's path (`Dataset.from_dict(tensors).save_to_disk`, no fsync), for reference.

MB/s counts payload bytes (activations + token ids, 1 MB = 1e6 bytes). Runs alternate; best of N.
Target (issue 3, 1c): sae_cache's writer >= 70% of raw.
"""

from __future__ import annotations

from benchmark._common import (
    CONTEXT,
    Verdict,
    alternate,
    best,
    f0,
    f2,
    f3,
    header,
    parse,
    parser,
    scratch,
    table,
    times,
)

TARGET = 0.70


def main(argv: list[str] | None = None) -> list[Verdict]:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--buffer-mib", type=int, default=None, help="MiB of activations per buffer (default 256)")
    p.add_argument("--buffers", type=int, default=None, help="buffers per run (default 4)")
    p.add_argument("--no-datasets", action="store_true", help="skip the datasets save_to_disk reference row")
    args = parse(p, argv)
    buffer_mib = args.buffer_mib or (8 if args.quick else 256)
    n_buffers = args.buffers or (2 if args.quick else 4)
    reps = args.reps or (1 if args.quick else 5)
    modes = {
        "raw write + fsync": "raw",
        "write_arrow_file": "arrow",
        "ShardWriter": "shardwriter",
        "ShardWriter, direct_io": "shardwriter_direct",
    }
    if not args.no_datasets:
        modes["datasets save_to_disk"] = "datasets"
    with scratch("writer") as tmp:
        specs = {
            name: dict(
                task="write",
                mode=mode,
                directory=str(tmp / mode),
                buffer_mib=buffer_mib,
                n_buffers=n_buffers,
                context=CONTEXT,
            )
            for name, mode in modes.items()
        }
        runs = alternate(specs, reps)
    header(
        "(c) the writer alone: synthetic buffers, no model",
        f"{n_buffers} buffers x {buffer_mib} MiB of float32 activations (d 256, context {CONTEXT}) + int32 token ids, "
        f"one fsynced file each (datasets: no fsync); scratch on the same disk as the repo; best of {reps}",
    )
    raw = best(runs["raw write + fsync"])
    raw_rate = raw["bytes"] / raw["seconds"]
    rows = []
    for name in modes:
        r = best(runs[name])
        rate = r["bytes"] / r["seconds"]
        rows.append(
            [
                name,
                f0(r["bytes"] / 1e6),
                f2(r["seconds"]),
                times(runs[name]),
                f0(rate / 1e6),
                f3(rate / raw_rate),
                f2(r["cpu_s"]),
                f0(r["base_mib"]),
                f0(r["hwm_mib"]),
                f3(r["data_bytes"] / r["act_bytes"]),
            ]
        )
    table(
        [
            "writer",
            "MB",
            "best s",
            "all runs s",
            "MB/s",
            "vs raw",
            "CPU s",
            "RSS before MiB",
            "peak RSS MiB",
            "file bytes / raw acts",
        ],
        rows,
    )
    ours = ("write_arrow_file", "ShardWriter", "ShardWriter, direct_io")
    arrow = best(runs["write_arrow_file"])
    ratio = min(best(runs[name])["bytes"] / best(runs[name])["seconds"] for name in ours) / raw_rate
    paired = [
        r["seconds"] / max(x["seconds"] for x in xs)
        for r, *xs in zip(runs["raw write + fsync"], *(runs[n] for n in ours))
    ]
    print(
        f"\nsae_cache writer / raw MB/s: **{ratio:.3f}** (the slowest of {', '.join(ours)}, best vs best; "
        f"per round {', '.join(f'{x:.3f}' for x in paired)})"
    )
    return [
        Verdict(
            "1c writer / raw write+fsync MB/s", f"{ratio:.3f}", f">= {TARGET}", None if args.quick else ratio >= TARGET
        ),
        Verdict(
            "1d arrow file bytes / raw activation bytes",
            f"{arrow['data_bytes'] / arrow['act_bytes']:.4f}",
            "<= 1.02",
            arrow["data_bytes"] / arrow["act_bytes"] <= 1.02,
        ),
    ]


if __name__ == "__main__":
    main()
