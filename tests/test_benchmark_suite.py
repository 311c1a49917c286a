"""The benchmark suite's own logic: benchmark/breakdown.py finds every stage it wraps and every cost its ablations
remove (a renamed method would end the benchmark before it measures); run_all judges its CPU targets on a CPU only."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # benchmark/ is not installed with the package

from benchmark._common import Verdict  # noqa: E402
from benchmark.run_all import not_judged_off_cpu  # noqa: E402

SCRIPT = """
from benchmark.breakdown import ABLATIONS, STAGES, _apply_ablations, _instrument
stages = _instrument()
assert list(stages) == list(STAGES), stages
_apply_ablations(list(ABLATIONS))
print("instrumented", len(stages))
"""


def test_every_instrumented_stage_and_ablation_exists():
    proc = subprocess.run([sys.executable, "-c", SCRIPT], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "instrumented" in proc.stdout


def test_the_cpu_targets_are_reported_not_judged_on_another_device():
    verdicts = [Verdict("1a sae_cache / faster forward loop tokens/s", "0.97", ">= 0.95", True)]
    assert not_judged_off_cpu(verdicts, "cpu") == verdicts
    (on_gpu,) = not_judged_off_cpu(verdicts, "cuda")
    assert on_gpu.met is None and on_gpu.measured == "0.97" and on_gpu.target == ">= 0.95 on a CPU; not judged on cuda"
