"""sae_cache on one GPU against its bound: min(bare forward pass, disk bandwidth / stored bytes per token).

    python -m benchmark.gpu [--quick] [--device cuda] [--tokens N] [--model-dtype float32,bfloat16] [--dir DIR]

One run prints, side by side (issues 14, 15 and 16): the disk's write rate with O_DIRECT from an aligned buffer
(and through the page cache with fsync, for reference); per model kind (TransformerLens, and transformers loaded by
path as `AutoModelForCausalLM` with SDPA attention) and model dtype, the bare forward pass on the device (the
activations stay there), the plain loop that copies each batch's activations to the host with `.cpu()`, and
sae_cache end to end with shuffle=False, shuffle=True (rows: written in place) and across sequences, each in
float32 and float16 storage, plus, for the bfloat16 model, bfloat16 and int8 storage with shuffle=False and
True (do tokens/s rise as the bytes per token fall where the disk is the limit?), with every ratio against
its own bound; the write path alone, fed by a synthetic producer on the device (no model: one random float16
batch recorded as the hook), shuffle=False and True (and True through the page cache, direct_io=False); a
torch.profiler trace of sae_cache showing whether consecutive forward passes run back to back (the gaps between
the kernels of the compute stream); and the targets as verdict rows.

Defaults: GPT-2-small shape with random weights (12 layers, d_model 768, vocabulary 50,257), context 1024,
batch 32, the output of block 6 as the hook (TransformerLens `blocks.6.hook_resid_post`, transformers
`transformer.h.6`: the pass stops after block 6), 2M tokens per run, random token ids in a `save_to_disk`
dataset, model dtype bfloat16: 24 runs of 2M tokens, about 3-4 minutes on an H200 (from the rates measured
there: 0.6M tokens/s for TransformerLens, 2.1M for transformers, the disk's 1.66 GB/s for float32 storage and
across sequences; about 1 s of set-up per sae_cache run). `--model-dtype float32,bfloat16` adds the float32
model's 16 runs (about 3 minutes more: TransformerLens runs 0.22M tokens/s in float32). `--quick`: a model small
enough for a CPU (still 8 layers, int8 rows of over 16 KiB so that shuffle=True is written in place in every
storage), every table and row, in well under a minute. Scratch files (the data, the transformers checkpoint,
the caches) go to --dir (default: a temporary directory under the current one, i.e. the disk being measured),
removed at the end.

Self-contained: torch, transformer_lens, transformers, tokenizers, datasets, numpy and sae_cache only (the GPU
machine installs the wheels it lacks as /work/shared/gpu/README.md says).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import mmap
import os
import shutil
import statistics
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from sae_cache.model import ModelAdapter
from sae_cache.plan import row_bytes

HOOKS = {  # per model kind: block 6's output, the residual stream after block 6 (the pass stops there)
    "TransformerLens": "blocks.6.hook_resid_post",
    "transformers": "transformer.h.6",
}
HOOK = HOOKS["TransformerLens"]  # the synthetic producer's hook
MODES = {  # sae_cache runs: name -> config fields
    "shuffle=False": dict(shuffle=False),
    "shuffle=True (rows)": dict(shuffle=True),
    "across sequences": dict(shuffle=True, shuffle_across_sequences=True),
}
TARGETS = {"shuffle=False": 0.9, "shuffle=True (rows)": 0.8, "across sequences": 0.45}  # x the bound
STORAGE_RUNS = {  # storage dtype -> the sae_cache modes run in it, for every model
    "float32": list(MODES),
    "float16": list(MODES),
}
COMPACT_RUNS = {  # ... and for the COMPACT_MODEL_DTYPE model only: the compact formats (issue 16)
    "bfloat16": ["shuffle=False", "shuffle=True (rows)"],
    "int8": ["shuffle=False", "shuffle=True (rows)"],
}
COMPACT_MODEL_DTYPE = "bfloat16"
WRITE_PATH_TARGET = 2_000_000  # tokens/s of a 768-wide float16 hook, or the disk's bound if lower
WRITE_PATH_RUNS = {  # the write path alone: name -> config fields
    "shuffle=False": MODES["shuffle=False"],
    "shuffle=True (rows)": MODES["shuffle=True (rows)"],
    "shuffle=True (rows), direct_io=False": dict(MODES["shuffle=True (rows)"], direct_io=False),
}


@dataclass(frozen=True)
class Shape:
    """The model and batch shape of a run."""

    n_layers: int
    d_model: int
    n_heads: int
    d_vocab: int
    context: int
    batch: int


@dataclass
class Bench:
    """What every measurement of one run shares."""

    args: argparse.Namespace
    shape: Shape
    scratch: Path
    data: Path
    disk: dict  # GB/s by way of writing (None: refused)
    verdicts: list = field(default_factory=list)

    @property
    def out(self) -> Path:
        return self.scratch / "cache"

    def bound(self, bare: dict | None, storage: str) -> float | None:
        """min(bare forward tokens/s, disk O_DIRECT bytes/s / stored bytes per token)."""
        direct = self.disk.get("O_DIRECT")
        per_token = stored_bytes_per_token(self.shape, storage)
        limits = [bare and bare["tokens/s"], direct and direct * 1e9 / per_token]
        return min((x for x in limits if x), default=None)


FULL = Shape(n_layers=12, d_model=768, n_heads=12, d_vocab=50257, context=1024, batch=32)
QUICK = Shape(n_layers=8, d_model=128, n_heads=4, d_vocab=1000, context=128, batch=4)


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    shape = QUICK if args.quick else FULL
    started = time.perf_counter()
    scratch = Path(tempfile.mkdtemp(prefix="sae_cache-gpu-bench-", dir=args.dir))
    try:
        print_header(args, shape)
        data = make_data(scratch / "data", args.tokens // shape.context + shape.batch, shape)
        bench = Bench(args, shape, scratch, data, measure_disk(scratch, args.disk_gb))
        rows = []
        for dtype in args.model_dtype:
            for kind, build in KINDS.items():
                rows += measure_kind(bench, kind, build, dtype)
        print_table("throughput against the bound", THROUGHPUT_COLUMNS, rows)
        measure_write_path(bench)
        measure_gaps(bench)
        print_table("verdicts", ["item", "measured", "target", "verdict"], bench.verdicts)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    print(f"\ntotal: {time.perf_counter() - started:.0f} s")
    return 0


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="a tiny model and run (CPU-sized), to check the script")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--tokens", type=int, default=None, help="tokens per run (default 2,000,000; --quick 4,096)")
    p.add_argument(
        "--model-dtype", default="bfloat16", help="comma-separated, e.g. float32,bfloat16 (default bfloat16)"
    )
    p.add_argument("--disk-gb", type=float, default=None, help="GB written to measure the disk (default 4)")
    p.add_argument("--dir", default=".", help="where scratch files go (the disk measured); default: here")
    args = p.parse_args(argv)
    args.tokens = args.tokens or (4096 if args.quick else 2_000_000)
    args.model_dtype = args.model_dtype.split(",")
    args.disk_gb = args.disk_gb or (0.05 if args.quick else 4.0)
    if args.quick and args.device == "cpu":
        torch.set_num_threads(1)  # tiny matmuls on a shared CPU: more threads only contend
    return args


# -- the models --------------------------------------------------------------------------------------------


def transformer_lens_model(shape: Shape, dtype: str, device: str, scratch: Path | None = None):
    """TransformerLens HookedTransformer of the shape, random weights (no Hub), as sae_cache's adapter."""
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    from sae_cache.adapters import adapt

    torch.manual_seed(0)
    cfg = HookedTransformerConfig(
        n_layers=shape.n_layers,
        d_model=shape.d_model,
        n_heads=shape.n_heads,
        d_head=shape.d_model // shape.n_heads,
        d_mlp=4 * shape.d_model,
        n_ctx=shape.context,
        d_vocab=shape.d_vocab,
        act_fn="gelu_new",
        normalization_type="LN",
        dtype=getattr(torch, dtype),
        device=device,
        seed=0,
    )
    return adapt(HookedTransformer(cfg).eval())


def transformers_model(shape: Shape, dtype: str, device: str, scratch: Path):
    """transformers GPT-2 of the same shape (GPT-2's gelu_new, LayerNorm, MLP 4 x d_model), random weights saved
    with save_pretrained under `scratch` (no Hub) and loaded by path, as a user's checkpoint, through
    `sae_cache.adapters.load_model(path, model_class_name="AutoModelForCausalLM", ...)` in `dtype` with SDPA
    attention. Its hook `transformer.h.6` (HOOKS) is block 6's output: what TransformerLens's
    blocks.6.hook_resid_post holds (tests/test_gpu_benchmark.py checks it with the same weights)."""
    from sae_cache.adapters import load_model

    path = save_transformers_model(shape, scratch / "transformers-gpt2")
    kwargs = {"torch_dtype": getattr(torch, dtype), "attn_implementation": "sdpa"}
    return load_model(str(path), model_class_name="AutoModelForCausalLM", device=device, from_pretrained_kwargs=kwargs)


def save_transformers_model(shape: Shape, directory: Path, activation: str = "gelu_new") -> Path:
    """A random-weight GPT2LMHeadModel of the shape (float32; MLP 4 x d_model, `activation`) and a tokenizer covering
    its vocabulary, saved to `directory` once (a second call finds them there)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    if (directory / "config.json").is_file():
        return directory
    end = shape.d_vocab - 1  # GPT-2's <|endoftext|>, its BOS and EOS, is its last id
    config = GPT2Config(
        n_layer=shape.n_layers,
        n_embd=shape.d_model,
        n_head=shape.n_heads,
        vocab_size=shape.d_vocab,
        n_positions=shape.context,
        activation_function=activation,
        bos_token_id=end,
        eos_token_id=end,
    )
    torch.manual_seed(0)
    GPT2LMHeadModel(config).save_pretrained(directory)
    word_tokenizer(shape.d_vocab).save_pretrained(directory)
    return directory


def word_tokenizer(d_vocab: int):
    """A tokenizer of d_vocab made-up words (`t0` ...), id i for word `ti`: loading by path needs a tokenizer, and
    sae_cache checks pretokenized ids against its vocabulary, so it covers the model's (the data never uses it)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = Tokenizer(models.WordLevel({f"t{i}": i for i in range(d_vocab)}, unk_token="t0"))
    words.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    end = f"t{d_vocab - 1}"
    return PreTrainedTokenizerFast(tokenizer_object=words, bos_token=end, eos_token=end)


KINDS = {"TransformerLens": transformer_lens_model, "transformers": transformers_model}


class SyntheticProducer(ModelAdapter):
    """Stands in for a model: every forward pass records one random float16 tensor, already on the device, as the
    hook. A ModelAdapter (what the runner takes instead of a model), so the runner's whole write path runs (data,
    store, statistics, copies, writer, publishing) with no model compute."""

    kind = "synthetic"

    def __init__(self, shape: Shape, device: str) -> None:
        super().__init__(torch.nn.Module())  # no parameters, nothing to hook: the adapter records by itself
        self.shape = shape
        generator = torch.Generator(device).manual_seed(0)
        size = (shape.batch, shape.context, shape.d_model)
        self.acts = torch.randn(size, generator=generator, device=device).to(torch.float16)
        self._record = None

    @property
    def device(self) -> torch.device:
        return self.acts.device

    @property
    def n_ctx(self) -> int:
        return self.shape.context

    def hook_names(self) -> list[str]:
        return [HOOK]

    def check_hooks(self, names: list[str]) -> None:
        if names != [HOOK]:
            raise ValueError(f"the synthetic producer has one hook, {HOOK}")

    @contextlib.contextmanager
    def install(self, names, record):
        self._record = record
        try:
            yield
        finally:
            self._record = None

    def stops_by_itself(self, names) -> bool:
        return True

    def forward(self, tokens_BL, names, kwargs) -> None:
        self._record(HOOK, self.acts[: tokens_BL.shape[0], : tokens_BL.shape[1]])


# -- the data and the disk ---------------------------------------------------------------------------------


def make_data(path: Path, n_rows: int, shape: Shape) -> Path:
    """n_rows rows of random token ids (an `input_ids` column) saved with `save_to_disk`."""
    import datasets

    rng = np.random.default_rng(0)
    ids = rng.integers(0, shape.d_vocab, (n_rows, shape.context), dtype=np.int32)
    datasets.Dataset.from_dict({"input_ids": list(ids)}).save_to_disk(str(path))
    return path


def measure_disk(scratch: Path, gb: float) -> dict:
    """The disk's sequential write rate, GB/s: O_DIRECT from a page-aligned buffer, and buffered + fsync."""
    rates = {"O_DIRECT": _write_rate(scratch / "disk.bin", gb, direct=True)}
    rates["page cache + fsync"] = _write_rate(scratch / "disk.bin", gb, direct=False)
    rows = [[name, f"{gb:g}", "n/a (refused)" if rate is None else f"{rate:.2f}"] for name, rate in rates.items()]
    print_table("the disk (scratch directory)", ["write", "GB", "GB/s"], rows)
    return rates


def _write_rate(path: Path, gb: float, *, direct: bool) -> float | None:
    block = mmap.mmap(-1, 8 << 20)  # anonymous: page-aligned, as O_DIRECT needs
    block.write(np.random.default_rng(1).integers(0, 256, len(block), dtype=np.uint8).tobytes())
    flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | (getattr(os, "O_DIRECT", 0) if direct else 0)
    try:
        fd = os.open(path, flags, 0o644)
    except OSError:
        return None
    n_blocks = max(1, int(gb * 1e9) // len(block))
    try:
        started = time.perf_counter()
        for _ in range(n_blocks):
            os.write(fd, block)
        os.fsync(fd)
        seconds = time.perf_counter() - started
    except OSError:
        return None
    finally:
        os.close(fd)
        path.unlink(missing_ok=True)
    return n_blocks * len(block) / seconds / 1e9


# -- measurements --------------------------------------------------------------------------------------------

THROUGHPUT_COLUMNS = [
    "model",
    "run",
    "storage",
    "bytes/token",
    "tokens",
    "seconds",
    "tokens/s",
    "vs bare forward",
    "bound tokens/s",
    "vs bound",
]


def storage_runs(model_dtype: str) -> list[tuple[str, str]]:
    """(storage, mode) of every sae_cache run of a model in `model_dtype`: float32 and float16 storage in every mode,
    and for the COMPACT_MODEL_DTYPE model the compact formats too."""
    runs = {**STORAGE_RUNS, **(COMPACT_RUNS if model_dtype == COMPACT_MODEL_DTYPE else {})}
    return [(storage, mode) for storage, modes in runs.items() for mode in modes]


def measure_kind(bench: Bench, kind: str, build, dtype: str) -> list[list]:
    """The rows of one model kind in one model dtype: bare forward, copy loop, sae_cache in every mode and storage."""
    args, shape, label, hook = bench.args, bench.shape, f"{kind} {dtype}", HOOKS[kind]
    adapter = _attempt(label, lambda: build(shape, dtype, args.device, bench.scratch))
    if adapter is None:
        return [[label, "model not built", *["error"] * 8]]
    tokens = _token_tensor(bench.data, args.tokens // shape.context)
    bare = _attempt(f"{label} bare forward", lambda: forward_loop(adapter, tokens, shape.batch, hook, copy=False))
    copied = _attempt(f"{label} copy loop", lambda: forward_loop(adapter, tokens, shape.batch, hook, copy=True))
    rows = [_row(label, "bare forward on the device", "-", bare, bare, None)]
    rows.append(_row(label, "forward + .cpu() each batch", "-", copied, bare, None))
    for storage, mode in storage_runs(dtype):
        rows.append(measure_sae_cache(bench, label, adapter, hook, storage, mode, bare))
    return rows


def measure_sae_cache(bench: Bench, label: str, adapter, hook: str, storage: str, mode: str, bare) -> list:
    """One sae_cache run's row, against its bound (its storage's bytes per token); its verdict goes to bench."""
    bound = bench.bound(bare, storage)
    run = lambda: sae_cache_run(adapter, bench, bench.args.tokens, hook=hook, dtype=storage, **MODES[mode])  # noqa: E731
    result = _attempt(f"{label} {mode} {storage}", run)
    ratio = None if result is None or bound is None else result["tokens/s"] / bound
    bench.verdicts.append(_verdict(f"{label}, {mode}, {storage} storage / bound", ratio, TARGETS[mode]))
    return _row(label, f"sae_cache {mode}", storage, result, bare, bound, stored_bytes_per_token(bench.shape, storage))


def _token_tensor(data: Path, n_rows: int) -> torch.Tensor:
    import datasets

    return torch.tensor(np.stack(datasets.load_from_disk(str(data))["input_ids"][:n_rows]), dtype=torch.long)


def forward_loop(adapter, tokens: torch.Tensor, batch: int, hook: str, *, copy: bool) -> dict:
    """Every batch through the model up to the hook (sae_cache's own capture); copy=True: `.cpu()` each batch."""
    device = adapter.device
    tokens = tokens.to(device)
    with torch.no_grad(), adapter.capture([hook]) as capture:
        for start in range(0, 2 * batch, batch):  # warm-up
            capture(tokens[start : start + batch])
        _sync(device)
        started = time.perf_counter()
        for start in range(0, len(tokens), batch):
            acts = capture(tokens[start : start + batch])[hook]
            if copy:
                acts.cpu()
        _sync(device)
    return _result(tokens.numel(), time.perf_counter() - started)


def sae_cache_run(
    adapter,
    bench: Bench,
    n_tokens: int,
    hook: str = HOOK,
    around: contextlib.AbstractContextManager | None = None,
    **fields,
) -> dict:
    """CacheActivationsRunner end to end (model passed in, dataset from disk); the cache is removed after. `around`
    (a profiler) wraps the timed run alone."""
    from sae_cache import CacheActivationsRunner, CacheActivationsRunnerConfig

    out = bench.out
    cfg = CacheActivationsRunnerConfig(
        model_name="benchmark",
        dataset_path=str(bench.data),
        hook_name=hook,
        context_size=bench.shape.context,
        model_batch_size=bench.shape.batch,
        training_tokens=n_tokens,
        new_cached_activations_path=str(out),
        device=str(adapter.device),
        overwrite=True,
        **fields,
    )
    try:
        runner = CacheActivationsRunner(cfg, model=adapter)
        runner.plan  # noqa: B018 - resolved (hook widths, data) before the clock starts, as a user's script would
        started = time.perf_counter()
        with around or contextlib.nullcontext():
            runner.run()
        seconds = time.perf_counter() - started
        result = _result(runner.plan.n_tokens, seconds)
        result["in place"] = runner.plan.shuffle_in_place
        return result
    finally:
        shutil.rmtree(out, ignore_errors=True)


def measure_write_path(bench: Bench) -> None:
    """sae_cache's write path alone: a synthetic producer on the device, float16 storage."""
    producer = _attempt("synthetic producer", lambda: SyntheticProducer(bench.shape, bench.args.device))
    bytes_per_token = stored_bytes_per_token(bench.shape, "float16")
    disk_bound = bench.bound(None, "float16")
    target = min(WRITE_PATH_TARGET, 0.9 * disk_bound) if disk_bound else WRITE_PATH_TARGET
    rows = []
    for mode, fields in WRITE_PATH_RUNS.items():
        result = None
        if producer is not None:
            run = lambda fields=fields: sae_cache_run(producer, bench, bench.args.tokens, dtype="float16", **fields)  # noqa: E731
            result = _attempt(f"write path {mode}", run)
        rate = None if result is None else result["tokens/s"]
        gb_s = None if rate is None else rate * bytes_per_token / 1e9
        vs_disk = None if rate is None or not disk_bound else rate / disk_bound
        name = f"write path alone, {mode}" + (" (in place)" if result and result["in place"] else "")
        rows.append([name, _fmt(rate, ",.0f"), _fmt(gb_s, ".2f"), _fmt(disk_bound, ",.0f"), _fmt(vs_disk, ".2f")])
        bench.verdicts.append(_verdict(f"write path alone, {mode} (tokens/s)", rate, target, ",.0f"))
    columns = [
        f"run (float16, width {bench.shape.d_model})",
        "tokens/s",
        "GB/s",
        "disk bound tokens/s",
        "vs disk bound",
    ]
    print_table("the write path alone (synthetic producer on the device, no model)", columns, rows)


def measure_gaps(bench: Bench) -> None:
    """torch.profiler over a short sae_cache run: do consecutive forward passes run back to back on the GPU?"""
    args, dtype = bench.args, bench.args.model_dtype[-1]
    label = f"TransformerLens {dtype}, float16 storage, {', '.join(f'{k}={v}' for k, v in PROFILED_MODE.items())}"
    if not args.device.startswith("cuda"):
        print_table("profile: gaps between kernels", GAP_COLUMNS, [[label, *["n/a (no CUDA device)"] * 5]])
        return
    adapter = _attempt("profiled model", lambda: transformer_lens_model(bench.shape, dtype, args.device))
    gaps = None if adapter is None else _attempt("profile", lambda: profile_gaps(adapter, bench))
    row = [label, *(["error"] * 5 if gaps is None else gaps)]
    print_table("profile: gaps between kernels of the compute stream", GAP_COLUMNS, [row])
    if gaps is not None:
        busy = float(gaps[1])
        bench.verdicts.append(_verdict("profile: compute stream busy (forward passes back to back)", busy, 0.9))


PROFILED_MODE = MODES["shuffle=False"]
GAP_COLUMNS = ["run", "kernels", "compute stream busy", "median gap us", "gaps > 100 us", "largest gap us"]


def profile_gaps(adapter, bench: Bench) -> list:
    """torch.profiler's trace of 24 batches of sae_cache, read by kernel_gaps."""
    from torch.profiler import ProfilerActivity, profile

    shape = bench.shape
    prof = profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA])  # the run only: not the shape probe
    sae_cache_run(adapter, bench, 24 * shape.batch * shape.context, around=prof, dtype="float16", **PROFILED_MODE)
    trace = bench.scratch / "trace.json"
    prof.export_chrome_trace(str(trace))
    events = json.loads(trace.read_text())["traceEvents"]
    trace.unlink()
    return kernel_gaps(events)


def kernel_gaps(events: list[dict]) -> list:
    """From a Chrome trace's events: the kernels of the busiest stream (the compute stream), the part of their
    window they fill, and the gaps between consecutive ones (microseconds): median, how many over 100, largest."""
    streams: dict = {}
    for event in events:
        if event.get("cat") == "kernel":
            start, length = float(event["ts"]), float(event["dur"])
            streams.setdefault(event.get("args", {}).get("stream"), []).append((start, length))
    compute = sorted(max(streams.values(), key=len))
    gaps = [b[0] - (a[0] + a[1]) for a, b in zip(compute, compute[1:])] or [0.0]
    busy = sum(d for _, d in compute) / (compute[-1][0] + compute[-1][1] - compute[0][0])
    return [
        len(compute),
        f"{busy:.3f}",
        f"{statistics.median(gaps):.1f}",
        sum(g > 100 for g in gaps),
        f"{max(gaps):.0f}",
    ]


# -- helpers -------------------------------------------------------------------------------------------------


def stored_bytes_per_token(shape: Shape, storage: str) -> float:
    """Bytes on disk per token in the storage format: activations (and int8's scales), the int32 token id, the
    Array2D offsets (sae_cache's plan)."""
    return row_bytes({HOOK: shape.d_model}, shape.context, storage)[1] / shape.context


def _result(n_tokens: int, seconds: float) -> dict:
    return {"tokens": n_tokens, "seconds": seconds, "tokens/s": n_tokens / seconds}


def _row(
    model: str, run: str, storage: str, result, bare: dict | None, bound: float | None, per_token: float | None = None
) -> list:
    if result is None:
        return [model, run, storage, *["error"] * 7]
    rate = result["tokens/s"]
    return [
        model,
        run + (" (in place)" if result.get("in place") else ""),
        storage,
        _fmt(per_token, ",.0f"),
        f"{result['tokens']:,}",
        f"{result['seconds']:.2f}",
        f"{rate:,.0f}",
        _fmt(rate / bare["tokens/s"] if bare else None, ".2f"),
        _fmt(bound, ",.0f"),
        _fmt(rate / bound if bound else None, ".2f"),
    ]


def _verdict(item: str, measured: float | None, target: float, spec: str = ".2f") -> list:
    if measured is None:
        return [item, "error", f">= {target:{spec}}", "not measured"]
    return [item, f"{measured:{spec}}", f">= {target:{spec}}", "met" if measured >= target else "**not met**"]


def _fmt(x: float | None, spec: str) -> str:
    return "-" if x is None else f"{x:{spec}}"


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _attempt(what: str, fn):
    """fn(), or None after printing its error (the other measurements still run)."""
    try:
        return fn()
    except Exception:  # noqa: BLE001 - reported, then the table says "error"
        print(f"\n[{what} failed]\n{traceback.format_exc()}", file=sys.stderr)
        return None


def print_header(args: argparse.Namespace, shape: Shape) -> None:
    device = args.device
    name = torch.cuda.get_device_name(device) if device.startswith("cuda") else "CPU"
    print(f"## sae_cache on {name}: `python -m benchmark.gpu {' '.join(sys.argv[1:])}`\n")
    when = time.strftime("%Y-%m-%d %H:%M:%S")
    print(f"_{when}; torch {torch.__version__}; {os.cpu_count()} CPUs; scratch in {Path(args.dir).resolve()}_  ")
    hooks = ", ".join(f"{kind} {hook}" for kind, hook in HOOKS.items())
    print(
        f"_model: {shape.n_layers} layers, d_model {shape.d_model}, vocabulary {shape.d_vocab}, random weights; "
        f"context {shape.context}, batch {shape.batch}, hook: block 6's output ({hooks}); {args.tokens:,} tokens "
        "per run; bound = min(bare forward, disk O_DIRECT GB/s / the storage's stored bytes per token)_"
    )


def print_table(title: str, columns: list[str], rows: list[list]) -> None:
    print(f"\n### {title}\n")
    print("| " + " | ".join(columns) + " |")
    print("|" + "|".join("---" for _ in columns) + "|")
    for row in rows:
        print("| " + " | ".join(str(c) for c in row) + " |")
    sys.stdout.flush()


if __name__ == "__main__":
    sys.exit(main())
