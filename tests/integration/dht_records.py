"""Publish a peer's DHT records (settings, progress, summary, hashes) from a test, as a training peer would, into a
real local DHT: for testing the monitor without training."""

from __future__ import annotations

import json

import hivemind
import torch.multiprocessing
from hivemind.utils.timed_storage import get_dht_time

from peer.records import (
    HashRecord,
    ProgressRecord,
    SettingsRecord,
    SummaryRecord,
    hashes_key,
    progress_key,
    settings_key,
    summary_key,
)
from peer.signing import RecordSigner
from peer.summary import build_summary

# as the peers do (peer/__main__.py): hivemind's default "file_system" starts a torch_shm_manager process that the
# suite's leftover-process cleanup would kill under this test process's feet
torch.multiprocessing.set_sharing_strategy("file_descriptor")

TTL_S = 15.0  # as swarm.RECORD_TTL_S: the monitor reads the publication time as expiration - 15 s


class RecordPublisher:
    """One pretend peer: its own DHT node and signing key."""

    def __init__(self, initial_peers: list[str], *, run_id: str, fingerprint: str):
        self.run_id, self.fingerprint = run_id, fingerprint
        validator = RecordSigner()
        self.public_key = validator.local_public_key
        self.dht = hivemind.DHT(
            initial_peers=initial_peers,
            host_maddrs=["/ip4/127.0.0.1/tcp/0"],
            record_validators=[validator],
            start=True,
            await_ready=True,
        )
        self.peer_id = str(self.dht.peer_id)
        self.summary: SummaryRecord | None = None

    def store(self, key: str, value, ttl_s: float = TTL_S) -> None:
        assert self.dht.store(
            key, subkey=self.public_key, value=value, expiration_time=get_dht_time() + ttl_s
        )

    def publish_settings(self, settings: dict) -> None:
        record = SettingsRecord(
            peer_id=self.dht.peer_id.to_bytes(),
            fingerprint=self.fingerprint,
            settings_json=json.dumps(settings),
        )
        self.store(settings_key(self.run_id), record.dict())

    def publish_progress(
        self, round_index: int, *, client_mode: bool = False, tokens_per_s: float = 100.0
    ) -> None:
        record = ProgressRecord(
            peer_id=self.dht.peer_id.to_bytes(),
            round=round_index,
            inner_step=2,
            tokens=512,
            done=False,
            averaging=-1,
            scheduled_time=0.0,
            tokens_per_s=tokens_per_s,
            eta=get_dht_time() + 5.0,
            client_mode=client_mode,
        )
        self.store(progress_key(self.fingerprint), record.dict())

    def publish_round(self, metrics: dict, *, reachability: str = "direct") -> SummaryRecord:
        """The summary after a round, built from a metrics record with the peers' own builder."""
        self.summary = build_summary(
            {**metrics, "peer_id": self.peer_id},
            previous=self.summary,
            device="cpu",
            reachability=reachability,
            max_rounds=10,
        )
        self.store(summary_key(self.fingerprint), self.summary.dict(), ttl_s=600.0)
        return self.summary

    def publish_hashes(self, hashes: dict[int, str]) -> None:
        record = HashRecord(
            peer_id=self.dht.peer_id.to_bytes(), hashes={str(r): h for r, h in hashes.items()}
        )
        self.store(hashes_key(self.fingerprint), record.dict(), ttl_s=600.0)

    def shutdown(self) -> None:
        self.dht.shutdown()
