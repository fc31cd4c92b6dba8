"""Everything hivemind: the DHT, signed progress and hash records, one all-reduce group per round, state sharing.

`Swarm` implements the `outer.Averager` protocol for the training loop.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import json
import logging
import threading
import time
from collections import Counter
from dataclasses import dataclass
from typing import Optional

import hivemind
import torch
from hivemind.averaging.control import AveragingStage, StepControl
from hivemind.compression import BlockwiseQuantization, CompressionBase, Float16Compression, NoCompression
from hivemind.dht.schema import BytesWithPublicKey, RSASignatureValidator, SchemaValidator
from hivemind.p2p import PeerID
from hivemind.utils.timed_storage import get_dht_time
from pydantic.v1 import BaseModel  # hivemind's schemas are pydantic v1

from peer.config import RunConfig, differing_settings
from peer.outer import AveragingResult
from peer.records import HashRecord, ProgressRecord, SettingsRecord

logger = logging.getLogger(__name__)

RECORD_TTL_S = 15.0  # how long the DHT keeps a progress record
# a peer whose last progress publication is older than this many periods (and at least STALE_MIN_S) counts as gone:
# a killed peer stops blocking the others' waits within seconds, not after the record's whole TTL
STALE_AFTER_PERIODS, STALE_MIN_S = 4, 6.0
HASH_TTL_S = 600.0
HASH_HISTORY_ROUNDS = 16  # rounds of hash history each peer publishes
DHT_TIMEOUT_S = 10.0  # bound on any single DHT lookup
# a peer joins a scheduled group only if it can start matchmaking this long before the group forms
JOIN_MARGIN_S = 1.0


class SwarmError(RuntimeError):
    """A condition the user must fix (unreachable peers, mismatched run settings)."""


class LookupFailed(RuntimeError):
    """A DHT lookup did not answer within DHT_TIMEOUT_S."""


class RoundSchema(BaseModel):
    progress: dict[BytesWithPublicKey, Optional[ProgressRecord]]  # noqa: UP045 (pydantic needs Optional here)
    hashes: dict[BytesWithPublicKey, Optional[HashRecord]]  # noqa: UP045


class RunSchema(BaseModel):
    settings: dict[BytesWithPublicKey, Optional[SettingsRecord]]  # noqa: UP045


COMPRESSION: dict[str, CompressionBase] = {
    "none": NoCompression(),
    "fp16": Float16Compression(),
    "int8": BlockwiseQuantization(),
}


@dataclass
class RoundProgress:
    """The swarm's combined progress in one round."""

    tokens: int
    """Tokens processed in the round by all live peers in it."""
    closed: bool
    """Some peer has ended the round (or, with --round-tokens, the swarm reached the budget)."""
    end_eta: float
    """DHT time at which the round's all-reduce should start."""
    peers: int
    all_in_round: bool
    """Every live peer has reached this round (none is still finishing the previous one)."""
    scheduled_time: float
    """The group time another peer of this round already scheduled (0: none yet)."""
    slowest_step_s: float
    """The longest inner step among the round's peers: how late a peer may notice a scheduled group."""


@dataclass
class ScheduledStep:
    """A round's all-reduce whose matchmaking has started; it runs once triggered with the pseudo-gradient."""

    control: StepControl
    round_index: int
    scheduled_time: float
    how: str
    """own (this peer chose the time), adopted (another peer of the round did), or after-inner (scheduled once
    the inner phase was over)."""
    lead_s: float
    """How long before the group time matchmaking started."""


@dataclass
class SwarmView:
    """What the swarm agrees on for a round, from the published hash records."""

    round_index: int
    majority_hash: str | None
    donors: list[bytes]
    num_records: int


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
    ):
        self.config, self.settings, self.fingerprint = config, settings, fingerprint
        self._dht_lock = threading.Lock()
        self._hash_history: dict[int, str] = {}
        swarm = config.swarm
        try:
            self.dht = hivemind.DHT(
                initial_peers=list(swarm.initial_peers),
                host_maddrs=list(swarm.host_maddrs),
                announce_maddrs=list(swarm.announce_maddrs) or None,
                identity_path=swarm.identity_path,
                client_mode=swarm.client_mode,
                start=True,
                await_ready=True,
                wait_timeout=10,
            )
        except Exception as e:  # hivemind raises RuntimeError/ValueError/P2PDaemonError with long messages
            first_line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise SwarmError(
                f"could not start or join the DHT ({first_line}); check --initial-peers and --host-maddrs"
            ) from None
        try:
            self.peer_id = self.dht.peer_id
            self.short_id = str(self.peer_id)[-6:]
            signature = RSASignatureValidator()
            self._public_key = signature.local_public_key
            self.dht.add_validators(
                [
                    SchemaValidator(RoundSchema, prefix=fingerprint),
                    SchemaValidator(RunSchema, prefix=swarm.run_id),
                    signature,
                ]
            )
            self._progress_key = f"{fingerprint}_progress"
            self._hashes_key = f"{fingerprint}_hashes"
            self._settings_key = f"{swarm.run_id}_settings"
            self._averaging_round, self._scheduled_time = -1, 0.0
            self._last_live: tuple[float, dict[bytes, ProgressRecord]] = (0.0, {})
            self._tokens_per_step = config.data.batch_size * config.data.seq_len
            self._progress = ProgressRecord(
                peer_id=self.peer_id.to_bytes(),
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

            self.averager = _make_averager(config, fingerprint, self.dht, averaged_tensors, state_provider)
            self._publisher = threading.Thread(
                target=self._publish_periodically, name="progress", daemon=True
            )
            self._publisher.start()
        except BaseException:
            self.dht.shutdown()  # do not leave the DHT process behind
            raise

    # ---- DHT access: hivemind's DHT pipe is not thread-safe, so every call goes through one lock ----------
    def _store(self, key: str, *, subkey: bytes, value, expiration_time: float) -> None:
        with self._dht_lock:
            self.dht.store(
                key, subkey=subkey, value=value, expiration_time=expiration_time, return_future=True
            )

    def _get(self, key: str):
        """The key's value (None: nothing stored); raises LookupFailed if the DHT did not answer in time."""
        with self._dht_lock:
            future = self.dht.get(key, latest=True, return_future=True)
        try:
            return future.result(timeout=DHT_TIMEOUT_S)
        except Exception as e:
            logger.debug(f"DHT get {key} failed: {e!r}")
            raise LookupFailed(key) from None

    def _read_records(
        self, key: str, schema: type[BaseModel], *, published_after: float = 0.0, strict: bool = False
    ) -> dict[bytes, BaseModel]:
        """Every peer's valid record under a key, by peer id; malformed ones are skipped, and so are those published
        (stored with expiration time = publication + RECORD_TTL_S) before `published_after`. A failed lookup
        raises LookupFailed if `strict`, else it reads as no records."""
        try:
            found = self._get(key)
        except LookupFailed:
            if strict:
                raise
            found = None  # a slow or failing lookup counts as "nothing found"
        records = {}
        for item in found.value.values() if found is not None and isinstance(found.value, dict) else []:
            if item.expiration_time - RECORD_TTL_S < published_after:
                continue
            try:
                record = schema.parse_obj(item.value)
            except Exception:  # data from other peers is not trusted
                continue
            records[record.peer_id] = record
        return records

    # ---- addresses -------------------------------------------------------------------------------------------
    def visible_maddrs(self) -> list[str]:
        return [str(addr) for addr in self.dht.get_visible_maddrs()]

    # ---- run identity (I5) -----------------------------------------------------------------------------------
    def _settings_record(self) -> SettingsRecord:
        return SettingsRecord(
            peer_id=self.peer_id.to_bytes(),
            fingerprint=self.fingerprint,
            settings_json=json.dumps(self.settings, sort_keys=True),
        )

    def check_run_settings(self) -> None:
        """Exit with the differing settings if a live peer of the same run id trains another configuration."""
        self._store(
            self._settings_key,
            subkey=self._public_key,
            value=self._settings_record().dict(),
            expiration_time=get_dht_time() + RECORD_TTL_S,
        )
        for record in self._read_records(self._settings_key, SettingsRecord).values():
            if record.fingerprint != self.fingerprint:
                differences = differing_settings(self.settings, json.loads(record.settings_json))
                raise SwarmError(
                    f"run {self.config.swarm.run_id!r} is already training with other settings: "
                    f"{'; '.join(differences)}. Use the same settings or another --run-id."
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
            peer_id=self.peer_id.to_bytes(),
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

    def my_eta(self) -> float:
        """When this peer expects to finish its inner phase (DHT time), as last reported."""
        return self._progress.eta

    def _set_averaging_round(self, round_index: int, scheduled_time: float = 0.0) -> None:
        self._averaging_round, self._scheduled_time = round_index, scheduled_time
        self._progress = self._progress.copy(
            update={"averaging": round_index, "scheduled_time": scheduled_time}
        )
        self._publish_now.set()

    def _publish_periodically(self) -> None:
        while not self._stop.is_set():
            expiration = get_dht_time() + RECORD_TTL_S
            try:
                self._store(
                    self._progress_key,
                    subkey=self._public_key,
                    value=self._progress.dict(),
                    expiration_time=expiration,
                )
                self._store(
                    self._settings_key,
                    subkey=self._public_key,
                    value=self._settings_record().dict(),
                    expiration_time=expiration,
                )
            except Exception as e:  # the DHT may be shutting down
                logger.debug(f"progress publish failed: {e!r}")
            self._publish_now.wait(self.config.swarm.progress_period_s)
            self._publish_now.clear()

    def live_peers(self) -> dict[bytes, ProgressRecord]:
        """Progress records of every peer that published recently, this one included."""
        stale_after = max(STALE_AFTER_PERIODS * self.config.swarm.progress_period_s, STALE_MIN_S)
        try:
            records = self._read_records(
                self._progress_key, ProgressRecord, published_after=get_dht_time() - stale_after, strict=True
            )
            self._last_live = (time.monotonic(), dict(records))
        except LookupFailed:
            # keep believing what we last saw (for a record's lifetime): a lookup that timed out under load must
            # not make a peer think it is alone (it would take a lonely outer step and fork from the swarm)
            seen_at, last = self._last_live
            records = dict(last) if time.monotonic() - seen_at < RECORD_TTL_S else {}
        records[self.peer_id.to_bytes()] = self._progress
        return records

    def wait_for_peers(self, count: int, *, timeout_s: float, should_stop) -> int:
        """Block until `count` peers (this one included) are live, the timeout passes or should_stop(); returns
        how many are live."""
        deadline = time.monotonic() + timeout_s
        while True:
            live = len(self.live_peers())
            if live >= count or time.monotonic() >= deadline or should_stop():
                return live
            self._publish_now.set()
            time.sleep(0.5)

    def wait_until_round_peers_done(
        self, round_index: int, *, wait_s: float, should_stop
    ) -> list[ProgressRecord] | None:
        """Wait until every other live peer of this round has finished its inner steps (at most wait_s) or some of
        them scheduled the round's group. Peers still finishing the previous round (their outer step, or a slow
        inner phase) are on their way to this one and are waited for too.

        Returns the records of those peers (empty: this peer is alone, a round of one), or None if the live
        peers are all past this round."""
        me = self.peer_id.to_bytes()
        deadline = time.monotonic() + wait_s
        while True:
            others = [r for pid, r in self.live_peers().items() if pid != me]
            in_round = [r for r in others if r.round == round_index or r.averaging == round_index]
            coming = [r for r in others if r.round == round_index - 1 and r not in in_round]
            if not in_round and not coming and any(r.round > round_index for r in others):
                return None
            pending = coming + [r for r in in_round if r.round == round_index and not r.done]
            # a group already scheduled by others of this round: join it now instead of waiting it out
            joinable = _group_time(in_round, round_index, after=get_dht_time() + JOIN_MARGIN_S) > 0
            if not pending or joinable or time.monotonic() >= deadline or should_stop():
                return in_round + coming
            time.sleep(0.25)

    # ---- when a round ends ------------------------------------------------------------------------------------
    def round_progress(self, round_index: int, *, straggler_wait_s: float) -> RoundProgress:
        """The swarm's progress in a round, from the live peers' records (this peer's own record included).

        `end_eta` is when the round's all-reduce should start: with fixed H, when the slowest live peer of the
        round expects to finish (but no later than straggler_wait_s after this peer); with --round-tokens,
        when the swarm's combined throughput reaches the token budget."""
        live = self.live_peers()
        records = [r for r in live.values() if r.round == round_index]
        mine = self._progress
        me = self.peer_id.to_bytes()
        others = [r for pid, r in live.items() if pid != me]
        all_in_round = all(r.round == round_index or r.averaging == round_index for r in live.values())
        tokens = sum(r.tokens for r in records)
        closed = any(r.done for r in records)
        budget = self.config.inner.round_tokens
        if budget:
            closed = closed or tokens >= budget
            rate = sum(r.tokens_per_s for r in records if not r.done)
            end_eta = get_dht_time() + max(0, budget - tokens) / rate if rate > 0 else mine.eta
        else:
            end_eta = max([r.eta for r in records if not r.done] + [mine.eta])
            end_eta = min(end_eta, mine.eta + straggler_wait_s)
        return RoundProgress(
            tokens=tokens,
            closed=closed,
            end_eta=end_eta,
            peers=len(records),
            all_in_round=all_in_round,
            scheduled_time=_group_time(others, round_index, after=0.0),
            slowest_step_s=max(
                (self._tokens_per_step / r.tokens_per_s for r in records if r.tokens_per_s > 0), default=0.0
            ),
        )

    # ---- averaging (the outer.Averager protocol) -------------------------------------------------------------
    def schedule_averaging(
        self, round_index: int, *, scheduled_time: float, order_key: bytes, how: str
    ) -> ScheduledStep:
        """Start matchmaking for a round's all-reduce ahead of its end, so the group is ready when the
        pseudo-gradient is (the all-reduce waits for `average(..., scheduled=...)` to trigger it)."""
        now = get_dht_time()
        scheduled_time = max(scheduled_time, now + 1.0)
        # The round number is part of the group key, so peers of different rounds can never meet.
        self.averager.set_group_bits(format(round_index % 2**16, "016b"), wait=False).result(
            timeout=DHT_TIMEOUT_S
        )
        self._set_averaging_round(round_index, scheduled_time)
        gather = {"round": round_index, "fingerprint": self.fingerprint, "order_key": order_key.hex()}
        join_window_s = max(2 * self.config.swarm.matchmaking_s, 5.0)
        # A client-mode peer cannot lead a group; it joins one, and hivemind's leaders refuse (for good) a join
        # request whose time is earlier than their own group time. Peers that scheduled in the same instant may
        # pick slightly different times, so a client asks with the latest time it could still be waited for.
        request_time = scheduled_time + (join_window_s if self.config.swarm.client_mode else 0.0)
        control = self.averager.step(
            gather=gather,
            weight=1.0,  # the real weight (our tokens) is set when the all-reduce is triggered
            scheduled_time=request_time,
            # bounds matchmaking only (hivemind bounds the all-reduce itself with allreduce_timeout):
            # a peer that finds no group soon after the scheduled time has missed this round
            timeout=scheduled_time - now + join_window_s,
            allow_retries=False,
            require_trigger=True,
            wait=False,
        )
        return ScheduledStep(control, round_index, scheduled_time, how=how, lead_s=scheduled_time - now)

    def average(
        self,
        pseudo_grads: list[torch.Tensor],
        *,
        round_index: int,
        tokens: int,
        order_key: bytes,
        should_stop=lambda: False,
        during_allreduce=None,
        straggler_wait_s: float = 60.0,
        scheduled: ScheduledStep | None = None,
    ) -> AveragingResult | None:
        """Average with every live peer of this round; None if the all-reduce failed for this peer.

        With `scheduled` (from schedule_averaging) the group is already forming; otherwise this waits for the
        round's other live peers to finish their inner steps, then matches with them."""
        try:
            self._set_averaging_round(round_index)
            if scheduled is None:
                peers_in_round = self.wait_until_round_peers_done(
                    round_index, wait_s=straggler_wait_s, should_stop=should_stop
                )
                if peers_in_round is None:
                    logger.warning(
                        f"[{self.short_id}] round {round_index + 1}: the swarm has moved past this round"
                    )
                    return None  # never a lonely outer step behind the swarm: the agreement check resyncs us
                if not peers_in_round:
                    return AveragingResult(averaged=pseudo_grads, group_size=1, tokens=tokens)
                now = get_dht_time()
                # others' group still forming: join it
                joinable = _group_time(peers_in_round, round_index, after=now + JOIN_MARGIN_S)
                scheduled = self.schedule_averaging(
                    round_index,
                    scheduled_time=joinable or now + self.config.swarm.matchmaking_s,
                    order_key=order_key,
                    how="after-inner",
                )
            return self._run_scheduled(
                scheduled,
                pseudo_grads,
                tokens=tokens,
                should_stop=should_stop,
                during_allreduce=during_allreduce,
            )
        finally:
            self._set_averaging_round(-1)

    def _run_scheduled(
        self, scheduled: ScheduledStep, pseudo_grads, *, tokens: int, should_stop, during_allreduce
    ) -> AveragingResult | None:
        round_index, control = scheduled.round_index, scheduled.control
        with self.averager.get_tensors() as tensors:
            for dst, src in zip(tensors, pseudo_grads, strict=True):
                dst.copy_(src)
        control.weight = float(tokens)
        control.allow_allreduce()
        try:
            gathered = _wait_cancellable(
                control,
                should_stop,
                timeout_s=max(0.0, scheduled.scheduled_time - get_dht_time())
                + 2 * self.config.swarm.allreduce_timeout_s,
                during_allreduce=during_allreduce,
            )
        except Exception as e:  # hivemind raises many types for a failed group; all mean "round failed"
            logger.warning(
                f"[{self.short_id}] round {round_index + 1}: all-reduce failed: {type(e).__name__}: {e} "
                f"(matchmaking {scheduled.how}, started {scheduled.lead_s:.1f}s before the group time)"
            )
            if not control.began_allreduce and not should_stop():
                # nobody to average with (the others left): a round of one is still a round
                others = self.wait_until_round_peers_done(round_index, wait_s=0.0, should_stop=should_stop)
                if others == []:
                    return AveragingResult(averaged=pseudo_grads, group_size=1, tokens=tokens)
            return None
        if gathered is None:
            return None
        rounds = {meta.get("round") for meta in gathered.values() if isinstance(meta, dict)}
        if rounds != {round_index}:
            logger.warning(
                f"[{self.short_id}] round {round_index}: group mixed rounds {sorted(rounds)}; discarded"
            )
            return None
        with self.averager.get_tensors() as tensors:
            averaged = [t.clone() for t in tensors]
        return AveragingResult(
            averaged=averaged,
            group_size=len(gathered),
            tokens=tokens,
            info={
                **self.averager.last_transport_stats(),
                "matchmaking": scheduled.how,
                "matchmaking_lead_s": scheduled.lead_s,
            },
        )

    # ---- agreement (I1/I3) -----------------------------------------------------------------------------------
    def publish_hash(self, round_index: int, params_sha256: str) -> None:
        """Publish our hash for this round along with the last few (slower peers compare against them)."""
        self._hash_history[round_index] = params_sha256
        for old in sorted(self._hash_history)[:-HASH_HISTORY_ROUNDS]:
            del self._hash_history[old]
        record = HashRecord(
            peer_id=self.peer_id.to_bytes(), hashes={str(r): h for r, h in self._hash_history.items()}
        )
        self._store(
            self._hashes_key,
            subkey=self._public_key,
            value=record.dict(),
            expiration_time=get_dht_time() + HASH_TTL_S,
        )

    def hash_records(self) -> dict[bytes, HashRecord]:
        return self._read_records(self._hashes_key, HashRecord)

    def view_of_round(self, round_index: int, *, expected: int = 1, timeout_s: float = 5.0) -> SwarmView:
        """The majority hash of a round among live peers once `expected` of them published theirs (or the timeout
        passed).

        Ties are broken by the hash value so that every peer picks the same winner.
        """
        deadline = time.monotonic() + timeout_s
        while True:
            live = self.live_peers()  # a peer that left (or was killed) neither votes nor donates
            hashes = {
                pid: r.hashes[str(round_index)]
                for pid, r in self.hash_records().items()
                if str(round_index) in r.hashes and pid in live
            }
            if len(hashes) >= expected or time.monotonic() >= deadline:
                break
            time.sleep(0.2)
        counts = Counter(hashes.values())
        if not counts:
            return SwarmView(round_index, None, [], 0)
        majority = max(counts, key=lambda h: (counts[h], h))
        me = self.peer_id.to_bytes()
        donors = [pid for pid, h in hashes.items() if h == majority and pid != me]
        return SwarmView(round_index, majority, donors, len(hashes))

    def latest_view(self) -> SwarmView | None:
        """The newest round for which live peers published hashes (for a newcomer)."""
        live = set(self.live_peers()) - {self.peer_id.to_bytes()}
        records = [r for r in self.hash_records().values() if r.peer_id in live and r.hashes]
        if not records:
            return None
        newest = max(int(rnd) for r in records for rnd in r.hashes)
        return self.view_of_round(newest, timeout_s=0.0)

    # ---- state sharing ---------------------------------------------------------------------------------------
    def download_state(self, donors: list[bytes]) -> tuple[dict, list[torch.Tensor]] | None:
        """Try donors in turn; the first that sends a complete state wins."""
        swarm = self.config.swarm
        for donor in donors:
            result = self.averager.load_state_from(
                PeerID(donor),
                chunk_timeout_s=swarm.chunk_timeout_s,
                total_timeout_s=swarm.state_timeout_s,
            )
            if result is not None:
                return result
            logger.warning(f"[{self.short_id}] state download from {PeerID(donor)} failed; trying next")
        return None

    def shutdown(self) -> None:
        self._stop.set()
        self._publish_now.set()
        with contextlib.suppress(Exception):
            self._store(
                self._progress_key,
                subkey=self._public_key,
                value=None,
                expiration_time=get_dht_time() + RECORD_TTL_S,
            )
        self._publisher.join(timeout=DHT_TIMEOUT_S)
        self.averager.shutdown()
        _ensure_stopped(self.averager)
        with self._dht_lock:
            self.dht.shutdown()
            _ensure_stopped(self.dht)


def _ensure_stopped(process) -> None:
    """SIGKILL a hivemind child process that outlived its graceful shutdown: the interpreter joins its children
    at exit, so one that hangs (e.g. on a pipe message whose file descriptors can no longer be fetched) would
    keep this peer from exiting."""
    if process.is_alive():
        with contextlib.suppress(Exception):
            process.kill()
            process.join(timeout=5)


def _group_time(records, round_index: int, *, after: float) -> float:
    """The earliest group time after `after` that peers of this round published for its all-reduce (0: none)."""
    times = [r.scheduled_time for r in records if r.averaging == round_index and r.scheduled_time > after]
    return min(times, default=0.0)


def _wait_cancellable(control, should_stop, *, timeout_s: float, during_allreduce=None):
    """Wait for a StepControl's result, cancelling it if the peer is asked to stop.
    `during_allreduce()` (a test hook) is called once the data transfer has begun."""
    deadline = time.monotonic() + timeout_s
    while True:
        if during_allreduce is not None and control.stage == AveragingStage.RUNNING_ALLREDUCE:
            during_allreduce()
        try:
            return control.result(timeout=0.01 if during_allreduce else 0.25)
        except concurrent.futures.TimeoutError:  # not the builtin TimeoutError on Python 3.10
            if should_stop():
                control.cancel()
                raise RuntimeError("stopped by the user") from None
            if time.monotonic() > deadline:
                control.cancel()
                raise TimeoutError(f"all-reduce did not finish in {timeout_s:.0f}s") from None


def _make_averager(config: RunConfig, prefix: str, dht, averaged_tensors, state_provider):
    from peer.allreduce import ExactAverager

    swarm = config.swarm
    return ExactAverager(
        averaged_tensors,
        dht,
        prefix=prefix,
        start=True,
        target_group_size=None,  # one global group per round: DiLoCo, not Moshpit averaging
        min_group_size=2,
        min_matchmaking_time=swarm.matchmaking_s,
        request_timeout=min(3.0, swarm.matchmaking_s / 2),
        allreduce_timeout=swarm.allreduce_timeout_s,
        next_chunk_timeout=swarm.chunk_timeout_s,
        compression=COMPRESSION[config.outer.compression],
        client_mode=swarm.client_mode,
        state_provider=state_provider,
        shutdown_timeout=3,
    )
