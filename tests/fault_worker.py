"""Worker process for tests/test_fault_injection.py: runs caching jobs that SIGKILL themselves at a named point.

    python tests/fault_worker.py SPEC.json            # batch: one process imports once, forks one child per job
    python tests/fault_worker.py --inline JOB.json    # one job in this very process (it may die by SIGKILL)

The model, tokenizer and dataset are the ones of tests/conftest.py (build_tokenizer, build_model:
torch.manual_seed(0), HookedTransformerConfig(seed=0)), so every process caches the same bytes.

A job is a JSON object:
    name      the job's name
    cfg       every CacheActivationsRunnerConfig field to pass (the output path included)
    fault     null, or {"kind": ..., "n": ...}: where the process kills itself with SIGKILL (see FAULTS)
    patches   environment simulations that hold for the job, e.g. ["no-hardlinks"]
    copy      [[src, dst], ...] directories copied before the run (an old cache to overwrite)
    marker    file written (fsynced) just before the SIGKILL: which fault fired, and what it saw
    result    file written when the run returns or raises: {"ok", "rows", "error"}
    log       the child's stdout and stderr

A batch spec is {"report": path, "parallel": int, "timeout_s": float, "waves": [[job, ...], ...]}: the jobs
of a wave run in forked children, `parallel` at a time, and a wave starts when the previous one ended.
The report records, per job, how its process ended (the signal that killed it, or its exit code), plus a
digest of the model and data so the tests can check that every process worked on the same inputs.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import shutil
import signal
import sys
import time
import traceback
import warnings
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(Path(__file__).resolve().parent))
warnings.filterwarnings("ignore", category=DeprecationWarning)

import torch  # noqa: E402
from conftest import SHAPE_PROBE, build_model, build_tokenizer, make_texts  # noqa: E402
from datasets import Dataset  # noqa: E402

from sae_cache import (  # noqa: E402
    CacheActivationsRunner,
    CacheActivationsRunnerConfig,
    direct_io,
    publish,
    shuffle,
    shuffle_in_place,
    shuffle_io,
    writer,
)
from sae_cache import plan as plan_module  # noqa: E402
from sae_cache.metadata import METADATA_FILE  # noqa: E402
from sae_cache.publish import BACKUP_SUFFIX, WORK_SUFFIX  # noqa: E402

torch.set_num_threads(1)


# -- the inputs (as in tests/conftest.py) ----------------------------------------------------------


def build_inputs():
    model = build_model(build_tokenizer())
    dataset = Dataset.from_dict({"text": make_texts(400)})
    return model, dataset


def digest_of(model, dataset) -> str:
    h = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    h.update(json.dumps(model.tokenizer.get_vocab(), sort_keys=True).encode())
    h.update(json.dumps(dataset.to_dict()["text"]).encode())
    return h.hexdigest()


# -- dying ------------------------------------------------------------------------------------------


class _Job:
    marker: Path | None = None
    fault: dict = {}
    model = None  # the model the job caches from (faults may put torch hooks on it)


def die(detail: str, **seen) -> None:
    """Record where we are (fsynced), then SIGKILL this process: no finally, no atexit, no flush."""
    if _Job.marker is not None:
        payload = {"fault": _Job.fault, "detail": detail, **seen}
        with open(_Job.marker, "w") as f:
            json.dump(payload, f, indent=2, default=str)
            f.flush()
            os.fsync(f.fileno())
    os.kill(os.getpid(), signal.SIGKILL)
    time.sleep(60)  # not reached
    os._exit(99)


def listing(path: Path) -> list[str]:
    path = Path(path)
    return sorted(str(p.relative_to(path)) for p in path.rglob("*")) if path.exists() else []


# -- faults: each puts a torch hook on the model or patches one I/O function of sae_cache, in this process only --


def _forward(n):
    """During the n-th forward pass over data (counted from 1): its activations computed, never stored.

    A torch forward hook on the model: it runs when the model's forward returns, which it does after the
    deepest hook of a block (stop_at_layer), as with the hook of every scenario. The shape probe is not counted.
    """
    calls = [0]

    def after_pass(module, args, output):
        if tuple(args[0].shape) == SHAPE_PROBE:
            return
        calls[0] += 1
        if calls[0] == n:
            die(f"in forward pass {n}")

    _Job.model.register_forward_hook(after_pass)


def _shard_truncated(n):
    """Shard n's `.partial` file written, then cut to half its bytes (a write the kill interrupted)."""

    class TruncatedShard(writer.ArrowFileWriter):
        def close(self):
            super().close()
            if self.path.name == f"shard_{n:05d}.arrow.partial":
                size = os.path.getsize(self.path)
                os.truncate(self.path, size // 2)
                die(f"shard {n} half written ({size // 2} of {size} bytes)", shards=listing(self.path.parent))

    writer.ArrowFileWriter = TruncatedShard


def _shard_unmanifested(n):
    """Shard n's data file renamed into place, its manifest not yet written."""
    real = writer.write_json_atomic

    def write_json_atomic(path, payload):
        if Path(path).name == f"shard_{n:05d}.json":
            die(f"shard {n} data in place, manifest not written", shards=listing(Path(path).parent))
        return real(path, payload)

    writer.write_json_atomic = write_json_atomic


def _manifest_torn(n):
    """Shard n's manifest half written to its temporary file, never renamed."""
    real = writer.write_json_atomic

    def write_json_atomic(path, payload):
        path = Path(path)
        if path.name == f"shard_{n:05d}.json":
            text = json.dumps(payload)
            path.with_name(path.name + ".tmp").write_text(text[: len(text) // 2])
            die(f"manifest of shard {n} torn", shards=listing(path.parent))
        return real(path, payload)

    writer.write_json_atomic = write_json_atomic


def _scatter(n):
    """The n-th append to a shuffle bucket file half written."""
    calls = [0]
    real = shuffle._append

    def _append(path, values):
        calls[0] += 1
        if calls[0] == n:
            data = values.tobytes()
            with open(path, "ab") as f:
                f.write(data[: len(data) // 2])
            die(f"scatter: append {n} to {Path(path).name} half written", scratch=len(listing(Path(path).parent)))
        return real(path, values)

    shuffle._append = _append


def _gather(n):
    """After the n-th batch written to the shuffled data files (the current file unfinished)."""
    calls = [0]

    class KillingWriter(shuffle_io.ArrowFileWriter):
        def write(self, columns):
            super().write(columns)
            calls[0] += 1
            if calls[0] == n:
                die(
                    f"gather: write {n}, into {self.path.name} ({self.rows} rows so far)",
                    staging=listing(self.path.parent),
                )

    shuffle_io.ArrowFileWriter = KillingWriter


def _lay_out(n):
    """The shuffle written in place: after the n-th data file was laid out in staging (not yet fsynced)."""
    calls = [0]
    real = shuffle_in_place.lay_out_file

    def lay_out_file(features, batch_rows, fd=None):
        layout = real(features, batch_rows, fd)
        calls[0] += fd is not None  # the writer computes layouts too, without a file
        if fd is not None and calls[0] == n:
            die(f"lay-out: {n} data file(s) laid out", size=layout.size)
        return layout

    shuffle_in_place.lay_out_file = lay_out_file


def _place(n):
    """The shuffle written in place: the n-th positioned write (a row's column) half written."""
    calls = [0]
    real = direct_io.PositionedFiles.write

    def write(self, index, offset, data):
        calls[0] += 1
        if calls[0] == n:
            real(self, index, offset, data[: len(data) // 2])
            die(f"place: write {n} into file {index} at {offset} half written ({len(data) // 2} of {len(data)} bytes)")
        return real(self, index, offset, data)

    direct_io.PositionedFiles.write = write


def _stage_link(n):
    """After the n-th shard was given its name in the staged cache."""
    calls = [0]
    real = publish.link_or_copy

    def link_or_copy(src, dst):
        real(src, dst)
        calls[0] += 1
        if calls[0] == n:
            die(f"staging: {n} shard(s) linked", staging=listing(Path(dst).parent), shards=listing(Path(src).parent))

    publish.link_or_copy = link_or_copy


def _staging_metadata(_n):
    """The staged cache's datasets files written, its sae_cache.json not yet."""
    real = publish.write_json_atomic

    def write_json_atomic(path, payload):
        if Path(path).name == METADATA_FILE:
            die("staged cache without its metadata", staging=listing(Path(path).parent))
        return real(path, payload)

    publish.write_json_atomic = write_json_atomic


def _swap(step):
    """At the swap's fault point `step`: 'exchange' or 'cleanup' (the exchange), 'backup', 'install' or 'cleanup'
    (the backup-and-rename, with the "no-exchange" patch), 'install' (a first publish)."""

    def fault_point(name):
        if name == step:
            die(f"swap: before step {step!r}")

    publish.fault_point = fault_point


def _rmtree_partial(suffix, first):
    """While removing the directory named *suffix: `first` (a glob) already removed, the rest not."""
    real = shutil.rmtree

    def rmtree(path, *args, **kwargs):
        path = Path(path)
        if path.name.endswith(suffix):
            victims = sorted(path.glob(first))
            for victim in victims:
                real(victim) if victim.is_dir() else victim.unlink()
            die(f"removing {path.name}: {[str(v.relative_to(path)) for v in victims]} gone", left=listing(path))
        return real(path, *args, **kwargs)

    shutil.rmtree = rmtree


FAULTS = {
    "forward": _forward,
    "shard-truncated": _shard_truncated,
    "shard-unmanifested": _shard_unmanifested,
    "manifest-torn": _manifest_torn,
    "scatter": _scatter,
    "gather": _gather,
    "lay-out": _lay_out,
    "place": _place,
    "stage-link": _stage_link,
    "staging-metadata": _staging_metadata,
    "swap": _swap,
    "rmtree-backup": lambda _n: _rmtree_partial(BACKUP_SUFFIX, "data-00000-*.arrow"),
    "rmtree-work": lambda _n: _rmtree_partial(WORK_SUFFIX, "shards/shard_0000[01].*"),
    "rmtree-old": lambda _n: _rmtree_partial("staging", "data-00000-*.arrow"),  # the old cache, after an exchange
}


def _no_hardlinks() -> None:
    """A filesystem without hard links: consolidation falls back to renaming the shards."""

    def link(src, dst, *args, **kwargs):
        raise OSError(errno.EPERM, "hard links not supported (simulated)", str(src))

    os.link = link


def _in_place_shuffle() -> None:
    """Rows mode shuffles by writing each row in place although these rows are small."""
    plan_module.IN_PLACE_MIN_ROW_BYTES = 0


def _no_exchange() -> None:
    """A filesystem without RENAME_EXCHANGE (renameat2 answers EINVAL): the swap takes backup-and-rename."""

    def exchange(a, b):
        raise OSError(errno.EINVAL, "RENAME_EXCHANGE not supported (simulated)", str(a))

    publish.exchange = exchange


PATCHES = {
    "no-hardlinks": _no_hardlinks,
    "in-place-shuffle": _in_place_shuffle,
    "no-exchange": _no_exchange,
}


# -- running jobs -----------------------------------------------------------------------------------


def run_job(job: dict, model, dataset) -> None:
    logging.basicConfig(level=logging.INFO, format="%(name)s %(levelname)s %(message)s", force=True)
    for src, dst in job.get("copy", []):
        shutil.copytree(src, dst)
    for name in job.get("patches", []):
        PATCHES[name]()
    fault = job.get("fault")
    _Job.marker = Path(job["marker"]) if job.get("marker") else None
    _Job.model = model
    if fault:
        _Job.fault = fault
        FAULTS[fault["kind"]](fault.get("n"))
    result: dict = {"ok": False}
    started = time.perf_counter()
    try:
        cfg = CacheActivationsRunnerConfig(**job["cfg"])
        ds = CacheActivationsRunner(cfg, override_dataset=dataset, model=model).run()
        result = {"ok": True, "rows": len(ds)}
        del ds
    except Exception as e:  # noqa: BLE001 - reported to the test
        traceback.print_exc()
        result = {"ok": False, "error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()}
    result["elapsed_s"] = round(time.perf_counter() - started, 3)
    if job.get("result"):
        Path(job["result"]).write_text(json.dumps(result, indent=2))


def _fork_job(job: dict, model, dataset) -> int:
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid:
        return pid
    code = 1
    try:
        fd = os.open(job["log"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.dup2(fd, 1)
        os.dup2(fd, 2)
        run_job(job, model, dataset)
        code = 0
    except BaseException:  # noqa: BLE001 - the child must never return into the parent's loop
        traceback.print_exc()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def _ended(status: int) -> dict:
    if os.WIFSIGNALED(status):
        return {"signal": os.WTERMSIG(status), "exit": None}
    return {"signal": None, "exit": os.WEXITSTATUS(status)}


def run_batch(spec: dict) -> dict:
    model, dataset = build_inputs()
    report: dict = {"digest": digest_of(model, dataset), "jobs": {}}
    parallel, timeout_s = spec.get("parallel", 2), spec.get("timeout_s", 120)
    for wave in spec["waves"]:
        todo, running = list(wave), {}
        while todo or running:
            while todo and len(running) < parallel:
                job = todo.pop(0)
                running[_fork_job(job, model, dataset)] = (job, time.monotonic())
            pid, status = os.waitpid(-1, os.WNOHANG)
            if pid == 0:
                for child, (job, started) in running.items():
                    if time.monotonic() - started > timeout_s:
                        os.kill(child, signal.SIGKILL)  # ours: reported as timed out
                        report["jobs"][job["name"]] = {"timed_out": True}
                time.sleep(0.02)
                continue
            job, started = running.pop(pid)
            entry = report["jobs"].setdefault(job["name"], {})
            entry.update(_ended(status), elapsed_s=round(time.monotonic() - started, 3))
    return report


def main(argv: list[str]) -> int:
    if argv[1:2] == ["--inline"]:
        job = json.loads(Path(argv[2]).read_text())
        model, dataset = build_inputs()
        if job.get("digest_file"):
            Path(job["digest_file"]).write_text(digest_of(model, dataset))
        run_job(job, model, dataset)
        return 0
    spec = json.loads(Path(argv[1]).read_text())
    report = run_batch(spec)
    Path(spec["report"]).write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
