"""One all-reduce group per round on hivemind: matchmaking scheduled for a group time, triggered with the
pseudo-gradient, and the group checked; plus state downloads from a chosen donor. Used by peer/swarm.py."""

from __future__ import annotations

import concurrent.futures
import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from hivemind.averaging.control import AveragingStage, StepControl
from hivemind.p2p import PeerID
from hivemind.utils.timed_storage import get_dht_time

from peer.compression import COMPRESSION
from peer.config import RunConfig
from peer.network import AveragingAttempt, DonationCheck
from peer.outer import AveragingResult
from peer.swarm_key import OpenAccess

logger = logging.getLogger(__name__)

DHT_TIMEOUT_S = 10.0  # bound on setting the group key
STATE_OVERHEAD_BYTES = 1 << 20  # metadata and protobuf framing of a state download
MAX_DONORS_TRIED = 8  # per download attempt: the next attempt reads the records afresh


@dataclass
class ScheduledStep:
    """A round's all-reduce whose matchmaking has started; it runs once triggered with the pseudo-gradient."""

    control: StepControl
    round_index: int
    scheduled_time: float
    how: str
    """own (this peer chose the time), adopted (another peer of the round did), after-inner (scheduled once
    the inner phase was over), or again (the round's first group had a lying reducer, now banned)."""
    lead_s: float
    """How long before the group time matchmaking started."""
    order_key: bytes = b""
    value_bound: float = 0.0
    bans: frozenset[bytes] = frozenset()
    """The peers we banned when matchmaking started (sent with our metadata)."""

    def cancel(self) -> None:
        self.control.cancel()


class RoundAveraging:
    """This peer's averager (peer/allreduce.py's ExactAverager): one group per round, keyed by the round number."""

    def __init__(
        self,
        config: RunConfig,
        fingerprint: str,
        dht,
        averaged_tensors,
        state_provider,
        *,
        short_id: str,
        voter_key: bytes,
        access: OpenAccess,
    ):
        self.config, self.short_id, self.voter_key, self.access = config, short_id, voter_key, access
        self.peer_id = dht.peer_id.to_bytes()
        # a state is the global parameters and the momentum (fp32): anything much larger is not one
        self.max_state_bytes = 2 * 4 * sum(t.numel() for t in averaged_tensors) + STATE_OVERHEAD_BYTES
        self.fingerprint = fingerprint
        # the fingerprint in an open swarm; in a private one a name only holders of the key can compute
        prefix = access.prefix(fingerprint, "averaging")
        self.averager = _make_averager(config, prefix, dht, averaged_tensors, state_provider, access)

    def schedule(
        self,
        round_index: int,
        *,
        scheduled_time: float,
        order_key: bytes,
        how: str,
        value_bound: float,
        expected_peers: int = 0,
    ) -> ScheduledStep:
        """Start matchmaking for a round's all-reduce ahead of its end, so the group is ready when the
        pseudo-gradient is (the all-reduce waits for `run_averaging` to trigger it). A leader whose group reaches
        `expected_peers` (this one included) closes it at once rather than at the group time (0: at the group time)."""
        now = get_dht_time()
        scheduled_time = max(scheduled_time, now + 1.0)
        # The round number is part of the group key, so peers of different rounds can never meet.
        self.averager.set_group_bits(format(round_index % 2**16, "016b"), wait=False).result(
            timeout=DHT_TIMEOUT_S
        )
        # `voter`: the key that signs our DHT records. The group's gathered metadata (one entry per network identity,
        # authenticated by libp2p) then says whose hash records may vote on this round's result (I3, I8).
        # In a private swarm it goes sealed with the swarm key for our peer id: every member checks every other's
        # before averaging (allreduce.py), and nobody outside the swarm can read it.
        bans = self.averager.banned_peers()
        gather = self.access.seal_metadata(
            self.peer_id,
            {
                "round": round_index,
                "fingerprint": self.fingerprint,
                "order_key": order_key.hex(),
                "voter": self.voter_key,
                "value_bound": float(value_bound),  # read back by our own averager process (allreduce.py)
                "group_size": int(expected_peers),  # likewise: close the group as soon as it has this many
                "group_time": float(scheduled_time),  # likewise: members closed in early may start until then
                # reducers that lied to us: a member a majority of the group bans is left out of its all-reduce
                "bans": bans,
                # our direct data path's listener and key (peer/direct_transport.py); None when it is off here
                "direct": self.averager.direct_metadata(),
            },
        )
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
        return ScheduledStep(
            control,
            round_index,
            scheduled_time,
            how=how,
            lead_s=scheduled_time - now,
            order_key=order_key,
            value_bound=value_bound,
            bans=frozenset(bans),
        )

    def run(
        self,
        scheduled: ScheduledStep,
        pseudo_grads: list[torch.Tensor],
        *,
        tokens: int,
        should_stop: Callable[[], bool],
        during_allreduce: Callable[[], None] | None = None,
    ) -> AveragingAttempt:
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
            if (
                scheduled.how != "again"
                and not should_stop()
                and set(self.averager.banned_peers()) - scheduled.bans
            ):
                # A reducer lied to us: it lied to every member of the group (they all received the same bytes), so
                # they all banned it just now and all average this round again at once, leaving it out, instead of
                # losing the round. Once per round: a lie needs a new network identity to fail a round again.
                logger.warning(f"[{self.short_id}] round {round_index + 1}: averaging again without the liar")
                again = self.schedule(
                    round_index,
                    scheduled_time=get_dht_time() + self.config.swarm.matchmaking_s,
                    order_key=scheduled.order_key,
                    how="again",
                    value_bound=scheduled.value_bound,
                )
                return self.run(
                    again,
                    pseudo_grads,
                    tokens=tokens,
                    should_stop=should_stop,
                    during_allreduce=during_allreduce,
                )
            return AveragingAttempt(None, began_transfer=bool(control.began_allreduce))
        if gathered is None:
            return AveragingAttempt(None)
        members = [self.access.open_metadata(peer_id.to_bytes(), meta) for peer_id, meta in gathered.items()]
        rounds = {meta.get("round") for meta in members if isinstance(meta, dict)}
        if rounds != {round_index}:
            logger.warning(
                f"[{self.short_id}] round {round_index}: group mixed rounds {sorted(rounds)}; discarded"
            )
            return AveragingAttempt(None)
        with self.averager.get_tensors() as tensors:
            averaged = [t.clone() for t in tensors]
        voters = {meta.get("voter") for meta in members if isinstance(meta, dict)}
        return AveragingAttempt(
            AveragingResult(
                averaged=averaged,
                group_size=len(gathered),
                tokens=tokens,
                voters=frozenset(v for v in voters if isinstance(v, bytes)),
                info={
                    **self.averager.last_transport_stats(),
                    "matchmaking": scheduled.how,
                    "matchmaking_lead_s": scheduled.lead_s,
                },
            )
        )

    def download_state(
        self, donors: list[bytes], *, check: DonationCheck
    ) -> tuple[dict, list[torch.Tensor]] | None:
        """Try each distinct donor once, in turn, each bounded in time, size and rate; the first whose state passes
        `check` (the caller's: the swarm's majority hash, not the donor's word) wins. A donor that sends a malformed,
        wrong or slow state costs at most a chunk timeout or so beyond its share of the state timeout."""
        swarm = self.config.swarm
        deadline = time.monotonic() + swarm.state_timeout_s
        # the rate at which a whole state arrives within the state timeout: an honest donor that is slower would
        # make the download fail anyway, so a slower one is dropped early and leaves time for the next
        min_rate_bytes_s = self.max_state_bytes / swarm.state_timeout_s
        tried = 0
        for donor in dict.fromkeys(donors):  # one try per network identity, however many records name it
            remaining_s = deadline - time.monotonic()
            if remaining_s <= 0 or tried == MAX_DONORS_TRIED:
                break
            try:
                peer_id = PeerID(donor)
            except Exception:  # an address that is no peer id: the record that named it lied
                continue
            tried += 1
            result = self.averager.load_state_from(
                peer_id,
                chunk_timeout_s=swarm.chunk_timeout_s,
                total_timeout_s=remaining_s,
                max_bytes=self.max_state_bytes,
                min_rate_bytes_s=min_rate_bytes_s,
            )
            if result is None:
                logger.warning(
                    f"[{self.short_id}] state download from {peer_id} failed; trying the next donor"
                )
                continue
            try:
                problem = check(*result)
            except Exception as e:  # what a stranger sent must not crash us, whatever the check trips on
                problem = f"the donor's state could not be checked ({type(e).__name__})"
            if problem is None:
                return result
            logger.warning(
                f"[{self.short_id}] state from {peer_id} refused: {problem}; trying the next donor"
            )
        return None

    def shutdown(self) -> None:
        self.averager.shutdown()
        ensure_stopped(self.averager)


def ensure_stopped(process) -> None:
    """SIGKILL a hivemind child process that outlived its graceful shutdown: the interpreter joins its children
    at exit, so one that hangs (e.g. on a pipe message whose file descriptors can no longer be fetched) would
    keep this peer from exiting."""
    if process.is_alive():
        with contextlib.suppress(Exception):
            process.kill()
            process.join(timeout=5)


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


def _make_averager(config: RunConfig, prefix: str, dht, averaged_tensors, state_provider, access: OpenAccess):
    from peer.allreduce import ExactAverager
    from peer.direct_transport import DirectSettings, hosts_from_maddrs
    from peer.robust import AGGREGATORS, max_round_tokens

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
        access=access,
        max_weight=float(max_round_tokens(config)),
        combine=AGGREGATORS[config.outer.aggregation],
        shutdown_timeout=3,
        direct=DirectSettings(
            enabled=swarm.direct_transport == "on",
            port=swarm.direct_port,
            # the announced addresses; none announced: the averager uses the visible ones
            hosts=hosts_from_maddrs(swarm.announce_maddrs),
        ),
    )
