"""JSON Lines as replay and the eval-set import read them: a bad line is a reason."""

from __future__ import annotations

from pathlib import Path

from pipeline.jsonlines import json_lines


def test_each_line_is_a_value_or_the_reason_it_is_not(tmp_path: Path) -> None:
    path = tmp_path / "mixed.jsonl"
    lines = [b'{"a": 1}\r', b"", b"  ", b"{not json", b'\xff{"b": 2}', b'"caf\xc3\xa9"', b"[2]"]
    path.write_bytes(b"\n".join(lines))  # the last line without a newline
    assert list(json_lines(path)) == [
        (1, {"a": 1}, None),  # CRLF line ends are whitespace to JSON
        (4, None, "not JSON (Expecting property name enclosed in double quotes)"),
        (5, None, "not UTF-8 text (invalid start byte at byte 0)"),
        (6, "café", None),
        (7, [2], None),
    ]
