"""benchmark/gpu.py runs first time on a GPU: its tiny CPU run prints every row of every table, with numbers, for
both model kinds (TransformerLens, and transformers loaded by path) and every storage format.

The transformers model's hook holds what TransformerLens's does (the same weights give the same block-6 output);
the bound of each storage format is its own bytes per token; the GPU-only part (the profile of the compute stream)
is checked on a synthetic Chrome trace.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # benchmark/ is not installed with the package

from benchmark.gpu import (  # noqa: E402
    FULL,
    HOOKS,
    PROFILED_MODE,
    QUICK,
    Bench,
    kernel_gaps,
    make_data,
    sae_cache_run,
    stored_bytes_per_token,
    transformer_lens_model,
    transformers_model,
)

NUMBER = re.compile(r"^[\d,]+(\.\d+)?$")
MODELS = ("TransformerLens bfloat16", "transformers bfloat16")
MODES = ("shuffle=False", "shuffle=True (rows) (in place)", "across sequences")
SAE_CACHE_ROWS = [(mode, storage) for storage in ("float32", "float16") for mode in MODES] + [
    (mode, storage) for storage in ("bfloat16", "int8") for mode in MODES[:2]
]
VERDICT_MODES = {"shuffle=False": "shuffle=False", "shuffle=True (rows) (in place)": "shuffle=True (rows)"}
VERDICT_MODES["across sequences"] = "across sequences"
EXPECTED = {  # first cell(s) of a row -> how many numeric cells it must have
    ("O_DIRECT",): 2,
    ("page cache + fsync",): 2,
    **{(model, "bare forward on the device"): 4 for model in MODELS},
    **{(model, "forward + .cpu() each batch"): 4 for model in MODELS},
    # bytes/token, tokens, seconds, tokens/s, vs bare forward, bound, vs bound
    **{(model, f"sae_cache {mode}", storage): 7 for model in MODELS for mode, storage in SAE_CACHE_ROWS},
    ("write path alone, shuffle=False",): 4,
    ("write path alone, shuffle=True (rows) (in place)",): 4,
    ("write path alone, shuffle=True (rows), direct_io=False (in place)",): 4,
    **{
        (f"{model}, {VERDICT_MODES[mode]}, {storage} storage / bound",): 1
        for model in MODELS
        for mode, storage in SAE_CACHE_ROWS
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
    per_token = {row[2]: row[3] for row in rows if row[0] == MODELS[1] and row[1].startswith("sae_cache")}
    assert per_token == {
        s: f"{stored_bytes_per_token(QUICK, s):,.0f}" for s in ("float32", "float16", "bfloat16", "int8")
    }
    verdicts = [row for row in rows if row[-1] in ("met", "**not met**")]
    assert len(verdicts) == 2 * len(SAE_CACHE_ROWS) + 3
    assert any(row[1:] == ["n/a (no CUDA device)"] * 5 for row in rows)  # the profile needs CUDA
    assert re.search(r"^total: \d+ s$", proc.stdout, re.M)
    assert list(tmp_path.iterdir()) == []  # the scratch directory is removed


def test_the_transformers_hook_holds_what_the_transformer_lens_hook_holds(tmp_path):
    """The same GPT-2 weights in both kinds (TransformerLens's own conversion): block 6's output is the same."""
    from transformer_lens.pretrained.weight_conversions import convert_gpt2_weights

    hf = transformers_model(QUICK, "float32", "cpu", tmp_path)
    tl = transformer_lens_model(QUICK, "float32", "cpu")
    assert hf.kind == "AutoModelForCausalLM" and hf.model.config._attn_implementation == "sdpa"
    tl.model.load_state_dict(convert_gpt2_weights(hf.model, tl.model.cfg), strict=False)
    tokens = torch.randint(0, QUICK.d_vocab, (2, QUICK.context), generator=torch.Generator().manual_seed(0))
    acts = {}
    for kind, adapter in (("transformers", hf), ("TransformerLens", tl)):
        with adapter.capture([HOOKS[kind]]) as capture:
            acts[kind] = capture(tokens)[HOOKS[kind]]
    assert acts["transformers"].shape == (2, QUICK.context, QUICK.d_model)
    torch.testing.assert_close(acts["transformers"], acts["TransformerLens"], rtol=1e-4, atol=1e-4)
    assert acts["transformers"].abs().amax() > 0.1  # a real activation, not zeros
    assert transformers_model(QUICK, "bfloat16", "cpu", tmp_path).model.dtype == torch.bfloat16  # saved once, reused


def test_each_storage_format_has_its_own_bound():
    """bound = min(bare forward, disk bytes/s / the format's stored bytes per token): where the disk is the limit,
    a format of fewer bytes per token has a higher bound, by exactly the bytes factor."""
    per_token = {s: stored_bytes_per_token(FULL, s) for s in ("float32", "float16", "bfloat16", "int8")}
    offsets = 4 * (FULL.context + 1) / FULL.context  # the Array2D offsets of a row, per token
    assert per_token["float32"] == 768 * 4 + 4 + offsets and per_token["float16"] == 768 * 2 + 4 + offsets
    assert per_token["bfloat16"] == per_token["float16"]
    assert per_token["int8"] == 768 + 4 + 4 + offsets  # values, the per-token scale, the token id
    bench = Bench(args=None, shape=FULL, scratch=Path(), data=Path(), disk={"O_DIRECT": 1.66})
    slow_model, fast_model = {"tokens/s": 100_000.0}, {"tokens/s": 1e9}
    assert {s: bench.bound(slow_model, s) for s in per_token} == dict.fromkeys(per_token, 100_000.0)
    bounds = {s: bench.bound(fast_model, s) for s in per_token}
    assert bounds == pytest.approx({s: 1.66e9 / n for s, n in per_token.items()})
    assert bounds["int8"] / bounds["float32"] == pytest.approx(per_token["float32"] / per_token["int8"])
    assert per_token["float32"] / per_token["int8"] > 3.9


def test_the_gaps_of_the_compute_stream_are_read_from_the_trace():
    kernel = lambda ts, dur, stream: {"cat": "kernel", "ts": ts, "dur": dur, "args": {"stream": stream}}  # noqa: E731
    events = [kernel(0, 10, 7), kernel(12, 10, 7), kernel(222, 10, 7), kernel(232, 8, 7), kernel(5, 100, 13)]
    events += [{"cat": "cpu_op", "ts": 0, "dur": 1000}, {"cat": "gpu_memcpy", "ts": 30, "dur": 50}]
    n, busy, median, over_100, largest = kernel_gaps(events)
    assert n == 4 and busy == f"{38 / 240:.3f}"
    assert median == "2.0" and over_100 == 1 and largest == "200"


def test_the_profiled_window_holds_the_forward_passes_of_an_unshuffled_run_and_nothing_before(tmp_path):
    """The profiler wraps `run()` alone: the shape probe and the run's setup stay outside its window, and the
    profiled run is the shuffle=False run its label names."""
    adapter = transformer_lens_model(QUICK, "float32", "cpu")
    bench = Bench(args=None, shape=QUICK, scratch=tmp_path, data=make_data(tmp_path / "data", 40, QUICK), disk={})
    seen, window = [], []

    class Window:
        def __enter__(self):
            window.append(len(seen))

        def __exit__(self, *exc):
            window.append(len(seen))

    hook = adapter.module.register_forward_pre_hook(lambda module, args: seen.append(tuple(args[0].shape)))
    try:
        result = sae_cache_run(adapter, bench, 6 * QUICK.batch * QUICK.context, around=Window(), **PROFILED_MODE)
    finally:
        hook.remove()
    assert PROFILED_MODE == {"shuffle": False} and not result["in place"]
    inside = seen[window[0] : window[1]]
    assert inside == [(QUICK.batch, QUICK.context)] * 6  # every batch of the run, nothing else
    assert seen[: window[0]] and all(shape[0] != QUICK.batch for shape in seen[: window[0]])  # the probe, before
