"""Signed DHT records with Ed25519 keys: hivemind's "protected records" (a subkey that names its owner's public key,
a value that carries the owner's signature), with keys and signatures a tenth of the size of hivemind's RSA ones.

Why not hivemind's RSASignatureValidator: every node a lookup visits answers with the whole key, all k peers'
records, and with RSA each record carries a 391-byte owner key and a 356-byte signature beside ~170 bytes of
progress. Here the owner is `[owner:ed25519:<base64 of 32 bytes>]` (52 bytes) and the signature
`[signature:<base64 of 64 bytes>]` (100 bytes), so a progress record takes a third of the bytes
(scripts/bench_dht.py prints both). The markers keep hivemind's `[owner:...]` form, so hivemind's schema type
`BytesWithPublicKey` still matches our subkeys.

Records whose owner is an RSA key (peers of earlier versions) are still verified, by hivemind's RSA validator, so
a newcomer sees their settings and names the difference instead of silently starting another swarm.
"""

from __future__ import annotations

import base64
import dataclasses
import re

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from hivemind.dht.crypto import RSASignatureValidator
from hivemind.dht.validation import DHTRecord, RecordValidatorBase
from hivemind.utils.serializer import MSGPackSerializer

KEY_TAG = b"ed25519:"
SIGNATURE_FORMAT = b"[signature:_value_]"
# hivemind's own owner pattern (RSASignatureValidator.PUBLIC_KEY_REGEX), so BytesWithPublicKey subkeys match both
_OWNER_RE = re.compile(RSASignatureValidator.PUBLIC_KEY_REGEX)
_SIGNATURE_RE = re.compile(re.escape(SIGNATURE_FORMAT).replace(b"_value_", rb"(.+?)"))
_RAW = serialization.Encoding.Raw, serialization.PublicFormat.Raw


class RecordSigner(RecordValidatorBase):
    """Signs this process's own protected records and verifies everyone's (one per DHT, like hivemind's)."""

    def __init__(self, private_key: Ed25519PrivateKey | None = None):
        self._private_key = private_key or Ed25519PrivateKey.generate()
        public = base64.b64encode(self._private_key.public_key().public_bytes(*_RAW))
        self._owner = RSASignatureValidator.PUBLIC_KEY_FORMAT.replace(b"_key_", KEY_TAG + public)
        self._rsa: RSASignatureValidator | None = None  # made on the first RSA-owned record

    def __getstate__(self) -> dict:
        # hivemind pickles validators into its DHT process; cryptography's keys do not pickle
        state = dict(self.__dict__, _rsa=None)
        state["_private_key"] = self._private_key.private_bytes(
            serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption()
        )
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._private_key = Ed25519PrivateKey.from_private_bytes(state["_private_key"])

    @property
    def local_public_key(self) -> bytes:
        """The owner marker of this process's records: their subkey, and its voter identity in groups."""
        return self._owner

    def validate(self, record: DHTRecord) -> bool:
        owners = _OWNER_RE.findall(record.key)
        if record.subkey is not None:
            owners += _OWNER_RE.findall(record.subkey)
        if not owners:
            return True  # not a protected record
        if len(set(owners)) > 1:
            return False
        owner = owners[0]
        if not owner.startswith(KEY_TAG):
            return self._validate_rsa(record)
        signatures = _SIGNATURE_RE.findall(record.value)
        if len(signatures) != 1:
            return False
        try:
            public_key = Ed25519PublicKey.from_public_bytes(
                base64.b64decode(owner[len(KEY_TAG) :], validate=True)
            )
            signature = base64.b64decode(signatures[0], validate=True)
            stripped = dataclasses.replace(record, value=self.strip_value(record))
            public_key.verify(signature, _signed_bytes(stripped))
        # a malformed key or signature (base64's binascii.Error is a ValueError too), or a forged record
        except (ValueError, InvalidSignature):
            return False
        return True

    def _validate_rsa(self, record: DHTRecord) -> bool:
        if self._rsa is None:
            self._rsa = RSASignatureValidator()
        try:
            return self._rsa.validate(record)
        except Exception:  # hivemind raises on a malformed RSA key: another peer's record, not our crash
            return False

    def sign_value(self, record: DHTRecord) -> bytes:
        if self._owner not in record.key and (record.subkey is None or self._owner not in record.subkey):
            return record.value
        signature = base64.b64encode(self._private_key.sign(_signed_bytes(record)))
        return record.value + SIGNATURE_FORMAT.replace(b"_value_", signature)

    def strip_value(self, record: DHTRecord) -> bytes:
        return _SIGNATURE_RE.sub(b"", record.value)

    @property
    def priority(self) -> int:
        return 10  # as hivemind's: before the validators that deserialize the value

    def merge_with(self, other: RecordValidatorBase) -> bool:
        return isinstance(other, RecordSigner)  # one signer per DHT: a second one adds nothing


def _signed_bytes(record: DHTRecord) -> bytes:
    # what hivemind's RSA validator signs: the whole record (key, subkey, value, expiration), so a signature cannot
    # be moved to another key, subkey or lifetime
    return MSGPackSerializer.dumps(dataclasses.astuple(record))
