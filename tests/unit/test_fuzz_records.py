"""Fuzzing the DHT record schemas (peer/records.py) with hypothesis: whatever another peer stores, parsing it either
gives a record whose every number lies within the bounds its schema declares, or fails with a pydantic error;
nothing else. The schemas are found by introspection, so a record added later is fuzzed too."""

from __future__ import annotations

import inspect
import math

import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic.v1 import BaseModel, StrictBool, ValidationError
from pydantic.v1.fields import ModelField

from peer import records

FUZZ = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])

SCHEMAS = sorted(
    (
        cls
        for cls in vars(records).values()
        if inspect.isclass(cls)
        and issubclass(cls, BaseModel)
        and cls.__module__ == records.__name__
        and cls.__fields__
        and "peer_id" in cls.__fields__  # the records themselves, not bases or nested parts
    ),
    key=lambda cls: cls.__name__,
)

# ---- what the schemas declare --------------------------------------------------------------------------------


def leaf_fields(field: ModelField) -> list[ModelField]:
    """The fields holding plain values: a dict field's key and value fields, a list's item field, or itself."""
    if field.sub_fields:
        leaves = [leaf for sub in field.sub_fields for leaf in leaf_fields(sub)]
        return leaves + (leaf_fields(field.key_field) if field.key_field is not None else [])
    return [field]


def is_number_type(kind: type) -> bool:
    return inspect.isclass(kind) and issubclass(kind, int | float) and not issubclass(kind, bool | StrictBool)


def bounds(kind: type) -> tuple[float, float]:
    """The closed range a constrained number type declares (gt/lt are open, but the range check below is the same
    for the values that matter)."""
    low = getattr(kind, "ge", None)
    low = getattr(kind, "gt", None) if low is None else low
    high = getattr(kind, "le", None)
    high = getattr(kind, "lt", None) if high is None else high
    return (-math.inf if low is None else low, math.inf if high is None else high)


def interesting_numbers(schema: type[BaseModel]) -> list:
    """Each declared bound, one step inside and outside it, as int and float, plus the classic troublemakers."""
    found = [0, 1, -1, 2**31, 2**53 + 1, 2**63 - 1, 2**63, 2**64, -(2**63) - 1, 10**30]
    found += [0.0, -0.0, 0.5, 1e308, -1e308, 5e-324, math.inf, -math.inf, math.nan]
    for field in schema.__fields__.values():
        for leaf in leaf_fields(field):
            for bound in bounds(leaf.type_):
                if math.isfinite(bound):
                    found += [bound, bound - 1, bound + 1, float(bound), float(bound) * (1 + 1e-12)]
    return found


# ---- strategies: random values, and records that are almost right ------------------------------------------------

scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**64), max_value=2**64)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=80)
    | st.binary(max_size=80)
)
anything = st.recursive(
    scalars,
    lambda inner: (
        st.lists(inner, max_size=5)
        | st.dictionaries(st.text(max_size=12) | st.binary(max_size=12) | st.integers(), inner, max_size=5)
    ),
    max_leaves=25,
)
hex64 = st.binary(min_size=31, max_size=33).map(bytes.hex) | st.binary(min_size=32, max_size=32).map(
    lambda b: b.hex()[:-1] + "g"
)
round_keys = st.text(alphabet="0123456789", min_size=0, max_size=12) | st.text(max_size=12)


def field_values(schema: type[BaseModel], field: ModelField) -> st.SearchStrategy:
    """Values of the field's own type (mostly in range, often at the edge) mixed with values of any type."""
    numbers = st.sampled_from(interesting_numbers(schema))
    plausible = (
        numbers
        | st.integers()
        | st.floats()
        | st.booleans()
        | hex64
        | st.binary(min_size=0, max_size=200)
        | st.text(max_size=200)
    )
    if field.key_field is not None:  # a dict field: keys like round numbers, values like hashes
        plausible = st.dictionaries(round_keys, hex64 | plausible, max_size=40)
    return plausible | anything


@st.composite
def almost_records(draw, schema: type[BaseModel]) -> dict:
    """A dict with most of the schema's fields (and sometimes an unknown one), each value plausible or not."""
    names = list(schema.__fields__)
    chosen = draw(st.lists(st.sampled_from(names), unique=True, min_size=max(0, len(names) - 2)))
    value = {name: draw(field_values(schema, schema.__fields__[name])) for name in chosen}
    if draw(st.integers(0, 9)) == 0:
        value[draw(st.text(max_size=10))] = draw(anything)
    return value


# ---- the properties --------------------------------------------------------------------------------------------


def check_within_declared_bounds(schema: type[BaseModel], record: BaseModel) -> None:
    """Every number in a parsed record is finite and inside the range its field's type declares."""
    for name, field in schema.__fields__.items():
        for number, kind in numbers_in(getattr(record, name), field):
            low, high = bounds(kind)
            assert isinstance(number, int | float) and not isinstance(number, bool), (schema, name, number)
            assert math.isfinite(number), (schema.__name__, name, number)
            assert low <= number <= high, (schema.__name__, name, number, (low, high))


def numbers_in(value, field: ModelField):
    """(number, declared type) for every number the field's value holds, keys of a dict field included."""
    if field.key_field is not None and isinstance(value, dict):
        for key, item in value.items():
            yield from numbers_in(key, field.key_field)
            yield from numbers_in(item, field.sub_fields[0])
    elif field.sub_fields and isinstance(value, list | tuple | set):
        for item in value:
            yield from numbers_in(item, field.sub_fields[0])
    elif is_number_type(field.type_):
        yield value, field.type_


def parse_or_reject(schema: type[BaseModel], value) -> BaseModel | None:
    try:
        return schema.parse_obj(value)
    except ValidationError:
        return None  # a malformed record: the reader skips it


@pytest.mark.parametrize("schema", SCHEMAS, ids=lambda schema: schema.__name__)
def test_a_dict_with_non_str_keys_is_a_validation_error(schema):
    with pytest.raises(ValidationError):
        schema.parse_obj({b"peer_id": b"x"})


def test_the_record_schemas_were_found():
    names = {schema.__name__ for schema in SCHEMAS}
    assert {"ProgressRecord", "HashRecord", "SettingsRecord"} <= names


@pytest.mark.parametrize("schema", SCHEMAS, ids=lambda schema: schema.__name__)
def test_every_number_a_record_declares_is_bounded_on_both_sides(schema):
    """Records come from strangers (I8): a number field without an upper or lower bound is an open door."""
    for name, field in schema.__fields__.items():
        for leaf in leaf_fields(field):
            if is_number_type(leaf.type_):
                low, high = bounds(leaf.type_)
                assert math.isfinite(low) and math.isfinite(high), f"{schema.__name__}.{name} is not bounded"
                assert getattr(leaf.type_, "strict", False), f"{schema.__name__}.{name} converts types"


@pytest.mark.parametrize("schema", SCHEMAS, ids=lambda schema: schema.__name__)
@FUZZ
@given(data=st.data())
def test_an_almost_right_record_parses_within_bounds_or_is_rejected(schema, data):
    value = data.draw(almost_records(schema))
    record = parse_or_reject(schema, value)
    if record is not None:
        check_within_declared_bounds(schema, record)


@pytest.mark.parametrize("schema", SCHEMAS, ids=lambda schema: schema.__name__)
@FUZZ
@given(value=anything)
def test_any_value_parses_within_bounds_or_is_rejected(schema, value):
    record = parse_or_reject(schema, value)
    if record is not None:
        check_within_declared_bounds(schema, record)


@pytest.mark.parametrize("schema", SCHEMAS, ids=lambda schema: schema.__name__)
@FUZZ
@given(data=st.data())
def test_a_record_that_travelled_through_msgpack_parses_within_bounds_or_is_rejected(schema, data):
    """What a reader gets is what msgpack decodes from the DHT: ints beyond 64 bits cannot travel, floats become
    doubles, tuples become lists."""
    value = data.draw(almost_records(schema))
    try:
        payload = msgpack.packb(value, use_bin_type=True)
    except (OverflowError, TypeError, ValueError):
        return  # not sendable: no peer can store it
    record = parse_or_reject(schema, msgpack.unpackb(payload, raw=False, strict_map_key=False))
    if record is not None:
        check_within_declared_bounds(schema, record)


# ---- the validator hivemind runs on every record stored at or fetched by this peer ------------------------------
def validators():
    """The schema validators exactly as peer/swarm.py builds them (hivemind's SchemaValidator over our schemas,
    refusing what it cannot decode)."""
    from peer import swarm

    schemas = [cls for cls in vars(swarm).values() if inspect.isclass(cls) and issubclass(cls, BaseModel)]
    schemas = [cls for cls in schemas if cls.__module__ == swarm.__name__]
    assert schemas, "peer/swarm.py defines the DHT schemas it validates with"
    return [(schema, swarm.RecordSchemaValidator(schema, prefix="fuzz")) for schema in schemas]


def encoded(value) -> bytes:
    from hivemind.utils.serializer import MSGPackSerializer

    try:
        return MSGPackSerializer.dumps(value)
    except (OverflowError, TypeError, ValueError):
        return b"\xc1"  # msgpack's "never used" byte: undecodable


@st.composite
def dht_records(draw):
    """A record as it arrives from another peer: a key of one of our schemas' fields, a subkey and a value that are
    msgpack bytes of a plausible record, of anything, or raw bytes (truncated, ext types, garbage)."""
    from hivemind.dht.routing import DHTID
    from hivemind.dht.validation import DHTRecord

    schema, _ = draw(st.sampled_from(VALIDATORS))
    field = draw(st.sampled_from(list(schema.__fields__)))
    record_schemas = [s for s in SCHEMAS if s.__name__ in str(schema.__fields__[field].outer_type_)]
    value = draw(
        st.sampled_from(record_schemas).flatmap(almost_records).map(encoded)
        if record_schemas
        else st.nothing()
        | anything.map(encoded)
        | st.binary(max_size=300)
        | st.builds(msgpack.ExtType, st.integers(0, 127), st.binary(max_size=60)).map(
            lambda ext: msgpack.packb(ext)
        )
    )
    subkey = draw(st.sampled_from([b"", b"\x00"]) | st.binary(max_size=300) | anything.map(encoded))
    key = DHTID.generate(source=f"fuzz_{field}").to_bytes()
    return DHTRecord(key=key, subkey=subkey, value=value, expiration_time=draw(st.floats(0, 2e9)))


VALIDATORS = validators()


def unhashable_subkey(record) -> bool:
    from hivemind.utils.serializer import MSGPackSerializer

    try:
        hash(MSGPackSerializer.loads(record.subkey))
    except TypeError:
        return True
    except Exception:
        return False
    return False


@FUZZ
@given(record=dht_records())
def test_the_dht_validators_answer_true_or_false(record):
    """An exception here escapes into hivemind's DHT request handlers instead of dropping the record."""
    for _, validator in VALIDATORS:
        assert validator.validate(record) in (True, False)


def test_a_subkey_that_decodes_to_a_list_is_refused_not_raised():
    """hivemind 1.1.12's SchemaValidator puts the decoded subkey in a dict before any check: a list raises there."""
    from hivemind.dht.routing import DHTID
    from hivemind.dht.validation import DHTRecord

    record = DHTRecord(
        key=DHTID.generate(source="fuzz_progress").to_bytes(),
        subkey=encoded([1, 2]),
        value=encoded({}),
        expiration_time=1.0,
    )
    assert unhashable_subkey(record)
    checked = [
        validator.validate(record) for schema, validator in VALIDATORS if "progress" in schema.__fields__
    ]
    assert checked and not any(checked)
