"""Benchmarks of sae_cache (scripts that print Markdown tables, not unit tests).

Each module runs as `python -m benchmark.<name>` from the repository root, takes `--quick` for a
tiny smoke run, and writes its scratch data under a temporary directory that it removes:

- `forward_vs_cache` (a): the bare forward loop vs sae_cache end to end, tokens/s and their ratio.
- `vs_saelens` (b): sae_cache vs SAELens's CacheActivationsRunner, at 64 MiB buffers and at defaults.
- `writer` (c): synthetic buffers through sae_cache's writer vs a raw write + fsync of the same bytes.
- `scaling` (e): 1x and 4x the tokens, time and peak RSS.
- `shuffle` (f): shuffle=True vs False end to end, and `shuffle_shards` alone vs a plain copy.
- `reader` (g): `CachedActivations.batches` vs a raw read of the same bytes.
- `breakdown`, `multi_hook`, `ranks_scaling`: diagnostics and the figures of issue 6 and of torchrun ranks.
- `gpu`: one GPU against its bound (bare forward, disk), every shuffle mode; self-contained (issue 15).

Peak RSS and bytes on disk over raw activation bytes (d) are columns of every table. Each file holds its own
measurement: its task functions, each run in a fresh process (`python -m benchmark.<name> --task TASK --args
JSON`, which prints one `RESULT {json}` line; `_common.run_task`), so every run's peak RSS (VmHWM) is its own.
`_common` is the driver's side (no torch), `_measure` the measured process's (`Timed`, the RESULT line), `_setup`
the one model builder and token data. The benchmarks that run a model take `--device` (default cpu).
`python -m benchmark.run_all` (`make bench`) runs (a)-(g) and ends with a table of the targets.
"""
