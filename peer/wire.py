"""The all-reduce's parts as they travel: a small AveragingData header and the tensor's bytes beside it, so that on the
direct path (peer/direct_transport.py) no part's bytes are copied into or out of a protobuf message; the p2p daemon's
streams carry the same parts merged back into one AveragingData (to_message, from_message)."""

from __future__ import annotations

import typing

import numpy as np
import torch
from hivemind.compression import CompressionBase, CompressionInfo
from hivemind.compression.serialization import _BASE_COMPRESSION_TYPES
from hivemind.proto import averaging_pb2, runtime_pb2

NONE = runtime_pb2.CompressionType.NONE
Payload = bytes | bytearray | memoryview


class WirePart(typing.NamedTuple):
    """One message of the all-reduce: everything but the tensor's bytes in `header`, the bytes in `payload`."""

    header: averaging_pb2.AveragingData
    """The message; its tensor_part has no buffer (the payload is its buffer)."""
    payload: Payload = b""
    """The tensor_part's buffer (empty for a message without a tensor)."""

    def num_bytes(self) -> int:
        """The bytes this part takes on the wire, protobuf framing of the header included."""
        return self.header.ByteSize() + len(self.payload)


class _BufferView:
    """A runtime_pb2.Tensor look-alike whose buffer is the payload, for a codec's `extract` (no copy of the bytes
    into a message); it offers the fields the codecs read."""

    __slots__ = ("compression", "size", "dtype", "buffer", "requires_grad")

    def __init__(self, header: runtime_pb2.Tensor, payload: Payload):
        self.compression, self.size, self.dtype = header.compression, header.size, header.dtype
        self.buffer, self.requires_grad = payload, False


def tensor_bytes(tensor: torch.Tensor) -> memoryview:
    """The bytes of a contiguous CPU tensor, without a copy."""
    assert tensor.is_contiguous()
    return memoryview(tensor.numpy()).cast("B")


def encode_tensor(compression: CompressionBase, tensor: torch.Tensor) -> tuple[runtime_pb2.Tensor, Payload]:
    """(header, payload) of `tensor` under `compression`: the same bytes compression.compress puts in a message.
    Without compression the payload is the tensor's own memory: the caller must not change the tensor until it
    was sent (pass a copy of a tensor it does not own)."""
    if compression.compression_type == NONE and tensor.dtype == torch.float32:
        tensor = tensor.detach().contiguous()
        header = runtime_pb2.Tensor(compression=NONE, size=tensor.shape, dtype="float32")
        return header, tensor_bytes(tensor)
    serialized = compression.compress(tensor, CompressionInfo.from_tensor(tensor), allow_inplace=False)
    payload = serialized.buffer
    serialized.ClearField("buffer")
    return serialized, payload


def decode_tensor(header: runtime_pb2.Tensor, payload: Payload) -> torch.Tensor:
    """The tensor a (header, payload) holds, decoded as hivemind's deserialize_torch_tensor would decode the merged
    message (a stranger's: any malformed field raises). Without compression, the tensor shares the payload's memory
    (a received frame's own buffer)."""
    shape = torch.Size(header.size)
    if header.compression == NONE and header.dtype != "bfloat16":
        return torch.as_tensor(np.frombuffer(payload, dtype=np.dtype(header.dtype))).reshape(shape)
    name = runtime_pb2.CompressionType.Name(header.compression)
    return _BASE_COMPRESSION_TYPES[name].extract(_BufferView(header, payload))


def to_message(part: WirePart) -> averaging_pb2.AveragingData:
    """The part as one AveragingData (for the p2p daemon's streams)."""
    message = averaging_pb2.AveragingData()
    message.CopyFrom(part.header)
    if len(part.payload):
        message.tensor_part.buffer = bytes(part.payload)
    return message


def from_message(message: averaging_pb2.AveragingData) -> WirePart:
    """A received AveragingData as a part (the message becomes its header)."""
    if not message.HasField("tensor_part"):
        return WirePart(message)
    payload = message.tensor_part.buffer
    message.tensor_part.ClearField("buffer")
    return WirePart(message, payload)
