"""DHT records survive hivemind's msgpack round trip and its pydantic-v1 schema check."""

from __future__ import annotations

from hivemind.utils.serializer import MSGPackSerializer

from peer.records import HashRecord, ProgressRecord, SettingsRecord


def round_trip(record):
    return type(record).parse_obj(MSGPackSerializer.loads(MSGPackSerializer.dumps(record.dict())))


def test_records_round_trip_through_msgpack():
    records = [
        ProgressRecord(
            peer_id=b"p",
            round=3,
            inner_step=7,
            tokens=7168,
            done=False,
            averaging=2,
            scheduled_time=130.5,
            tokens_per_s=10.5,
            eta=123.0,
            client_mode=False,
        ),
        HashRecord(peer_id=b"p", hashes={"3": "ab" * 32, "4": "cd" * 32}),
        SettingsRecord(peer_id=b"p", fingerprint="0123456789abcdef", settings_json="{}"),
    ]
    for record in records:
        assert round_trip(record) == record
