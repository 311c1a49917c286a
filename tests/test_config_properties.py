"""Property-based: random invalid configs each fail with one clear ValueError that names the field, before any
forward pass over data, from Python and from the command line; random valid configs construct and resolve.

Every invalid case changes one field of a valid config (plus the fields that field needs, e.g. shuffle for
exclude_special_tokens). Config-level cases fail when the config is built; run-level ones (token ids outside the
vocabulary) when `run()` resolves the plan, with a forward pre-hook on the model failing the test if a pass over
data ran. The command line runs the same kind of cases, drawn as text, in one subprocess per example
(tests/cli_driver.py): exit code 2, one line on stderr naming the field, no traceback.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import data_passes, no_pass
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from sae_cache import CacheActivationsRunner, CacheActivationsRunnerConfig
from sae_cache.publish import RunPaths

DRIVER = Path(__file__).with_name("cli_driver.py")
TINY_VOCAB, DEMO_VOCAB = 300, 4096  # the tests' tiny tokenizer; the demo model's
BASE = dict(
    dataset_path="unused-override-given",
    model_name="tiny",
    model_batch_size=5,
    hook_name="blocks.1.hook_resid_post",
    d_in=32,
    training_tokens=16 * 8,
    context_size=16,
    shuffle=False,
    device="cpu",
)
FAST = settings(max_examples=150, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
SHUFFLED_ACROSS = {"shuffle": True, "shuffle_across_sequences": True}

words = st.text(alphabet="abcdefghijklmnopqrstuvwxyz_", min_size=1, max_size=8)  # never a number, never a bool word
not_bool_word = words.filter(lambda w: w not in ("true", "false", "yes", "no", "y", "n", "none", "null"))
non_positive = st.integers(max_value=0)


def number_text(strategy):
    return strategy.map(str)


def invalid_cases(vocab: int, *, cli: bool):
    """(field, value, extra fields, level): one field made invalid; level 'config' or 'run' (where it fails)."""
    as_text = number_text if cli else (lambda s: s)
    python_only = (lambda s: st.nothing()) if cli else (lambda s: s)
    wrong_type = python_only(st.one_of(st.floats(allow_nan=True), words, st.just([1]), st.just({"a": 1})))
    not_an_int = st.one_of(
        wrong_type, as_text(st.floats(allow_nan=False, allow_infinity=False).filter(lambda x: x != int(x))), words
    )
    bad_float = st.one_of(
        st.floats(max_value=0.0),
        st.sampled_from([math.inf, -math.inf, math.nan]),
        st.floats(min_value=1e12, exclude_min=True),
    )

    def case(field, values, extra=None, level="config"):
        return st.tuples(st.just(field), values, st.just(extra or {}), st.just(level))

    bool_fields = ["shuffle", "prepend_bos", "streaming", "overwrite", "resume", "direct_io", "compile_llm"]
    return st.one_of(
        case("model_batch_size", st.one_of(as_text(non_positive), not_an_int)),
        case("training_tokens", st.one_of(as_text(non_positive), not_an_int)),
        case("context_size", st.one_of(as_text(st.integers(max_value=-2) | st.just(0)), not_an_int)),
        case("d_in", st.one_of(as_text(st.integers(max_value=-2) | st.just(0)), not_an_int)),
        case("seed", st.one_of(as_text(st.integers(max_value=-1)), not_an_int)),
        case("buffer_size_gb", st.one_of(as_text(bad_float), words, python_only(st.booleans()))),
        case("hf_num_shards", as_text(non_positive)),
        case("forward_threads", as_text(non_positive)),
        case("hook_layer", as_text(st.integers(max_value=-1) | st.integers(2, 9))),  # negative, or not the hook's
        case("dtype", words.filter(lambda w: w not in ("float32", "float16", "float64"))),
        case("fp16_overflow", words.filter(lambda w: w not in ("error", "warn"))),
        case("seqpos_slice", st.sampled_from([(0, 10, 0), (1, 2, 3, 4), (5, 5), (0, None, -1)])),
        case(
            "sequence_separator_token",
            st.one_of(
                as_text(st.integers(max_value=-1)), not_bool_word.filter(lambda w: w not in ("bos", "eos", "sep"))
            ),
        ),
        case("sequence_separator_token", as_text(st.integers(vocab, 10**9)), level="run"),
        case("exclude_special_tokens", st.lists(st.integers(max_value=-1), min_size=1, max_size=3), SHUFFLED_ACROSS),
        case(
            "exclude_special_tokens",
            st.lists(st.integers(0, vocab - 1), max_size=2).flatmap(
                lambda ok: st.lists(st.integers(vocab, 10**6), min_size=1, max_size=2).map(lambda bad: ok + bad)
            ),
            SHUFFLED_ACROSS,
            "run",
        ),
        case("new_cached_activations_path", st.sampled_from(["", ".", "..", "/"])),
        st.sampled_from(bool_fields).flatmap(
            lambda f: case(f, not_bool_word if cli else st.one_of(st.integers(0, 1), words, st.none()))
        ),
        python_only(case("model_kwargs", st.one_of(st.lists(st.integers()), words, st.integers()))),
        python_only(case("label_columns", st.one_of(st.integers(), st.lists(st.integers(), min_size=1)))),
        python_only(case("seqpos_slice", st.sampled_from([(True, None), (0, 2.5), ("1",)]))),
    )


def valid_fields(vocab: int):
    return st.fixed_dictionaries(
        {},
        optional={
            "model_batch_size": st.integers(1, 64),
            "training_tokens": st.integers(64, 4096),
            "context_size": st.integers(2, 64),
            "seed": st.integers(0, 2**63),
            "buffer_size_gb": st.floats(1e-6, 8.0),
            "dtype": st.sampled_from(["float32", "float16", "float64", "torch.float16"]),
            "hf_num_shards": st.none() | st.integers(1, 100),
            "forward_threads": st.none() | st.integers(1, 4),
            "sequence_separator_token": st.sampled_from(["bos", "eos", "sep", None]) | st.integers(0, vocab - 1),
            "prepend_bos": st.booleans(),
            "seqpos_slice": st.sampled_from([(None,), (1, None), (0, None, 2)]),
            "fp16_overflow": st.sampled_from(["error", "warn"]),
            "d_in": st.sampled_from([-1, 32]),
        },
    )


def expect_one_line_naming(message: str, field: str) -> None:
    assert field in message and "\n" not in message.strip(), message


@FAST
@given(case=invalid_cases(TINY_VOCAB, cli=False).filter(lambda c: c[3] == "config"))
def test_an_invalid_config_fails_when_it_is_built(case):
    field, value, extra, _ = case
    with pytest.raises(ValueError) as caught:
        CacheActivationsRunnerConfig(**{**BASE, "new_cached_activations_path": "out", **extra, field: value})
    expect_one_line_naming(str(caught.value), field)


@settings(max_examples=40, deadline=None, database=None, suppress_health_check=list(HealthCheck))
@given(case=invalid_cases(TINY_VOCAB, cli=False).filter(lambda c: c[3] == "run"))
def test_an_invalid_run_fails_before_any_pass_over_data(case, model, text_dataset, tmp_path_factory):
    field, value, extra, _ = case
    out = tmp_path_factory.mktemp("run") / "cache"
    cfg = CacheActivationsRunnerConfig(**{**BASE, "new_cached_activations_path": str(out), **extra, field: value})
    with data_passes(model, no_pass), pytest.raises(ValueError) as caught:
        CacheActivationsRunner(cfg, override_dataset=text_dataset, model=model).run()
    expect_one_line_naming(str(caught.value), field)
    assert not out.exists() and not RunPaths(out).work.exists()


@settings(max_examples=40, deadline=None, database=None, suppress_health_check=list(HealthCheck))
@given(fields=valid_fields(TINY_VOCAB))
def test_a_valid_config_constructs_and_resolves_its_plan(fields, model, text_dataset, tmp_path_factory):
    out = tmp_path_factory.mktemp("valid") / "cache"
    fields = {**BASE, **fields, "new_cached_activations_path": str(out)}
    fields["training_tokens"] = max(fields["training_tokens"], fields["context_size"])
    cfg = CacheActivationsRunnerConfig(**fields)
    assert isinstance(cfg.model_batch_size, int) and isinstance(cfg.buffer_size_gb, float)
    with data_passes(model, no_pass):
        described = str(CacheActivationsRunner(cfg, override_dataset=text_dataset, model=model))
    assert "rows x positions" in described
    assert not out.exists() and not RunPaths(out).work.exists()


def flag(field: str, value) -> list[str]:
    if isinstance(value, tuple):
        return [f"--{field}", *("none" if v is None else str(v) for v in value)]
    if isinstance(value, list):
        return [f"--{field}", ",".join(map(str, value))]
    return [f"--{field}", "none" if value is None else str(value)]


@pytest.fixture(scope="module")
def text_dir(tmp_path_factory, text_dataset) -> Path:
    path = tmp_path_factory.mktemp("cli-data") / "texts"
    text_dataset.save_to_disk(str(path))
    return path


@settings(
    max_examples=2, deadline=None, database=None, phases=[Phase.generate], suppress_health_check=list(HealthCheck)
)
@given(cases=st.lists(invalid_cases(DEMO_VOCAB, cli=True), min_size=30, max_size=30))
def test_the_command_line_exits_2_with_one_line_for_each(cases, text_dir, tmp_path_factory):
    """The demo model (the CLI's default) and a local dataset; one interpreter for the whole list."""
    root = tmp_path_factory.mktemp("cli")
    out = str(root / "out")
    base = ["--context_size", "16", "--training_tokens", "128", "--device", "cpu", "--shuffle", "false"]
    base += ["--dataset_path", str(text_dir), "--new_cached_activations_path", out, "--d_in", "256"]
    base += ["--hook_name", "blocks.1.hook_resid_post"]  # layer 1, as in BASE: hook_layer 2..9 contradicts it
    argvs = []
    for field, value, extra, _ in cases:
        argv = list(base)
        for name, v in extra.items():
            argv += flag(name, v)
        argvs.append(argv + flag(field, value))
    (root / "cases.json").write_text(json.dumps(argvs))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    cmd = [sys.executable, str(DRIVER), str(root / "cases.json"), str(root / "results.json")]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env, cwd=root)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for (field, value, _, _), result in zip(cases, json.loads((root / "results.json").read_text())):
        why = f"--{field} {value!r}: {result}"
        lines = result["stderr"].strip().splitlines()
        assert result["raised"] is None and result["code"] == 2, why
        assert len(lines) == 1 and lines[0].startswith("sae_cache: error: ") and field in lines[0], why
    assert not Path(out).exists() and not RunPaths(Path(out)).work.exists()
