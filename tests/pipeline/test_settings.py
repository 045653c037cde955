"""Settings come from LOOPLINE_* variables, with clear errors for bad values."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipeline.settings import Settings, SettingsError


def test_defaults_and_environment_values() -> None:
    assert Settings.from_env({}) == Settings()
    settings = Settings.from_env(
        {
            "LOOPLINE_BOOTSTRAP_SERVERS": "k1:9092,k2:9092",
            "LOOPLINE_PARTITIONS": "8",
            "LOOPLINE_TOPIC_PREFIX": "prod.",
            "LOOPLINE_DATA_DIR": "/var/lib/loopline",
            "UNRELATED": "x",
        }
    )
    assert settings.bootstrap_servers == "k1:9092,k2:9092"
    assert settings.partitions == 8
    assert settings.topic("inputs") == "prod.inputs"
    assert settings.data_dir == Path("/var/lib/loopline")
    loops = Settings.from_env({"LOOPLINE_LOOPS": "refunds, kyc-review,"}).core_config().loops
    assert loops == frozenset({"refunds", "kyc-review"})
    capped = Settings.from_env({"LOOPLINE_MAX_CASES_PER_PARTITION": "250_000"})
    assert capped.core_config().max_cases_per_partition == 250_000
    assert Settings().core_config().max_cases_per_partition == 0  # no cap by default
    assert Settings.from_env({"LOOPLINE_INSTANCE_ID": "worker-0"}).instance_id == "worker-0"
    assert Settings.from_env({"LOOPLINE_INSTANCE_ID": ""}).instance_id is None  # dynamic
    assert Settings.from_env({"LOOPLINE_LOG_LEVEL": " WARNING "}).log_level == "warning"


@pytest.mark.parametrize(
    ("var", "value", "message"),
    [
        ("LOOPLINE_PARTITIONS", "four", "LOOPLINE_PARTITIONS='four'"),
        ("LOOPLINE_PARTITIONS", "0", "must be a positive integer"),
        ("LOOPLINE_WEB_PORT", "70000", "must be a TCP port"),
        ("LOOPLINE_TOPIC_PREFIX", "a/b", "may hold only letters"),
        ("LOOPLINE_SNAPSHOT_INTERVAL_SECONDS", "0", "must be a positive number"),
        ("LOOPLINE_HOURLY_RATES", "refunds", "expected loop=number pairs"),
        ("LOOPLINE_MAX_CASES_PER_PARTITION", "-1", "must be an integer, 0 or more"),
        ("LOOPLINE_SESSION_TIMEOUT_SECONDS", "3", "must be between 6 and 1800 seconds"),
        ("LOOPLINE_INSTANCE_ID", "pod 1", "may hold only letters"),
        ("LOOPLINE_LOG_LEVEL", "chatty", "must be one of debug, info, warning, error, critical"),
        # nan fails no bound check, inf passes them: a rate of nan made every cost nan
        ("LOOPLINE_HOURLY_RATES", "refunds=nan", "'refunds=nan': must be a finite number"),
        ("LOOPLINE_LOOP_SLA_SECONDS", "refunds=inf", "must be a finite number"),
        ("LOOPLINE_SNAPSHOT_INTERVAL_SECONDS", "inf", "must be a finite number"),
        ("LOOPLINE_ARCHIVE_HOLD_SECONDS", "nan", "must be a finite number"),
    ],
)
def test_bad_values_name_the_variable(var: str, value: str, message: str) -> None:
    with pytest.raises(SettingsError, match=message):
        Settings.from_env({var: value})


def test_settings_are_frozen() -> None:
    with pytest.raises(AttributeError):
        Settings().partitions = 2  # type: ignore[misc]


def test_a_loopline_variable_that_names_no_setting_is_reported_with_the_likely_one() -> None:
    env = {
        "LOOPLINE_HOURLY_RATE": "refunds=45",  # a typo of LOOPLINE_HOURLY_RATES
        "LOOPLINE_PARTITIONS": "8",  # a setting
        "LOOPLINE_SERVICE_HOST": "10.0.0.7",  # what Kubernetes adds for a Service "loopline"
        "HOURLY_RATES": "refunds=45",  # not loopline's
    }
    assert Settings.unknown_variables(env) == [
        "LOOPLINE_HOURLY_RATE is not a loopline setting and is ignored "
        "(did you mean LOOPLINE_HOURLY_RATES?)",
        "LOOPLINE_SERVICE_HOST is not a loopline setting and is ignored",
    ]
    assert Settings.from_env(env) == Settings(partitions=8)  # ignored, as said
    assert Settings.unknown_variables({"LOOPLINE_PARTITIONS": "8"}) == []
