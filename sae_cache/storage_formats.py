"""Storage formats of the activations: what each `dtype` of the config stores, and its codec (pure torch).

Owns the columns a hook's activations take in a cache and the encoding and decoding between activations and those
columns, on whatever device the tensors are on: the store encodes on the model's device before the device-to-host
copy, the readers decode on the device asked for. Per hook of width d, per stored position:

| dtype | column(s) | bytes | what is stored |
|---|---|---|---|
| float32, float16, float64 | `<hook>`: Array2D of the dtype | 4d, 2d, 8d | the values (SAELens's plain format) |
| bfloat16 | `<hook>.bfloat16_bits`: Array2D uint16 | 2d | the bfloat16 bit patterns: bit exact |
| int8 | `<hook>.int8`: Array2D int8, `<hook>.scale`: float32 | d + 4 | q = round(x / s), s = max abs(x) / 127 |

The Arrow format has no bfloat16, so its 16-bit patterns are stored as uint16; a compact column is never named the
hook, so a reader that does not decode (SAELens's plain path, `datasets.load_from_disk`) finds no column of the
hook's name rather than wrong numbers. A column's features say what it holds; `formats_of` reads them back.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

INT8_LEVELS = 127  # int8 values lie in [-127, 127]: symmetric, -128 unused
SCALE_DTYPE = "float32"
QUALITY_NOTE = "docs/quality.md"


@dataclass(frozen=True)
class StorageFormat:
    """One way of storing a hook's activations: its column(s) and its codec."""

    name: str
    """The config's dtype: float32, float16, float64, bfloat16 or int8."""
    values_dtype: str
    """numpy (and Arrow) dtype of the stored values."""
    suffix: str = ""
    """Appended to the hook name to name the values column; empty for the plain formats."""
    description: str = "the values (SAELens's plain format)"

    @property
    def plain(self) -> bool:
        """Whether the column is the activations themselves, named the hook: what SAELens reads unchanged."""
        return not self.suffix

    @property
    def default_dtype(self) -> torch.dtype:
        """What decoding gives when no dtype is asked for: the stored dtype, float32 for the compact formats."""
        return getattr(torch, self.values_dtype) if self.plain else torch.float32

    @property
    def itemsize(self) -> int:
        """Bytes of one stored value."""
        return _itemsize(self.values_dtype)

    def values_column(self, hook: str) -> str:
        return hook + self.suffix

    def scale_column(self, hook: str) -> str | None:
        """The column of the per-position scales, None for a format without them."""
        return None

    def columns(self, hook: str, d: int) -> dict[str, tuple[tuple[int, ...], str]]:
        """Each stored column of `hook` (width d): its value's shape per position and its dtype."""
        return {self.values_column(hook): ((d,), self.values_dtype)}

    def bytes_per_position(self, d: int) -> int:
        """Bytes of one position's stored values (and scale), without Arrow's offsets."""
        return sum(math.prod(shape) * _itemsize(dt) for shape, dt in self.columns("", d).values())

    def encode(self, hook: str, acts: torch.Tensor) -> dict[str, torch.Tensor]:
        """The stored columns of `acts` [..., d], on acts' device: values [..., d] (and a scale [...])."""
        return {self.values_column(hook): acts.to(getattr(torch, self.values_dtype))}

    def recipe(self, hook: str) -> str:
        """How to decode the stored columns by hand (numpy arrays `values`, `scale`)."""
        return "the values are the activations"

    def decode(
        self,
        values: torch.Tensor,
        scale: torch.Tensor | None = None,
        *,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ) -> torch.Tensor:
        """The activations [..., d] of stored values [..., d] (and scale [...]) in `dtype` on `device`.

        The stored bytes travel to `device` first, then are decoded there; with neither given, a plain
        format's values come back as they are (no copy).
        """
        return values.to(device=device, dtype=dtype)


@dataclass(frozen=True)
class _BFloat16Bits(StorageFormat):
    """bfloat16 stored bit exactly as uint16 patterns (a bfloat16 model's activations lose nothing)."""

    def encode(self, hook: str, acts: torch.Tensor) -> dict[str, torch.Tensor]:
        return {self.values_column(hook): acts.to(torch.bfloat16).view(torch.uint16)}

    def recipe(self, hook: str) -> str:
        return "decode with torch.from_numpy(values.astype(numpy.uint16)).view(torch.bfloat16)"

    def decode(self, values, scale=None, *, dtype=None, device=None) -> torch.Tensor:
        return values.to(device=device).view(torch.bfloat16).to(dtype or self.default_dtype)


@dataclass(frozen=True)
class _Int8Absmax(StorageFormat):
    """int8 with one float32 scale per position: x ~ q * s, s = max abs(x) over the position / 127.

    The error of a value is at most s / 2 (half a step); a position of zeros has s = 0. A position
    holding inf or nan has a non-finite scale and decodes to non-finite values.
    """

    def scale_column(self, hook: str) -> str:
        return f"{hook}.scale"

    def columns(self, hook: str, d: int) -> dict[str, tuple[tuple[int, ...], str]]:
        return {self.values_column(hook): ((d,), self.values_dtype), self.scale_column(hook): ((), SCALE_DTYPE)}

    def recipe(self, hook: str) -> str:
        return f"column {self.scale_column(hook)!r} holds the scales s; decode with values * s[..., None]"

    def encode(self, hook: str, acts: torch.Tensor) -> dict[str, torch.Tensor]:
        x = acts.float()
        scale = x.abs().amax(dim=-1) / INT8_LEVELS
        step = torch.where(scale > 0, scale, torch.ones_like(scale)).unsqueeze(-1)  # zeros stay zeros
        q = torch.nan_to_num_(x / step, nan=0.0).round_().clamp_(-INT8_LEVELS, INT8_LEVELS).to(torch.int8)
        return {self.values_column(hook): q, self.scale_column(hook): scale}

    def decode(self, values, scale=None, *, dtype=None, device=None) -> torch.Tensor:
        if scale is None:
            raise ValueError("an int8 column decodes only with its scale column (`<hook>.scale`).")
        dtype = dtype or self.default_dtype
        work = torch.promote_types(dtype, torch.float32)
        q = values.to(device=device, dtype=work)
        return (q * scale.to(device=device, dtype=work).unsqueeze(-1)).to(dtype)


FORMATS: dict[str, StorageFormat] = {
    "float32": StorageFormat("float32", "float32"),
    "float16": StorageFormat("float16", "float16"),
    "float64": StorageFormat("float64", "float64"),
    "bfloat16": _BFloat16Bits(
        "bfloat16",
        "uint16",
        ".bfloat16_bits",
        "bfloat16 values as uint16 bit patterns (bit exact from a bfloat16 model)",
    ),
    "int8": _Int8Absmax("int8", "int8", ".int8", "int8 values with a float32 scale per position (absmax / 127)"),
}


def storage_format(dtype: str) -> StorageFormat:
    """The format of a config's (normalised) dtype."""
    if dtype not in FORMATS:
        raise ValueError(f"dtype={dtype!r} is not a storage format: use one of {', '.join(FORMATS)}.")
    return FORMATS[dtype]


def formats_of(features: dict[str, dict]) -> dict[str, StorageFormat]:
    """The hooks of a cache and their formats, read from its features (`dataset_info.json`'s, as dicts).

    An Array2D column whose name ends in a compact format's suffix and whose dtype is that format's is that
    hook in that format (its scale column must be there too); any other Array2D column is a hook stored plain.
    """
    hooks = {}
    for name, feature in features.items():
        if feature.get("_type") != "Array2D":
            continue
        fmt = next(
            (
                f
                for f in FORMATS.values()
                if f.suffix and name.endswith(f.suffix) and feature["dtype"] == f.values_dtype
            ),
            None,
        )
        if fmt is None:
            hooks[name] = FORMATS.get(feature["dtype"]) or StorageFormat(feature["dtype"], feature["dtype"])
            continue
        hook = name[: -len(fmt.suffix)]
        missing = [c for c in fmt.columns(hook, 1) if c not in features]
        if missing:
            raise ValueError(f"column {name!r} holds {fmt.name} values but the cache lacks {missing}.")
        hooks[hook] = fmt
    return hooks


def compact_description(formats: dict[str, StorageFormat]) -> str:
    """What a cache's compact columns hold and how to decode them (empty when every hook is stored plain)."""
    compact = {hook: fmt for hook, fmt in formats.items() if not fmt.plain}
    if not compact:
        return ""
    lines = [
        "sae_cache cache in a compact storage format: its activation columns are not plain floats. Read it with "
        "sae_cache.CachedActivations, or train SAELens with sae_cache.saelens.training_runner(cfg).",
    ]
    for hook, fmt in compact.items():
        lines.append(f"Hook {hook}: column {fmt.values_column(hook)!r} holds {fmt.description}; {fmt.recipe(hook)}.")
    return " ".join(lines + [f"Quality: {QUALITY_NOTE} of the sae_cache repository."])


def _itemsize(dtype: str) -> int:
    return getattr(torch, dtype).itemsize
