"""The all-reduce's parts as header and payload (peer/wire.py): the same bytes and values as hivemind's messages,
malformed payloads refused, and results written into the tensors bit for bit as the old torch.cat path did."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hivemind.compression import CompressionInfo, deserialize_torch_tensor
from hivemind.proto import averaging_pb2

from peer import wire
from peer.allreduce import write_parts
from peer.compression import COMPRESSION
from peer.outer import tensors_sha256


def values(num_values: int = 5000, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(num_values, generator=generator) * 10.0 ** torch.randint(
        -3, 4, (num_values,), generator=generator
    )


@pytest.mark.parametrize("name", sorted(COMPRESSION))
def test_a_part_has_the_bytes_and_values_of_hiveminds_message(name):
    compression, tensor = COMPRESSION[name], values()
    message = compression.compress(tensor, CompressionInfo.from_tensor(tensor))
    header, payload = wire.encode_tensor(compression, tensor)
    assert bytes(payload) == message.buffer
    merged = wire.to_message(
        wire.WirePart(averaging_pb2.AveragingData(tensor_part=header, weight=2.0), payload)
    )
    assert merged.tensor_part == message and merged.weight == 2.0
    # decoded from a received frame's own buffer, and through the p2p daemon's message: the same bits
    decoded = wire.decode_tensor(header, memoryview(bytearray(payload)))
    back = wire.from_message(merged)
    assert not back.header.tensor_part.buffer and bytes(back.payload) == message.buffer
    reference = deserialize_torch_tensor(message)
    for tensor_back in (decoded, wire.decode_tensor(back.header.tensor_part, back.payload)):
        assert tensor_back.dtype == reference.dtype and tensor_back.shape == reference.shape
        assert tensors_sha256([tensor_back]) == tensors_sha256([reference])


def test_an_uncompressed_part_is_sent_and_received_without_copies():
    tensor = values()
    header, payload = wire.encode_tensor(COMPRESSION["none"], tensor)
    assert np.shares_memory(np.asarray(payload), tensor.numpy())
    received = bytearray(payload)
    decoded = wire.decode_tensor(header, memoryview(received))
    assert np.shares_memory(decoded.numpy(), np.frombuffer(received, dtype=np.uint8))


@pytest.mark.parametrize("name", sorted(COMPRESSION))
def test_a_payload_that_does_not_match_its_header_is_refused(name):
    header, payload = wire.encode_tensor(COMPRESSION[name], values(4096))
    for bad in (bytes(payload)[:-1], bytes(payload) + b"\0" * 4, b""):
        with pytest.raises(Exception):  # noqa: B017 (the codecs raise ValueError, RuntimeError or CodecError)
            wire.decode_tensor(header, bad)
    unknown = type(header)()
    unknown.CopyFrom(header)
    unknown.dtype = "no-such-dtype"
    with pytest.raises(Exception):  # noqa: B017
        wire.decode_tensor(unknown, payload)


def test_a_message_without_a_tensor_is_a_part_without_payload():
    part = wire.from_message(averaging_pb2.AveragingData(code=averaging_pb2.INTERNAL_ERROR))
    assert part.payload == b"" and part.header.code == averaging_pb2.INTERNAL_ERROR
    assert wire.to_message(part) == averaging_pb2.AveragingData(code=averaging_pb2.INTERNAL_ERROR)
    assert part.num_bytes() == part.header.ByteSize()


@pytest.mark.parametrize("num_parts", [1, 3])
@pytest.mark.parametrize("contiguous", [True, False])
def test_writing_the_parts_into_a_tensor_gives_the_old_paths_bits(num_parts, contiguous):
    shape = (30, 20)
    averaged = values(600, seed=1)
    parts = list(averaged.split(-(-600 // num_parts)))
    tensor = torch.zeros(shape) if contiguous else torch.zeros(shape[::-1]).t()
    assert tensor.is_contiguous() == contiguous
    old = torch.zeros(shape)
    old.copy_(torch.cat(parts).reshape(shape))  # hivemind's iterate_output_tensors, then tensor.copy_
    write_parts(tensor, parts)
    assert tensors_sha256([tensor.contiguous()]) == tensors_sha256([old])
