"""Command line: `python -m sae_cache [flags]` caches; verbs: `info DIR` describes a cache, `targeted` caches chosen
token positions of prompts, `hooks MODEL` lists a model's hook names with their widths.

Owns parsing only: every config field becomes a flag whose help is the field's docstring (read with
simple_parsing's docstring helper), `--config FILE` loads fields from YAML or JSON (flags override
it), and every invalid input exits with code 2 and one line on stderr, never a traceback.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
import textwrap
from pathlib import Path
from typing import Any

import yaml
from simple_parsing.docstring import get_attribute_docstring

from sae_cache.config import MODEL_CLASSES, CacheActivationsRunnerConfig, default_device
from sae_cache.recipe import saelens_recipe

_NONE = ("none", "null")


class _HelpFormatter(argparse.HelpFormatter):
    """argparse's help, wrapped without breaking at hyphens (a name like `sae-cache/demo` stays whole)."""

    def _split_lines(self, text: str, width: int) -> list[str]:
        return textwrap.wrap(" ".join(text.split()), width, break_on_hyphens=False)


class CliError(ValueError):
    """Invalid command-line input."""


def _bool(text: str) -> bool:
    lowered = text.lower()
    if lowered in ("true", "1", "yes", "y"):
        return True
    if lowered in ("false", "0", "no", "n"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def _optional(parse):
    def parse_optional(text: str):
        return None if text.lower() in _NONE else parse(text)

    parse_optional.__name__ = parse.__name__
    return parse_optional


def _json(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise argparse.ArgumentTypeError(f"expected JSON, got {text!r} ({e.msg})") from None


def _int_or_none(text: str) -> int | None:
    if text.lower() in _NONE:
        return None
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer or none, got {text!r}") from None


def _exclude(text: str) -> bool | list[int]:
    if text.lower() in ("true", "false"):
        return text.lower() == "true"
    try:
        return [int(t) for t in text.strip("[]").split(",") if t.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected true, false or token ids like 0,1, got {text!r}") from None


def _csv(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


# Fields whose annotation is not a plain type get their own parser; the rest follow the annotation.
_SPECIAL: dict[str, dict[str, Any]] = {
    "hook_name": {"type": str, "metavar": "HOOK[,HOOK...]"},
    "hook_names": {"type": _csv, "metavar": "HOOK[,HOOK...]"},
    "seqpos_slice": {"type": _int_or_none, "nargs": "+", "metavar": "START_STOP_STEP"},
    "sequence_separator_token": {"type": _optional(str), "metavar": "bos|eos|sep|ID|none"},
    "exclude_special_tokens": {"type": _exclude, "metavar": "true|false|ID,ID"},
    "label_columns": {"type": _csv, "metavar": "COL[,COL...]"},
    "model_kwargs": {"type": _json, "metavar": "JSON"},
    "model_from_pretrained_kwargs": {"type": _json, "metavar": "JSON"},
}
_BY_ANNOTATION = {
    "int": int,
    "float": float,
    "str": str,
    "bool": _bool,
    "str | None": _optional(str),
    "int | None": _optional(int),
    "bool | None": _optional(_bool),
}


def build_parser(
    config_cls: type = CacheActivationsRunnerConfig, *, prog: str = "python -m sae_cache", description: str = ""
) -> argparse.ArgumentParser:
    """A flag per field of `config_cls`, its help the field's docstring; unset flags are left out of the result."""
    parser = argparse.ArgumentParser(
        prog=prog,
        formatter_class=_HelpFormatter,
        description=description
        or "Cache a language model's activations to disk for SAE training (SAELens-compatible). "
        "The defaults name the bundled demo model and text: `python -m sae_cache --context_size 128` runs offline. "
        "Other verbs: `info DIR` describes a cache, `targeted --help` caches chosen token positions of prompts, "
        "`hooks MODEL` lists a model's hook names with their widths.",
        argument_default=argparse.SUPPRESS,
    )
    parser.add_argument("--config", metavar="FILE", help="YAML or JSON file of config fields; flags override it.")
    parser.add_argument("--quiet", action="store_true", help="Only print the summary.")
    for f in dataclasses.fields(config_cls):
        options = _SPECIAL.get(f.name) or {"type": _BY_ANNOTATION[str(f.type)], "metavar": str(f.type).upper()}
        help_text = get_attribute_docstring(config_cls, f.name).docstring_below or ""
        help_text = f"{help_text} ({default_text(f)})"
        parser.add_argument(f"--{f.name}", help=help_text.replace("%", "%%"), **options)
    return parser


def default_text(f: dataclasses.Field) -> str:
    """ "default: X" with a field's default as it is written on the command line, or "required"."""
    if f.default_factory is default_device:  # type: ignore[comparison-overlap]
        return "default: cuda when available, else cpu"
    if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
        return "required"
    value = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
    return f"default: {_flag_text(value)}"


def _flag_text(value: Any) -> str:
    if value is None:
        return "none"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, tuple):
        return " ".join(_flag_text(v) for v in value)
    if isinstance(value, list):
        return ",".join(map(str, value)) or "none"
    if isinstance(value, dict):
        return json.dumps(value)
    return f"{value:_}" if isinstance(value, int) and abs(value) >= 10_000 else str(value)


def parse_config(
    argv: list[str], config_cls: type = CacheActivationsRunnerConfig, parser: argparse.ArgumentParser | None = None
):
    """The config from an optional file plus flags, and the parsed flags; raises CliError on any invalid input."""
    args = _ArgumentParser.wrap(parser or build_parser(config_cls)).parse_args(argv)
    names = {f.name for f in dataclasses.fields(config_cls)}
    fields = _load_config_file(Path(args.config), names) if hasattr(args, "config") else {}
    fields.update({k: v for k, v in vars(args).items() if k in names})
    if "seqpos_slice" in fields:
        fields["seqpos_slice"] = tuple(fields["seqpos_slice"])
    try:
        return config_cls(**fields), args
    except (ValueError, TypeError) as e:
        raise CliError(str(e)) from None


def _load_config_file(path: Path, names: set[str]) -> dict[str, Any]:
    if not path.is_file():
        raise CliError(f"--config {path}: no such file.")
    try:
        loaded = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise CliError(f"--config {path} is not valid YAML/JSON: {' '.join(str(e).split())}") from None
    if not isinstance(loaded, dict):
        raise CliError(f"--config {path} must hold a mapping of config fields.")
    unknown = sorted(set(loaded) - names)
    if unknown:
        raise CliError(f"--config {path} has unknown fields {unknown}: see --help.")
    return loaded


class _ArgumentParser(argparse.ArgumentParser):
    """argparse that raises CliError instead of printing usage and exiting."""

    @classmethod
    def wrap(cls, parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
        parser.__class__ = cls
        return parser

    def error(self, message: str):  # type: ignore[override]
        raise CliError(message)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["info"]:
        from sae_cache.info import main as info_main

        return info_main(argv[1:])
    if argv[:1] == ["targeted"]:
        return _targeted(argv[1:])
    if argv[:1] == ["hooks"]:
        return _hooks(argv[1:])
    try:
        cfg, args = parse_config(argv)
    except CliError as e:
        print(f"sae_cache: error: {e}", file=sys.stderr)
        return 2
    from sae_cache import distributed

    cfg.device = distributed.init_from_env(cfg.device)  # under torchrun: one process group, a device per rank
    quiet = getattr(args, "quiet", False) or not distributed.current().is_main
    logging.basicConfig(level=logging.WARNING if quiet else logging.INFO, format="%(message)s")
    return _run(cfg)


def _run(cfg: CacheActivationsRunnerConfig) -> int:
    from sae_cache.runner import CacheActivationsRunner

    runner = CacheActivationsRunner(cfg)
    try:
        dataset = runner.run()  # logs the plan before any work
    except (ValueError, OSError, TypeError, RuntimeError) as e:
        print(f"sae_cache: error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    if runner.ranks.is_main:
        print(_summary(runner, dataset))
    return 0


def _targeted(argv: list[str]) -> int:
    """`python -m sae_cache targeted ...`: position-targeted caching (sae_cache.targeted)."""
    from sae_cache.targeted import TargetedCacheConfig

    parser = build_parser(
        TargetedCacheConfig,
        prog="python -m sae_cache targeted",
        description="Cache the activations of the last n_positions tokens of a target substring in each prompt.",
    )
    parser.add_argument(
        "--dataset_path",
        required=True,
        help="Dataset with the prompt and target columns (Hub name or local directory).",
    )
    parser.add_argument(
        "--model_name",
        default="sae-cache/demo",
        help="Model name or directory (as --model_class_name says), or sae-cache/demo.",
    )
    parser.add_argument("--model_class_name", default="HookedTransformer", choices=MODEL_CLASSES, help=_CLASS_HELP)
    parser.add_argument("--device", default=None, help="Device of the model (default: cuda when available, else cpu).")
    try:
        cfg, args = parse_config(argv, TargetedCacheConfig, parser)
    except CliError as e:
        print(f"sae_cache: error: {e}", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.WARNING if getattr(args, "quiet", False) else logging.INFO, format="%(message)s")
    from sae_cache.adapters import load_model
    from sae_cache.data import open_dataset
    from sae_cache.targeted import cache_targeted

    try:
        dataset = open_dataset(args.dataset_path, streaming=False)
        model = load_model(
            args.model_name, model_class_name=args.model_class_name, device=args.device or default_device()
        )
        dataset = cache_targeted(cfg, dataset, model)
    except (ValueError, OSError, TypeError, RuntimeError) as e:
        print(f"sae_cache: error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    print(f"done: {cfg.output_path}: {len(dataset):,} rows, hooks {cfg.hook_names}")
    return 0


_CLASS_HELP = "How to load the model: HookedTransformer (TransformerLens) or AutoModelForCausalLM (transformers)."


def _hooks(argv: list[str]) -> int:
    """`python -m sae_cache hooks MODEL`: every hook name of a model with its width, from one probe pass."""
    parser = _ArgumentParser(
        prog="python -m sae_cache hooks",
        description="List a model's hook names with the width of each hook's activations per position (one forward "
        "pass over a few tokens), for hook_name.",
    )
    parser.add_argument("model_name", help="TransformerLens model name, transformers Hub name or local directory.")
    parser.add_argument(
        "--model_class_name",
        choices=MODEL_CLASSES,
        help=_CLASS_HELP
        + " Default: AutoModelForCausalLM for a directory holding a config.json, else HookedTransformer.",
    )
    parser.add_argument("--device", default=None, help="Device of the model (default: cuda when available, else cpu).")
    parser.add_argument("--model_from_pretrained_kwargs", type=_json, default={}, metavar="JSON")
    parser.add_argument("--all", action="store_true", help="Also list the hooks that cannot be cached, and why.")
    from sae_cache.adapters import load_model
    from sae_cache.config import default_device

    try:
        args = parser.parse_args(argv)
        class_name = args.model_class_name or (
            "AutoModelForCausalLM" if (Path(args.model_name) / "config.json").is_file() else "HookedTransformer"
        )
        model = load_model(
            args.model_name,
            model_class_name=class_name,
            device=args.device or default_device(),
            from_pretrained_kwargs=args.model_from_pretrained_kwargs,
        )
        widths = model.probe(model.hook_names())
    except (ValueError, OSError, TypeError, RuntimeError) as e:
        print(f"sae_cache: error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    print(_hook_table(f"{args.model_name} ({class_name})", widths, show_all=args.all))
    return 0


def _hook_table(model: str, widths: dict[str, tuple[int | None, str]], *, show_all: bool) -> str:
    """The hooks verb's listing: one line per hook with its width (or why it cannot be cached)."""
    cacheable = {name: width for name, (width, _) in widths.items() if width is not None}
    pad = max(map(len, widths if show_all else cacheable), default=0)
    lines = [f"{model}: {len(cacheable)} hooks can be cached (hook name, width per position)"]
    for name, (width, why) in widths.items():
        if width is not None:
            lines.append(f"  {name:<{pad}}  {width}")
        elif show_all:
            lines.append(f"  {name:<{pad}}  -  {why}")
    if not show_all and len(cacheable) < len(widths):
        lines.append(f"{len(widths) - len(cacheable)} more cannot be cached; --all lists them with the reason.")
    return "\n".join(lines)


def _summary(runner, dataset) -> str:
    plan, cfg = runner.plan, runner.cfg
    hook = cfg.hook_names[0]
    tokens_per_s = runner.computed_tokens / max(runner.elapsed_s, 1e-9)
    kept = plan.n_tokens - runner.computed_tokens
    recipe = saelens_recipe(
        cache=runner.paths.out,
        hook=hook,
        d_in=plan.hook_dims[hook],
        context_size=plan.sliced_context_size,
        n_rows=len(dataset),
        model_name=cfg.model_name,
        dataset_path=cfg.dataset_path,
        device=cfg.device,
        model_class_name=cfg.model_class_name,
        dtype=cfg.dtype,
    )
    return "\n".join(
        [
            f"done: {runner.paths.out}",
            f"  rows {len(dataset):,} x {plan.sliced_context_size} tokens, {plan.disk_bytes / 1e9:.3f} GB, "
            f"{runner.elapsed_s:.1f} s, {tokens_per_s:,.0f} tok/s",
            f"  {runner.computed_tokens:,} tokens computed in this run"
            + (f" ({kept:,} were cached before it was interrupted)" if kept else ""),
            f"train an SAE with SAELens from it (hook {hook}; change hook_name for another column):",
            "",
            recipe,
        ]
    )


if __name__ == "__main__":
    sys.exit(main())
