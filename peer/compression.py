"""The all-reduce's compressions (none, fp16, int8) as hivemind CompressionBase objects over peer/codec.py, and their
registration as the decoders hivemind's deserialize_torch_tensor uses for those wire types in this process."""

from __future__ import annotations

import torch
from hivemind.compression import CompressionBase, CompressionInfo, NoCompression
from hivemind.compression import serialization as hivemind_serialization
from hivemind.proto import runtime_pb2

from peer.codec import (
    INT8_BLOCK,
    CodecError,
    checked_shape,
    fp16_decode,
    fp16_encode,
    int8_decode,
    int8_encode,
)

FP16_DTYPES = {"float16": torch.float16, "float32": torch.float32, "float64": torch.float64}
"""The dtypes an fp16 message may say its tensor had before encoding (as hivemind's Float16Compression writes)."""


class Int8Compression(CompressionBase):
    """Blockwise absmax int8 (peer/codec.py): 1 byte per value plus a float32 scale per block of INT8_BLOCK values.
    Always decodes to float32."""

    compression_type = runtime_pb2.CompressionType.BLOCKWISE_8BIT

    def compress(
        self, tensor: torch.Tensor, info: CompressionInfo, allow_inplace: bool = False
    ) -> runtime_pb2.Tensor:
        return runtime_pb2.Tensor(
            compression=self.compression_type,
            buffer=int8_encode(tensor).numpy().tobytes(),
            size=tensor.shape,
            dtype="float32",
        )

    def extract(self, serialized_tensor: runtime_pb2.Tensor) -> torch.Tensor:
        if serialized_tensor.dtype != "float32":
            raise CodecError(f"an int8 message must decode to float32, not {serialized_tensor.dtype!r}")
        shape, num_values = checked_shape(serialized_tensor.size)
        return int8_decode(serialized_tensor.buffer, num_values).reshape(shape)

    def estimate_compression_ratio(self, info: CompressionInfo) -> float:
        # hivemind sizes the all-reduce's parts by this (part bytes / (4 x ratio) values). The scales are left out
        # (0.4 % more bytes per part) so that a part holds a whole number of blocks: then the blocks are the same
        # as over the whole tensor, and peer/replicas.py's simulation quantizes exactly as the network does
        return 8 / torch.finfo(info.descriptor.dtype).bits


class Float16Compression(CompressionBase):
    """float16, the same bytes as hivemind's Float16Compression (saturating finite values beyond +-65504), with
    one cast instead of hivemind's copy, clamp and cast, and infinities and NaN kept (peer/codec.py fp16_encode)."""

    compression_type = runtime_pb2.CompressionType.FLOAT16

    def compress(
        self, tensor: torch.Tensor, info: CompressionInfo, allow_inplace: bool = False
    ) -> runtime_pb2.Tensor:
        dtype = str(tensor.dtype).removeprefix("torch.")
        if dtype not in FP16_DTYPES:
            raise ValueError(f"{type(self).__name__} does not support {tensor.dtype} tensors")
        return runtime_pb2.Tensor(
            compression=self.compression_type,
            buffer=fp16_encode(tensor).numpy().tobytes(),
            size=tensor.shape,
            dtype=dtype,
        )

    def extract(self, serialized_tensor: runtime_pb2.Tensor) -> torch.Tensor:
        dtype = FP16_DTYPES.get(serialized_tensor.dtype)
        if dtype is None:
            raise CodecError(f"an fp16 message cannot decode to {serialized_tensor.dtype!r}")
        shape, num_values = checked_shape(serialized_tensor.size)
        return fp16_decode(serialized_tensor.buffer, num_values, dtype).reshape(shape)

    def estimate_compression_ratio(self, info: CompressionInfo) -> float:
        return 16 / torch.finfo(info.descriptor.dtype).bits


COMPRESSION: dict[str, CompressionBase] = {
    "none": NoCompression(),
    "fp16": Float16Compression(),
    "int8": Int8Compression(),
}
"""--compression's choices, as the all-reduce's codec objects."""

# Registration. hivemind decodes every tensor it receives with deserialize_torch_tensor, which picks the decoder
# from the message's compression enum in this table; peer/allreduce.py calls it for the parts senders send, for the
# averaged parts reducers send back and for our own round trip, in several places. Registering our decoders here
# (rather than decoding explicitly there) leaves the transport untouched and covers every path at once, in this
# process and in the averager process it forks. The wire types keep hivemind's names: FLOAT16 has hivemind's byte
# layout; BLOCKWISE_8BIT ("blockwise 8-bit") now means ours, and hivemind's bitsandbytes decoder, which trusts the
# block counts written in the buffer, no longer sees bytes from other peers. Peers on the old int8 format never
# meet ours: the run fingerprint names the int8 format (peer/config.py COMPRESSION_CODECS).
for _compression in (COMPRESSION["fp16"], COMPRESSION["int8"]):
    _name = runtime_pb2.CompressionType.Name(_compression.compression_type)
    assert _name in hivemind_serialization._BASE_COMPRESSION_TYPES, (
        f"hivemind has no {_name} decoder to replace"
    )
    hivemind_serialization._BASE_COMPRESSION_TYPES[_name] = _compression

assert INT8_BLOCK & (INT8_BLOCK - 1) == 0, (
    "parts of 2^k values hold whole blocks only if the block size is 2^j"
)
