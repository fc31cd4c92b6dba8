"""A test-only attacking peer: the project's own peer with a network that lies. Never part of the product.

    python -m tests.attacker --attack KIND [peer flags]

KIND:
  votes     publishes the state hash of an all-zero model for every round under its own and three made-up record keys,
            and serves that all-zero state to anyone who downloads (the "hash-vote takeover")
  weight    claims a huge token count (its averaging weight) in every all-reduce
  values    contributes huge finite values (3e38) as its pseudo-gradient
  reducer   returns averaged parts full of huge values for the shard it reduces
  records   publishes progress records with a group time far in the future, a false 'done' and the whole token
            budget, and a settings record of another fingerprint
  metadata  trains honestly but serves malformed states to downloaders, a different malformation each request
            (MALFORMED: metadata that does not parse or is no dict, wrong field types, a false tensor count, too
            few tensors, wrong shapes, tensor bytes that do not decode)
  trickle   trains honestly and serves its true state, but in 1 KiB chunks, one every TRICKLE_S seconds
"""

from __future__ import annotations

import argparse
import hashlib
import itertools
import logging
import sys
import typing

import torch

ATTACKS = ("votes", "weight", "values", "reducer", "records", "metadata", "trickle")
HUGE = 3e38
NUM_SYBILS = 3
MALFORMED = ("garbage", "not-a-dict", "wrong-types", "false-count", "too-few", "wrong-shapes", "bad-bytes")
TRICKLE_S = 2.0
TRICKLE_CHUNK_BYTES = 1024


def attacking_network(attack: str):
    """A network factory for peer.train.Peer whose Swarm lies in the way `attack` says."""
    from hivemind.utils.timed_storage import get_dht_time

    from peer.outer import tensors_sha256
    from peer.records import HashRecord, SettingsRecord
    from peer.swarm import RECORD_TTL_S, Swarm

    class AttackingSwarm(Swarm):
        def __init__(self, config, *, state_provider, **kwargs):
            if attack == "votes":
                honest_provider = state_provider

                def state_provider():  # the all-zero state, claiming to be what the swarm holds
                    metadata, tensors = honest_provider()
                    zeros = [torch.zeros_like(t) for t in tensors]
                    half = len(zeros) // 2
                    claims = {
                        "params_sha256": tensors_sha256(zeros[:half]),
                        "state_sha256": tensors_sha256(zeros),
                    }
                    return {**metadata, **claims}, zeros

                self.zero_hash = None
            self.sybils = []  # before the base class starts the publisher thread that reads it
            super().__init__(config, state_provider=state_provider, **kwargs)
            if attack == "votes":
                import hivemind

                from peer.signing import RecordSigner

                for _ in range(NUM_SYBILS):  # each made-up identity signs with a key of its own
                    validator = RecordSigner()
                    dht = hivemind.DHT(
                        initial_peers=self.visible_maddrs(), host_maddrs=["/ip4/127.0.0.1/tcp/0"], start=True
                    )
                    dht.add_validators([validator])
                    self.sybils.append((dht, validator.local_public_key, dht.peer_id.to_bytes()))

        def publish_hash(self, round_index, params_sha256, state_sha256):
            if attack != "votes":
                return super().publish_hash(round_index, params_sha256, state_sha256)
            metadata, _ = self.averaging.averager.get_current_state()[:2]
            rounds_lied_about = range(max(0, round_index - 3), round_index + 1)
            params = {str(r): metadata["params_sha256"] for r in rounds_lied_about}
            state = {str(r): metadata["state_sha256"] for r in rounds_lied_about}
            for dht, key, peer_id in self.identities():
                record = HashRecord(peer_id=peer_id, hashes=params, state_hashes=state)
                dht.store(
                    self._hashes_key, subkey=key, value=record.dict(), expiration_time=get_dht_time() + 600
                )

        def identities(self):
            """(dht, record key, claimed peer id) of the attacker and of each made-up peer."""
            return [(self.dht, self._public_key, self._peer_id.to_bytes()), *self.sybils]

        def run_averaging(self, scheduled, pseudo_grads, *, tokens, should_stop, during_allreduce=None):
            if attack == "weight":
                tokens = 10**12
            if attack == "values":
                pseudo_grads = [torch.full_like(g, HUGE) for g in pseudo_grads]
            return super().run_averaging(
                scheduled,
                pseudo_grads,
                tokens=tokens,
                should_stop=should_stop,
                during_allreduce=during_allreduce,
            )

        def report_progress(self, *, round_index, inner_step, tokens, done, tokens_per_s, eta, now=False):
            if attack != "records":
                return super().report_progress(
                    round_index=round_index, inner_step=inner_step, tokens=tokens, done=done,
                    tokens_per_s=tokens_per_s, eta=eta, now=now,
                )  # fmt: skip
            super().report_progress(
                round_index=round_index, inner_step=inner_step, tokens=10**12, done=True,
                tokens_per_s=tokens_per_s, eta=eta, now=now,
            )  # fmt: skip
            self.mark_averaging(round_index, get_dht_time() + 10_000)  # everyone, wait for my group

        def _publish_periodically(self):
            if (
                attack == "votes"
            ):  # the made-up peers look live: a progress record each, like the attacker's own
                while not self._stop.is_set():
                    for dht, key, peer_id in self.identities():
                        try:
                            progress = self._progress.copy(update={"peer_id": peer_id})
                            dht.store(self._progress_key, subkey=key, value=progress.dict(),
                                      expiration_time=get_dht_time() + RECORD_TTL_S)  # fmt: skip
                        except Exception:
                            pass
                    self._stop.wait(self.config.swarm.progress_period_s)
                return
            if attack != "records":
                return super()._publish_periodically()
            while not self._stop.is_set():
                other = SettingsRecord(
                    peer_id=self._peer_id.to_bytes(), fingerprint="0" * 16, settings_json="{}"
                )
                try:
                    self._store(self._progress_key, subkey=self._public_key, value=self._progress.dict(),
                                expiration_time=get_dht_time() + RECORD_TTL_S)  # fmt: skip
                    self._store(self._settings_key, subkey=self._public_key, value=other.dict(),
                                expiration_time=get_dht_time() + RECORD_TTL_S)  # fmt: skip
                except Exception:
                    pass
                self._stop.wait(self.config.swarm.progress_period_s)

        def shutdown(self):
            for dht, _, _ in self.sybils:
                dht.shutdown()
            super().shutdown()

    def factory(config, **kwargs):
        return AttackingSwarm(config, **kwargs)

    return factory


def lying_encode(compression, averaged):
    """What a lying reducer returns instead of the average it computed: huge values, encoded as usual (the reply
    and its decoding, as peer.allreduce.encode_once returns them)."""
    from hivemind.proto import averaging_pb2

    from peer import wire

    lie = torch.full_like(averaged, HUGE)
    header, payload = wire.encode_tensor(compression, lie)
    reply = averaging_pb2.AveragingData(code=averaging_pb2.AVERAGED_PART, tensor_part=header)
    return wire.WirePart(reply, payload), wire.decode_tensor(header, payload)


def lying_donor(attack: str):
    """An ExactAverager whose state serving lies as `attack` (metadata, trickle) says; everything else is honest."""
    import asyncio

    from hivemind.compression import CompressionInfo
    from hivemind.p2p import P2PContext
    from hivemind.proto import averaging_pb2
    from hivemind.utils.streaming import split_for_streaming

    import peer.allreduce

    log = logging.getLogger("peer.attacker")
    kinds = itertools.cycle(MALFORMED)

    class ExactAverager(
        peer.allreduce.ExactAverager
    ):  # hivemind names RPC handles after the class: keep the name
        async def rpc_download_state(self, request, context):
            metadata_bytes, tensors, _ = await self._get_current_state_from_host_process()
            metadata = self.serializer.loads(metadata_bytes)
            serialized = [
                self.state_compression.compress(t, CompressionInfo.from_tensor(t, key=i), allow_inplace=False)
                for i, t in enumerate(tensors)
            ]
            if attack == "trickle":
                log.warning(f"serving a trickle (one {TRICKLE_CHUNK_BYTES}-byte chunk every {TRICKLE_S}s)")
                first = True
                for tensor in serialized:
                    for part in split_for_streaming(tensor, TRICKLE_CHUNK_BYTES):
                        yield averaging_pb2.DownloadData(
                            tensor_part=part, metadata=metadata_bytes if first else b""
                        )
                        first = False
                        await asyncio.sleep(TRICKLE_S)
                return
            kind = next(kinds)
            log.warning(f"serving a malformed state: {kind}")
            if kind == "garbage":
                metadata_bytes = b"\xc1\xc1 not msgpack"
            elif kind == "not-a-dict":
                metadata_bytes = self.serializer.dumps(["round", 10**9])
            elif kind == "wrong-types":
                metadata_bytes = self.serializer.dumps(
                    {**metadata, "round": "last", "inner_step": -1, peer.allreduce.STATE_TENSORS_KEY: "all"}
                )
            elif kind == "false-count":
                metadata_bytes = self.serializer.dumps({**metadata, peer.allreduce.STATE_TENSORS_KEY: 10**9})
            elif kind == "too-few":
                serialized = serialized[:-1]
                metadata_bytes = self.serializer.dumps(
                    {**metadata, peer.allreduce.STATE_TENSORS_KEY: len(serialized)}
                )
            elif kind == "wrong-shapes":
                flat = [t.reshape(-1) for t in tensors]
                serialized = [
                    self.state_compression.compress(t, CompressionInfo.from_tensor(t), allow_inplace=False)
                    for t in flat
                ]
            elif kind == "bad-bytes":
                serialized[0].buffer = serialized[0].buffer[:3]
            first = True
            for tensor in serialized:
                for part in split_for_streaming(tensor):
                    yield averaging_pb2.DownloadData(
                        tensor_part=part, metadata=metadata_bytes if first else b""
                    )
                    first = False

        # hivemind reads these hints to route the RPC (this module's postponed annotations would not resolve)
        rpc_download_state.__annotations__ = {
            "request": peer.allreduce.StateRequest,
            "context": P2PContext,
            "return": typing.AsyncIterator[averaging_pb2.DownloadData],
        }

    return ExactAverager


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--attack", choices=ATTACKS, required=True)
    own, rest = parser.parse_known_args(argv)
    from peer.__main__ import die_with_parent, settle_run_settings, setup_logging
    from peer.cli import build_config, given_settings

    given = given_settings(rest)
    config = build_config(given)
    setup_logging(config.log_level)
    die_with_parent()
    publish = None
    if config.swarm.initial_peers:  # it joins like `python -m peer` does, as soon and with the same settings
        config, publish = settle_run_settings(given, config)
    if own.attack == "reducer":
        import peer.allreduce

        peer.allreduce.encode_once = (
            lying_encode  # the averager process is forked after this: it inherits the lie
        )
    if own.attack in ("metadata", "trickle"):
        import peer.allreduce

        # peer/swarm_averaging.py imports the averager class from peer.allreduce when it builds one
        peer.allreduce.ExactAverager = lying_donor(own.attack)
    from peer.signals import StopFlag
    from peer.train import Peer

    logging.getLogger("peer").warning(
        f"ATTACKING with {own.attack!r} ({hashlib.sha1(own.attack.encode()).hexdigest()[:6]})"
    )
    return Peer(config, StopFlag(), network_factory=attacking_network(own.attack), run_settings=publish).run()


if __name__ == "__main__":
    sys.exit(main())
