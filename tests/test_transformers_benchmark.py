"""benchmark/transformers_path.py's tasks on the transformers model, run in-process at a tiny size: the bare loop
(2 threads) and sae_cache end to end on a GPT-2 of the demo shape, saved once and loaded by path. (Its --quick run
starts seven processes, over a minute here, so it is not run by the tests.)"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # benchmark/ is not installed with the package

from benchmark import transformers_path  # noqa: E402
from benchmark._common import CONTEXT, D_MODEL  # noqa: E402
from benchmark._setup import VOCAB  # noqa: E402

ROWS, BATCH = 8, 4


def test_the_transformers_tasks_run_on_the_demo_shape(tmp_path):
    from datasets import Dataset

    ids = np.random.default_rng(0).integers(0, VOCAB, (ROWS, CONTEXT), dtype=np.int32)
    Dataset.from_dict({"input_ids": list(ids)}).save_to_disk(str(tmp_path / "data"))
    common = dict(data=str(tmp_path / "data"), model_dir=str(tmp_path / "model"), batch=BATCH)
    loop = transformers_path.task_forward(**common, n_rows=ROWS, streams=2)
    assert loop["tokens"] == ROWS * CONTEXT and loop["streams"] == 2 and loop["seconds"] > 0
    assert (tmp_path / "model" / "config.json").is_file() and (tmp_path / "model" / "tokenizer.json").is_file()
    cache = transformers_path.task_sae_cache(
        **common, out=str(tmp_path / "cache"), training_tokens=ROWS * CONTEXT, buffer_size_gb=1e-3
    )
    assert cache["tokens"] == ROWS * CONTEXT and cache["raw_act_bytes"] == ROWS * CONTEXT * D_MODEL * 4
    assert 1.0 < cache["disk_bytes"] / cache["raw_act_bytes"] < 1.02  # a 256-wide float32 hook was cached
    assert not (tmp_path / "cache").exists()  # removed after
