"""The pseudo-gradient codecs of the all-reduce in plain torch: blockwise absmax int8 and fp16, each a byte layout
with its encoder and its decoder. Decoding is elementwise IEEE arithmetic only (no reductions), so the same bytes
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
_ROWS_PER_CHUNK = 64  # blocks encoded at once: the temporaries (256 KiB) stay in the CPU's cache

# np.frombuffer over the protobuf's immutable bytes gives a read-only array; decoders only read it (no copy)
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


def _encode_blocks_(values: torch.Tensor, scales: torch.Tensor, codes: torch.Tensor) -> None:
    """Encode the rows of `values` (blocks x values) into `scales` (blocks) and `codes` (blocks x values)."""
    low, high = torch.aminmax(values, dim=1)
    absmax = torch.maximum(high, low.neg())  # NaN when the block holds one (maximum propagates NaN)
    finite = torch.isfinite(absmax)
    scale = absmax / INT8_LEVELS
    # 127 x scale must decode to a finite float: a block whose absmax is within a few ulps of the largest float
    # can round up to inf, and one ulp less keeps it finite
    overflows = finite & (scale * INT8_LEVELS == math.inf)
    scale = torch.where(overflows, torch.nextafter(scale, scale.new_zeros(())), scale)
    usable = finite & (scale >= _SMALLEST_NORMAL)  # not for NaN, inf, 0 and subnormal scales
    if bool(usable.all()):
        quotient = values / scale[:, None]
    else:
        # a block with a non-finite value decodes to NaN everywhere (scale NaN, codes 0), so that a receiver's
        # finiteness check rejects it instead of averaging a plausible finite stand-in; a block whose values are
        # all below ~1.5e-36 in magnitude decodes to zeros (scale 0), so that no decoded value is subnormal, whose
        # arithmetic depends on the CPU's flush-to-zero mode
        quotient = values / torch.where(usable, scale, 1.0)[:, None]
        quotient[~usable] = 0.0
        scale = torch.where(usable, scale, torch.where(finite, 0.0, math.nan))
    scales.copy_(scale)
    codes.copy_(quotient.round_().clamp_(-INT8_LEVELS, INT8_LEVELS))


def int8_encode(values: torch.Tensor) -> torch.Tensor:
    """Encode a floating-point tensor (flattened, as float32) as bytes: the scales of its blocks of INT8_BLOCK values
    (absmax / 127; NaN for a block with a non-finite value), then each value's code round(value / scale)."""
    flat = _flat_float32(values)
    num_values = flat.numel()
    num_blocks = -(-num_values // INT8_BLOCK)
    encoded = torch.empty(int8_num_bytes(num_values), dtype=torch.uint8)
    scales, codes = encoded[: 4 * num_blocks].view(torch.float32), encoded[4 * num_blocks :].view(torch.int8)
    num_full = num_values // INT8_BLOCK
    step = _ROWS_PER_CHUNK * INT8_BLOCK
    for start in range(0, num_full * INT8_BLOCK, step):
        stop = min(start + step, num_full * INT8_BLOCK)
        _encode_blocks_(
            flat[start:stop].view(-1, INT8_BLOCK),
            scales[start // INT8_BLOCK : stop // INT8_BLOCK],
            codes[start:stop].view(-1, INT8_BLOCK),
        )
    if num_full < num_blocks:  # the last, shorter block
        tail = num_full * INT8_BLOCK
        _encode_blocks_(flat[tail:].view(1, -1), scales[num_full:], codes[tail:].view(1, -1))
    return encoded


def int8_decode(buffer: bytes, num_values: int) -> torch.Tensor:
    """The float32 values (flat) of an int8-encoded buffer: code x its block's scale, one IEEE product per value."""
    if len(buffer) != int8_num_bytes(num_values):
        raise CodecError(
            f"an int8 buffer of {num_values} values has {int8_num_bytes(num_values)} bytes, not {len(buffer)}"
        )
    num_blocks = -(-num_values // INT8_BLOCK)
    raw = torch.from_numpy(np.frombuffer(buffer, dtype=np.uint8))
    scales, codes = raw[: 4 * num_blocks].view(torch.float32), raw[4 * num_blocks :].view(torch.int8)
    if bool(((scales.abs() < _SMALLEST_NORMAL) & (scales != 0)).any()):
        # never written by int8_encode; the products would depend on the CPU's flush-to-zero mode
        raise CodecError("an int8 buffer with a subnormal scale")
    decoded = torch.empty(num_values, dtype=torch.float32)
    full = num_values // INT8_BLOCK * INT8_BLOCK
    if full:
        torch.mul(
            codes[:full].view(-1, INT8_BLOCK),
            scales[: full // INT8_BLOCK, None],
            out=decoded[:full].view(-1, INT8_BLOCK),
        )
    if full < num_values:
        torch.mul(codes[full:], scales[-1], out=decoded[full:])
    return decoded


def fp16_encode(values: torch.Tensor) -> torch.Tensor:
    """Encode a floating-point tensor (flattened) as float16, rounded to nearest. Finite values beyond the float16
    range saturate at +-65504 (as hivemind's Float16Compression does, so the bytes are the same as its); infinities
    and NaN stay what they are, so that a receiver's finiteness check still sees them."""
    flat = values.detach().reshape(-1)
    if not flat.is_floating_point() or flat.dtype == torch.bfloat16:
        raise TypeError(f"fp16 encodes float16, float32 or float64 tensors, not {flat.dtype}")
    half = flat.to(device="cpu", dtype=torch.float16)
    if bool(torch.isinf(half).any()):  # rare: values beyond the range, or infinities
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
