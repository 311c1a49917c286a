"""The storage formats' codecs (pure torch), their columns, sizes and config spellings, without a model."""

from __future__ import annotations

import pytest
import torch

from sae_cache import CacheActivationsRunnerConfig
from sae_cache.arrow_format import cache_features
from sae_cache.config import COMPACT_DTYPES, STORAGE_DTYPES
from sae_cache.plan import make_plan
from sae_cache.storage_formats import FORMATS, compact_description, formats_of, storage_format

HOOK = "blocks.1.hook_resid_post"


def activations(*shape: int, seed: int = 0) -> torch.Tensor:
    """Residual-like values: a spread of scales per position, one large outlier dimension."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*shape, generator=g) * torch.rand(*shape[:-1], 1, generator=g).mul(4).add(0.1)
    x[..., 3] *= 20
    return x


def roundtrip(name: str, x: torch.Tensor, **kwargs) -> torch.Tensor:
    fmt = storage_format(name)
    stored = fmt.encode(HOOK, x)
    return fmt.decode(*stored.values(), **kwargs)


def test_every_accepted_dtype_has_a_format_and_every_format_a_spelling():
    assert set(STORAGE_DTYPES.values()) | set(COMPACT_DTYPES.values()) == set(FORMATS)
    for spelling, name in {**STORAGE_DTYPES, **COMPACT_DTYPES}.items():
        assert CacheActivationsRunnerConfig(dtype=spelling).dtype == name
    assert CacheActivationsRunnerConfig(dtype=torch.bfloat16).dtype == "bfloat16"


def test_bfloat16_keeps_a_bfloat16_input_bit_for_bit_and_rounds_float32_like_torch():
    bf16 = activations(6, 5, 64).to(torch.bfloat16)
    bf16[0, 0, :4] = torch.tensor([float("inf"), float("-inf"), float("nan"), -0.0])
    stored = storage_format("bfloat16").encode(HOOK, bf16)
    assert list(stored) == [f"{HOOK}.bfloat16_bits"] and stored[f"{HOOK}.bfloat16_bits"].dtype == torch.uint16
    back = roundtrip("bfloat16", bf16, dtype=torch.bfloat16)
    assert torch.equal(back.view(torch.int16), bf16.view(torch.int16))  # every bit, nan and -0.0 included
    x = activations(6, 5, 64)
    assert torch.equal(roundtrip("bfloat16", x), x.to(torch.bfloat16).float())  # default: float32


def test_int8_error_is_at_most_half_a_step_per_position():
    x = activations(7, 5, 64)
    fmt = storage_format("int8")
    stored = fmt.encode(HOOK, x)
    q, scale = stored[f"{HOOK}.int8"], stored[f"{HOOK}.scale"]
    assert q.dtype == torch.int8 and q.shape == x.shape and scale.dtype == torch.float32 and scale.shape == x.shape[:2]
    assert q.abs().max() == 127 and q.min() >= -127
    assert torch.allclose(scale, x.abs().amax(-1) / 127)
    back = fmt.decode(q, scale)
    assert back.dtype == torch.float32
    assert ((back - x).abs() <= scale.unsqueeze(-1) / 2 * (1 + 1e-5)).all()
    relative = (back - x).norm() / x.norm()
    assert 0 < relative < 0.02


def test_int8_zeros_and_non_finite_positions():
    x = activations(3, 16)
    x[0] = 0
    x[1, 5] = float("inf")
    x[2, 2] = float("nan")
    back = roundtrip("int8", x)
    assert torch.equal(back[0], torch.zeros(16))  # a position of zeros: scale 0, decoded exactly
    assert not torch.isfinite(back[1]).any() and not torch.isfinite(back[2]).any()  # not silently finite


def test_int8_needs_its_scale():
    with pytest.raises(ValueError, match="scale column"):
        storage_format("int8").decode(torch.zeros(2, 4, dtype=torch.int8))


@pytest.mark.parametrize("name", list(FORMATS))
def test_decode_gives_the_dtype_and_device_asked_for(name):
    x = activations(4, 3, 8)
    stored = storage_format(name).encode(HOOK, x)
    for dtype in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
        out = storage_format(name).decode(*stored.values(), dtype=dtype)
        assert out.dtype == dtype and out.shape == x.shape
    on_meta = storage_format(name).decode(*stored.values(), device="meta")  # decoded where it is sent
    assert on_meta.device.type == "meta" and on_meta.dtype == storage_format(name).default_dtype


def test_plain_decode_without_arguments_is_no_copy():
    values = activations(2, 3, 8).half()
    assert storage_format("float16").decode(values) is values


def test_columns_features_and_their_recognition():
    features = cache_features({HOOK: 32, "blocks.0.hook_resid_pre": 16}, 8, "int8").to_dict()
    assert list(features) == [
        f"{HOOK}.int8",
        f"{HOOK}.scale",
        "blocks.0.hook_resid_pre.int8",
        "blocks.0.hook_resid_pre.scale",
        "token_ids",
    ]
    assert features[f"{HOOK}.int8"] == {"_type": "Array2D", "dtype": "int8", "shape": (8, 32)}
    assert features[f"{HOOK}.scale"]["feature"]["dtype"] == "float32" and features[f"{HOOK}.scale"]["length"] == 8
    assert formats_of(features) == {HOOK: FORMATS["int8"], "blocks.0.hook_resid_pre": FORMATS["int8"]}
    del features[f"{HOOK}.scale"]
    with pytest.raises(ValueError, match="lacks"):
        formats_of(features)
    for name in ("float32", "float16", "bfloat16"):
        assert formats_of(cache_features({HOOK: 32}, 8, name).to_dict()) == {HOOK: FORMATS[name]}


def test_only_compact_caches_carry_a_description():
    assert compact_description({HOOK: FORMATS["float16"]}) == ""
    text = compact_description({HOOK: FORMATS["int8"]})
    assert f"{HOOK}.int8" in text and f"{HOOK}.scale" in text and "training_runner" in text


@pytest.mark.parametrize(
    ("name", "per_position"), [("float32", 4 * 256), ("float16", 2 * 256), ("bfloat16", 2 * 256), ("int8", 256 + 4)]
)
def test_plan_counts_each_format_bytes(name, per_position):
    plan = make_plan(
        hook_dims={HOOK: 256},
        context_size=128,
        seqpos_slice=(None,),
        training_tokens=128 * 10,
        dtype=name,
        model_batch_size=4,
        buffer_size_gb=1.0,
        shuffle=False,
    )
    assert plan.bytes_per_row == 128 * per_position + 128 * 4 + 129 * 4  # values (+ scales), token ids, offsets
    assert plan.activation_bytes == 10 * 128 * per_position
