"""The direct data path's handshake and framing (peer/direct_transport.py), over socket pairs: no network (one test
uses a loopback TCP connection, for the socket options)."""

from __future__ import annotations

import asyncio
import socket

import pytest
from hivemind.proto import averaging_pb2

from peer import direct_transport as dt
from peer.wire import WirePart

GROUP, SENDER, REDUCER = b"g" * 20, b"sender-peer-id", b"reducer-peer-id"
SETTINGS = dt.DirectSettings(hosts=("127.0.0.1",), handshake_timeout_s=2.0, max_frame_bytes=1 << 20)


def message(index: int) -> WirePart:
    header = averaging_pb2.AveragingData(
        code=averaging_pb2.PART_FOR_AVERAGING, group_id=GROUP, weight=index + 1.0
    )
    return WirePart(header, bytes([index]) * (index * 1000))


class Reducer:
    """A DirectServer whose groups are given by hand; its handler echoes every part with the weight doubled."""

    def __init__(
        self, *, known_keys: dict[tuple[bytes, bytes], bytes], settings: dt.DirectSettings = SETTINGS
    ):
        self.identity = dt.Identity()
        self.known_keys, self.resolved, self.received = known_keys, [], []
        self.server = dt.DirectServer(settings, identity=self.identity, peer_id=REDUCER, resolve=self.resolve)

    async def resolve(self, group_id: bytes, sender: bytes, key: bytes):
        self.resolved.append((group_id, sender))
        if self.known_keys.get((group_id, sender)) != key:
            return None

        async def handler(stream):
            async for incoming in stream:
                self.received.append((incoming.header.weight, bytes(incoming.payload)))
                reply = averaging_pb2.AveragingData(
                    code=averaging_pb2.AVERAGED_PART, weight=2 * incoming.header.weight
                )
                yield WirePart(reply, incoming.payload)

        return handler

    async def accept(self) -> dt.Connection:
        """A connection to this reducer over a socket pair, as if accepted by its listener."""
        ours, theirs = socket.socketpair()
        loop = asyncio.get_running_loop()
        await loop.connect_accepted_socket(lambda: dt.Connection(self.server._serve), sock=theirs)
        _, connection = await loop.create_connection(dt.Connection, sock=ours)
        return connection


async def send_as(
    reducer: Reducer, sender_identity: dt.Identity, outgoing, *, reducer_key: bytes | None = None
):
    connection = await reducer.accept()
    shared = sender_identity.shared_key(reducer_key or reducer.identity.public)
    await asyncio.wait_for(
        dt._client_handshake(connection, connection, shared, sender_identity.public, GROUP, SENDER, REDUCER),
        2.0,
    )
    return dt.DirectStream(connection, connection, outgoing, SETTINGS.max_frame_bytes)


async def messages(count: int):
    for index in range(count):
        yield message(index)


def test_an_authenticated_sender_is_served_and_its_stream_ends_cleanly():
    async def main():
        sender = dt.Identity()
        reducer = Reducer(known_keys={(GROUP, SENDER): sender.public})
        stream = await send_as(reducer, sender, messages(3))
        replies = [(reply.header.weight, bytes(reply.payload)) async for reply in stream]
        await stream.aclose()
        return reducer, replies

    reducer, replies = asyncio.run(main())
    payloads = [b"", b"\x01" * 1000, b"\x02" * 2000]
    assert reducer.received == list(zip([1.0, 2.0, 3.0], payloads, strict=True))
    assert replies == list(zip([2.0, 4.0, 6.0], payloads, strict=True))
    assert reducer.resolved == [(GROUP, SENDER)]


def test_a_sender_without_the_advertised_key_is_refused_before_any_data():
    async def main():
        claimed, impostor = dt.Identity(), dt.Identity()
        reducer = Reducer(known_keys={(GROUP, SENDER): claimed.public})
        stream = await send_as(
            reducer, impostor, messages(2)
        )  # a valid MAC for a key that is not the member's
        replies = [reply async for reply in stream]
        await stream.aclose()
        return reducer, replies

    reducer, replies = asyncio.run(main())
    assert replies == [] and reducer.received == []


def test_a_bad_mac_is_closed_without_resolving_the_group():
    async def main():
        sender = dt.Identity()
        reducer = Reducer(known_keys={(GROUP, SENDER): sender.public})
        connection = await reducer.accept()
        assert await connection.readexactly(len(dt.MAGIC)) == dt.MAGIC
        await connection.readexactly(dt.NONCE_BYTES)
        connection.write(
            dt.encode_hello(GROUP, SENDER, sender.public, b"n" * dt.NONCE_BYTES, b"\0" * dt.MAC_BYTES)
        )
        closed = await asyncio.wait_for(connection.read(64), 2.0)
        return reducer, closed

    reducer, closed = asyncio.run(main())
    assert closed == b"" and reducer.resolved == []


def test_an_unknown_group_is_closed_after_the_handshake():
    async def main():
        sender = dt.Identity()
        reducer = Reducer(known_keys={})  # resolve() knows no group
        stream = await send_as(reducer, sender, messages(1))
        replies = [reply async for reply in stream]
        await stream.aclose()
        return reducer, replies

    reducer, replies = asyncio.run(main())
    assert replies == [] and reducer.resolved == [(GROUP, SENDER)] and reducer.received == []


def test_a_listener_that_does_not_hold_the_reducers_key_is_not_trusted():
    async def main():
        sender, reducer_key = dt.Identity(), dt.Identity().public
        ours, theirs = socket.socketpair()
        loop = asyncio.get_running_loop()
        _, client = await loop.create_connection(dt.Connection, sock=ours)
        _, impostor = await loop.create_connection(dt.Connection, sock=theirs)

        async def accept_anything():  # a listener at the advertised address, without the reducer's private key
            impostor.write(dt.MAGIC + b"n" * dt.NONCE_BYTES)
            await dt.read_hello(impostor)
            impostor.write(dt.ACCEPTED + b"\0" * dt.MAC_BYTES)

        shared = sender.shared_key(reducer_key)
        handshake = dt._client_handshake(client, client, shared, sender.public, GROUP, SENDER, REDUCER)
        with pytest.raises(dt.DirectError, match="did not prove"):
            await asyncio.gather(handshake, accept_anything())

    asyncio.run(main())


def test_hello_with_out_of_bounds_lengths_is_closed():
    async def main():
        reducer = Reducer(known_keys={})
        connection = await reducer.accept()
        await connection.readexactly(len(dt.MAGIC) + dt.NONCE_BYTES)
        connection.write(bytes([200, 5]) + b"x" * 400)
        return await asyncio.wait_for(connection.read(64), 2.0), reducer

    closed, reducer = asyncio.run(main())
    assert closed == b"" and reducer.resolved == []


def test_frames_round_trip_and_oversize_or_unknown_frames_are_refused():
    async def main():
        a, b = socket.socketpair()
        loop = asyncio.get_running_loop()
        _, writer = await loop.create_connection(dt.Connection, sock=a)
        _, reader = await loop.create_connection(dt.Connection, sock=b)
        dt.write_frame(writer, message(4))
        dt.write_frame(writer, None)
        part = await dt.read_frame(reader, 1 << 13)
        assert part.header.weight == 5.0 and bytes(part.payload) == b"\x04" * 4000
        assert await dt.read_frame(reader, 1 << 13) is None
        writer.write(dt.FRAME_HEADER.pack(dt.PART, 0, (1 << 10) + 1))
        with pytest.raises(dt.DirectError, match="more than"):
            await dt.read_frame(reader, 1 << 10)
        writer.write(dt.FRAME_HEADER.pack(dt.PART, dt.MAX_HEADER_BYTES + 1, 0))
        with pytest.raises(dt.DirectError, match="more than"):
            await dt.read_frame(reader, 1 << 10)
        writer.write(dt.FRAME_HEADER.pack(7, 0, 0))
        with pytest.raises(dt.DirectError, match="unknown kind"):
            await dt.read_frame(reader, 1 << 10)
        writer.write(dt.FRAME_HEADER.pack(dt.PART, 3, 0) + b"\xff\xff\xff")
        with pytest.raises(dt.DirectError, match="malformed"):
            await dt.read_frame(reader, 1 << 10)
        # a header that smuggles tensor bytes (the payload is the only place for them) is refused
        smuggled = averaging_pb2.AveragingData(weight=1.0)
        smuggled.tensor_part.buffer = b"x" * 10
        header = smuggled.SerializeToString()
        writer.write(dt.FRAME_HEADER.pack(dt.PART, len(header), 0) + header)
        with pytest.raises(dt.DirectError, match="inside the header"):
            await dt.read_frame(reader, 1 << 10)
        writer.close()
        reader.close()

    asyncio.run(main())


def test_connections_beyond_the_limit_are_closed_at_once():
    async def main():
        reducer = Reducer(known_keys={}, settings=dt.DirectSettings(hosts=("127.0.0.1",), max_connections=0))
        connection = await reducer.accept()
        return await asyncio.wait_for(connection.read(64), 2.0)

    assert asyncio.run(main()) == b""


def test_advertised_endpoints_from_strangers_are_parsed_or_refused():
    key = dt.Identity().public
    assert dt.parse_endpoint({"hosts": ["127.0.0.1", "nonsense"], "port": 5, "key": key}) == dt.Endpoint(
        ("127.0.0.1",), 5, key
    )
    for bad in (
        None,
        "x",
        {"hosts": ["127.0.0.1"], "port": 0, "key": key},  # a sender without a listener
        {"hosts": ["127.0.0.1"], "port": True, "key": key},
        {"hosts": ["127.0.0.1"], "port": 70000, "key": key},
        {"hosts": ["127.0.0.1"], "port": 5, "key": key[:31]},
        {"hosts": "127.0.0.1", "port": 5, "key": key},
        {"hosts": ["example.org"], "port": 5, "key": key},
    ):
        assert dt.parse_endpoint(bad) is None
    assert dt.parse_key({"key": key, "port": 0, "hosts": []}) == key
    assert dt.hosts_from_maddrs(
        [
            "/ip4/127.0.0.1/tcp/1",
            "/ip4/10.0.0.2/tcp/1",
            "/ip4/0.0.0.0/tcp/1",
            "/ip4/1.2.3.4/tcp/1/p2p-circuit",
        ]
    ) == ("10.0.0.2",)
    assert dt.hosts_from_maddrs(["/ip4/127.0.0.1/tcp/1", "/ip6/::1/tcp/1"]) == ("127.0.0.1", "::1")


class DeadSenderConnection:
    """The reducer's side of a connection whose sender died: writes raise as uvloop's closed transport does, and
    no frame ever arrives."""

    def write(self, data) -> None:
        raise RuntimeError("unable to perform operation on <TCPTransport closed=True>; the handler is closed")

    writelines = write

    async def drain(self) -> None:
        pass

    async def readexactly(self, n: int) -> bytes:
        await asyncio.Event().wait()  # never; the relay cancels us

    async def read(self, n: int) -> bytes:
        await asyncio.Event().wait()


def test_a_handler_whose_reply_cannot_be_written_is_closed_at_once():
    """The runner bans a sender in its handler's cleanup; a handler left suspended at an unwritable reply must not
    wait for the garbage collector to run it (the reducer's other senders waited for that sender's parts until the
    all-reduce's timeout)."""
    cleaned_up = []

    async def handler(stream):
        try:
            yield WirePart(averaging_pb2.AveragingData(code=averaging_pb2.AVERAGED_PART), b"")
            yield WirePart(averaging_pb2.AveragingData(code=averaging_pb2.AVERAGED_PART), b"")
        finally:
            cleaned_up.append(True)

    async def main():
        server = dt.DirectServer(SETTINGS, identity=dt.Identity(), peer_id=REDUCER, resolve=None)
        connection = DeadSenderConnection()
        with pytest.raises(RuntimeError):
            await asyncio.wait_for(server._relay(handler, connection, connection), 5.0)
        return list(cleaned_up)  # before anything else runs: no await between the relay's end and this line

    assert asyncio.run(main()) == [True]


@pytest.mark.skipif(not hasattr(socket, "TCP_NOTSENT_LOWAT"), reason="no TCP_NOTSENT_LOWAT on this system")
@pytest.mark.parametrize("paced", [True, False])
def test_a_paced_stream_keeps_a_small_unsent_buffer_and_a_lone_one_does_not(paced):
    """The sender's socket of a paced stream (groups of 3+, peer/pacing.py) holds at most NOTSENT_LOWAT_BYTES unsent;
    a lone stream keeps the kernel's default. Over a loopback TCP connection: socket pairs have no TCP options."""

    async def main():
        sender = dt.Identity()
        reducer = Reducer(known_keys={(GROUP, SENDER): sender.public})
        await reducer.server.start()
        try:
            stream = await dt.connect(
                dt.parse_endpoint(reducer.server.advertised()),
                messages(2),
                identity=sender,
                group_id=GROUP,
                sender=SENDER,
                reducer=REDUCER,
                settings=SETTINGS,
                paced=paced,
            )
            sock = stream._writer.get_extra_info("socket")
            lowat = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NOTSENT_LOWAT)
            replies = [reply async for reply in stream]
            await stream.aclose()
            return lowat, len(replies)
        finally:
            reducer.server.close()

    lowat, num_replies = asyncio.run(asyncio.wait_for(main(), 30.0))
    assert num_replies == 2
    assert (lowat == dt.NOTSENT_LOWAT_BYTES) == paced
