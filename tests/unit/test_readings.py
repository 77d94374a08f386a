"""The validator refuses each rule of the wire contract with a reason naming it, and lets good readings by."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from components.core import readings as r

DEVICE, SENSOR = "7", "humidity"
GOOD = {"value": 41.5, "ts": 1700000000.123456}


@pytest.mark.parametrize(
    ("reading", "reason"),
    [
        ([1, 2], r.NOT_AN_OBJECT),
        ("41.5", r.NOT_AN_OBJECT),
        ({**GOOD, "unit": "%"}, r.UNKNOWN_FIELD),
        ({**GOOD, "device_id": "8"}, r.DEVICE_ID_MISMATCH),
        ({**GOOD, "sensor_type": "temperature"}, r.SENSOR_TYPE_MISMATCH),
        ({"ts": 1.0}, r.VALUE_MISSING),
        ({**GOOD, "value": "41.5"}, r.VALUE_NOT_NUMBER),
        ({**GOOD, "value": True}, r.VALUE_NOT_NUMBER),
        ({**GOOD, "value": math.nan}, r.VALUE_NOT_FINITE),
        ({**GOOD, "value": math.inf}, r.VALUE_NOT_FINITE),
        ({**GOOD, "value": 2**70}, r.VALUE_NOT_FINITE),
        ({"value": 1.0}, r.TS_MISSING),
        ({**GOOD, "ts": "2017-07-04"}, r.TS_NOT_NUMBER),
        ({**GOOD, "ts": -math.inf}, r.TS_NOT_FINITE),
        ({**GOOD, "seq": 1.5}, r.SEQ_NOT_INTEGER),
        ({**GOOD, "seq": "3"}, r.SEQ_NOT_INTEGER),
        ({**GOOD, "seq": 0}, r.SEQ_OUT_OF_RANGE),
        ({**GOOD, "data": [1, 2]}, r.DATA_NOT_OBJECT),
        ({**GOOD, "data": {"raw": b"\x00\x01"}}, r.DATA_NOT_JSON),
        ({**GOOD, "data": {1: "int key"}}, r.DATA_NOT_JSON),
        ({**GOOD, "data": {"x": math.nan}}, r.DATA_NOT_JSON),
        ({**GOOD, "data": {"blob": "x" * 9000}}, r.DATA_TOO_LARGE),
    ],
)
def test_each_contract_rule_is_refused_with_a_reason_naming_it(reading: object, reason: str) -> None:
    assert r.check_reading(reading, DEVICE, SENSOR) == reason
    cols, rejected = r.validate_event(DEVICE, SENSOR, [GOOD, reading, GOOD])
    # the bad reading is refused, its neighbours in the same event are kept
    assert rejected == [(1, reason)]
    assert cols.values == [41.5, 41.5]
    assert reason in r.REASONS


@pytest.mark.parametrize(
    "reading",
    [
        GOOD,
        {"value": 3, "ts": 1500052521},
        {**GOOD, "device_id": DEVICE, "sensor_type": SENSOR, "seq": 9, "data": {"fw": "1.2", "n": [1, 2.5]}},
        {**GOOD, "seq": None, "data": None},
        {**GOOD, "data": {"blob": "x" * 8000}},
    ],
)
def test_valid_readings_pass(reading: dict) -> None:
    assert r.check_reading(reading, DEVICE, SENSOR) is None
    cols, rejected = r.validate_event(DEVICE, SENSOR, reading)
    assert rejected == []
    assert cols.ts == [reading["ts"]] and cols.values == [reading["value"]]
    assert cols.seqs == [reading.get("seq")] and cols.datas == [reading.get("data")]


def test_an_empty_event_is_refused() -> None:
    cols, rejected = r.validate_event(DEVICE, SENSOR, [])
    assert len(cols) == 0 and rejected == [(0, r.EMPTY_EVENT)]


def test_ids_follow_the_contract_pattern() -> None:
    assert r.valid_id("0") and r.valid_id("sensor_17") and r.valid_id("a" * 64)
    for bad in ("", "A", "dev-1", "a.b", "a" * 65, 7, None):
        assert not r.valid_id(bad)


FLOATS = st.floats(min_value=-1e300, max_value=1e300) | st.floats()
INTS = st.integers(min_value=-(2**64), max_value=2**64)
PLAIN = st.one_of(  # the shapes the bulk path takes, with their edge values
    st.fixed_dictionaries({"value": FLOATS, "ts": FLOATS},
                          optional={"seq": st.integers(min_value=-1, max_value=2**64)}),
    st.fixed_dictionaries({"value": INTS, "ts": INTS}, optional={"seq": st.integers(min_value=1, max_value=9)}))
ODD = st.one_of(
    st.fixed_dictionaries({"value": st.one_of(FLOATS, INTS, st.booleans(), st.none(), st.text(max_size=2)),
                           "ts": st.one_of(FLOATS, INTS, st.none())},
                          optional={"seq": st.one_of(st.none(), st.booleans(), st.floats()),
                                    "device_id": st.sampled_from([DEVICE, "8"]), "data": st.just({"k": 1}),
                                    "unit": st.just("%")}),
    st.lists(st.text(max_size=5), max_size=3), st.none(), st.text(max_size=5), st.integers())
EVENTS = st.lists(PLAIN, min_size=2, max_size=8) | st.lists(PLAIN | ODD, min_size=2, max_size=8)


@settings(max_examples=400, deadline=None)
@given(EVENTS)
def test_a_whole_event_is_judged_exactly_as_its_readings_one_by_one(event: list) -> None:
    # events of several readings take a bulk path; single readings the per-reading checks
    cols, rejected = r.validate_event(DEVICE, SENSOR, event)
    one_by_one = [r.validate_event(DEVICE, SENSOR, [reading]) for reading in event]
    assert rejected == [(i, rej[0][1]) for i, (_, rej) in enumerate(one_by_one) if rej]
    accepted = [c for c, rej in one_by_one if not rej]
    assert (cols.ts, cols.values, cols.seqs) == ([c.ts[0] for c in accepted], [c.values[0] for c in accepted],
                                                 [c.seqs[0] for c in accepted])
