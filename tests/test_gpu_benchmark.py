"""benchmark/gpu.py runs first time on a GPU: its tiny CPU run prints every row of every table, with numbers.

The GPU-only part (the profile of the compute stream) is checked on a synthetic Chrome trace.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # benchmark/ is not installed with the package

from benchmark.gpu import kernel_gaps  # noqa: E402

NUMBER = re.compile(r"^[\d,]+(\.\d+)?$")
MODEL = "TransformerLens float32"
EXPECTED = {  # first cell(s) of a row -> how many numeric cells it must have
    ("O_DIRECT",): 2,
    ("page cache + fsync",): 2,
    (MODEL, "bare forward on the device"): 4,
    (MODEL, "forward + .cpu() each batch"): 4,
    **{
        (MODEL, f"sae_cache {mode}", storage): 6
        for mode in ("shuffle=False", "across sequences")
        for storage in ("float32", "float16")
    },
    **{(MODEL, "sae_cache shuffle=True (rows) (in place)", storage): 6 for storage in ("float32", "float16")},
    ("write path alone, shuffle=False",): 4,
    ("write path alone, shuffle=True (rows) (in place)",): 4,
    ("write path alone, shuffle=True (rows), direct_io=False (in place)",): 4,
    **{
        (f"{MODEL}, {mode}, {storage} storage / bound",): 1
        for mode in ("shuffle=False", "shuffle=True (rows)", "across sequences")
        for storage in ("float32", "float16")
    },
    ("write path alone, shuffle=False (tokens/s)",): 1,
    ("write path alone, shuffle=True (rows) (tokens/s)",): 1,
    ("write path alone, shuffle=True (rows), direct_io=False (tokens/s)",): 1,
}


def table_rows(output: str) -> list[list[str]]:
    return [
        [cell.strip() for cell in line.strip().strip("|").split("|")]
        for line in output.splitlines()
        if line.startswith("|") and not line.startswith("|---")
    ]


def test_the_quick_cpu_run_prints_every_row(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "benchmark.gpu", "--quick", "--device", "cpu", "--dir", str(tmp_path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "failed]" not in proc.stderr, proc.stderr[-3000:]
    rows = table_rows(proc.stdout)
    assert not [row for row in rows if "error" in row], proc.stdout
    for key, n_numbers in EXPECTED.items():
        found = [row for row in rows if tuple(row[: len(key)]) == key]
        assert len(found) == 1, f"row {key} printed {len(found)} times:\n{proc.stdout}"
        numbers = [cell for cell in found[0][len(key) :] if NUMBER.match(cell)]
        assert len(numbers) >= n_numbers, f"row {key} lacks numbers: {found[0]}"
    verdicts = [row for row in rows if row[-1] in ("met", "**not met**")]
    assert len(verdicts) == 9
    assert any(row[:2] == ["transformers float32", "not measured (not supported here yet)"] for row in rows)
    assert any(row[1:] == ["n/a (no CUDA device)"] * 5 for row in rows)  # the profile needs CUDA
    assert re.search(r"^total: \d+ s$", proc.stdout, re.M)
    assert list(tmp_path.iterdir()) == []  # the scratch directory is removed


def test_the_gaps_of_the_compute_stream_are_read_from_the_trace():
    kernel = lambda ts, dur, stream: {"cat": "kernel", "ts": ts, "dur": dur, "args": {"stream": stream}}  # noqa: E731
    events = [kernel(0, 10, 7), kernel(12, 10, 7), kernel(222, 10, 7), kernel(232, 8, 7), kernel(5, 100, 13)]
    events += [{"cat": "cpu_op", "ts": 0, "dur": 1000}, {"cat": "gpu_memcpy", "ts": 30, "dur": 50}]
    n, busy, median, over_100, largest = kernel_gaps(events)
    assert n == 4 and busy == f"{38 / 240:.3f}"
    assert median == "2.0" and over_100 == 1 and largest == "200"
