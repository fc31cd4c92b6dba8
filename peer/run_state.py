"""Read a live run from outside it: the settings its peers publish (for a newcomer, and for export), and its global
parameters (export: join as a client that serves nothing and never averages, download a majority peer's state,
checked)."""

from __future__ import annotations

import json
import logging
import time
from collections import Counter
from dataclasses import dataclass

import torch

from peer import coordination
from peer.config import OuterConfig, RunConfig, SwarmConfig, fingerprint
from peer.outer import tensors_sha256
from peer.records import SettingsRecord, settings_key
from peer.state import ReplicatedState
from peer.swarm_key import run_access

logger = logging.getLogger(__name__)

POLL_S = 1.0
LOOKUP_TIMEOUT_S = 10.0  # bound on one DHT lookup


class RunNotFound(ValueError):
    """No live peer of the run answered (wrong --run-id or --initial-peers, or the run is over)."""


@dataclass(frozen=True)
class RunState:
    """A majority peer's global parameters of a live run, verified against their hash."""

    settings: dict
    """The run's fingerprint settings (run id, model architecture, tokenizer id, ...) as its peers publish them."""
    fingerprint: str
    round: int
    params_sha256: str
    global_params: list[torch.Tensor]


def _client_dht(initial_peers: list[str], run_id: str, access):
    """A client-mode DHT node (it serves nothing) that checks the run's records as the peers do."""
    import hivemind
    from hivemind.dht.schema import SchemaValidator

    from peer.signing import RecordSigner
    from peer.swarm import RunSchema, SealedRunSchema

    try:
        dht = hivemind.DHT(
            initial_peers=initial_peers,
            host_maddrs=["/ip4/127.0.0.1/tcp/0"],
            client_mode=True,
            start=True,
            await_ready=True,
            wait_timeout=10,
        )
    except Exception as e:  # hivemind raises many types with long messages
        first_line = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise RunNotFound(f"could not join the DHT through --initial-peers ({first_line})") from None
    schema = SealedRunSchema if access.private else RunSchema
    dht.add_validators([SchemaValidator(schema, prefix=access.prefix(run_id, "records")), RecordSigner()])
    return dht


def _settings_records(dht, run_id: str, access) -> dict[bytes, SettingsRecord]:
    """The run's settings records that parse (and, in a private run, open with its key), by the key that signed them
    (a lookup that fails reads as none)."""
    key = settings_key(access.prefix(run_id, "records"))
    try:
        found = dht.get(key, latest=True, return_future=True).result(timeout=LOOKUP_TIMEOUT_S)
    except Exception:  # a slow or failed lookup: nothing found this time
        return {}
    records = {}
    for subkey, item in found.value.items() if found is not None and isinstance(found.value, dict) else []:
        try:
            records[subkey] = SettingsRecord.parse_obj(access.open(key, subkey, item.value))
        except Exception:  # from strangers: a record that does not parse (or open) is skipped
            continue
    return records


def read_run_settings(
    initial_peers: list[str], run_id: str, *, timeout_s: float, swarm_key: str | None = None
) -> tuple[str, dict]:
    """(fingerprint, settings) of the live run `run_id`: the ones most of its peers publish. Records whose settings
    do not hash to their fingerprint are ignored (they come from strangers)."""
    access = run_access(swarm_key, run_id)
    dht = _client_dht(initial_peers, run_id, access)
    try:
        deadline = time.monotonic() + timeout_s
        while True:
            votes: Counter[tuple[str, str]] = Counter()
            for record in _settings_records(dht, run_id, access).values():
                try:
                    settings = json.loads(record.settings_json)
                except ValueError:
                    continue
                if isinstance(settings, dict) and fingerprint(settings) == record.fingerprint:
                    votes[(record.fingerprint, record.settings_json)] += 1
            if votes:
                (found_fingerprint, settings_json), _ = max(votes.items(), key=lambda kv: (kv[1], kv[0]))
                return found_fingerprint, json.loads(settings_json)
            if time.monotonic() >= deadline:
                raise RunNotFound(f"no live peer of run {run_id!r} answered within {timeout_s:.0f}s")
            time.sleep(POLL_S)
    finally:
        dht.shutdown()


def read_published_settings(
    initial_peers: list[str], run_id: str, *, wait_s: float, swarm_key: str | None = None
) -> dict[bytes, SettingsRecord]:
    """The settings records the peers of run `run_id` publish, for a newcomer: looked up until one carries usable run
    settings or `wait_s` has passed (then whatever was found, perhaps nothing: the run has not started)."""
    from peer.run_settings import published_runs

    access = run_access(swarm_key, run_id)
    dht = _client_dht(initial_peers, run_id, access)
    try:
        deadline = time.monotonic() + wait_s
        while True:
            records = _settings_records(dht, run_id, access)
            if published_runs(records) or time.monotonic() >= deadline:
                return records
            time.sleep(POLL_S)
    finally:
        dht.shutdown()


def download_run_state(
    initial_peers: list[str],
    run_id: str,
    *,
    settings: dict,
    run_fingerprint: str,
    params_like: list[torch.Tensor],
    timeout_s: float,
    swarm_key: str | None = None,
) -> RunState:
    """Join the run as a client and download the global parameters the majority of its live peers hold."""
    from peer.swarm import Swarm

    config = RunConfig(
        swarm=SwarmConfig(
            initial_peers=tuple(initial_peers),
            host_maddrs=("/ip4/127.0.0.1/tcp/0",),
            client_mode=True,
            run_id=run_id,
            state_timeout_s=timeout_s,
            swarm_key=swarm_key,
        ),
        outer=OuterConfig(compression=settings.get("compression", "none")),
    )
    state = ReplicatedState(params_like, OuterConfig(), fingerprint=run_fingerprint)

    def serves_nothing() -> tuple[dict, list[torch.Tensor]]:
        raise RuntimeError("an exporter has no state to give")

    swarm = Swarm(
        config,
        settings=settings,
        fingerprint=run_fingerprint,
        averaged_tensors=[torch.zeros_like(p) for p in state.outer.global_params],
        state_provider=serves_nothing,
    )
    try:
        deadline = time.monotonic() + timeout_s
        while True:
            view = coordination.joining_view(swarm)
            if view is not None and view.majority_hash is not None and view.donors:

                def majority_hash(
                    round_index: int,
                ) -> str | None:  # what the live peers hold, not the donor's word
                    return coordination.view_of_round(swarm, round_index, timeout_s=0.0).majority_hash

                def problem(
                    metadata: object, tensors: object, min_round: int = view.round_index
                ) -> str | None:
                    return state.check_donation(
                        metadata, tensors, min_round=min_round, expected_state_hash=majority_hash
                    )

                downloaded = swarm.download_state(view.donors, check=problem)
                if downloaded is not None:
                    metadata, tensors = downloaded
                    num = len(params_like)
                    return RunState(
                        settings=settings,
                        fingerprint=run_fingerprint,
                        round=int(metadata["round"]),
                        params_sha256=tensors_sha256(tensors[:num]),
                        global_params=list(tensors[:num]),
                    )
            if time.monotonic() >= deadline:
                raise RunNotFound(f"could not download the state of run {run_id!r} within {timeout_s:.0f}s")
            time.sleep(POLL_S)
    finally:
        swarm.shutdown()
