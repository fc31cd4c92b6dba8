"""The training loop (peer/train.py) driven through several rounds with an in-memory network: no hivemind.

The fake plays the rest of the swarm (tests/unit/fake_network.py); each test scripts one situation a real swarm
produces and checks what the loop did about it."""

from __future__ import annotations

import dataclasses
import math
import threading
import time

import pytest
import torch

from peer.config import DataConfig, InnerConfig, ModelConfig, OuterConfig, RunConfig, SwarmConfig
from peer.network import AveragingAttempt
from peer.outer import AveragingResult, OuterOptimizer, tensors_sha256
from peer.records import HashRecord, ProgressRecord
from peer.signals import StopFlag
from peer.simulate import simulate
from peer.train import Peer
from tests.unit.fake_network import FakeNetwork, FakeSwarm, alone


def make_config(tmp_path, **overrides) -> RunConfig:
    values = dict(
        model=ModelConfig(name="tiny"),
        data=DataConfig(batch_size=2, seq_len=32, data_shard="0/1", eval_tokens=4096),
        inner=InnerConfig(steps=3, warmup_steps=2, lr=1e-3),
        outer=OuterConfig(momentum=0.5),
        swarm=SwarmConfig(
            matchmaking_s=0.2, progress_period_s=0.1, chunk_timeout_s=1.0, straggler_wait_s=0.5
        ),
        seed=3,
        max_rounds=3,
        device="cpu",
        num_threads=1,
        eval_every=0,
        metrics_file=str(tmp_path / "metrics.jsonl"),
    )
    values.update(overrides)
    return RunConfig(**values)


class ScriptedPeer(Peer):
    """A Peer whose inner steps can trigger test events: on_step(peer, round_index, steps_done_in_total)."""

    def __init__(self, *args, on_step=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.on_step, self.records = on_step, []

    def prepare_training(self) -> None:
        super().prepare_training()
        self.trainer.batches = ScriptedBatches(self.trainer.batches, self)
        self.metrics.log_round, log = (
            (lambda record: (self.records.append(record), log(record))),
            self.metrics.log_round,
        )


class ScriptedBatches:
    """The peer's batch stream, calling its on_step hook before each batch (the stream's position is kept)."""

    def __init__(self, stream, peer: ScriptedPeer):
        self.stream, self.peer, self.count = stream, peer, 0

    def __iter__(self):
        return self

    def __next__(self):
        self.count += 1
        if self.peer.on_step is not None:
            self.peer.on_step(self.peer, self.peer.training_round, self.count)
        return next(self.stream)

    def state_dict(self) -> dict:
        return self.stream.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.stream.load_state_dict(state)


def run_peer(
    config: RunConfig, swarm: FakeSwarm, *, on_step=None, stop: StopFlag | None = None
) -> ScriptedPeer:
    peer = ScriptedPeer(
        config,
        StopFlag(handle_signals=False) if stop is None else stop,
        network_factory=swarm.factory,
        on_step=on_step,
    )
    assert peer.run() == 0
    assert swarm.shut_down
    return peer


def replay_hashes(
    config: RunConfig, initial: list[torch.Tensor], averages: list[list[torch.Tensor] | None]
) -> list[str]:
    """What the global parameters must hash to after each round, given the averages the network returned."""
    outer = OuterOptimizer(initial, config.outer)
    hashes = []
    for averaged in averages:
        if averaged is not None:
            outer.step_(averaged)
        hashes.append(outer.params_hash())
    return hashes


def initial_params(config: RunConfig) -> list[torch.Tensor]:
    peer = Peer(config, StopFlag(handle_signals=False), network_factory=FakeSwarm().factory)
    return [p.detach().clone() for p in peer.params]


def test_a_peer_alone_trains_exactly_like_the_one_replica_simulation(tmp_path):
    config = make_config(tmp_path)
    peer = run_peer(config, FakeSwarm())
    simulated = [r["global_params_sha256"] for r in simulate(config, num_replicas=1)]
    assert [r["global_params_sha256"] for r in peer.records] == simulated
    assert [r["round"] for r in peer.records] == [1, 2, 3]
    assert all(r["group_size"] == 1 and not r["failed"] for r in peer.records)


def test_the_global_parameters_follow_the_averages_the_network_returned(tmp_path):
    config = make_config(tmp_path)

    def half_of_ours(round_index, pseudo_grads, tokens):  # as if a companion contributed zeros
        return AveragingAttempt(AveragingResult([g * 0.5 for g in pseudo_grads], group_size=2, tokens=tokens))

    swarm = FakeSwarm(companions=1, allreduce=half_of_ours)
    peer = run_peer(config, swarm)
    averages = [swarm.results[r].averaged for r in range(3)]
    assert [r["global_params_sha256"] for r in peer.records] == replay_hashes(
        config, initial_params(config), averages
    )
    assert [r["group_size"] for r in peer.records] == [2, 2, 2]
    assert [s.round_index for s in swarm.scheduled] == [0, 1, 2]  # one group per round, each triggered once


def test_matchmaking_is_scheduled_while_the_last_inner_steps_run(tmp_path):
    """With a companion in the round, the group time is chosen during the inner phase, ahead of its end."""
    config = make_config(tmp_path, inner=InnerConfig(steps=20, warmup_steps=2, lr=1e-3), max_rounds=2)

    def simulated_compute(peer, round_index, count):
        time.sleep(0.05)  # a step of at least 50 ms: the phase lasts several of the loop's progress checks

    swarm = FakeSwarm(companions=1)
    run_peer(config, swarm, on_step=simulated_compute)
    assert [(s.round_index, s.how) for s in swarm.scheduled] == [(0, "own"), (1, "own")]
    assert all(0 < s.steps_done < 20 and s.lead_s > 0 for s in swarm.scheduled)


def test_a_failed_allreduce_keeps_the_global_parameters_and_the_next_round_goes_on(tmp_path):
    config = make_config(tmp_path)

    def fail_round_two(round_index, pseudo_grads, tokens):
        return AveragingAttempt(None) if round_index == 1 else alone(round_index, pseudo_grads, tokens)

    swarm = FakeSwarm(companions=1, allreduce=fail_round_two)
    peer = run_peer(config, swarm)
    records = peer.records
    assert [r["failed"] for r in records] == [False, True, False]
    assert records[1]["group_size"] == 0 and records[2]["failed_rounds"] == 1
    assert records[1]["global_params_sha256"] == records[0]["global_params_sha256"]
    averages = [swarm.results[0].averaged, None, swarm.results[2].averaged]
    assert [r["global_params_sha256"] for r in records] == replay_hashes(
        config, initial_params(config), averages
    )
    assert not any(r["resynced"] for r in records)  # nobody else holds another hash: nothing to repair


def donated_state(config: RunConfig, *, round_index: int, shift: float) -> tuple[dict, list[torch.Tensor]]:
    outer = OuterOptimizer(initial_params(config), config.outer)
    for theta, buf in zip(outer.global_params, outer.momentum, strict=True):
        theta.add_(shift)
        buf.fill_(shift)
    metadata = {
        "round": round_index,
        "inner_step": 0,
        "fingerprint": Peer(
            config, StopFlag(handle_signals=False), network_factory=FakeSwarm().factory
        ).fingerprint,
        "params_sha256": outer.params_hash(),
        "state_sha256": tensors_sha256(outer.state_tensors()),
    }
    return metadata, [t.clone() for t in outer.state_tensors()]


def vote(key: bytes, round_index: int, metadata: dict) -> HashRecord:
    """A hash record of a peer holding the donated state in that round."""
    return HashRecord(
        peer_id=key,
        hashes={str(round_index): metadata["params_sha256"]},
        state_hashes={str(round_index): metadata["state_sha256"]},
    )


def forked_swarm(config: RunConfig, *, tamper=None) -> tuple[FakeSwarm, dict, object]:
    """Two companions that, once round 1 is under way, hold (and vote for) another state than ours."""
    metadata, tensors = donated_state(config, round_index=1, shift=0.01)
    if tamper is not None:
        tamper(tensors)
    swarm = FakeSwarm(companions=2, donor_state=(metadata, tensors))
    votes = {c: vote(c, 1, metadata) for c in (b"c0", b"c1")}

    def vote_after_joining(peer, round_index, count):
        swarm.other_hashes.update(votes)  # not before: a newcomer would simply download it at join

    return swarm, metadata, vote_after_joining


def test_a_forked_peer_adopts_the_majority_state(tmp_path):
    config = make_config(tmp_path, max_rounds=2)
    swarm, metadata, on_step = forked_swarm(config)
    peer = run_peer(config, swarm, on_step=on_step)
    first, second = peer.records
    # round 1's record says what we held then; nothing waited for the group's hashes after the outer step
    assert first["round"] == 1 and not first["resynced"] and first["resyncs"] == 0
    assert first["global_params_sha256"] != metadata["params_sha256"]
    # round 2's inner phase compared them, stopped, and adopted the majority's state before contributing again
    assert second["round"] == 2 and second["resynced"] and second["resyncs"] == 1 and swarm.downloads == 1
    assert swarm.published_hashes[1] == metadata["params_sha256"]
    momentum = peer.state.outer.momentum  # momentum came with it (round 2 moved it on from there)
    assert not torch.equal(momentum[0], torch.zeros_like(momentum[0]))


@pytest.mark.parametrize("third_voter", ["late", "with the other"])
def test_a_fork_is_decided_only_by_the_whole_group_or_a_strict_majority(tmp_path, third_voter):
    """We averaged with c0 and c1; c0 then votes for another state. While c1's hash is missing, c0 against us is a
    tie, and the hash order must not hand the round to whoever published first: we keep ours. Once c1 votes with c0,
    we adopt theirs."""
    config = make_config(tmp_path, max_rounds=2)
    metadata, tensors = donated_state(config, round_index=1, shift=0.01)

    def group_of_three(round_index, pseudo_grads, tokens):
        result = AveragingResult(
            averaged=[g.clone() for g in pseudo_grads],
            group_size=3,
            tokens=tokens,
            voters=frozenset({b"c0", b"c1"}),
        )
        return AveragingAttempt(result)

    swarm = FakeSwarm(companions=2, allreduce=group_of_three, donor_state=(metadata, tensors))
    c1_vote = (
        vote(b"c1", 1, metadata)
        if third_voter == "with the other"
        else HashRecord(peer_id=b"c1", hashes={}, state_hashes={})
    )

    def votes_after_joining(peer, round_index, count):
        swarm.other_hashes.update({b"c0": vote(b"c0", 1, metadata), b"c1": c1_vote})

    peer = run_peer(config, swarm, on_step=votes_after_joining)
    resynced = [r["resynced"] for r in peer.records]
    if third_voter == "late":
        assert resynced == [False, False] and swarm.downloads == 0
    else:
        assert resynced == [False, True] and swarm.downloads == 1


def test_a_donated_state_that_does_not_match_its_hash_is_refused(tmp_path, monkeypatch):
    config = make_config(tmp_path, max_rounds=2)

    def lie(tensors):  # the donor sends other parameters than the hash it claims
        tensors[0] = tensors[0] + 1.0

    swarm, metadata, on_step = forked_swarm(config, tamper=lie)
    stop, download = StopFlag(handle_signals=False), FakeNetwork.download_state

    def stop_after_two_refusals(network, donors, *, check):
        donated = download(network, donors, check=check)
        if swarm.downloads >= 2:  # round 2 keeps refusing the lie and retrying; nothing else to see
            stop.event.set()
        return donated

    monkeypatch.setattr(FakeNetwork, "download_state", stop_after_two_refusals)
    peer = run_peer(config, swarm, on_step=on_step, stop=stop)
    assert swarm.downloads >= 2 and len(peer.records) == 1 and not peer.records[0]["resynced"]
    assert peer.state.round == 1 and peer.state.params_hash() != metadata["params_sha256"]


def test_after_a_failed_allreduce_a_peer_takes_the_state_of_the_one_that_applied_the_round(tmp_path):
    """One against one: the peer whose all-reduce failed kept the old state, so it does not vote against the peer
    that applied the round (a tie broken by hash value would leave the two forked every other time). The other
    peer's hash was already published (it applied the round alone, as when a newcomer's first round fails because
    the swarm moved past it): we never publish our stale state for that round, which that peer would count."""
    config = make_config(tmp_path, max_rounds=1)
    metadata, tensors = donated_state(config, round_index=1, shift=0.01)
    swarm = FakeSwarm(
        companions=1, allreduce=lambda r, g, t: AveragingAttempt(None), donor_state=(metadata, tensors)
    )

    def companion_applied_round_one(peer, round_index, count):
        swarm.other_hashes[b"c0"] = vote(b"c0", 1, metadata)

    peer = run_peer(config, swarm, on_step=companion_applied_round_one)
    record = peer.records[0]
    assert record["failed"] and record["resynced"] and swarm.downloads == 1
    assert record["global_params_sha256"] == metadata["params_sha256"]
    assert [h for r, h in swarm.state_votes if r == 1] == [metadata["state_sha256"]]


def test_a_non_finite_local_update_is_never_contributed(tmp_path):
    config = make_config(tmp_path)

    def poison_round_two(peer, round_index, count):
        if round_index == 1 and count == 5:  # the second step of round 2 (3 steps per round)
            with torch.no_grad():
                peer.params[0].fill_(math.nan)

    swarm = FakeSwarm(companions=1)
    peer = run_peer(config, swarm, on_step=poison_round_two)
    assert sorted(swarm.contributions) == [0, 2]  # round 2 was not sent to the group
    assert all(bool(torch.isfinite(g).all()) for grads in swarm.contributions.values() for g in grads)
    assert [r["failed"] for r in peer.records] == [False, True, False]
    assert all(bool(torch.isfinite(t).all()) for t in peer.state.outer.state_tensors())


def test_overlap_applies_each_average_once_in_order_and_keeps_training_meanwhile(tmp_path):
    config = make_config(tmp_path, outer=OuterConfig(momentum=0.5, overlap=True))
    swarm = FakeSwarm(companions=1)
    peer = run_peer(config, swarm)
    assert [r["round"] for r in peer.records] == [1, 2, 3] and all(r["overlap"] for r in peer.records)
    averages = [swarm.results[r].averaged for r in range(3)]
    assert [r["global_params_sha256"] for r in peer.records] == replay_hashes(
        config, initial_params(config), averages
    )
    # with overlap matchmaking is never pre-scheduled: the group is matched behind the next round's steps
    assert [(s.round_index, s.how) for s in swarm.scheduled] == [(r, "after-inner") for r in range(3)]


def test_a_late_joiner_starts_from_the_swarm_state_and_round(tmp_path):
    config = make_config(tmp_path, max_rounds=1)
    metadata, tensors = donated_state(config, round_index=5, shift=0.02)
    veteran = ProgressRecord(
        peer_id=b"v", round=5, inner_step=1, tokens=0, done=False, averaging=-1,
        scheduled_time=0.0, tokens_per_s=0.0, eta=0.0, client_mode=False,
    )  # fmt: skip
    swarm = FakeSwarm(
        other_progress={b"v": veteran},
        other_hashes={b"v": vote(b"v", 5, metadata)},
        donor_state=(metadata, tensors),
    )
    peer = run_peer(config, swarm)
    assert swarm.downloads == 1 and peer.records[0]["round"] == 6
    outer = OuterOptimizer(tensors[: len(tensors) // 2], config.outer)
    outer.load_state_tensors_(
        tensors
    )  # the donated parameters and momentum, then our first outer step on them
    outer.step_(swarm.results[5].averaged)
    assert peer.records[0]["global_params_sha256"] == outer.params_hash()
    assert swarm.scheduled[0].round_index == 5


def test_a_newcomer_arriving_while_the_round_is_averaged_starts_from_its_result(tmp_path):
    """The round's peers finished its inner steps and counted its group without the newcomer: it does not train the
    round's last steps for a group it cannot join (a failed round and a resync); it waits for the round's result
    and downloads that, once."""
    config = make_config(tmp_path, max_rounds=1)
    before, before_tensors = donated_state(config, round_index=5, shift=0.02)
    after, after_tensors = donated_state(config, round_index=6, shift=0.03)
    averaging = ProgressRecord(
        peer_id=b"v", round=5, inner_step=3, tokens=0, done=True, averaging=5,
        scheduled_time=time.time(), tokens_per_s=0.0, eta=0.0, client_mode=False,
    )  # fmt: skip
    swarm = FakeSwarm(
        other_progress={b"v": averaging},
        other_hashes={b"v": vote(b"v", 5, before)},
        donor_state=(before, before_tensors),
    )

    def round_averaged():
        swarm.other_progress[b"v"] = averaging.copy(
            update=dict(round=6, inner_step=0, done=False, averaging=-1)
        )
        swarm.other_hashes[b"v"] = vote(b"v", 6, after)
        swarm.donor_state = (after, after_tensors)

    timer = threading.Timer(1.0, round_averaged)
    timer.start()
    try:
        peer = run_peer(config, swarm)
    finally:
        timer.cancel()
    assert swarm.downloads == 1 and swarm.scheduled[0].round_index == 6 and peer.records[0]["round"] == 7
    outer = OuterOptimizer(after_tensors[: len(after_tensors) // 2], config.outer)
    outer.load_state_tensors_(after_tensors)
    outer.step_(swarm.results[6].averaged)
    assert peer.records[0]["global_params_sha256"] == outer.params_hash()


def newcomer_mid_round(config: RunConfig) -> tuple[FakeSwarm, ProgressRecord, dict, list[torch.Tensor]]:
    """A swarm of one other peer, v, at inner step 16 of round 5, serving round 5's state: (the swarm, v's progress
    record, the state's metadata and tensors)."""
    before, before_tensors = donated_state(config, round_index=5, shift=0.02)
    training = ProgressRecord(
        peer_id=b"v", round=5, inner_step=16, tokens=0, done=False, averaging=-1,
        scheduled_time=0.0, tokens_per_s=0.0, eta=time.time() + 0.5, client_mode=False,
    )  # fmt: skip
    swarm = FakeSwarm(
        other_progress={b"v": training},
        other_hashes={b"v": vote(b"v", 5, before)},
        donor_state=(before, before_tensors),
    )
    return swarm, training, before, before_tensors


def test_a_newcomer_whose_round_ended_during_its_download_starts_from_the_round_result(tmp_path):
    """The round's only other peer was mid-round when the newcomer looked, and finished the round (alone) while the
    newcomer downloaded its state: the newcomer takes the round's result instead of training the round's last steps
    for a group that is gone (a failed round, then the same download as a resync)."""
    config = make_config(tmp_path, max_rounds=1)
    swarm, training, before, _ = newcomer_mid_round(config)
    after, after_tensors = donated_state(config, round_index=6, shift=0.03)

    def round_ended_meanwhile():
        swarm.on_download = None
        swarm.other_progress[b"v"] = training.copy(update=dict(round=6, inner_step=1))
        old, new = vote(b"v", 5, before), vote(b"v", 6, after)  # a hash record keeps the recent rounds
        swarm.other_hashes[b"v"] = new.copy(
            update=dict(
                hashes={**old.hashes, **new.hashes}, state_hashes={**old.state_hashes, **new.state_hashes}
            )
        )
        swarm.donor_state = (after, after_tensors)

    swarm.on_download = round_ended_meanwhile
    peer = run_peer(config, swarm)
    assert swarm.downloads == 2 and peer.failed_rounds == 0
    assert swarm.scheduled[0].round_index == 6 and peer.records[0]["round"] == 7
    assert 5 not in swarm.published_hashes  # it never trained on the stale round
    outer = OuterOptimizer(after_tensors[: len(after_tensors) // 2], config.outer)
    outer.load_state_tensors_(after_tensors)
    outer.step_(swarm.results[6].averaged)
    assert peer.records[0]["global_params_sha256"] == outer.params_hash()


def test_a_newcomer_whose_round_result_does_not_come_trains_from_the_state_it_holds(tmp_path):
    """The round ended during the download, but its result is not published before the wait runs out: the newcomer
    does not download the same round's state again; it trains from what it holds."""
    config = make_config(tmp_path, max_rounds=1)
    config = dataclasses.replace(config, swarm=dataclasses.replace(config.swarm, allreduce_timeout_s=0.5))
    swarm, training, _, _ = newcomer_mid_round(config)

    def round_ended_meanwhile():
        swarm.on_download = None
        swarm.other_progress[b"v"] = training.copy(update=dict(done=True, averaging=5))

    swarm.on_download = round_ended_meanwhile
    peer = run_peer(config, swarm)
    assert swarm.downloads == 1 and peer.records[0]["round"] == 6


def test_a_stop_signal_mid_round_leaves_after_the_current_step_with_a_checkpoint(tmp_path):
    config = make_config(tmp_path, checkpoint_dir=str(tmp_path / "ckpt"), max_rounds=0)

    def stop_in_round_two(peer, round_index, count):
        if round_index == 1 and count == 5:
            peer.stop.event.set()

    swarm = FakeSwarm()
    peer = run_peer(config, swarm, on_step=stop_in_round_two)
    assert [r["round"] for r in peer.records] == [1]  # round 2 was abandoned, not half-applied
    assert peer.state.round == 1
    from peer.checkpoint import load_latest_checkpoint

    saved = load_latest_checkpoint(config.checkpoint_dir)
    assert saved["round"] == 1 and saved["params_sha256"] == peer.records[0]["global_params_sha256"]


@pytest.mark.parametrize("steps_before_stop", [1])
def test_stop_before_any_round_writes_no_checkpoint(tmp_path, steps_before_stop):
    config = make_config(tmp_path, checkpoint_dir=str(tmp_path / "ckpt"), max_rounds=0)
    peer = run_peer(config, FakeSwarm(), on_step=lambda p, r, c: p.stop.event.set())
    assert peer.records == [] and not (tmp_path / "ckpt").exists()


def test_a_checkpoint_carries_the_model_config_and_exports_the_global_parameters(tmp_path):
    from peer import export

    config = make_config(tmp_path, checkpoint_dir=str(tmp_path / "ckpt"), max_rounds=1)
    swarm = FakeSwarm()
    peer = run_peer(config, swarm)
    path, saved = export.read_checkpoint(config.checkpoint_dir)
    assert (
        saved["model_config"] == peer.model.config.to_dict()
    )  # export prefers it to rebuilding from --model
    exported = export.from_checkpoint(path, saved)
    assert exported.model.config.to_dict() == peer.model.config.to_dict()
    global_params = peer.state.outer.global_params
    assert all(torch.equal(a, b) for a, b in zip(exported.model.parameters(), global_params, strict=True))


def test_a_peer_publishes_its_run_settings_for_newcomers(tmp_path):
    from peer.run_settings import run_values

    config = make_config(tmp_path, max_rounds=1)
    swarm = FakeSwarm()
    run_peer(config, swarm)
    assert swarm.published_run_settings == run_values(config)
    # a peer that joined a run publishes the run's version, as it was given
    theirs = {**run_values(config), "dataset": "/the/organizers/copy"}
    swarm = FakeSwarm()
    Peer(config, StopFlag(handle_signals=False), network_factory=swarm.factory, run_settings=theirs).run()
    assert swarm.published_run_settings == theirs
