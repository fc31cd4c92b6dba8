"""Reading records from the DHT (peer/swarm.py, without a DHT): one record per signing key, and the author of a
malformed or never-expiring record, or in a private swarm of one that does not open with the key, is ignored for a
while, its other records included."""

from __future__ import annotations

import time
from types import SimpleNamespace

from hivemind.utils.timed_storage import get_dht_time

from peer.records import ProgressRecord, SettingsRecord
from peer.swarm import IGNORE_S, RECORD_TTL_S, SETTINGS_TTL_S, Swarm
from peer.swarm_key import KeyedAccess, OpenAccess


def progress(peer: bytes) -> dict:
    return ProgressRecord(
        peer_id=peer, round=1, inner_step=0, tokens=0, done=False, averaging=-1,
        scheduled_time=0.0, tokens_per_s=0.0, eta=0.0, client_mode=False,
    ).dict()  # fmt: skip


def swarm_reading(entries: dict, access: OpenAccess | None = None) -> Swarm:
    swarm = Swarm.__new__(Swarm)  # no DHT: the lookup returns `entries`
    swarm.short_id, swarm._ignored = "test", {}
    swarm.access = OpenAccess() if access is None else access
    swarm._get = lambda key: SimpleNamespace(value=entries)
    return swarm


def entry(value, *, expires_in_s: float = RECORD_TTL_S):
    return SimpleNamespace(value=value, expiration_time=get_dht_time() + expires_in_s)


def test_records_are_keyed_by_the_signing_key_not_by_what_they_claim():
    swarm = swarm_reading({b"key-a": entry(progress(b"claims-b")), b"key-b": entry(progress(b"claims-b"))})
    assert set(swarm._read_records("p", ProgressRecord)) == {b"key-a", b"key-b"}


def test_a_never_expiring_or_malformed_record_gets_its_author_ignored():
    entries = {
        b"forever": entry(progress(b"f"), expires_in_s=10**6),
        b"malformed": entry({**progress(b"m"), "round": float("inf")}),
        b"left": entry(None),  # a peer that left deletes its record: not an offense
        b"honest": entry(progress(b"h")),
    }
    swarm = swarm_reading(entries)
    assert set(swarm._read_records("p", ProgressRecord)) == {b"honest"}
    assert set(swarm._ignored) == {b"forever", b"malformed"}
    assert all(until > time.monotonic() + IGNORE_S / 2 for until in swarm._ignored.values())
    entries[b"forever"] = entry(progress(b"f"))  # even its well-formed records are skipped for a while
    assert set(swarm._read_records("p", ProgressRecord)) == {b"honest"}


def test_settings_records_live_longer_than_progress_records_and_still_count():
    settings = SettingsRecord(peer_id=b"s", fingerprint="f" * 16, settings_json="{}").dict()
    entries = {
        b"peer": entry(settings, expires_in_s=SETTINGS_TTL_S),
        b"liar": entry(settings, expires_in_s=10**6),
    }
    swarm = swarm_reading(entries)
    assert set(swarm._read_records("s", SettingsRecord, ttl_s=SETTINGS_TTL_S)) == {b"peer"}
    assert set(swarm._ignored) == {b"liar"}


def test_in_a_private_swarm_only_records_sealed_with_the_key_for_their_place_are_read():
    access = KeyedAccess(b"0123456789abcdef-swarm-key", "run")
    other = KeyedAccess(b"fedcba9876543210-other-key", "run")
    entries = {
        b"member": entry(access.seal("p", b"member", progress(b"m"))),
        b"left": entry(access.seal("p", b"left", None)),  # a member that left: not an offense
        b"other-key": entry(other.seal("p", b"other-key", progress(b"o"))),
        b"plain": entry(progress(b"p")),  # a peer without the key that learned the name
        b"replayed": entry(
            access.seal("p", b"member", progress(b"m"))
        ),  # a member's record under another subkey
        b"moved": entry(access.seal("q", b"moved", progress(b"q"))),  # from another key
    }
    swarm = swarm_reading(entries, access)
    assert set(swarm._read_records("p", ProgressRecord)) == {b"member"}
    assert set(swarm._ignored) == {b"other-key", b"plain", b"replayed", b"moved"}
