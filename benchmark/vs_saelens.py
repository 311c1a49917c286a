"""(b) sae_cache vs SAELens's CacheActivationsRunner on the same model, tokens and settings.

    python -m benchmark.vs_saelens [--quick] [--reps N] [--default-reps N] [--skip-default] [--device cuda]

Two settings: small buffers (buffer_size_gb = 64 MiB) and SAELens's defaults (buffer_size_gb=2.0).
SAELens always computes whole buffers, so each setting caches a whole number of SAELens buffers:
8 x 65,536 tokens at 64 MiB, one buffer of 1,949,696 tokens at 2 GB. SAELens's `load_model` is
patched to return the locally built model and the pretokenized rows are its `override_dataset`;
both run with shuffle=False (SAELens's shuffle only writes an index mapping). Every run is a fresh
process; its peak RSS is VmHWM ("pre-run peak": VmHWM after loading the model and dataset and one
untimed warm-up batch). The "model" of the RSS target is the median peak RSS of the bare forward
loop of (a) on the same rows (run alongside at 64 MiB): the weights plus the forward pass's working
memory batch after batch, which exceeds what one warm-up pass leaves in VmHWM. sae_cache runs with
its defaults, which on this CPU means 2 forward passes at once (`forward_threads`), so its model term
is the 2-thread forward loop's (two passes' working memory); at 64 MiB it also runs with
forward_threads=1 against the plain loop.
Targets (issue 3, 1b): sae_cache (its defaults) >= 1.3x SAELens's tokens/s; sae_cache's peak RSS <= 2 x
buffer_size_gb + the model (every sae_cache run). The forward_threads=1 speed is shown for context.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from benchmark import forward_vs_cache
from benchmark._common import (
    ACT_BYTES_PER_TOKEN,
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
from benchmark._setup import cache_info, model_and_rows

SPEED_TARGET = 1.3
MODEL_OF = {"forward loop": 1, "forward loop, 2 threads": 2}  # forward loops measured for the RSS model term
RUNS = ("forward loop", "forward loop, 2 threads", "sae_cache", "sae_cache, forward_threads=1", "SAELens")
COLUMNS = [
    "setting",
    "run",
    "tokens",
    "best s",
    "all runs s",
    "tokens/s",
    "CPU s",
    "pre-run peak RSS MiB",
    "peak RSS MiB",
    "peak - model MiB",
    "RSS target MiB",
    "disk / raw acts",
]


# -- the measured task --------------------------------------------------------------------------------


def task_saelens(
    data: str,
    kind: str,
    out: str,
    training_tokens: int,
    buffer_size_gb: float,
    batch: int,
    context: int,
    hook: str = HOOK,
    device: str = "cpu",
) -> dict:
    """SAELens 6's CacheActivationsRunner on the same model (its load_model patched) and dataset."""
    import sae_lens.cache_activations_runner as saelens_runner
    from sae_lens.config import CacheActivationsRunnerConfig as SAELensConfig

    model, dataset = model_and_rows(kind, data, batch, context, hook, device)
    saelens_runner.load_model = lambda *args, **kwargs: model
    cfg = SAELensConfig(
        dataset_path=data,
        model_name="bench-model",
        model_batch_size=batch,
        hook_name=hook,
        d_in=D_MODEL,
        training_tokens=training_tokens,
        context_size=context,
        new_cached_activations_path=out,
        shuffle=False,
        device=device,
        buffer_size_gb=buffer_size_gb,
        dtype="float32",
    )
    with Timed(device) as t:
        runner = saelens_runner.CacheActivationsRunner(cfg, override_dataset=dataset)
        cached = runner.run()
    info = cache_info(Path(out), len(cached), context)
    del cached
    shutil.rmtree(out, ignore_errors=True)
    return t.result(**info, n_buffers=cfg.n_buffers, buffer_bytes=cfg.n_tokens_in_buffer * D_MODEL * 4)


TASKS = {"saelens": task_saelens}


# -- the driver ---------------------------------------------------------------------------------------


def model_loop(name: str, result: dict) -> str:
    """The forward loop whose peak RSS is `name`'s model term: the one with as many passes at once."""
    return "forward loop, 2 threads" if name == "sae_cache" and result.get("forward_threads", 1) > 1 else "forward loop"


def saelens_tokens_per_buffer(buffer_size_gb: float) -> int:
    """SAELens 6's n_tokens_in_buffer for our d_in, dtype, batch and context."""
    tokens = int(buffer_size_gb * 1e9) // ACT_BYTES_PER_TOKEN
    return tokens - tokens % (BATCH * CONTEXT)


def settings(args) -> list[tuple[str, float, int, int, bool]]:
    """(label, buffer_size_gb, SAELens buffers, repetitions, with the forward loops) of each setting."""
    reps = args.reps or (1 if args.quick else 3)
    if args.quick:  # SAELens needs at least one batch (4 MiB) per buffer
        return [
            ("small (quick: 4 MiB)", 4 * MiB / GB, 4, reps, True),
            ("default (quick: 8 MiB)", 8 * MiB / GB, 2, reps, False),
        ]
    chosen = [("64 MiB", 64 * MiB / GB, 8, reps, True)]
    if not args.skip_default:
        chosen.append(("default 2 GB", 2.0, 1, args.default_reps or 1, False))
    return chosen


def run_setting(tmp, device: str, label: str, buffer_size_gb: float, n_buffers: int, reps: int, with_forward: bool):
    tokens = saelens_tokens_per_buffer(buffer_size_gb) * n_buffers
    n_rows = tokens // CONTEXT
    data = prepare_tokens(tmp, n_rows)
    ours = forward_vs_cache.sae_cache_job(data, tmp / "sae_cache_out", tokens, buffer_size_gb, device)
    theirs = {k: v for k, v in ours.args.items() if k != "shuffle"}
    jobs = {"sae_cache": ours, "SAELens": Job("vs_saelens", "saelens", dict(theirs, out=str(tmp / "saelens_out")))}
    if with_forward:  # the model's own memory: weights + a forward pass's working memory, batch after batch
        jobs["sae_cache, forward_threads=1"] = ours.but(forward_threads=1)
        for name, streams in MODEL_OF.items():
            jobs[name] = forward_vs_cache.forward_job(data, n_rows, device, streams=streams)
    print(f"(b) {label}: {tokens:,} tokens, buffer_size_gb={buffer_size_gb:g}", flush=True)
    return {
        "label": label,
        "gb": buffer_size_gb,
        "tokens": tokens,
        "data": data,
        "reps": reps,
        "runs": alternate(jobs, reps),
    }


def model_mib(result: dict) -> dict[str, float]:
    """The median peak RSS of each bare forward loop (of the first setting)."""
    out = {}
    for name in MODEL_OF:
        peaks = sorted(r["hwm_mib"] for r in result["runs"][name])
        out[name] = peaks[len(peaks) // 2]
    return out


def _row(res: dict, name: str, r: dict, model: float, budget_mib: float) -> list:
    return [
        res["label"],
        name,
        f0(r["tokens"]),
        f2(r["seconds"]),
        times(res["runs"][name]),
        f0(r["tokens"] / r["seconds"]),
        f2(r["cpu_s"]),
        f0(r["base_hwm_mib"]),
        f0(r["hwm_mib"]),
        f0(r["hwm_mib"] - model),
        f0(model + budget_mib),
        f3(r["disk_bytes"] / r["raw_act_bytes"]) if "disk_bytes" in r else "-",
    ]


def _sae_cache_verdicts(res: dict, name: str, r: dict, model: float, budget_mib: float, quick) -> list[Verdict]:
    theirs = best(res["runs"]["SAELens"])
    speed = (r["tokens"] / r["seconds"]) / (theirs["tokens"] / theirs["seconds"])
    res["speeds"][name] = speed
    default = name == "sae_cache"  # the target is the tool as shipped; forward_threads=1 shows what the threads add
    return [
        Verdict(
            f"1b {name} / SAELens tokens/s ({res['label']})",
            f"{speed:.2f}x",
            f">= {SPEED_TARGET}x" if default else "(context: not the default)",
            quick and speed >= SPEED_TARGET if default else None,
        ),
        Verdict(
            f"1b peak RSS ({res['label']}, {name})",
            f"{r['hwm_mib']:,.0f} MiB (SAELens {theirs['hwm_mib']:,.0f}); "
            f"{r['hwm_mib'] - r['base_hwm_mib']:+,.0f} over its own pre-run peak",
            f"<= {model + budget_mib:,.0f} MiB (2 x buffer + model {model:,.0f}, {model_loop(name, r)})",
            r["hwm_mib"] <= model + budget_mib,
        ),
    ]


def setting_report(res: dict, models: dict[str, float], quick) -> tuple[list[list], list[Verdict]]:
    """The table rows and the verdicts of one setting."""
    budget_mib = 2 * res["gb"] * GB / MiB
    res["speeds"] = {}
    rows, verdicts = [], []
    for name in (n for n in RUNS if n in res["runs"]):
        r = best(res["runs"][name])
        model = models[model_loop(name, r)] if name.startswith("sae_cache") else models["forward loop"]
        rows.append(_row(res, name, r, model, budget_mib))
        if name.startswith("sae_cache"):
            verdicts += _sae_cache_verdicts(res, name, r, model, budget_mib, quick)
    ours, theirs = best(res["runs"]["sae_cache"]), best(res["runs"]["SAELens"])
    verdicts.append(
        Verdict(
            f"1d disk / raw activation bytes ({res['label']})",
            f"{ours['disk_bytes'] / ours['raw_act_bytes']:.4f} "
            f"(SAELens {theirs['disk_bytes'] / theirs['raw_act_bytes']:.4f})",
            "<= 1.02",
            ours["disk_bytes"] / ours["raw_act_bytes"] <= 1.02,
        )
    )
    return rows, verdicts


def report(results: list[dict], quick: bool) -> list[Verdict]:
    data = results[0]["data"]
    header(
        "(b) sae_cache vs SAELens 6 CacheActivationsRunner",
        f"model: {data['kind']} (4 layers, d_model 256), tokens: {data['source']}; context {CONTEXT}, batch {BATCH}, "
        f"hook {HOOK}, float32, shuffle=False; best of N runs (alternating); "
        f"{threads_text(best(results[0]['runs']['sae_cache']))}",
    )
    models = model_mib(results[0])
    rows, verdicts = [], []
    for res in results:
        setting_rows, setting_verdicts = setting_report(res, models, None if quick else True)
        rows += setting_rows
        verdicts += setting_verdicts
    table(COLUMNS, rows)
    print(
        f"\nmodel = {models['forward loop']:,.0f} MiB, the median peak RSS of the plain forward loop (weights + a "
        f"forward pass's working memory, batch after batch); {models['forward loop, 2 threads']:,.0f} MiB for the "
        "2-thread loop (two passes at once, sae_cache's default on this CPU). RSS target = model + 2 x buffer_size_gb. "
        "Pre-run peak: VmHWM after loading the model and dataset and one warm-up batch.\n"
    )
    for res in results:
        for name, speed in res["speeds"].items():
            print(f"- {res['label']}: {name} / SAELens tokens/s = **{speed:.2f}x** (best of {res['reps']})")
    return verdicts


def main(argv: list[str] | None = None) -> list[Verdict]:
    p = parser(__doc__.splitlines()[0], device=True)
    p.add_argument("--default-reps", type=int, default=None, help="repetitions at buffer_size_gb=2.0 (default 1)")
    p.add_argument("--skip-default", action="store_true", help="only the 64 MiB setting")
    args = parse(p, argv)
    with scratch("saelens") as tmp:
        results = [run_setting(tmp, args.device, *s) for s in settings(args)]
    return report(results, args.quick)


if __name__ == "__main__":
    entry(main, TASKS)
