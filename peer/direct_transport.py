"""A direct TCP data path for the all-reduce: a listener, a mutually authenticated handshake and length-prefixed
frames of the runner's parts (peer/wire.py: a small AveragingData header, then the tensor's raw bytes), so that they
bypass the p2p daemon (peer/allreduce.py uses it per reducer and falls back to the p2p stream when it cannot
connect). Authenticated per connection, not encrypted."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import ipaddress
import logging
import os
import socket
import struct
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass

from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from hivemind.proto import averaging_pb2

from peer.wire import WirePart

logger = logging.getLogger(__name__)

MAGIC = (
    b"DLCdirect2"  # the server's first bytes: a client that reads anything else (e.g. version 1, whose frames
)
# carried whole protobuf messages) falls back to p2p
NONCE_BYTES = 16
KEY_BYTES = 32  # an X25519 public key
MAC_BYTES = 32  # HMAC-SHA256
MAX_ID_BYTES = 64  # a group id or a libp2p peer id (both far shorter)
MAX_HOSTS = 4  # hosts advertised (and tried) per peer
FRAME_HEADER = struct.Struct("!BII")  # kind, header length, payload length
PART, END = 3, 2  # frame kinds: one WirePart (header, then payload); the end of this direction's stream
MAX_HEADER_BYTES = 1 << 16  # a part's AveragingData header without its tensor bytes is well under 1 KiB
ACCEPTED = b"\x01"
SPILL_BYTES = 1 << 16  # read while no read is awaited (see Connection)
NOTSENT_LOWAT_BYTES = 1 << 17  # the kernel's unsent data per connection (see _tune_socket)
Handler = Callable[[AsyncIterator[WirePart]], AsyncIterator[WirePart]]


class Connection(asyncio.BufferedProtocol):
    """One TCP connection, read straight into the buffer of the read being awaited: asyncio's StreamReader copies
    every byte into a stream buffer and compacts it on each read, which cost more than the rest of the path for
    MB-sized frames. Reading is paused while no read is awaited, so a sender can make us buffer nothing beyond
    the frame we asked for (the kernel's TCP window holds the rest). Offers the StreamReader/StreamWriter calls
    used here (one object is both)."""

    def __init__(self, on_connect: Callable[[Connection], Awaitable[None]] | None = None):
        self.transport: asyncio.Transport | None = None
        self._on_connect, self._task = on_connect, None
        self._buffer, self._filled, self._exact = memoryview(bytearray()), 0, True
        self._reading = False
        # what arrived while no read was awaited (the event loop may read once before it honours pause_reading)
        self._scratch, self._spill = bytearray(SPILL_BYTES), bytearray()
        self._waiter: asyncio.Future | None = None
        self._eof = False
        self._can_write, self._closed = asyncio.Event(), asyncio.Event()
        self._can_write.set()

    def connection_made(self, transport) -> None:
        self.transport = transport
        transport.pause_reading()
        if self._on_connect is not None:
            self._task = asyncio.ensure_future(
                self._on_connect(self)
            )  # kept: a task nobody holds may be collected

    def get_buffer(self, sizehint: int) -> memoryview:
        return self._buffer[self._filled :] if self._reading else memoryview(self._scratch)

    def buffer_updated(self, nbytes: int) -> None:
        if not self._reading:
            self._spill += self._scratch[:nbytes]
            self.transport.pause_reading()
            return
        self._filled += nbytes
        if self._filled == len(self._buffer) or not self._exact:
            self.transport.pause_reading()
            self._wake()

    def eof_received(self) -> bool:
        self._eof = True
        self._wake()
        return False  # close: neither side writes after the other hung up

    def connection_lost(self, exc) -> None:
        self._eof = True
        self._wake()
        self._can_write.set()
        self._closed.set()

    def pause_writing(self) -> None:
        self._can_write.clear()

    def resume_writing(self) -> None:
        self._can_write.set()

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    async def _fill(self, buffer: bytearray, *, exact: bool) -> int:
        assert self._waiter is None, "one read at a time"
        self._buffer, self._filled, self._exact = memoryview(buffer), 0, exact
        if self._spill:
            self._filled = min(len(buffer), len(self._spill))
            buffer[: self._filled] = self._spill[: self._filled]
            del self._spill[: self._filled]
        self._reading = True
        try:
            while self._filled < len(buffer) and not (self._filled and not exact) and not self._eof:
                self._waiter = asyncio.get_running_loop().create_future()
                self.transport.resume_reading()
                await self._waiter
                self._waiter = None
        finally:
            self._waiter, self._buffer, self._reading = None, memoryview(bytearray()), False
            if not self._eof:
                self.transport.pause_reading()
        return self._filled

    async def readexactly(self, num_bytes: int) -> bytearray:
        buffer = bytearray(num_bytes)
        filled = await self._fill(buffer, exact=True) if num_bytes else 0
        if filled < num_bytes:
            raise asyncio.IncompleteReadError(bytes(buffer[:filled]), num_bytes)
        return buffer

    async def read(self, max_bytes: int) -> bytes:
        """Up to max_bytes (at least one), or b"" once the other side closed."""
        buffer = bytearray(max_bytes)
        return bytes(buffer[: await self._fill(buffer, exact=False)])

    def write(self, data) -> None:
        self.transport.write(data)

    def writelines(self, chunks) -> None:
        self.transport.writelines(chunks)

    async def drain(self) -> None:
        await self._can_write.wait()
        if self.transport.is_closing():
            raise ConnectionResetError("direct connection closed")

    def get_extra_info(self, name: str):
        return self.transport.get_extra_info(name)

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()

    async def wait_closed(self) -> None:
        await self._closed.wait()


class DirectError(Exception):
    """A direct connection could not be set up or broke the protocol (the caller falls back or fails the part)."""


@dataclass(frozen=True, kw_only=True, slots=True)
class DirectSettings:
    """This machine's direct data path (machine settings: never shared, not in the fingerprint)."""

    enabled: bool = True
    """Listen for and make direct connections; off: every part goes through the p2p daemon."""
    port: int = 0
    """TCP port to listen on (0: chosen by the OS)."""
    hosts: tuple[str, ...] = ()
    """Addresses others connect to (empty: derived from this peer's announced or visible multiaddrs)."""
    max_connections: int = 64
    """Connections served at once; more are closed at once (their senders fall back to p2p)."""
    handshake_timeout_s: float = 5.0
    """Bound on a connection's handshake, on either side."""
    connect_timeout_s: float = 1.0
    """Bound on opening a TCP connection to one advertised host."""
    max_frame_bytes: int = 64 << 20
    """Largest frame accepted: an all-reduce part is at most a few MB."""

    def __post_init__(self) -> None:
        if not 0 <= self.port <= 65535:
            raise ValueError(f"--direct-port must be in [0, 65535], got {self.port}")


@dataclass(frozen=True, slots=True)
class Endpoint:
    """Where a peer's direct listener is, and its public key, as advertised in its matchmaking metadata."""

    hosts: tuple[str, ...]
    port: int
    key: bytes


def parse_key(advertised) -> bytes | None:
    """A member's advertised public key (a sender needs one even without a listener), or None."""
    key = advertised.get("key") if isinstance(advertised, dict) else None
    return key if isinstance(key, bytes) and len(key) == KEY_BYTES else None


def parse_endpoint(advertised) -> Endpoint | None:
    """A member's advertised listener, or None if it advertised none or something malformed (from a stranger)."""
    key = parse_key(advertised)
    if key is None:
        return None
    hosts, port = advertised.get("hosts"), advertised.get("port")
    if not (isinstance(port, int) and not isinstance(port, bool) and 0 < port <= 65535):
        return None
    if not isinstance(hosts, list | tuple):
        return None
    valid = []
    for host in list(hosts)[:MAX_HOSTS]:
        with contextlib.suppress(ValueError, TypeError):
            valid.append(str(ipaddress.ip_address(host)))
    return Endpoint(tuple(valid), port, key) if valid else None


def hosts_from_maddrs(maddrs) -> tuple[str, ...]:
    """The IP addresses in multiaddrs (announced or visible), relays left out; loopback only if there is nothing else
    (a remote sender would dial its own machine: refused at best, at worst a local service that keeps it waiting
    for the handshake timeout; a peer on this machine reaches the other addresses too)."""
    found = []
    for maddr in maddrs:
        parts = str(maddr).split("/")
        if "p2p-circuit" in parts or len(parts) < 3 or parts[1] not in ("ip4", "ip6"):
            continue
        with contextlib.suppress(ValueError):
            address = ipaddress.ip_address(parts[2])
            if not address.is_unspecified and str(address) not in found:
                found.append(str(address))
    routable = [host for host in found if not ipaddress.ip_address(host).is_loopback]
    return tuple((routable or found)[:MAX_HOSTS])


class Identity:
    """An ephemeral X25519 key pair (one per averager process lifetime): its public half is advertised."""

    def __init__(self) -> None:
        self._private = X25519PrivateKey.generate()
        self.public = self._private.public_key().public_bytes_raw()

    def shared_key(self, peer_public: bytes) -> bytes:
        return self._private.exchange(X25519PublicKey.from_public_bytes(peer_public))


def _mac(key: bytes, role: bytes, *fields: bytes) -> bytes:
    """HMAC-SHA256 over a role label and length-prefixed fields (no two field lists give the same input)."""
    message = b"diloco-direct/" + role + b"".join(len(f).to_bytes(2, "big") + f for f in fields)
    return hmac.new(key, message, hashlib.sha256).digest()


def sender_mac(shared: bytes, server_nonce: bytes, group_id: bytes, sender: bytes, reducer: bytes) -> bytes:
    """What a sender proves: it holds the key it claims, for this group, this reducer and this connection."""
    return _mac(shared, b"sender", server_nonce, group_id, sender, reducer)


def reducer_mac(shared: bytes, client_nonce: bytes, group_id: bytes, sender: bytes, reducer: bytes) -> bytes:
    """What the reducer proves back: the connection reached the holder of the advertised key, not an impostor."""
    return _mac(shared, b"reducer", client_nonce, group_id, sender, reducer)


def encode_hello(group_id: bytes, sender: bytes, key: bytes, nonce: bytes, mac: bytes) -> bytes:
    assert len(group_id) <= MAX_ID_BYTES and len(sender) <= MAX_ID_BYTES
    return bytes([len(group_id), len(sender)]) + group_id + sender + key + nonce + mac


async def read_hello(reader: Connection) -> tuple[bytes, bytes, bytes, bytes, bytes]:
    """(group id, sender, sender key, client nonce, mac); DirectError on anything out of bounds."""
    lengths = await reader.readexactly(2)
    if lengths[0] > MAX_ID_BYTES or lengths[1] > MAX_ID_BYTES or not lengths[0] or not lengths[1]:
        raise DirectError(f"hello with id lengths {lengths[0]}, {lengths[1]}")
    body = await reader.readexactly(lengths[0] + lengths[1] + KEY_BYTES + NONCE_BYTES + MAC_BYTES)
    body = bytes(body)
    group_id, rest = body[: lengths[0]], body[lengths[0] :]
    sender, rest = rest[: lengths[1]], rest[lengths[1] :]
    key, nonce, mac = rest[:KEY_BYTES], rest[KEY_BYTES:-MAC_BYTES], rest[-MAC_BYTES:]
    return group_id, sender, key, nonce, mac


def write_frame(writer: Connection, part: WirePart | None) -> None:
    """Queue one frame: a part, or (None) the end of our stream. The payload is handed to the transport as it is (no
    copy): its memory must stay unchanged until sent."""
    if part is None:
        writer.write(FRAME_HEADER.pack(END, 0, 0))
        return
    header = part.header.SerializeToString()
    writer.writelines((FRAME_HEADER.pack(PART, len(header), len(part.payload)), header, part.payload))


async def read_frame(reader: Connection, max_frame_bytes: int) -> WirePart | None:
    """The next part, or None at the END frame; DirectError for an unknown kind, an oversize or corrupt frame. The
    header and payload are read into one buffer of exactly their size; the payload is a view of it."""
    kind, header_bytes, payload_bytes = FRAME_HEADER.unpack(await reader.readexactly(FRAME_HEADER.size))
    if kind == END and header_bytes == payload_bytes == 0:
        return None
    if kind != PART:
        raise DirectError(f"frame of unknown kind {kind}")
    if header_bytes > MAX_HEADER_BYTES or payload_bytes > max_frame_bytes:
        raise DirectError(
            f"frame of {header_bytes} + {payload_bytes} bytes, more than {MAX_HEADER_BYTES} + {max_frame_bytes}"
        )
    body = memoryview(await reader.readexactly(header_bytes + payload_bytes))
    header = averaging_pb2.AveragingData()
    try:
        header.ParseFromString(body[:header_bytes])
    except Exception as e:  # protobuf's DecodeError, or worse: a stranger's bytes
        raise DirectError(f"malformed frame: {type(e).__name__}") from None
    if header.tensor_part.buffer:
        raise DirectError("malformed frame: tensor bytes inside the header")
    return WirePart(header, body[header_bytes:])


async def _incoming(
    reader: Connection, max_frame_bytes: int, ended: asyncio.Event
) -> AsyncIterator[WirePart]:
    """The parts of the other side until its END frame (then `ended` is set); a broken stream just ends."""
    try:
        while (message := await read_frame(reader, max_frame_bytes)) is not None:
            yield message
        ended.set()
    except (asyncio.IncompleteReadError, ConnectionError, DirectError) as e:
        logger.debug(f"direct stream ended early: {e!r}")


class DirectStream:
    """The sender's side of one direct connection: our messages go out from a task, replies are iterated."""

    def __init__(self, reader, writer, outgoing: AsyncIterator[WirePart], max_frame_bytes: int):
        self._reader, self._writer = reader, writer
        self._replies = _incoming(reader, max_frame_bytes, asyncio.Event())
        self._pump = asyncio.create_task(self._send_all(outgoing))

    async def _send_all(self, outgoing) -> None:
        try:
            async for message in outgoing:
                write_frame(self._writer, message)
                await self._writer.drain()
            write_frame(self._writer, None)
            await self._writer.drain()
        except Exception as e:  # the reducer is gone, or our parts failed: hang up, so the replies end short
            logger.debug(f"direct send failed: {e!r}")
            self._writer.close()

    def __aiter__(self):
        return self._replies

    async def aclose(self) -> None:
        """Hang up (after the last reply, or on failure): the reducer waits for that before it closes."""
        self._pump.cancel()
        with contextlib.suppress(BaseException):
            await self._pump
        await self._replies.aclose()
        self._writer.close()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self._writer.wait_closed(), 1.0)


async def connect(
    endpoint: Endpoint,
    outgoing: AsyncIterator[WirePart],
    *,
    identity: Identity,
    group_id: bytes,
    sender: bytes,
    reducer: bytes,
    settings: DirectSettings,
    paced: bool = False,
) -> DirectStream:
    """Open an authenticated direct stream to a reducer (trying its advertised hosts in turn), or raise DirectError
    without having consumed `outgoing`, so the caller can hand it to the p2p stream instead. `paced`: this stream is
    kept in step with the sender's other streams (see _tune_socket)."""
    shared = identity.shared_key(endpoint.key)
    problems = []
    for host in endpoint.hosts:
        writer = None
        try:
            _, writer = await asyncio.wait_for(
                asyncio.get_running_loop().create_connection(Connection, host, endpoint.port),
                settings.connect_timeout_s,
            )
            reader = writer
            await asyncio.wait_for(
                _client_handshake(reader, writer, shared, identity.public, group_id, sender, reducer),
                settings.handshake_timeout_s,
            )
            _tune_socket(writer, small_send_buffer=paced)
            return DirectStream(reader, writer, outgoing, settings.max_frame_bytes)
        except (OSError, asyncio.TimeoutError, asyncio.IncompleteReadError, DirectError) as e:
            problems.append(f"{host}:{endpoint.port}: {e!r}")
            if writer is not None:
                writer.close()
    raise DirectError("; ".join(problems) or "no host advertised")


async def _client_handshake(reader, writer, shared, public, group_id, sender, reducer) -> None:
    if await reader.readexactly(len(MAGIC)) != MAGIC:
        raise DirectError("not a direct listener")
    server_nonce, client_nonce = await reader.readexactly(NONCE_BYTES), os.urandom(NONCE_BYTES)
    mac = sender_mac(shared, server_nonce, group_id, sender, reducer)
    writer.write(encode_hello(group_id, sender, public, client_nonce, mac))
    await writer.drain()
    answer = await reader.readexactly(len(ACCEPTED) + MAC_BYTES)
    expected = ACCEPTED + reducer_mac(shared, client_nonce, group_id, sender, reducer)
    if not hmac.compare_digest(answer, expected):
        raise DirectError("the listener did not prove it holds the reducer's key")


def _tune_socket(writer: Connection, *, small_send_buffer: bool = False) -> None:
    """No Nagle delay; and, for a sender whose streams are paced, a small unsent buffer in the kernel, so that a
    drained write is close to being on the wire (peer/pacing.py); without it the kernel takes a whole part at once.
    Not for a lone stream: there is nothing to pace, and on fast links the extra wake-ups cost 10-20%."""
    sock = writer.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if small_send_buffer:
            with contextlib.suppress(OSError, AttributeError):  # Linux and macOS have it
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NOTSENT_LOWAT, NOTSENT_LOWAT_BYTES)


class DirectServer:
    """The reducer's listener. Bound when constructed (so the port is known before the averager process forks),
    served on the averager process's event loop by `start`. Every byte received is a stranger's until the
    handshake proved the sender's key, and `resolve` said that key is the one the group's member advertised."""

    def __init__(
        self,
        settings: DirectSettings,
        *,
        identity: Identity,
        peer_id: bytes,
        resolve: Callable[[bytes, bytes, bytes], Awaitable[Handler | None]],
    ):
        self.settings, self.identity, self.peer_id, self.resolve = settings, identity, peer_id, resolve
        loopback_only = all(ipaddress.ip_address(host).is_loopback for host in settings.hosts)
        any_v6 = any(ipaddress.ip_address(host).version == 6 for host in settings.hosts)
        bind = "127.0.0.1" if loopback_only else ("::" if any_v6 else "0.0.0.0")
        self.sock = socket.create_server(
            (bind, settings.port), dualstack_ipv6=bind == "::" and socket.has_dualstack_ipv6()
        )
        self.port = self.sock.getsockname()[1]
        self.num_connections = 0
        self.num_served = 0
        self._server: asyncio.AbstractServer | None = None

    def advertised(self) -> dict:
        """What goes into our matchmaking metadata (parse_endpoint reads it)."""
        return {"hosts": list(self.settings.hosts), "port": self.port, "key": self.identity.public}

    async def start(self) -> None:
        self._server = await asyncio.get_running_loop().create_server(
            lambda: Connection(self._serve), sock=self.sock
        )

    def close(self) -> None:
        if self._server is not None:
            self._server.close()
        self.sock.close()

    async def _serve(self, connection: Connection) -> None:
        reader = writer = connection
        if self.num_connections >= self.settings.max_connections:
            writer.close()
            return
        self.num_connections += 1
        try:
            handler = await asyncio.wait_for(
                self._handshake(reader, writer), self.settings.handshake_timeout_s
            )
            if handler is not None:
                handler = await handler
            if handler is not None:
                _tune_socket(writer)
                self.num_served += 1
                await self._relay(handler, reader, writer)
        except (OSError, asyncio.TimeoutError, asyncio.IncompleteReadError, DirectError) as e:
            logger.debug(f"direct connection closed: {e!r}")
        except Exception as e:  # never crash on a stranger's bytes
            logger.warning(f"direct connection failed: {e!r}", exc_info=True)
        finally:
            self.num_connections -= 1
            writer.close()

    async def _handshake(self, reader, writer) -> Awaitable[Handler | None] | None:
        """Check the sender's MAC and prove ours; returns the (not yet awaited) resolution of its group."""
        server_nonce = os.urandom(NONCE_BYTES)
        writer.write(MAGIC + server_nonce)
        await writer.drain()
        group_id, sender, key, client_nonce, mac = await read_hello(reader)
        try:
            shared = self.identity.shared_key(key)
        except ValueError:  # e.g. a low-order point
            raise DirectError("invalid sender key") from None
        if not hmac.compare_digest(mac, sender_mac(shared, server_nonce, group_id, sender, self.peer_id)):
            raise DirectError("bad sender MAC")
        writer.write(ACCEPTED + reducer_mac(shared, client_nonce, group_id, sender, self.peer_id))
        await writer.drain()
        # the group may not be registered yet (this reducer may still be finishing its inner steps): resolve()
        # waits for it, bounded, and answers None for an unknown group or a sender whose advertised key differs
        return self.resolve(group_id, sender, key)

    async def _relay(self, handler: Handler, reader, writer) -> None:
        """Feed the sender's messages to the runner and its replies back; then keep the connection until the sender
        hangs up, as the runner's hang-up protocol expects (ExactAllReduceRunner.rpc_aggregate_part)."""
        ended = asyncio.Event()
        replies = handler(_incoming(reader, self.settings.max_frame_bytes, ended))

        async def send_replies() -> None:
            async for message in replies:
                write_frame(writer, message)
                await writer.drain()

        sending = asyncio.create_task(send_replies())
        hang_up = asyncio.create_task(_wait_for_hang_up(reader, ended))
        try:
            await asyncio.wait({sending, hang_up}, return_when=asyncio.FIRST_COMPLETED)
            if sending.done():
                write_frame(writer, None)
                await writer.drain()
        finally:
            for task in (sending, hang_up):
                task.cancel()
                with contextlib.suppress(BaseException):
                    await task
            # the runner's handler may be suspended at a reply we could not write (the sender died): close it now, so
            # that its cleanup (banning the sender, whose missing parts the other senders' parts wait for) runs
            # here and not whenever the garbage collector gets to it; until then the reducer hung to its timeout
            with contextlib.suppress(BaseException):
                await replies.aclose()


async def _wait_for_hang_up(reader: Connection, ended: asyncio.Event) -> None:
    """Return once the sender closed its side (after its END frame; before it, the incoming stream sees it)."""
    await ended.wait()
    with contextlib.suppress(Exception):
        while await reader.read(1 << 16):
            pass  # nothing may follow END; a sender that sends more anyway is drained, not buffered
