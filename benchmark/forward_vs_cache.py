"""(a) The bare forward loop vs sae_cache end to end, on the same model and tokens.

    python -m benchmark.forward_vs_cache [--quick] [--reps N] [--rows R] [--buffer-mib M] [--device cuda]

The forward loop runs the same batches of `model_batch_size` rows through the model with the same
hook and `stop_at_layer`, and copies each batch's activations into a reused host buffer (pinned on a
GPU): once as a plain loop with torch's threads, and once as 2 concurrent loops sharing torch's
threads (what sae_cache's `forward_threads` does on a CPU, so the ratio also shows its overhead alone).
sae_cache runs `CacheActivationsRunner(cfg, override_dataset=..., model=...).run()` with shuffle=False:
reading the rows, the forward pass, statistics, the writer thread, fsync, publishing and
`load_from_disk`. Both get a model built beforehand; runs alternate (A B, B A, ...) and the best of N
is reported. Target (issue 3, 1a): sae_cache tokens/s >= 0.95 x the faster forward loop's.

Its tasks, `forward` and `sae_cache`, are also the forward loop and the sae_cache run of (b), (e), (f)
and the breakdown.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from benchmark._common import (
    BATCH,
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
    scratch,
    table,
    threads_text,
    times,
)
from benchmark._measure import Timed
from benchmark._setup import build_model, cache_config, cache_info, load_rows, model_and_rows, stop_layer, warm_up

TARGET = 0.95
FORWARD = ("forward loop", "forward loop, 2 threads")
COLUMNS = ["run", "tokens", "best s", "all runs s", "tokens/s", "CPU s", "peak RSS MiB", "disk / raw acts"]


# -- the measured tasks -------------------------------------------------------------------------------


def _forward_loop(model, tokens, batch: int, hook: str, streams: int, device: str):
    """The loop body run by each of `streams` threads: every streams-th batch, activations copied to the host."""
    import threading

    import torch

    local = threading.local()
    model.hook_dict[hook].add_hook(lambda act, hook: setattr(local, "acts", act))
    pin, stop_at = device.startswith("cuda"), stop_layer(hook)

    tokens = tokens.pin_memory() if pin else tokens  # copied to the GPU without a wait, as sae_cache does

    def loop(first: int) -> None:
        host = torch.empty((batch, tokens.shape[1], D_MODEL), dtype=torch.float32, pin_memory=pin)
        with torch.no_grad():
            for i in range(first * batch, len(tokens), batch * streams):
                tokens_BL = tokens[i : i + batch].to(device, non_blocking=pin)
                model(tokens_BL, stop_at_layer=stop_at)
                host[: len(tokens_BL)].copy_(local.acts, non_blocking=pin)

    return loop


def task_forward(
    data: str, kind: str, n_rows: int, batch: int, hook: str = HOOK, streams: int = 1, device: str = "cpu"
) -> dict:
    """The bare loop: same batches, same hook, stop_at_layer, activations copied into a reused host buffer.

    streams > 1: that many threads each run every streams-th batch with torch's threads shared among them
    (what sae_cache's forward_threads does on a CPU), each copying into its own reused host buffer.
    """
    import numpy as np
    import torch

    model = build_model(kind, device)
    tokens = torch.from_numpy(np.asarray(load_rows(data)["input_ids"][:n_rows], dtype=np.int64))
    warm_up(model, batch, tokens.shape[1], hook, device)
    t = timed_loops(_forward_loop(model, tokens, batch, hook, streams, device), streams, device)
    model.reset_hooks()
    return t.result(tokens=int(tokens.numel()), streams=streams)


def timed_loops(loop, streams: int, device: str) -> Timed:
    """loop(k) for k < streams, each on its own thread with torch's threads shared among them, timed together."""
    import threading

    import torch

    threads_before = torch.get_num_threads()
    if streams > 1:
        torch.set_num_threads(max(1, threads_before // streams))
    with Timed(device) as t:
        workers = [threading.Thread(target=loop, args=(k,)) for k in range(streams)]
        for w in workers:
            w.start()
        for w in workers:
            w.join()
    torch.set_num_threads(threads_before)
    return t


def sae_cache_setup(
    data: str,
    kind: str,
    out: str,
    training_tokens: int,
    buffer_size_gb: float,
    batch: int,
    context: int,
    hook: str = HOOK,
    device: str = "cpu",
    **fields,
):
    """The untimed part of a sae_cache run: (model, rows, config); `fields` are more of the config's fields."""
    model, rows = model_and_rows(kind, data, batch, context, hook, device)
    cfg = cache_config(
        out,
        hooks=hook,
        training_tokens=training_tokens,
        batch=batch,
        context=context,
        buffer_size_gb=buffer_size_gb,
        device=device,
        **fields,
    )
    return model, rows, cfg


def task_sae_cache(shuffle: bool, forward_threads: int | None = None, **setup) -> dict:
    """sae_cache's CacheActivationsRunner end to end (construction + run(), model built beforehand)."""
    model, rows, cfg = sae_cache_setup(**setup, shuffle=shuffle, forward_threads=forward_threads)
    return timed_sae_cache(model, rows, cfg)


def timed_sae_cache(model, rows, cfg) -> dict:
    """The timed part of a sae_cache run: CacheActivationsRunner(cfg, override_dataset=rows, model=model) built and
    run; then what the cache holds (it is removed after)."""
    from sae_cache import CacheActivationsRunner

    with Timed(cfg.device) as t:
        runner = CacheActivationsRunner(cfg, override_dataset=rows, model=model)
        cached = runner.run()
    out = cfg.new_cached_activations_path
    info = cache_info(Path(out), len(cached), cfg.context_size)
    plan = runner.plan
    del cached
    shutil.rmtree(out, ignore_errors=True)
    return t.result(
        **info,
        n_buffers=plan.n_buffers,
        rows_per_buffer=plan.rows_per_buffer,
        buffer_bytes=plan.rows_per_buffer * plan.bytes_per_row,
        forward_threads=runner._resolve().forward_threads,
    )


TASKS = {"forward": task_forward, "sae_cache": task_sae_cache}


def forward_job(data: dict, n_rows: int, device: str, streams: int = 1) -> Job:
    """The bare forward loop over the first n_rows rows of `data` (a prepare_tokens result)."""
    args = dict(data=data["path"], kind=data["kind"], batch=BATCH, n_rows=n_rows, streams=streams, device=device)
    return Job("forward_vs_cache", "forward", args)


def sae_cache_job(data: dict, out: Path, tokens: int, buffer_size_gb: float, device: str, shuffle=False) -> Job:
    """sae_cache end to end on `tokens` tokens of `data` (a prepare_tokens result)."""
    args = dict(data=data["path"], kind=data["kind"], batch=BATCH, context=CONTEXT, out=str(out), device=device)
    return Job(
        "forward_vs_cache",
        "sae_cache",
        dict(args, training_tokens=tokens, buffer_size_gb=buffer_size_gb, shuffle=shuffle),
    )


# -- the driver ---------------------------------------------------------------------------------------


def measure(n_rows: int, buffer_mib: int, reps: int, device: str) -> tuple[dict, dict[str, list[dict]]]:
    with scratch("forward") as tmp:
        data = prepare_tokens(tmp, n_rows)
        jobs = {
            FORWARD[0]: forward_job(data, n_rows, device),
            FORWARD[1]: forward_job(data, n_rows, device, streams=2),
            "sae_cache": sae_cache_job(data, tmp / "cache", n_rows * CONTEXT, buffer_mib * MiB / GB, device),
        }
        return data, alternate(jobs, reps)


def report(runs: dict[str, list[dict]], data: dict, n_rows: int, buffer_mib: int, reps: int) -> float:
    """Print the table and the ratios; return sae_cache / the faster forward loop, tokens/s."""
    plain, two, cache = (best(runs[name]) for name in (*FORWARD, "sae_cache"))
    fwd_name = min(FORWARD, key=lambda name: best(runs[name])["seconds"])
    ratio = best(runs[fwd_name])["seconds"] / cache["seconds"]
    paired = sorted(f["seconds"] / c["seconds"] for f, c in zip(runs[fwd_name], runs["sae_cache"]))
    header(
        "(a) forward-only loop vs sae_cache end to end",
        f"model: {data['kind']} (4 layers, d_model 256), tokens: {data['source']}; {n_rows:,} rows x {CONTEXT} = "
        f"{n_rows * CONTEXT:,} tokens, batch {BATCH}, hook {HOOK}, sae_cache buffer {buffer_mib} MiB, shuffle=False, "
        f"forward_threads {cache.get('forward_threads')} (automatic); best of {reps}; {threads_text(plain)}",
    )
    table(
        COLUMNS,
        [_row(name, r, runs[name]) for name, r in ((FORWARD[0], plain), (FORWARD[1], two), ("sae_cache", cache))],
    )
    print(
        f"\nsae_cache / faster forward loop ({fwd_name}) tokens/s: **{ratio:.3f}** (best vs best; paired runs "
        f"{', '.join(f'{x:.3f}' for x in paired)}); sae_cache / plain forward loop: "
        f"{plain['seconds'] / cache['seconds']:.3f}; 2 threads / plain forward loop: "
        f"{plain['seconds'] / two['seconds']:.3f}"
    )
    return ratio


def _row(name: str, r: dict, runs: list[dict]) -> list:
    disk = f3(r["disk_bytes"] / r["raw_act_bytes"]) if "disk_bytes" in r else "-"
    rate = f0(r["tokens"] / r["seconds"])
    return [name, f0(r["tokens"]), f2(r["seconds"]), times(runs), rate, f2(r["cpu_s"]), f0(r["hwm_mib"]), disk]


def verdicts(ratio: float, cache: dict, quick: bool) -> list[Verdict]:
    disk = cache["disk_bytes"] / cache["raw_act_bytes"]
    return [
        Verdict(
            "1a sae_cache / faster forward loop tokens/s",
            f"{ratio:.3f}",
            f">= {TARGET}",
            None if quick else ratio >= TARGET,
        ),
        Verdict("1d disk / raw activation bytes (1a run)", f"{disk:.4f}", "<= 1.02", disk <= 1.02),
    ]


def main(argv: list[str] | None = None) -> list[Verdict]:
    p = parser(__doc__.splitlines()[0], device=True)
    p.add_argument("--rows", type=int, default=None, help=f"rows of {CONTEXT} tokens (default 4096: 524,288 tokens)")
    p.add_argument("--buffer-mib", type=int, default=None, help="sae_cache buffer_size_gb in MiB (default 64)")
    args = parse(p, argv)
    n_rows = args.rows or (128 if args.quick else 4096)
    reps = args.reps or (1 if args.quick else 4)
    buffer_mib = args.buffer_mib or (2 if args.quick else 64)
    data, runs = measure(n_rows, buffer_mib, reps, args.device)
    ratio = report(runs, data, n_rows, buffer_mib, reps)
    return verdicts(ratio, best(runs["sae_cache"]), args.quick)


if __name__ == "__main__":
    entry(main, TASKS)
