"""(a) The bare forward loop vs sae_cache end to end, on the same model and tokens.

    python -m benchmark.forward_vs_cache [--quick] [--reps N] [--rows R] [--buffer-mib M]

The forward loop runs the same batches of `model_batch_size` rows through the model with the same
hook and `stop_at_layer`, and copies each batch's activations into a reused host buffer: once as a
plain loop with torch's threads, and once as 2 concurrent loops sharing torch's threads (what
sae_cache's `forward_threads` does on a CPU, so the ratio also shows its overhead alone). sae_cache
runs `CacheActivationsRunner(cfg, override_dataset=..., model=...).run()` with shuffle=False: reading
the rows, the forward pass, statistics, the writer thread, fsync, publishing and `load_from_disk`.
Both get a model built beforehand; runs alternate (A B, B A, ...) and the best of N is reported.
Target (issue 3, 1a): sae_cache tokens/s >= 0.95 x the faster forward loop's.
"""

from __future__ import annotations

from benchmark._common import (
    BATCH,
    CONTEXT,
    GB,
    HOOK,
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
    scratch,
    table,
    threads_text,
    times,
)

TARGET = 0.95
FORWARD = ("forward loop", "forward loop, 2 threads")


def main(argv: list[str] | None = None) -> list[Verdict]:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, default=None, help=f"rows of {CONTEXT} tokens (default 4096: 524,288 tokens)")
    p.add_argument("--buffer-mib", type=int, default=None, help="sae_cache buffer_size_gb in MiB (default 64)")
    args = parse(p, argv)
    n_rows = args.rows or (128 if args.quick else 4096)
    reps = args.reps or (1 if args.quick else 4)
    buffer_mib = args.buffer_mib or (2 if args.quick else 64)
    with scratch("forward") as tmp:
        data = prepare_tokens(tmp, n_rows)
        common = dict(data=data["path"], kind=data["kind"], batch=BATCH)
        specs = {
            "forward loop": dict(task="forward", n_rows=n_rows, **common),
            "forward loop, 2 threads": dict(task="forward", n_rows=n_rows, streams=2, **common),
            "sae_cache": dict(
                task="sae_cache",
                out=str(tmp / "cache"),
                training_tokens=n_rows * CONTEXT,
                buffer_size_gb=buffer_mib * MiB / GB,
                shuffle=False,
                context=CONTEXT,
                **common,
            ),
        }
        runs = alternate(specs, reps)
    plain, two, cache = (best(runs[name]) for name in FORWARD + ("sae_cache",))
    fwd_name = min(FORWARD, key=lambda name: best(runs[name])["seconds"])
    fwd = best(runs[fwd_name])
    ratio = fwd["seconds"] / cache["seconds"]
    paired = sorted(f["seconds"] / c["seconds"] for f, c in zip(runs[fwd_name], runs["sae_cache"]))
    header(
        "(a) forward-only loop vs sae_cache end to end",
        f"model: {data['kind']} (4 layers, d_model 256), tokens: {data['source']}; {n_rows:,} rows x {CONTEXT} = "
        f"{n_rows * CONTEXT:,} tokens, batch {BATCH}, hook {HOOK}, sae_cache buffer {buffer_mib} MiB, shuffle=False, "
        f"forward_threads {cache.get('forward_threads')} (automatic); best of {reps}; {threads_text(plain)}",
    )
    rows = []
    for name, r in ((FORWARD[0], plain), (FORWARD[1], two), ("sae_cache", cache)):
        rows.append(
            [
                name,
                f0(r["tokens"]),
                f2(r["seconds"]),
                times(runs[name]),
                f0(r["tokens"] / r["seconds"]),
                f2(r["cpu_s"]),
                f0(r["hwm_mib"]),
                f3(r["disk_bytes"] / r["raw_act_bytes"]) if "disk_bytes" in r else "-",
            ]
        )
    table(["run", "tokens", "best s", "all runs s", "tokens/s", "CPU s", "peak RSS MiB", "disk / raw acts"], rows)
    print(
        f"\nsae_cache / faster forward loop ({fwd_name}) tokens/s: **{ratio:.3f}** (best vs best; paired runs "
        f"{', '.join(f'{x:.3f}' for x in paired)}); sae_cache / plain forward loop: {plain['seconds'] / cache['seconds']:.3f}; "
        f"2 threads / plain forward loop: {plain['seconds'] / two['seconds']:.3f}"
    )
    return [
        Verdict(
            "1a sae_cache / faster forward loop tokens/s",
            f"{ratio:.3f}",
            f">= {TARGET}",
            None if args.quick else ratio >= TARGET,
        ),
        Verdict(
            "1d disk / raw activation bytes (1a run)",
            f"{cache['disk_bytes'] / cache['raw_act_bytes']:.4f}",
            "<= 1.02",
            cache["disk_bytes"] / cache["raw_act_bytes"] <= 1.02,
        ),
    ]


if __name__ == "__main__":
    main()
