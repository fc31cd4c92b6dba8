"""The records peers publish in the DHT, as schemas: every record read from another peer is parsed with one of these.

Records come from strangers (I8): every field is typed strictly and bounded to what is physically plausible, so a
record that parses can be used without further range checks (checks against the current time are in rounds.py).
pydantic v1 models because hivemind's SchemaValidator is built on pydantic v1.
"""

from __future__ import annotations

import re
from typing import Optional

from pydantic.v1 import (
    BaseModel,
    ConstrainedStr,
    Extra,
    StrictBool,
    ValidationError,
    conbytes,
    confloat,
    conint,
    conlist,
    constr,
    validator,
)
from pydantic.v1.error_wrappers import ErrorWrapper

MAX_ROUND = 10**9
MAX_TOKENS = 10**15  # tokens one peer may claim for one round
MAX_TOKENS_PER_S = 1e9  # far above any single machine
MAX_TIME = 1e11  # DHT times are Unix seconds (about 1.8e9 now); anything past year 5000 is a lie
# Nodes a record lookup or store keeps in its beam. hivemind's default is its bucket size (20), and every node a
# lookup (or the search before a store) visits answers with the whole key, all k records: up to 20 x k records per
# operation. A record lives on the num_replicas (5) nodes nearest its key, and a beam of that many still finds and
# reaches them (scripts/bench_dht.py counts the bytes and the records found).
RECORD_BEAM_SIZE = 5
MAX_HASH_ROUNDS = 32  # a hash record carries its publisher's last few rounds (16 today)

PeerIdBytes = conbytes(strict=True, max_length=128)
Round = conint(strict=True, ge=-1, le=MAX_ROUND)
Count = conint(strict=True, ge=0, le=MAX_TOKENS)
Time = confloat(strict=True, ge=0.0, le=MAX_TIME)  # NaN and infinities fail the bounds
Sha256Hex = constr(strict=True, regex=r"^[0-9a-f]{64}$")


class RoundKey(ConstrainedStr):
    """A round number as a dict key (msgpack needs str keys), at most MAX_ROUND like every other round."""

    strict = True
    regex = re.compile(r"^[0-9]{1,10}$")

    @classmethod
    def __get_validators__(cls):
        yield from super().__get_validators__()
        yield cls._at_most_max_round

    @classmethod
    def _at_most_max_round(cls, value: str) -> str:
        if int(value) > MAX_ROUND:
            raise ValueError(f"round {value} is past the last round {MAX_ROUND}")
        return value


class Record(BaseModel):
    """Base of every record read from the DHT: whatever another peer stored either parses or is a ValidationError."""

    @classmethod
    def parse_obj(cls, obj):
        # pydantic v1 calls cls(**obj): a dict with a non-str key (bytes keys do travel in msgpack) raises TypeError
        try:
            return super().parse_obj(obj)
        except TypeError as e:
            raise ValidationError([ErrorWrapper(e, loc="__root__")], cls) from None


class StrictRecord(Record):
    class Config:
        extra = Extra.forbid  # an unknown field is a malformed record, not something to carry along
        allow_mutation = False


class ProgressRecord(StrictRecord):
    peer_id: PeerIdBytes
    round: Round
    """The round whose inner steps this peer is running (or has just finished); -1 while it is still joining."""
    inner_step: conint(strict=True, ge=0, le=MAX_TOKENS)
    tokens: Count
    """Tokens this peer processed in `round` so far."""
    done: StrictBool
    """This peer has finished its inner steps of `round`."""
    averaging: Round
    """The round whose all-reduce this peer is in or about to join (-1: none). With --overlap it is the round
    before `round`: peers training round r+1 still meet for round r."""
    scheduled_time: Time
    """DHT time at which the group of round `averaging` forms (0: not scheduled): later peers adopt it."""
    tokens_per_s: confloat(strict=True, ge=0.0, le=MAX_TOKENS_PER_S)
    eta: Time
    """DHT time at which this peer expects to finish its inner phase."""
    client_mode: StrictBool


class HashRecord(StrictRecord):
    peer_id: PeerIdBytes
    hashes: dict[RoundKey, Sha256Hex]
    """This peer's global-parameter sha256 for each of its most recent rounds (the I1 hash, as in its metrics)."""
    state_hashes: dict[RoundKey, Sha256Hex] = {}
    """sha256 of parameters and outer momentum for the same rounds: what votes and downloaded states are checked
    against, since both must agree for the next outer step to agree."""

    @validator("hashes", "state_hashes")
    def _few_rounds(cls, value: dict) -> dict:
        if len(value) > MAX_HASH_ROUNDS:
            raise ValueError(f"more than {MAX_HASH_ROUNDS} rounds")
        return value


MAX_RUN_SETTINGS_CHARS = 16384  # a few dozen settings, each path at most peer.run_settings.MAX_VALUE_CHARS


class SettingsRecord(StrictRecord):
    peer_id: PeerIdBytes
    fingerprint: constr(strict=True, regex=r"^[0-9a-f]{16}$")
    settings_json: constr(strict=True, max_length=65536)
    run_settings_json: constr(strict=True, max_length=MAX_RUN_SETTINGS_CHARS) = ""
    """The run's settings by flag name (peer.run_settings.run_values), for newcomers to adopt; empty from a peer
    that does not train (an exporter). Parsed and checked by peer.run_settings.parse_run_values."""


# ---- the per-round summary a peer publishes for monitors (peer/monitor.py) -------------------------------------
# Every field is bounded: the record comes from strangers, and a monitor must never crash or grow without bound on
# what one peer claims. The bounds are far beyond anything real (a round number of 10^9, 10^18 tokens or bytes).

SUMMARY_TTL_S = 1800.0
"""How long the DHT keeps a peer's summary: one is published per round, so this outlasts long rounds; a monitor
shows a summary only while the peer's progress record says it is live."""
SUMMARY_HISTORY_ROUNDS = 8
"""Rounds of loss history in each summary, so a monitor that polls less often than rounds end misses none."""
REACHABILITY = ("direct", "relayed", "outgoing-only", "unknown")
"""How others reach a peer: it accepts connections, it is reachable through a relay, or it only dials out."""

MAX_COUNT = 10**18  # tokens and bytes in total
MAX_LOSS = 1e4
MAX_GROUP_SIZE = 10**6

RoundNumber = conint(strict=True, ge=0, le=MAX_ROUND)
TotalCount = conint(strict=True, ge=0, le=MAX_COUNT)
Loss = confloat(strict=True, ge=0.0, le=MAX_LOSS)  # NaN and inf fail the bounds


class RoundLoss(BaseModel):
    """One round of one peer in a summary's short history."""

    round: RoundNumber
    loss: Optional[Loss]  # noqa: UP045 (pydantic v1 needs Optional)
    """Mean inner training loss of the round (None: not finite)."""
    eval_loss: Optional[Loss]  # noqa: UP045
    """Held-out loss of the global parameters after the round (None: not evaluated this round)."""
    tokens: TotalCount
    """Tokens this peer processed in the round: the weight of its loss in the swarm's average."""

    class Config:
        extra = Extra.forbid


class SummaryRecord(Record):
    """A peer's state after its latest round, stored under `summary_key(fingerprint)` with subkey = the peer's
    public key (signed), next to its progress record."""

    peer_id: constr(strict=True, regex=r"^[\x21-\x7e]{1,64}\Z")  # as in the metrics file (base58)
    round: RoundNumber
    """The round just completed (as `round` in the metrics file)."""
    loss: Optional[Loss]  # noqa: UP045
    eval_loss: Optional[Loss]  # noqa: UP045
    """The latest held-out loss this peer measured (None: none yet)."""
    tokens: TotalCount
    """Tokens this peer processed since it started."""
    tokens_per_s: confloat(strict=True, ge=0.0, le=MAX_TOKENS_PER_S)
    bytes_sent: TotalCount
    """All-reduce bytes this peer sent since it started."""
    bytes_received: TotalCount
    group_size: conint(strict=True, ge=0, le=MAX_GROUP_SIZE)
    """Peers in the latest round's all-reduce (0: it failed)."""
    device: constr(strict=True, regex=r"^[\x20-\x7e]{0,64}\Z")
    """What the peer trains on, e.g. 'cpu' or 'cuda NVIDIA H100 80GB HBM3'."""
    reachability: constr(strict=True, regex="^(" + "|".join(REACHABILITY) + r")\Z")
    last_hash: constr(strict=True, regex=r"^[0-9a-f]{64}\Z")
    """sha256 of the global parameters after the latest round."""
    failed_rounds: TotalCount
    resyncs: TotalCount
    max_rounds: RoundNumber
    """The round this peer stops after (0: runs until stopped)."""
    recent: conlist(RoundLoss, max_items=SUMMARY_HISTORY_ROUNDS)
    """The latest rounds, oldest first."""

    class Config:
        extra = Extra.forbid


def progress_key(fingerprint: str) -> str:
    return f"{fingerprint}_progress"


def hashes_key(fingerprint: str) -> str:
    return f"{fingerprint}_hashes"


def summary_key(fingerprint: str) -> str:
    return f"{fingerprint}_summary"


def settings_key(run_id: str) -> str:
    return f"{run_id}_settings"
