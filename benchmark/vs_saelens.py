"""(b) sae_cache vs SAELens's CacheActivationsRunner on the same model, tokens and settings.

    python -m benchmark.vs_saelens [--quick] [--reps N] [--default-reps N] [--skip-default]

Two settings: small buffers (buffer_size_gb = 64 MiB) and SAELens's defaults (buffer_size_gb=2.0).
SAELens always computes whole buffers, so each setting caches a whole number of SAELens buffers:
8 x 65,536 tokens at 64 MiB, one buffer of 1,949,696 tokens at 2 GB. SAELens's `load_model` is
patched to return the locally built model and the pretokenized rows are its `override_dataset`;
both run with shuffle=False (SAELens's shuffle only writes an index mapping). Every run is a fresh
process; its peak RSS is VmHWM ("pre-run peak": VmHWM after loading the model and dataset and one
untimed warm-up batch). The "model" of the RSS target is the median peak RSS of the bare forward
loop of (a) on the same rows (run alongside at 64 MiB): the weights plus the forward pass's working
memory batch after batch, which exceeds what one warm-up pass leaves in VmHWM.
Targets (issue 3, 1b): sae_cache >= 1.3x SAELens's tokens/s; sae_cache's peak RSS <= 2 x
buffer_size_gb + the model.
"""

from __future__ import annotations

from benchmark._common import (
    ACT_BYTES_PER_TOKEN,
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

SPEED_TARGET = 1.3


def saelens_tokens_per_buffer(buffer_size_gb: float) -> int:
    """SAELens 6's n_tokens_in_buffer for our d_in, dtype, batch and context."""
    tokens = int(buffer_size_gb * 1e9) // ACT_BYTES_PER_TOKEN
    return tokens - tokens % (BATCH * CONTEXT)


def run_setting(tmp, label: str, buffer_size_gb: float, n_buffers: int, reps: int, with_forward: bool) -> dict:
    tokens = saelens_tokens_per_buffer(buffer_size_gb) * n_buffers
    n_rows = tokens // CONTEXT
    data = prepare_tokens(tmp, n_rows)
    common = dict(data=data["path"], kind=data["kind"], batch=BATCH, context=CONTEXT, training_tokens=tokens,
                  buffer_size_gb=buffer_size_gb)
    specs = {
        "sae_cache": dict(task="sae_cache", out=str(tmp / "sae_cache_out"), shuffle=False, **common),
        "SAELens": dict(task="saelens", out=str(tmp / "saelens_out"), **common),
    }
    if with_forward:  # the model's own memory: weights + a forward pass's working memory, batch after batch
        specs["forward loop"] = dict(task="forward", data=data["path"], kind=data["kind"], batch=BATCH, n_rows=n_rows)
    print(f"(b) {label}: {tokens:,} tokens, buffer_size_gb={buffer_size_gb:g}", flush=True)
    return {"label": label, "gb": buffer_size_gb, "tokens": tokens, "data": data, "reps": reps, "runs": alternate(specs, reps)}


def main(argv: list[str] | None = None) -> list[Verdict]:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--default-reps", type=int, default=None, help="repetitions at buffer_size_gb=2.0 (default 1)")
    p.add_argument("--skip-default", action="store_true", help="only the 64 MiB setting")
    args = parse(p, argv)
    reps = args.reps or (1 if args.quick else 3)
    if args.quick:  # SAELens needs at least one batch (4 MiB) per buffer
        settings = [("small (quick: 4 MiB)", 4 * MiB / GB, 4, reps, True), ("default (quick: 8 MiB)", 8 * MiB / GB, 2, reps, False)]
    else:
        settings = [("64 MiB", 64 * MiB / GB, 8, reps, True)]
        if not args.skip_default:
            settings.append(("default 2 GB", 2.0, 1, args.default_reps or 1, False))
    with scratch("saelens") as tmp:
        results = [run_setting(tmp, *s) for s in settings]
    data = results[0]["data"]
    header(
        "(b) sae_cache vs SAELens 6 CacheActivationsRunner",
        f"model: {data['kind']} (4 layers, d_model 256), tokens: {data['source']}; context {CONTEXT}, batch {BATCH}, "
        f"hook {HOOK}, float32, shuffle=False; best of N runs (alternating); {threads_text(best(results[0]['runs']['sae_cache']))}",
    )
    rows, verdicts = [], []
    forward_peaks = sorted(r["hwm_mib"] for r in results[0]["runs"]["forward loop"])
    model_mib = forward_peaks[len(forward_peaks) // 2]  # median peak RSS of the bare forward loop
    for res in results:
        ours, theirs = best(res["runs"]["sae_cache"]), best(res["runs"]["SAELens"])
        budget_mib = 2 * res["gb"] * GB / MiB
        names = [n for n in ("forward loop", "sae_cache", "SAELens") if n in res["runs"]]
        for name in names:
            r = best(res["runs"][name])
            rows.append([
                res["label"], name, f0(r["tokens"]), f2(r["seconds"]), times(res["runs"][name]),
                f0(r["tokens"] / r["seconds"]), f2(r["cpu_s"]), f0(r["base_hwm_mib"]), f0(r["hwm_mib"]),
                f0(r["hwm_mib"] - model_mib), f0(model_mib + budget_mib),
                f3(r["disk_bytes"] / r["raw_act_bytes"]) if "disk_bytes" in r else "-",
            ])
        speed = (ours["tokens"] / ours["seconds"]) / (theirs["tokens"] / theirs["seconds"])
        res["speed"] = speed
        quick = None if args.quick else True
        verdicts.append(Verdict(f"1b sae_cache / SAELens tokens/s ({res['label']})", f"{speed:.2f}x", f">= {SPEED_TARGET}x",
                                quick and speed >= SPEED_TARGET))
        verdicts.append(Verdict(f"1b sae_cache peak RSS ({res['label']})",
                                f"{ours['hwm_mib']:,.0f} MiB (SAELens {theirs['hwm_mib']:,.0f}); "
                                f"{ours['hwm_mib'] - ours['base_hwm_mib']:+,.0f} over its own pre-run peak",
                                f"<= {model_mib + budget_mib:,.0f} MiB (2 x buffer + model {model_mib:,.0f})",
                                ours["hwm_mib"] <= model_mib + budget_mib))
        verdicts.append(Verdict(f"1d disk / raw activation bytes ({res['label']})",
                                f"{ours['disk_bytes'] / ours['raw_act_bytes']:.4f} (SAELens {theirs['disk_bytes'] / theirs['raw_act_bytes']:.4f})",
                                "<= 1.02", ours["disk_bytes"] / ours["raw_act_bytes"] <= 1.02))
    table(["setting", "run", "tokens", "best s", "all runs s", "tokens/s", "CPU s", "pre-run peak RSS MiB", "peak RSS MiB",
           "peak - model MiB", "RSS target MiB", "disk / raw acts"], rows)
    print(f"\nmodel = {model_mib:,.0f} MiB, the median peak RSS of the bare forward loop (weights + a forward pass's working "
          "memory, batch after batch); RSS target = model + 2 x buffer_size_gb. Pre-run peak: VmHWM after loading the model "
          "and dataset and one warm-up batch.\n")
    for res in results:
        print(f"- {res['label']}: sae_cache / SAELens tokens/s = **{res['speed']:.2f}x** (best of {res['reps']})")
    return verdicts


if __name__ == "__main__":
    main()
