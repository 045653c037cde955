"""/readyz's rules (pipeline.health); a live worker's answers are in tests/agents/test_ingest.py."""

from __future__ import annotations

from pipeline.health import WorkerState, readiness


def _state(**changes: object) -> WorkerState:
    ready = {
        "rebalances": 1,
        "rebalancing": False,
        "restoring": False,
        "records_to_restore": 0,
        "partitions": 4,
    }
    return WorkerState(**{**ready, **changes})  # type: ignore[arg-type]


def test_a_worker_that_has_joined_and_restored_is_ready() -> None:
    assert readiness(_state()) == (True, {"status": "ready", "source_partitions": 4})


def test_a_worker_without_partitions_is_ready_too() -> None:
    # a group with more workers than partitions has idle ones; they must not hold a rollout
    assert readiness(_state(partitions=0)) == (True, {"status": "ready", "source_partitions": 0})


def test_a_worker_that_has_not_joined_is_not_ready() -> None:
    ready, body = readiness(_state(rebalances=0, partitions=0))
    assert (ready, body["status"]) == (False, "joining")


def test_a_restore_says_how_many_records_are_left() -> None:
    # Faust's recovery runs inside the rebalance: the restore is what is said
    ready, body = readiness(
        _state(rebalances=2, rebalancing=True, restoring=True, records_to_restore=12_345)
    )
    assert (ready, body["status"], body["records_to_restore"]) == (False, "restoring", 12_345)
    assert body["detail"] == "restoring its tables: 12,345 changelog records to go"


def test_a_rebalance_makes_a_ready_worker_unready_until_it_ends() -> None:
    ready, body = readiness(_state(rebalances=3, rebalancing=True))
    assert (ready, body["status"]) == (False, "rebalancing")
