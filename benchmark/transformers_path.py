"""(h) The transformers path on the CPU: bare forward loops and sae_cache on a transformers GPT-2, beside
TransformerLens, for the same shape (issue 14, item 6).

    python -m benchmark.transformers_path [--quick] [--reps N] [--rows R] [--buffer-mib M] [--device cuda]

Both models have the demo model's shape with random weights: 4 layers, d_model 256, 4 heads, MLP 1024, GELU,
LayerNorm, vocabulary 4,096, 256 positions: TransformerLens's (`_setup.build_model("random")`) and a transformers
GPT2LMHeadModel saved with save_pretrained to a scratch directory and loaded by path with SDPA attention. The
hook is block 2's output for both (`blocks.2.hook_resid_post`, `transformer.h.2`): the pass stops after block 2.
Per model kind, on the same token rows (context 128, batch 32): the forward loop that copies each batch's
activations into a reused host buffer, plainly and as 2 concurrent loops sharing torch's threads (what
sae_cache's `forward_threads` does on a CPU) - TransformerLens's with its own hook and `stop_at_layer`
(forward_vs_cache's task), transformers' with a torch forward hook that ends the pass - and sae_cache end to end
(`CacheActivationsRunner(cfg, override_dataset=..., model=...)`, the transformers model loaded by path through
`sae_cache.adapters.load_model(path, model_class_name="AutoModelForCausalLM")`, shuffle=False). Runs alternate;
best of N. Target (as 1a): sae_cache on the transformers model >= 0.95 x its faster forward loop, tokens/s.
"""

from __future__ import annotations

from pathlib import Path

from benchmark._common import (
    BATCH,
    CONTEXT,
    D_MODEL,
    GB,
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
from benchmark._setup import VOCAB, cache_config, load_rows
from benchmark.forward_vs_cache import forward_job, sae_cache_job, timed_loops, timed_sae_cache

TARGET = 0.95
HOOKS = {"TransformerLens": "blocks.2.hook_resid_post", "transformers": "transformer.h.2"}  # block 2's output
RUNS = ("forward loop", "forward loop, 2 threads", "sae_cache")
COLUMNS = ["model", "run", "tokens", "best s", "all runs s", "tokens/s", "vs faster loop", "CPU s", "peak RSS MiB"]
SDPA = {"attn_implementation": "sdpa"}


# -- the measured tasks (the transformers model; TransformerLens's are forward_vs_cache's) ----------------------


def save_model(model_dir: str) -> str:
    """The transformers GPT-2 of the demo model's shape, random weights, saved once to model_dir."""
    from benchmark.gpu import Shape, save_transformers_model

    shape = Shape(n_layers=4, d_model=D_MODEL, n_heads=4, d_vocab=VOCAB, context=256, batch=BATCH)
    return str(save_transformers_model(shape, Path(model_dir), activation="gelu"))


class _Stop(Exception):
    """Ends a forward pass once the hooked block has run."""


def _forward_loop(model, tokens, batch: int, streams: int, device: str):
    """The loop body run by each of `streams` threads: every streams-th batch through the model until the hooked
    block's output (a torch forward hook keeps it and ends the pass), copied into a reused host buffer."""
    import threading

    import torch

    local, pin = threading.local(), device.startswith("cuda")

    def keep(module, args, output) -> None:
        local.acts = output[0] if isinstance(output, tuple) else output
        raise _Stop

    dict(model.named_modules())[HOOKS["transformers"]].register_forward_hook(keep)

    tokens = tokens.pin_memory() if pin else tokens  # copied to the GPU without a wait, as sae_cache does

    def loop(first: int) -> None:
        host = torch.empty((batch, tokens.shape[1], D_MODEL), dtype=torch.float32, pin_memory=pin)
        with torch.no_grad():
            for i in range(first * batch, len(tokens), batch * streams):
                tokens_BL = tokens[i : i + batch].to(device, non_blocking=pin)
                try:
                    model(input_ids=tokens_BL, use_cache=False)
                except _Stop:
                    host[: len(tokens_BL)].copy_(local.acts, non_blocking=pin)

    return loop


def task_forward(data: str, model_dir: str, n_rows: int, batch: int, streams: int = 1, device: str = "cpu") -> dict:
    """The bare loop on the transformers model (plain transformers, no sae_cache), as forward_vs_cache's."""
    import numpy as np
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(save_model(model_dir), **SDPA).to(device).eval()
    tokens = torch.from_numpy(np.asarray(load_rows(data)["input_ids"][:n_rows], dtype=np.int64))
    with torch.no_grad():  # the warm-up pass (the whole model)
        model(input_ids=torch.zeros((batch, tokens.shape[1]), dtype=torch.long, device=device), use_cache=False)
    t = timed_loops(_forward_loop(model, tokens, batch, streams, device), streams, device)
    return t.result(tokens=int(tokens.numel()), streams=streams)


def task_sae_cache(
    data: str, model_dir: str, out: str, training_tokens: int, buffer_size_gb: float, batch: int, device: str = "cpu"
) -> dict:
    """sae_cache end to end on the transformers model, loaded by path beforehand as a user loads a checkpoint."""
    import torch

    from sae_cache.adapters import load_model

    adapter = load_model(
        save_model(model_dir), model_class_name="AutoModelForCausalLM", device=device, from_pretrained_kwargs=SDPA
    )
    rows = load_rows(data)
    hook = HOOKS["transformers"]
    with adapter.capture([hook]) as capture:  # the warm-up pass
        capture(torch.zeros((batch, CONTEXT), dtype=torch.long, device=device))
    cfg = cache_config(
        out,
        hooks=hook,
        training_tokens=training_tokens,
        batch=batch,
        context=CONTEXT,
        buffer_size_gb=buffer_size_gb,
        device=device,
    )
    return timed_sae_cache(adapter, rows, cfg)


TASKS = {"forward": task_forward, "sae_cache": task_sae_cache}


# -- the driver ---------------------------------------------------------------------------------------


def jobs(data: dict, tmp: Path, n_rows: int, buffer_mib: int, device: str) -> dict[str, Job]:
    """The six runs: per model kind, the plain and 2-thread forward loops and sae_cache."""
    tl = dict(kind="random", hook=HOOKS["TransformerLens"])
    buffer_gb, tokens = buffer_mib * MiB / GB, n_rows * CONTEXT
    hf = dict(data=data["path"], model_dir=str(tmp / "transformers-gpt2"), batch=BATCH, device=device)
    return {
        ("TransformerLens", RUNS[0]): forward_job(data, n_rows, device).but(**tl),
        ("TransformerLens", RUNS[1]): forward_job(data, n_rows, device, streams=2).but(**tl),
        ("TransformerLens", RUNS[2]): sae_cache_job(data, tmp / "cache", tokens, buffer_gb, device).but(**tl),
        ("transformers", RUNS[0]): Job("transformers_path", "forward", dict(hf, n_rows=n_rows)),
        ("transformers", RUNS[1]): Job("transformers_path", "forward", dict(hf, n_rows=n_rows, streams=2)),
        ("transformers", RUNS[2]): Job(
            "transformers_path",
            "sae_cache",
            dict(hf, out=str(tmp / "cache"), training_tokens=tokens, buffer_size_gb=buffer_gb),
        ),
    }


def measure(n_rows: int, buffer_mib: int, reps: int, device: str) -> tuple[dict, dict]:
    with scratch("transformers") as tmp:
        data = prepare_tokens(tmp, n_rows)
        named = jobs(data, tmp, n_rows, buffer_mib, device)
        runs = alternate({f"{kind}: {run}": job for (kind, run), job in named.items()}, reps)
        return data, {key: runs[f"{key[0]}: {key[1]}"] for key in named}


def report(runs: dict, data: dict, n_rows: int, buffer_mib: int, reps: int) -> dict[str, float]:
    """Print the table; return, per model kind, sae_cache / its faster forward loop, tokens/s."""
    threads = threads_text(best(runs["TransformerLens", RUNS[0]]))
    header(
        "(h) the transformers path beside TransformerLens: forward loops and sae_cache",
        f"both models: the demo shape (4 layers, d_model 256), random weights; tokens: {data['source']}; {n_rows:,} "
        f"rows x {CONTEXT} = {n_rows * CONTEXT:,} tokens, batch {BATCH}, hook block 2's output (TransformerLens "
        f"{HOOKS['TransformerLens']}, transformers {HOOKS['transformers']}, SDPA), sae_cache buffer {buffer_mib} MiB, "
        f"shuffle=False, forward_threads automatic; best of {reps}; {threads}",
    )
    rows, ratios = [], {}
    for kind in HOOKS:
        faster = min(best(runs[kind, run])["seconds"] for run in RUNS[:2])
        for run in RUNS:
            r = best(runs[kind, run])
            rate = f0(r["tokens"] / r["seconds"])
            rows.append([kind, run, f0(r["tokens"]), f2(r["seconds"]), times(runs[kind, run]), rate])
            rows[-1] += [f3(faster / r["seconds"]), f2(r["cpu_s"]), f0(r["hwm_mib"])]
        ratios[kind] = faster / best(runs[kind, RUNS[2]])["seconds"]
    table(COLUMNS, rows)
    plain = {kind: best(runs[kind, RUNS[0]])["seconds"] for kind in HOOKS}
    print(
        "\ntransformers / TransformerLens, plain forward loop tokens/s: "
        f"**{plain['TransformerLens'] / plain['transformers']:.3f}**; "
        f"sae_cache / faster forward loop: transformers **{ratios['transformers']:.3f}**, TransformerLens "
        f"{ratios['TransformerLens']:.3f}"
    )
    return ratios


def main(argv: list[str] | None = None) -> list[Verdict]:
    p = parser(__doc__.splitlines()[0], device=True)
    p.add_argument("--rows", type=int, default=None, help=f"rows of {CONTEXT} tokens (default 2048: 262,144 tokens)")
    p.add_argument("--buffer-mib", type=int, default=None, help="sae_cache buffer_size_gb in MiB (default 64)")
    args = parse(p, argv)
    n_rows = args.rows or (128 if args.quick else 2048)
    reps = args.reps or (1 if args.quick else 3)
    buffer_mib = args.buffer_mib or (2 if args.quick else 64)
    data, runs = measure(n_rows, buffer_mib, reps, args.device)
    ratio = report(runs, data, n_rows, buffer_mib, reps)["transformers"]
    return [
        Verdict(
            "14.6 sae_cache / faster forward loop tokens/s, transformers model",
            f"{ratio:.3f}",
            f">= {TARGET}",
            None if args.quick else ratio >= TARGET,
        )
    ]


if __name__ == "__main__":
    entry(main, TASKS)
