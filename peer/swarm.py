"""The swarm on hivemind: the DHT, signed and schema-checked progress, hash and settings records (sealed with the
swarm key in a private swarm, peer/swarm_key.py), and (through peer/swarm_averaging.py) one all-reduce group per round
and state downloads.

`Swarm` implements `peer.network.SwarmNetwork` for the training loop. It only moves records and tensors; what to
wait for and when to average is decided in peer/rounds.py and acted on in peer/coordination.py.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import json
import logging
import math
import threading
import time
from collections.abc import Callable
from typing import Optional

import hivemind
import torch
from hivemind.dht.schema import BytesWithPublicKey, SchemaValidator
from hivemind.dht.validation import DHTRecord
from hivemind.utils.timed_storage import get_dht_time
from pydantic.v1 import BaseModel, conbytes  # hivemind's schemas are pydantic v1

from peer.config import RunConfig, SwarmConfig, differing_settings
from peer.network import AveragingAttempt, DonationCheck
from peer.reachability import check_reachability, check_relayed
from peer.records import (
    RECORD_BEAM_SIZE,
    SUMMARY_TTL_S,
    HashRecord,
    ProgressRecord,
    SettingsRecord,
    SummaryRecord,
    hashes_key,
    progress_key,
    settings_key,
    summary_key,
)
from peer.relay import relay_options
from peer.rounds import conflicting_settings, remembered_peers, stale_after_s
from peer.signing import RecordSigner
from peer.swarm_averaging import RoundAveraging, ScheduledStep, ensure_stopped
from peer.swarm_key import MAX_SEALED_BYTES, SealError, run_access

logger = logging.getLogger(__name__)

RECORD_TTL_S = 15.0  # how long the DHT keeps a progress record
# The settings record never changes and is several KB: it lives longer and is renewed a third as often as it would
# with the progress record's lifetime (every lookup of the key answers with all k of them). A peer that leaves
# deletes it; one that crashes leaves it for at most this long.
SETTINGS_TTL_S = 45.0
HASH_TTL_S = 600.0
HASH_HISTORY_ROUNDS = 16  # rounds of hash history each peer publishes
DHT_TIMEOUT_S = 10.0  # bound on any single DHT lookup
LEAVE_TIMEOUT_S = 5.0  # how long a leaving peer waits for the DHT to take the deletion of its records
CLOCK_SKEW_S = 30.0  # DHT clocks of honest peers agree far better than this
IGNORE_S = 120.0  # a peer that published a malformed or implausible record is ignored this long
MAX_IGNORED = 10_000


class SwarmError(RuntimeError):
    """A condition the user must fix (unreachable peers, mismatched run settings)."""


class LookupFailed(RuntimeError):
    """A DHT lookup did not answer within DHT_TIMEOUT_S."""


class RoundSchema(BaseModel):
    progress: dict[BytesWithPublicKey, Optional[ProgressRecord]]  # noqa: UP045 (pydantic needs Optional here)
    hashes: dict[BytesWithPublicKey, Optional[HashRecord]]  # noqa: UP045
    summary: dict[BytesWithPublicKey, Optional[SummaryRecord]]  # noqa: UP045 (for monitors: peer/monitor.py)


class RunSchema(BaseModel):
    settings: dict[BytesWithPublicKey, Optional[SettingsRecord]]  # noqa: UP045


# A private swarm's records are sealed (peer/swarm_key.py): the DHT sees bytes, the schemas above apply once opened.
Sealed = conbytes(strict=True, max_length=MAX_SEALED_BYTES)


class SealedRoundSchema(BaseModel):
    progress: dict[BytesWithPublicKey, Sealed]
    hashes: dict[BytesWithPublicKey, Sealed]
    summary: dict[BytesWithPublicKey, Sealed]


class SealedRunSchema(BaseModel):
    settings: dict[BytesWithPublicKey, Sealed]


class RecordSchemaValidator(SchemaValidator):
    """hivemind's SchemaValidator, refusing what it cannot even decode instead of raising: hivemind 1.1.12 puts the
    decoded subkey in a dict before any check, so a subkey that decodes to a list raised TypeError inside the DHT's
    request handlers."""

    def validate(self, record: DHTRecord) -> bool:
        try:
            return super().validate(record)
        except Exception:  # another peer's record, not our crash
            return False


def _start_dht(swarm: SwarmConfig, **p2p_options) -> hivemind.DHT:
    # Before the DHT (and later the averager) forks: what the peer allocated so far (torch, transformers, the model's
    # modules; a few hundred thousand objects) moves to the collector's permanent generation, here and in the
    # children. Full collections walked all of it, 100-250 ms each on a 2-core machine, stalling DHT lookups and
    # the round's critical path (docs/PERFORMANCE.md, sixth pass); it is never garbage anyway.
    gc.freeze()
    try:
        return hivemind.DHT(
            initial_peers=list(swarm.initial_peers),
            host_maddrs=list(swarm.host_maddrs),
            announce_maddrs=list(swarm.announce_maddrs) or None,
            identity_path=swarm.identity_path,
            client_mode=swarm.client_mode,
            start=True,
            await_ready=True,
            wait_timeout=10,
            **p2p_options,
        )
    except Exception as e:  # hivemind raises RuntimeError/ValueError/P2PDaemonError with long messages
        first_line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise SwarmError(
            f"could not start or join the DHT ({first_line}); check --initial-peers and --host-maddrs"
        ) from None


class Swarm:
    """This peer's membership in the swarm."""

    def __init__(
        self,
        config: RunConfig,
        *,
        settings: dict,
        fingerprint: str,
        averaged_tensors: list[torch.Tensor],
        state_provider,
        run_settings: dict | None = None,
    ):
        self.config, self.settings, self.fingerprint = config, settings, fingerprint
        # the run's settings as this peer trains them, published for newcomers (peer/run_settings.py)
        self._run_settings_json = json.dumps(run_settings, sort_keys=True) if run_settings else ""
        self._dht_lock = threading.Lock()
        self._hash_history: dict[int, tuple[str, str]] = {}
        self._ignored: dict[bytes, float] = {}  # subkey -> monotonic time until which its records are skipped
        swarm = config.swarm
        self.dht = _start_dht(swarm)
        try:
            reachability = check_reachability(self.dht, client_mode=swarm.client_mode)
            if reachability.kind == "outgoing-only" and not swarm.client_mode:
                # nobody can dial us: train as a client, which sends its update every round but never reduces a
                # shard or serves state (others would wait for us in vain)
                self.dht.shutdown()
                ensure_stopped(self.dht)
                swarm = dataclasses.replace(swarm, client_mode=True)
                self.config = config = dataclasses.replace(config, swarm=swarm)
                # with a slot on the bootstrap nodes (relays) others can still reach it; checked, then reported
                options = relay_options(list(swarm.initial_peers))
                self.dht = _start_dht(swarm, **options)
                if options:
                    reachability = check_relayed(self.dht, relays=options["trusted_relays"])
            self.reachability = reachability.kind
            self._peer_id = self.dht.peer_id
            self.peer_id = str(self._peer_id)
            self.short_id = self.peer_id[-6:]
            logger.info(f"[{self.short_id}] {reachability.line}")
            signature = RecordSigner()  # Ed25519: a third of the bytes of hivemind's RSA records
            self._public_key = signature.local_public_key
            # Open swarm: the plain names. Private swarm: names only holders of the key can compute (DHT nodes
            # store records by a hash of the name, so the nodes that store them cannot tell what they hold either).
            self.access = run_access(swarm.swarm_key, swarm.run_id)
            round_prefix = self.access.prefix(fingerprint, "records")
            run_prefix = self.access.prefix(swarm.run_id, "records")
            round_schema, run_schema = (
                (SealedRoundSchema, SealedRunSchema) if self.access.private else (RoundSchema, RunSchema)
            )
            self.dht.add_validators(
                [
                    RecordSchemaValidator(round_schema, prefix=round_prefix),
                    RecordSchemaValidator(run_schema, prefix=run_prefix),
                    signature,
                ]
            )
            self._progress_key = progress_key(round_prefix)
            self._hashes_key = hashes_key(round_prefix)
            self._summary_key = summary_key(round_prefix)
            self._settings_key = settings_key(run_prefix)
            self._averaging_round, self._scheduled_time = -1, 0.0
            self._last_live: tuple[float, dict[bytes, ProgressRecord]] = (0.0, {})
            self._progress = ProgressRecord(
                peer_id=self._peer_id.to_bytes(),
                round=-1,  # joining: not training any round yet
                inner_step=0,
                tokens=0,
                done=False,
                averaging=-1,
                scheduled_time=0.0,
                tokens_per_s=0.0,
                eta=get_dht_time(),
                client_mode=swarm.client_mode,
            )
            self._stop = threading.Event()
            self._publish_now = threading.Event()
            self.check_run_settings()

            self.averaging = RoundAveraging(
                config,
                fingerprint,
                self.dht,
                averaged_tensors,
                state_provider,
                short_id=self.short_id,
                voter_key=self._public_key,
                access=self.access,
            )
            self._publisher = threading.Thread(
                target=self._publish_periodically, name="progress", daemon=True
            )
            self._publisher.start()
        except BaseException:
            self.dht.shutdown()  # do not leave the DHT process behind
            raise

    # ---- DHT access: hivemind's DHT pipe is not thread-safe, so every call goes through one lock ----------
    def _store(self, key: str, *, subkey: bytes, value, expiration_time: float):
        """Store without waiting; returns the store's future."""
        # a private swarm's records are sealed for this very key and subkey
        stored = self.access.seal(key, subkey, value)
        with self._dht_lock:
            return self.dht.store(
                key,
                subkey=subkey,
                value=stored,
                expiration_time=expiration_time,
                beam_size=RECORD_BEAM_SIZE,
                return_future=True,
            )

    def _get(self, key: str):
        """The key's value (None: nothing stored); raises LookupFailed if the DHT did not answer in time."""
        with self._dht_lock:
            future = self.dht.get(key, latest=True, beam_size=RECORD_BEAM_SIZE, return_future=True)
        try:
            return future.result(timeout=DHT_TIMEOUT_S)
        except Exception as e:
            logger.debug(f"DHT get {key} failed: {e!r}")
            raise LookupFailed(key) from None

    def _read_records(
        self,
        key: str,
        schema: type[BaseModel],
        *,
        ttl_s: float = RECORD_TTL_S,
        published_after: float = 0.0,
        strict: bool = False,
    ) -> dict[bytes, BaseModel]:
        """Every peer's valid record under a key, by the DHT subkey that signed it (one key, one record: a record's
        own claims about who wrote it are not trusted). Records published (stored with expiration time = publication
        + ttl_s) before `published_after` are skipped; a malformed record, or one that claims to live longer than any
        honest record does, gets its author ignored for IGNORE_S (I8). A failed lookup raises LookupFailed if
        `strict`, else it reads as no records."""
        try:
            found = self._get(key)
        except LookupFailed:
            if strict:
                raise
            found = None  # a slow or failing lookup counts as "nothing found"
        now, records = get_dht_time(), {}
        entries = found.value.items() if found is not None and isinstance(found.value, dict) else []
        for subkey, item in entries:
            if not isinstance(subkey, bytes) or self._ignored.get(subkey, 0.0) > time.monotonic():
                continue
            if (
                item.expiration_time > now + ttl_s + CLOCK_SKEW_S
            ):  # never expires: a dead author would stay "live"
                self._ignore(subkey, f"a {key} record expiring {item.expiration_time - now:.0f}s from now")
                continue
            try:
                value = self.access.open(key, subkey, item.value)
            except SealError:  # written without our swarm key, or moved here from another key or subkey
                self._ignore(subkey, f"a {schema.__name__} that does not open with the swarm key")
                continue
            if item.expiration_time - ttl_s < published_after or value is None:  # None: the peer left
                continue
            try:
                records[subkey] = schema.parse_obj(value)
            except Exception as e:  # data from other peers is not trusted
                self._ignore(subkey, f"a malformed {key} record ({type(e).__name__})")
        return records

    def _ignore(self, subkey: bytes, why: str) -> None:
        if subkey not in self._ignored or self._ignored[subkey] < time.monotonic():
            logger.warning(f"[{self.short_id}] ignoring a peer for {IGNORE_S:.0f}s: it published {why}")
        if len(self._ignored) > MAX_IGNORED:
            self._ignored = {k: t for k, t in self._ignored.items() if t > time.monotonic()}
        self._ignored[subkey] = time.monotonic() + IGNORE_S

    # ---- addresses -------------------------------------------------------------------------------------------
    def visible_maddrs(self) -> list[str]:
        return [str(addr) for addr in self.dht.get_visible_maddrs()]

    def my_key(self) -> bytes:
        """Our DHT subkey: the public key that signs our records, and our voter identity in every group."""
        return self._public_key

    def time(self) -> float:
        return get_dht_time()

    # ---- run identity (I5) -----------------------------------------------------------------------------------
    def _settings_record(self) -> SettingsRecord:
        return SettingsRecord(
            peer_id=self._peer_id.to_bytes(),
            fingerprint=self.fingerprint,
            settings_json=json.dumps(self.settings, sort_keys=True),
            run_settings_json=self._run_settings_json,
        )

    def check_run_settings(self) -> None:
        """Exit with the differing settings if a live peer of the same run id trains another configuration."""
        self._store(
            self._settings_key,
            subkey=self._public_key,
            value=self._settings_record().dict(),
            expiration_time=get_dht_time() + SETTINGS_TTL_S,
        )
        records = self._read_records(self._settings_key, SettingsRecord, ttl_s=SETTINGS_TTL_S)
        conflict = conflicting_settings(records, me=self._public_key, fingerprint=self.fingerprint)
        if conflict is not None:
            try:
                theirs = json.loads(conflict.settings_json)
            except ValueError:
                theirs = {}
            differences = differing_settings(self.settings, theirs if isinstance(theirs, dict) else {})
            raise SwarmError(
                f"run {self.config.swarm.run_id!r} is already training with other settings: "
                f"{'; '.join(differences) or 'fingerprint ' + conflict.fingerprint}. "
                "Use the same settings or another --run-id."
            )

    # ---- progress records ------------------------------------------------------------------------------------
    def report_progress(
        self,
        *,
        round_index: int,
        inner_step: int,
        tokens: int,
        done: bool,
        tokens_per_s: float,
        eta: float,
        now: bool = False,
    ) -> None:
        """Update this peer's progress record (published in the background every progress_period_s)."""
        self._progress = ProgressRecord(
            peer_id=self._peer_id.to_bytes(),
            round=round_index,
            inner_step=inner_step,
            tokens=int(tokens),
            done=bool(done),
            averaging=self._averaging_round,
            scheduled_time=self._scheduled_time,
            tokens_per_s=float(tokens_per_s),
            eta=float(eta),
            client_mode=self.config.swarm.client_mode,
        )
        if now:
            self._publish_now.set()

    def my_progress(self) -> ProgressRecord:
        return self._progress

    def mark_averaging(self, round_index: int, scheduled_time: float = 0.0) -> None:
        self._averaging_round, self._scheduled_time = round_index, scheduled_time
        self._progress = self._progress.copy(
            update={"averaging": round_index, "scheduled_time": scheduled_time}
        )
        self._publish_now.set()

    def _publish_periodically(self) -> None:
        settings_published = -math.inf
        while not self._stop.is_set():
            expiration = get_dht_time() + RECORD_TTL_S
            try:
                self._store(
                    self._progress_key,
                    subkey=self._public_key,
                    value=self._progress.dict(),
                    expiration_time=expiration,
                )
                # the settings never change: renewed three times per lifetime, not with every progress update
                if time.monotonic() - settings_published >= SETTINGS_TTL_S / 3:
                    self._store(
                        self._settings_key,
                        subkey=self._public_key,
                        value=self._settings_record().dict(),
                        expiration_time=get_dht_time() + SETTINGS_TTL_S,
                    )
                    settings_published = time.monotonic()
            except Exception as e:  # the DHT may be shutting down
                logger.debug(f"progress publish failed: {e!r}")
            self._publish_now.wait(self.config.swarm.progress_period_s)
            self._publish_now.clear()

    def live_peers(self) -> dict[bytes, ProgressRecord]:
        """Progress records of every peer that published recently, this one included."""
        stale_after = stale_after_s(self.config.swarm.progress_period_s)
        try:
            records = self._read_records(
                self._progress_key, ProgressRecord, published_after=get_dht_time() - stale_after, strict=True
            )
            self._last_live = (time.monotonic(), dict(records))
        except LookupFailed:
            seen_at, last = self._last_live
            records = remembered_peers(last, age_s=time.monotonic() - seen_at, record_ttl_s=RECORD_TTL_S)
        records[self._public_key] = self._progress
        return records

    # ---- averaging ---------------------------------------------------------------------------------------------
    def schedule_averaging(
        self,
        round_index: int,
        *,
        scheduled_time: float,
        order_key: bytes,
        how: str,
        value_bound: float,
        expected_peers: int = 0,
    ) -> ScheduledStep:
        scheduled = self.averaging.schedule(
            round_index,
            scheduled_time=scheduled_time,
            order_key=order_key,
            how=how,
            value_bound=value_bound,
            expected_peers=expected_peers,
        )
        self.mark_averaging(round_index, scheduled.scheduled_time)
        return scheduled

    def run_averaging(
        self,
        scheduled: ScheduledStep,
        pseudo_grads: list[torch.Tensor],
        *,
        tokens: int,
        should_stop: Callable[[], bool],
        during_allreduce: Callable[[], None] | None = None,
    ) -> AveragingAttempt:
        return self.averaging.run(
            scheduled, pseudo_grads, tokens=tokens, should_stop=should_stop, during_allreduce=during_allreduce
        )

    # ---- agreement (I1/I3) -----------------------------------------------------------------------------------
    def publish_summary(self, summary: SummaryRecord) -> None:
        """Publish this peer's summary of its latest round for monitors (stored without waiting)."""
        self._store(
            self._summary_key,
            subkey=self._public_key,
            value=summary.dict(),
            expiration_time=get_dht_time() + SUMMARY_TTL_S,
        )

    def publish_hash(self, round_index: int, params_sha256: str, state_sha256: str) -> None:
        """Publish our hashes for this round along with the last few (slower peers compare against them)."""
        self._hash_history[round_index] = (params_sha256, state_sha256)
        for old in sorted(self._hash_history)[:-HASH_HISTORY_ROUNDS]:
            del self._hash_history[old]
        record = HashRecord(
            peer_id=self._peer_id.to_bytes(),
            hashes={str(r): h for r, (h, _) in self._hash_history.items()},
            state_hashes={str(r): h for r, (_, h) in self._hash_history.items()},
        )
        self._store(
            self._hashes_key,
            subkey=self._public_key,
            value=record.dict(),
            expiration_time=get_dht_time() + HASH_TTL_S,
        )

    def hash_records(self) -> dict[bytes, HashRecord]:
        return self._read_records(self._hashes_key, HashRecord, ttl_s=HASH_TTL_S)

    # ---- state sharing ---------------------------------------------------------------------------------------
    # ---- state sharing ---------------------------------------------------------------------------------------
    def download_state(
        self, donors: list[bytes], *, check: DonationCheck
    ) -> tuple[dict, list[torch.Tensor]] | None:
        return self.averaging.download_state(donors, check=check)

    def shutdown(self) -> None:
        self._stop.set()
        self._publish_now.set()
        self._publisher.join(timeout=DHT_TIMEOUT_S)
        # leaving: delete our records (a later expiration replaces them), and wait until the DHT took the deletions,
        # or the DHT would shut down with them unsent and the records would outlive us
        with contextlib.suppress(Exception):
            deletions = [
                self._store(key, subkey=self._public_key, value=None, expiration_time=get_dht_time() + ttl_s)
                for key, ttl_s in ((self._progress_key, RECORD_TTL_S), (self._settings_key, SETTINGS_TTL_S))
            ]
            deadline = time.monotonic() + LEAVE_TIMEOUT_S
            for deletion in deletions:
                deletion.result(timeout=max(0.0, deadline - time.monotonic()))
        self.averaging.shutdown()
        with self._dht_lock:
            self.dht.shutdown()
            ensure_stopped(self.dht)
