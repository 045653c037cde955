"""agents/state.py without a broker: memory a restore freed goes back to the system."""

from __future__ import annotations

from agents.state import _MALLOC_TRIM, give_back_freed_memory


def test_freed_memory_goes_back_through_glibc_malloc_trim() -> None:
    assert _MALLOC_TRIM is not None  # glibc here (Debian, and the python images of compose)
    assert _MALLOC_TRIM(0) in (0, 1)  # 1: memory was released, 0: there was none to release
    give_back_freed_memory()
