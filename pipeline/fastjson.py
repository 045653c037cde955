"""Compact JSON for the workers' hot paths (checkpoints, partials, cases) with msgspec, which
encodes and decodes several times faster than the standard library.

msgspec writes NaN and infinities as null; the pure core keeps them out of what it encodes
(amounts are validated, non-finite feature values are dropped). Records written by earlier
versions with the standard library may still hold NaN, so decoding falls back to it.
"""

from __future__ import annotations

import json
from typing import Any

import msgspec

_encode = msgspec.json.Encoder().encode
_decode = msgspec.json.Decoder().decode


def dumps(value: Any) -> bytes:
    return _encode(value)


def loads(data: bytes | str) -> Any:
    try:
        return _decode(data)
    except msgspec.DecodeError:
        return json.loads(data)  # NaN/Infinity from json.dumps, or a clear JSONDecodeError
