"""The all-reduce's codecs (peer/codec.py, peer/compression.py): error bounds, determinism, the wire size, and
buffers from other peers that no honest encoder writes."""

from __future__ import annotations

import hashlib
import math

import pytest
import torch
from hivemind.compression import CompressionInfo, deserialize_torch_tensor
from hivemind.compression.floating import Float16Compression as HivemindFloat16
from hivemind.proto import runtime_pb2

from peer.codec import (
    INT8_BLOCK,
    INT8_CODEC_ID,
    CodecError,
    fp16_decode,
    fp16_encode,
    int8_decode,
    int8_encode,
    int8_num_bytes,
)
from peer.compression import COMPRESSION
from peer.config import COMPRESSION_CODECS

FLOAT_MAX = torch.finfo(torch.float32).max


def _values(num_values: int, seed: int = 0) -> torch.Tensor:
    """Random values whose magnitude changes from block to block (1e-6 .. 1e2), so every scale matters."""
    generator = torch.Generator().manual_seed(seed)
    values = torch.randn(num_values, generator=generator)
    block_scale = 10.0 ** torch.randint(-6, 3, (-(-num_values // INT8_BLOCK),), generator=generator)
    return values * block_scale.repeat_interleave(INT8_BLOCK)[:num_values]


def _int8_round_trip(values: torch.Tensor) -> tuple[bytes, torch.Tensor]:
    encoded = int8_encode(values).numpy().tobytes()
    return encoded, int8_decode(encoded, values.numel())


@pytest.mark.parametrize(
    "num_values", [1, 1000, INT8_BLOCK, INT8_BLOCK + 1, 5 * INT8_BLOCK - 3, 70 * INT8_BLOCK]
)
def test_int8_error_within_half_a_step_of_each_block(num_values):
    values = _values(num_values)
    encoded, decoded = _int8_round_trip(values)
    assert len(encoded) == int8_num_bytes(num_values) == num_values + 4 * math.ceil(num_values / INT8_BLOCK)
    assert decoded.dtype == torch.float32 and decoded.shape == values.shape
    for start in range(0, num_values, INT8_BLOCK):
        block, got = values[start : start + INT8_BLOCK], decoded[start : start + INT8_BLOCK]
        step = float(block.abs().max()) / 127
        assert float((got - block).abs().max()) <= 0.5 * step * (1 + 1e-6), start
    assert num_values == 1 or not torch.equal(decoded, values)  # lossy: the bound above is not vacuous


def test_int8_keeps_each_blocks_absmax_and_sign():
    values = _values(8 * INT8_BLOCK, seed=1)
    _, decoded = _int8_round_trip(values)
    blocks, decoded_blocks = values.view(8, -1), decoded.view(8, -1)
    # the largest value of each block is code +-127: it decodes to within an ulp or two of itself
    torch.testing.assert_close(decoded_blocks.abs().amax(1), blocks.abs().amax(1), rtol=2e-7, atol=0)
    assert torch.equal(torch.sign(decoded[decoded != 0]), torch.sign(values[decoded != 0]))
    _, negated = _int8_round_trip(-values)
    assert torch.equal(negated, -decoded)  # symmetric codes


def test_int8_is_deterministic_and_decodes_bit_identically():
    values = _values(10 * INT8_BLOCK + 17, seed=2)
    encoded, decoded = _int8_round_trip(values)
    assert int8_encode(values.clone()).numpy().tobytes() == encoded
    for _ in range(3):
        assert torch.equal(int8_decode(encoded, values.numel()), decoded)
    # decoding is one IEEE product per value: code x its block's scale, nothing else
    num_blocks = math.ceil(values.numel() / INT8_BLOCK)
    raw = torch.frombuffer(bytearray(encoded), dtype=torch.uint8)
    scales, codes = raw[: 4 * num_blocks].view(torch.float32), raw[4 * num_blocks :].view(torch.int8)
    expected = codes.to(torch.float32) * scales.repeat_interleave(INT8_BLOCK)[: values.numel()]
    assert torch.equal(decoded, expected)


def test_int8_wire_format_is_pinned():
    """A fixed input built with exact arithmetic (no RNG, no transcendental functions) encodes to these bytes and
    decodes to these floats on every machine. If this fails, the format changed: change INT8_CODEC_ID too, so that
    peers on the old format and the new one never average together."""
    index = torch.arange(3 * INT8_BLOCK + 5, dtype=torch.float64)
    block_scale = torch.tensor([0.01, 0.1, 1.0, 10.0], dtype=torch.float64)[(index // INT8_BLOCK).long() % 4]
    values = (((index * 7919) % 10007 - 5003) / 977 * block_scale).float()
    encoded, decoded = _int8_round_trip(values)
    assert hashlib.sha256(encoded).hexdigest()[:16] == "795bf662543da0e2"
    assert hashlib.sha256(decoded.numpy().tobytes()).hexdigest()[:16] == "ce0d165d587c0e57"
    assert COMPRESSION_CODECS["int8"] == INT8_CODEC_ID


def test_int8_zero_tiny_and_extreme_blocks():
    values = torch.zeros(5 * INT8_BLOCK)
    values[INT8_BLOCK : 2 * INT8_BLOCK] = 1e-38  # below the smallest normal x 127: decodes to zeros
    values[2 * INT8_BLOCK] = FLOAT_MAX  # the largest floats keep finite scales
    values[2 * INT8_BLOCK + 1] = -FLOAT_MAX
    values[2 * INT8_BLOCK + 2] = 1e30  # far below the block's step: zero
    values[3 * INT8_BLOCK : 4 * INT8_BLOCK] = (
        torch.finfo(torch.float32).tiny * 127
    )  # the smallest usable scale
    values[4 * INT8_BLOCK + 7] = -2.5
    _, decoded = _int8_round_trip(values)
    assert bool(torch.isfinite(decoded).all())
    assert torch.equal(decoded[: 2 * INT8_BLOCK], torch.zeros(2 * INT8_BLOCK))
    assert (
        decoded[2 * INT8_BLOCK] >= FLOAT_MAX * (1 - 1e-6)
        and decoded[2 * INT8_BLOCK + 1] == -decoded[2 * INT8_BLOCK]
    )
    assert decoded[2 * INT8_BLOCK + 2] == 0
    assert bool((decoded[3 * INT8_BLOCK : 4 * INT8_BLOCK] > 0).all())
    assert decoded[4 * INT8_BLOCK + 7] == -2.5 and int(decoded[4 * INT8_BLOCK :].count_nonzero()) == 1
    # no decoded value is subnormal (their arithmetic depends on the CPU's flush-to-zero mode)
    nonzero = decoded[decoded != 0].abs()
    assert bool((nonzero >= torch.finfo(torch.float32).tiny).all())


@pytest.mark.parametrize("bad", [math.inf, -math.inf, math.nan])
def test_int8_non_finite_block_decodes_to_nan_not_to_a_plausible_value(bad):
    values = _values(3 * INT8_BLOCK, seed=3)
    values[INT8_BLOCK + 5] = bad
    _, decoded = _int8_round_trip(values)
    assert bool(
        torch.isnan(decoded[INT8_BLOCK : 2 * INT8_BLOCK]).all()
    )  # the receiver's isfinite check sees it
    assert bool(torch.isfinite(decoded[:INT8_BLOCK]).all()) and bool(
        torch.isfinite(decoded[2 * INT8_BLOCK :]).all()
    )


def test_encoders_leave_their_input_alone_and_accept_any_float_dtype():
    values = _values(2 * INT8_BLOCK + 1, seed=4)
    kept = values.clone()
    for compression in COMPRESSION.values():
        compression.compress(values, CompressionInfo.from_tensor(values), allow_inplace=False)
    assert torch.equal(values, kept)
    assert int8_encode(values.double()).numpy().tobytes() == int8_encode(values).numpy().tobytes()
    with pytest.raises(TypeError):
        int8_encode(torch.arange(5))


def test_fp16_gives_hiveminds_bytes_and_values_and_keeps_non_finite():
    values = _values(3 * INT8_BLOCK, seed=5)
    values[:4] = torch.tensor([1e6, -1e6, 65504.0, 7e-8])  # saturate, saturate, exact, subnormal in fp16
    info = CompressionInfo.from_tensor(values)
    theirs, ours = HivemindFloat16().compress(values, info), COMPRESSION["fp16"].compress(values, info)
    assert ours.SerializeToString() == theirs.SerializeToString()
    assert torch.equal(COMPRESSION["fp16"].extract(ours), HivemindFloat16().extract(theirs))
    saturated = values.clamp(-65504, 65504).half().float()
    assert torch.equal(fp16_decode(fp16_encode(values).numpy().tobytes(), values.numel()), saturated)
    non_finite = torch.tensor([math.inf, -math.inf, math.nan, 1e9, 1.0])
    decoded = fp16_decode(fp16_encode(non_finite).numpy().tobytes(), 5)
    assert decoded[0] == math.inf and decoded[1] == -math.inf and math.isnan(decoded[2])  # hivemind: 65504
    assert decoded[3] == 65504.0 and decoded[4] == 1.0


@pytest.mark.parametrize("name", ["fp16", "int8"])
@pytest.mark.parametrize("shape", [(), (0,), (3, 0, 2), (7,), (33, 65), (2, INT8_BLOCK)])
def test_hivemind_deserializes_our_messages_with_our_decoders(name, shape):
    """peer/compression.py registers our decoders, so hivemind's deserialize_torch_tensor (what the all-reduce
    calls) gives exactly our decoding, in the tensor's shape."""
    values = torch.randn(shape, generator=torch.Generator().manual_seed(6))
    compression = COMPRESSION[name]
    message = compression.compress(values, CompressionInfo.from_tensor(values))
    decoded = deserialize_torch_tensor(runtime_pb2.Tensor.FromString(message.SerializeToString()))
    assert decoded.shape == values.shape and decoded.dtype == torch.float32 and not decoded.requires_grad
    assert torch.equal(decoded, compression.extract(message))
    if values.numel():
        assert float((decoded - values).abs().max()) <= 0.01 * float(values.abs().max())


def test_int8_bytes_on_the_wire_within_one_percent_of_one_byte_per_value():
    values = _values(524288)  # one all-reduce part (hivemind's 2^19-byte parts at 1 byte per value)
    compression = COMPRESSION["int8"]
    info = CompressionInfo.from_tensor(values)
    assert (
        2**19 / (4 * compression.estimate_compression_ratio(info)) % INT8_BLOCK == 0
    )  # whole blocks per part
    message = compression.compress(values, info)
    assert 1.0 < message.ByteSize() / values.numel() < 1.005


def _message(name: str, *, buffer: bytes, size: list[int], dtype: str = "float32") -> runtime_pb2.Tensor:
    return runtime_pb2.Tensor(
        compression=COMPRESSION[name].compression_type, buffer=buffer, size=size, dtype=dtype
    )


@pytest.mark.parametrize(
    "name, buffer, size, dtype",
    [
        ("int8", b"", [10], "float32"),  # empty
        ("int8", bytes(13), [10], "float32"),  # short: the scale and 9 codes
        ("int8", bytes(15), [10], "float32"),  # one byte too many
        ("int8", bytes(14), [10], "float16"),  # int8 always decodes to float32
        ("int8", bytes(14), [10], "int64"),
        (
            "int8",
            bytes(14),
            [2**31, 2**31],
            "float32",
        ),  # a huge claimed shape, a small buffer: nothing allocated
        ("int8", bytes(5), [1] * 40, "float32"),  # too many dimensions
        ("fp16", bytes(19), [10], "float32"),
        ("fp16", bytes(20), [10], "bfloat16"),
        ("fp16", bytes(20), [10], "uint8"),
        ("fp16", bytes(8), [2**32 - 1, 2**32 - 1], "float32"),
    ],
)
def test_malformed_messages_are_rejected_with_a_codec_error(name, buffer, size, dtype):
    with pytest.raises(CodecError):
        deserialize_torch_tensor(_message(name, buffer=buffer, size=size, dtype=dtype))


def test_a_stranger_can_choose_the_scales_but_not_crash_the_decoder():
    """Any scale bytes decode to code x scale: NaN and inf scales give non-finite values (which the reducer's
    check_part and the receivers' within_bound reject), never an exception or a silently finite stand-in."""
    scales = torch.tensor([math.nan, math.inf, -3.0e38, 1e-30], dtype=torch.float32)
    codes = torch.tensor([1, -1, 127, 3], dtype=torch.int8).repeat_interleave(INT8_BLOCK)
    buffer = scales.numpy().tobytes() + codes.numpy().tobytes()
    decoded = deserialize_torch_tensor(_message("int8", buffer=buffer, size=[4 * INT8_BLOCK]))
    blocks = decoded.view(4, INT8_BLOCK)
    assert bool(torch.isnan(blocks[0]).all()) and bool((blocks[1] == -math.inf).all())
    assert bool((blocks[2] == -math.inf).all())  # 127 x -3e38 overflows
    assert bool((blocks[3] == torch.tensor(3e-30)).all())
    # a subnormal scale (no honest encoder writes one) would decode differently on a CPU that flushes subnormals
    subnormal = torch.tensor([1e-45, 1.0], dtype=torch.float32).numpy().tobytes() + bytes(2 * INT8_BLOCK)
    with pytest.raises(CodecError, match="subnormal"):
        deserialize_torch_tensor(_message("int8", buffer=subnormal, size=[2 * INT8_BLOCK]))
