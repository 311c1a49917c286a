"""(c) The writer alone: synthetic activation buffers (no model) through sae_cache's real write path.

    python -m benchmark.writer [--quick] [--reps N] [--buffer-mib M] [--buffers K] [--no-datasets]

Each run writes K buffers of M MiB of float32 activations (rows x 128 x 256, plus int32 token ids),
one file per buffer, and fsyncs each file:

- raw: the same bytes with one sequential `write` + fsync per file (the floor);
- ArrowFileWriter: sae_cache.arrow_format's Arrow IPC writer (what every shard goes through);
- ShardWriter: the background writer thread (submit/close, manifest, rename) around it, each buffer
  submitted in the runner's pieces (a quarter buffer, at most 64 MiB: one record batch each), through
  the page cache (the runner's shards when shuffle=True, read back by the shuffle);
- ShardWriter, direct_io: the same around the page cache (O_DIRECT: the runner's final shards when
  shuffle=False);
- datasets save_to_disk: SAELens's path (`Dataset.from_dict(tensors).save_to_disk`, no fsync), for reference;
- ShardWriter (both ways) in the compact storage formats (issue 16): the same tokens' activations encoded,
  before the clock starts, as a bfloat16 and an int8 cache stores them (sae_cache.storage_formats: bfloat16 bit
  patterns; int8 values and a float32 scale per token), in buffers and pieces of the same bytes as float32's, as
  a run with the same buffer_size_gb makes them (so fewer files: 2 for bfloat16 where float32 has 4). A second
  table gives their tokens/s beside float32's and the bytes on disk against float32's: where writing is the
  limit, tokens/s rise by the bytes factor.

MB/s counts payload bytes (activations + token ids, 1 MB = 1e6 bytes). Runs alternate; best of N.
Targets: sae_cache's writer >= 70% of raw (issue 3, 1c); bytes on disk / float32's <= 0.51 for bfloat16 and
<= 0.27 for int8, and tokens/s over float32's >= 0.9 x the bytes factor (issue 16, item 5).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from benchmark._common import (
    CONTEXT,
    D_MODEL,
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
    scratch,
    table,
    times,
)
from benchmark._measure import Timed
from benchmark._setup import rows_in, synthetic_columns

TARGET = 0.70
MODES = {
    "raw write + fsync": "raw",
    "ArrowFileWriter": "arrow",
    "ShardWriter": "shardwriter",
    "ShardWriter, direct_io": "shardwriter_direct",
    "datasets save_to_disk": "datasets",
}
OURS = ("ArrowFileWriter", "ShardWriter", "ShardWriter, direct_io")
COMPACT = {  # the ShardWriter rows in the compact storage formats: name -> (mode, storage)
    f"{path}, {storage}": (MODES[path], storage)
    for path in ("ShardWriter", "ShardWriter, direct_io")
    for storage in ("bfloat16", "int8")
}
BYTES_TARGETS = {"bfloat16": 0.51, "int8": 0.27}  # bytes on disk / float32's (issue 16, item 5)
RISE_TARGET = 0.9  # tokens/s over float32's, as a fraction of float32's bytes / the format's
COMPACT_COLUMNS = [
    "writer",
    "storage",
    "tokens",
    "files",
    "best s",
    "all runs s",
    "tokens/s",
    "vs float32 tokens/s",
    "disk bytes / float32's",
    "bytes factor",
    "rise / bytes factor",
    "CPU s",
    "peak RSS MiB",
]
COLUMNS = [
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
]


# -- the measured task: one way of writing each ---------------------------------------------------------
# Each factory imports what its writer needs (before the clock starts) and returns write(out, columns, n, features).


def _raw():
    def write(out: Path, columns: dict, buffer_rows: list[int], features) -> None:
        for i, n in enumerate(buffer_rows):
            with open(out / f"raw_{i:05d}.bin", "wb") as f:
                for v in columns.values():
                    f.write(memoryview(v[:n]).cast("B"))
                f.flush()
                os.fsync(f.fileno())

    return write


def _arrow():
    from sae_cache.arrow_format import ArrowFileWriter

    def write(out: Path, columns: dict, buffer_rows: list[int], features) -> None:
        for i, n in enumerate(buffer_rows):
            writer = ArrowFileWriter(out / f"data-{i:05d}.arrow", features)
            writer.write({k: v[:n] for k, v in columns.items()})
            writer.close()

    return write


def _shard_writer(direct_io: bool):
    """Each buffer submitted to a ShardWriter in the runner's pieces (a quarter buffer, <= 64 MiB of activations)."""
    import torch

    from sae_cache.publish import ShardFiles
    from sae_cache.store import Piece
    from sae_cache.writer import ShardWriter

    def write(out: Path, columns: dict, buffer_rows: list[int], features) -> None:
        tensors = {k: torch.from_numpy(v) for k, v in columns.items()}
        act_row_bytes = sum(v[0].nbytes for k, v in columns.items() if k != "token_ids")
        piece = max(1, min(-(-buffer_rows[0] // 4), 64 * MiB // act_row_bytes))
        with ShardWriter(ShardFiles(out), features, direct_io=direct_io) as writer:
            for i, rows in enumerate(buffer_rows):
                for start in range(0, rows, piece):
                    part = {k: v[start : min(start + piece, rows)] for k, v in tensors.items()}
                    last = start + piece >= rows
                    writer.submit(Piece(i, part, len(part["token_ids"]), first=start == 0, last=last), {"stats": {}})

    return write


def _datasets():
    """SAELens's path: Dataset.from_dict(tensors).save_to_disk (no fsync)."""
    import torch
    from datasets import Dataset

    def write(out: Path, columns: dict, buffer_rows: list[int], features) -> None:
        tensors = {k: torch.from_numpy(v) for k, v in columns.items()}
        for i, n in enumerate(buffer_rows):
            part = {k: v[:n] for k, v in tensors.items()}
            Dataset.from_dict(part, features=features).save_to_disk(str(out / f"shard_{i:05d}"), num_shards=1)

    return write


WRITERS = {
    "raw": _raw,
    "arrow": _arrow,
    "shardwriter": lambda: _shard_writer(direct_io=False),
    "shardwriter_direct": lambda: _shard_writer(direct_io=True),
    "datasets": _datasets,
}


def stored_columns(columns: dict, storage: str) -> dict:
    """The float32 synthetic columns as a cache in `storage` stores them (sae_cache's codec): the hook's encoded
    column(s), then the token ids."""
    import torch

    from sae_cache.storage_formats import storage_format

    encoded = storage_format(storage).encode(HOOK, torch.from_numpy(columns[HOOK]))
    return {**{name: t.numpy() for name, t in encoded.items()}, "token_ids": columns["token_ids"]}


def buffer_rows(rows: int, n_buffers: int, context: int, storage: str) -> list[int]:
    """The rows of each buffer of a run with buffers of `rows` float32 rows' activation bytes (one buffer_size_gb),
    caching the same tokens in `storage`: a smaller format fits more rows in each buffer, so fewer buffers (files)."""
    if storage == "float32":
        return [rows] * n_buffers
    one = stored_columns(synthetic_columns(1, context), storage)
    per_buffer = rows * context * D_MODEL * 4 // sum(v.nbytes for k, v in one.items() if k != "token_ids")
    total = rows * n_buffers
    return [min(per_buffer, total - start) for start in range(0, total, per_buffer)]


def task_write(
    mode: str, directory: str, buffer_mib: int, n_buffers: int, context: int, storage: str = "float32"
) -> dict:
    """Write the tokens of n_buffers synthetic buffers of buffer_mib MiB of float32 activations (+ token ids), one
    file per buffer, the activations stored in `storage` (encoded before the clock starts) in buffers of the same
    bytes, as a run with the same buffer_size_gb does."""
    import numpy as np

    from sae_cache.arrow_format import cache_features

    write = WRITERS[mode]()
    rows = rows_in(buffer_mib, context)
    sizes = buffer_rows(rows, n_buffers, context, storage)
    columns = synthetic_columns(sizes[0], context)
    columns = columns if storage == "float32" else stored_columns(columns, storage)
    payload = sum(v[:n].nbytes for n in sizes for v in columns.values())
    features = cache_features({HOOK: D_MODEL}, context, storage)
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    with Timed() as t:
        write(out, columns, sizes, features)
    data_bytes = sum(p.stat().st_size for p in out.rglob("*") if p.is_file() and p.suffix in (".arrow", ".bin"))
    shutil.rmtree(out, ignore_errors=True)
    del columns
    return t.result(
        bytes=payload,
        act_bytes=rows * context * D_MODEL * 4 * n_buffers,
        data_bytes=data_bytes,
        rows=rows,
        files=len(sizes),
        tokens=sum(sizes) * context,
        storage=storage,
        np_version=np.__version__,
    )


TASKS = {"write": task_write}


# -- the driver ---------------------------------------------------------------------------------------


def report(runs: dict[str, list[dict]], modes: list[str], buffer_mib: int, n_buffers: int, reps: int) -> float:
    """Print the table and the ratio; return sae_cache's slowest writer / raw, MB/s."""
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
    table(COLUMNS, rows)
    ratio = min(best(runs[name])["bytes"] / best(runs[name])["seconds"] for name in OURS) / raw_rate
    paired = [
        r["seconds"] / max(x["seconds"] for x in xs)
        for r, *xs in zip(runs["raw write + fsync"], *(runs[n] for n in OURS))
    ]
    print(
        f"\nsae_cache writer / raw MB/s: **{ratio:.3f}** (the slowest of {', '.join(OURS)}, best vs best; "
        f"per round {', '.join(f'{x:.3f}' for x in paired)})"
    )
    return ratio


def report_compact(runs: dict[str, list[dict]]) -> dict[str, tuple[float, float]]:
    """Print the compact formats' table (float32's ShardWriter rows beside them); return, per format, the highest
    disk bytes / float32's and the lowest rise / bytes factor over the two ShardWriter paths."""
    rows, worst = [], {}
    for path in ("ShardWriter", "ShardWriter, direct_io"):
        f32 = best(runs[path])
        for storage in ("float32", *BYTES_TARGETS):
            name = path if storage == "float32" else f"{path}, {storage}"
            r = best(runs[name])
            rise, bytes_ratio = f32["seconds"] / r["seconds"], r["data_bytes"] / f32["data_bytes"]
            rows.append([path, storage, f0(r["tokens"]), str(r["files"]), f2(r["seconds"]), times(runs[name])])
            rows[-1] += [f0(r["tokens"] / r["seconds"]), f3(rise), f3(bytes_ratio), f2(1 / bytes_ratio)]
            rows[-1] += [f3(rise * bytes_ratio), f2(r["cpu_s"]), f0(r["hwm_mib"])]
            if storage != "float32":
                before = worst.get(storage, (0.0, float("inf")))
                worst[storage] = (max(before[0], bytes_ratio), min(before[1], rise * bytes_ratio))
    print(
        "\nThe compact storage formats through the ShardWriter (the same tokens, in buffers and pieces of the same"
        " bytes as float32's, as a run with the same buffer_size_gb):\n"
    )
    table(COMPACT_COLUMNS, rows)
    return worst


def verdicts(ratio: float, arrow: dict, quick: bool, compact: dict[str, tuple[float, float]]) -> list[Verdict]:
    file_ratio = arrow["data_bytes"] / arrow["act_bytes"]
    found = [
        Verdict("1c writer / raw write+fsync MB/s", f"{ratio:.3f}", f">= {TARGET}", None if quick else ratio >= TARGET),
        Verdict("1d arrow file bytes / raw activation bytes", f"{file_ratio:.4f}", "<= 1.02", file_ratio <= 1.02),
    ]
    for storage, (bytes_ratio, rise) in compact.items():
        target = BYTES_TARGETS[storage]
        found.append(
            Verdict(
                f"16.5 {storage} bytes on disk / float32's", f"{bytes_ratio:.4f}", f"<= {target}", bytes_ratio <= target
            )
        )
        found.append(
            Verdict(
                f"16.5 {storage} writer tokens/s rise / bytes factor (slower ShardWriter)",
                f"{rise:.3f}",
                f">= {RISE_TARGET}",
                None if quick else rise >= RISE_TARGET,
            )
        )
    return found


def main(argv: list[str] | None = None) -> list[Verdict]:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--buffer-mib", type=int, default=None, help="MiB of activations per buffer (default 256)")
    p.add_argument("--buffers", type=int, default=None, help="buffers per run (default 4)")
    p.add_argument("--no-datasets", action="store_true", help="skip the datasets save_to_disk reference row")
    args = parse(p, argv)
    buffer_mib = args.buffer_mib or (8 if args.quick else 256)
    n_buffers = args.buffers or (2 if args.quick else 4)
    reps = args.reps or (1 if args.quick else 5)
    modes = [name for name in MODES if not (args.no_datasets and MODES[name] == "datasets")]
    with scratch("writer") as tmp:
        args_of = dict(buffer_mib=buffer_mib, n_buffers=n_buffers, context=CONTEXT)
        jobs = {n: Job("writer", "write", dict(args_of, mode=MODES[n], directory=str(tmp / MODES[n]))) for n in modes}
        for name, (mode, storage) in COMPACT.items():
            jobs[name] = Job("writer", "write", dict(args_of, mode=mode, storage=storage, directory=str(tmp / mode)))
        runs = alternate(jobs, reps)
    ratio = report(runs, modes, buffer_mib, n_buffers, reps)
    compact = report_compact(runs)
    return verdicts(ratio, best(runs["ArrowFileWriter"]), args.quick, compact)


if __name__ == "__main__":
    entry(main, TASKS)
