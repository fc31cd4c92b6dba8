"""The records peers publish in the DHT, as schemas: every record read from another peer is parsed with one of these.

Records come from strangers (I8): every field is typed strictly and bounded to what is physically plausible, so a
record that parses can be used without further range checks (checks against the current time are in rounds.py).
pydantic v1 models because hivemind's SchemaValidator is built on pydantic v1.
"""

from __future__ import annotations

from pydantic.v1 import BaseModel, Extra, StrictBool, conbytes, confloat, conint, constr, validator

MAX_ROUND = 10**9
MAX_TOKENS = 10**15  # tokens one peer may claim for one round
MAX_TOKENS_PER_S = 1e9  # far above any single machine
MAX_TIME = 1e11  # DHT times are Unix seconds (about 1.8e9 now); anything past year 5000 is a lie
MAX_HASH_ROUNDS = 32  # a hash record carries its publisher's last few rounds (16 today)

PeerIdBytes = conbytes(strict=True, max_length=128)
Round = conint(strict=True, ge=-1, le=MAX_ROUND)
Count = conint(strict=True, ge=0, le=MAX_TOKENS)
Time = confloat(strict=True, ge=0.0, le=MAX_TIME)  # NaN and infinities fail the bounds
Sha256Hex = constr(strict=True, regex=r"^[0-9a-f]{64}$")
RoundKey = constr(strict=True, regex=r"^[0-9]{1,10}$")  # msgpack needs str keys


class StrictRecord(BaseModel):
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


class SettingsRecord(StrictRecord):
    peer_id: PeerIdBytes
    fingerprint: constr(strict=True, regex=r"^[0-9a-f]{16}$")
    settings_json: constr(strict=True, max_length=65536)
