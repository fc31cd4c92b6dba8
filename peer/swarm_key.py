"""Private swarms (--swarm-key): reading the key, and what is derived from it for one run: DHT names nobody else can
compute, records and group metadata sealed with an AEAD, and the tokens that state downloads are asked with.

An open swarm uses `OpenAccess`, which changes nothing: the same names, the same bytes on the wire.
"""

from __future__ import annotations

import hashlib
import hmac
import os

import msgpack
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

MIN_KEY_BYTES = 16  # a shorter secret could be guessed offline by any DHT node that stores a sealed record
MAX_KEY_BYTES = 4096
NONCE_BYTES = 12
TAG_BYTES = 16
MAX_SEALED_BYTES = 1 << 17  # the largest record (a 64 KiB settings record) sealed, with room to spare
PROTOCOL = b"diloco-swarm private swarm v1"
GENERATE_HINT = "for example: openssl rand -hex 32 > swarm.key, then --swarm-key @swarm.key"


class SealError(ValueError):
    """A sealed value that does not open: sealed with another key, tampered with, or moved to another key/subkey."""


def read_swarm_key(text: str) -> bytes:
    """The secret of `--swarm-key TEXT`: '@PATH' names a file holding it (surrounding whitespace, such as a final
    newline, is not part of it); any other text is the secret itself. ValueError messages never contain the secret."""
    if text.startswith("@"):
        path = text[1:]
        try:
            with open(path, "rb") as file:
                secret = file.read(MAX_KEY_BYTES + 1).strip()
        except OSError as e:
            raise ValueError(f"--swarm-key: cannot read the key file {path} ({e.strerror or e})") from None
        where = f"the key file {path}"
    else:
        secret, where = text.strip().encode(), "the key"
    if len(secret) < MIN_KEY_BYTES:
        raise ValueError(
            f"--swarm-key: {where} holds {len(secret)} bytes, at least {MIN_KEY_BYTES} are needed ({GENERATE_HINT})"
        )
    if len(secret) > MAX_KEY_BYTES:
        raise ValueError(f"--swarm-key: {where} is longer than {MAX_KEY_BYTES} bytes")
    return secret


def _length_prefixed(*parts: bytes) -> bytes:
    """Unambiguous concatenation: no two different lists of parts give the same bytes."""
    return b"".join(len(part).to_bytes(4, "big") + part for part in parts)


def _derive(secret: bytes, label: bytes, run_id: str) -> bytes:
    info = _length_prefixed(label, run_id.encode())
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=PROTOCOL, info=info).derive(secret)


class OpenAccess:
    """An open swarm (no --swarm-key): anyone who knows the run id can name, read and write its records, join its
    groups and download its state; the protection is peer/robust.py's and peer/rounds.py's (I8)."""

    private = False

    def prefix(self, name: str, purpose: str) -> str:
        """The DHT prefix for `name` (a fingerprint or a run id) used for `purpose` (records, averaging)."""
        return name

    def seal(self, key: str, subkey: bytes, value):
        """What to store in the DHT under (key, subkey) for `value`."""
        return value

    def open(self, key: str, subkey: bytes, stored):
        """The value stored under (key, subkey); raises SealError if it was not sealed by a holder of the key."""
        return stored

    def seal_metadata(self, peer_id: bytes, metadata: dict):
        """What a peer with this libp2p id sends as its matchmaking metadata."""
        return metadata

    def open_metadata(self, peer_id: bytes, gathered) -> dict | None:
        """A group member's metadata; None if it sent none we can use (in a private swarm: none sealed with the key
        for this peer id, so it is no member). In an open swarm that is still no reason to refuse it (I8)."""
        return gathered if isinstance(gathered, dict) else None

    def state_token(self, peer_id: bytes) -> bytes:
        """What a peer with this libp2p id sends with a state request."""
        return b""

    def may_download(self, peer_id: bytes, token: bytes) -> bool:
        """Whether a state request from this (libp2p-authenticated) peer id with this token is served."""
        return True


class KeyedAccess(OpenAccess):
    """A private swarm: every DHT name is an HMAC of the plain one, every record and every member's matchmaking
    metadata is sealed with ChaCha20-Poly1305, bound to where it belongs (the DHT key and subkey, or the member's
    libp2p peer id), and a state request carries an HMAC of the requester's peer id. libp2p authenticates peer ids
    (Noise), so nothing bound to one peer id can be replayed by another."""

    private = True

    def __init__(self, secret: bytes, run_id: str):
        # three independent keys: learning one (e.g. a name) says nothing about the others
        self._names_key = _derive(secret, b"names", run_id)
        self._aead = ChaCha20Poly1305(_derive(secret, b"seal", run_id))
        self._token_key = _derive(secret, b"state token", run_id)

    def __repr__(self) -> str:
        return "KeyedAccess(<secret>)"

    def prefix(self, name: str, purpose: str) -> str:
        # 128 bits of HMAC: hex has no dots (hivemind's averager prefixes may not contain one)
        digest = hmac.new(self._names_key, _length_prefixed(purpose.encode(), name.encode()), hashlib.sha256)
        return "p" + digest.hexdigest()[:32]

    def _seal(self, plaintext, associated: bytes) -> bytes:
        nonce = os.urandom(NONCE_BYTES)
        return nonce + self._aead.encrypt(nonce, msgpack.packb(plaintext, use_bin_type=True), associated)

    def _open(self, sealed, associated: bytes):
        if not isinstance(sealed, bytes) or not NONCE_BYTES + TAG_BYTES <= len(sealed) <= MAX_SEALED_BYTES:
            raise SealError("not a sealed value")
        try:
            plaintext = self._aead.decrypt(sealed[:NONCE_BYTES], sealed[NONCE_BYTES:], associated)
        except InvalidTag:
            raise SealError("does not open with the swarm key here") from None
        try:
            return msgpack.unpackb(plaintext, raw=False, strict_map_key=False)
        except Exception:  # sealed by a holder of the key, yet not msgpack: still input from a stranger
            raise SealError("sealed, but not a value") from None

    def seal(self, key: str, subkey: bytes, value) -> bytes:
        return self._seal(value, _length_prefixed(b"record", key.encode(), subkey))

    def open(self, key: str, subkey: bytes, stored):
        return self._open(stored, _length_prefixed(b"record", key.encode(), subkey))

    def seal_metadata(self, peer_id: bytes, metadata: dict) -> bytes:
        return self._seal(metadata, _length_prefixed(b"member", peer_id))

    def open_metadata(self, peer_id: bytes, gathered) -> dict | None:
        try:
            metadata = self._open(gathered, _length_prefixed(b"member", peer_id))
        except SealError:
            return None
        return metadata if isinstance(metadata, dict) else None

    def state_token(self, peer_id: bytes) -> bytes:
        return hmac.new(self._token_key, _length_prefixed(b"state", peer_id), hashlib.sha256).digest()

    def may_download(self, peer_id: bytes, token: bytes) -> bool:
        return isinstance(token, bytes) and hmac.compare_digest(token, self.state_token(peer_id))


def run_access(swarm_key: str | None, run_id: str) -> OpenAccess:
    """The access of a run: open without --swarm-key, keyed with it (its file is read here)."""
    return OpenAccess() if swarm_key is None else KeyedAccess(read_swarm_key(swarm_key), run_id)
