"""The one configuration dataclass and its validation.

Owns `CacheActivationsRunnerConfig`: SAELens 6.x's field names and meanings (a config written for
SAELens's `CacheActivationsRunnerConfig` constructs this one unchanged), the options of SAELens
PR #612, and sae_cache's own few additions. `__post_init__` only validates and normalises; it never
touches the network or the disk. Values the model or data can tell (`d_in`, `hook_layer`,
`context_size` of a pretokenized dataset) may be left unset and are resolved at run time.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field
from typing import Any

from sae_cache.checks import check_field_types, check_minimums, check_output_path
from sae_cache.columns import TOKEN_IDS
from sae_cache.demo import DEMO_MODEL_NAME

# Storage dtypes that datasets' Array2D holds as they are (SAELens's plain format), by every spelling we accept.
STORAGE_DTYPES: dict[str, str] = {
    "float32": "float32",
    "float16": "float16",
    "float64": "float64",
    "torch.float32": "float32",
    "torch.float16": "float16",
    "torch.float64": "float64",
}
MODEL_CLASSES = ("HookedTransformer", "AutoModelForCausalLM")  # what model_class_name may say, as in SAELens
# Compact storage formats (sae_cache.storage_formats): bfloat16 as its 16-bit patterns, int8 with a scale per position.
COMPACT_DTYPES: dict[str, str] = {"bfloat16": "bfloat16", "torch.bfloat16": "bfloat16", "int8": "int8"}
SPECIAL_TOKEN_NAMES = ("bos", "eos", "sep")  # what sequence_separator_token may name besides a token id
UNSET = -1


def default_device() -> str:
    import torch  # here, not at import time: `python -m sae_cache --help` stays instant

    return "cuda" if torch.cuda.is_available() else "cpu"


@dataclass
class CacheActivationsRunnerConfig:
    """What to cache, from which model and data, and where to write it."""

    dataset_path: str = "sae-cache/demo-text"
    """Dataset to read: a Hugging Face Hub name, a local directory (save_to_disk output or data files), or
    `sae-cache/demo-text` (the bundled demo text). Columns: `tokens`/`input_ids` (pretokenized) or `text`/`problem`."""

    model_name: str = "sae-cache/demo"
    """Model to load, as model_class_name says: a TransformerLens model name (HookedTransformer), a Hugging Face Hub
    name or a local directory saved with save_pretrained (AutoModelForCausalLM), or `sae-cache/demo` (the bundled demo
    model)."""

    model_batch_size: int = 32
    """Sequences per forward pass."""

    hook_name: str | list[str] = "blocks.2.hook_resid_post"
    """Hook to cache: a TransformerLens hook name (`blocks.2.hook_resid_post`), or for a transformers model a module
    path (`model.layers.12`, `model.layers.12.mlp`: the module's output, its first element when a tuple), as in
    SAELens. A list (or a comma-separated string) caches several hooks in one forward pass, one column each.
    `python -m sae_cache hooks MODEL` lists a model's hook names with their widths."""

    d_in: int = UNSET
    """Width of the cached activations; -1 reads it from the model. When set it must match every hook."""

    training_tokens: int = 500_000
    """Tokens to cache. The cache holds exactly training_tokens // sliced context_size rows."""

    context_size: int = UNSET
    """Tokens per sequence. -1 takes the row length of a pretokenized dataset; required for raw text."""

    model_class_name: str = "HookedTransformer"
    """How to load `model_name`: HookedTransformer (TransformerLens, `from_pretrained_no_processing`) or
    AutoModelForCausalLM (transformers, `from_pretrained`, with its tokenizer), as in SAELens. A model passed as
    CacheActivationsRunner(cfg, model=...) is used as it is."""

    new_cached_activations_path: str | None = None
    """Output directory. Default: activations/{dataset}/{model}/{hook_name} (SAELens's default)."""

    shuffle: bool = True
    """Store the rows in a uniformly random order on disk, reproducible from `seed`."""

    seed: int = 42
    """Seed of every random choice (the on-disk shuffle)."""

    dtype: str = "float32"
    """Storage format of the activations. float32 (4 bytes a value), float16 (2) or float64 (8): SAELens's plain format,
    one column named the hook. bfloat16 (2 bytes, bit exact: a bfloat16 model loses nothing) and int8 (1 byte, plus a
    float32 scale per position; relative error about 0.8%) are compact: stored as uint16 bit patterns, or int8 values
    with a scale column, read with CachedActivations or sae_cache.saelens.training_runner. Costs: docs/quality.md."""

    device: str = field(default_factory=default_device)
    """Device of the model: cuda when available, else cpu."""

    buffer_size_gb: float = 2.0
    """Size of one buffer of activations in GB (1e9 bytes): one Arrow shard, the unit of resuming. It is filled and
    written in pieces of at most a quarter buffer or 64 MiB, so host memory stays at three pieces whatever its size."""

    hf_repo_id: str | None = None
    """Hugging Face dataset repository to push the finished cache to (none: keep it local)."""

    hf_num_shards: int | None = None
    """Number of shards of the pushed dataset (none: datasets' default)."""

    hf_revision: str = "main"
    """Branch of the Hub repository to push to."""

    hf_is_private_repo: bool = False
    """Create the Hub repository as private."""

    model_kwargs: dict[str, Any] = field(default_factory=dict)
    """Keyword arguments passed to every forward call of the model."""

    model_from_pretrained_kwargs: dict[str, Any] = field(default_factory=dict)
    """Keyword arguments passed to the model's from_pretrained. For AutoModelForCausalLM e.g. `device_map` ("auto":
    one model over several GPUs; the model then stays where it is placed instead of going to `device`),
    `torch_dtype`, `attn_implementation`."""

    compile_llm: bool = False
    """torch.compile the model before caching."""

    llm_compilation_mode: str | None = None
    """torch.compile mode (none: torch's default)."""

    prepend_bos: bool = True
    """Put the BOS token at position 0 of every packed row of raw text (use what the model was trained with)."""

    seqpos_slice: tuple[int | None, ...] = (None,)
    """Positions of each row to keep, as Python slice arguments (start, stop[, step]); the stored row length is the
    sliced length."""

    streaming: bool = True
    """Stream the dataset instead of downloading it whole."""

    autocast_lm: bool = False
    """Run the forward pass under bfloat16 autocast."""

    forward_threads: int | None = None
    """Forward passes run at once when the model is on the CPU, each on its own thread with torch's threads shared among
    them (a small model uses the cores better so). None: 2 on a CPU with 2+ torch threads, else 1. A GPU model runs
    one at a time."""

    dataset_trust_remote_code: bool | None = None
    """Allow a Hub dataset to run its own loading code."""

    use_chat_formatting: bool = False
    """Tokenize each row with the tokenizer's chat template (rows hold conversations or text). Requires context_size."""

    hook_layer: int | None = None
    """Layer of the (deepest) hook. Optional: inferred from the hook name; when given it must agree with it."""

    disable_concat_sequences: bool = False
    """Do not pack several sequences into a row: each sequence becomes its own row, truncated; shorter ones are
    skipped."""

    sequence_separator_token: int | str | None = "bos"
    """Token inserted between concatenated sequences: bos, eos, sep, a token id, or none."""

    exclude_special_tokens: bool | list[int] = False
    """Drop these tokens' activations before rows are packed (True: the tokenizer's BOS/EOS/PAD/SEP). Needs
    shuffle_across_sequences."""

    shuffle_across_sequences: bool = False
    """Shuffle individual positions across sequences, so a stored row mixes many sequences (each activation keeps its
    token id). Needs shuffle."""

    label_columns: list[str] = field(default_factory=list)
    """Numeric input columns (ints, floats, bools) copied into every cache row, for rows that map to one input row:
    a pretokenized dataset, or raw text with disable_concat_sequences. Not with shuffle_across_sequences."""

    overwrite: bool = False
    """Replace an existing cache at the output path (atomically: the old one stays until the new one is complete).
    Without resume, an interrupted run's shards are discarded."""

    resume: bool = False
    """Continue an interrupted run from its last complete shard (the configuration must produce the same output); an
    interrupted overwrite run goes on replacing the old cache."""

    fp16_overflow: str = "error"
    """What to do when float16 storage turns values into inf: error (stop with a message) or warn (store inf, count it
    in the metadata)."""

    direct_io: bool = True
    """Write the final data files around the page cache (O_DIRECT) where the OS and filesystem allow it, else through
    it: less CPU per byte, and a large cache does not evict what the machine had cached. The bytes are the same
    either way."""

    def __post_init__(self) -> None:
        self.hook_name = _normalise_hook_names(self.hook_name)
        self.seqpos_slice = tuple(self.seqpos_slice)
        self.dtype = _normalise_dtype(self.dtype)
        if isinstance(self.sequence_separator_token, str) and re.fullmatch(r"-?\d+", self.sequence_separator_token):
            self.sequence_separator_token = int(self.sequence_separator_token)
        for check in _CHECKS:
            check(self)
        if self.new_cached_activations_path is None:
            self.new_cached_activations_path = default_cache_path(self.dataset_path, self.model_name, self.hook_names)

    @property
    def hook_names(self) -> list[str]:
        """The hook names as a list, whatever form `hook_name` was given in."""
        return list(self.hook_name) if isinstance(self.hook_name, list) else [self.hook_name]

    @property
    def deepest_hook_layer(self) -> int | None:
        """Layer index of the deepest hook read from the names (None when a hook is outside the blocks)."""
        layers = [hook_layer_from_name(h) for h in self.hook_names]
        return None if any(layer is None for layer in layers) else max(layers)  # type: ignore[type-var]

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dictionary of every field."""
        return asdict(self)


def default_cache_path(dataset_path: str, model_name: str, hook_names: list[str]) -> str:
    """SAELens's default output path, activations/{dataset}/{model}/{hook}."""
    hooks = "+".join(hook_names)
    return f"activations/{dataset_path.replace('/', '_')}/{model_name.replace('/', '_')}/{hooks}"


def sliced_length(context_size: int, seqpos_slice: tuple[int | None, ...]) -> int:
    """The stored row length: how many positions of a context_size row seqpos_slice keeps."""
    return len(range(context_size)[slice(*seqpos_slice)])


def hook_layer_from_name(hook_name: str) -> int | None:
    """The layer of a TransformerLens hook name (`blocks.3.hook_resid_post` -> 3), None outside the blocks."""
    match = re.search(r"\.(\d+)(?:\.|$)", hook_name)
    return None if match is None else int(match.group(1))


def _normalise_hook_names(hook_name: str | list[str]) -> str | list[str]:
    names = hook_name.split(",") if isinstance(hook_name, str) else list(hook_name)
    names = [n.strip() for n in names]
    if not names or any(not n for n in names):
        raise ValueError(f"hook_name={hook_name!r} contains an empty name: give one hook name or a list of them.")
    if len(set(names)) != len(names):
        raise ValueError(f"hook_name={hook_name!r} repeats a hook: list each hook once.")
    if TOKEN_IDS in names:
        raise ValueError(f"hook_name may not be {TOKEN_IDS!r}: that column holds the token ids.")
    return names[0] if len(names) == 1 else names


def _normalise_dtype(dtype: Any) -> str:
    text = str(dtype)
    names = {**STORAGE_DTYPES, **COMPACT_DTYPES}
    if text in names:
        return names[text]
    raise ValueError(
        f"dtype={dtype!r} is not supported: use float32, float16 or float64 (SAELens's plain format), "
        "or the compact bfloat16 or int8."
    )


# The least value of every integer field (None, or -1 where the field allows it, leaves a field unset).
MINIMUMS = {
    "model_batch_size": 1,
    "training_tokens": 1,
    "context_size": 1,
    "d_in": 1,
    "seed": 0,
    "hf_num_shards": 1,
    "forward_threads": 1,
    "hook_layer": 0,
}


LEFT_UNSET = {
    "context_size": (UNSET, "to take it from a pretokenized dataset"),
    "d_in": (UNSET, "to read it from the model"),
}


def _check_sizes(cfg: CacheActivationsRunnerConfig) -> None:
    check_field_types(cfg)
    check_minimums(cfg, MINIMUMS, unset=LEFT_UNSET)
    if not cfg.buffer_size_gb > 0:
        raise ValueError(f"buffer_size_gb={cfg.buffer_size_gb} must be positive (e.g. 0.5 or 2.0).")
    if cfg.context_size != UNSET and cfg.context_size > cfg.training_tokens:
        raise ValueError(
            f"context_size ({cfg.context_size}) is greater than training_tokens ({cfg.training_tokens}): "
            "reduce context_size or increase training_tokens."
        )
    if cfg.new_cached_activations_path is not None:
        check_output_path(cfg.new_cached_activations_path, field="new_cached_activations_path")


def _check_seqpos_slice(cfg: CacheActivationsRunnerConfig) -> None:
    s = cfg.seqpos_slice
    if not 1 <= len(s) <= 3 or any(v is not None and (isinstance(v, bool) or not isinstance(v, int)) for v in s):
        raise ValueError(f"seqpos_slice={s!r} must be 1 to 3 integers or None: (start, stop[, step]).")
    if len(s) == 3 and s[2] is not None and s[2] < 1:
        raise ValueError(f"seqpos_slice={s!r} has step {s[2]}: the step must be at least 1.")
    if cfg.context_size != UNSET:
        kept = sliced_length(cfg.context_size, s)
        if kept == 0:
            raise ValueError(
                f"seqpos_slice={s!r} selects no position of context_size={cfg.context_size}: widen the slice."
            )
        if cfg.training_tokens < kept:
            raise ValueError(
                f"training_tokens={cfg.training_tokens} is less than one sliced row ({kept} tokens): "
                "increase training_tokens."
            )


def _check_hooks(cfg: CacheActivationsRunnerConfig) -> None:
    if cfg.hook_layer is None:
        return
    deepest = cfg.deepest_hook_layer
    if deepest is not None and cfg.hook_layer != deepest:
        raise ValueError(
            f"hook_layer={cfg.hook_layer} contradicts hook_name={cfg.hook_name!r} (layer {deepest}): "
            "leave hook_layer unset or make them agree."
        )


def _check_model(cfg: CacheActivationsRunnerConfig) -> None:
    if cfg.model_class_name not in MODEL_CLASSES:
        raise ValueError(
            f"model_class_name={cfg.model_class_name!r} cannot be loaded: use one of {list(MODEL_CLASSES)}, or build "
            "the model yourself and pass it as CacheActivationsRunner(cfg, model=...)."
        )
    if cfg.model_class_name != "HookedTransformer" and cfg.model_name == DEMO_MODEL_NAME:
        raise ValueError(
            f"model_name={DEMO_MODEL_NAME!r} is a HookedTransformer: set model_class_name='HookedTransformer', or name "
            "a transformers model (a Hub name or a local directory) in model_name."
        )
    if cfg.use_chat_formatting and cfg.context_size == UNSET:
        raise ValueError("use_chat_formatting=True requires context_size to be set explicitly.")


def _check_shuffle_options(cfg: CacheActivationsRunnerConfig) -> None:
    if cfg.shuffle_across_sequences and not cfg.shuffle:
        raise ValueError("shuffle_across_sequences=True requires shuffle=True: set shuffle=True or turn it off.")
    exclude = cfg.exclude_special_tokens
    if isinstance(exclude, list):
        if any(isinstance(t, bool) or not isinstance(t, int) or t < 0 for t in exclude):
            raise ValueError(
                f"exclude_special_tokens={exclude!r} must be True/False or a list of non-negative token ids."
            )
    elif not isinstance(exclude, bool):
        raise ValueError(f"exclude_special_tokens={exclude!r} must be True/False or a list of token ids.")
    if exclude and not cfg.shuffle_across_sequences:
        raise ValueError(
            "exclude_special_tokens needs shuffle_across_sequences=True (and shuffle=True): a row of one sequence "
            "must keep all its positions. Otherwise cache everything and exclude at training time: SAELens's "
            "exclude_special_tokens option filters by the cached token_ids column."
        )


def _check_labels(cfg: CacheActivationsRunnerConfig) -> None:
    labels = cfg.label_columns
    if isinstance(labels, str):
        cfg.label_columns = labels = [c.strip() for c in labels.split(",") if c.strip()]
    if not isinstance(labels, list | tuple) or not all(isinstance(c, str) for c in labels):
        raise ValueError(f"label_columns={labels!r} must be a list of column names (strings).")
    cfg.label_columns = labels = list(labels)
    if not labels:
        return
    if cfg.shuffle_across_sequences:
        raise ValueError(
            "label_columns cannot be used with shuffle_across_sequences=True: a stored row then mixes many inputs."
        )
    reserved = set(cfg.hook_names) | {"token_ids"}
    if reserved & set(labels) or len(set(labels)) != len(labels):
        raise ValueError(
            f"label_columns={labels!r} repeats a name or uses a hook name / token_ids: name each input column once."
        )


def _check_separator(cfg: CacheActivationsRunnerConfig) -> None:
    sep = cfg.sequence_separator_token
    if sep is None or (isinstance(sep, int) and not isinstance(sep, bool) and sep >= 0):
        return
    if isinstance(sep, str) and sep in SPECIAL_TOKEN_NAMES:
        return
    raise ValueError(f"sequence_separator_token={sep!r} must be 'bos', 'eos', 'sep', a token id >= 0, or None.")


def _check_run_mode(cfg: CacheActivationsRunnerConfig) -> None:
    if cfg.fp16_overflow not in ("error", "warn"):
        raise ValueError(f"fp16_overflow={cfg.fp16_overflow!r} must be 'error' or 'warn'.")


_CHECKS = (
    _check_sizes,
    _check_seqpos_slice,
    _check_hooks,
    _check_model,
    _check_shuffle_options,
    _check_separator,
    _check_labels,
    _check_run_mode,
)
