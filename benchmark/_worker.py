"""One measured run per process: `python -m benchmark._worker TASK JSON` prints `RESULT {json}`.

Every task does its setup (model, dataset, synthetic buffers) untimed, then times one section with
`Timed` (wall seconds and the process's CPU seconds, all threads), and returns a dict. The wrapper
adds the process's peak RSS (VmHWM, which includes the setup), its RSS at the end and the load
average when it started. `_profile` (a path) writes a cProfile of the timed section (main thread only).
"""

from __future__ import annotations

import cProfile
import json
import os
import resource
import shutil
import sys
import time
from pathlib import Path

MiB = 1 << 20
D_MODEL = 256
HOOK = "blocks.1.hook_resid_post"


def proc_status() -> dict[str, float]:
    """VmHWM, VmRSS, RssAnon and RssFile of this process, in MiB."""
    out = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmHWM", "VmRSS", "RssAnon", "RssFile"):
            out[key] = int(value.split()[0]) / 1024
    return out


class Timed:
    """Times a section: wall seconds, CPU seconds (user + system, every thread), RSS when it started."""

    profile_path: str | None = None

    def __enter__(self) -> Timed:
        status = proc_status()
        self.base_mib, self.base_hwm_mib = status["VmRSS"], status["VmHWM"]
        self._profiler = cProfile.Profile() if Timed.profile_path else None
        self._ru = resource.getrusage(resource.RUSAGE_SELF)
        self._t = time.perf_counter()
        if self._profiler:
            self._profiler.enable()
        return self

    def __exit__(self, *exc) -> None:
        if self._profiler:
            self._profiler.disable()
            self._profiler.dump_stats(Timed.profile_path)
        self.seconds = time.perf_counter() - self._t
        ru = resource.getrusage(resource.RUSAGE_SELF)
        self.cpu_s = (ru.ru_utime - self._ru.ru_utime) + (ru.ru_stime - self._ru.ru_stime)

    def result(self, **extra) -> dict:
        return {
            "seconds": self.seconds,
            "cpu_s": self.cpu_s,
            "base_mib": self.base_mib,
            "base_hwm_mib": self.base_hwm_mib,
            **extra,
        }


# -- the model and the tokens -----------------------------------------------------------------------


def build_model(kind: str):
    """The demo model (4 layers, d_model 256), or a random HookedTransformer of the same shape."""
    import torch

    if kind == "demo":
        from sae_cache.demo import load_demo_model

        return load_demo_model(device="cpu")
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    from sae_cache.demo.tokenizer import train_bpe_tokenizer, wrap_tokenizer

    words = "the a sparse autoencoder learns features from cached activations of language models on disk".split()
    texts = [" ".join(words[(i * 7 + j) % len(words)] for j in range(40)) for i in range(200)]
    tokenizer = wrap_tokenizer(train_bpe_tokenizer(texts, vocab_size=4096))
    torch.manual_seed(0)
    cfg = HookedTransformerConfig(
        n_layers=4,
        d_model=256,
        n_heads=4,
        d_head=64,
        d_mlp=1024,
        n_ctx=256,
        d_vocab=4096,
        act_fn="gelu",
        normalization_type="LN",
        seed=0,
    )
    model = HookedTransformer(cfg, tokenizer=tokenizer, default_padding_side="right")
    return model.eval()


def warm_up(model, batch: int, context: int, hook: str = HOOK) -> None:
    """One untimed forward pass of a full batch: torch's first-call costs, and the pass's working memory in VmHWM.

    The RSS budget's "model" term is the peak RSS after this pass (weights + one forward pass's activations).
    """
    import torch

    with torch.no_grad():
        model(torch.zeros((batch, context), dtype=torch.long), stop_at_layer=int(hook.split(".")[1]) + 1)


def task_tokens(out: str, n_rows: int, context: int) -> dict:
    """Write a pretokenized dataset (`input_ids`, rows of `context`) of n_rows rows: the demo text, tiled."""
    import numpy as np
    import torch
    from datasets import Dataset

    try:
        from sae_cache.demo import load_demo_dataset
        from sae_cache.tokenization import pack_sequences

        model = build_model("demo")
        texts = list(load_demo_dataset()["text"])
        ids = model.tokenizer(texts, add_special_tokens=False)["input_ids"]
        bos = model.tokenizer.bos_token_id
        rows = list(
            pack_sequences(
                (np.asarray(i) for i in ids),
                context_size=context,
                bos_token_id=bos,
                separator_token_id=bos,
                disable_concat=False,
            )
        )
        base = torch.stack(rows).numpy()
        kind, source = "demo", f"demo text ({len(base):,} rows of {context} tokens, tiled)"
    except Exception as e:  # noqa: BLE001 - the demo assets are optional here
        print(f"demo model unavailable ({e!r}): using a random model and random tokens", file=sys.stderr)
        base = np.random.default_rng(0).integers(4, 4096, size=(4096, context))
        kind, source = "random", "random token ids"
    reps = -(-n_rows // len(base))
    arr = np.tile(base, (reps, 1))[:n_rows].astype(np.int32)
    with Timed() as t:
        Dataset.from_dict({"input_ids": arr.tolist()}).save_to_disk(out)
    return t.result(kind=kind, source=source, n_rows=n_rows, path=out)


def _load_rows(data: str):
    from datasets import load_from_disk

    return load_from_disk(data)


# -- (a) forward-only loop, sae_cache and SAELens end to end -----------------------------------------


def task_forward(data: str, kind: str, n_rows: int, batch: int, hook: str = HOOK, streams: int = 1) -> dict:
    """The bare loop: same batches, same hook, stop_at_layer, activations copied into a reused host buffer.

    streams > 1: that many threads each run every streams-th batch with torch's threads shared among them
    (what sae_cache's forward_threads does on a CPU), each copying into its own reused host buffer.
    """
    import threading

    import numpy as np
    import torch

    model = build_model(kind)
    tokens = torch.from_numpy(np.asarray(_load_rows(data)["input_ids"][:n_rows], dtype=np.int64))
    stop_at = int(hook.split(".")[1]) + 1
    local = threading.local()

    def save(act, hook):  # noqa: ARG001
        local.acts = act

    def loop(first: int) -> None:
        host = torch.empty((batch, tokens.shape[1], D_MODEL), dtype=torch.float32)
        with torch.no_grad():
            for i in range(first * batch, len(tokens), batch * streams):
                tokens_BL = tokens[i : i + batch]
                model(tokens_BL, stop_at_layer=stop_at)
                host[: len(tokens_BL)].copy_(local.acts)

    warm_up(model, batch, tokens.shape[1], hook)
    model.hook_dict[hook].add_hook(save)
    threads_before = torch.get_num_threads()
    if streams > 1:
        torch.set_num_threads(max(1, threads_before // streams))
    with Timed() as t:
        workers = [threading.Thread(target=loop, args=(k,)) for k in range(streams)]
        for w in workers:
            w.start()
        for w in workers:
            w.join()
    torch.set_num_threads(threads_before)
    model.reset_hooks()
    return t.result(tokens=int(tokens.numel()), streams=streams)


def _cache_info(out: Path, n_rows: int, context: int) -> dict:
    files = sorted(out.rglob("*.arrow"))
    disk = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    return {
        "tokens": n_rows * context,
        "disk_bytes": disk,
        "data_bytes": sum(p.stat().st_size for p in files),
        "n_files": len(files),
        "raw_act_bytes": n_rows * context * D_MODEL * 4,
    }


def _apply_ablations(ablate: list[str]) -> None:
    """Diagnostic variants of sae_cache (benchmark.breakdown): each removes one cost to measure it.

    inline_writer: ShardWriter(background=False), shards written on the caller's thread;
    no_fsync: Arrow data files are not fsynced (SAELens's save_to_disk does not fsync either);
    no_stats: the per-batch statistics (HookStats.per_unit) are replaced by zeros.
    """
    import functools

    import torch

    from sae_cache import arrow_format, runner, store

    for name in ablate:
        if name == "inline_writer":
            runner.ShardWriter = functools.partial(runner.ShardWriter, background=False)
        elif name == "no_fsync":
            arrow_format.fsync_path = lambda path: None
        elif name == "no_stats":
            store.HookStats.per_unit = staticmethod(
                lambda acts, stored: torch.zeros((acts.shape[0], 6), dtype=torch.float64)
            )
        else:
            raise ValueError(f"unknown ablation {name!r}")


def task_sae_cache(
    data: str,
    kind: str,
    out: str,
    training_tokens: int,
    buffer_size_gb: float,
    shuffle: bool,
    batch: int,
    context: int,
    hook: str = HOOK,
    keep: bool = False,
    ablate: list[str] = (),
    forward_threads: int | None = None,
) -> dict:
    """sae_cache's CacheActivationsRunner end to end (construction + run(), model built beforehand)."""
    from sae_cache import CacheActivationsRunner, CacheActivationsRunnerConfig

    _apply_ablations(list(ablate))
    model = build_model(kind)
    dataset = _load_rows(data)
    warm_up(model, batch, context, hook)
    cfg = CacheActivationsRunnerConfig(
        model_name="bench-model",
        hook_name=hook,
        d_in=D_MODEL,
        training_tokens=training_tokens,
        context_size=context,
        model_batch_size=batch,
        new_cached_activations_path=out,
        shuffle=shuffle,
        device="cpu",
        buffer_size_gb=buffer_size_gb,
        overwrite=True,
        forward_threads=forward_threads,
    )
    with Timed() as t:
        runner = CacheActivationsRunner(cfg, override_dataset=dataset, model=model)
        cached = runner.run()
    info = _cache_info(Path(out), len(cached), context)
    plan = runner.plan
    del cached
    if not keep:
        shutil.rmtree(out, ignore_errors=True)
    return t.result(
        **info,
        n_buffers=plan.n_buffers,
        rows_per_buffer=plan.rows_per_buffer,
        buffer_bytes=plan.rows_per_buffer * plan.bytes_per_row,
        forward_threads=runner._resolve().forward_threads,
    )


def task_saelens(
    data: str,
    kind: str,
    out: str,
    training_tokens: int,
    buffer_size_gb: float,
    batch: int,
    context: int,
    hook: str = HOOK,
) -> dict:
    """SAELens 6's CacheActivationsRunner on the same model (its load_model patched) and dataset."""
    import sae_lens.cache_activations_runner as saelens_runner
    from sae_lens.config import CacheActivationsRunnerConfig as SAELensConfig

    model = build_model(kind)
    dataset = _load_rows(data)
    warm_up(model, batch, context, hook)
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
        device="cpu",
        buffer_size_gb=buffer_size_gb,
        dtype="float32",
    )
    with Timed() as t:
        runner = saelens_runner.CacheActivationsRunner(cfg, override_dataset=dataset)
        cached = runner.run()
    info = _cache_info(Path(out), len(cached), context)
    del cached
    shutil.rmtree(out, ignore_errors=True)
    return t.result(**info, n_buffers=cfg.n_buffers, buffer_bytes=cfg.n_tokens_in_buffer * D_MODEL * 4)


class _Stage:
    """Accumulated wall and thread-CPU seconds of one instrumented function."""

    def __init__(self) -> None:
        self.wall = self.cpu = 0.0
        self.calls = 0

    def wrap(self, fn):
        import functools

        @functools.wraps(fn)
        def timed(*args, **kwargs):
            t, c = time.perf_counter(), time.thread_time()
            try:
                return fn(*args, **kwargs)
            finally:
                self.wall += time.perf_counter() - t
                self.cpu += time.thread_time() - c
                self.calls += 1

        return timed


class _RssSampler:
    """Samples RssAnon and RssFile every few milliseconds on a thread; keeps the peaks (VmHWM mixes the two)."""

    def __init__(self, interval_s: float = 0.005) -> None:
        import threading

        self.interval_s = interval_s
        self.start = proc_status()
        self.peak = dict(self.start)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            for key, value in proc_status().items():
                self.peak[key] = max(self.peak.get(key, 0.0), value)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def task_breakdown(
    data: str,
    kind: str,
    out: str,
    training_tokens: int,
    buffer_size_gb: float,
    batch: int,
    context: int,
    hook: str = HOOK,
) -> dict:
    """sae_cache end to end with its stages instrumented (wall and thread CPU per stage), shuffle=False."""
    import torch

    from sae_cache import CacheActivationsRunner, CacheActivationsRunnerConfig
    from sae_cache import runner as runner_module
    from sae_cache import store as store_module
    from sae_cache import writer as writer_module

    stages = {
        name: _Stage()
        for name in (
            "forward pass (capture)",
            "statistics (HookStats.per_unit)",
            "statistics (HookStats.add)",
            "overflow check",
            "copy into host buffer (_copy, incl. add)",
            "token rows (dataset iteration)",
            "wait for a free buffer (acquire)",
            "hand buffer to writer (submit)",
            "writer thread: write shard (_write)",
            "publish (stage + metadata + swap)",
            "load_from_disk at the end",
        )
    }
    patches = [
        (store_module.HookCapture, "__call__", stages["forward pass (capture)"]),
        (store_module.ActivationsStore, "_check_overflow", stages["overflow check"]),
        (store_module.ActivationsStore, "_copy", stages["copy into host buffer (_copy, incl. add)"]),
        (store_module.HookStats, "add", stages["statistics (HookStats.add)"]),
        (writer_module.ShardWriter, "acquire", stages["wait for a free buffer (acquire)"]),
        (writer_module.ShardWriter, "submit", stages["hand buffer to writer (submit)"]),
        (writer_module.ShardWriter, "_write", stages["writer thread: write shard (_write)"]),
        (runner_module.CacheActivationsRunner, "_publish", stages["publish (stage + metadata + swap)"]),
        (runner_module.datasets, "load_from_disk", stages["load_from_disk at the end"]),
    ]
    for owner, name, stage in patches:
        setattr(owner, name, stage.wrap(getattr(owner, name)))
    store_module.HookStats.per_unit = staticmethod(
        stages["statistics (HookStats.per_unit)"].wrap(store_module.HookStats.per_unit)
    )
    rows_stage = stages["token rows (dataset iteration)"]
    original_token_rows = runner_module.token_rows

    def timed_rows(*args, **kwargs):
        it = iter(original_token_rows(*args, **kwargs))
        while True:
            t, c = time.perf_counter(), time.thread_time()
            try:
                row = next(it)
            except StopIteration:
                return
            finally:
                rows_stage.wall += time.perf_counter() - t
                rows_stage.cpu += time.thread_time() - c
                rows_stage.calls += 1
            yield row

    runner_module.token_rows = timed_rows
    model = build_model(kind)
    dataset = _load_rows(data)
    warm_up(model, batch, context, hook)
    cfg = CacheActivationsRunnerConfig(
        model_name="bench-model",
        hook_name=hook,
        d_in=D_MODEL,
        training_tokens=training_tokens,
        context_size=context,
        model_batch_size=batch,
        new_cached_activations_path=out,
        shuffle=False,
        device="cpu",
        buffer_size_gb=buffer_size_gb,
        overwrite=True,
    )
    sampler = _RssSampler()
    main_cpu0 = time.thread_time()
    with Timed() as t, sampler:
        CacheActivationsRunner(cfg, override_dataset=dataset, model=model).run()
    main_cpu = time.thread_time() - main_cpu0
    shutil.rmtree(out, ignore_errors=True)
    return t.result(
        tokens=training_tokens // context * context,
        main_thread_cpu_s=main_cpu,
        stages={k: {"wall": v.wall, "cpu": v.cpu, "calls": v.calls} for k, v in stages.items()},
        torch_threads_used=torch.get_num_threads(),
        peak_anon_mib=sampler.peak["RssAnon"],
        peak_file_mib=sampler.peak["RssFile"],
        anon_at_start_mib=sampler.start["RssAnon"],
        file_at_start_mib=sampler.start["RssFile"],
    )


# -- (c) the writer alone ---------------------------------------------------------------------------


def _synthetic_columns(rows: int, context: int, seed: int = 0) -> dict:
    import numpy as np

    rng = np.random.default_rng(seed)
    acts = rng.standard_normal((rows, context, D_MODEL), dtype=np.float32)
    token_ids = rng.integers(0, 4096, size=(rows, context), dtype=np.int32)
    return {HOOK: acts, "token_ids": token_ids}


def task_write(mode: str, directory: str, buffer_mib: int, n_buffers: int, context: int) -> dict:
    """Write n_buffers synthetic buffers of buffer_mib MiB of activations (+ token ids) one file each."""
    import numpy as np
    import torch

    from sae_cache.arrow_format import cache_features, write_arrow_file
    from sae_cache.writer import Buffer, ShardWriter

    rows = buffer_mib * MiB // (context * D_MODEL * 4)
    columns = _synthetic_columns(rows, context)
    payload = sum(v.nbytes for v in columns.values())
    features = cache_features({HOOK: D_MODEL}, context, "float32")
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    with Timed() as t:
        if mode == "raw":
            for i in range(n_buffers):
                with open(out / f"raw_{i:05d}.bin", "wb") as f:
                    for v in columns.values():
                        f.write(memoryview(v).cast("B"))
                    f.flush()
                    os.fsync(f.fileno())
        elif mode == "arrow":
            for i in range(n_buffers):
                write_arrow_file(out / f"data-{i:05d}.arrow", features, columns)
        elif mode in (
            "shardwriter",
            "shardwriter_direct",
        ):  # each buffer in the runner's pieces (a quarter buffer, <= 64 MiB)
            tensors = {k: torch.from_numpy(v) for k, v in columns.items()}
            piece = max(1, min(-(-rows // 4), (64 * MiB) // (context * D_MODEL * 4)))
            with ShardWriter(out, features, direct_io=mode == "shardwriter_direct") as writer:
                for i in range(n_buffers):
                    for start in range(0, rows, piece):
                        part = {k: v[start : start + piece] for k, v in tensors.items()}
                        writer.submit(
                            Buffer(i, part, len(part["token_ids"]), first=start == 0, last=start + piece >= rows),
                            {"stats": {}},
                        )
        elif mode == "datasets":  # SAELens's path: Dataset.from_dict(tensors).save_to_disk (no fsync)
            from datasets import Dataset

            tensors = {k: torch.from_numpy(v) for k, v in columns.items()}
            for i in range(n_buffers):
                Dataset.from_dict(tensors, features=features).save_to_disk(str(out / f"shard_{i:05d}"), num_shards=1)
        else:
            raise ValueError(mode)
    files = [p for p in out.rglob("*") if p.is_file()]
    data_bytes = sum(p.stat().st_size for p in files if p.suffix in (".arrow", ".bin"))
    shutil.rmtree(out, ignore_errors=True)
    del columns
    return t.result(
        bytes=payload * n_buffers,
        act_bytes=rows * context * D_MODEL * 4 * n_buffers,
        data_bytes=data_bytes,
        rows=rows,
        np_version=np.__version__,
    )


# -- (f) the shuffle and (g) the reader: synthetic caches ------------------------------------------


def task_make_shards(directory: str, shard_mib: int, n_shards: int, context: int, as_cache: bool) -> dict:
    """n_shards Arrow files of shard_mib MiB of activations each (shards, or a cache with state.json)."""
    import numpy as np

    from sae_cache.arrow_format import cache_features, data_file_name, write_arrow_file, write_dataset_files

    rows = shard_mib * MiB // (context * D_MODEL * 4)
    columns = _synthetic_columns(rows, context)
    features = cache_features({HOOK: D_MODEL}, context, "float32")
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    names = []
    with Timed() as t:
        for i in range(n_shards):
            columns["token_ids"] = (np.arange(rows * context, dtype=np.int32) + i * rows * context).reshape(
                rows, context
            )
            name = data_file_name(i, n_shards) if as_cache else f"shard_{i:05d}.arrow"
            write_arrow_file(out / name, features, columns)
            names.append(name)
        if as_cache:
            write_dataset_files(out, features, names, fingerprint="benchmark")
    return t.result(
        files=[str(out / n) for n in names],
        rows_per_file=rows,
        n_rows=rows * n_shards,
        bytes=sum((out / n).stat().st_size for n in names),
    )


def task_shuffle(
    shards: list[str],
    out: str,
    scratch: str,
    rows_per_file: int,
    n_rows: int,
    context: int,
    across: bool = False,
    seed: int = 42,
    direct_io: bool = True,
) -> dict:
    """sae_cache.shuffle.shuffle_shards alone, with the runner's bucket size (a quarter of a buffer) and output writes."""
    from sae_cache.arrow_format import cache_features
    from sae_cache.shuffle import _bytes_per_row, shuffle_shards

    features = cache_features({HOOK: D_MODEL}, context, "float32")
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    bucket_bytes = rows_per_file * _bytes_per_row(features) // 4
    _warm(shards)
    with Timed() as t:
        names = shuffle_shards(
            [Path(s) for s in shards],
            features=features,
            seed=seed,
            across_sequences=across,
            rows_per_file=rows_per_file,
            n_rows=n_rows,
            scratch=Path(scratch),
            out_dir=out_dir,
            bucket_bytes=bucket_bytes,
            direct_io=direct_io,
        )
    written = sum((out_dir / n).stat().st_size for n in names)
    shutil.rmtree(out_dir, ignore_errors=True)
    shutil.rmtree(scratch, ignore_errors=True)
    return t.result(bytes=written, n_files=len(names), bucket_bytes=bucket_bytes)


def _warm(files: list[str]) -> None:
    """Read the files once (untimed), so that every run starts with them in the page cache (a shuffle
    drops the pages of shard bytes it has read; the next run must not pay for reading them from disk)."""
    chunk = bytearray(8 << 20)
    for name in files:
        with open(name, "rb", buffering=0) as f:
            while f.readinto(chunk):
                pass


def task_copy(shards: list[str], out: str) -> dict:
    """One plain copy of the files (shutil.copyfile + fsync each): the floor for any on-disk shuffle."""
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    _warm(shards)
    with Timed() as t:
        for s in shards:
            dst = out_dir / Path(s).name
            shutil.copyfile(s, dst)
            fd = os.open(dst, os.O_RDONLY)
            os.fsync(fd)
            os.close(fd)
    written = sum(p.stat().st_size for p in out_dir.iterdir())
    shutil.rmtree(out_dir, ignore_errors=True)
    return t.result(bytes=written)


def task_read(cache: str, mode: str, batch_tokens: int, n_tokens: int) -> dict:
    """Read a cache: raw bytes (readinto / np.fromfile) or CachedActivations.batches (file order / shuffled)."""
    import numpy as np
    import torch

    from sae_cache.reader import CachedActivations

    files = sorted(Path(cache).glob("data-*.arrow"))
    file_bytes = sum(p.stat().st_size for p in files)
    tokens = 0
    out = torch.empty((batch_tokens, D_MODEL), dtype=torch.float32)
    out_tokens = torch.empty((batch_tokens,), dtype=torch.int32)
    with Timed() as t:
        if mode == "raw_readinto":
            buf = bytearray(batch_tokens * D_MODEL * 4)
            view = memoryview(buf)
            for p in files:
                with open(p, "rb", buffering=0) as f:
                    while f.readinto(view):
                        pass
            tokens = n_tokens
        elif mode == "raw_fromfile":
            for p in files:
                np.fromfile(p, dtype=np.uint8)
            tokens = n_tokens
        else:
            reader = CachedActivations(cache)
            shuffle = mode == "reader_shuffled"
            dest, dest_tokens = out.numpy(), out_tokens.numpy()
            for acts, token_ids in reader.batches(batch_tokens, shuffle=shuffle, seed=0):
                if mode != "reader_view":  # a plain memcpy (torch's copy_ would add its thread pool to the figure)
                    np.copyto(dest, acts.numpy())
                    np.copyto(dest_tokens, token_ids.numpy())
                tokens += len(acts)
    return t.result(tokens=tokens, file_bytes=file_bytes, read_bytes=tokens * (D_MODEL * 4 + 4))


TASKS = {name[len("task_") :]: fn for name, fn in globals().items() if name.startswith("task_")}


def main() -> None:
    task, kwargs = sys.argv[1], json.loads(sys.argv[2])
    Timed.profile_path = kwargs.pop("_profile", None)
    import torch

    if os.environ.get("SAE_CACHE_BENCH_TORCH_THREADS"):
        torch.set_num_threads(int(os.environ["SAE_CACHE_BENCH_TORCH_THREADS"]))
    load = os.getloadavg()
    result = TASKS[task](**kwargs)
    status = proc_status()
    result.update(
        hwm_mib=status["VmHWM"],
        rss_end_mib=status["VmRSS"],
        rss_file_end_mib=status.get("RssFile", 0.0),
        load=load,
        task=task,
        torch_threads=torch.get_num_threads(),
    )
    print("RESULT " + json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
