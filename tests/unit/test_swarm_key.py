"""Private swarms (peer/swarm_key.py): reading the key, the names derived from it, sealed records and metadata, state
tokens; and that an open swarm (no key) changes nothing."""

from __future__ import annotations

import dataclasses

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from peer.cli import config_from_args
from peer.config import SECRET_PLACEHOLDER, SwarmConfig
from peer.swarm_key import (
    MIN_KEY_BYTES,
    KeyedAccess,
    OpenAccess,
    SealError,
    read_swarm_key,
    run_access,
)

SECRET = b"0123456789abcdef-a-test-swarm-key"
OTHER_SECRET = b"fedcba9876543210-another-swarm-key"
KEY, SUBKEY = "p0123_progress", b"[owner:ssh-rsa AAAA]"
RECORD = {"peer_id": b"\x00\x24peer", "round": 3, "tokens": 512, "done": False, "eta": 1.7e9}
PEER_A, PEER_B = b"\x00\x24" + b"a" * 34, b"\x00\x24" + b"b" * 34


@pytest.fixture
def access() -> KeyedAccess:
    return KeyedAccess(SECRET, "run")


# ---- reading the key -------------------------------------------------------------------------------------------


def test_the_key_is_the_text_itself_or_the_contents_of_an_at_file(tmp_path):
    path = tmp_path / "swarm.key"
    path.write_bytes(SECRET + b"\n")  # as `openssl rand -hex 32 > swarm.key` leaves it
    assert read_swarm_key(f"@{path}") == SECRET
    assert read_swarm_key(SECRET.decode()) == SECRET


def test_a_missing_or_short_key_is_one_clear_error_that_never_shows_the_key(tmp_path):
    with pytest.raises(ValueError, match="cannot read the key file .*nothere"):
        read_swarm_key(f"@{tmp_path / 'nothere'}")
    short = "s3cr3t-x"
    with pytest.raises(ValueError, match=f"at least {MIN_KEY_BYTES}") as raised:
        read_swarm_key(short)
    assert short not in str(raised.value)
    (tmp_path / "short.key").write_text(short)
    with pytest.raises(ValueError, match="short.key holds 8 bytes") as raised:
        read_swarm_key(f"@{tmp_path / 'short.key'}")
    assert short not in str(raised.value)


def test_the_config_checks_the_key_early_and_never_saves_or_shows_a_literal_one(tmp_path):
    with pytest.raises(ValueError, match="--swarm-key"):
        SwarmConfig(swarm_key="short")
    config, _ = config_from_args(["--swarm-key", SECRET.decode()])
    assert config.swarm.swarm_key == SECRET.decode()
    assert SECRET.decode() not in repr(config) and SECRET.decode() not in str(config.to_dict())
    assert config.to_dict()["swarm"]["swarm_key"] == SECRET_PLACEHOLDER
    with pytest.raises(ValueError):
        read_swarm_key(SECRET_PLACEHOLDER)  # a saved config can never be mistaken for a key
    (tmp_path / "swarm.key").write_bytes(SECRET)
    from_file, _ = config_from_args(["--swarm-key", f"@{tmp_path / 'swarm.key'}"])
    assert from_file.to_dict()["swarm"]["swarm_key"] == f"@{tmp_path / 'swarm.key'}"  # a path is no secret
    assert dataclasses.replace(config.swarm, swarm_key=None).swarm_key is None


def test_without_a_key_the_run_is_open_and_nothing_changes(tmp_path):
    (tmp_path / "swarm.key").write_bytes(SECRET)
    assert type(run_access(None, "run")) is OpenAccess
    assert isinstance(run_access(f"@{tmp_path / 'swarm.key'}", "run"), KeyedAccess)
    open_access = OpenAccess()
    assert open_access.prefix("0123456789abcdef", "records") == "0123456789abcdef"
    assert open_access.seal(KEY, SUBKEY, RECORD) is RECORD and open_access.open(KEY, SUBKEY, RECORD) is RECORD
    assert open_access.seal_metadata(PEER_A, {"round": 1}) == {"round": 1}
    assert open_access.open_metadata(PEER_A, {"round": 1}) == {"round": 1}
    assert open_access.open_metadata(PEER_A, b"anything") is None
    assert open_access.state_token(PEER_A) == b"" and open_access.may_download(PEER_B, b"")


# ---- names -----------------------------------------------------------------------------------------------------


def test_names_depend_on_the_key_the_run_and_the_purpose_and_nothing_else(access):
    records = access.prefix("0123456789abcdef", "records")
    assert records == KeyedAccess(SECRET, "run").prefix("0123456789abcdef", "records")  # every peer agrees
    others = {
        KeyedAccess(OTHER_SECRET, "run").prefix("0123456789abcdef", "records"),
        KeyedAccess(SECRET, "other-run").prefix("0123456789abcdef", "records"),
        access.prefix("0123456789abcdef", "averaging"),
        access.prefix("fedcba9876543210", "records"),
        "0123456789abcdef",
    }
    assert records not in others and len(others) == 5
    assert records.isalnum() and "." not in records and len(records) == 33  # a valid hivemind averager prefix
    assert "0123456789abcdef" not in records


def test_the_access_object_never_shows_the_key(access):
    assert SECRET.decode() not in repr(access) and SECRET.decode() not in str(vars(access))


# ---- sealed records --------------------------------------------------------------------------------------------


def test_a_sealed_record_opens_only_where_it_was_stored_and_only_with_the_key(access):
    sealed = access.seal(KEY, SUBKEY, RECORD)
    assert isinstance(sealed, bytes) and b"peer" not in sealed  # a storing node reads nothing
    assert access.open(KEY, SUBKEY, sealed) == RECORD
    assert KeyedAccess(SECRET, "run").open(KEY, SUBKEY, sealed) == RECORD  # any holder of the key
    refused = [
        lambda: KeyedAccess(OTHER_SECRET, "run").open(KEY, SUBKEY, sealed),  # another key
        lambda: KeyedAccess(SECRET, "other-run").open(KEY, SUBKEY, sealed),  # another run
        lambda: access.open("p0123_hashes", SUBKEY, sealed),  # moved to another key
        lambda: access.open(KEY, b"[owner:ssh-rsa BBBB]", sealed),  # replayed by another subkey (signer)
        lambda: access.open(KEY, SUBKEY, sealed[:-1]),  # truncated
        lambda: access.open(KEY, SUBKEY, RECORD),  # stored unsealed, by a peer without the key
        lambda: access.open(KEY, SUBKEY, None),
    ]
    for index in range(len(sealed)):  # any byte tampered with: the nonce, the ciphertext or the tag
        tampered = bytearray(sealed)
        tampered[index] ^= 0x01
        refused.append(lambda tampered=bytes(tampered): access.open(KEY, SUBKEY, tampered))
    for attempt in refused:
        with pytest.raises(SealError):
            attempt()


def test_sealing_is_randomized_and_a_departure_is_sealed_too(access):
    first, second = access.seal(KEY, SUBKEY, RECORD), access.seal(KEY, SUBKEY, RECORD)
    assert first != second  # fresh nonces: equal records do not look equal to a storing node
    assert access.open(KEY, SUBKEY, first) == access.open(KEY, SUBKEY, second) == RECORD
    assert access.open(KEY, SUBKEY, access.seal(KEY, SUBKEY, None)) is None  # "this peer left"


def test_a_record_and_group_metadata_cannot_stand_in_for_each_other(access):
    with pytest.raises(SealError):
        access.open(KEY, PEER_A, access.seal_metadata(PEER_A, {"round": 1}))
    assert access.open_metadata(PEER_A, access.seal(KEY, PEER_A, {"round": 1})) is None


@settings(max_examples=200, deadline=None)
@given(stored=st.binary(max_size=300) | st.none() | st.integers() | st.text(max_size=30))
def test_opening_anything_a_stranger_stored_is_a_seal_error_never_a_crash(stored):
    access = KeyedAccess(SECRET, "run")
    with pytest.raises(SealError):
        access.open(KEY, SUBKEY, stored)
    assert access.open_metadata(PEER_A, stored) is None


# ---- group membership and state requests ----------------------------------------------------------------------


def test_group_metadata_opens_only_for_the_member_it_was_sealed_for(access):
    sealed = access.seal_metadata(PEER_A, {"round": 4, "voter": b"key"})
    assert access.open_metadata(PEER_A, sealed) == {"round": 4, "voter": b"key"}
    assert access.open_metadata(PEER_B, sealed) is None  # another identity cannot present it as its own
    assert KeyedAccess(OTHER_SECRET, "run").open_metadata(PEER_A, sealed) is None
    assert access.open_metadata(PEER_A, {"round": 4}) is None  # plain metadata: a peer without the key
    assert access.open_metadata(PEER_A, access.seal_metadata(PEER_A, [4])) is None  # not a dict


def test_a_state_token_admits_only_its_own_peer_id_with_the_key(access):
    token = access.state_token(PEER_A)
    assert access.may_download(PEER_A, token)
    assert KeyedAccess(SECRET, "run").may_download(PEER_A, token)
    assert not access.may_download(PEER_B, token)  # a token seen elsewhere is useless to another identity
    assert not access.may_download(PEER_A, b"")  # an open-swarm request
    assert not access.may_download(PEER_A, KeyedAccess(OTHER_SECRET, "run").state_token(PEER_A))
    assert not access.may_download(PEER_A, token[:-1])


def test_the_averager_reads_a_members_metadata_through_the_access():
    from hivemind.p2p import PeerID
    from hivemind.utils.serializer import MSGPackSerializer

    from peer.allreduce import gathered_metadata

    keyed = KeyedAccess(SECRET, "run")
    peer_a, peer_b = PeerID(PEER_A), PeerID(PEER_B)

    def gathered(user) -> bytes:  # as hivemind's averager.step packs it: [bandwidth, mode, user metadata]
        return MSGPackSerializer.dumps([1.0, 0, MSGPackSerializer.dumps(user)])

    sealed = gathered(keyed.seal_metadata(PEER_A, {"round": 2}))
    assert gathered_metadata(MSGPackSerializer, sealed, peer_a, keyed) == {"round": 2}
    assert gathered_metadata(MSGPackSerializer, sealed, peer_b, keyed) is None
    assert gathered_metadata(MSGPackSerializer, gathered({"round": 2}), peer_a, keyed) is None
    assert gathered_metadata(MSGPackSerializer, gathered({"round": 2}), peer_a, OpenAccess()) == {"round": 2}
    assert gathered_metadata(MSGPackSerializer, b"\xc1", peer_a, OpenAccess()) is None


def test_a_state_request_is_the_same_bytes_as_hivemind_s_when_the_swarm_is_open():
    from hivemind.proto import averaging_pb2

    from peer.allreduce import StateRequest

    empty = averaging_pb2.DownloadRequest().SerializeToString()
    assert StateRequest(token=OpenAccess().state_token(PEER_A)).SerializeToString() == empty
    assert StateRequest.FromString(empty).token == b""
    token = KeyedAccess(SECRET, "run").state_token(PEER_A)
    assert StateRequest.FromString(StateRequest(token=token).SerializeToString()).token == token
