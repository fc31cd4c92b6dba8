"""The records peers publish in the DHT, as schemas: every record read from another peer is parsed with one of these.

pydantic v1 models because hivemind's SchemaValidator is built on pydantic v1.
"""

from __future__ import annotations

from pydantic.v1 import BaseModel, StrictBool, StrictFloat, StrictInt, StrictStr


class ProgressRecord(BaseModel):
    peer_id: bytes
    round: StrictInt
    """The round whose inner steps this peer is running (or has just finished); -1 while it is still joining."""
    inner_step: StrictInt
    tokens: StrictInt
    """Tokens this peer processed in `round` so far."""
    done: StrictBool
    """This peer has finished its inner steps of `round`."""
    averaging: StrictInt
    """The round whose all-reduce this peer is in or about to join (-1: none). With --overlap it is the round
    before `round`: peers training round r+1 still meet for round r."""
    scheduled_time: StrictFloat
    """DHT time at which the group of round `averaging` forms (0: not scheduled): later peers adopt it."""
    tokens_per_s: StrictFloat
    eta: StrictFloat
    """DHT time at which this peer expects to finish its inner phase."""
    client_mode: StrictBool


class HashRecord(BaseModel):
    peer_id: bytes
    hashes: dict[StrictStr, StrictStr]
    """This peer's global-parameter sha256 for each of its most recent rounds (msgpack needs str keys)."""


class SettingsRecord(BaseModel):
    peer_id: bytes
    fingerprint: StrictStr
    settings_json: StrictStr
