"""pipeline.fastjson: msgspec where it can, the standard library where msgspec cannot."""

from __future__ import annotations

import json
import math

import msgspec

from pipeline.fastjson import dumps, loads


def test_compact_json_that_the_standard_library_reads_back() -> None:
    value = {"a": [1, 2.5, None, True], "é": {"n": -3}, "t": 'x"y'}
    assert dumps(value) == b'{"a":[1,2.5,null,true],"\xc3\xa9":{"n":-3},"t":"x\\"y"}'
    assert loads(dumps(value)) == value == json.loads(dumps(value))


def test_a_lone_surrogate_is_escaped_and_read_back() -> None:
    text = json.loads('"a\\ud800b"')  # JSON input may hold one; UTF-8 cannot
    assert dumps({"t": text}) == b'{"t":"a\\ud800b"}'
    assert loads(dumps({"t": text})) == {"t": text}


def test_nan_written_by_the_standard_library_is_read() -> None:
    assert math.isnan(loads(b'{"x":NaN}')["x"])
    assert loads('{"x":Infinity}') == {"x": math.inf}


def test_raw_json_goes_in_as_it_is_on_both_paths() -> None:
    raw = msgspec.Raw(b'{"b":[1,2]}')
    assert dumps({"a": raw}) == b'{"a":{"b":[1,2]}}'
    text = json.loads('"a\\ud800b"')
    assert dumps({"t": text, "a": raw}) == b'{"t":"a\\ud800b","a":{"b":[1,2]}}'
