"""A butterfly all-reduce whose result is bit-identical on every peer, built on hivemind 1.1.12's averager.

hivemind's AllReduceRunner returns "average minus the sender's part" and each peer adds that to its own
tensor, so peers end up with slightly different floats. Here each shard's reducer sums the contributions
in a canonical order (`outer.average_contributions`), encodes the averaged shard once, and every peer,
the reducer included, decodes and copies those same bytes (DESIGN section 3, invariant I1). The reducer
also rejects non-finite contributions (I6). Matchmaking, RPC plumbing and state streaming stay hivemind's.

Pinned to hivemind==1.1.12: every override below names the upstream method it mirrors and what differs;
importing this module with any other hivemind version fails at once with one line saying so.
"""

# ruff: noqa: E402  (the version check must run before hivemind's internals are imported)
from __future__ import annotations

import hivemind

HIVEMIND_VERSION = "1.1.12"
"""The only hivemind release whose internals (AllReduceRunner, TensorPartReducer, DecentralizedAverager) this
module's overrides were written against and tested with."""


class HivemindVersionError(ImportError):
    """peer.allreduce was imported next to a hivemind release it was not written for."""


if hivemind.__version__ != HIVEMIND_VERSION:
    raise HivemindVersionError(
        f"peer/allreduce.py extends hivemind {HIVEMIND_VERSION} internals but hivemind "
        f"{hivemind.__version__} is installed: pip install hivemind=={HIVEMIND_VERSION}"
    )

import asyncio
import contextlib
import ctypes
import dataclasses
import functools
import gc
import hashlib
import hmac
import math
import multiprocessing as mp
import time
import typing
from collections.abc import AsyncIterator, Callable, Sequence

import torch
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory
from hivemind.averaging import DecentralizedAverager
from hivemind.averaging.allreduce import AllReduceRunner, AveragingMode
from hivemind.averaging.group_info import GroupInfo
from hivemind.averaging.partition import AllreduceException, BannedException, TensorPartReducer
from hivemind.compression import (
    CompressionBase,
    NoCompression,
    deserialize_torch_tensor,
)
from hivemind.p2p import P2PContext, PeerID
from hivemind.proto import averaging_pb2
from hivemind.utils import MPFuture, get_dht_time, get_logger
from hivemind.utils.asyncio import aiter_with_timeout, attach_event_on_finished
from hivemind.utils.streaming import combine_from_streaming

from peer import direct_transport, wire
from peer.direct_transport import DirectError, DirectSettings
from peer.group_closing import EarlyClose, full_group_size
from peer.outer import average_contributions
from peer.pacing import StreamPacer
from peer.rejoin import LedGroups, RejoiningStub
from peer.robust import (
    BAN_S,
    MAX_BANS_GATHERED,
    NORM_CLIP_FACTOR,
    all_finite,
    capped_weights,
    clamp_contribution,
    clip_to_median_norm,
    excluded_members,
    parse_bans,
    within_bound,
)
from peer.swarm_key import OpenAccess
from peer.wire import WirePart

logger = get_logger(__name__)

# Tensors go to the averager process by file descriptor, in every process that averages (the peer also sets it
# before hivemind starts: peer/__main__.py). hivemind's default, "file_system", names each shared tensor in
# /dev/shm and relies on torch_shm_manager to remove it: a process group killed with SIGKILL takes the manager
# with it and its files stay until reboot (benchmarks and tests piled up 20 GB of them here, until the OOM killer
# stopped a run).
torch.multiprocessing.set_sharing_strategy("file_descriptor")

STATE_TENSORS_KEY = "_num_tensors"  # added to served metadata: how many tensors follow (removed on receipt)
HANG_UP_TIMEOUT_S = 30.0  # how long a reducer waits for a sender to hang up when no reducer timeout is set
JOIN_HANG_UP_S = 5.0  # how long a leader keeps a join stream open after its last reply (rpc_join_group)
MAX_BANS_KEPT = 1024  # banned peers remembered at once (expired bans are dropped first)
DIRECT_GROUP_POLL_S = 0.05  # how often a direct connection that arrived before its group checks for it
TRANSPORT_STATS = (
    "bytes_sent",
    "bytes_received",
    "transfer_s",
    "transfer_started_at",
    "transfer_cpu_s",  # CPU time the averager process (all its threads) spent during transfer_s
    "reducers_direct",  # other reducers we sent our parts to over the direct path
    "reducers_p2p",  # ... and through the p2p daemon
    "senders_direct",  # other senders that reached us over the direct path
    "part_bytes",  # the group's part size (allreduce_part_bytes)
    "pace_waits",  # how often one of our streams waited for another to keep in step (peer/pacing.py)
)
TRANSPORT_SECONDS = ("transfer_s", "transfer_started_at", "transfer_cpu_s")  # the stats that are not counts
BANS_QUERY_TIMEOUT_S = 5.0  # how long the training process waits for the averager process's ban list
# The part layout named in the run fingerprint (peer/config.py ALLREDUCE_PART_LAYOUT): changing any of these three
# changes how parts are cut, so it needs a new layout name there.
MIN_PART_BYTES, MAX_PART_BYTES, PARTS_PER_REDUCER = 2**14, 2**21, 4
# (the reply every sender of a part gets, its decoded value)
ReducedPart = tuple[WirePart, torch.Tensor]


def allreduce_part_bytes(num_values: int, group_size: int) -> int:
    """The part size (hivemind's part_size_bytes, after compression) of a group's all-reduce: the largest power of two
    that still gives each reducer PARTS_PER_REDUCER (4) parts of fp32 values, between 16 KiB and 2 MiB. Large parts
    cost fewer Python wake-ups per byte (the CPU is this path's limit on fast links). Enough parts per reducer keep
    sending our parts and receiving the averages overlapped (the link's limit on slow ones), and keep the shards
    even: hivemind hands out whole parts, so with a few large parts per shard some reducers got one more than
    others (at k = 16 on the tiny model, with 512 KiB parts, some reduced nothing and the busiest sent 1.1-1.2x
    the bound). Every member computes the size from what they all know alike (the tensors' size and the group's
    size), so they cut the same parts."""
    target = num_values * 4 // (max(group_size, 1) * PARTS_PER_REDUCER)
    power = 1 << max(target, 1).bit_length() - 1  # the largest power of two <= target
    return min(max(power, MIN_PART_BYTES), MAX_PART_BYTES)


def encode_once(compression: CompressionBase, averaged: torch.Tensor) -> ReducedPart:
    """Encode an averaged part for the wire, as the reply every sender gets, and decode it back: every peer, the
    reducer too, uses the decoded value of these same bytes, so a lossy codec cannot make peers disagree (I1).
    Without compression the bytes are the averaged tensor's own memory, and their decoding is that tensor."""
    header, payload = wire.encode_tensor(compression, averaged)
    decoded = averaged if header.compression == wire.NONE else wire.decode_tensor(header, payload)
    reply = averaging_pb2.AveragingData(code=averaging_pb2.AVERAGED_PART, tensor_part=header)
    return WirePart(reply, payload), decoded


class OrderedPartReducer(TensorPartReducer):
    """Collects every sender's copy of a part, then averages them in canonical order and encodes the result once.

    Everything a sender hands in is checked first: a part of the wrong shape or dtype, a non-finite value or a
    weight that is not a positive finite number fails that sender (AllreduceException, the runner then bans it)
    and never reaches the sum. The sum and the encoding run on the event loop as soon as the last sender's part is
    in: for parts of a few hundred KB that is cheaper than a worker thread's hand-over and wake-ups (the profile in
    docs/PERFORMANCE.md section 0), and the kernel's socket buffers keep the bytes moving meanwhile. Inherited
    unchanged from TensorPartReducer: `on_sender_failed`.
    """

    def __init__(
        self,
        part_shapes: Sequence[torch.Size],
        num_senders: int,
        *,
        part_dtypes: Sequence[torch.dtype],
        order_keys: Sequence[bytes],
        encode: Callable[[torch.Tensor], ReducedPart],
        value_bound: float = 0.0,
        max_weight: float = math.inf,
        combine: Callable[..., torch.Tensor] = average_contributions,
    ):
        # mirrors TensorPartReducer.__init__; adds the expected dtypes, the order keys, the encoder and the bounds
        assert len(part_dtypes) == len(part_shapes) and len(order_keys) == num_senders
        self.part_dtypes, self.order_keys, self.encode = tuple(part_dtypes), order_keys, encode
        self.value_bound = value_bound
        """Every contribution is clamped into [-value_bound, value_bound] (0: no bound; see peer/robust.py)."""
        self.max_weight = max_weight
        """No sender's weight counts for more than this (peer/robust.py max_round_tokens)."""
        self.combine = combine
        """(parts, weights, order keys) -> the part's average: --aggregation (peer/robust.py AGGREGATORS)."""
        self.pending: dict[int, tuple[torch.Tensor, float]] = {}
        self.clipped_senders: set[bytes] = set()
        self.next_turn: asyncio.Future | None = None
        super().__init__(part_shapes, num_senders)

    def reset_accumulators(self) -> None:
        # mirrors TensorPartReducer.reset_accumulators; differs: the parts are kept whole in `pending` (summed
        # later, in canonical order) instead of being added to a running-sum accumulator as they arrive (so none
        # is allocated and zeroed per part), and senders of later parts are woken by `next_turn` (also resolved by
        # finalize)
        assert self.current_part_accumulated_from == self.num_current_senders or self.current_part_index == -1
        self.pending, self.accumulator = {}, None
        if self.current_part_index >= self.num_parts - 1:
            self.finalize()
            return
        self.current_part_index += 1
        self.current_part_accumulated_from = 0
        self.current_part_future = asyncio.Future()
        self.num_current_senders = sum(
            self.current_part_index < failed_index for failed_index in self.sender_failed_after
        )
        self.denominator = 0.0
        if self.next_turn is not None and not self.next_turn.done():
            self.next_turn.set_result(None)
        self.next_turn = asyncio.Future()

    def check_part(
        self, sender_index: int, part_index: int, tensor_part: torch.Tensor, weight: float
    ) -> None:
        """Raise AllreduceException unless the part is exactly what this reducer expects from a sender."""
        if not 0 <= part_index < self.num_parts:
            raise AllreduceException(f"sender {sender_index} sent part {part_index} of {self.num_parts}")
        expected_shape, expected_dtype = self.part_shapes[part_index], self.part_dtypes[part_index]
        if not isinstance(tensor_part, torch.Tensor) or tensor_part.dtype != expected_dtype:
            found = getattr(tensor_part, "dtype", type(tensor_part).__name__)
            raise AllreduceException(
                f"sender {sender_index} sent part {part_index} as {found}, not {expected_dtype}"
            )
        if tensor_part.shape != expected_shape:
            raise AllreduceException(
                f"sender {sender_index} sent part {part_index} of shape {tuple(tensor_part.shape)}, "
                f"not {tuple(expected_shape)}"
            )
        if not (isinstance(weight, float | int) and 0 < weight < float("inf")):
            raise AllreduceException(f"sender {sender_index} sent weight {weight!r}")
        if not all_finite(tensor_part):
            raise AllreduceException(f"sender {sender_index} sent non-finite values in part {part_index}")

    async def accumulate_part(
        self, sender_index: int, part_index: int, tensor_part: torch.Tensor, weight: float = 1.0
    ) -> ReducedPart:
        # mirrors TensorPartReducer.accumulate_part (wait for the part's turn, refuse a banned sender); differs:
        # the turn is `next_turn` (no task per wait: finalize resolves it too), the part is checked (check_part) and
        # stored rather than added, and the result is the (reply, decoded) average instead of a tensor
        assert 0 <= sender_index < self.num_senders, "sender indices are ours, not the sender's"
        if not 0 <= part_index < self.num_parts:
            raise AllreduceException(f"sender {sender_index} sent more than {self.num_parts} parts")
        self.num_parts_received[sender_index] += 1
        while part_index > self.current_part_index:
            await asyncio.wait({self.next_turn})  # never cancels the shared future, unlike awaiting it
            if self.finished.is_set():
                raise AllreduceException(
                    f"attempted to aggregate part in a finalized {self.__class__.__name__}"
                )
        if self.sender_failed_after[sender_index] != float("inf"):
            raise BannedException(f"sender {sender_index} was banned in background")
        assert part_index == self.current_part_index
        current_part_future = self.current_part_future
        if part_index < self.sender_failed_after[sender_index]:
            try:
                self.check_part(sender_index, part_index, tensor_part, weight)
            except AllreduceException:
                self.num_parts_received[sender_index] -= 1  # so banning the sender excludes this very part
                raise
            self.pending[sender_index] = (tensor_part, float(weight))
            self.current_part_accumulated_from += 1
            self.denominator += weight
            self.check_current_part_finished()
        return await current_part_future

    def check_current_part_finished(self) -> None:
        # mirrors TensorPartReducer.check_current_part_finished; differs: the average, over the senders sorted by
        # index and summed in order-key order (average_contributions), and its encoding; a part that every sender
        # failed fails instead of dividing by zero
        assert self.current_part_accumulated_from <= self.num_current_senders
        if self.current_part_accumulated_from != self.num_current_senders:
            return
        future, pending = self.current_part_future, self.pending
        if not pending:
            future.set_exception(AllreduceException("every sender of this part failed"))
        else:
            senders = sorted(pending)
            try:
                future.set_result(
                    self.average_and_encode(
                        [pending[s][0] for s in senders],
                        [pending[s][1] for s in senders],
                        [self.order_keys[s] for s in senders],
                    )
                )
            except Exception as e:  # e.g. a codec that refuses the average: this part fails for its senders
                future.set_exception(e)
        self.reset_accumulators()

    def finalize(self) -> None:
        # extends TensorPartReducer.finalize: senders waiting for their turn wake up (and see `finished`)
        super().finalize()
        if self.next_turn is not None and not self.next_turn.done():
            with contextlib.suppress(RuntimeError):  # called from __del__ too, maybe after the loop closed
                self.next_turn.set_result(None)

    def average_and_encode(
        self, parts: list[torch.Tensor], weights: list[float], order_keys: list[bytes]
    ) -> ReducedPart:
        """Clamp each contribution to the bound, scale it to the group's median norm, cap the weights
        (peer/robust.py), average in canonical order, and encode the result once as the reply every sender gets."""
        clamped = [clamp_contribution(part, self.value_bound) for part in parts]
        clipped, scaled_down = clip_to_median_norm(clamped)
        for i in scaled_down:
            if (
                order_keys[i] not in self.clipped_senders
            ):  # once per sender and all-reduce: an attacker clips every part
                self.clipped_senders.add(order_keys[i])
                logger.warning(
                    f"scaled a contribution down to {NORM_CLIP_FACTOR:g}x the group's median norm (contribution "
                    f"{order_keys[i].hex()[:8]}); later parts of it are scaled silently"
                )
        capped = capped_weights(weights, max_weight=self.max_weight)
        return self.encode(self.combine(clipped, capped, order_keys))


class ExactAllReduceRunner(AllReduceRunner):
    """AllReduceRunner whose reducers return the averaged part itself, encoded once, instead of per-sender deltas."""

    def __init__(
        self,
        *,
        order_keys_by_peer: dict[PeerID, bytes],
        compression: CompressionBase,
        value_bound: float = 0.0,
        group_time: float = 0.0,
        max_weight: float = math.inf,
        combine: Callable[..., torch.Tensor] = average_contributions,
        direct: tuple[direct_transport.Identity, DirectSettings] | None = None,
        direct_endpoints: dict[PeerID, direct_transport.Endpoint] | None = None,
        direct_keys: dict[PeerID, bytes] | None = None,
        **kwargs,
    ):
        # extends AllReduceRunner.__init__: the container returns averages instead of deltas, and hivemind's
        # running-sum TensorPartReducer is replaced by an OrderedPartReducer over the same part shapes
        super().__init__(compression=compression, **kwargs)
        self.compression, self.value_bound = compression, value_bound
        self.group_time = group_time
        """The round's scheduled group time (DHT time). A group closes as soon as every expected peer joined, which
        can be before the slowest of them finished its inner steps; until this time (plus the usual timeouts) a
        member that has not started sending is still on its way, as it would be had the group closed on time."""
        # the shape of every part each reducer owes us, read before sending consumes the container's queues
        self.part_shapes_by_peer = [
            [part.shape for part, _ in parts] for parts in self.tensor_part_container._input_parts_by_peer
        ]
        self.bytes_sent = self.bytes_received = 0
        self.lying_reducers: set[PeerID] = set()
        """Reducers that sent us an averaged part no honest reducer can produce (check_averaged_part)."""
        self.tensor_part_container.return_deltas = False
        self.tensor_part_reducer.num_senders = (
            0  # retire hivemind's reducer quietly (no "received 0%" warning)
        )
        self.tensor_part_reducer.finalize()
        self.tensor_part_reducer = OrderedPartReducer(
            tuple(part.shape for part in self.parts_for_local_averaging),
            len(self.sender_peer_ids),
            part_dtypes=tuple(part.dtype for part in self.parts_for_local_averaging),
            order_keys=[order_keys_by_peer[peer] for peer in self.sender_peer_ids],
            encode=functools.partial(encode_once, compression),
            value_bound=value_bound,
            max_weight=max_weight,
            combine=combine,
        )
        self._streams_serving = 0
        self._all_streams_served = asyncio.Event()
        self._all_streams_served.set()
        self.direct = direct
        """Our key and settings for direct connections to reducers (peer/direct_transport.py); None: p2p only."""
        self.direct_endpoints = direct_endpoints or {}
        """Each member's advertised direct listener (absent: it has none, or advertised garbage)."""
        self.direct_keys = direct_keys or {}
        """Each member's advertised key: a direct connection claiming to be that sender must prove it holds it."""
        self.reducers_by_path = {"direct": 0, "p2p": 0}
        """How many other reducers we sent our parts to over each path."""
        self.senders_direct = 0
        """How many other senders reached us over the direct path."""
        self.pacer = StreamPacer()
        """Keeps our streams to the other reducers in step (peer/pacing.py)."""

    def start_grace_s(self) -> float:
        """How much longer than the usual timeouts a member may take to start: until the group time."""
        return max(0.0, self.group_time - get_dht_time())

    async def _handle_missing_senders(self) -> None:
        # mirrors AllReduceRunner._handle_missing_senders; differs: senders have until the group time plus the
        # sender timeout to start (see group_time), not the sender timeout from now
        timeout = None if self.sender_timeout is None else self.sender_timeout + self.start_grace_s()
        try:
            await asyncio.wait_for(self.all_senders_started.wait(), timeout)
        except asyncio.TimeoutError:
            for peer_id in self.sender_peer_ids:
                if peer_id not in self.active_senders and peer_id not in self.banned_senders:
                    await self._ban_sender(peer_id)

    async def wait_until_served(self, timeout: float | None) -> None:
        """Wait (bounded) until every sender of the shard this peer reduces has received its averaged parts and
        hung up. Our own result can be complete while the last part we owe another peer is still in flight; a
        peer that then left the swarm (its last round) cut that part off and failed the round for the others."""
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self._all_streams_served.wait(), timeout)

    async def run(self) -> AsyncIterator[list[torch.Tensor]]:
        """Run the all-reduce; yields, per tensor, its averaged parts in order (all of them arrived and were checked
        when the first list is yielded; a failed reducer's parts are our own values, see failed_size)."""
        # mirrors AllReduceRunner.run for peers that send (auxiliary mode is refused by ExactAverager); differs: it
        # waits for every reducer's stream to end instead of iterating hivemind's iterate_output_tensors (which
        # concatenates each tensor's parts, a copy the caller then copies again: the caller writes the parts into
        # its tensors in one copy, write_parts)
        container = self.tensor_part_container
        pending_tasks = set()
        if container.num_parts_by_peer[self.ordered_peer_ids.index(self.peer_id)] != 0:
            pending_tasks.add(asyncio.create_task(self._handle_missing_senders()))
        try:
            assert self.peer_id in self.sender_peer_ids, "auxiliary averagers are not supported"
            reducers = {
                asyncio.create_task(self._communicate_with_peer(peer_id))
                for peer_id, num_parts in zip(self.ordered_peer_ids, container.num_parts_by_peer, strict=True)
                if num_parts != 0
            }
            pending_tasks |= reducers
            if reducers:  # each ends with all its parts registered, or our own in their place
                await asyncio.wait(reducers)
            if container.finished.is_set():
                raise AllreduceException("All-reduce was terminated during iteration")
            parts = [part for peer_parts in container._output_parts_by_peer for part in peer_parts]
            first = 0
            for num_parts in container.num_parts_by_tensor:
                yield parts[first : first + num_parts]
                first += num_parts
            self.finalize()
        except BaseException as e:
            self.finalize(exception=e)
            for task in pending_tasks:
                task.cancel()
            raise
        finally:
            for task in pending_tasks:
                try:
                    await task
                except asyncio.CancelledError:
                    pass
                except Exception as inner_exc:
                    logger.debug(f"Task {task} failed with {inner_exc}", exc_info=True)

    async def _communicate_with_peer(self, peer_id: PeerID) -> None:
        """Send our part to one reducer and register the averaged part it returns (ours: decode our own encoding)."""
        # mirrors AllReduceRunner._communicate_with_peer; differs: our own shard's parts go through the codec like
        # everyone else's; what is registered is the averaged part itself, not a delta, checked for the shape and
        # dtype of our own part; opening the stream is bounded by the reducer timeout; we hang up as soon as the
        # last expected part arrived (see rpc_aggregate_part); received bytes are counted; a failure is logged;
        # each averaged part is decoded on the event loop as it arrives (no worker thread: see OrderedPartReducer)
        peer_index = self.ordered_peer_ids.index(peer_id)
        if peer_id == self.peer_id:
            sender_index = self.sender_peer_ids.index(peer_id)
            lossless = isinstance(self.compression, NoCompression)
            for part_index, raw_part in enumerate(self.parts_for_local_averaging):
                # our own part goes through the same lossy encoding as everyone else's, so the result does not
                # depend on which peer happened to reduce which shard (hivemind orders groups randomly); without
                # compression that round trip gives back the same bits, so it is skipped
                tensor_part = (
                    raw_part
                    if lossless
                    else wire.decode_tensor(*wire.encode_tensor(self.compression, raw_part))
                )
                _, decoded = await self.tensor_part_reducer.accumulate_part(
                    sender_index, part_index, tensor_part, weight=self.weight
                )
                self.tensor_part_container.register_processed_part(peer_index, part_index, decoded)
            return
        part_index, expected = 0, self.tensor_part_container.num_parts_by_peer[peer_index]
        stream = None
        try:
            done_sending = asyncio.Event()
            inputs_aiter = attach_event_on_finished(self._generate_input_for_peer(peer_index), done_sending)
            stream = await self._open_stream(peer_id, inputs_aiter)
            if self.should_delay_results(self.peer_id):
                await done_sending.wait()

            expected_parts = self.part_shapes_by_peer[peer_index]
            # the first averaged part waits for every sender of that shard, the slowest included (see group_time)
            first_timeout = (
                None if self.reducer_timeout is None else self.reducer_timeout + self.start_grace_s()
            )
            parts = aiter_with_first_timeout(stream, first_timeout, self.reducer_timeout)
            async with contextlib.aclosing(parts):
                async for message in parts:
                    if message.header.code != averaging_pb2.AVERAGED_PART:
                        code = averaging_pb2.MessageCode.Name(message.header.code)
                        raise AllreduceException(f"{peer_id} sent {code}")
                    self.bytes_received += message.num_bytes()
                    averaged_part = wire.decode_tensor(message.header.tensor_part, message.payload)
                    self.check_averaged_part(peer_id, averaged_part, expected_parts, part_index)
                    self.tensor_part_container.register_processed_part(peer_index, part_index, averaged_part)
                    part_index += 1
                    if part_index == expected:
                        break  # everything arrived: hang up now, the reducer waits for that before it closes
            if part_index != expected:
                raise AllreduceException(f"peer {peer_id} sent {part_index} parts, expected {expected}")
        except BaseException as e:
            if isinstance(e, Exception):  # say exactly where it happened
                logger.warning(f"reducer {peer_id} failed after {part_index} of {expected} parts: {e!r}")
            self.tensor_part_container.register_failed_reducer(peer_index)
            raise
        finally:
            self.pacer.close(peer_index)  # at once: our parts' generator may be closed only when collected
            if stream is not None:  # close our end of the stream (hivemind's p2p reader closes its writer)
                await stream.aclose()

    async def _open_stream(self, peer_id: PeerID, inputs: AsyncIterator[WirePart]):
        """The stream of our parts to one reducer and its averaged parts back: over a direct connection when both
        of us have the direct path and it connects, else (silently) through the p2p daemon. Both carry the same
        parts (as AveragingData messages through the daemon), so everything the runner does with them is the same
        on either path."""
        endpoint = self.direct_endpoints.get(peer_id)
        if self.direct is not None and endpoint is not None:
            identity, settings = self.direct
            paced = len(self.ordered_peer_ids) > 2  # more than one other reducer: streams to keep in step
            try:
                stream = await direct_transport.connect(
                    endpoint,
                    inputs,
                    identity=identity,
                    group_id=self.group_id,
                    sender=self.peer_id.to_bytes(),
                    reducer=peer_id.to_bytes(),
                    settings=settings,
                    paced=paced,
                )
                self.reducers_by_path["direct"] += 1
                return stream
            except DirectError as e:
                logger.debug(f"no direct connection to {peer_id}, using the p2p stream: {e}")
        self.reducers_by_path["p2p"] += 1
        # bounded: opening a stream to a peer that was just killed can otherwise hang until hivemind's whole
        # allreduce_timeout, long after the other peers gave up on the round
        messages = await asyncio.wait_for(
            self._get_peer_stub(peer_id).rpc_aggregate_part(_amap(wire.to_message, inputs)),
            self.reducer_timeout,
        )
        return _P2PParts(messages)

    def direct_handler(self, sender: bytes, key: bytes) -> direct_transport.Handler | None:
        """How a direct connection that proved it holds `key` and claims to be `sender` is served: exactly like a
        p2p stream from that sender (serve_parts); None unless that member of ours advertised that key."""
        try:
            peer_id = PeerID(sender)
        except Exception:  # a stranger's bytes that are no peer id
            return None
        if peer_id not in self.sender_peer_ids or peer_id == self.peer_id:
            return None
        advertised = self.direct_keys.get(peer_id)
        if advertised is None or not hmac.compare_digest(advertised, key):
            return None
        self.senders_direct += 1
        context = P2PContext(handle_name="direct", local_id=self.peer_id, remote_id=peer_id)
        return functools.partial(self.serve_parts, context=context)

    def check_averaged_part(
        self, reducer: PeerID, part: torch.Tensor, expected_shapes: Sequence[torch.Size], index: int
    ) -> None:
        """A reducer's averaged part must be one we can use: the shape and dtype of the part we sent it, finite, and
        within the bound every contribution was clamped to (I8). Otherwise the round fails (for every peer that
        received it: they all received the same bytes) rather than apply a poisoned average."""
        if index >= len(expected_shapes):
            self.lying_reducers.add(reducer)
            raise AllreduceException(f"reducer {reducer} sent more than {len(expected_shapes)} parts")
        expected = expected_shapes[index]
        if part.dtype != torch.float32 or part.shape != expected:
            self.lying_reducers.add(reducer)
            raise AllreduceException(
                f"reducer {reducer} sent part {index} as {part.dtype} {tuple(part.shape)}, "
                f"not float32 {tuple(expected)}"
            )
        if not within_bound(part, self.value_bound):
            self.lying_reducers.add(reducer)
            raise AllreduceException(
                f"reducer {reducer} sent part {index} with values that are not finite or beyond the bound "
                f"{self.value_bound:.3g} every contribution was clamped to"
            )

    async def _generate_input_for_peer(self, peer_index: int) -> AsyncIterator[WirePart]:
        # mirrors AllReduceRunner._generate_input_for_peer and TensorPartContainer.iterate_input_parts_for; differs:
        # each part is encoded on the event loop as it is asked for (no worker thread), into a WirePart, and the
        # bytes sent are counted; parts are handed over in step with our other streams (peer/pacing.py: a part is
        # handed over when the transport asks for the next one). Without compression the payload is a copy of the
        # part (the transport sends it from that memory, and our tensors are overwritten with the result)
        container = self.tensor_part_container
        assert not container._inputs_consumed_by_peer[peer_index], "input parts of that peer were consumed"
        container._inputs_consumed_by_peer[peer_index] = True
        lossless = isinstance(self.compression, NoCompression)
        self.pacer.open(peer_index)
        try:
            for part_index, (part, _) in enumerate(container._input_parts_by_peer[peer_index]):
                await self.pacer.wait_turn(peer_index, part_index)
                tensor_part, payload = wire.encode_tensor(
                    self.compression, part.clone() if lossless else part
                )
                header = averaging_pb2.AveragingData(tensor_part=tensor_part, weight=self.weight)
                if part_index == 0:
                    header.code, header.group_id = averaging_pb2.PART_FOR_AVERAGING, self.group_id
                message = WirePart(header, payload)
                self.bytes_sent += message.num_bytes()
                yield message
                self.pacer.sent(peer_index)
        finally:
            self.pacer.close(peer_index)

    async def rpc_aggregate_part(
        self, stream: typing.AsyncIterator[averaging_pb2.AveragingData], context: P2PContext
    ) -> typing.AsyncIterator[
        averaging_pb2.AveragingData
    ]:  # typing's: hivemind reads the hint to see a stream
        """A sender's stream through the p2p daemon: its messages as parts to serve_parts, the replies as messages."""
        async for reply in self.serve_parts(_amap(wire.from_message, stream), context):
            yield wire.to_message(reply)

    async def serve_parts(
        self, stream: AsyncIterator[WirePart], context: P2PContext
    ) -> AsyncIterator[WirePart]:
        """Serve one sender (AllReduceRunner.rpc_aggregate_part), then keep the stream open until it hangs up.

        hivemind's p2p daemon (go-libp2p-daemon v0.5.0.hivemind1, stream.go `doStreamPipe`) pipes each stream
        between a unix socket and a yamux stream, and the side whose socket closes first calls Close(), i.e.
        CloseRead() then CloseWrite(). CloseRead wakes the daemon's other pipe goroutine, whose blocked Read now
        fails with ErrStreamReset, and it calls Reset(). If that goroutine wins the race against CloseWrite
        (likely when the machine is loaded), the stream is reset instead of half-closed: the RST overtakes the
        last data, and yamux discards whatever the receiving daemon had buffered but not yet forwarded; the
        receiver sees a clean end one part short. So the reducer never closes first: the sender hangs up once
        it has every averaged part (`_communicate_with_peer`), which makes hivemind's stream handler cancel us;
        only then does our side close, with nothing left in flight in either direction."""
        # mirrors AllReduceRunner.rpc_aggregate_part, over parts instead of messages; extends it: the wait for the
        # hang-up; streams are counted for wait_until_served, so the all-reduce returns only once every sender
        # received its parts
        if context.remote_id not in self.sender_peer_ids:  # e.g. a member the group's majority excluded
            yield WirePart(averaging_pb2.AveragingData(code=averaging_pb2.PROTOCOL_VIOLATION))
            return
        self._streams_serving += 1
        self._all_streams_served.clear()
        served = 0
        try:
            async for message in self._serve_sender(stream, context):
                served += message.header.code == averaging_pb2.AVERAGED_PART
                yield message
            if served and served == self.tensor_part_reducer.num_parts:
                # bounded like the sender's own wait for each part; cancelled when the sender hangs up
                await asyncio.sleep(self.reducer_timeout or HANG_UP_TIMEOUT_S)
        finally:
            self._streams_serving -= 1
            if not self._streams_serving:
                self._all_streams_served.set()

    async def _serve_sender(
        self, stream: AsyncIterator[WirePart], context: P2PContext
    ) -> AsyncIterator[WirePart]:
        # mirrors AllReduceRunner.rpc_aggregate_part (hivemind 1.1.12) line by line, over parts; differs: the timeout
        # per part is asyncio.timeout (no task per part, as aiter_with_timeout's wait_for makes)
        sender_index = self.sender_peer_ids.index(context.remote_id)
        self.active_senders.add(context.remote_id)
        if len(self.active_senders) == len(self.sender_peer_ids):
            self.all_senders_started.set()

        def reply(code: int) -> WirePart:
            return WirePart(averaging_pb2.AveragingData(code=code))

        try:
            async with asyncio.timeout(self.sender_timeout):
                request: WirePart = await anext(aiter(stream))
            reason_to_reject = self._check_reasons_to_reject(request.header, context)
            if reason_to_reject:
                yield WirePart(reason_to_reject)
                return
            elif request.header.code == averaging_pb2.PART_FOR_AVERAGING:
                parts = aiter_with_first_timeout(
                    _prepend(request, stream), self.sender_timeout, self.sender_timeout
                )
                if not self.should_delay_results(context.remote_id):
                    async for message in self._accumulate_parts_streaming(parts, sender_index):
                        yield message
                else:
                    done_receiving = asyncio.Event()
                    delayed_results = asyncio.Queue()

                    async def _accumulate_parts():
                        try:
                            async for message in self._accumulate_parts_streaming(
                                attach_event_on_finished(parts, done_receiving), sender_index
                            ):
                                delayed_results.put_nowait(message)
                        finally:
                            delayed_results.put_nowait(None)

                    accumulate_task = asyncio.create_task(_accumulate_parts())
                    await done_receiving.wait()
                    while True:
                        next_result = await delayed_results.get()
                        if next_result is None:
                            break
                        yield next_result
                    await accumulate_task
            else:
                yield reply(averaging_pb2.INTERNAL_ERROR)
                code = averaging_pb2.MessageCode.Name(request.header.code)
                raise AllreduceException(f"{context.remote_id} sent {code}")
        except BaseException as e:
            await self._ban_sender(context.remote_id)
            if isinstance(e, Exception):
                logger.debug(f"Caught {repr(e)} when communicating with {context.remote_id}", exc_info=True)
                yield reply(averaging_pb2.INTERNAL_ERROR)
            else:
                raise  # CancelledError, StopIteration and similar

    async def _accumulate_parts_streaming(self, stream: AsyncIterator[WirePart], sender_index: int):
        # mirrors AllReduceRunner._accumulate_parts_streaming; differs: each reply is the averaged part encoded
        # once by the reducer (the same bytes for every sender) instead of "average minus this sender's part"
        # encoded per sender; parts are decoded on the event loop as they arrive; bytes are counted
        part_index = 0
        try:
            async for message in stream:
                self.bytes_received += message.num_bytes()
                tensor_part = wire.decode_tensor(message.header.tensor_part, message.payload)
                try:
                    reply, _ = await self.tensor_part_reducer.accumulate_part(
                        sender_index, part_index, tensor_part, weight=message.header.weight
                    )
                    part_index += 1
                except BannedException:
                    break
                self.bytes_sent += reply.num_bytes()
                yield reply
        finally:
            if part_index != self.tensor_part_reducer.num_parts:
                await self._ban_sender(self.sender_peer_ids[sender_index])


def write_parts(tensor: torch.Tensor, parts: Sequence[torch.Tensor]) -> None:
    """Copy a tensor's averaged parts (in order) into it: one copy, straight into its memory when it is contiguous."""
    if len(parts) == 1:
        tensor.copy_(parts[0].view(tensor.shape))
    elif tensor.is_contiguous():
        torch.cat(parts, out=tensor.view(-1))
    else:
        tensor.copy_(torch.cat(parts).view(tensor.shape))


async def _amap(function: Callable, iterable: AsyncIterator) -> AsyncIterator:
    """`function` applied to each item of an async iterable."""
    async for item in iterable:
        yield function(item)


async def _prepend(first, iterable: AsyncIterator) -> AsyncIterator:
    """`first`, then the rest of an async iterable."""
    yield first
    async for item in iterable:
        yield item


class _P2PParts:
    """A p2p stream of AveragingData replies as parts, closable like a DirectStream."""

    def __init__(self, messages):
        self._messages = messages

    def __aiter__(self):
        return _amap(wire.from_message, self._messages)

    async def aclose(self) -> None:
        await self._messages.aclose()


def _state_request_type() -> type:
    """A state request that can carry the requester's token (peer/swarm_key.py). hivemind's DownloadRequest has no
    field at all; this message is the same bytes on the wire when the token is empty (an open swarm), so it is
    compatible both ways."""
    file = descriptor_pb2.FileDescriptorProto(
        name="diloco_swarm/state_request.proto", package="diloco_swarm", syntax="proto3"
    )
    message = file.message_type.add(name="StateRequest")
    message.field.add(
        name="token",
        number=1,
        type=descriptor_pb2.FieldDescriptorProto.TYPE_BYTES,
        label=descriptor_pb2.FieldDescriptorProto.LABEL_OPTIONAL,
    )
    pool = descriptor_pool.DescriptorPool()
    pool.Add(file)
    return message_factory.GetMessageClass(pool.FindMessageTypeByName("diloco_swarm.StateRequest"))


StateRequest = _state_request_type()


def gathered_metadata(serializer, gathered: bytes, peer_id: PeerID, access: OpenAccess) -> dict | None:
    """A group member's user metadata from matchmaking: None if it sent something else (it came from a stranger) or,
    in a private swarm, anything not sealed with the swarm key for this very peer id."""
    try:
        user = serializer.loads(serializer.loads(gathered)[2])
    except Exception:
        user = None
    return access.open_metadata(peer_id.to_bytes(), user)


async def aiter_with_first_timeout(
    iterable: AsyncIterator, first_timeout: float | None, timeout: float | None
) -> AsyncIterator:
    """hivemind's aiter_with_timeout, except that the first item may take `first_timeout`; asyncio.timeout instead of
    wait_for, which runs each wait in a task of its own."""
    iterator = iterable.__aiter__()
    item_timeout = first_timeout
    while True:
        try:
            async with asyncio.timeout(item_timeout):
                item = await iterator.__anext__()
        except StopAsyncIteration:
            return
        yield item
        item_timeout = timeout


def metadata_order_key(metadata: dict, peer_id: PeerID) -> bytes:
    """A member's place in the canonical summation order: its data-stream key, or (if it sent none that parses) one
    derived from its peer id, so a malformed entry cannot fail the round for everyone."""
    key = metadata.get("order_key")
    try:
        return (
            bytes.fromhex(key)[:32]
            if isinstance(key, str) and len(key) <= 64
            else hashlib.sha256(peer_id.to_bytes()).digest()
        )
    except ValueError:
        return hashlib.sha256(peer_id.to_bytes()).digest()


class ExactAverager(DecentralizedAverager):
    """DecentralizedAverager that runs ExactAllReduceRunner and serves state from a host-process callback.

    `state_provider()` runs in the training process and returns (metadata dict, list of tensors).
    """

    def __init__(
        self,
        *args,
        state_provider: Callable[[], tuple[dict, list[torch.Tensor]]],
        max_state_requests: int = 2,
        access: OpenAccess | None = None,
        max_weight: float = math.inf,
        combine: Callable[..., torch.Tensor] = average_contributions,
        direct: DirectSettings | None = None,
        part_size_bytes: int | None = None,
        **kwargs,
    ):
        self._state_provider = state_provider
        # None: each group's own (allreduce_part_bytes), as the run fingerprint says; a number: that size always
        # (benchmarks comparing part sizes; every peer of the group must be given the same)
        self._fixed_part_bytes = part_size_bytes
        # a private swarm's key (peer/swarm_key.py): who may join our groups and download our state
        self._access = OpenAccess() if access is None else access
        # the most any sender's weight counts for (peer/robust.py max_round_tokens)
        self._max_weight = max_weight
        self._combine = combine  # --aggregation (peer/robust.py AGGREGATORS)
        # state downloads served at once: each one copies the whole state, so a crowd of requests (or one stranger
        # asking over and over) must not exhaust this peer's memory or bandwidth (I8)
        self._max_state_requests = max_state_requests
        self._state_requests_serving: asyncio.Semaphore | None = None
        # peer id -> time.monotonic() until which it is banned from our groups; used in the averager process only
        self._bans: dict[bytes, float] = {}
        self._early_close: EarlyClose | None = None  # the current step's (averager process)
        # the group we last assembled as a leader, for a member whose stream lost our answer (peer/rejoin.py)
        self._led_groups = LedGroups(keep_s=kwargs.get("allreduce_timeout") or HANG_UP_TIMEOUT_S)
        # the last all-reduce's TRANSPORT_STATS
        self._transport_stats = mp.Array(ctypes.c_double, len(TRANSPORT_STATS))
        self._init_direct(
            direct, dht=args[1] if len(args) > 1 else kwargs["dht"], client_mode=kwargs.get("client_mode")
        )
        super().__init__(*args, **kwargs)

    def _init_direct(self, settings: DirectSettings | None, *, dht, client_mode: bool | None) -> None:
        """(training process, before the averager process forks) Our direct-path key and, unless we are a client,
        our listener, bound now so that its port can go into the metadata we gather."""
        self._direct_settings = settings if settings is not None and settings.enabled else None
        self._direct_identity = direct_transport.Identity() if self._direct_settings else None
        self._direct_server = None
        if self._direct_settings is None or client_mode:
            return
        hosts = self._direct_settings.hosts or direct_transport.hosts_from_maddrs(dht.get_visible_maddrs())
        if not hosts:
            return  # nowhere others could reach us (e.g. relayed only): we still connect out as a sender
        self._direct_settings = dataclasses.replace(self._direct_settings, hosts=hosts)
        try:
            self._direct_server = direct_transport.DirectServer(
                self._direct_settings,
                identity=self._direct_identity,
                peer_id=dht.peer_id.to_bytes(),
                resolve=self._resolve_direct,
            )
        except OSError as e:  # e.g. the port is taken: every part goes through p2p, as before
            logger.warning(f"direct data path not listening ({e}); senders to us use the p2p daemon")

    def direct_metadata(self) -> dict | None:
        """What to add under "direct" to the metadata we gather (None: the direct path is off here)."""
        if self._direct_identity is None:
            return None
        if self._direct_server is None:  # we send directly, but nobody can connect to us
            return {"key": self._direct_identity.public, "port": 0, "hosts": []}
        return self._direct_server.advertised()

    def run(self) -> None:
        # (the averager process, just forked) Everything the training process had allocated (torch, transformers,
        # hivemind: a few hundred thousand objects) goes to the collector's permanent generation. A full collection
        # walked them all, 100-250 ms on the 2-core machine, and one that fell inside an all-reduce held up every
        # member of the group by as much (docs/PERFORMANCE.md, sixth pass).
        gc.freeze()
        super().run()

    def start(self) -> None:
        # extends multiprocessing.Process.start: the averager process now holds the listening socket; ours goes
        super().start()
        if self._direct_server is not None:
            self._direct_server.sock.close()

    async def add_p2p_handlers(self, *args, **kwargs) -> None:
        # extends ServicerBase.add_p2p_handlers, which the averager process calls once on start when it serves
        # (not in client mode): the direct listener starts serving on the same event loop
        await super().add_p2p_handlers(*args, **kwargs)
        if self._direct_server is not None:
            await self._direct_server.start()

    async def _shutdown(self, timeout) -> None:
        if self._direct_server is not None:
            self._direct_server.close()
        await super()._shutdown(timeout)

    async def _resolve_direct(self, group_id: bytes, sender: bytes, key: bytes):
        """(averager process) The runner's handler for an authenticated direct connection, once the group is ours
        (a sender may reach us before we registered it, as on the p2p path); None for a group we never join
        within the all-reduce timeout, or a sender that is not the member who advertised that key."""
        deadline = time.monotonic() + (self._allreduce_timeout or HANG_UP_TIMEOUT_S)
        while group_id not in self._running_groups and (remaining_s := deadline - time.monotonic()) > 0:
            registered = (
                self._pending_groups_registered
            )  # cleared while matchmaking, set as a group registers
            if registered.is_set():  # we are not even looking for a group yet
                await asyncio.sleep(min(DIRECT_GROUP_POLL_S, remaining_s))
            else:
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(registered.wait(), remaining_s)
        future = self._running_groups.get(group_id)
        if future is None:
            return None
        try:
            runner = await asyncio.wait_for(asyncio.shield(future), max(0.0, deadline - time.monotonic()))
        except (asyncio.TimeoutError, asyncio.CancelledError, Exception):
            return None
        return runner.direct_handler(sender, key)

    async def _step(self, *, step, future_for_init):
        # extends DecentralizedAverager._step: as a leader, assemble the group as soon as this peer's all-reduce is
        # triggered and every peer expected in the round joined (peer/group_closing.py) instead of waiting until
        # the group time; no expected count keeps hivemind's "wait until the group time"
        metadata = gathered_metadata(self.serializer, step.data_for_gather, self.peer_id, self._access) or {}
        early_close = EarlyClose(
            self._matchmaking, expected=full_group_size(metadata), round_index=metadata.get("round")
        )
        self._early_close = early_close
        self._follow_no_banned_leader()
        self._led_groups.watch(self._matchmaking)
        # runs once super()._step attached the trigger (synchronously, before its first await)
        closer = asyncio.create_task(early_close.close_once_triggered(step))
        try:
            return await super()._step(step=step, future_for_init=future_for_init)
        finally:
            closer.cancel()

    @classmethod
    def get_stub(cls, p2p, peer: PeerID, *, namespace: str | None = None):
        # extends ServicerBase.get_stub (the stubs hivemind's matchmaking and all-reduce call us with): a join
        # request whose stream is cut off after the leader accepted it asks again once (peer/rejoin.py)
        return RejoiningStub(super().get_stub(p2p, peer, namespace=namespace))

    def _banned(self, peer: PeerID) -> bool:
        """(averager process) Whether a reducer of ours lied, less than BAN_S ago."""
        return self._bans.get(peer.to_bytes(), 0.0) > time.monotonic()

    def _follow_no_banned_leader(self) -> None:
        """(averager process) Never ask a banned peer to lead our group (as a leader, rpc_join_group turns banned
        peers away): a leader assembles its group alone, and in a group of two a liar is no minority to leave out.
        hivemind's matchmaking has no hook for this, so the one method that asks a leader is wrapped, on our own
        Matchmaking instance (Matchmaking._request_join_group, hivemind 1.1.12; its redirects go through it too)."""
        matchmaking = self._matchmaking
        if getattr(matchmaking, "_follows_no_banned_leader", False):
            return
        request_join_group = matchmaking._request_join_group

        async def request_join_group_unless_banned(leader: PeerID):
            if self._banned(leader):
                return None  # as if it had turned us away: matchmaking goes on with the next leader
            return await request_join_group(leader)

        matchmaking._request_join_group = request_join_group_unless_banned
        matchmaking._follows_no_banned_leader = True

    def get_current_state(self):
        # overrides DecentralizedAverager.get_current_state (meant to be overridden): the state comes from the
        # training process's callback instead of the averaged tensors
        metadata, tensors = self._state_provider()
        if isinstance(
            metadata, dict
        ):  # the receiver hangs up once it has this many tensors (_download_state)
            metadata = {**metadata, STATE_TENSORS_KEY: len(tensors)}
        return metadata, tensors, None

    def last_transport_stats(self) -> dict:
        stats = dict(zip(TRANSPORT_STATS, self._transport_stats[:], strict=True))
        return {key: value if key in TRANSPORT_SECONDS else int(value) for key, value in stats.items()}

    def banned_peers(self) -> list[bytes]:
        """The peer ids this peer bans now (the newest MAX_BANS_GATHERED), asked of the averager process: they go into
        our matchmaking metadata, so that the group can exclude a peer that a majority of its members ban."""
        future = MPFuture()
        self._outer_pipe.send(("_banned_peers", [], dict(future=future)))
        try:
            return future.result(timeout=BANS_QUERY_TIMEOUT_S)
        except Exception as e:  # a busy or stopping averager: no bans this round rather than no round
            logger.debug(f"could not read the ban list: {e!r}")
            return []

    async def _banned_peers(self, future: MPFuture) -> None:
        now = time.monotonic()
        self._bans = {peer: until for peer, until in self._bans.items() if until > now}
        newest = sorted(self._bans, key=self._bans.__getitem__, reverse=True)[:MAX_BANS_GATHERED]
        future.set_result(newest)

    def _ban(self, peers: set[PeerID], why: str) -> None:
        """(averager process) Ban peers from our groups for BAN_S."""
        now = time.monotonic()
        for peer in peers:
            logger.warning(f"banning {peer} from our groups for {BAN_S:.0f}s: {why}")
            self._bans[peer.to_bytes()] = now + BAN_S
        if len(self._bans) > MAX_BANS_KEPT:
            newest = sorted(self._bans, key=self._bans.__getitem__, reverse=True)[:MAX_BANS_KEPT]
            self._bans = {peer: self._bans[peer] for peer in newest}

    async def _aggregate_with_group(self, group_info: GroupInfo, min_vector_size: int, **kwargs):
        # extends DecentralizedAverager._aggregate_with_group: the all-reduce runs among the members that no strict
        # majority of the group bans (peer/robust.py excluded_members). Every member computes the same set from the
        # same gathered metadata, so the others agree on who reduces what; an excluded member's all-reduce fails.
        members = [peer.to_bytes() for peer in group_info.peer_ids]
        bans = {
            member: parse_bans(
                (gathered_metadata(self.serializer, gathered, peer_id, self._access) or {}).get("bans")
            )
            for member, peer_id, gathered in zip(
                members, group_info.peer_ids, group_info.gathered, strict=True
            )
        }
        excluded = excluded_members(members, bans)
        if self.peer_id.to_bytes() in excluded:
            raise AllreduceException(
                "a majority of the group bans this peer; it is left out of the all-reduce"
            )
        if excluded:
            kept = [i for i, member in enumerate(members) if member not in excluded]
            logger.warning(
                f"leaving {len(excluded)} banned peer(s) out of the all-reduce: "
                f"{', '.join(str(PeerID(member)) for member in sorted(excluded))}"
            )
            group_info = GroupInfo(
                group_info.group_id,
                tuple(group_info.peer_ids[i] for i in kept),
                tuple(group_info.gathered[i] for i in kept),
            )
        return await super()._aggregate_with_group(group_info, min_vector_size, **kwargs)

    async def _run_allreduce_inplace_(self, tensors, group_info, group_id=None, **kwargs):
        """Replaces hivemind's in-place `tensor += delta` with `tensor = decoded average`, all or nothing."""
        # mirrors DecentralizedAverager._run_allreduce_inplace_; differs: builds an ExactAllReduceRunner with the
        # order keys gathered at matchmaking, refuses auxiliary mode, copies the results only once every part
        # arrived (a failed reducer fails the whole round instead of leaving local values in its shard), bans a
        # reducer whose averaged part failed our checks, waits until the parts this peer owes others were served,
        # and records the transport statistics; each tensor's parts are copied into it at once (write_parts); the
        # part size is the group's (allreduce_part_bytes)
        group_id = group_info.group_id if group_id is None else group_id
        members = {
            peer_id: gathered_metadata(self.serializer, gathered, peer_id, self._access)
            for peer_id, gathered in zip(group_info.peer_ids, group_info.gathered, strict=True)
        }
        outsider = self._outsider(members)
        if (
            outsider is not None
        ):  # before anything is sent: nobody outside the private swarm sees a value of ours
            self._running_groups[group_id].cancel()  # members already streaming to us are turned away
            raise AllreduceException(outsider)
        order_keys = {
            peer_id: metadata_order_key(metadata or {}, peer_id) for peer_id, metadata in members.items()
        }
        # our own bound (honest peers all compute the same one) and group time
        ours = members.get(self.peer_id) or {}
        value_bound, group_time = ours.get("value_bound", 0.0), ours.get("group_time", 0.0)
        started, started_at, cpu_started = time.perf_counter(), time.time(), time.process_time()
        advertised = {peer_id: (metadata or {}).get("direct") for peer_id, metadata in members.items()}
        kwargs["part_size_bytes"] = self._fixed_part_bytes or allreduce_part_bytes(
            sum(tensor.numel() for tensor in tensors), len(group_info.peer_ids)
        )
        runner = ExactAllReduceRunner(
            p2p=self._p2p,
            servicer_type=type(self),
            prefix=self.prefix,
            tensors=tensors,
            group_id=group_id,
            ordered_peer_ids=group_info.peer_ids,
            order_keys_by_peer=order_keys,
            value_bound=float(value_bound),
            group_time=float(group_time) if isinstance(group_time, (int, float)) else 0.0,
            max_weight=self._max_weight,
            combine=self._combine,
            direct=None if self._direct_identity is None else (self._direct_identity, self._direct_settings),
            direct_endpoints={
                peer_id: endpoint
                for peer_id, entry in advertised.items()
                if (endpoint := direct_transport.parse_endpoint(entry)) is not None
            },
            direct_keys={
                peer_id: key
                for peer_id, entry in advertised.items()
                if (key := direct_transport.parse_key(entry)) is not None
            },
            **kwargs,
        )
        assert group_id in self._running_groups, f"group {group_id} was not registered"
        self._running_groups[group_id].set_result(runner)
        if runner.modes[group_info.peer_ids.index(self.peer_id)] == AveragingMode.AUX:
            raise AllreduceException("auxiliary averagers are not supported")
        try:
            averaged = [parts async for parts in runner]
            if runner.tensor_part_container.failed_size:
                raise AllreduceException(
                    f"{runner.tensor_part_container.failed_size} values were not reduced (a reducer failed)"
                )
        finally:
            self._ban(runner.lying_reducers, "it sent an averaged part that no honest reducer can produce")
        await runner.wait_until_served(runner.reducer_timeout)
        for tensor, parts in zip(tensors, averaged, strict=True):
            write_parts(tensor, parts)
        self._transport_stats[:] = [
            runner.bytes_sent,
            runner.bytes_received,
            time.perf_counter() - started,
            started_at,
            time.process_time() - cpu_started,
            runner.reducers_by_path["direct"],
            runner.reducers_by_path["p2p"],
            runner.senders_direct,
            kwargs["part_size_bytes"],
            runner.pacer.num_waits,
        ]

    def _outsider(self, members: dict[PeerID, dict | None]) -> str | None:
        """Why this group must not average, if one of its members is not of our private swarm (None: all are).
        Every member checks every other's metadata, so a group an outsider assembled or slipped into fails for all
        before a single value is sent."""
        if not self._access.private:
            return None  # an open swarm: anyone may join (the all-reduce itself is robust, peer/robust.py)
        ours = members.get(self.peer_id)
        for peer_id, metadata in members.items():
            if metadata is None:
                return f"group member {peer_id} does not hold the swarm key; not averaging with it"
            if ours is not None and metadata.get("round") != ours.get("round"):
                return f"group member {peer_id} is in another round; not averaging with it"
        return None

    async def rpc_join_group(
        self, request: averaging_pb2.JoinRequest, context: P2PContext
    ) -> typing.AsyncIterator[averaging_pb2.MessageFromLeader]:  # typing's: hivemind reads the hints
        # wraps DecentralizedAverager.rpc_join_group: the replies of _join_group_replies, then our end of the stream
        # stays open until the follower hangs up. hivemind's handler returns right after its last message (the
        # group, BEGIN_ALLREDUCE) and p2p then closes our end first, which lets the daemon reset the stream with
        # that message still in flight (the race scripts/repro_stream_reset.py shows): the follower then never
        # learns of the group it is in, and the group's round fails. hivemind cancels this handler once the
        # follower hangs up, as the reducers' rpc_aggregate_part relies on; a follower that never does is let go
        # after JOIN_HANG_UP_S.
        async for response in self._join_group_replies(request, context):
            yield response
        await asyncio.sleep(JOIN_HANG_UP_S)

    async def _join_group_replies(
        self, request: averaging_pb2.JoinRequest, context: P2PContext
    ) -> typing.AsyncIterator[averaging_pb2.MessageFromLeader]:
        """hivemind's replies to a join request, except: in a private swarm a leader refuses at once a follower whose
        metadata is not sealed with the swarm key for its own (libp2p-authenticated) peer id; a banned one too; a
        member of the group we just assembled that asks again gets the group (peer/rejoin.py)."""
        metadata = gathered_metadata(self.serializer, request.gather, context.remote_id, self._access)
        if self._access.private and metadata is None:
            logger.debug(f"refused a join request from {context.remote_id}: no swarm key")
            yield averaging_pb2.MessageFromLeader(code=averaging_pb2.PROTOCOL_VIOLATION)
            return
        if self._banned(context.remote_id):  # and a reducer that lied to us never joins a group we lead
            yield averaging_pb2.MessageFromLeader(code=averaging_pb2.PROTOCOL_VIOLATION)
            return
        if (group := self._led_groups.answer(context.remote_id, request)) is not None:
            yield group  # a member of the group we assembled, whose stream lost our answer, asks again
            return
        if self._early_close is not None and metadata is not None:
            self._early_close.count_in(metadata)  # a late member expects itself too
        async for response in super().rpc_join_group(request, context):
            yield response

    async def rpc_download_state(
        self, request: StateRequest, context: P2PContext
    ) -> typing.AsyncIterator[
        averaging_pb2.DownloadData
    ]:  # typing's: hivemind reads this hint to route the RPC
        # wraps DecentralizedAverager.rpc_download_state: at most max_state_requests are served at once; a request
        # beyond that is refused at once (the downloader moves on to its next donor); in a private swarm, a request
        # without the token of the requester's own peer id is refused too
        if not self._access.may_download(context.remote_id.to_bytes(), getattr(request, "token", b"")):
            logger.debug(f"refused a state request from {context.remote_id}: no swarm key")
            return
        if self._state_requests_serving is None:  # created in the averager process, on its event loop
            self._state_requests_serving = asyncio.Semaphore(self._max_state_requests)
        # extends it too: after the last chunk the stream stays open until the receiver hangs up, for the reason
        # given in ExactAllReduceRunner.rpc_aggregate_part
        if self._state_requests_serving.locked():
            return
        async with self._state_requests_serving:
            num_sent = 0
            async for message in super().rpc_download_state(request, context):
                num_sent += 1
                yield message
            if num_sent:  # cancelled when the receiver hangs up
                await asyncio.sleep(self.next_chunk_timeout or HANG_UP_TIMEOUT_S)

    def load_state_from(
        self,
        donor: PeerID,
        *,
        chunk_timeout_s: float,
        total_timeout_s: float,
        max_bytes: int,
        min_rate_bytes_s: float = 0.0,
    ) -> tuple[dict, list[torch.Tensor]] | None:
        """Download (metadata, tensors) from one given peer; None if it refused, failed, sent more than `max_bytes`,
        took longer than `total_timeout_s`, or, after its first `chunk_timeout_s`, had sent less than
        `min_rate_bytes_s` per second (a donor that trickles data is dropped early, leaving time for the next)."""
        future = MPFuture()
        self._outer_pipe.send(
            (
                "_load_state_from",
                [],
                dict(
                    donor=donor,
                    timeout=chunk_timeout_s,
                    total_timeout=total_timeout_s,
                    max_bytes=max_bytes,
                    min_rate=min_rate_bytes_s,
                    future=future,
                ),
            )
        )
        try:
            return future.result(timeout=total_timeout_s + chunk_timeout_s)
        except Exception:  # the averager gives up by total_timeout itself; this bounds a stuck pipe too
            return None

    async def _load_state_from(
        self,
        donor: PeerID,
        timeout: float,
        total_timeout: float,
        max_bytes: int,
        future: MPFuture,
        min_rate: float = 0.0,
    ) -> None:
        # mirrors the per-peer body of DecentralizedAverager._load_state_from_peers, for one given donor (hivemind
        # picks donors itself), with the opening of the stream, the whole download, its size and its rate bounded
        try:
            download = self._download_state(donor, timeout, max_bytes, future, min_rate)
            await asyncio.wait_for(download, total_timeout)
        except Exception as e:
            logger.debug(f"state download from {donor} failed: {e!r}", exc_info=True)
        finally:
            if not future.done():
                future.set_result(None)

    async def _download_state(
        self, donor: PeerID, timeout: float, max_bytes: int, future: MPFuture, min_rate: float = 0.0
    ) -> None:
        """We hang up as soon as the number of tensors the donor announced in its metadata arrived whole (the donor
        keeps its end open until then, see rpc_download_state); a shorter stream is a failed download."""
        stub = self.get_stub(self._p2p, donor, namespace=self.prefix)
        request = StateRequest(token=self._access.state_token(self.peer_id.to_bytes()))
        stream = await asyncio.wait_for(stub.rpc_download_state(request), timeout)
        metadata, parts, tensors, received = None, [], [], 0
        num_tensors, chunks_left = None, 0
        started = time.monotonic()
        try:
            async for message in aiter_with_timeout(stream, timeout=timeout):
                received += message.ByteSize()
                if received > max_bytes:
                    raise AllreduceException(
                        f"donor {donor} sent more than the {max_bytes} bytes a state can take"
                    )
                late_s = time.monotonic() - started - timeout  # a chunk timeout's grace to start sending
                if late_s > 0 and received < min_rate * late_s:
                    raise AllreduceException(
                        f"donor {donor} sent {received} bytes in {late_s + timeout:.0f}s, slower than "
                        f"{min_rate:.0f} bytes/s (the rate that delivers a state within the state timeout)"
                    )
                if message.metadata:
                    metadata = self.serializer.loads(message.metadata)
                    if isinstance(metadata, dict):
                        num_tensors = metadata.pop(STATE_TENSORS_KEY, None)
                if message.tensor_part.dtype:  # a dtype marks the first chunk of the next tensor
                    if parts:
                        tensors.append(deserialize_torch_tensor(combine_from_streaming(parts)))
                    parts, chunks_left = [], max(message.tensor_part.chunks, 1)
                parts.append(message.tensor_part)
                chunks_left -= 1
                if chunks_left == 0 and isinstance(num_tensors, int) and len(tensors) + 1 == num_tensors:
                    break  # everything arrived: hang up
        finally:
            await stream.aclose()
        if parts:
            tensors.append(deserialize_torch_tensor(combine_from_streaming(parts)))
        if num_tensors is not None and (len(tensors) != num_tensors or chunks_left != 0):
            raise AllreduceException(f"donor {donor} sent {len(tensors)} of {num_tensors} tensors")
        future.set_result((metadata, tensors) if isinstance(metadata, dict) else None)
