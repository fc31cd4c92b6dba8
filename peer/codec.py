"""The pseudo-gradient codecs of the all-reduce in plain torch and numpy: blockwise absmax int8 and fp16, each a byte
layout with its encoder and its decoder. Decoding is elementwise IEEE arithmetic only (no reductions), so the same bytes
decode to the same floats on every machine (I1), and every buffer is checked first: it comes from another peer."""

from __future__ import annotations

import math
import warnings

import numpy as np
import torch

INT8_BLOCK = 1024
"""Values per int8 block (one float32 scale each). 1024: the scales cost 4/1024 = 0.39 % of the int8 bytes, which
with protobuf's framing stays inside 1 % of the bound, while an outlier coarsens only its own 1023 neighbours
(bitsandbytes' blocks of 4096 spread it over four times as many). A power of two, so that the all-reduce's parts
(2^19 bytes / 1 byte per value) are whole blocks and the simulation's blocks are the network's."""
INT8_LEVELS = 127
"""Codes run over [-127, 127]: symmetric, so that -x encodes as the negation of x (-128 is never produced)."""
INT8_CODEC_ID = f"int8-absmax-{INT8_BLOCK}"
"""Names this wire format in the run fingerprint (peer/config.py COMPRESSION_CODECS): peers on another int8 format
(hivemind's bitsandbytes blockwise quantization) never average together with it."""
FP16_MAX = torch.finfo(torch.float16).max
MAX_DIMS = 16
"""A decoded tensor has at most this many dimensions (the shape is another peer's claim)."""
_SMALLEST_NORMAL = torch.finfo(torch.float32).tiny
_ROWS_PER_CHUNK = 256  # blocks encoded at once: the temporary quotients (1 MiB) stay in the CPU's cache

# np.frombuffer over the protobuf's immutable bytes gives a read-only array, which fp16_decode only reads (no copy);
# hivemind.compression.base installs the same filter
warnings.filterwarnings("ignore", message="The given NumPy array is not writable", category=UserWarning)


class CodecError(ValueError):
    """A serialized tensor that no honest encoder produces (wrong length, shape or dtype)."""


def int8_num_bytes(num_values: int) -> int:
    """Bytes of an encoded tensor of `num_values` values: a float32 scale per block, then one byte per value."""
    return 4 * -(-num_values // INT8_BLOCK) + num_values


def _flat_float32(values: torch.Tensor) -> torch.Tensor:
    if not values.is_floating_point():
        raise TypeError(f"only floating-point tensors can be encoded, not {values.dtype}")
    return values.detach().reshape(-1).to(device="cpu", dtype=torch.float32).contiguous()


def _block_scales(flat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(scales to send, divisors to encode with, which blocks are usable) for the blocks of `flat`."""
    num_full = flat.numel() // INT8_BLOCK
    blocks = flat[: num_full * INT8_BLOCK].view(num_full, INT8_BLOCK)
    low, high = blocks.amin(dim=1), blocks.amax(dim=1)  # (torch's aminmax along a dimension is 8x slower)
    if num_full * INT8_BLOCK < flat.numel():  # the last, shorter block
        tail = flat[num_full * INT8_BLOCK :]
        low, high = torch.cat([low, tail.amin()[None]]), torch.cat([high, tail.amax()[None]])
    absmax = torch.maximum(high, low.neg())  # NaN when the block holds one (maximum propagates NaN)
    finite = torch.isfinite(absmax)
    scale = absmax / INT8_LEVELS
    # 127 x scale must decode to a finite float: a block whose absmax is within a few ulps of the largest float
    # can round up to inf, and one ulp less keeps it finite
    overflows = finite & (scale * INT8_LEVELS == math.inf)
    scale = torch.where(overflows, torch.nextafter(scale, scale.new_zeros(())), scale)
    usable = finite & (scale >= _SMALLEST_NORMAL)  # not for NaN, inf, 0 and subnormal scales
    if bool(usable.all()):
        return scale, scale, usable
    # a block with a non-finite value decodes to NaN everywhere (scale NaN, codes 0), so that a receiver's finiteness
    # check rejects it instead of averaging a plausible finite stand-in; a block whose values are all below ~1.5e-36
    # in magnitude decodes to zeros (scale 0), so that no decoded value is subnormal, whose arithmetic depends on
    # the CPU's flush-to-zero mode
    sent = torch.where(usable, scale, torch.where(finite, 0.0, math.nan))
    return sent, torch.where(usable, scale, 1.0), usable


def _encode_rows_(
    values: torch.Tensor, divisors: torch.Tensor, usable: torch.Tensor | None, codes: torch.Tensor
) -> None:
    """codes = round(values / divisors) for rows of values (blocks x values); rows not `usable` get 0."""
    quotient = torch.div(values, divisors[:, None])
    if usable is not None:
        quotient[~usable] = 0.0
    # |value| <= absmax and scale = absmax / 127 (rounded, or one ulp less) put the quotient within 127 x (1 + 2^-22):
    # it rounds to at most 127; the clamp only guards the int8 cast against a wrap-around
    codes.copy_(quotient.round_().clamp_(-INT8_LEVELS, INT8_LEVELS))


def int8_encode(values: torch.Tensor) -> torch.Tensor:
    """Encode a floating-point tensor (flattened, as float32) as bytes: the scales of its blocks of INT8_BLOCK values
    (absmax / 127; NaN for a block with a non-finite value), then each value's code round(value / scale)."""
    flat = _flat_float32(values)
    num_values = flat.numel()
    num_blocks = -(-num_values // INT8_BLOCK)
    encoded = torch.empty(int8_num_bytes(num_values), dtype=torch.uint8)
    scales, codes = encoded[: 4 * num_blocks].view(torch.float32), encoded[4 * num_blocks :].view(torch.int8)
    if not num_values:
        return encoded
    sent, divisors, usable = _block_scales(flat)
    scales.copy_(sent)
    all_usable = bool(usable.all())
    num_full = num_values // INT8_BLOCK
    for first in range(0, num_full, _ROWS_PER_CHUNK):  # a chunk at a time: the temporaries stay in the cache
        rows = slice(first, min(first + _ROWS_PER_CHUNK, num_full))
        span = slice(rows.start * INT8_BLOCK, rows.stop * INT8_BLOCK)
        _encode_rows_(
            flat[span].view(-1, INT8_BLOCK),
            divisors[rows],
            None if all_usable else usable[rows],
            codes[span].view(-1, INT8_BLOCK),
        )
    if num_full < num_blocks:
        tail = slice(num_full * INT8_BLOCK, num_values)
        _encode_rows_(
            flat[tail][None],
            divisors[num_full:],
            None if all_usable else usable[num_full:],
            codes[tail][None],
        )
    return encoded


def int8_decode(buffer: bytes, num_values: int) -> torch.Tensor:
    """The float32 values (flat) of an int8-encoded buffer: code x its block's scale, one IEEE product per value."""
    if len(buffer) != int8_num_bytes(num_values):
        raise CodecError(
            f"an int8 buffer of {num_values} values has {int8_num_bytes(num_values)} bytes, not {len(buffer)}"
        )
    num_blocks = -(-num_values // INT8_BLOCK)
    # numpy reads the protobuf's immutable bytes in place, and its mixed int8 x float32 product is one pass
    scales = np.frombuffer(buffer, dtype=np.float32, count=num_blocks)
    codes = np.frombuffer(buffer, dtype=np.int8, offset=4 * num_blocks)
    if bool(((np.abs(scales) < _SMALLEST_NORMAL) & (scales != 0)).any()):
        # never written by int8_encode; the products would depend on the CPU's flush-to-zero mode
        raise CodecError("an int8 buffer with a subnormal scale")
    decoded = np.empty(num_values, dtype=np.float32)
    full = num_values // INT8_BLOCK * INT8_BLOCK
    # a stranger's scales may overflow or be NaN: the products are then inf or NaN, which the receivers' finiteness
    # checks reject; numpy need not warn about it
    with np.errstate(over="ignore", invalid="ignore"):
        np.multiply(
            codes[:full].reshape(-1, INT8_BLOCK),
            scales[: full // INT8_BLOCK, None],
            out=decoded[:full].reshape(-1, INT8_BLOCK),
        )
        last = scales[num_blocks - 1 :]  # the last, shorter block (if any)
        np.multiply(codes[full:], last, out=decoded[full:])
    return torch.from_numpy(decoded)


def fp16_encode(values: torch.Tensor) -> torch.Tensor:
    """Encode a floating-point tensor (flattened) as float16, rounded to nearest. Finite values beyond the float16
    range saturate at +-65504 (as hivemind's Float16Compression does, so the bytes are the same as its); infinities
    and NaN stay what they are, so that a receiver's finiteness check still sees them."""
    flat = values.detach().reshape(-1)
    if not flat.is_floating_point() or flat.dtype == torch.bfloat16:
        raise TypeError(f"fp16 encodes float16, float32 or float64 tensors, not {flat.dtype}")
    half = flat.to(device="cpu", dtype=torch.float16)
    if not half.numel():
        return half
    low, high = torch.aminmax(half)  # (aminmax, not isinf: torch's isinf on float16 is ten times slower here)
    if not (math.isfinite(low) and math.isfinite(high)):  # rare: values beyond the range, infinities, NaN
        flat = flat.to(device="cpu", dtype=torch.float32)
        half = torch.where(torch.isinf(flat), flat, flat.clamp(-FP16_MAX, FP16_MAX)).to(torch.float16)
    return half.contiguous()


def fp16_decode(buffer: bytes, num_values: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The values (flat, in `dtype`) of an fp16-encoded buffer: an exact widening of each value."""
    if len(buffer) != 2 * num_values:
        raise CodecError(
            f"an fp16 buffer of {num_values} values has {2 * num_values} bytes, not {len(buffer)}"
        )
    return torch.from_numpy(np.frombuffer(buffer, dtype=np.float16)).to(dtype, copy=True)  # ours, writable


def checked_shape(size: list[int] | tuple[int, ...]) -> tuple[tuple[int, ...], int]:
    """(shape, number of values) of a serialized tensor's claimed shape, bounded before anything is allocated."""
    shape = tuple(int(dim) for dim in size)
    if len(shape) > MAX_DIMS:
        raise CodecError(f"a tensor of {len(shape)} dimensions (at most {MAX_DIMS})")
    return shape, math.prod(shape)
