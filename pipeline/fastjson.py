"""Compact JSON for the workers' hot paths (checkpoints, partials, cases) with msgspec, which
encodes and decodes several times faster than the standard library.

msgspec writes NaN and infinities as null; the pure core keeps them out of what it encodes
(amounts are validated, non-finite feature values are dropped). Records written by earlier
versions with the standard library may still hold NaN, so decoding falls back to it, and so
does encoding for text msgspec cannot write as UTF-8 (a lone surrogate from JSON input).
"""

from __future__ import annotations

import json
from typing import Any

import msgspec

_encode = msgspec.json.Encoder().encode
_decode = msgspec.json.Decoder().decode


def dumps(value: Any) -> bytes:
    """``value`` as compact JSON; a msgspec.Raw in it is JSON already and goes in as it is."""
    try:
        return _encode(value)
    except UnicodeEncodeError:  # a lone surrogate (JSON input allows them): escape it
        return json.dumps(value, separators=(",", ":"), default=_raw_value).encode()


def _raw_value(value: Any) -> Any:
    if isinstance(value, msgspec.Raw):
        return json.loads(bytes(value))
    if isinstance(value, msgspec.Struct):
        return msgspec.to_builtins(value)
    raise TypeError(f"{type(value).__name__} is not JSON serializable")


def loads(data: bytes | str) -> Any:
    try:
        return _decode(data)
    except msgspec.DecodeError:
        return json.loads(data)  # NaN/Infinity from json.dumps, or a clear JSONDecodeError
