"""(g) The reader: `CachedActivations(...).batches(4096)` vs a raw read of the same bytes.

    python -m benchmark.reader [--quick] [--reps N] [--file-mib M] [--files K] [--batch-tokens T]

A synthetic cache (K data files of M MiB of float32 activations, d 256, rows of 128, written by
sae_cache's Arrow writer, with state.json) is read, warm in the page cache, by:

- raw readinto: each data file read sequentially into one reused buffer of one batch's bytes;
- raw np.fromfile: each data file read whole into a new array;
- reader, file order (views): `batches(T)` without touching the data (zero-copy views of the map);
- reader, file order (+ copy): each batch copied into a reused torch tensor (what a training step
  or a host-to-device copy does), so every byte is read;
- reader, shuffled (+ copy): `batches(T, shuffle=True)` (rows gathered in a seeded random order).

Tokens/s counts activations read. Runs alternate; best of N. Issue 3, item 3: the reader's
throughput against a raw read of the same bytes (no numeric target).
"""

from __future__ import annotations

from pathlib import Path

from benchmark._common import (
    CONTEXT,
    D_MODEL,
    Job,
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
    run_job,
    run_task,
    scratch,
    table,
    times,
)
from benchmark._measure import Timed

MODES = {
    "raw readinto": "raw_readinto",
    "raw np.fromfile": "raw_fromfile",
    "reader, file order (views)": "reader_view",
    "reader, file order (+ copy)": "reader_copy",
    "reader, shuffled (+ copy)": "reader_shuffled",
}
COLUMNS = [
    "read",
    "tokens",
    "best s",
    "all runs s",
    "tokens/s",
    "MB/s",
    "vs raw readinto",
    "CPU s",
    "peak RSS MiB",
    "file-backed RSS at end MiB",
]


# -- the measured task --------------------------------------------------------------------------------


def _read_raw(files: list[Path], mode: str, batch_tokens: int) -> None:
    import numpy as np

    if mode == "raw_fromfile":
        for p in files:
            np.fromfile(p, dtype=np.uint8)
        return
    view = memoryview(bytearray(batch_tokens * D_MODEL * 4))
    for p in files:
        with open(p, "rb", buffering=0) as f:
            while f.readinto(view):
                pass


def _read_with_reader(reader, mode: str, batch_tokens: int, dest: dict) -> int:
    """Tokens read through CachedActivations.batches; each batch copied into `dest` unless mode is reader_view."""
    import numpy as np

    tokens = 0
    for acts, token_ids in reader.batches(batch_tokens, shuffle=mode == "reader_shuffled", seed=0):
        if mode != "reader_view":  # a plain memcpy (torch's copy_ would add its thread pool to the figure)
            np.copyto(dest["acts"], acts.numpy())
            np.copyto(dest["tokens"], token_ids.numpy())
        tokens += len(acts)
    return tokens


def task_read(cache: str, mode: str, batch_tokens: int, n_tokens: int) -> dict:
    """Read a cache: raw bytes (readinto / np.fromfile) or CachedActivations.batches (file order / shuffled)."""
    import numpy as np

    from sae_cache.reader import CachedActivations

    files = sorted(Path(cache).glob("data-*.arrow"))
    file_bytes = sum(p.stat().st_size for p in files)
    dest = {
        "acts": np.empty((batch_tokens, D_MODEL), dtype=np.float32),
        "tokens": np.empty((batch_tokens,), dtype=np.int32),
    }
    with Timed() as t:
        if mode.startswith("raw_"):
            _read_raw(files, mode, batch_tokens)
            tokens = n_tokens
        else:
            tokens = _read_with_reader(CachedActivations(cache), mode, batch_tokens, dest)
    return t.result(tokens=tokens, file_bytes=file_bytes, read_bytes=tokens * (D_MODEL * 4 + 4))


TASKS = {"read": task_read}


# -- the driver ---------------------------------------------------------------------------------------


def measure(file_mib: int, n_files: int, batch_tokens: int, reps: int) -> tuple[dict, dict[str, list[dict]]]:
    with scratch("reader") as tmp:
        cache = run_task(
            "_setup",
            "make_shards",
            directory=str(tmp / "cache"),
            shard_mib=file_mib,
            n_shards=n_files,
            context=CONTEXT,
            as_cache=True,
        )
        n_tokens = cache["n_rows"] * CONTEXT
        read = Job("reader", "read", dict(cache=str(tmp / "cache"), batch_tokens=batch_tokens, n_tokens=n_tokens))
        run_job(read.but(mode="raw_readinto"))  # warm
        return cache, alternate({name: read.but(mode=mode) for name, mode in MODES.items()}, reps)


def report(cache: dict, runs: dict[str, list[dict]], file_mib: int, n_files: int, batch_tokens: int, reps: int):
    header(
        "(g) the reader vs a raw read of the same bytes",
        f"{n_files} files x {file_mib} MiB activations ({cache['bytes'] / 1e9:.2f} GB on disk, "
        f"{cache['n_rows'] * CONTEXT:,} tokens), warm page cache; batches of {batch_tokens} tokens; best of {reps}",
    )
    raw = best(runs["raw readinto"])
    raw_rate = raw["tokens"] / raw["seconds"]
    rows = []
    for name in MODES:
        r = best(runs[name])
        rate = r["tokens"] / r["seconds"]
        rows.append(
            [
                name,
                f0(r["tokens"]),
                f3(r["seconds"]),
                times(runs[name]),
                f0(rate),
                f0(rate * (256 * 4 + 4) / 1e6),
                f3(rate / raw_rate),
                f2(r["cpu_s"]),
                f0(r["hwm_mib"]),
                f0(r["rss_file_end_mib"]),
            ]
        )
    table(COLUMNS, rows)
    ordered, shuffled = best(runs["reader, file order (+ copy)"]), best(runs["reader, shuffled (+ copy)"])
    r_o = ordered["tokens"] / ordered["seconds"] / raw_rate
    r_s = shuffled["tokens"] / shuffled["seconds"] / raw_rate
    print(f"\nreader / raw readinto tokens/s: file order **{r_o:.2f}**, shuffled **{r_s:.2f}**")
    return [
        Verdict("3 reader file order (+copy) / raw read", f"{r_o:.2f}", "reported (no target)", None),
        Verdict("3 reader shuffled (+copy) / raw read", f"{r_s:.2f}", "reported (no target)", None),
    ]


def main(argv: list[str] | None = None) -> list[Verdict]:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--file-mib", type=int, default=None, help="MiB of activations per data file (default 256)")
    p.add_argument("--files", type=int, default=None, help="data files (default 4: 1 GiB)")
    p.add_argument("--batch-tokens", type=int, default=4096, help="tokens per batch (default 4096)")
    args = parse(p, argv)
    file_mib = args.file_mib or (8 if args.quick else 256)
    n_files = args.files or (2 if args.quick else 4)
    reps = args.reps or (1 if args.quick else 3)
    cache, runs = measure(file_mib, n_files, args.batch_tokens, reps)
    return report(cache, runs, file_mib, n_files, args.batch_tokens, reps)


if __name__ == "__main__":
    entry(main, TASKS)
