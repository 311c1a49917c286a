"""Where sae_cache's time goes: its stages instrumented, next to the bare forward loop (diagnostic).

    python -m benchmark.breakdown [--quick] [--reps N] [--rows R] [--buffer-mib M] [--threads T] [--profile]

Runs the forward loop of benchmark (a) and sae_cache end to end (shuffle=False) on the same model and
tokens, with sae_cache's stages wrapped (wall seconds and the calling thread's CPU seconds): the
forward pass (`capture`), the per-batch statistics, the copy into the host buffer, the dataset
iteration, waiting on the writer, the writer thread's `_write`, publishing and the final
`load_from_disk`. With --profile, the sae_cache run is also profiled with cProfile (main thread) and
the top functions by own time are printed. RssAnon and RssFile are sampled every 5 ms during the run
(VmHWM mixes anonymous memory with reclaimable file-backed pages). Not part of run_all: run it
where a target of (a) or (b) is missed.
"""

from __future__ import annotations

import pstats
import sys
import tempfile
from pathlib import Path

from benchmark._common import (
    BATCH,
    CONTEXT,
    GB,
    MiB,
    Verdict,
    alternate,
    best,
    f2,
    header,
    parse,
    parser,
    prepare_tokens,
    scratch,
    table,
    threads_text,
)

ABLATIONS = ("inline_writer", "no_fsync", "no_stats")


def main(argv: list[str] | None = None) -> list[Verdict]:
    p = parser(__doc__.splitlines()[0])
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
        common = dict(data=data["path"], kind=data["kind"], batch=BATCH)
        specs = {
            "forward loop": dict(task="forward", n_rows=n_rows, **common),
            "sae_cache": dict(
                task="breakdown",
                out=str(tmp / "cache"),
                training_tokens=n_rows * CONTEXT,
                buffer_size_gb=buffer_mib * MiB / GB,
                context=CONTEXT,
                **common,
            ),
        }
        if profile_path:
            specs["sae_cache"]["_profile"] = str(profile_path)
        if args.ablations:
            plain = dict(
                task="sae_cache",
                out=str(tmp / "cache"),
                training_tokens=n_rows * CONTEXT,
                shuffle=False,
                buffer_size_gb=buffer_mib * MiB / GB,
                context=CONTEXT,
                **common,
            )
            specs["sae_cache (plain)"] = plain
            for ablation in ABLATIONS:
                specs[f"sae_cache, {ablation}"] = dict(plain, ablate=[ablation])
            specs["SAELens"] = dict(
                task="saelens",
                out=str(tmp / "saelens"),
                training_tokens=n_rows * CONTEXT,
                buffer_size_gb=buffer_mib * MiB / GB,
                context=CONTEXT,
                **common,
            )
        runs = alternate(specs, reps)
    fwd, ours = best(runs["forward loop"]), best(runs["sae_cache"])
    header(
        "where sae_cache's time goes (instrumented run)",
        f"{n_rows:,} rows x {CONTEXT} tokens, batch {BATCH}, buffer {buffer_mib} MiB, shuffle=False, model {data['kind']}; "
        f"{threads_text(ours)}; forward loop {fwd['seconds']:.2f} s wall, {fwd['cpu_s']:.2f} s CPU; best of {reps}",
    )
    rows = [
        ["sae_cache total (process)", f2(ours["seconds"]), "100%", f2(ours["cpu_s"]), "", ""],
        ["sae_cache main thread", "", "", f2(ours["main_thread_cpu_s"]), "", ""],
    ]
    for name, st in ours["stages"].items():
        rows.append(
            [
                name,
                f2(st["wall"]),
                f"{100 * st['wall'] / ours['seconds']:.1f}%",
                f2(st["cpu"]),
                st["calls"],
                f"{1000 * st['wall'] / max(st['calls'], 1):.2f}",
            ]
        )
    rows.append(
        [
            "forward loop (benchmark a), total",
            f2(fwd["seconds"]),
            f"{100 * fwd['seconds'] / ours['seconds']:.1f}%",
            f2(fwd["cpu_s"]),
            "",
            "",
        ]
    )
    table(["stage", "wall s", "of sae_cache wall", "thread CPU s", "calls", "ms per call"], rows)
    print("\n(thread CPU is the calling thread's only: torch's other intra-op threads are in the process total.)")
    print(
        f"\nRSS during the sae_cache run (sampled every 5 ms): anonymous {ours['anon_at_start_mib']:,.0f} -> peak "
        f"{ours['peak_anon_mib']:,.0f} MiB (+{ours['peak_anon_mib'] - ours['anon_at_start_mib']:,.0f}), file-backed "
        f"{ours['file_at_start_mib']:,.0f} -> peak {ours['peak_file_mib']:,.0f} MiB; VmHWM {ours['hwm_mib']:,.0f} MiB, "
        f"VmHWM before the run {ours['base_hwm_mib']:,.0f} MiB; buffer {ours.get('buffer_mib', buffer_mib)} MiB requested"
    )
    if args.ablations:
        header(
            "sae_cache with one cost removed at a time (diagnostic variants, not the package's behaviour)",
            f"inline_writer: ShardWriter(background=False); no_fsync: data files not fsynced; no_stats: HookStats.per_unit "
            f"replaced by zeros; same tokens and buffer ({buffer_mib} MiB); best of {reps}, alternating",
        )
        names = ["forward loop", "sae_cache (plain)"] + [f"sae_cache, {a}" for a in ABLATIONS] + ["SAELens"]
        base = best(runs["forward loop"])
        table(
            ["run", "best s", "all runs s", "tokens/s", "vs forward loop", "CPU s", "peak RSS MiB"],
            [
                [
                    n,
                    f2(best(runs[n])["seconds"]),
                    " / ".join(f"{r['seconds']:.1f}" for r in runs[n]),
                    f"{best(runs[n])['tokens'] / best(runs[n])['seconds']:,.0f}",
                    f"{base['seconds'] / best(runs[n])['seconds']:.3f}",
                    f2(best(runs[n])["cpu_s"]),
                    f"{best(runs[n])['hwm_mib']:,.0f}",
                ]
                for n in names
            ],
        )
    if profile_path and profile_path.exists():
        print("\ncProfile of the sae_cache run (main thread), top 20 by own time:\n\n```")
        stats = pstats.Stats(str(profile_path), stream=sys.stdout)
        stats.sort_stats("tottime").print_stats(20)
        print("```")
        profile_path.unlink()
        profile_path.parent.rmdir()
    return []


if __name__ == "__main__":
    main()
