"""python -m sae_cache: flags from the config, a config file, exit code 2 with one line on bad input."""

from __future__ import annotations

import json
import subprocess
import sys

import datasets
import pytest

from sae_cache import cli
from sae_cache.adapters import adapt
from sae_cache.metadata import METADATA_FILE


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "sae_cache", *args], capture_output=True, text=True, timeout=120)


def test_help_lists_every_field_with_its_docstring():
    result = run_cli("--help")
    assert result.returncode == 0
    assert "--shuffle_across_sequences" in result.stdout and "--buffer_size_gb" in result.stdout
    assert "Shuffle individual positions across sequences" in " ".join(result.stdout.split())


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (["--model_batch_size", "0"], "model_batch_size"),
        (["--shuffle", "perhaps"], "expected true or false"),
        (["--no_such_flag", "1"], "unrecognized arguments"),
        (["--dtype", "float8"], "float8"),
        (["--shuffle", "false", "--shuffle_across_sequences", "true"], "requires shuffle=True"),
        (["--model_kwargs", "{not json"], "expected JSON"),
        (["--config", "/nonexistent/cfg.yaml"], "no such file"),
    ],
)
def test_bad_input_exits_2_with_one_line(args, fragment, capsys):
    assert cli.main(args) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and fragment in lines[0]


def test_a_real_process_prints_no_traceback():
    result = run_cli("--buffer_size_gb", "-1")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "sae_cache: error: buffer_size_gb=-1.0 must be positive (e.g. 0.5 or 2.0)."
    ]


def test_config_file_then_flags(tmp_path):
    path = tmp_path / "cfg.yaml"
    path.write_text(
        "hook_name: [blocks.0.hook_resid_post, blocks.1.hook_mlp_out]\n"
        "seqpos_slice: [1, null]\ncontext_size: 32\nmodel_kwargs: {a: 1}\n"
    )
    cfg, _ = cli.parse_config(["--config", str(path), "--context_size", "64", "--exclude_special_tokens", "false"])
    assert cfg.hook_names == ["blocks.0.hook_resid_post", "blocks.1.hook_mlp_out"]
    assert cfg.seqpos_slice == (1, None) and cfg.context_size == 64 and cfg.model_kwargs == {"a": 1}
    json_path = tmp_path / "cfg.json"
    json_path.write_text(json.dumps({"bogus": 1}))
    with pytest.raises(cli.CliError, match="unknown fields"):
        cli.parse_config(["--config", str(json_path)])


def test_flag_forms():
    cfg, _ = cli.parse_config(
        [
            "--seqpos_slice",
            "2",
            "none",
            "3",
            "--sequence_separator_token",
            "none",
            "--shuffle",
            "true",
            "--shuffle_across_sequences",
            "true",
            "--exclude_special_tokens",
            "0,1",
            "--hf_repo_id",
            "none",
        ]
    )
    assert cfg.seqpos_slice == (2, None, 3) and cfg.sequence_separator_token is None
    assert cfg.exclude_special_tokens == [0, 1] and cfg.hf_repo_id is None


def test_cli_runs_a_cache_from_a_local_dataset_directory(model, text_dataset, tmp_path, monkeypatch, capsys):
    data_dir = tmp_path / "data"
    text_dataset.save_to_disk(str(data_dir))
    monkeypatch.setattr("sae_cache.resolve.load_model", lambda name, **kwargs: adapt(model))
    out = tmp_path / "out"
    code = cli.main(
        [
            "--dataset_path",
            str(data_dir),
            "--model_name",
            "tiny",
            "--hook_name",
            "blocks.1.hook_resid_post",
            "--context_size",
            "16",
            "--training_tokens",
            "320",
            "--new_cached_activations_path",
            str(out),
            "--device",
            "cpu",
            "--quiet",
        ]
    )
    printed = capsys.readouterr().out
    assert code == 0
    assert "rows 20 x 16 tokens" in printed and "cached_activations_path" in printed
    assert len(datasets.load_from_disk(str(out))) == 20 and (out / METADATA_FILE).exists()
    assert cli.main(["info", str(out)]) == 0
    assert "20 rows x 16 tokens" in capsys.readouterr().out
    # Running the same command again refuses to touch the finished cache.
    assert (
        cli.main(
            [
                "--dataset_path",
                str(data_dir),
                "--context_size",
                "16",
                "--training_tokens",
                "320",
                "--new_cached_activations_path",
                str(out),
                "--device",
                "cpu",
                "--hook_name",
                "blocks.1.hook_resid_post",
            ]
        )
        == 2
    )
    assert "overwrite=True" in capsys.readouterr().err


def test_targeted_verb_caches_and_info_describes_it(model, tmp_path, monkeypatch, capsys):
    data_dir = tmp_path / "prompts"
    datasets.Dataset.from_dict(
        {
            "prompt": ["the river is blue", "seven mountains in paris", "no match here"],
            "target": ["river", "paris", "london"],
            "y": [1, 2, 3],
        }
    ).save_to_disk(str(data_dir))
    monkeypatch.setattr("sae_cache.adapters.load_model", lambda name, **kwargs: adapt(model))
    out = tmp_path / "targeted"
    code = cli.main(
        [
            "targeted",
            "--dataset_path",
            str(data_dir),
            "--model_name",
            "tiny",
            "--device",
            "cpu",
            "--output_path",
            str(out),
            "--hook_names",
            "blocks.0.hook_resid_post,blocks.1.hook_resid_post",
            "--label_columns",
            "y",
            "--n_positions",
            "2",
            "--quiet",
        ]
    )
    assert code == 0, capsys.readouterr().err
    ds = datasets.load_from_disk(str(out))
    assert len(ds) == 2 and ds["y"] == [1, 2] and ds.features["blocks.1.hook_resid_post"].shape == (2, 32)
    capsys.readouterr()
    assert cli.main(["info", str(out)]) == 0
    assert "position-targeted cache, 2 rows (kept 2, skipped 1)" in capsys.readouterr().out
    assert (
        cli.main(
            [
                "targeted",
                "--dataset_path",
                str(data_dir),
                "--output_path",
                str(out),
                "--hook_names",
                "x",
                "--n_positions",
                "0",
            ]
        )
        == 2
    )
    assert "n_positions" in capsys.readouterr().err
