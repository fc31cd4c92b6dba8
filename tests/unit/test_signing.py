"""Ed25519-signed DHT records (peer/signing.py): only the owner can write its records, a signature cannot be moved
to another key, subkey, value or lifetime, malformed markers are refused without raising, and records of peers that
sign with hivemind's RSA keys are still verified."""

from __future__ import annotations

import dataclasses
import pickle

import pytest
from hivemind.dht.crypto import RSASignatureValidator
from hivemind.dht.validation import DHTRecord
from hivemind.utils.crypto import RSAPrivateKey
from hivemind.utils.serializer import MSGPackSerializer

from peer.records import ProgressRecord
from peer.signing import RecordSigner


def record(
    signer, value: bytes = b"progress", *, subkey: bytes | None = None, key: bytes = b"key"
) -> DHTRecord:
    unsigned = DHTRecord(
        key=key, subkey=subkey or signer.local_public_key, value=value, expiration_time=100.0
    )
    return dataclasses.replace(unsigned, value=signer.sign_value(unsigned))


def test_the_owner_signs_and_everyone_verifies():
    owner, reader = RecordSigner(), RecordSigner()
    signed = record(owner)
    assert signed.value != b"progress" and reader.validate(signed)
    assert reader.strip_value(signed) == b"progress"


def test_a_signer_survives_pickling_into_the_dht_process_with_its_key():
    owner = RecordSigner()
    copy = pickle.loads(pickle.dumps(owner))
    assert copy.local_public_key == owner.local_public_key
    assert owner.validate(record(copy)) and copy.validate(record(owner))


@pytest.mark.parametrize(
    "tamper",
    [
        lambda r: dataclasses.replace(r, value=r.value.replace(b"progress", b"regress")),
        lambda r: dataclasses.replace(r, key=b"another key"),
        lambda r: dataclasses.replace(r, expiration_time=1e9),  # a lifetime it was not signed for
        lambda r: dataclasses.replace(r, value=b"progress"),  # no signature
        lambda r: dataclasses.replace(r, value=r.value + b"[signature:AAAA]"),  # two signatures
        lambda r: dataclasses.replace(r, value=b"progress[signature:not base64!]"),
    ],
)
def test_a_changed_or_unsigned_record_is_refused(tamper):
    assert not RecordSigner().validate(tamper(record(RecordSigner())))


def test_nobody_writes_under_another_owner():
    owner, forger = RecordSigner(), RecordSigner()
    forged = record(forger, subkey=owner.local_public_key)  # signed by the forger's key under the owner's
    assert forger.sign_value(dataclasses.replace(forged, value=b"x")) == b"x"  # not its record: left unsigned
    assert not owner.validate(forged)
    stolen = record(forger)  # the forger's valid signature, moved to the owner's subkey
    assert not owner.validate(dataclasses.replace(stolen, subkey=owner.local_public_key))


@pytest.mark.parametrize(
    "owner",
    [
        b"[owner:ed25519:AAAA]",
        b"[owner:ed25519:" + b"A" * 44 + b"]",
        b"[owner:ed25519:%%%]",
        b"[owner:garbage]",
    ],
)
def test_a_malformed_owner_key_is_refused_without_raising(owner):
    signed = dataclasses.replace(record(RecordSigner()), subkey=owner)
    assert not RecordSigner().validate(signed)


def test_two_owners_in_key_and_subkey_are_refused():
    owner, other = RecordSigner(), RecordSigner()
    assert not owner.validate(record(owner, key=b"key" + other.local_public_key))


def test_unprotected_records_pass_untouched():
    plain = DHTRecord(key=b"key", subkey=b"peer", value=b"v", expiration_time=1.0)
    signer = RecordSigner()
    assert signer.validate(plain) and signer.sign_value(plain) == b"v"


def test_records_of_rsa_signing_peers_are_still_verified():
    rsa = RSASignatureValidator(RSAPrivateKey())
    unsigned = DHTRecord(key=b"key", subkey=rsa.local_public_key, value=b"settings", expiration_time=5.0)
    signed = dataclasses.replace(unsigned, value=rsa.sign_value(unsigned))
    reader = RecordSigner()
    assert reader.validate(signed)
    assert not reader.validate(
        dataclasses.replace(signed, value=signed.value.replace(b"settings", b"settingz"))
    )


def test_a_progress_record_takes_about_a_third_of_the_bytes_of_an_rsa_signed_one():
    progress = ProgressRecord(
        peer_id=b"x" * 38, round=123, inner_step=10, tokens=123456, done=False, averaging=-1,
        scheduled_time=1.7e9, tokens_per_s=2500.0, eta=1.7e9, client_mode=False,
    )  # fmt: skip
    value = MSGPackSerializer.dumps(progress.dict())

    def stored_bytes(signer) -> int:
        subkey = MSGPackSerializer.dumps(signer.local_public_key)
        unsigned = DHTRecord(key=b"k" * 20, subkey=subkey, value=value, expiration_time=1.7e9)
        return len(subkey) + len(signer.sign_value(unsigned))

    ours, rsa = stored_bytes(RecordSigner()), stored_bytes(RSASignatureValidator(RSAPrivateKey()))
    assert ours < 0.4 * rsa, (ours, rsa)
