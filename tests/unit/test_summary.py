"""The per-round summary record: built from the metrics record, bounded, and accepted by hivemind's schema check."""

from __future__ import annotations

import json
from typing import Optional

import pytest
from hivemind.dht.protocol import DHTProtocol
from hivemind.dht.routing import DHTID
from hivemind.dht.schema import BytesWithPublicKey, SchemaValidator
from hivemind.dht.validation import DHTRecord
from pydantic.v1 import BaseModel, ValidationError

from peer.metrics import MetricsSinks
from peer.records import SUMMARY_HISTORY_ROUNDS, SummaryRecord, summary_key
from peer.signing import RecordSigner
from peer.summary import SummaryPublisher, build_summary

PEER_ID = "QmTzY3nR9ZrWv8KqLhEHc5FzS3EfN7eGx1B2uVqWcDpA1b"


def metrics_record(round_index: int, **overrides) -> dict:
    """A record with the keys train.py writes to --metrics-file (README "Metrics")."""
    record = {
        "round": round_index,
        "peer_id": PEER_ID,
        "fingerprint": "0123456789abcdef",
        "loss": 5.0 - 0.1 * round_index,
        "group_size": 3,
        "global_params_sha256": f"{round_index:064x}",
        "tokens": 1024 * round_index,
        "round_tokens": 1024,
        "inner_steps": 4,
        "num_params": 1500000,
        "tokens_per_s": 512.5,
        "inner_s": 2.0,
        "inner_started_at": 1.7e9,
        "allreduce_s": 0.5,
        "overlap": False,
        "lr": 1e-3,
        "failed": False,
        "failed_rounds": 0,
        "resynced": False,
        "resyncs": 0,
        "time": 1.7e9,
        "bytes_sent": 1000,
        "bytes_received": 2000,
        "transfer_s": 0.1,
        "sync_wait_s": 0.01,
    }
    return {**record, **overrides}


def build(record: dict, previous: SummaryRecord | None = None) -> SummaryRecord:
    return build_summary(record, previous=previous, device="cpu", reachability="direct", max_rounds=20)


def test_summary_from_metrics_record():
    summary = build(metrics_record(3, eval_loss=4.5, failed_rounds=1, resyncs=2))
    assert summary.peer_id == PEER_ID
    assert (summary.round, summary.loss, summary.eval_loss, summary.tokens) == (3, 4.7, 4.5, 3072)
    assert (summary.bytes_sent, summary.bytes_received, summary.group_size) == (1000, 2000, 3)
    assert (summary.failed_rounds, summary.resyncs, summary.max_rounds) == (1, 2, 20)
    assert summary.last_hash == f"{3:064x}"
    assert [(p.round, p.loss, p.eval_loss, p.tokens) for p in summary.recent] == [(3, 4.7, 4.5, 1024)]


def test_summary_keeps_running_totals_and_a_bounded_history():
    summary = None
    for round_index in range(1, 13):
        eval_loss = {"eval_loss": 4.0} if round_index == 5 else {}
        summary = build(metrics_record(round_index, **eval_loss), previous=summary)
    assert summary.bytes_sent == 12 * 1000 and summary.bytes_received == 12 * 2000
    assert [p.round for p in summary.recent] == list(range(13 - SUMMARY_HISTORY_ROUNDS, 13))
    assert summary.eval_loss == 4.0  # the latest measured, carried forward
    assert all(p.eval_loss is None for p in summary.recent if p.round != 5)


def test_summary_of_a_diverged_or_odd_round_is_still_valid():
    summary = build(
        metrics_record(
            2, loss=float("nan"), eval_loss=float("inf"), tokens_per_s=float("nan"), bytes_sent=None
        )
    )
    assert summary.loss is None and summary.eval_loss is None and summary.tokens_per_s == 0.0
    assert summary.bytes_sent == 0
    odd = build_summary(
        metrics_record(1), previous=None, device="cuda \u00e9" + "x" * 100, reachability="bogus", max_rounds=0
    )
    assert odd.device == "cuda " + "x" * 59 and odd.reachability == "unknown"


@pytest.mark.parametrize(
    "bad",
    [
        {"loss": float("nan")},
        {"eval_loss": float("inf")},
        {"loss": -1.0},
        {"round": -1},
        {"round": 10**12},
        {"tokens": 1.5},
        {"tokens": True},
        {"tokens_per_s": 1},  # an int where a float belongs would be converted: not allowed
        {"bytes_sent": 10**30},
        {"reachability": "everywhere"},
        {"device": "x" * 65},
        {"device": "gpu\n"},
        {"last_hash": "A" * 64},
        {"peer_id": "two words"},
        {"peer_id": "x" * 65},
        {
            "recent": [{"round": 1, "loss": 1.0, "eval_loss": None, "tokens": 1}]
            * (SUMMARY_HISTORY_ROUNDS + 1)
        },
        {"recent": [{"round": 1, "loss": 1e9, "eval_loss": None, "tokens": 1}]},
        {"extra": 1},
    ],
)
def test_summary_schema_rejects_out_of_range_values(bad):
    good = build(metrics_record(1)).dict()
    with pytest.raises(ValidationError):
        SummaryRecord.parse_obj({**good, **bad})


class SummarySchema(BaseModel):
    """The schema the swarm's DHT validator applies to summary records (a field per key, as in swarm.py)."""

    summary: dict[BytesWithPublicKey, Optional[SummaryRecord]]  # noqa: UP045


def dht_record(fingerprint: str, value: dict) -> DHTRecord:
    subkey = RecordSigner().local_public_key
    return DHTRecord(
        key=DHTID.generate(source=summary_key(fingerprint)).to_bytes(),
        subkey=DHTProtocol.serializer.dumps(subkey),
        value=DHTProtocol.serializer.dumps(value),
        expiration_time=0.0,
    )


def test_hivemind_schema_validator_accepts_summaries_and_rejects_bad_ones():
    validator = SchemaValidator(SummarySchema, prefix="0123456789abcdef")
    good = build(metrics_record(4, eval_loss=3.0), previous=build(metrics_record(3))).dict()
    assert validator.validate(dht_record("0123456789abcdef", good))
    assert not validator.validate(dht_record("0123456789abcdef", {**good, "round": "4"}))
    assert not validator.validate(dht_record("0123456789abcdef", {**good, "loss": 1e6}))
    missing = dict(good)
    del missing["resyncs"]
    assert not validator.validate(dht_record("0123456789abcdef", missing))


def test_summary_publisher_publishes_each_round_and_survives_a_failing_dht():
    published: list[SummaryRecord] = []
    fail = [False]

    def publish(summary: SummaryRecord) -> None:
        if fail[0]:
            raise TimeoutError("DHT busy")
        published.append(summary)

    publisher = SummaryPublisher(publish, device="cpu", max_rounds=0)
    seen: list[dict] = []
    sinks = MetricsSinks(publisher, type("Sink", (), {"log_round": lambda self, r: seen.append(r)})())
    sinks.log_round(metrics_record(1))
    publisher.reachability = "relayed"
    fail[0] = True
    sinks.log_round(metrics_record(2))  # logged as a warning, never raised
    fail[0] = False
    sinks.log_round(metrics_record(3))
    assert [s.round for s in published] == [1, 3] and len(seen) == 3
    assert published[0].reachability == "unknown" and published[1].reachability == "relayed"
    assert published[1].bytes_sent == 3000  # round 2 still counted in the totals
    assert [p.round for p in published[1].recent] == [1, 2, 3]


def test_the_loop_publishes_a_summary_of_every_round(tmp_path):
    from peer.signals import StopFlag
    from peer.train import Peer
    from tests.unit.fake_network import FakeSwarm
    from tests.unit.test_train import make_config

    swarm = FakeSwarm(companions=1)
    assert (
        Peer(
            make_config(tmp_path, eval_every=2), StopFlag(handle_signals=False), network_factory=swarm.factory
        ).run()
        == 0
    )
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [s.round for s in swarm.published_summaries] == [r["round"] for r in records] == [1, 2, 3]
    last, record = swarm.published_summaries[-1], records[-1]
    assert (last.peer_id, last.last_hash, last.tokens) == (
        record["peer_id"],
        record["global_params_sha256"],
        record["tokens"],
    )
    assert last.loss == pytest.approx(record["loss"]) and last.eval_loss == pytest.approx(
        records[1]["eval_loss"]
    )
    assert (last.device, last.reachability, last.max_rounds) == ("cpu", "direct", 3)
