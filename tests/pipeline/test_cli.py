"""The ``loopline`` commands as a shell runs them: Kafka's refusals end them with a reason."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import free_port


def loopline(*args: object, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """A ``loopline`` command as a shell runs it (not CliRunner: the process's own imports and
    argv matter, see test_views' gate test), with ``env`` added to this environment."""
    return subprocess.run(
        [sys.executable, "-m", "pipeline.cli", *map(str, args)],
        env={**os.environ, **(env or {})},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


@pytest.mark.parametrize(
    "command",
    [
        ["topics"],
        ["generate", "--count", "3"],
        ["evalset", "import", "{cases}"],
        ["evalset", "export"],
        ["evalset", "delete", "e1"],
        ["evalset", "age"],
        ["archive", "run", "--db", "{archive}"],
        ["review"],
        ["worker", "--web-port", "{web_port}"],
    ],
    ids=lambda command: " ".join(command[:2]),
)
def test_a_command_that_cannot_reach_kafka_says_so_and_exits_1(
    tmp_path: Path, command: list[str]
) -> None:
    cases = tmp_path / "cases.jsonl"
    cases.write_text('{"eval_case_id": "e1", "loop": "refunds", "category": "damaged"}\n')
    places = {"cases": cases, "archive": tmp_path / "a.duckdb", "web_port": free_port()}
    port = free_port()  # nothing listens there
    env = {
        "LOOPLINE_BOOTSTRAP_SERVERS": f"127.0.0.1:{port}",
        "LOOPLINE_DATA_DIR": str(tmp_path / "data"),
        "LOOPLINE_REVIEW_TOKEN": "a-token",
    }
    done = loopline(*(part.format(**places) for part in command), env=env)
    assert done.returncode == 1, done.stderr
    last = done.stderr.strip().splitlines()[-1]
    assert last == (
        f"Error: cannot use Kafka at 127.0.0.1:{port} (PLAINTEXT): KafkaConnectionError: "
        f"Unable to bootstrap from [('127.0.0.1', {port}, <AddressFamily.AF_INET: 2>)]"
    )
    assert "Traceback" not in done.stderr
    assert "Unclosed" not in done.stderr  # every client is closed, also when it never started


@pytest.mark.parametrize("demo_owned", [False, True])
def test_an_archive_run_not_the_demos_takes_the_archive_from_the_demo(
    tmp_path: Path, demo_owned: bool
) -> None:
    """Rows of any broker but the demo's own make the archive one the next demo must keep."""
    archive, marker = tmp_path / "a.duckdb", tmp_path / "a.duckdb.made-by-demo"
    marker.write_text("")
    env = {"LOOPLINE_BOOTSTRAP_SERVERS": f"127.0.0.1:{free_port()}"}  # nothing listens
    flags = ["--demo-owned"] if demo_owned else []
    done = loopline("archive", "run", "--db", archive, *flags, env=env)
    assert done.returncode == 1 and "cannot use Kafka" in done.stderr, done.stderr
    assert archive.exists() and marker.exists() == demo_owned


def test_an_archive_file_that_is_not_duckdb_is_refused_without_a_traceback(
    tmp_path: Path,
) -> None:
    """The sink opens its file (for its id and schema) before it reaches Kafka: a file that is
    not DuckDB's ended in a traceback there."""
    archive = tmp_path / "a.duckdb"
    archive.write_text("not a database\n")
    env = {"LOOPLINE_BOOTSTRAP_SERVERS": f"127.0.0.1:{free_port()}"}
    done = loopline("archive", "run", "--db", archive, env=env)
    assert done.returncode == 1, done.stderr
    assert done.stderr.strip().splitlines() == [
        f'Error: archive {archive}: IO Error: The file "{archive}" exists, but it is not a valid '
        "DuckDB database file!"
    ]
    assert archive.read_text() == "not a database\n"  # left as it was


@pytest.mark.parametrize(
    ("command", "option"),
    [
        (["generate", "--count", "3", "--jsonl", "{out}"], "'--jsonl'"),
        (["replay", "{events}", "--alerts", "{out}"], "'--alerts'"),
        (["rules", "prometheus", "-o", "{out}"], "'--output' / '-o'"),
        (["evalset", "export", "-o", "{out}"], "'--output' / '-o'"),
        (["report", "--week", "2026-W47", "-o", "{out}"], "'-o' / '--output'"),
    ],
    ids=lambda value: " ".join(value[:2]) if isinstance(value, list) else None,
)
def test_an_output_file_in_a_missing_folder_is_refused_before_any_work(
    tmp_path: Path, command: list[str], option: str
) -> None:
    events = tmp_path / "events.jsonl"
    events.write_text("")
    out = tmp_path / "missing" / "out.txt"
    places = {"out": out, "events": events}
    unused = {"LOOPLINE_BOOTSTRAP_SERVERS": f"127.0.0.1:{free_port()}"}
    done = loopline(*(part.format(**places) for part in command), env=unused)
    assert done.returncode == 2, done.stderr  # click's status for a bad argument
    assert done.stderr.strip().splitlines()[-1] == (
        f"Error: Invalid value for {option}: {out}: the folder {out.parent} does not exist"
    )


@pytest.mark.parametrize(
    ("command", "last_line"),
    [
        (
            ["gate", "--loop", "l", "--release", "r", "--min-pass-rate", "nan"],
            "'--min-pass-rate': nan",
        ),
        (["generate", "--duration", "nan", "--jsonl", "-"], "'--duration': nan"),
        (["generate", "--count", "3", "--rate", "inf", "--jsonl", "-"], "'--rate': inf"),
        (["generate", "--count", "3", "--drift-at", "nan", "--jsonl", "-"], "'--drift-at': nan"),
        (["demo", "--rate", "nan"], "'--rate': nan"),
    ],
    ids=lambda value: " ".join(value[:2]) if isinstance(value, list) else None,
)
def test_a_number_that_is_not_finite_is_refused(command: list[str], last_line: str) -> None:
    """click's FloatRange lets nan through every bound: `gate --min-pass-rate nan` passed a
    release at 70 %, and a duration of nan never ended."""
    done = loopline(*command)
    assert done.returncode == 2, done.stderr
    expected = f"Error: Invalid value for {last_line} is not a finite number"
    assert done.stderr.strip().splitlines()[-1] == expected


def test_a_start_time_that_is_not_iso_8601_is_refused() -> None:
    done = loopline("generate", "--count", 1, "--start", "yesterday")
    assert done.returncode == 2, done.stderr
    assert done.stderr.strip().splitlines()[-1] == (
        "Error: Invalid value for --start: 'yesterday' is not an ISO-8601 time, "
        "e.g. 2026-11-25T12:00:00Z"
    )


@pytest.mark.parametrize(
    ("command", "what", "setting"),
    [
        (["worker", "--web-port", "{port}"], "/metrics", "LOOPLINE_WEB_PORT or --web-port"),
        (["review", "--port", "{port}"], "the review page", "LOOPLINE_REVIEW_PORT or --port"),
    ],
    ids=["worker", "review"],
)
def test_a_port_another_process_listens_on_is_named_before_any_work(
    command: list[str], what: str, setting: str
) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        env = {
            "LOOPLINE_BOOTSTRAP_SERVERS": f"127.0.0.1:{free_port()}",  # never reached
            "LOOPLINE_REVIEW_TOKEN": "a-token",
        }
        done = loopline(*(p.format(port=port) for p in command), env=env)
    assert done.returncode == 1, done.stderr
    assert done.stderr.strip().splitlines()[-1] == (
        f"Error: cannot serve {what} on 127.0.0.1:{port}: Address already in use ({setting})"
    )


def test_the_version_is_the_installed_package_s() -> None:
    from importlib.metadata import version

    done = loopline("--version")
    assert done.returncode == 0, done.stderr
    assert done.stdout == f"loopline, version {version('loopline')}\n"


def test_a_misspelt_setting_is_warned_about_and_the_command_goes_on(tmp_path: Path) -> None:
    """The typo's consequence, shown: the default hourly rate (0) prices the 30 human minutes
    at nothing, so the one resolution costs its 0.25 USD of model cost alone."""
    events = tmp_path / "events.jsonl"
    events.write_text(
        '{"topic": "resolutions", "record": {"event_id": "r1", "case_id": "c1", '
        '"loop": "refunds", "ts": "2026-11-25T11:59:00Z", "resolver": "HUMAN", '
        '"outcome": "RESOLVED", "release": "r", "model_cost_usd": 0.25, '
        '"other_cost_usd": 0.0, "human_minutes": 30.0}}\n'
    )
    done = loopline(
        "replay",
        events,
        "--as-of",
        "2026-11-25T12:00:00Z",
        env={"LOOPLINE_HOURLY_RATE": "refunds=60"},
    )
    assert done.returncode == 0, done.stderr
    assert done.stderr.strip().splitlines() == [
        "warning: LOOPLINE_HOURLY_RATE is not a loopline setting and is ignored "
        "(did you mean LOOPLINE_HOURLY_RATES?)",
        "replay: 1 ok; 0 rejected; 0 alert evaluations, 0 alert records",
    ]
    window = json.loads(done.stdout)["loops"]["refunds"]["windows"]["5m"]
    assert window["cost_per_resolution_usd"] == 0.25
    assert window["toil_hours"] == 0.5
